//! `treeswap update`: bring this machine to the latest version of its channel in a release
//! repository (FORMAT.md, "Release repository").
//!
//! 0. Refuse to run with no `[trust] public_keys` (exit 10) unless `--insecure`: without a
//!    key, whoever answers for the URL would choose what is installed.
//! 1. Fetch `<url>/<channel>/index.toml` and its signature (conditional on the ETag of the
//!    copy kept in `downloads/`, if it came from the same URL), from the `url`'s own server
//!    only; on a bad signature, both once more, unconditionally. Refuse it, before anything
//!    is written, if its signature does not verify with `[trust] public_keys` (exit 10), if
//!    it expired or is dated in the future (12), if its serial is below the last one
//!    accepted on this machine (13, kept in the state file), if it is of another channel
//!    (14), or if its latest version is older than `current` (11, unless
//!    `--allow-downgrade`).
//! 2. Choose the path (`path::choose`). A writer records the index's serial now, before
//!    anything is downloaded.
//! 3. Download each delta (`fetch::download`: mirrors first, resumable, capped, checked) and
//!    apply it as `apply` does (its own signature checked too), intermediate versions only
//!    staged; then remove the download.
//! 4. Keep the index fetched, for the next run's conditional request.

mod fetch;
pub(crate) mod path;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::core::config::Config;
use crate::core::error::Fail;
use crate::core::index::{self, Index};
use crate::ops::{apply, boot, flip, trust};
use crate::store::root::{Root, now};
use crate::store::state;

pub(crate) struct Options {
    /// The repository's top.
    pub url: String,
    pub channel: String,
    /// Only say whether an update exists (a reader: writes nothing).
    pub check: bool,
    /// Print the path and its bytes (a reader: writes nothing).
    pub dry_run: bool,
    /// Install the latest version without making it current.
    pub stage_only: bool,
    pub flip: flip::Options,
    /// Whether this run holds the writer's lock (not for `check` and `dry_run`).
    pub writer: bool,
    /// Check no signature, of the index or of a delta (development only; logged loudly).
    pub insecure: bool,
    /// Accept a latest version older than `current`.
    pub allow_downgrade: bool,
}

/// One delta of the path, for the report.
#[derive(Serialize, Debug)]
pub(crate) struct Step {
    pub path: String,
    pub from: Option<String>,
    pub to: String,
    pub bytes: u64,
}

/// What `update` did or would do (`--json` prints it; schema in FORMAT.md).
#[derive(Serialize, Debug)]
pub(crate) struct Report {
    pub schema: u32,
    /// `available`, `would-apply`, `would-switch`, `applied`, `switched`, `staged`.
    pub result: &'static str,
    pub channel: String,
    pub serial: u64,
    pub current: Option<String>,
    pub latest: String,
    /// The deltas, in the order they are applied (empty for a switch).
    pub path: Vec<Step>,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes fetched from the network for them in this run, and bytes already downloaded.
    pub fetched: u64,
    pub resumed: u64,
}

impl Report {
    pub(crate) fn to_text(&self) -> String {
        let steps: Vec<String> = self
            .path
            .iter()
            .map(|s| {
                format!(
                    "`{}` -> `{}` ({} bytes)",
                    s.from.as_deref().unwrap_or("(empty tree)"),
                    s.to,
                    s.bytes
                )
            })
            .collect();
        let how = match steps.is_empty() {
            true => "a switch (installed already)".to_string(),
            false => steps.join(", then "),
        };
        match self.result {
            "available" | "would-apply" | "would-switch" => format!(
                "update available: `{}` (serial {} of `{}`), current is {}; path: {how}; {} bytes to download\n",
                self.latest,
                self.serial,
                self.channel,
                self.current
                    .as_deref()
                    .map_or("nothing".into(), |c| format!("`{c}`")),
                self.bytes
            ),
            r => format!(
                "{r} `{}` (serial {} of `{}`): {how}; {} bytes fetched, {} resumed\n",
                self.latest, self.serial, self.channel, self.fetched, self.resumed
            ),
        }
    }
}

/// Files of `downloads/` that are not deltas: the accepted index, its signature, its ETag.
fn cache_names(channel: &str) -> [String; 3] {
    [
        format!("index.{channel}.toml"),
        format!("index.{channel}.toml.minisig"),
        format!("index.{channel}.etag"),
    ]
}

/// The root's `downloads/` if it is a directory (not a symlink to one elsewhere, whose files
/// treeswap would then remove); `false` if it does not exist.
fn check_downloads(root: &Root) -> Result<bool> {
    let d = root.path.join("downloads");
    match std::fs::symlink_metadata(&d) {
        Ok(m) if m.is_dir() => Ok(true),
        Ok(_) => anyhow::bail!(
            "`{}` is not a directory (a symlink?): move it away and run update again",
            d.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot stat `{}`", d.display())),
    }
}

/// The root's `downloads/` (made if missing; see [`check_downloads`]).
fn downloads(root: &Root) -> Result<PathBuf> {
    let d = root.path.join("downloads");
    if !check_downloads(root)? {
        fs_err::create_dir(&d)?;
    }
    Ok(d)
}

/// `treeswap update`.
pub(crate) fn update(root: &Root, cfg: &Config, opts: &Options) -> Result<Report> {
    index::validate_channel(&opts.channel)?;
    let keys = trust::load_keys(&cfg.trust.public_keys)?;
    // Without a trusted key, whoever answers for the URL would choose what is installed.
    if keys.is_empty() && !opts.insecure {
        return Err(Fail::Untrusted(
            "no public keys are configured to check the release index: add the release key to `[trust] public_keys` (or, for development only, give --insecure)".into(),
        )
        .into());
    }
    let net = fetch::Net::new(&cfg.update)?;
    let primary = fetch::source_for(&opts.url, &net)?;
    // Before anything is read from it or recorded: the index is kept there too.
    check_downloads(root)?;
    let mut st = state::load(root.fd())?;
    let (ix, fresh) = fetch_index(root, primary.as_ref(), &opts.channel, &keys, opts.insecure)?;
    ix.check_fresh(&opts.channel, now(), st.serials.get(&opts.channel).copied())?;
    log::info!(
        "index of `{}`: serial {}, latest `{}`",
        ix.channel,
        ix.serial,
        ix.latest
    );

    let current = root.link("current")?;
    let previous = root.link("previous")?;
    let mut installed = Vec::new();
    for v in root.versions()? {
        if let Some(digest) = root.manifest_digest(&v)? {
            installed.push(path::Installed { version: v, digest });
        }
    }
    let machine = path::Machine {
        current: current.as_deref(),
        previous: previous.as_deref(),
        installed: &installed,
    };
    let mut report = Report {
        schema: 1,
        result: "available",
        channel: ix.channel.clone(),
        serial: ix.serial,
        current: current.clone(),
        latest: ix.latest.clone(),
        path: Vec::new(),
        bytes: 0,
        fetched: 0,
        resumed: 0,
    };
    let chosen = match path::choose(&ix, &machine) {
        Err(e) if matches!(e.downcast_ref::<Fail>(), Some(Fail::Nothing(_))) => {
            if opts.writer {
                accept(root, &mut st, &ix, fresh.as_ref())?;
            }
            return Err(e);
        }
        r => r?,
    };
    // A switch never compares versions, and a delta's downgrade would be refused only after
    // its download: refused here, for every path.
    if let Some(cur) = current.as_deref()
        && crate::core::version::compare(&ix.latest, cur) == std::cmp::Ordering::Less
        && !opts.allow_downgrade
    {
        return Err(Fail::Downgrade(format!(
            "refusing to downgrade from `{cur}` to `{}`, the latest version of `{}` (use --allow-downgrade)",
            crate::core::path::quote_at_most(&ix.latest, 100),
            ix.channel
        ))
        .into());
    }
    if let path::Path::Deltas(ds) = &chosen {
        report.path = ds
            .iter()
            .map(|d| Step {
                path: d.path.clone(),
                from: d.from.clone(),
                to: d.to.clone(),
                bytes: d.size,
            })
            .collect();
    }
    report.bytes = chosen.bytes();
    if opts.check {
        return Ok(report);
    }
    if opts.dry_run {
        report.result = match chosen {
            path::Path::Switch => "would-switch",
            path::Path::Deltas(_) => "would-apply",
        };
        return Ok(report);
    }
    // The serial is recorded now, durably, before anything is downloaded: a run cut short
    // after seeing serial N cannot be followed by one that acts on an older index.
    if st.serials.get(&ix.channel) != Some(&ix.serial) {
        st.serials.insert(ix.channel.clone(), ix.serial);
        state::save(root.fd(), &st)?;
    }
    let first_install = st.pending.is_none() && current.is_none();
    let dir = downloads(root)?;
    let deltas = match chosen {
        path::Path::Switch => {
            if !opts.stage_only {
                flip::switch(root, cfg, &ix.latest, opts.flip)?;
            }
            report.result = if opts.stage_only {
                "staged"
            } else {
                "switched"
            };
            Vec::new()
        }
        path::Path::Deltas(ds) => ds,
    };
    let mut sources = Vec::new();
    for m in &cfg.update.mirrors {
        sources.push(fetch::source_for(m, &net)?);
    }
    sources.push(primary);
    // A partial download of anything else is of an older plan: it goes.
    let keep: Vec<String> = deltas
        .iter()
        .map(|d| fetch::part_name(&d.sha256()))
        .collect();
    clear_stale(&dir, &keep, &opts.channel)?;
    let mut fetched = fetch::Fetched::default();
    for (i, d) in deltas.iter().enumerate() {
        let last = i + 1 == deltas.len();
        let want = fetch::Want {
            rel: &d.path,
            size: d.size,
            sha256: d.sha256(),
            chunk_size: ix.chunk_size,
            chunks: (0..d.chunks.len()).map(|c| d.chunk(c)).collect(),
        };
        let file = fetch::download(&dir, &want, &sources, &net, &mut fetched)?;
        let input = std::io::BufReader::with_capacity(
            1 << 20,
            fs_err::File::open(&file).context("cannot open the download")?,
        );
        let outcome = apply::apply(
            root,
            cfg,
            input,
            apply::Options {
                stage_only: opts.stage_only || !last,
                flip: opts.flip,
                insecure: opts.insecure,
                allow_downgrade: opts.allow_downgrade,
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot apply `{}`", d.path))?;
        log::info!("applied `{}`: {outcome:?}", d.path);
        fs_err::remove_file(&file)?;
        report.result = match outcome {
            apply::Outcome::Staged { .. } => "staged",
            apply::Outcome::Switched { .. } => "switched",
            _ => "applied",
        };
    }
    report.fetched = fetched.bytes;
    report.resumed = fetched.resumed;
    // A first install has nothing to fall back to: it is good at once (as `import --activate`).
    if first_install && !opts.stage_only && root.link("previous")?.is_none() {
        boot::mark_good(root, cfg, false)?;
    }
    let mut st = state::load(root.fd())?;
    accept(root, &mut st, &ix, fresh.as_ref())?;
    Ok(report)
}

/// The index as fetched now (to be kept once accepted): its text, signature and ETag.
struct Fresh {
    text: Vec<u8>,
    sig: Vec<u8>,
    etag: Option<String>,
    /// Where the index came from (its ETag is only sent there again).
    url: String,
}

/// Records that this machine accepted `ix` (its serial, per channel) and keeps the index
/// fetched, so the next run's request can be conditional.
fn accept(root: &Root, st: &mut state::State, ix: &Index, fresh: Option<&Fresh>) -> Result<()> {
    if st.serials.get(&ix.channel) != Some(&ix.serial) {
        st.serials.insert(ix.channel.clone(), ix.serial);
        state::save(root.fd(), st)?;
    }
    if let Some(f) = fresh {
        let dir = downloads(root)?;
        let [text, sig, etag] = cache_names(&ix.channel);
        // Each file whole or not at all (a lock-free `--check` may read them): written
        // beside its name and renamed. The ETag goes last and first: without it the cache
        // is never used.
        let put = |name: &str, data: &[u8]| -> Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            fs_err::write(&tmp, data)?;
            fs_err::rename(&tmp, dir.join(name))?;
            Ok(())
        };
        match std::fs::remove_file(dir.join(&etag)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("cannot remove the index's cached ETag");
            }
            _ => {}
        }
        put(&text, &f.text)?;
        put(&sig, &f.sig)?;
        if let Some(t) = &f.etag {
            // Keyed by the index's URL: another repository's ETag is never sent.
            put(&etag, format!("{}\n{t}", f.url).as_bytes())?;
        }
    }
    Ok(())
}

/// Removes from `downloads/` what neither `keep` nor the channel's index cache names.
fn clear_stale(dir: &std::path::Path, keep: &[String], channel: &str) -> Result<()> {
    let cache = cache_names(channel);
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) || cache.contains(&name) || name.starts_with("index.") {
            continue;
        }
        // Only files are treeswap's: anything else was put there by hand and stays.
        if !e.file_type()?.is_file() {
            log::warn!("`downloads/{name}` is not a file treeswap wrote: leaving it");
            continue;
        }
        log::info!("removing `downloads/{name}`, of an earlier update");
        fs_err::remove_file(e.path())?;
    }
    Ok(())
}

/// Fetches and checks the signature of the channel's index; returns it and, when it came
/// from the network rather than from the kept copy (HTTP 304), what to keep of it.
fn fetch_index(
    root: &Root,
    src: &dyn fetch::Source,
    channel: &str,
    keys: &[(PathBuf, minisign::PublicKey)],
    insecure: bool,
) -> Result<(Index, Option<Fresh>)> {
    let rel = format!("{channel}/{}", index::INDEX_NAME);
    let sig_rel = format!("{channel}/{}", index::SIGNATURE_NAME);
    let dir = root.path.join("downloads");
    let [c_text, c_sig, c_etag] = cache_names(channel);
    let url = format!("{}/{rel}", src.name());
    // The ETag file: the index's URL, a newline, the ETag.
    let cached_etag = std::fs::read_to_string(dir.join(&c_etag))
        .ok()
        .and_then(|t| {
            t.split_once('\n')
                .filter(|(u, _)| *u == url)
                .map(|(_, e)| e.to_owned())
        });
    let get = |etag: Option<&str>| -> Result<(Vec<u8>, Vec<u8>, Option<Fresh>)> {
        Ok(match src.get_small(&rel, index::MAX_INDEX_BYTES, etag)? {
            fetch::Small::NotFound => anyhow::bail!("`{}/{rel}` does not exist", src.name()),
            fetch::Small::NotModified => {
                log::info!("the index is unchanged since the last run (HTTP 304)");
                let read = |n: &str, cap: u64| -> Result<Vec<u8>> {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(
                        &mut std::io::Read::take(fs_err::File::open(dir.join(n))?, cap + 1),
                        &mut v,
                    )?;
                    Ok(v)
                };
                let text = read(&c_text, index::MAX_INDEX_BYTES)?;
                let sig = read(&c_sig, index::MAX_SIGNATURE_BYTES)?;
                (text, sig, None)
            }
            fetch::Small::Body { bytes, etag } => {
                let sig = match src.get_small(&sig_rel, index::MAX_SIGNATURE_BYTES, None)? {
                    fetch::Small::Body { bytes, .. } => bytes,
                    _ => Vec::new(),
                };
                (
                    bytes.clone(),
                    sig.clone(),
                    Some(Fresh {
                        text: bytes,
                        sig,
                        etag,
                        url: url.clone(),
                    }),
                )
            }
        })
    };
    let (mut text, mut sig, mut fresh) = get(cached_etag.as_deref())?;
    match insecure {
        true => {
            log::warn!("--insecure: NOT checking the release index's signature (development only)")
        }
        false => {
            if let Err(e) = check_signature(&text, &sig, keys) {
                // The index and its signature are two requests (a publish may fall between
                // them), and a 304 reuses the kept signature: once more, both, unconditional.
                log::info!("{e:#}; fetching the index and its signature again");
                (text, sig, fresh) = get(None)?;
                check_signature(&text, &sig, keys)?;
            }
        }
    }
    let text = std::str::from_utf8(&text)
        .map_err(|_| anyhow::anyhow!("the index is not UTF-8"))
        .and_then(index::parse)
        .context("invalid release index")?;
    Ok((text, fresh))
}

/// The trusted comment an index's signature starts with (`publish` writes exactly this).
const INDEX_COMMENT: &str = "treeswap release index";

/// Checks the index's signature with the trusted keys (at least one: `update` refuses to
/// run without), and that it signs an index: its trusted comment starts with
/// [`INDEX_COMMENT`].
fn check_signature(text: &[u8], sig: &[u8], keys: &[(PathBuf, minisign::PublicKey)]) -> Result<()> {
    let sig = String::from_utf8_lossy(sig);
    if sig.trim().is_empty() {
        return Err(Fail::Untrusted(
            "the release index is not signed (no index.toml.minisig), and signed indexes are required".into(),
        )
        .into());
    }
    let mut data = std::io::Cursor::new(text);
    match trust::verify(&mut data, text.len() as u64, &sig, keys) {
        Ok(p) => {
            // The key signs deltas too: the trusted comment (signed) says what was signed.
            let comment = minisign::SignatureBox::from_string(&sig)
                .and_then(|b| b.trusted_comment())
                .unwrap_or_default();
            if !comment.starts_with(INDEX_COMMENT) {
                return Err(Fail::Untrusted(format!(
                    "the release index's signature is not one of a release index: its trusted comment is `{}`, not `{INDEX_COMMENT}`",
                    crate::core::path::quote_at_most(&comment, 80)
                ))
                .into());
            }
            log::info!("index signature verified with `{}`", p.display());
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}").replace("the delta's", "the release index's");
            Err(Fail::Untrusted(msg).into())
        }
    }
}
