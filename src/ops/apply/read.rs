//! Reading a delta: its tar stream, the manifest and signature members (the signature checked
//! on the exact bytes before they are parsed), each blob member, and the installed base.

use std::io::{Read, Seek, Write};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::bad;
use crate::core::delta::{self, Content, Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER};
use crate::core::error::Fail;
use crate::core::object::Hash;
use crate::core::tar;
use crate::store::root::Root;

/// The largest delta manifest accepted (a million changed entries take about 200 MB); it is
/// spooled to disk, never held in memory.
pub(super) const MAX_MANIFEST: u64 = 1 << 30;
/// Blobs up to this size are read into memory; larger ones are spooled to an anonymous file
/// in `tmp/` while their hash is checked, and decoded from there.
pub(super) const BLOB_IN_MEMORY: u64 = 8 << 20;
/// The largest signature member accepted: a minisign signature is four short lines (its
/// trusted comment names two versions of at most 128 characters).
const MAX_SIGNATURE: u64 = 8 << 10;

/// The delta's members, read in order from its tar stream (`core::tar`: every header checked,
/// every extension and member kind but a regular file refused before its data is read).
pub(crate) type Members<'a> = tar::Reader<Box<dyn Read + 'a>>;

/// The members of the delta read from `input` (plain tar or zstd-compressed).
pub(crate) fn members<'a>(input: impl Read + 'a) -> Result<Members<'a>> {
    Ok(tar::Reader::new(tar_stream(input)?))
}

/// The next member, which must be the regular file `want` of at most `limit` bytes: a delta's
/// members come in a fixed order (manifest, signature, then the blobs in the order of its
/// contents), so a member out of place makes the delta invalid rather than one to skip. Its
/// header is checked before any of its data is read.
fn next_member(members: &mut Members, want: &str, limit: u64) -> Result<u64> {
    let m = members
        .next()
        .map_err(|e| bad(format!("{e:#}")))?
        .ok_or_else(|| bad(format!("it is truncated: member `{want}` is missing")))?;
    if m.name != want.as_bytes() {
        return Err(bad(format!(
            "expected member `{want}`, found `{}`",
            crate::core::path::quote(&m.name)
        )));
    }
    if m.size > limit {
        return Err(bad(format!(
            "member `{want}` is too large ({} bytes declared, at most {limit})",
            m.size
        )));
    }
    Ok(m.size)
}

/// Reads a small member that must come next, by name.
fn read_small(members: &mut Members, want: &str, limit: u64) -> Result<Vec<u8>> {
    next_member(members, want, limit)?;
    // No allocation ahead of the bytes: the vector grows as they arrive.
    let mut data = Vec::new();
    members
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("cannot read `{want}`: {e}")))?;
    Ok(data)
}

/// Copies the `size` bytes of the current member `name` to `out` through a fixed buffer,
/// feeding them to `seen` as well; a member that ends early makes the delta invalid.
fn spool_member(
    members: &mut Members,
    name: &str,
    size: u64,
    out: &mut std::fs::File,
    seen: &mut dyn FnMut(&[u8]),
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = members
            .read(&mut buf[..want])
            .map_err(|e| bad(format!("cannot read member `{name}`: {e}")))?;
        if n == 0 {
            return Err(bad(format!("member `{name}` is truncated")));
        }
        seen(&buf[..n]);
        out.write_all(&buf[..n])
            .context("cannot write a temporary file in `tmp/`")?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads the first two members of a delta, checks the signature, and parses the manifest. The
/// manifest is spooled to `spool` (an anonymous file) as it streams in and its signature is
/// checked there, before a byte of it is parsed; memory depends on neither its size nor on a
/// size it declares, only on the entries it holds, at most `max_entries` of each kind.
pub(super) fn read_manifest(
    members: &mut Members,
    policy: crate::ops::trust::Policy,
    spool: std::fs::File,
    max_entries: u64,
) -> Result<Delta> {
    read_head(members, spool, max_entries, &mut |data, len, sig| {
        crate::ops::trust::check(data, len, sig, policy)
    })
}

/// [`read_manifest`] with the signature check `check` (given the spooled manifest, its length
/// and the signature's text), which may refuse the delta or only note what it found.
pub(crate) fn read_head(
    members: &mut Members,
    mut spool: std::fs::File,
    max_entries: u64,
    check: &mut dyn FnMut(&mut std::fs::File, u64, &str) -> Result<()>,
) -> Result<Delta> {
    let size = next_member(members, MANIFEST_MEMBER, MAX_MANIFEST)?;
    spool_member(members, MANIFEST_MEMBER, size, &mut spool, &mut |_| {})?;
    let sig = read_small(members, SIGNATURE_MEMBER, MAX_SIGNATURE)?;
    let sig = String::from_utf8(sig).map_err(|_| bad("its signature is not text"))?;
    check(&mut spool, size, &sig)?;
    spool
        .seek(std::io::SeekFrom::Start(0))
        .context("cannot read the delta's manifest back")?;
    let text = std::io::BufReader::with_capacity(1 << 16, spool.take(size));
    delta::parse_reader(text, max_entries).map_err(|e| bad(format!("{e:#}")))
}

/// Reads and parses the head of a delta (manifest and signature member) from a stream, with no
/// trusted keys and no state root (the manifest is spooled in the system's temporary
/// directory): the entry point of the delta-reader fuzz target.
pub fn read_delta_head(input: impl Read) -> Result<Delta> {
    let spool = crate::fs::file::spool_in(&std::env::temp_dir())?;
    read_manifest(
        &mut members(input)?,
        crate::ops::trust::Policy::Keys(&[]),
        spool,
        delta::DEFAULT_MAX_ENTRIES,
    )
}

/// The version whose stored manifest has `digest`, preferring `current`.
pub(crate) fn find_base(root: &Root, digest: &Hash) -> Result<Option<String>> {
    let current = root.link("current")?;
    let mut versions = root.versions()?;
    if let Some(c) = &current {
        versions.retain(|v| v != c);
        versions.insert(0, c.clone());
    }
    for v in versions {
        if root.manifest_digest(&v)? == Some(*digest) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The base of a delta from the empty tree that no installed tree matches: not a version name
/// (it has spaces), so it names no file of the root.
pub(crate) const EMPTY_BASE: &str = "(the empty tree)";

/// The installed version the delta applies to ([`EMPTY_BASE`] for a delta from the empty
/// tree); warns when it is not the current one.
pub(super) fn base_version(root: &Root, d: &Delta, current: Option<&str>) -> Result<String> {
    let Some(base) = find_base(root, &d.from_digest)? else {
        // A delta from the empty tree (a first install) needs no installed base.
        if d.from_digest == crate::core::manifest::empty_tree().digest() {
            return Ok(EMPTY_BASE.into());
        }
        return Err(wrong_base(root, d, current)?);
    };
    if current != Some(base.as_str()) {
        log::warn!("this delta applies to installed version `{base}`, which is not current");
    }
    Ok(base)
}

/// The failure for a delta whose base is not installed: it names the base the delta wants
/// and what is current instead, so that the right delta can be fetched.
fn wrong_base(root: &Root, d: &Delta, current: Option<&str>) -> Result<anyhow::Error> {
    let cur = match current {
        Some(c) => format!(
            "current `{c}` has digest {}",
            root.manifest_digest(c)?
                .map(|d| crate::core::object::short_hex(&d))
                .unwrap_or_default()
        ),
        None => "no version is current".to_string(),
    };
    Ok(Fail::WrongBase(format!(
        "this delta is for a base tree{} with digest {}, which is not installed; {cur}",
        d.from_version
            .as_ref()
            .map(|v| format!(" `{v}`"))
            .unwrap_or_default(),
        hex::encode(d.from_digest)
    ))
    .into())
}

/// zstd frames start with these bytes; a delta is a plain tar or a zstd-compressed one.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest window of a zstd-compressed delta, as a log (FORMAT.md): 16 MiB, more than
/// `zstd` uses at any level up to 19 and `diff` at its levels; `--long` streams are refused.
const OUTER_WINDOW_LOG_MAX: u32 = 24;

/// The delta's tar stream, decompressed if it is zstd-compressed, with a window of at most
/// [`OUTER_WINDOW_LOG_MAX`] whatever a frame header asks for.
fn tar_stream<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    use std::io::BufRead;
    let mut input = std::io::BufReader::with_capacity(1 << 16, input);
    let head = input
        .fill_buf()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if head.starts_with(&ZSTD_MAGIC) {
        let mut dec = zstd::stream::read::Decoder::with_buffer(input).map_err(bad)?;
        dec.window_log_max(OUTER_WINDOW_LOG_MAX).map_err(bad)?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(input))
    }
}

/// A blob read from the stream and checked against its hash.
pub(super) enum Blob {
    Memory(Vec<u8>),
    /// Larger than [`BLOB_IN_MEMORY`]: in an anonymous file.
    Spooled(std::fs::File),
}

impl Blob {
    /// The blob's bytes from the start.
    pub(super) fn reader(&self) -> Box<dyn std::io::BufRead + '_> {
        self.reader_at(0)
    }

    /// The blob's bytes from `off` on.
    pub(super) fn reader_at(&self, off: u64) -> Box<dyn std::io::BufRead + '_> {
        match self {
            Blob::Memory(b) => Box::new(b.get(off as usize..).unwrap_or_default()),
            Blob::Spooled(f) => Box::new(std::io::BufReader::with_capacity(
                1 << 16,
                crate::fs::hash::FdReader {
                    fd: std::os::fd::AsFd::as_fd(f),
                    off,
                },
            )),
        }
    }

    /// Fills `buf` with the blob's bytes at `off` (an error if the blob ends before).
    pub(super) fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.reader_at(off).read_exact(buf)
    }
}

/// Reads the blob member of `c` from the stream and checks its hash, in memory when it is
/// small, else spooled to a file from `spool`.
pub(super) fn read_blob(
    members: &mut Members,
    c: &Content,
    spool: &dyn Fn() -> Result<std::fs::File>,
) -> Result<Blob> {
    let (want_sha, want_size) = c.blob.expect("blob");
    let name = Delta::blob_member(c);
    if next_member(members, &name, want_size)? != want_size {
        return Err(bad(format!(
            "member `{name}` does not have its declared size {want_size}"
        )));
    }
    let mut h = Sha256::new();
    let blob = if want_size <= BLOB_IN_MEMORY {
        // No allocation ahead of the bytes: the vector grows as they arrive.
        let mut blob = Vec::new();
        members
            .read_to_end(&mut blob)
            .map_err(|e| bad(format!("cannot read member `{name}`: {e}")))?;
        if blob.len() as u64 != want_size {
            return Err(bad(format!("member `{name}` is truncated")));
        }
        h.update(&blob);
        Blob::Memory(blob)
    } else {
        let mut f = spool()?;
        spool_member(members, &name, want_size, &mut f, &mut |b| h.update(b))?;
        Blob::Spooled(f)
    };
    let got: Hash = h.finalize().into();
    if got != want_sha {
        return Err(Fail::Integrity(format!(
            "member `{name}` does not match its sha256 (the delta is corrupt or was tampered with)"
        ))
        .into());
    }
    Ok(blob)
}

/// Checks that nothing follows the last blob: the signed manifest names every member a delta
/// may have.
pub(super) fn expect_end(members: &mut Members) -> Result<()> {
    if let Some(extra) = members.next().map_err(|e| bad(format!("{e:#}")))? {
        return Err(bad(format!(
            "unexpected member `{}` after the last blob",
            crate::core::path::quote(&extra.name)
        )));
    }
    Ok(())
}
