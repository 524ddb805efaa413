//! `treeswap diff`: compute the delta from one tree to another and write it as one tar file.
//!
//! Only changed entries are listed. A content the base already has (a metadata-only change,
//! a move, a copy) ships no bytes. Every other content ships once, as the smallest of: the
//! whole content zstd-compressed; a zstd frame with a similar base content as reference prefix
//! ("patch-from"); a zstd-compressed bsdiff patch (small files only, where it can win).
//! Similar contents are looked for at the same path, then by content among the base's removed
//! files and the contents shipped earlier in this delta (sketches of their chunks), then among files of the same path
//! without digits, the same name or the same name without digits, in the base and among
//! contents shipped earlier in this delta.

mod compare;
mod encode;
mod sketch;

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use compare::{Base, Changes, installed, streamed};
pub(crate) use encode::Opener;
use encode::Sides;

use crate::core::delta::{Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER, Source};
use crate::core::manifest::Entry;
use crate::core::version;
use crate::fs::sys;
use crate::store::root::Root;
use crate::tree::scan;

/// What a diff shipped, for the log and the benchmarks.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub changed: usize,
    pub removed: usize,
    pub contents: usize,
    pub whole: usize,
    pub xz: usize,
    pub zstd_patch: usize,
    pub bsdiff: usize,
    pub from_base: usize,
    pub bytes: u64,
}

impl Stats {
    /// One line for the log.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} changed, {} removed, {} contents ({} from the base, {} whole, {} of them xz, {} zstd patches, {} bsdiff), {} bytes of blobs",
            self.changed,
            self.removed,
            self.contents,
            self.from_base,
            self.whole,
            self.xz,
            self.zstd_patch,
            self.bsdiff,
            self.bytes
        )
    }
}

/// Where the two trees of a diff come from.
pub(crate) enum Trees<'a> {
    /// Two directories, read as they are (no state root).
    Dirs {
        from: &'a Path,
        to: &'a Path,
        /// The base's version name, recorded in the delta.
        from_version: Option<&'a str>,
    },
    /// Two installed versions; the result is `Request::to_version`.
    Installed { root: &'a Root, from: &'a str },
    /// From the empty tree (`manifest::empty_tree`, a first install) to the installed
    /// `Request::to_version` (`publish`).
    FromEmpty { root: &'a Root },
}

/// What `treeswap diff` is asked to make.
pub(crate) struct Request<'a> {
    pub trees: Trees<'a>,
    pub to_version: &'a str,
    /// Where to write the delta; `-` is standard output.
    pub output: &'a Path,
    /// An unencrypted minisign secret key to sign it with.
    pub sign: Option<&'a Path>,
    /// A zstd-compressed tar rather than a plain one.
    pub compress: bool,
    /// The zstd level of the blobs.
    pub level: i32,
}

/// `treeswap diff`: computes the delta `req` describes and writes it.
pub(crate) fn make(req: &Request) -> Result<Stats> {
    let (delta, blobs, stats) = match req.trees {
        Trees::Dirs {
            from,
            to,
            from_version,
        } => from_dirs(from, to, from_version, req.to_version, req.level)?,
        Trees::Installed { root, from } => {
            // Neither manifest is held whole.
            let (base, changes) = installed(root, from, req.to_version)?;
            let pool = root.pool()?;
            let read = |e: &Entry| pool.open_object(&e.object().context("not a file")?);
            diff(&base, &read, changes, &read, req.to_version, req.level)?
        }
        Trees::FromEmpty { root } => {
            // The new tree's manifest is streamed, as for two installed versions.
            let empty = crate::core::manifest::empty_tree();
            let head = (empty.digest(), empty.entries.len() as u64);
            let from = |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| {
                sink(empty.entries.clone())?;
                Ok(head)
            };
            let to = |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| {
                root.stream_manifest(req.to_version, sink)
            };
            let (base, changes) = streamed(None, &from, to)?;
            let pool = root.pool()?;
            let none = |_: &Entry| -> Result<std::os::fd::OwnedFd> {
                bail!("the empty tree has no files")
            };
            let read = |e: &Entry| pool.open_object(&e.object().context("not a file")?);
            diff(&base, &none, changes, &read, req.to_version, req.level)?
        }
    };
    write_output(&delta, &blobs, req)?;
    log::debug!("wrote the delta");
    Ok(stats)
}

/// The delta from directory `d1` to directory `d2`. The base's entries are scanned first and
/// written to an anonymous temporary file (in `$TMPDIR`) as a stored manifest, so only one
/// tree's entries are ever in memory: a million of them take ~170 MB.
fn from_dirs(
    d1: &Path,
    d2: &Path,
    from_version: Option<&str>,
    to_version: &str,
    level: i32,
) -> Result<(Delta, Vec<Vec<u8>>, Stats)> {
    let mut m1 = scan::scan(d1, None)?;
    if let Some(v) = from_version {
        version::validate(v)?;
        m1.version = Some(v.to_owned());
    }
    let version = m1.version.clone();
    let listing = tempfile::tempfile().context("cannot create a temporary file")?;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &listing);
        m1.write_toml(&mut out)
            .and_then(|()| out.flush())
            .context("cannot write the base's listing to a temporary file")?;
    }
    drop(m1);
    let m2 = scan::scan(d2, None)?;
    let (t1, t2) = (sys::open_dir(d1)?, sys::open_dir(d2)?);
    let r1 = |e: &Entry| scan::open_scanned(t1.as_fd(), e);
    let r2 = |e: &Entry| scan::open_scanned(t2.as_fd(), e);
    let base = |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| {
        let mut f = listing.try_clone()?;
        std::io::Seek::rewind(&mut f)?;
        let h = crate::core::manifest::stream_reader(
            std::io::BufReader::with_capacity(1 << 20, f),
            sink,
        )
        .context("cannot read the base's listing back")?;
        Ok((h.digest.context("no digest")?, h.count.context("no count")?))
    };
    let (digest, count) = (m2.digest(), m2.entries.len() as u64);
    let new = move |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| {
        sink(m2.entries)?;
        Ok((digest, count))
    };
    let (base, changes) = streamed(version, &base, new)?;
    diff(&base, &r1, changes, &r2, to_version, level)
}

/// Writes the delta to `req.output`: `-` is standard output; an existing character device or
/// FIFO is written to, as `> PATH` would (never replaced); anything else that is not a
/// regular file is refused. A regular file (or a new name) is written beside its final name
/// and renamed over it, so a reader never sees half a delta; a symlink is followed to the
/// file it names, which is replaced.
fn write_output(delta: &Delta, blobs: &[Vec<u8>], req: &Request) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let output = req.output;
    if output.as_os_str() == "-" {
        return write_delta(
            delta,
            blobs,
            req.sign,
            req.compress,
            std::io::stdout().lock(),
        );
    }
    let output = match std::fs::metadata(output) {
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_fifo() => {
            let f = fs_err::OpenOptions::new().write(true).open(output)?;
            let out = std::io::BufWriter::new(f);
            return write_delta(delta, blobs, req.sign, req.compress, out)
                .with_context(|| format!("cannot write `{}`", output.display()));
        }
        Ok(m) if !m.is_file() => bail!(
            "cannot write the delta to `{}`: it is not a regular file, a character device or a FIFO",
            output.display()
        ),
        Ok(_) => std::fs::canonicalize(output)
            .with_context(|| format!("cannot resolve `{}`", output.display()))?,
        Err(_) => output.to_owned(),
    };
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot create a temporary file in `{}`", dir.display()))?;
    let out = std::io::BufWriter::new(tmp.as_file());
    write_delta(delta, blobs, req.sign, req.compress, out)
        .with_context(|| format!("cannot write `{}`", tmp.path().display()))?;
    // Deltas are meant to be passed around: readable by all, like any download.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("cannot set the mode of `{}`", tmp.path().display()))?;
    tmp.persist(&output)
        .with_context(|| format!("cannot write `{}`", output.display()))?;
    Ok(())
}

/// Computes the delta manifest and its blobs from the base (what of it the changed files
/// need), the changes, and how to open each side's files.
pub(crate) fn diff<'a>(
    base: &Base,
    read_from: Opener<'a>,
    changes: Changes,
    read_to: Opener<'a>,
    to_version: &str,
    level: i32,
) -> Result<(Delta, Vec<Vec<u8>>, Stats)> {
    version::validate(to_version)?;
    let mut d = Delta {
        from_version: base.version.clone(),
        from_digest: base.digest,
        to_version: to_version.to_owned(),
        to_digest: changes.to_digest,
        to_count: changes.to_count,
        changed: changes.changed,
        removed: changes.removed,
        ..Default::default()
    };
    log::debug!(
        "compared the manifests: {} changed, {} removed",
        d.changed.len(),
        d.removed.len()
    );
    let (from_base, needed) = encode::contents(base, &d.changed);
    let removed: Vec<&Entry> = base.removed_files().collect();
    let similar = encode::Similar {
        removed_sketches: encode::sketches(&removed, read_from)?,
        removed,
        needed_sketches: encode::sketches(&needed, read_to)?,
    };
    log::debug!(
        "sketched {} removed files and {} contents to ship",
        similar.removed.len(),
        needed.len()
    );
    let jobs = encode::candidates(base, &needed, &similar);
    drop(similar);
    let sides = Sides {
        from: read_from,
        to: read_to,
    };
    let encoded = encode::encode_all(&jobs, &sides, level)?;
    log::debug!("encoded {} contents", encoded.len());
    drop(jobs);
    d.contents = from_base;
    let mut stats = Stats {
        changed: d.changed.len(),
        removed: d.removed.len(),
        from_base: d.contents.len(),
        ..Default::default()
    };
    let mut blobs = Vec::with_capacity(encoded.len());
    for (c, blob) in encoded {
        match c.source {
            Source::Zstd => {
                stats.whole += 1;
                stats.xz += usize::from(c.codec == crate::core::delta::Codec::Xz);
            }
            Source::ZstdPatch { .. } => stats.zstd_patch += 1,
            Source::Bsdiff { .. } => stats.bsdiff += 1,
            Source::Base => {}
        }
        stats.bytes += blob.len() as u64;
        d.contents.push(c);
        blobs.push(blob);
    }
    stats.contents = d.contents.len();
    Ok((d, blobs, stats))
}

/// Writes a delta: a tar with `delta.toml`, its signature `delta.toml.minisig` (empty without
/// `sign`, an unencrypted minisign secret key file), then one `blobs/<sha256>` member per
/// shipped content, in manifest order. With `compress`, the tar is zstd-compressed as two
/// frames (a zstd stream may hold several): the manifest and signature at a high level, the
/// already compressed blobs at a fast one. Stock tools read it: `tar --zstd -tf D`.
pub(crate) fn write_delta(
    d: &Delta,
    blobs: &[Vec<u8>],
    sign: Option<&Path>,
    compress: bool,
    mut out: impl Write,
) -> Result<()> {
    let text = d.to_toml();
    let sig = match sign {
        Some(key) => crate::ops::trust::sign(
            text.as_bytes(),
            key,
            &format!(
                "treeswap delta {} -> {}",
                d.from_version.as_deref().unwrap_or("?"),
                d.to_version
            ),
        )?,
        None => String::new(),
    };
    let mut head = Vec::with_capacity(text.len() + 2048);
    tar_member(&mut head, MANIFEST_MEMBER, text.as_bytes())?;
    tar_member(&mut head, SIGNATURE_MEMBER, sig.as_bytes())?;
    let mut rest = Vec::new();
    let mut it = blobs.iter();
    for c in &d.contents {
        if c.blob.is_some() {
            let blob = it.next().context("a blob is missing")?;
            tar_member(&mut rest, &Delta::blob_member(c), blob)?;
        }
    }
    // The end of the archive: two zero blocks.
    rest.extend_from_slice(&[0u8; 1024]);
    if compress {
        // The manifest is mostly hex digests and paths: level 17 is 5% smaller than the
        // default and still takes well under a second.
        out.write_all(&zstd::bulk::compress(&head, 17)?)?;
        out.write_all(&zstd::bulk::compress(&rest, 3)?)?;
    } else {
        out.write_all(&head)?;
        out.write_all(&rest)?;
    }
    out.flush().context("cannot write the delta")?;
    Ok(())
}

/// Appends one regular-file ustar member (header, data, padding to 512 bytes).
fn tar_member(out: &mut Vec<u8>, name: &str, data: &[u8]) -> Result<()> {
    // `apply` (`core::tar`) reads a name from the 100-byte name field alone, never from the
    // prefix field or an extension header: every member name fits (`blobs/<64 hex>` is 70).
    anyhow::ensure!(
        name.len() <= 100,
        "delta member name `{name}` is longer than 100 bytes"
    );
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .with_context(|| format!("cannot name delta member `{name}`"))?;
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(())
}
