//! Reading a delta: its tar stream, the manifest and signature members (the signature checked
//! on the exact bytes before they are parsed), each blob member, and the installed base.

use std::io::Read;

use anyhow::Result;
use sha2::{Digest, Sha256};

use super::bad;
use crate::core::delta::{self, Content, Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER};
use crate::core::error::Fail;
use crate::core::object::Hash;
use crate::store::root::Root;

/// The largest delta manifest accepted (a million changed entries take about 200 MB).
const MAX_MANIFEST: u64 = 1 << 30;

/// The next member, which must be the regular file `want`: a delta's members come in a fixed
/// order (manifest, signature, then the blobs in the order of its contents), so a member out
/// of place makes the delta invalid rather than one to skip.
fn next_member<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
    want: &str,
) -> Result<tar::Entry<'a, R>> {
    let m = entries
        .next()
        .ok_or_else(|| bad(format!("it is truncated: member `{want}` is missing")))?
        .map_err(|e| bad(format!("cannot read member `{want}`: {e}")))?;
    let name = m.path_bytes().into_owned();
    if m.header().entry_type() != tar::EntryType::Regular {
        return Err(bad(format!("member `{want}` is not a regular file")));
    }
    if name != want.as_bytes() {
        return Err(bad(format!(
            "expected member `{want}`, found `{}`",
            crate::core::path::display(&name)
        )));
    }
    Ok(m)
}

/// Reads a small member that must come next, by name.
fn read_small<R: Read>(entries: &mut tar::Entries<R>, want: &str, limit: u64) -> Result<Vec<u8>> {
    let mut m = next_member(entries, want)?;
    if m.header().size().unwrap_or(u64::MAX) > limit {
        return Err(bad(format!("member `{want}` is too large")));
    }
    let mut data = Vec::new();
    (&mut m)
        .take(limit)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("cannot read `{want}`: {e}")))?;
    Ok(data)
}

/// Reads the first two members of a delta, checks the signature, and parses the manifest.
pub(super) fn read_manifest<R: Read>(
    entries: &mut tar::Entries<R>,
    policy: crate::ops::trust::Policy,
) -> Result<Delta> {
    let text = read_small(entries, MANIFEST_MEMBER, MAX_MANIFEST)?;
    let sig = read_small(entries, SIGNATURE_MEMBER, 64 << 10)?;
    let sig = String::from_utf8(sig).map_err(|_| bad("its signature is not text"))?;
    // The signature is checked on the exact bytes, before they are parsed.
    crate::ops::trust::check(&text, &sig, policy)?;
    let text = String::from_utf8(text).map_err(|_| bad("its manifest is not UTF-8"))?;
    delta::parse(&text).map_err(|e| bad(format!("{e:#}")))
}

/// Reads and parses the head of a delta (manifest and signature member) from a stream, with no
/// trusted keys and no state root: the entry point of the delta-reader fuzz target.
pub fn read_delta_head(input: impl Read) -> Result<Delta> {
    let mut archive = tar::Archive::new(tar_stream(input)?);
    let mut entries = archive.entries().map_err(bad)?;
    read_manifest(&mut entries, crate::ops::trust::Policy::Keys(&[]))
}

/// The version whose stored manifest has `digest`, preferring `current`.
fn find_base(root: &Root, digest: &Hash) -> Result<Option<String>> {
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

/// The installed version the delta applies to; warns when it is not the current one.
pub(super) fn base_version(root: &Root, d: &Delta, current: Option<&str>) -> Result<String> {
    let Some(base) = find_base(root, &d.from_digest)? else {
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
                .map(hex::encode)
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

/// The delta's tar stream, decompressed if it is zstd-compressed. The outer window is capped
/// at zstd's default limit (128 MiB), whatever a frame header asks for.
pub(super) fn tar_stream<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    use std::io::BufRead;
    let mut input = std::io::BufReader::with_capacity(1 << 16, input);
    let head = input
        .fill_buf()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if head.starts_with(&ZSTD_MAGIC) {
        let mut dec = zstd::stream::read::Decoder::with_buffer(input).map_err(bad)?;
        dec.window_log_max(27).map_err(bad)?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(input))
    }
}

/// Reads the blob member of `c` from the stream and checks its hash.
pub(super) fn read_blob<R: Read>(entries: &mut tar::Entries<R>, c: &Content) -> Result<Vec<u8>> {
    let (want_sha, want_size) = c.blob.expect("blob");
    let name = Delta::blob_member(c);
    let mut member = next_member(entries, &name)?;
    if member.header().size().ok() != Some(want_size) {
        return Err(bad(format!(
            "member `{name}` does not have its declared size {want_size}"
        )));
    }
    // No allocation ahead of the bytes: the vector grows as they arrive.
    let mut blob = Vec::new();
    (&mut member)
        .take(want_size)
        .read_to_end(&mut blob)
        .map_err(|e| bad(format!("cannot read member `{name}`: {e}")))?;
    if blob.len() as u64 != want_size {
        return Err(bad(format!("member `{name}` is truncated")));
    }
    let got: Hash = Sha256::digest(&blob).into();
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
pub(super) fn expect_end<R: Read>(entries: &mut tar::Entries<R>) -> Result<()> {
    if let Some(extra) = entries.next() {
        let name = extra
            .map(|e| crate::core::path::display(&e.path_bytes()))
            .unwrap_or_else(|e| e.to_string());
        return Err(bad(format!(
            "unexpected member `{name}` after the last blob"
        )));
    }
    Ok(())
}
