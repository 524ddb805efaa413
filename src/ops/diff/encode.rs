//! Encoding the contents a delta ships: which contents, which references each may use, and
//! the smallest blob for each, on every core.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::compare::{Base, names};
use super::sketch;
use crate::core::codec::xz_dict;
use crate::core::codec::{MAX_REFERENCE, SCOUT_LEVEL, bsdiff_patch, zstd_patch, zstd_whole};
use crate::core::delta::{Codec, Content, Source};
use crate::core::manifest::{Entry, Kind};
use crate::core::object::Hash;
use crate::core::progress::Progress;
use crate::core::xz::BLOCK;
use crate::fs::{hash, sparse, sys};

/// bsdiff's suffix sort is slow and memory-hungry (4 bytes per byte of the reference, and
/// the patch); it is tried only on executables up to this size, where it can win. Issue 17's
/// kiosk pair, zstd patch -> bsdiff: `python3.11` (6.8 MB) 1097 -> 1054 KB, `libcrypto.so.3`
/// (4.7 MB) 481 -> 232 KB, `perl` (3.8 MB) 126 -> 84 KB, for about 3 s of CPU (at 2 MiB,
/// they were never tried).
const BSDIFF_MAX: u64 = 16 << 20;
/// bsdiff is tried only where the best zstd blob is over 1/this of the content's size.
const BSDIFF_MIN_GAIN: u64 = 64;
/// Contents over this size that are mostly holes are encoded without being held in memory
/// (see [`mostly_holes`]).
const SPARSE_MIN: u64 = 64 << 20;
// A reference is never mostly holes: references are at most `MAX_REFERENCE` bytes.
const _: () = assert!(MAX_REFERENCE <= SPARSE_MIN);
/// Whole contents of at least this size are also tried with xz, whose literal and repeated
/// offset models beat zstd's on structured binary data (apt's `pkgcache.bin`: xz 9.5 MB,
/// `zstd -19 --long` 12.8 MB).
const XZ_MIN: u64 = 256 << 10;
/// ...at `--level` this or higher.
pub(crate) const XZ_FROM_LEVEL: i32 = 12;
/// The xz preset for `level`. On apt's 40 MB `pkgcache.bin`: preset 0 gives 10.6 MB in
/// about 1.5 s, preset 6 (the xz default) 9.5 MB in about 15 s, preset 9 no better than 6.
fn xz_preset(level: i32) -> u32 {
    if level >= XZ_SLOW_FROM_LEVEL { 6 } else { 0 }
}
/// `--level` from which xz runs at preset 6.
const XZ_SLOW_FROM_LEVEL: i32 = 19;

/// A zstd patch's decoder holds its reference and a window buffer as large as the content
/// (up to 64 MiB); where the two come to more than this, bsdiff, whose patch `apply` streams
/// and so holds only the reference, is tried as well, and wins unless it is much larger
/// (apt's `srcpkgcache.bin` against `pkgcache.bin`, 40 MB each: 80 MB for zstd, 40 for
/// bsdiff), so that `apply` stays well under 100 MB.
const PATCH_MEMORY: u64 = 48 << 20;
/// ...bsdiff wins such a case when its blob is at most this many times the zstd patch's,
/// plus [`BSDIFF_SLACK`] bytes.
const BSDIFF_MEMORY_TRADE: usize = 2;
const BSDIFF_SLACK: usize = 64 << 10;

/// Contents of at least this size get a debug line each (how, how big, how long).
const LOG_MIN: u64 = 1 << 20;

/// Reference candidates tried per content.
const MAX_CANDIDATES: usize = 4;
/// Of which found by similarity of content ([`sketch`]), at most:
const MAX_SIMILAR: usize = 2;

/// Opens a file entry of one side for reading.
pub(crate) type Opener<'a> = &'a (dyn Fn(&Entry) -> Result<OwnedFd> + Sync);

/// Which tree a file entry is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// The base tree, which the device has.
    Base,
    /// The new tree: a content shipped earlier in this delta.
    New,
}

/// A reference a content may be encoded against, with the side to read it from.
#[derive(Clone, Copy)]
pub(super) struct Candidate<'a> {
    pub entry: &'a Entry,
    pub side: Side,
}

/// How each side's files are opened.
pub(super) struct Sides<'a> {
    pub from: Opener<'a>,
    pub to: Opener<'a>,
}

impl<'a> Sides<'a> {
    fn of(&self, side: Side) -> Opener<'a> {
        match side {
            Side::Base => self.from,
            Side::New => self.to,
        }
    }
}

/// One content to encode: the entry that first needs it, and its reference candidates.
pub(super) type Job<'a> = (&'a Entry, Vec<Candidate<'a>>);
/// A content's description and its blob.
pub(super) type Encoded = (Content, Vec<u8>);

/// Splits the contents the changed files need into those the base has (listed in the delta
/// with no bytes) and those to ship, once each, with the entry that first needs them.
pub(super) fn contents<'a>(base: &Base, changed: &'a [Entry]) -> (Vec<Content>, Vec<&'a Entry>) {
    let in_base = |e: &Entry| {
        let (Kind::File { sha256, .. }, Some(id)) = (&e.kind, e.object()) else {
            return false;
        };
        base.with_sha(sha256).any(|b| b.object() == Some(id))
    };
    let (mut from_base, mut needed) = (Vec::new(), Vec::new());
    let mut listed: HashSet<Hash> = HashSet::new();
    for e in changed {
        let Kind::File { sha256, size } = &e.kind else {
            continue;
        };
        if in_base(e) || !listed.insert(*sha256) {
            continue;
        }
        if base.with_sha(sha256).next().is_some() {
            from_base.push(Content {
                sha256: *sha256,
                size: *size,
                data: None,
                source: Source::Base,
                codec: Codec::Zstd,
                blob: None,
            });
        } else {
            needed.push(e);
        }
    }
    (from_base, needed)
}

/// The sketch ([`sketch::sketch`]) of each entry of at least [`sketch::MIN_SIZE`] and at
/// most [`MAX_REFERENCE`] bytes (empty for the others), read with `open` on every core.
pub(super) fn sketches(entries: &[&Entry], open: Opener) -> Result<Vec<Vec<u64>>> {
    use rayon::prelude::*;
    entries
        .par_iter()
        .map(|e| {
            if !(sketch::MIN_SIZE..=MAX_REFERENCE).contains(&size_of(e)) {
                return Ok(Vec::new());
            }
            // Nothing of at most `MAX_REFERENCE` bytes is "mostly holes" (`SPARSE_MIN`).
            let data = read(open(e)?, e)?;
            Ok(sketch::sketch(&data))
        })
        .collect()
}

/// What the similarity search looks through: the base's removed files with their sketches,
/// and the sketch of each needed content.
pub(super) struct Similar<'a> {
    pub removed: Vec<&'a Entry>,
    pub removed_sketches: Vec<Vec<u64>>,
    pub needed_sketches: Vec<Vec<u64>>,
}

/// The reference candidates of each needed content: contents the device will have when it
/// applies this one. The base's file at the same path first; then the base's removed files
/// and the contents shipped earlier in this delta that share the most chunks with it (by
/// their sketches, whatever their names); then files of the same path without digits, the same name,
/// or the same name without digits, in the base and among contents shipped earlier.
pub(super) fn candidates<'a>(
    base: &'a Base,
    needed: &[&'a Entry],
    similar: &Similar<'a>,
) -> Vec<Job<'a>> {
    let mut shipped_by_name: HashMap<Vec<u8>, Vec<&Entry>> = HashMap::new();
    // Sketch `k` is the base's removed file `k`, then needed content `k - removed`.
    let mut index = sketch::Index::default();
    for sk in &similar.removed_sketches {
        index.add(sk);
    }
    let r = similar.removed.len();
    let mut jobs = Vec::with_capacity(needed.len());
    for (i, &e) in needed.iter().enumerate() {
        let mut cands: Vec<Candidate> = Vec::new();
        let add = |cands: &mut Vec<Candidate<'a>>, c: &'a Entry, side: Side| {
            if cands.len() < MAX_CANDIDATES
                && !cands.iter().any(|x| content_of(x.entry) == content_of(c))
                && similar_size(c, e)
            {
                cands.push(Candidate { entry: c, side });
            }
        };
        if let Some(old) = base.at_path(&e.path)
            && matches!(old.kind, Kind::File { .. })
        {
            cands.push(Candidate {
                entry: old,
                side: Side::Base,
            });
        }
        let sk = similar.needed_sketches.get(i).map_or(&[][..], |s| &s[..]);
        for k in index.similar(sk, MAX_SIMILAR) {
            match k.checked_sub(r) {
                None => add(&mut cands, similar.removed[k], Side::Base),
                Some(k) => add(&mut cands, needed[k], Side::New),
            }
        }
        index.add(sk);
        let keys = names(&e.path);
        for key in &keys {
            let sources = [
                (base.named(key), Side::Base),
                (shipped_by_name.get(key).cloned(), Side::New),
            ];
            for (src, side) in sources {
                for &c in src.iter().flatten().rev() {
                    add(&mut cands, c, side);
                }
            }
        }
        for key in keys {
            shipped_by_name.entry(key).or_default().push(e);
        }
        jobs.push((e, cands));
    }
    jobs
}

/// Encodes every job, the biggest contents first, each worker taking the next one, so that
/// one big file does not start last; meanwhile a reader thread walks the same order ahead of
/// them and asks the kernel to read the files (`POSIX_FADV_WILLNEED`), so cold reads overlap.
/// A [`heavy`] job runs only while no other heavy job does: a worker that finds one running
/// puts its own aside and takes the next; a job put aside is taken before the next one once
/// no heavy job runs. The results are in the order of `jobs`.
pub(super) fn encode_all(jobs: &[Job], sides: &Sides, level: i32) -> Result<Vec<Encoded>> {
    let total: u64 = jobs.iter().map(|(e, _)| size_of(e)).sum();
    let progress = Progress::bytes(total, "diffing");
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(size_of(jobs[k].0)));
    let taken = AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let one_heavy = Mutex::new(());
    let put_aside: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let results: Mutex<Vec<Option<Result<Encoded>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let run = |k: usize| {
        let (e, cands) = &jobs[k];
        let t0 = std::time::Instant::now();
        let r = encode(e, cands, sides, level)
            .with_context(|| format!("cannot encode `{}`", e.display()));
        if let Ok((c, blob)) = &r
            && size_of(e) >= LOG_MIN
        {
            log::debug!(
                "encoded `{}` ({} bytes) as {}, {} bytes, in {:.2} s",
                e.display(),
                size_of(e),
                c.source_name(),
                blob.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        progress.inc(size_of(e));
        let err = r.is_err();
        results.lock().expect("poisoned")[k] = Some(r);
        if err {
            // Stop the others: the diff fails anyway.
            failed.store(true, Ordering::Relaxed);
            taken.store(order.len(), Ordering::Relaxed);
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| prefetch(jobs, &order, &taken, sides));
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|| {
                loop {
                    // A job put aside goes first as soon as no heavy job runs.
                    if !failed.load(Ordering::Relaxed)
                        && let Ok(_guard) = one_heavy.try_lock()
                    {
                        let next = put_aside.lock().expect("poisoned").pop();
                        if let Some(k) = next {
                            run(k);
                            continue;
                        }
                    }
                    let n = taken.fetch_add(1, Ordering::Relaxed);
                    let Some(&k) = order.get(n) else { break };
                    if !heavy(&jobs[k]) {
                        run(k);
                        continue;
                    }
                    match one_heavy.try_lock() {
                        Ok(_guard) => run(k),
                        Err(std::sync::TryLockError::WouldBlock) => {
                            put_aside.lock().expect("poisoned").push(k);
                        }
                        Err(std::sync::TryLockError::Poisoned(_)) => panic!("poisoned"),
                    }
                }
                loop {
                    let next = put_aside.lock().expect("poisoned").pop();
                    let Some(k) = next else { break };
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let _guard = one_heavy.lock().expect("poisoned");
                    run(k);
                }
            });
        }
    });
    progress.finish();
    let mut results = results.into_inner().expect("poisoned");
    // Contents left undone after a failure have no result, earlier in `jobs` than the failure
    // as often as not: the failure is what is reported.
    if let Some(k) = results.iter().position(|r| matches!(r, Some(Err(_))))
        && let Some(Err(e)) = results.swap_remove(k)
    {
        return Err(e);
    }
    let mut encoded = Vec::with_capacity(jobs.len());
    for r in results {
        match r {
            Some(r) => encoded.push(r?),
            None => bail!("a content was not encoded"),
        }
    }
    Ok(encoded)
}

/// Whether a job may hold more than [`PATCH_MEMORY`] of content and reference, and so run a
/// bsdiff of a big reference (12 bytes per byte of it while it sorts, and the patch): two at
/// once took 1 GB on issue 17's kiosk pair (apt's two 40 MB caches), one 609 MB.
fn heavy((e, cands): &Job) -> bool {
    let reference = cands
        .iter()
        .map(|c| size_of(c.entry))
        .filter(|&n| n <= MAX_REFERENCE)
        .max()
        .unwrap_or(0);
    size_of(e).saturating_add(reference) > PATCH_MEMORY
}

/// Asks the kernel to read ahead the files of the jobs in `order`, until the workers have
/// taken every job. Only a hint: a file that cannot be opened here is reported by its worker.
fn prefetch(jobs: &[Job], order: &[usize], taken: &AtomicUsize, sides: &Sides) {
    for &k in order {
        if taken.load(Ordering::Relaxed) >= jobs.len() {
            break;
        }
        let (e, cands) = &jobs[k];
        let files = std::iter::once((*e, sides.to))
            .chain(cands.iter().map(|c| (c.entry, sides.of(c.side))));
        for (c, open) in files {
            if let Ok(fd) = open(c) {
                sys::fadvise_willneed(fd.as_fd());
            }
        }
    }
}

/// Whether a content of `size` bytes, `data_bytes` of them outside holes, is encoded without
/// being held in memory ([`encode_sparse`]): over [`SPARSE_MIN`], with data in less than half of it, the
/// rest holes. Whole in memory, the 16 KiB of a 10 GiB `lastlog` took 10 GiB (and 20 GiB with
/// its old version as the reference, which a device would then hold whole too).
fn mostly_holes(size: u64, data_bytes: u64) -> bool {
    size > SPARSE_MIN && data_bytes < size / 2
}

/// A content whose file is mostly holes, as whole zstd, read run by run (holes are not read;
/// zstd is fed zeros for them, which cost it an RLE block of 4 bytes per 128 KiB). The blob is
/// what [`zstd_whole`] makes of the same bytes, give or take zstd's choices.
fn encode_sparse(e: &Entry, fd: BorrowedFd, size: u64, level: i32) -> Result<(Source, Vec<u8>)> {
    let mut enc = crate::core::codec::whole_encoder(Vec::new(), level, size)?;
    let st = sys::fstat(fd).with_context(|| format!("cannot stat `{}`", e.display()))?;
    let n = hash::with_io_buffer(|buf| {
        sparse::read_runs(fd, &st, size.saturating_add(1), buf, &mut |run| {
            match run {
                sparse::Run::Data(d) => enc.write_all(d)?,
                sparse::Run::Hole(mut n) => {
                    while n > 0 {
                        let k = n.min(sparse::ZEROS.len() as u64) as usize;
                        enc.write_all(&sparse::ZEROS[..k])?;
                        n -= k as u64;
                    }
                }
            }
            Ok(())
        })
    })
    .with_context(|| format!("cannot read `{}`", e.display()))?;
    if n != size {
        bail!("it changed while the delta was being made");
    }
    Ok((Source::Zstd, enc.finish()?))
}

/// The whole content of a file entry, open as `fd`; its holes are not read.
fn read(fd: OwnedFd, e: &Entry) -> Result<Vec<u8>> {
    let size = size_of(e);
    let mut v = Vec::with_capacity(size as usize);
    // No further than one byte past the entry's size: a file that grows is read no longer.
    let st = sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat `{}`", e.display()))?;
    hash::with_io_buffer(|buf| {
        sparse::read_runs(fd.as_fd(), &st, size.saturating_add(1), buf, &mut |run| {
            match run {
                sparse::Run::Data(d) => v.extend_from_slice(d),
                sparse::Run::Hole(n) => v.resize(v.len() + n as usize, 0),
            }
            Ok(())
        })
    })
    .with_context(|| format!("cannot read `{}`", e.display()))?;
    if v.len() as u64 != size {
        bail!("`{}` changed while it was being read", e.display());
    }
    Ok(v)
}

fn content_of(e: &Entry) -> Option<Hash> {
    match &e.kind {
        Kind::File { sha256, .. } => Some(*sha256),
        _ => None,
    }
}

pub(super) fn size_of(e: &Entry) -> u64 {
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
fn encode(e: &Entry, cands: &[Candidate], sides: &Sides, level: i32) -> Result<Encoded> {
    let (size, sha256) = match &e.kind {
        Kind::File { size, sha256 } => (*size, *sha256),
        _ => bail!("not a file"),
    };
    let fd = (sides.to)(e)?;
    // The bytes outside holes: what the object takes at most, for the device's space check.
    let data_bytes = sparse::data_bytes(fd.as_fd(), size)?;
    let (source, codec, blob) = if mostly_holes(size, data_bytes) {
        let (source, blob) = encode_sparse(e, fd.as_fd(), size, level)?;
        (source, Codec::Zstd, blob)
    } else {
        let data = read(fd, e)?;
        let mut bases: Vec<(Hash, Vec<u8>)> = Vec::with_capacity(cands.len());
        // A patch may name a reference of at most `MAX_REFERENCE` bytes (FORMAT.md), so never
        // one that is mostly holes (over `SPARSE_MIN`), which no side could hold whole.
        for c in cands.iter().filter(|c| size_of(c.entry) <= MAX_REFERENCE) {
            let fd = sides.of(c.side)(c.entry)?;
            bases.push((content_of(c.entry).expect("file"), read(fd, c.entry)?));
        }
        choose(&data, &bases, level)?
    };
    let blob_sha: Hash = Sha256::digest(&blob).into();
    let content = Content {
        sha256,
        size,
        data: (data_bytes < size).then_some(data_bytes),
        source,
        codec,
        blob: Some((blob_sha, blob.len() as u64)),
    };
    Ok((content, blob))
}

/// An `xz` blob (FORMAT.md): `data` as one .xz stream, LZMA2 at `preset` (0 to 6) with the
/// preset's dictionary, no larger than [`xz_dict`] of its size; CRC32 check. A content of
/// more than [`BLOCK`] bytes is cut into blocks of that size, each compressed on its own. (A larger
/// dictionary than the preset's makes the fast presets worse: 10.72 MB instead of 10.62 on
/// apt's `pkgcache.bin` at preset 0.)
pub(super) fn xz_whole(data: &[u8], preset: u32) -> Result<Vec<u8>> {
    // liblzma's dictionary of presets 0 to 6.
    const PRESET_DICT: [u32; 7] = [
        256 << 10,
        1 << 20,
        2 << 20,
        4 << 20,
        4 << 20,
        8 << 20,
        8 << 20,
    ];
    let preset = preset.min(6);
    let size = data.len() as u64;
    let mut opts = xz2::stream::LzmaOptions::new_preset(preset)?;
    // A block's dictionary need not cover more than the block.
    opts.dict_size(xz_dict(size.min(BLOCK)).min(PRESET_DICT[preset as usize]));
    let mut filters = xz2::stream::Filters::new();
    filters.lzma2(&opts);
    let stream = if size > BLOCK {
        // Blocks of `BLOCK` bytes, which `apply` decodes on every core (`core::xz`),
        // compressed on every core here.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        xz2::stream::MtStreamBuilder::new()
            .threads(u32::try_from(threads).unwrap_or(1))
            .block_size(BLOCK)
            .filters(filters)
            .check(xz2::stream::Check::Crc32)
            .encoder()?
    } else {
        xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32)?
    };
    let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
    std::io::Write::write_all(&mut enc, data)?;
    Ok(enc.finish()?)
}

/// The smallest blob for `data`, given reference contents `bases` (sha256, bytes), in
/// candidate order. The references are ranked with a fast level when there is a choice, and
/// only the winner is encoded at `level`; the whole content is tried too when the patch
/// saves less than half (with xz as well for a big one, from [`XZ_FROM_LEVEL`] on). bsdiff is
/// tried against the winner for small executables, whose code moves by a few bytes
/// everywhere, unless the zstd blob is already tiny.
pub(super) fn choose(
    data: &[u8],
    bases: &[(Hash, Vec<u8>)],
    level: i32,
) -> Result<(Source, Codec, Vec<u8>)> {
    let size = data.len() as u64;
    // The reference to use, and its patch's size at the scout level if that was measured.
    let pick = match bases.len() {
        0 => None,
        1 => Some((0, None)),
        _ => {
            let mut best = (0, usize::MAX);
            for (k, (_, base)) in bases.iter().enumerate() {
                let n = zstd_patch(base, data, SCOUT_LEVEL)?.len();
                if n < best.1 {
                    best = (k, n);
                }
            }
            Some((best.0, Some(best.1)))
        }
    };
    let Some((k, scouted)) = pick else {
        return whole(data, level);
    };
    let (sha, base) = &bases[k];
    if (base.len() as u64).saturating_add(size) > PATCH_MEMORY {
        let scout = match scouted {
            Some(n) => n,
            None => zstd_patch(base, data, SCOUT_LEVEL)?.len(),
        };
        if scout as u64 * 2 <= size {
            let p = bsdiff_patch(base, data)?;
            if p.len() <= scout * BSDIFF_MEMORY_TRADE + BSDIFF_SLACK {
                return Ok((Source::Bsdiff { base: *sha }, Codec::Zstd, p));
            }
        }
    }
    let mut best = (
        Source::ZstdPatch { base: *sha },
        Codec::Zstd,
        zstd_patch(base, data, level)?,
    );
    if best.2.len() as u64 * 2 > size {
        let w = whole(data, level)?;
        if w.2.len() < best.2.len() {
            best = w;
        }
    }
    if size <= BSDIFF_MAX
        && best.2.len() as u64 > size / BSDIFF_MIN_GAIN
        && data.starts_with(b"\x7fELF")
        && base.len() as u64 <= BSDIFF_MAX
    {
        let p = bsdiff_patch(base, data)?;
        if p.len() < best.2.len() {
            best = (Source::Bsdiff { base: *sha }, Codec::Zstd, p);
        }
    }
    Ok(best)
}

/// The smaller of whole zstd at `level` and, for a big content from [`XZ_FROM_LEVEL`] on,
/// xz. When xz beats zstd at the scout level by a fifth, zstd at `level` is not tried: it
/// does not gain that much over the scout level, and on a big content it costs seconds.
fn whole(data: &[u8], level: i32) -> Result<(Source, Codec, Vec<u8>)> {
    if (data.len() as u64) < XZ_MIN || level < XZ_FROM_LEVEL {
        return Ok((Source::Zstd, Codec::Zstd, zstd_whole(data, level)?));
    }
    let xz = xz_whole(data, xz_preset(level))?;
    let fast = zstd_whole(data, SCOUT_LEVEL)?;
    if xz.len() as u64 * 5 < fast.len() as u64 * 4 {
        return Ok((Source::Zstd, Codec::Xz, xz));
    }
    let z = zstd_whole(data, level)?;
    Ok(if xz.len() < z.len() {
        (Source::Zstd, Codec::Xz, xz)
    } else {
        (Source::Zstd, Codec::Zstd, z)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Decodes a blob the way a device would, with the zstd and bsdiff crates directly.
    fn decode(source: &Source, blob: &[u8], bases: &[(Hash, Vec<u8>)], size: usize) -> Vec<u8> {
        let base_of = |sha: &Hash| &bases.iter().find(|(s, _)| s == sha).expect("a base").1;
        match source {
            Source::Zstd => zstd::bulk::decompress(blob, size).unwrap(),
            Source::ZstdPatch { base } => {
                let mut d =
                    zstd::stream::read::Decoder::with_ref_prefix(blob, base_of(base)).unwrap();
                d.window_log_max(31).unwrap();
                let mut out = Vec::new();
                d.read_to_end(&mut out).unwrap();
                out
            }
            Source::Bsdiff { base } => {
                let patch = zstd::stream::decode_all(blob).unwrap();
                let mut out = Vec::new();
                bsdiff::patch(base_of(base), &mut &patch[..], &mut out).unwrap();
                out
            }
            Source::Base => panic!("choose never ships a base content"),
        }
    }

    /// Pseudo-random bytes that zstd cannot compress: sha256 in counter mode.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        (0u64..)
            .flat_map(|i| Sha256::digest([seed.to_le_bytes(), i.to_le_bytes()].concat()))
            .take(n)
            .collect()
    }

    /// A small "executable" whose words all move by `shift`, as code does when a function
    /// before them grows: zstd finds no match, bsdiff's difference bytes are all alike.
    fn elf(shift: u32) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        for i in 0..40_000u32 {
            v.extend_from_slice(&((i.wrapping_mul(2_654_435_761) >> 12) + shift).to_le_bytes());
        }
        v
    }

    /// Issue 17: a content of more than `BLOCK` bytes ships as one stream of blocks, which
    /// `apply` decodes in parallel; each block's dictionary stays within the decoder's limit.
    #[test]
    fn big_xz_blobs_are_blocks_within_the_limit() {
        let size = 2 * BLOCK + 12345;
        let text: Vec<u8> = (0u64..)
            .flat_map(|i| format!("record {} {}\n", i, (i * 7919) % 1013).into_bytes())
            .take(size as usize)
            .collect();
        let blob = xz_whole(&text, 0).unwrap();
        let mut read_at = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
            buf.copy_from_slice(&blob[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let blocks = crate::core::xz::index(blob.len() as u64, &mut read_at, size)
            .unwrap()
            .expect("blocks");
        let sizes: Vec<u64> = blocks.blocks.iter().map(|b| b.size).collect();
        assert_eq!(sizes, [BLOCK, BLOCK, 12345]);
        let open = |off: u64| -> Box<dyn std::io::BufRead + '_> { Box::new(&blob[off as usize..]) };
        let limit = crate::core::codec::xz_memlimit(size);
        let out = crate::core::xz::decode_parallel(&blocks, &open, limit, 2, |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            Ok(out)
        })
        .unwrap();
        assert!(out == text);
        // Blocks with a larger dictionary than the content needs: refused block by block
        // as by the one-stream decoder; beyond what a block of `MAX_BLOCK` needs, left to the
        // one-stream decoder, which refuses them.
        let big_dict = crate::core::xz::test_stream(&text[..5000], 2000, 4 << 20);
        let mut read_at = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
            buf.copy_from_slice(&big_dict[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let blocks = crate::core::xz::index(big_dict.len() as u64, &mut read_at, 5000)
            .unwrap()
            .expect("blocks");
        let open =
            |off: u64| -> Box<dyn std::io::BufRead + '_> { Box::new(&big_dict[off as usize..]) };
        let limit = crate::core::codec::xz_memlimit(5000);
        assert!(limit < 4 << 20);
        let got = crate::core::xz::decode_parallel(&blocks, &open, limit, 2, |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out)?;
            Ok(out)
        });
        assert!(got.is_err());
        assert!(crate::core::codec::xz_decode_all(&big_dict, 5000).is_err());
        let huge_dict = crate::core::xz::test_stream(&text[..5000], 2000, 64 << 20);
        let mut read_at = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
            buf.copy_from_slice(&huge_dict[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let blocks = crate::core::xz::index(huge_dict.len() as u64, &mut read_at, 5000).unwrap();
        assert!(blocks.is_none());
        assert!(crate::core::codec::xz_decode_all(&huge_dict, 5000).is_err());
    }

    #[test]
    fn xz_blobs_round_trip_within_their_dictionary_limit() {
        let text: Vec<u8> = (0..40_000)
            .flat_map(|i| format!("record {} {}\n", i, i % 7).into_bytes())
            .collect();
        let blob = xz_whole(&text, 0).unwrap();
        assert!(blob.len() < text.len() / 5);
        let size = text.len() as u64;
        assert_eq!(
            crate::core::codec::xz_decode_all(&blob, size).unwrap(),
            text
        );
        // A declared size that is smaller than the content: refused, not expanded.
        assert!(crate::core::codec::xz_decode_all(&blob, 1000).is_err());
        // A stream whose dictionary is larger than the content needs: refused.
        let mut opts = xz2::stream::LzmaOptions::new_preset(6).unwrap();
        opts.dict_size(64 << 20);
        let mut filters = xz2::stream::Filters::new();
        filters.lzma2(&opts);
        let stream =
            xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32).unwrap();
        let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        std::io::Write::write_all(&mut enc, &text[..5000]).unwrap();
        let big_dict = enc.finish().unwrap();
        assert!(crate::core::codec::xz_decode_all(&big_dict, 5000).is_err());
        assert!(crate::core::codec::xz_decode_all(b"\xfd7zXZ\0garbage", 10).is_err());
    }

    #[test]
    fn choose_takes_the_smallest_encoding() {
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut edited = text.clone();
        edited.splice(5000..5000, b"an inserted line\n".iter().copied());
        let random = noise(50_000, 1);
        let mut random_edited = random.clone();
        random_edited[25_000] ^= 0xff;
        let other = noise(50_000, 2);
        // (name, data, bases, the source it must choose: "zstd", "patch N" or "bsdiff N")
        type Case = (&'static str, Vec<u8>, Vec<Vec<u8>>, &'static str);
        let cases: Vec<Case> = vec![
            ("no reference", text.clone(), vec![], "zstd"),
            (
                "one close reference",
                edited.clone(),
                vec![text.clone()],
                "patch 0",
            ),
            (
                "random data, close reference",
                random_edited.clone(),
                vec![random.clone()],
                "patch 0",
            ),
            (
                "the closer of two",
                random_edited.clone(),
                vec![other.clone(), random.clone()],
                "patch 1",
            ),
            (
                "the closer of three",
                random_edited,
                vec![other.clone(), noise(50_000, 3), random],
                "patch 2",
            ),
            // The whole content is only tried when the patch saves less than half.
            (
                "a patch that saves enough",
                text.clone(),
                vec![other.clone()],
                "patch 0",
            ),
            (
                "an executable whose code moved",
                elf(3),
                vec![elf(0)],
                "bsdiff 0",
            ),
            (
                "a tiny patch is not worth bsdiff",
                elf(0),
                vec![elf(0)],
                "patch 0",
            ),
        ];
        for (name, data, bases, want) in cases {
            let bases: Vec<(Hash, Vec<u8>)> = bases
                .into_iter()
                .enumerate()
                .map(|(k, b)| ([k as u8; 32], b))
                .collect();
            let (source, _, blob) = choose(&data, &bases, 3).unwrap();
            let got = match source {
                Source::Zstd => "zstd".to_owned(),
                Source::ZstdPatch { base } => format!("patch {}", base[0]),
                Source::Bsdiff { base } => format!("bsdiff {}", base[0]),
                Source::Base => "base".to_owned(),
            };
            assert_eq!(got, want, "{name}: chose {got} ({} bytes)", blob.len());
            assert_eq!(
                decode(&source, &blob, &bases, data.len()),
                data,
                "{name}: round trip"
            );
        }
        // An unrelated reference saves nothing: never bigger than the whole content.
        let data = noise(50_000, 4);
        let (source, _, blob) = choose(&data, &[([0; 32], other)], 3).unwrap();
        assert!(
            blob.len() <= zstd_whole(&data, 3).unwrap().len(),
            "{source:?}"
        );
    }

    /// A content that is mostly holes is encoded from its runs of data and zeros, never held
    /// in memory, into a blob that decodes to all its bytes; a file with less of a hole is
    /// not taken for one.
    #[test]
    fn a_mostly_hole_content_is_streamed_whole() {
        use std::os::unix::fs::FileExt;
        let size = SPARSE_MIN * 2;
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let (head, mid) = (noise(10_000, 5), noise(4096, 6));
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(&mid, SPARSE_MIN + 8192).unwrap();
        assert!(mostly_holes(
            size,
            sparse::data_bytes(f.as_fd(), size).unwrap()
        ));
        let e = Entry {
            path: (*b"var/log/lastlog").into(),
            meta: Default::default(),
            kind: Kind::File {
                size,
                sha256: [0; 32],
            },
        };
        let (source, blob) = encode_sparse(&e, f.as_fd(), size, 3).unwrap();
        assert_eq!(source, Source::Zstd);
        assert!(blob.len() < 64 << 10, "{} bytes", blob.len());
        let mut want = vec![0u8; size as usize];
        want[..head.len()].copy_from_slice(&head);
        let at = (SPARSE_MIN + 8192) as usize;
        want[at..at + mid.len()].copy_from_slice(&mid);
        assert!(decode(&source, &blob, &[], size as usize) == want);
        // A shorter file than its entry says: it changed.
        assert!(encode_sparse(&e, f.as_fd(), size + 1, 3).is_err());

        let dense = tempfile::tempfile().unwrap();
        dense.set_len(size).unwrap();
        dense
            .write_all_at(&vec![1u8; (size / 2) as usize + 4096], 0)
            .unwrap();
        assert!(!mostly_holes(
            size,
            sparse::data_bytes(dense.as_fd(), size).unwrap()
        ));
        assert!(
            !mostly_holes(
                SPARSE_MIN,
                sparse::data_bytes(f.as_fd(), SPARSE_MIN).unwrap()
            ),
            "small"
        );
    }
}
