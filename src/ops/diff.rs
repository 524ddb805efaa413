//! `treeswap diff`: compute the delta from one tree to another and write it as one tar file.
//!
//! Only changed entries are listed. A content the base already has (a metadata-only change,
//! a move, a copy) ships no bytes. Every other content ships once, as the smallest of: the
//! whole content zstd-compressed; a zstd frame with a similar base content as reference prefix
//! ("patch-from"); a zstd-compressed bsdiff patch (small files only, where it can win).
//! Similar contents are looked for at the same path, then among files of the same name or the
//! same name without digits, in the base and among contents shipped earlier in this delta.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

use crate::core::codec::{SCOUT_LEVEL, bsdiff_patch, zstd_patch, zstd_whole};
use crate::core::delta::{Content, Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER, Source};
use crate::core::manifest::{Entry, Hash, Kind, Manifest};
use crate::core::progress::Progress;

/// bsdiff's suffix sort is slow and memory-hungry; it is tried only on executables up to this
/// size, where it can win.
const BSDIFF_MAX: u64 = 2 << 20;
/// bsdiff is tried only where the best zstd blob is over 1/this of the content's size.
const BSDIFF_MIN_GAIN: u64 = 64;
/// Reference candidates tried per content.
const MAX_CANDIDATES: usize = 3;

/// Opens a file entry of one side for reading.
pub type Opener<'a> = &'a (dyn Fn(&Entry) -> Result<OwnedFd> + Sync);

/// Where the candidate references of a content are read: contents shipped earlier in the
/// delta (by address) from the new side, the others from the base.
struct Sides<'a> {
    from: Opener<'a>,
    to: Opener<'a>,
    shipped: HashSet<usize>,
}

impl<'a> Sides<'a> {
    fn of(&self, c: &Entry) -> Opener<'a> {
        if self.shipped.contains(&(c as *const Entry as usize)) {
            self.to
        } else {
            self.from
        }
    }
}

/// The whole content of a file entry.
fn read(open: Opener, e: &Entry) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(size_of(e) as usize);
    std::fs::File::from(open(e)?)
        .read_to_end(&mut v)
        .with_context(|| format!("cannot read `{}`", e.display()))?;
    Ok(v)
}

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
    let base = crate::core::path::split_parent(path).1.to_vec();
    let stem: Vec<u8> = base
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_digit())
        .collect();
    (base, stem)
}

/// How the new tree differs from the base: its changed entries (new paths included), the
/// removed paths, and the new tree's digest and entry count.
pub struct Changes {
    pub changed: Vec<Entry>,
    pub removed: Vec<Box<[u8]>>,
    pub to_digest: Hash,
    pub to_count: u64,
}

/// A merge-join of the base's sorted entries (an iterator, which may be reading them as it
/// goes, of owned or borrowed entries) with the new tree's, fed block by block: neither tree
/// need be in memory as a whole.
pub struct Compare<I: Iterator<Item = T>, T: Borrow<Entry>> {
    base: std::iter::Peekable<I>,
    changed: Vec<Entry>,
    removed: Vec<Box<[u8]>>,
}

impl<I: Iterator<Item = T>, T: Borrow<Entry>> Compare<I, T> {
    pub fn new(base: I) -> Self {
        Compare {
            base: base.peekable(),
            changed: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// The next entries of the new tree, in order.
    pub fn feed(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for y in entries {
            while let Some(x) = self.base.next_if(|x| x.borrow().path < y.path) {
                self.removed.push(x.borrow().path.clone());
            }
            match self.base.next_if(|x| x.borrow().path == y.path) {
                Some(x) if *x.borrow() == y => {}
                _ => self.changed.push(y),
            }
        }
    }

    pub fn finish(mut self, to_digest: Hash, to_count: u64) -> Changes {
        for x in self.base.by_ref() {
            self.removed.push(x.borrow().path.clone());
        }
        Changes {
            changed: self.changed,
            removed: self.removed,
            to_digest,
            to_count,
        }
    }
}

/// The changes from `from` to `to`, both in memory.
pub fn compare(from: &Manifest, to: Manifest) -> Changes {
    let (digest, count) = (to.digest(), to.entries.len() as u64);
    let mut c = Compare::new(from.entries.iter());
    c.feed(to.entries);
    c.finish(digest, count)
}

/// The changes between two installed versions and what the diff needs of the base, read from
/// their stored manifests as streams: the base's is read on a second thread, block by block,
/// while the new one's is merged with it; then the base's once more, keeping only what the
/// changed files need. Memory depends on the change, not on the trees.
pub fn installed(root: &crate::store::root::Root, v1: &str, v2: &str) -> Result<(Base, Changes)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Entry>>(2);
    let (changes, base_head) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || {
            root.stream_manifest(v1, &mut |block| {
                tx.send(block)
                    .map_err(|_| anyhow::anyhow!("the comparison stopped"))
            })
        });
        let mut cmp = Compare::new(rx.iter().flatten());
        let to = root.stream_manifest(v2, &mut |block| {
            cmp.feed(block);
            Ok(())
        });
        // Draining the base (for its removed paths), or dropping the receiver after an
        // error, lets the reader finish.
        let changes = match to {
            Ok((digest, count)) => Ok(cmp.finish(digest, count)),
            Err(e) => {
                drop(cmp);
                Err(e)
            }
        };
        let base_head = reader
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the manifest reader panicked")));
        Ok((changes?, base_head?))
    })?;
    let mut base = Base::new(Some(v1.to_owned()), base_head.0, &changes);
    root.stream_manifest(v1, &mut |block| {
        for e in &block {
            base.keep(e);
        }
        Ok(())
    })?;
    Ok((base, changes))
}

/// What a diff needs of the base tree, kept from its entries as they go by: its entries at
/// the changed paths, and those that may serve the changed files (the same content, or the
/// same name or name without digits). Nothing else: a map of a whole base would take
/// hundreds of MB at a million entries.
pub struct Base {
    pub version: Option<String>,
    pub digest: Hash,
    want_path: HashSet<Box<[u8]>>,
    want_sha: HashSet<Hash>,
    want_name: HashSet<Vec<u8>>,
    kept: Vec<Entry>,
    at_path: HashMap<Box<[u8]>, usize>,
    by_sha: HashMap<Hash, Vec<usize>>,
    by_name: HashMap<Vec<u8>, Vec<usize>>,
}

impl Base {
    pub fn new(version: Option<String>, digest: Hash, changes: &Changes) -> Base {
        let mut b = Base {
            version,
            digest,
            want_path: HashSet::new(),
            want_sha: HashSet::new(),
            want_name: HashSet::new(),
            kept: Vec::new(),
            at_path: HashMap::new(),
            by_sha: HashMap::new(),
            by_name: HashMap::new(),
        };
        for e in &changes.changed {
            if let Kind::File { sha256, .. } = &e.kind {
                b.want_path.insert(e.path.clone());
                b.want_sha.insert(*sha256);
                let (n, s) = names(&e.path);
                b.want_name.insert(n);
                b.want_name.insert(s);
            }
        }
        b
    }

    /// Looks at the base's next entry (in order).
    pub fn keep(&mut self, e: &Entry) {
        let Kind::File { sha256, .. } = &e.kind else {
            return;
        };
        let (n, s) = names(&e.path);
        let by_path = self.want_path.contains(&e.path);
        let by_sha = self.want_sha.contains(sha256);
        let names: Vec<Vec<u8>> = [n, s]
            .into_iter()
            .filter(|k| self.want_name.contains(k))
            .collect();
        if !by_path && !by_sha && names.is_empty() {
            return;
        }
        let i = self.kept.len();
        self.kept.push(e.clone());
        if by_path {
            self.at_path.insert(e.path.clone(), i);
        }
        if by_sha {
            self.by_sha.entry(*sha256).or_default().push(i);
        }
        for k in names {
            self.by_name.entry(k).or_default().push(i);
        }
    }

    fn at_path(&self, path: &[u8]) -> Option<&Entry> {
        self.at_path.get(path).map(|&i| &self.kept[i])
    }
    fn with_sha(&self, sha: &Hash) -> impl Iterator<Item = &Entry> {
        self.by_sha
            .get(sha)
            .into_iter()
            .flatten()
            .map(|&i| &self.kept[i])
    }
    fn named(&self, key: &[u8]) -> Option<Vec<&Entry>> {
        self.by_name
            .get(key)
            .map(|v| v.iter().map(|&i| &self.kept[i]).collect())
    }
}

/// Computes the delta manifest and its blobs.
pub fn diff<'a>(
    base: &Base,
    read_from: Opener<'a>,
    changes: Changes,
    read_to: Opener<'a>,
    to_version: &str,
    level: i32,
) -> Result<(Delta, Vec<Vec<u8>>, Stats)> {
    crate::core::version::validate(to_version)?;
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
    let in_base = |e: &Entry| {
        let (Kind::File { sha256, .. }, Some(id)) = (&e.kind, e.object()) else {
            return false;
        };
        base.with_sha(sha256).any(|b| b.object() == Some(id))
    };

    // The contents to ship, once each, with the entry that first needs them.
    let mut needed: Vec<&Entry> = Vec::new();
    let mut listed: HashSet<Hash> = HashSet::new();
    for e in &d.changed {
        let Kind::File { sha256, size } = &e.kind else {
            continue;
        };
        if in_base(e) || !listed.insert(*sha256) {
            continue;
        }
        if base.with_sha(sha256).next().is_some() {
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
        if let Some(old) = base.at_path(&e.path)
            && matches!(old.kind, Kind::File { .. })
        {
            cands.push(old);
        }
        let (n, s) = names(&e.path);
        for key in [&n, &s] {
            for src in [base.named(key), shipped_by_name.get(key).cloned()]
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
    let shipped: HashSet<usize> = needed.iter().map(|e| *e as *const Entry as usize).collect();
    let sides = Sides {
        from: read_from,
        to: read_to,
        shipped,
    };
    let progress = Progress::bytes(total, "diffing");
    // The biggest contents first, each worker taking the next one, so that one big file
    // does not start last; meanwhile a reader thread walks the same order ahead of them and
    // asks the kernel to read the files (`POSIX_FADV_WILLNEED`), so cold reads overlap.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(size_of(jobs[k].0)));
    let taken = AtomicUsize::new(0);
    type Encoded = Result<(Content, Vec<u8>)>;
    let results: std::sync::Mutex<Vec<Option<Encoded>>> =
        std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        s.spawn(|| {
            for &k in &order {
                if taken.load(Ordering::Relaxed) >= jobs.len() {
                    break;
                }
                let (e, cands) = &jobs[k];
                for (c, open) in
                    std::iter::once((*e, read_to)).chain(cands.iter().map(|c| (*c, sides.of(c))))
                {
                    if let Ok(fd) = open(c) {
                        let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::WillNeed);
                    }
                }
            }
        });
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|| {
                loop {
                    let n = taken.fetch_add(1, Ordering::Relaxed);
                    let Some(&k) = order.get(n) else { break };
                    let (e, cands) = &jobs[k];
                    let r = encode(e, cands, &sides, level)
                        .with_context(|| format!("cannot encode `{}`", e.display()));
                    progress.inc(size_of(e));
                    let failed = r.is_err();
                    results.lock().expect("poisoned")[k] = Some(r);
                    if failed {
                        // Stop the others: the diff fails anyway.
                        taken.store(order.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    progress.finish();
    let mut encoded = Vec::with_capacity(jobs.len());
    for r in results.into_inner().expect("poisoned") {
        // Contents left undone after a failure have no result; the failure is reported.
        match r {
            Some(r) => encoded.push(r?),
            None => bail!("a content was not encoded"),
        }
    }
    log::debug!("encoded {} contents", encoded.len());
    let mut stats = Stats {
        changed: d.changed.len(),
        removed: d.removed.len(),
        from_base: d.contents.len(),
        ..Default::default()
    };
    let mut blobs = Vec::new();
    for (c, blob) in encoded {
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
fn encode(e: &Entry, cands: &[&Entry], sides: &Sides, level: i32) -> Result<(Content, Vec<u8>)> {
    let (size, sha256) = match &e.kind {
        Kind::File { size, sha256 } => (*size, *sha256),
        _ => bail!("not a file"),
    };
    let data = read(sides.to, e)?;
    if data.len() as u64 != size {
        bail!("it changed while the delta was being made");
    }
    // Rank the references with a fast level (when there is a choice), then encode only the
    // winner at the final level; the whole content is tried too when the patch saves little.
    let mut bases: Vec<(Hash, Vec<u8>)> = Vec::new();
    for c in cands {
        // A candidate is either a base file or a content of this delta shipped earlier.
        let base = read(sides.of(c), c)?;
        bases.push((content_of(c).expect("file"), base));
    }
    let pick = match bases.len() {
        0 => None,
        1 => Some(0),
        _ => {
            let mut best = (0, usize::MAX);
            for (k, (_, base)) in bases.iter().enumerate() {
                let n = zstd_patch(base, &data, SCOUT_LEVEL)?.len();
                if n < best.1 {
                    best = (k, n);
                }
            }
            Some(best.0)
        }
    };
    let mut best = match pick {
        None => (Source::Zstd, zstd_whole(&data, level)?),
        Some(k) => {
            let (sha, base) = &bases[k];
            let patch = (
                Source::ZstdPatch { base: *sha },
                zstd_patch(base, &data, level)?,
            );
            if patch.1.len() as u64 * 2 > size {
                let whole = zstd_whole(&data, level)?;
                if whole.len() < patch.1.len() {
                    (Source::Zstd, whole)
                } else {
                    patch
                }
            } else {
                patch
            }
        }
    };
    // bsdiff wins on small executables, whose code moves by a few bytes everywhere; it is
    // not tried where the patch is already tiny, as it can save little there.
    if let Some(k) = pick
        && size <= BSDIFF_MAX
        && best.1.len() as u64 > size / BSDIFF_MIN_GAIN
        && data.starts_with(b"\x7fELF")
        && bases[k].1.len() as u64 <= BSDIFF_MAX
    {
        let (sha, base) = &bases[k];
        let p = bsdiff_patch(base, &data)?;
        if p.len() < best.1.len() {
            best = (Source::Bsdiff { base: *sha }, p);
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

/// Writes a delta: a tar with `delta.toml`, its signature `delta.toml.minisig` (empty without
/// `sign`, an unencrypted minisign secret key file), then one `blobs/<sha256>` member per
/// shipped content, in manifest order. With `compress`, the tar is zstd-compressed as two
/// frames (a zstd stream may hold several): the manifest and signature at a high level, the
/// already compressed blobs at a fast one. Stock tools read it: `tar --zstd -tf D`.
pub fn write_delta(
    d: &Delta,
    blobs: &[Vec<u8>],
    sign: Option<&std::path::Path>,
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
