//! `treeswap diff`: compute the delta from one tree to another and write it as one tar file.
//!
//! Only changed entries are listed. A content the base already has (a metadata-only change,
//! a move, a copy) ships no bytes. Every other content ships once, as the smallest of: the
//! whole content zstd-compressed; a zstd frame with a similar base content as reference prefix
//! ("patch-from"); a zstd-compressed bsdiff patch (small files only, where it can win).
//! Similar contents are looked for at the same path, then among files of the same name or the
//! same name without digits, in the base and among contents shipped earlier in this delta.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use crate::codec::{bsdiff_patch, zstd_patch, zstd_whole};
use crate::delta::{Content, Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER, Source};
use crate::manifest::{Entry, Hash, Kind, Manifest};
use crate::object::ObjectId;
use crate::progress::Progress;

/// bsdiff's suffix sort is slow and memory-hungry; it is tried only on files up to this size,
/// where it wins on small executables.
const BSDIFF_MAX: u64 = 4 << 20;
/// Reference candidates tried per content.
const MAX_CANDIDATES: usize = 3;

/// Reads the content of a file entry of one side.
pub type Reader<'a> = &'a (dyn Fn(&Entry) -> Result<Vec<u8>> + Sync);

/// What a diff shipped, for the log and the benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub changed: usize,
    pub removed: usize,
    pub contents: usize,
    pub whole: usize,
    pub zstd_patch: usize,
    pub bsdiff: usize,
    pub from_base: usize,
    pub bytes: u64,
}

/// The name of a path without its directories, and the same with digits removed (so that
/// `libfoo.so.1.2` finds `libfoo.so.1.3`).
fn names(path: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let base = crate::path::split_parent(path).1.to_vec();
    let stem: Vec<u8> = base
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_digit())
        .collect();
    (base, stem)
}

/// Computes the delta manifest and its blobs.
pub fn diff(
    from: &Manifest,
    read_from: Reader,
    to: &Manifest,
    read_to: Reader,
    to_version: &str,
) -> Result<(Delta, Vec<Vec<u8>>, Stats)> {
    crate::version::validate(to_version)?;
    let mut d = Delta {
        from_version: from.version.clone(),
        from_digest: from.digest(),
        to_version: to_version.to_owned(),
        to_digest: to.digest(),
        to_count: to.entries.len() as u64,
        ..Default::default()
    };
    // Merge-join the two sorted entry lists.
    let (a, b) = (&from.entries, &to.entries);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.path == y.path => {
                if x != y {
                    d.changed.push(y.clone());
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.path < y.path => {
                d.removed.push(x.path.clone());
                i += 1;
            }
            (Some(x), None) => {
                d.removed.push(x.path.clone());
                i += 1;
            }
            (_, Some(y)) => {
                d.changed.push(y.clone());
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }

    // What the base already has.
    let base_objects: HashSet<ObjectId> = from.entries.iter().filter_map(Entry::object).collect();
    let mut base_content: HashMap<Hash, &Entry> = HashMap::new();
    let mut by_name: HashMap<Vec<u8>, Vec<&Entry>> = HashMap::new();
    for e in &from.entries {
        if let Kind::File { sha256, .. } = &e.kind {
            base_content.entry(*sha256).or_insert(e);
            let (n, s) = names(&e.path);
            by_name.entry(n).or_default().push(e);
            by_name.entry(s).or_default().push(e);
        }
    }

    // The contents to ship, once each, with the entry that first needs them.
    let mut needed: Vec<&Entry> = Vec::new();
    let mut listed: HashSet<Hash> = HashSet::new();
    for e in &d.changed {
        let Kind::File { sha256, size } = &e.kind else {
            continue;
        };
        if base_objects.contains(&e.object().expect("file")) || !listed.insert(*sha256) {
            continue;
        }
        if base_content.contains_key(sha256) {
            d.contents.push(Content {
                sha256: *sha256,
                size: *size,
                source: Source::Base,
                blob: None,
            });
        } else {
            needed.push(e);
        }
    }

    // Reference candidates: contents the device will have when it applies this one.
    let mut shipped_by_name: HashMap<Vec<u8>, Vec<&Entry>> = HashMap::new();
    let mut jobs: Vec<(&Entry, Vec<&Entry>)> = Vec::new();
    for e in &needed {
        let mut cands: Vec<&Entry> = Vec::new();
        if let Some(old) = from.find(&e.path)
            && matches!(old.kind, Kind::File { .. })
        {
            cands.push(old);
        }
        let (n, s) = names(&e.path);
        for key in [&n, &s] {
            for src in [by_name.get(key), shipped_by_name.get(key)]
                .into_iter()
                .flatten()
            {
                for c in src.iter().rev() {
                    if cands.len() < MAX_CANDIDATES
                        && !cands.iter().any(|x| content_of(x) == content_of(c))
                        && similar_size(c, e)
                    {
                        cands.push(c);
                    }
                }
            }
        }
        shipped_by_name.entry(n).or_default().push(e);
        shipped_by_name.entry(s).or_default().push(e);
        jobs.push((e, cands));
    }

    let total: u64 = needed.iter().map(|e| size_of(e)).sum();
    let progress = Progress::bytes(total, "diffing");
    let done = AtomicU64::new(0);
    type Encoded = Result<(Content, Vec<u8>)>;
    let encoded: Vec<Encoded> = jobs
        .par_iter()
        .map(|(e, cands)| {
            let r = encode(e, cands, read_from, read_to, &needed)
                .with_context(|| format!("cannot encode `{}`", e.display()));
            progress.inc(size_of(e));
            done.fetch_add(1, Ordering::Relaxed);
            r
        })
        .collect();
    progress.finish();
    let mut stats = Stats {
        changed: d.changed.len(),
        removed: d.removed.len(),
        from_base: d.contents.len(),
        ..Default::default()
    };
    let mut blobs = Vec::new();
    for r in encoded {
        let (c, blob) = r?;
        match c.source {
            Source::Zstd => stats.whole += 1,
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

fn content_of(e: &Entry) -> Option<Hash> {
    match &e.kind {
        Kind::File { sha256, .. } => Some(*sha256),
        _ => None,
    }
}

fn size_of(e: &Entry) -> u64 {
    match &e.kind {
        Kind::File { size, .. } => *size,
        _ => 0,
    }
}

fn similar_size(a: &Entry, b: &Entry) -> bool {
    let (x, y) = (size_of(a).max(1), size_of(b).max(1));
    x <= y.saturating_mul(8) && y <= x.saturating_mul(8)
}

/// Encodes one content as the smallest of its possible blobs.
fn encode(
    e: &Entry,
    cands: &[&Entry],
    read_from: Reader,
    read_to: Reader,
    needed: &[&Entry],
) -> Result<(Content, Vec<u8>)> {
    let (size, sha256) = match &e.kind {
        Kind::File { size, sha256 } => (*size, *sha256),
        _ => bail!("not a file"),
    };
    let data = read_to(e)?;
    if data.len() as u64 != size {
        bail!("it changed while the delta was being made");
    }
    let mut best = (Source::Zstd, zstd_whole(&data)?);
    for c in cands {
        let base_sha = content_of(c).expect("file");
        // A candidate is either a base file or a content of this delta shipped earlier.
        let shipped = needed.iter().any(|n| std::ptr::eq(*n, *c));
        let base = if shipped { read_to(c)? } else { read_from(c)? };
        let p = zstd_patch(&base, &data)?;
        if p.len() < best.1.len() {
            best = (Source::ZstdPatch { base: base_sha }, p);
        }
        if size <= BSDIFF_MAX && base.len() as u64 <= BSDIFF_MAX {
            let p = bsdiff_patch(&base, &data)?;
            if p.len() < best.1.len() {
                best = (Source::Bsdiff { base: base_sha }, p);
            }
        }
    }
    let blob_sha: Hash = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &best.1,
    ))
    .into();
    Ok((
        Content {
            sha256,
            size,
            source: best.0,
            blob: Some((blob_sha, best.1.len() as u64)),
        },
        best.1,
    ))
}

/// Writes a delta as a tar: `delta.toml`, its signature `delta.toml.minisig` (empty without
/// `sign`, an unencrypted minisign secret key file), then one `blobs/<sha256>` member per
/// shipped content, in manifest order.
pub fn write_delta(
    d: &Delta,
    blobs: &[Vec<u8>],
    sign: Option<&std::path::Path>,
    out: impl Write,
) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    let append = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
            .with_context(|| format!("cannot write delta member `{name}`"))
    };
    let text = d.to_toml();
    let sig = match sign {
        Some(key) => crate::trust::sign(
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
    append(&mut tar, MANIFEST_MEMBER, text.as_bytes())?;
    append(&mut tar, SIGNATURE_MEMBER, sig.as_bytes())?;
    let mut it = blobs.iter();
    for c in &d.contents {
        if c.blob.is_some() {
            let blob = it.next().context("a blob is missing")?;
            append(&mut tar, &Delta::blob_member(c), blob)?;
        }
    }
    tar.into_inner()?.flush()?;
    Ok(())
}
