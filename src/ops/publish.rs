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
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::core::config::Config;
use crate::core::index::{self, DeltaFile, Index};
use crate::core::object::Hash;
use crate::core::version;
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
    fs_err::create_dir_all(&dir)?;
    finish_interrupted(&dir)?;
    let old = read_index(&dir)?;
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
            (o, 0)
        }
        What::Version { version, from_dir } => {
            new_version(root, cfg, req, old.as_ref(), version, from_dir)?
        }
    };
    let t = now();
    ix.serial = old.as_ref().map_or(1, |o| o.serial + 1);
    // Strictly later than the old one even if the server's clock went back.
    ix.timestamp = old.as_ref().map_or(t, |o| t.max(o.timestamp));
    ix.expires = ix.timestamp + req.expires;
    let text = ix.to_toml();
    index::parse(&text).context("the index written would not be valid")?;
    write_index(&dir, &text, req.sign)?;
    let pruned = prune(req.repo, &dir, &ix)?;
    Ok(Published {
        serial: ix.serial,
        latest: ix.latest.clone(),
        written,
        pruned,
        expires: ix.expires,
    })
}

/// The index with `version` published: imported if need be, with its deltas written.
fn new_version(
    root: &Root,
    cfg: &Config,
    req: &Request,
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
    let mut written = 0;
    let mut from: Vec<Option<&index::Version>> = bases.iter().map(Some).collect();
    from.push(None);
    for base in from {
        let rel = index::delta_path(req.channel, version, base.map(|b| b.digest()).as_ref());
        let out = req.repo.join(&rel);
        fs_err::create_dir_all(out.parent().expect("a delta path has directories"))?;
        let trees = match base {
            Some(b) => diff::Trees::Installed {
                root,
                from: &b.name,
            },
            None => diff::Trees::FromEmpty { root },
        };
        let stats = diff::make(&diff::Request {
            trees,
            to_version: version,
            output: &out,
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
        log::info!("wrote `{rel}`: {}", stats.summary());
        written += 1;
        let from_digest = match base {
            Some(b) => b.digest(),
            None => crate::core::manifest::empty_tree().digest(),
        };
        deltas.push(describe(
            &out,
            rel,
            version,
            base.map(|b| b.name.clone()),
            &from_digest,
        )?);
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

/// The index entry of the delta file at `path`: its size, sha256 and chunk hashes.
fn describe(
    path: &Path,
    rel: String,
    to: &str,
    from: Option<String>,
    from_digest: &Hash,
) -> Result<DeltaFile> {
    let mut f = fs_err::File::open(path)?;
    let (mut whole, mut chunks, mut size) = (Sha256::new(), Vec::new(), 0u64);
    let mut buf = vec![0u8; index::CHUNK_SIZE as usize];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        chunks.push(hex::encode(Sha256::digest(&buf[..n])));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(DeltaFile {
        to: to.to_owned(),
        from,
        from_digest: hex::encode(from_digest),
        path: rel,
        size,
        sha256: hex::encode(whole.finalize()),
        chunks,
    })
}

/// Reads the channel's index, if there is one (capped and checked like a client's).
fn read_index(dir: &Path) -> Result<Option<Index>> {
    let path = dir.join(index::INDEX_NAME);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read `{}`", path.display())),
    };
    let mut text = String::new();
    f.take(index::MAX_INDEX_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    index::parse(&text)
        .map(Some)
        .with_context(|| format!("invalid index `{}`", path.display()))
}

fn new_name(name: &str) -> String {
    format!(".{name}.new")
}

/// Writes the index and its signature: both to temporary names (`.index.toml.new`,
/// `.index.toml.minisig.new`), each fsynced; then the signature is renamed into place, then
/// the index, and the directory fsynced. A crash before the first rename leaves the old pair;
/// between the two renames, the next `publish` finishes them ([`finish_interrupted`]).
/// Unsigned, the old signature is removed after the index is in place.
fn write_index(dir: &Path, text: &str, sign: Option<&Path>) -> Result<()> {
    let sig = sign
        .map(|k| trust::sign(text.as_bytes(), k, "treeswap release index"))
        .transpose()?;
    let write = |name: &str, data: &[u8]| -> Result<()> {
        let p = dir.join(new_name(name));
        let mut f = fs_err::File::create(&p)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        Ok(())
    };
    if let Some(s) = &sig {
        write(index::SIGNATURE_NAME, s.as_bytes())?;
    }
    write(index::INDEX_NAME, text.as_bytes())?;
    finish_interrupted(dir)?;
    if sig.is_none() {
        match fs_err::remove_file(dir.join(index::SIGNATURE_NAME)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    fs_err::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Renames a complete new pair into place, signature first: what a `publish` that was
/// interrupted between the two renames left.
fn finish_interrupted(dir: &Path) -> Result<()> {
    let index_new = dir.join(new_name(index::INDEX_NAME));
    if !index_new.exists() {
        // A signature without its index is of a write cut short before the index was
        // complete: the old pair stands.
        let _ = std::fs::remove_file(dir.join(new_name(index::SIGNATURE_NAME)));
        return Ok(());
    }
    let sig_new = dir.join(new_name(index::SIGNATURE_NAME));
    if sig_new.exists() {
        fs_err::rename(&sig_new, dir.join(index::SIGNATURE_NAME))?;
    }
    fs_err::rename(&index_new, dir.join(index::INDEX_NAME))?;
    Ok(())
}

/// Removes the delta files under `<channel>/deltas/` that `ix` does not name, and the
/// directories left empty; returns how many files went.
fn prune(repo: &Path, dir: &Path, ix: &Index) -> Result<usize> {
    let keep: std::collections::HashSet<PathBuf> =
        ix.deltas.iter().map(|d| repo.join(&d.path)).collect();
    let top = dir.join("deltas");
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
