//! `treeswap publish`: keep a release repository (FORMAT.md, "Release repository") that any
//! static web server, a directory or a USB stick can serve.
//!
//! The server keeps every published version installed in its own state root, so it can diff
//! from any of them. Publishing version V of channel C: import the directory as V (unless it
//! is installed), write the deltas to V from the last `keep` published versions and from the
//! empty tree (each written beside its name and renamed), then the index (see
//! [`write_index`]: the index goes last, so a crash leaves the old one valid), then remove the
//! delta files of C that the new index does not name. `--refresh` writes the same index
//! with a new serial, timestamp and expiry (a cron job keeps it fresh).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::core::config::Config;
use crate::core::error::Fail;
use crate::core::index::{self, DeltaFile, Index};
use crate::core::version;
use crate::fs::sys;
use crate::ops::{diff, import, trust};
use crate::store::root::{Root, now};

/// What to publish.
pub(crate) enum What<'a> {
    /// A new version (imported from `from_dir` unless installed).
    Version {
        version: &'a str,
        from_dir: &'a Path,
    },
    /// The same index, re-signed with a new serial and expiry.
    Refresh,
}

pub(crate) struct Request<'a> {
    pub repo: &'a Path,
    pub channel: &'a str,
    pub what: What<'a>,
    pub sign: Option<&'a Path>,
    /// How many of the versions published before get a delta to the new one.
    pub keep: usize,
    /// Seconds from now until the index expires.
    pub expires: u64,
    /// The zstd level of the deltas' blobs.
    pub level: i32,
}

/// What a publish did, for its summary line.
pub(crate) struct Published {
    pub serial: u64,
    pub latest: String,
    pub written: usize,
    pub pruned: usize,
    pub expires: u64,
}

/// `treeswap publish`.
pub(crate) fn publish(root: &Root, cfg: &Config, req: &Request) -> Result<Published> {
    index::validate_channel(req.channel)?;
    let dir = req.repo.join(req.channel);
    let repo = Repo::open(req.repo, req.channel)?;
    // What verifies the index on disk: the signing key's own public key (and, for a key
    // rotation, any `[trust] public_keys` of this root's config).
    let keys = match req.sign {
        Some(k) => {
            let mut keys = vec![(k.to_owned(), trust::public_key_of(k)?)];
            keys.extend(trust::load_keys(&cfg.trust.public_keys)?);
            Some(keys)
        }
        None => None,
    };
    finish_interrupted(&repo, keys.as_deref())?;
    let old = read_index(&repo, keys.as_deref())?;
    if let Some(o) = &old
        && o.channel != req.channel
    {
        bail!(
            "`{}` holds an index of channel `{}`, not `{}`",
            dir.join(index::INDEX_NAME).display(),
            o.channel,
            req.channel
        );
    }
    let (mut ix, written) = match req.what {
        What::Refresh => {
            let Some(o) = old.clone() else {
                bail!(
                    "nothing to refresh: `{}` does not exist",
                    dir.join(index::INDEX_NAME).display()
                );
            };
            check_carried(&repo, &o.deltas)?;
            (o, 0)
        }
        What::Version { version, from_dir } => {
            new_version(root, cfg, req, &repo, old.as_ref(), version, from_dir)?
        }
    };
    let t = now();
    ix.serial = old.as_ref().map_or(1, |o| o.serial + 1);
    // Strictly later than the old one even if the server's clock went back.
    ix.timestamp = old.as_ref().map_or(t, |o| t.max(o.timestamp));
    ix.expires = ix.timestamp + req.expires;
    let text = ix.to_toml();
    index::parse(&text).context("the index written would not be valid")?;
    write_index(&repo, &text, req.sign)?;
    let pruned = prune(req.repo, &dir, &ix)?;
    Ok(Published {
        serial: ix.serial,
        latest: ix.latest.clone(),
        written,
        pruned,
        expires: ix.expires,
    })
}

/// The repository's directories, opened once and never through a symlink below its top:
/// someone who can write the web root (but not the key) must not make `publish`, which
/// runs as root, write anywhere else.
struct Repo {
    top: OwnedFd,
    /// `<channel>/`.
    chan: OwnedFd,
    /// For messages: `<repo>/<channel>`.
    path: PathBuf,
}

impl Repo {
    /// Opens the repository's top (made if missing; the path given may be a symlink) and
    /// its channel's directory (made if missing; never a symlink).
    fn open(repo: &Path, channel: &str) -> Result<Repo> {
        fs_err::create_dir_all(repo)?;
        let top = sys::open_dir(repo)?;
        let chan = subdir(&top, &[channel], repo)?;
        Ok(Repo {
            top,
            chan,
            path: repo.join(channel),
        })
    }
}

/// Opens (making each if missing) the directories `parts` below `dir`, refusing a symlink
/// or anything else that is not a directory at each.
fn subdir(dir: &OwnedFd, parts: &[&str], shown: &Path) -> Result<OwnedFd> {
    let mut fd = dir.try_clone()?;
    let mut at = shown.to_owned();
    for p in parts {
        at.push(p);
        sys::mkdirat(fd.as_fd(), p.as_bytes(), 0o755, true)
            .with_context(|| format!("cannot use `{}` as a directory", at.display()))?;
        fd = sys::open_dir_beneath(fd.as_fd(), p.as_bytes())
            .with_context(|| format!("cannot use `{}` as a directory", at.display()))?;
    }
    Ok(fd)
}

/// Opens a regular file below `dir` for reading (no symlink on the way, never blocking on
/// a FIFO), `None` if it does not exist.
fn open_regular(dir: &OwnedFd, rel: &str, shown: &Path) -> Result<Option<std::fs::File>> {
    let fd = match sys::openat2_file(dir.as_fd(), rel.as_bytes()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot open `{}` (a symlink there is refused)",
                    shown.display()
                )
            });
        }
    };
    let f = std::fs::File::from(fd);
    if !f.metadata()?.is_file() {
        bail!("`{}` is not a regular file", shown.display());
    }
    Ok(Some(f))
}

/// Writes `name` in `dir` under the temporary name `.<name>.new` (whatever was at that
/// name removed first, never followed), mode 0644, fsynced, then renamed over `name`
/// (which, if it exists, must be a regular file), unless `keep_new`: then it stays under
/// the temporary name for the caller to rename. `fill` writes the bytes.
fn write_file(
    dir: &OwnedFd,
    name: &str,
    shown: &Path,
    keep_new: bool,
    fill: &mut dyn FnMut(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    match sys::lstatat(dir.as_fd(), name.as_bytes())? {
        Some(st)
            if rustix::fs::FileType::from_raw_mode(st.st_mode)
                != rustix::fs::FileType::RegularFile =>
        {
            bail!(
                "`{}` exists and is not a regular file: refusing to write it (remove it)",
                shown.display()
            )
        }
        _ => {}
    }
    let tmp = new_name(name);
    sys::unlinkat_ok(dir.as_fd(), tmp.as_bytes(), false)?;
    let fd = sys::openat(
        dir.as_fd(),
        tmp.as_bytes(),
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::EXCL
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .with_context(|| format!("cannot create `{}`", shown.with_file_name(&tmp).display()))?;
    let mut f = std::fs::File::from(fd);
    let done = fill(&mut f)
        .and_then(|()| {
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            f.sync_all()?;
            Ok(())
        })
        .with_context(|| format!("cannot write `{}`", shown.with_file_name(&tmp).display()));
    if let Err(e) = done {
        let _ = sys::unlinkat_ok(dir.as_fd(), tmp.as_bytes(), false);
        return Err(e);
    }
    if !keep_new {
        sys::renameat(dir.as_fd(), tmp.as_bytes(), dir.as_fd(), name.as_bytes())
            .with_context(|| format!("cannot rename to `{}`", shown.display()))?;
    }
    Ok(())
}

/// Checks that each delta file an index carries forward is still what it names (size and
/// sha256): nothing changed behind publish's back is signed again.
fn check_carried(repo: &Repo, deltas: &[DeltaFile]) -> Result<()> {
    for d in deltas {
        let shown = repo.path.parent().unwrap_or(&repo.path).join(&d.path);
        let Some(mut f) = open_regular(&repo.top, &d.path, &shown)? else {
            bail!(
                "`{}`, which the index names, is missing: publish this version again",
                shown.display()
            );
        };
        let (mut h, mut n) = (Sha256::new(), 0u64);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf)? {
                0 => break,
                k => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
            }
            if n > d.size {
                break;
            }
        }
        if n != d.size || h.finalize().as_slice() != d.sha256().as_slice() {
            bail!(
                "`{}` does not match the size and sha256 the index gives: it was changed outside publish (publish its version again)",
                shown.display()
            );
        }
    }
    Ok(())
}

/// The index with `version` published: imported if need be, with its deltas written.
fn new_version(
    root: &Root,
    cfg: &Config,
    req: &Request,
    repo: &Repo,
    old: Option<&Index>,
    version: &str,
    from_dir: &Path,
) -> Result<(Index, usize)> {
    version::validate(version)?;
    if !root.is_installed(version)? {
        if !from_dir.is_dir() {
            bail!("cannot import `{}`: not a directory", from_dir.display());
        }
        import::import(root, cfg, from_dir, version)?;
    } else {
        log::info!("`{version}` is installed already: publishing it as it is");
    }
    let digest = root
        .manifest_digest(version)?
        .context("the published version has no manifest")?;
    let m = root.load_manifest(version)?;
    let size = m
        .entries
        .iter()
        .map(|e| match e.kind {
            crate::core::manifest::Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let entry = index::Version {
        name: version.to_owned(),
        digest: hex::encode(digest),
        entries: m.entries.len() as u64,
        size,
    };
    drop(m);
    let mut versions: Vec<index::Version> = old.map(|o| o.versions.clone()).unwrap_or_default();
    if let Some(v) = versions.iter().find(|v| v.name == version)
        && v.digest != entry.digest
    {
        bail!(
            "`{version}` was published with another tree (digest {})",
            v.digest
        );
    }
    versions.retain(|v| v.name != version);
    // The bases: the last `keep` versions published before, that this root still has.
    let mut bases = Vec::new();
    for v in versions.iter().rev() {
        if bases.len() == req.keep {
            break;
        }
        if root.manifest_digest(&v.name)? == Some(v.digest()) {
            bases.push(v.clone());
        } else {
            log::warn!(
                "`{}` is not installed in this root (or with another tree): no delta from it",
                v.name
            );
        }
    }
    bases.reverse();
    // The new index lists the bases and the new version, oldest first.
    let mut listed = bases.clone();
    listed.push(entry);
    let names: Vec<&str> = listed.iter().map(|v| v.name.as_str()).collect();
    let mut deltas: Vec<DeltaFile> = old
        .map(|o| o.deltas.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| names.contains(&d.to.as_str()) && d.to != version)
        .collect();
    check_carried(repo, &deltas)?;
    let mut written = 0;
    let mut from: Vec<Option<&index::Version>> = bases.iter().map(Some).collect();
    from.push(None);
    for base in from {
        let rel = index::delta_path(req.channel, version, base.map(|b| b.digest()).as_ref());
        let out = req.repo.join(&rel);
        let name = out
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a delta path has a file name")
            .to_owned();
        let vdir = subdir(&repo.chan, &["deltas", version], &repo.path)?;
        let trees = match base {
            Some(b) => diff::Trees::Installed {
                root,
                from: &b.name,
            },
            None => diff::Trees::FromEmpty { root },
        };
        // The delta is made in the state root's `tmp/` (never in the repository, where
        // diff's output rules would follow a symlink or write into a FIFO), then copied
        // into the repository with no symlink followed, hashed as it is copied.
        let made = tempfile::Builder::new()
            .prefix("publish-")
            .suffix(".delta")
            .tempfile_in(root.path.join("tmp"))
            .context("cannot create a temporary file in the root's `tmp/`")?;
        let stats = diff::make(&diff::Request {
            trees,
            to_version: version,
            output: made.path(),
            sign: req.sign,
            compress: true,
            level: req.level,
        })
        .with_context(|| {
            format!(
                "cannot write the delta to `{version}` from {}",
                base.map_or("the empty tree".into(), |b| format!("`{}`", b.name))
            )
        })?;
        let mut src = fs_err::File::open(made.path())?;
        let mut hashed = None;
        write_file(&vdir, &name, &out, false, &mut |f| {
            hashed = Some(copy_hashed(&mut src, f)?);
            Ok(())
        })?;
        drop(made);
        let (size, sha256, chunks) = hashed.expect("written");
        sys::fsync(vdir.as_fd())?;
        log::info!("wrote `{rel}`: {}", stats.summary());
        written += 1;
        let from_digest = match base {
            Some(b) => b.digest(),
            None => crate::core::manifest::empty_tree().digest(),
        };
        deltas.push(DeltaFile {
            to: version.to_owned(),
            from: base.map(|b| b.name.clone()),
            from_digest: hex::encode(from_digest),
            path: rel,
            size,
            sha256,
            chunks,
        });
    }
    let ix = Index {
        format: index::FORMAT,
        channel: req.channel.to_owned(),
        serial: 0,
        timestamp: 0,
        expires: 0,
        latest: version.to_owned(),
        chunk_size: index::CHUNK_SIZE,
        versions: listed,
        deltas,
    };
    Ok((ix, written))
}

/// Copies `src` to `dst`; returns its size, sha256 and chunk hashes (of
/// [`index::CHUNK_SIZE`] bytes each).
fn copy_hashed(
    src: &mut impl Read,
    dst: &mut impl std::io::Write,
) -> Result<(u64, String, Vec<String>)> {
    let (mut whole, mut chunks, mut size) = (Sha256::new(), Vec::new(), 0u64);
    let mut buf = vec![0u8; index::CHUNK_SIZE as usize];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        whole.update(&buf[..n]);
        chunks.push(hex::encode(Sha256::digest(&buf[..n])));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((size, hex::encode(whole.finalize()), chunks))
}

/// Reads a small file of the channel's directory whole (no symlink, capped), `None` if
/// it does not exist.
fn read_small(repo: &Repo, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
    let shown = repo.path.join(name);
    let Some(f) = open_regular(&repo.chan, name, &shown)? else {
        return Ok(None);
    };
    let mut v = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("cannot read `{}`", shown.display()))?;
    if v.len() as u64 > cap {
        bail!("`{}` is larger than {cap} bytes", shown.display());
    }
    Ok(Some(v))
}

/// Checks that `text` is signed by one of `keys` with the signature `sig`.
fn signed_by(text: &[u8], sig: Option<&[u8]>, keys: &[(PathBuf, minisign::PublicKey)]) -> bool {
    let sig = String::from_utf8_lossy(sig.unwrap_or_default());
    let mut data = std::io::Cursor::new(text);
    trust::verify(&mut data, text.len() as u64, &sig, keys).is_ok()
}

/// Reads the channel's index, if there is one (capped and checked like a client's). With
/// `keys` (publishing signed), it must be signed by one of them: an index someone changed
/// in the web root without the key is never signed again or carried forward.
fn read_index(
    repo: &Repo,
    keys: Option<&[(PathBuf, minisign::PublicKey)]>,
) -> Result<Option<Index>> {
    let path = repo.path.join(index::INDEX_NAME);
    let Some(bytes) = read_small(repo, index::INDEX_NAME, index::MAX_INDEX_BYTES)? else {
        return Ok(None);
    };
    match keys {
        Some(keys) => {
            let sig = read_small(repo, index::SIGNATURE_NAME, index::MAX_SIGNATURE_BYTES)?;
            if !signed_by(&bytes, sig.as_deref(), keys) {
                return Err(Fail::Untrusted(format!(
                    "`{}` is not signed by the publishing key (nor a `[trust] public_keys` one): it was changed outside publish; put back the pair publish wrote",
                    path.display()
                ))
                .into());
            }
        }
        None => log::warn!(
            "publishing unsigned: `{}` is taken as it is, unchecked",
            path.display()
        ),
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| anyhow::anyhow!("`{}` is not UTF-8", path.display()))?;
    index::parse(text)
        .map(Some)
        .with_context(|| format!("invalid index `{}`", path.display()))
}

fn new_name(name: &str) -> String {
    format!(".{name}.new")
}

/// Writes the index and its signature: both to temporary names (`.index.toml.new`,
/// `.index.toml.minisig.new`), each fsynced (the delta files it names were fsynced, with
/// their directories, before); then the signature is renamed into place, then the index,
/// and the directory fsynced. A crash before the first rename leaves the old pair; between
/// the two renames, the next `publish` finishes them ([`finish_interrupted`]).
/// Unsigned, the old signature is removed after the index is in place.
fn write_index(repo: &Repo, text: &str, sign: Option<&Path>) -> Result<()> {
    let sig = sign
        .map(|k| trust::sign(text.as_bytes(), k, "treeswap release index"))
        .transpose()?;
    let write = |name: &str, data: &[u8]| -> Result<()> {
        write_file(&repo.chan, name, &repo.path.join(name), true, &mut |f| {
            std::io::Write::write_all(f, data)?;
            Ok(())
        })
    };
    if let Some(s) = &sig {
        write(index::SIGNATURE_NAME, s.as_bytes())?;
    }
    write(index::INDEX_NAME, text.as_bytes())?;
    let rename = |name: &str| -> Result<()> {
        sys::renameat(
            repo.chan.as_fd(),
            new_name(name).as_bytes(),
            repo.chan.as_fd(),
            name.as_bytes(),
        )
        .with_context(|| format!("cannot rename to `{}`", repo.path.join(name).display()))
    };
    if sig.is_some() {
        rename(index::SIGNATURE_NAME)?;
    }
    rename(index::INDEX_NAME)?;
    if sig.is_none() {
        sys::unlinkat_ok(repo.chan.as_fd(), index::SIGNATURE_NAME.as_bytes(), false)?;
    }
    sys::fsync(repo.chan.as_fd())?;
    Ok(())
}

/// Puts in place a new pair that a `publish` interrupted between its two renames left
/// (the signature renamed, the index still `.index.toml.new`), signature first, if it is
/// whole: the new index parses and (publishing signed) verifies with its signature. What
/// else is left under the temporary names is of a write cut short: it goes, the old pair
/// stands.
fn finish_interrupted(repo: &Repo, keys: Option<&[(PathBuf, minisign::PublicKey)]>) -> Result<()> {
    let (index_new, sig_new) = (new_name(index::INDEX_NAME), new_name(index::SIGNATURE_NAME));
    let drop_new = || -> Result<()> {
        sys::unlinkat_ok(repo.chan.as_fd(), index_new.as_bytes(), false)?;
        sys::unlinkat_ok(repo.chan.as_fd(), sig_new.as_bytes(), false)
    };
    let Some(text) = read_small(repo, &index_new, index::MAX_INDEX_BYTES)
        .ok()
        .flatten()
    else {
        return drop_new();
    };
    let sig = match read_small(repo, &sig_new, index::MAX_SIGNATURE_BYTES)? {
        Some(s) => Some(s),
        None => read_small(repo, index::SIGNATURE_NAME, index::MAX_SIGNATURE_BYTES)?,
    };
    let parses = std::str::from_utf8(&text)
        .ok()
        .is_some_and(|t| index::parse(t).is_ok());
    let whole = parses && keys.is_none_or(|k| signed_by(&text, sig.as_deref(), k));
    if !whole {
        log::warn!(
            "removing `{}`, of a publish cut short: the index in place stands",
            repo.path.join(&index_new).display()
        );
        return drop_new();
    }
    log::info!("finishing an interrupted publish: putting its new index in place");
    let rename = |from: &str, to: &str| -> Result<()> {
        sys::renameat(
            repo.chan.as_fd(),
            from.as_bytes(),
            repo.chan.as_fd(),
            to.as_bytes(),
        )
        .with_context(|| format!("cannot rename to `{}`", repo.path.join(to).display()))
    };
    if sys::lstatat(repo.chan.as_fd(), sig_new.as_bytes())?.is_some() {
        rename(&sig_new, index::SIGNATURE_NAME)?;
    }
    rename(&index_new, index::INDEX_NAME)?;
    sys::fsync(repo.chan.as_fd())
}

/// Removes the delta files under `<channel>/deltas/` that `ix` does not name, and the
/// directories left empty; returns how many files went.
fn prune(repo: &Path, dir: &Path, ix: &Index) -> Result<usize> {
    let keep: std::collections::HashSet<PathBuf> =
        ix.deltas.iter().map(|d| repo.join(&d.path)).collect();
    let top = dir.join("deltas");
    // Never through a symlink (below it, `walk` follows none: it looks at entry types).
    match std::fs::symlink_metadata(&top) {
        Ok(m) if !m.is_dir() => bail!(
            "`{}` is not a directory: refusing to prune through it",
            top.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot stat `{}`", top.display())),
        Ok(_) => {}
    }
    let mut removed = 0;
    fn walk(
        d: &Path,
        keep: &std::collections::HashSet<PathBuf>,
        removed: &mut usize,
    ) -> Result<()> {
        let entries = match fs_err::read_dir(d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for e in entries {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(&p, keep, removed)?;
                // Only an empty directory goes; one that holds anything stays.
                let _ = std::fs::remove_dir(&p);
            } else if !keep.contains(&p) {
                log::info!(
                    "removing `{}`, which the index no longer names",
                    p.display()
                );
                fs_err::remove_file(&p)?;
                *removed += 1;
            }
        }
        Ok(())
    }
    walk(&top, &keep, &mut removed)?;
    Ok(removed)
}
