//! Writing the new objects: blobs read in order from the stream, decoded (zstd, zstd
//! patch-from, bsdiff) by worker threads against references from the base tree or the pool,
//! and each content published to the pool after its hash is checked.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

use super::plan::{BasePaths, Plan};
use super::read::{Blob, Members, expect_end, read_blob};
use crate::core::codec::{MAX_REFERENCE, WINDOW_LOG_MAX};
use crate::core::config::Config;
use crate::core::delta::{Codec, Content, Delta, Source};
use crate::core::error::Fail;
use crate::core::manifest::{Kind, Manifest};
use crate::core::object::{Hash, Meta, ObjectId};
use crate::core::progress::Progress;
use crate::fs::hash::FdReader;
use crate::fs::sys;
use crate::ops::install;
use crate::store::pool::Pool;
use crate::store::root::Root;

/// The base's read-only snapshot, when the new tree is staged from it (btrfs). Staging from it
/// reads and changes the metadata of the files the delta changes: patch references and
/// contents the base has are read from those same files there (the blocks are shared), not
/// from their pool objects, whose metadata would be one more cold read each.
pub(super) fn open_base_tree(
    root: &Root,
    pool: &Pool,
    base_version: &str,
) -> Result<Option<OwnedFd>> {
    if root.snapshots_enabled(pool) && base_version != super::read::EMPTY_BASE {
        root.open_snapshot(base_version)
    } else {
        Ok(None)
    }
}

/// Stages, verifies and commits the new tree `new` while `work` writes the new objects. On
/// btrfs, from the base's read-only snapshot: only the changes are staged. Elsewhere
/// `install` builds the whole tree, making what needs no new object meanwhile and linking
/// the changed files (`late`) last.
pub(super) fn stage(
    root: &Root,
    cfg: &Config,
    pool: &Pool,
    new: &Manifest,
    base_version: &str,
    d: &Delta,
    work: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let late: HashSet<&[u8]> = d
        .changed
        .iter()
        .filter(|e| matches!(e.kind, Kind::File { .. }))
        .map(|e| &*e.path)
        .collect();
    if base_version != super::read::EMPTY_BASE
        && install::install_by_snapshot(root, cfg, pool, new, base_version, d, work)?
    {
        return Ok(());
    }
    let during = crate::tree::stage::During { late, work };
    install::install(root, cfg, pool, new, true, Some(during))
}

/// The work done while the tree is staged: every new object written, then nothing may
/// follow the last blob.
pub(super) fn write_objects(
    d: &Delta,
    plan: &Plan,
    pool: &Pool,
    base_tree: Option<&OwnedFd>,
    members: &mut Members,
    spool: &dyn Fn() -> Result<std::fs::File>,
) -> Result<()> {
    materialize(d, plan, pool, base_tree, members, spool)?;
    log::debug!("wrote the new objects");
    crate::core::failpoint::hit("apply-after-objects");
    expect_end(members)
}

/// Reads a whole object's bytes as a patch reference. With `rehash`, they are checked
/// against the content hash they must have. Without, for an object this apply created for
/// content `sha` moments ago, its bytes hashed as `Pool::store` wrote them (issue 17: hashing
/// apt's 40 MB cache again cost 25 ms before its twin's patch could start), only its size is:
/// the content made from it is hashed before it is published, so a reference changed since
/// still fails, as an integrity error of that content.
fn read_reference(pool: &Pool, id: &ObjectId, sha: &Hash, rehash: bool) -> Result<Vec<u8>> {
    let fd = pool.open_object(id)?;
    let size = sys::fstat(fd.as_fd())?.st_size as u64;
    check_reference_size(size, sha)?;
    let data = read_all(fd.as_fd(), size).context("cannot read a patch base")?;
    let problem = if rehash {
        let got: Hash = Sha256::digest(&data).into();
        (&got != sha).then_some("in the pool is corrupt (run `treeswap verify --full`)")
    } else {
        (data.len() as u64 != size).then_some("changed while it was read")
    };
    if let Some(problem) = problem {
        return Err(
            Fail::Integrity(format!("patch base object {} {problem}", hex::encode(id))).into(),
        );
    }
    Ok(data)
}

/// A patch reference must be at most [`MAX_REFERENCE`] bytes (FORMAT.md): it is held whole.
fn check_reference_size(size: u64, sha: &Hash) -> Result<()> {
    if size > MAX_REFERENCE {
        return Err(Fail::BadDelta(format!(
            "invalid delta: a patch names reference {}, of {size} bytes, over the limit of {MAX_REFERENCE}",
            hex::encode(sha)
        ))
        .into());
    }
    Ok(())
}

/// Reads the file open as `fd`, of `size` bytes by its `fstat` (at most [`MAX_REFERENCE`]):
/// the buffer is allocated once at that size, not grown by doubling, which for a 40 MB
/// reference touched 64 MB of memory and copied it as it grew.
fn read_all(fd: BorrowedFd, size: u64) -> std::io::Result<Vec<u8>> {
    // One byte more, so that a file that grew since is read (and then fails its hash check)
    // without a reallocation on the way to its end.
    let mut data = Vec::with_capacity(size.min(MAX_REFERENCE).saturating_add(1) as usize);
    FdReader { fd, off: 0 }.read_to_end(&mut data)?;
    Ok(data)
}

/// Where contents of the base tree are read from besides the pool: the base tree's read-only
/// snapshot, when staging from it (see `apply`).
struct BaseFiles<'a> {
    tree: Option<&'a OwnedFd>,
    paths: &'a BasePaths,
    /// How many contents were read from the tree.
    used: std::sync::atomic::AtomicU64,
}

impl BaseFiles<'_> {
    /// The base tree's file with content `sha`, open for reading, if there is one.
    fn open(&self, sha: &Hash) -> Option<OwnedFd> {
        let tree = self.tree?;
        let path = self.paths.get(sha)?;
        crate::fs::sys::open_file_beneath(tree.as_fd(), path).ok()
    }

    /// The bytes of content `sha` from the base tree's file, if it has them: anything else
    /// (no such file, another content there) is `None`, and the caller reads the pool.
    fn read(&self, sha: &Hash) -> Option<Vec<u8>> {
        let fd = self.open(sha)?;
        let size = sys::fstat(fd.as_fd()).ok()?.st_size as u64;
        if size > MAX_REFERENCE {
            return None;
        }
        let data = read_all(fd.as_fd(), size).ok()?;
        let got: Hash = Sha256::digest(&data).into();
        if &got != sha {
            log::debug!(
                "the base tree's file of content {} differs; reading the pool",
                hex::encode(sha)
            );
            return None;
        }
        self.used_one();
        Some(data)
    }

    fn used_one(&self) {
        self.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The contents being decoded at once hold at most this many bytes of memory (blobs held in
/// memory, references, decoding windows) and of spooled blobs, unless one content alone
/// needs more.
pub(super) const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// A content of at least this many bytes made from a blob is "heavy": decoding and writing it
/// takes long enough (an xz-compressed 40 MB cache takes most of a second) that it is started
/// before the cheap contents that precede it in the stream ([`dispatch_ahead`]).
const HEAVY: u64 = 4 << 20;

/// How many bytes of blobs [`materialize`] reads and holds, unstarted, to start a heavy
/// content early: no more than [`super::read::BLOB_IN_MEMORY`], so none of them is spooled.
const LOOKAHEAD_BYTES: u64 = super::read::BLOB_IN_MEMORY;

/// Whether content `i` should be started before the contents `next..i` (which come before it
/// in the stream) and how many blob bytes that holds: if it is heavy, those blobs total at most
/// [`LOOKAHEAD_BYTES`], and none of those contents is its reference. Starting it first does
/// not change what is written, only when: its decoding (alone on a worker for a second when it
/// came last) overlaps with the cheap contents and with the staging of the tree.
fn dispatch_ahead(d: &Delta, next: usize, i: usize) -> Option<u64> {
    let c = &d.contents[i];
    if c.blob.is_none() || c.size < HEAVY {
        return None;
    }
    let mut held = 0u64;
    for b in &d.contents[next..i] {
        if c.source.base() == Some(&b.sha256) {
            return None;
        }
        held = held.saturating_add(b.blob.map_or(0, |(_, n)| n));
        if held > LOOKAHEAD_BYTES {
            return None;
        }
    }
    Some(held)
}

/// Writes every new object. Blobs are read from the stream in delta order, and each content
/// is decoded and written by a worker thread as soon as its blob is in and the bytes in flight
/// allow ([`IN_FLIGHT_BYTES`]), so that the cold reads of references overlap. A heavy content
/// close enough ahead in the stream is started before the cheap ones before it, whose blobs
/// are held meanwhile ([`dispatch_ahead`]). References and contents of the base are read
/// from `base_tree` (the base's read-only snapshot) where it has them, else from the pool. A
/// patch against a content still being made waits until that content is done.
fn materialize(
    d: &Delta,
    plan: &Plan,
    pool: &Pool,
    base_tree: Option<&OwnedFd>,
    members: &mut Members,
    spool: &dyn Fn() -> Result<std::fs::File>,
) -> Result<()> {
    let w = Writer::new(d, plan, pool, base_tree);
    let threads = worker_threads(base_tree.is_some())?;
    threads.in_place_scope(|s| w.feed(s, members, spool))?;
    if let Some(e) = w.failed.lock().expect("poisoned").take() {
        return Err(e);
    }
    w.progress.finish();
    if base_tree.is_some() {
        log::debug!(
            "read {} of the base's contents from its snapshot",
            w.files.used.into_inner()
        );
    }
    Ok(())
}

/// From a snapshot, workers wait on cold reads of the snapshot's metadata: many keep several
/// in flight. Otherwise one per core, and the main thread announces each reference to the
/// kernel (`POSIX_FADV_WILLNEED`) before handing its content out (`Writer::prefetch`).
fn worker_threads(from_snapshot: bool) -> Result<rayon::ThreadPool> {
    if from_snapshot {
        return crate::tree::stage::io_threads();
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .context("cannot start threads")
}

/// The contents handed to workers and not yet done, and the bytes they may hold.
#[derive(Default)]
struct Flight {
    bytes: u64,
    shas: HashSet<Hash>,
}

/// What the main thread and the workers share while the new objects are written.
struct Writer<'a> {
    d: &'a Delta,
    plan: &'a Plan,
    pool: &'a Pool,
    files: BaseFiles<'a>,
    /// Where each content can be read from once it exists: an object of the base or one this
    /// apply wrote.
    have: Mutex<HashMap<Hash, ObjectId>>,
    /// The contents whose objects this apply created, their bytes hashed as they were written
    /// (`Pool::store`): as a reference, read back without hashing them again.
    checked: Mutex<HashSet<Hash>>,
    /// The first failure of a worker; the main thread stops handing out contents.
    failed: Mutex<Option<anyhow::Error>>,
    /// What is in flight; `done` is signalled each time a worker finishes a content.
    flight: Mutex<Flight>,
    done: Condvar,
    progress: Progress,
}

/// Takes a content off [`Writer::flight`] when its worker is done with it, even by a panic
/// (which the scope then re-raises), so that the main thread never waits for it forever.
struct Landed<'w, 'a> {
    w: &'w Writer<'a>,
    sha: Hash,
    cost: u64,
}

impl Drop for Landed<'_, '_> {
    fn drop(&mut self) {
        let mut f = self.w.flight.lock().unwrap_or_else(|e| e.into_inner());
        f.bytes = f.bytes.saturating_sub(self.cost);
        f.shas.remove(&self.sha);
        drop(f);
        self.w.done.notify_all();
    }
}

impl<'a> Writer<'a> {
    fn new(d: &'a Delta, plan: &'a Plan, pool: &'a Pool, base_tree: Option<&'a OwnedFd>) -> Self {
        let files = BaseFiles {
            tree: base_tree,
            paths: &plan.base_paths,
            used: 0.into(),
        };
        Writer {
            d,
            plan,
            pool,
            files,
            have: Mutex::new(plan.base_content.clone()),
            checked: Mutex::new(HashSet::new()),
            failed: Mutex::new(None),
            flight: Mutex::new(Flight::default()),
            done: Condvar::new(),
            progress: Progress::items(d.contents.len() as u64, "writing"),
        }
    }

    /// The object that holds content `sha`, if one exists yet.
    fn object_of(&self, sha: &Hash) -> Option<ObjectId> {
        self.have.lock().expect("poisoned").get(sha).copied()
    }

    fn has_failed(&self) -> bool {
        self.failed.lock().expect("poisoned").is_some()
    }

    /// Hands every content to the workers of scope `s`, reading the blobs in stream order:
    /// a heavy content is started ahead of the cheap ones before it where [`dispatch_ahead`]
    /// allows, their blobs held (and counted in flight) until their turn.
    fn feed<'s>(
        &'s self,
        s: &rayon::Scope<'s>,
        members: &mut Members,
        spool: &dyn Fn() -> Result<std::fs::File>,
    ) -> Result<()> {
        let n = self.d.contents.len();
        // The next heavy content at or after each index.
        let mut next_heavy = vec![n; n + 1];
        for i in (0..n).rev() {
            let c = &self.d.contents[i];
            next_heavy[i] = if c.blob.is_some() && c.size >= HEAVY {
                i
            } else {
                next_heavy[i + 1]
            };
        }
        let mut next = 0;
        while next < n && !self.has_failed() {
            let h = next_heavy[next];
            let ahead = (h > next && h < n)
                .then(|| dispatch_ahead(self.d, next, h))
                .flatten();
            let Some(held_bytes) = ahead else {
                let c = &self.d.contents[next];
                let blob = c.blob.map(|_| read_blob(members, c, spool)).transpose()?;
                self.dispatch(s, c, blob, 0)?;
                next += 1;
                continue;
            };
            // The blobs before the heavy content, held: counted in flight at once.
            self.reserve(held_bytes, None);
            let mut held = Vec::with_capacity(h - next);
            for c in &self.d.contents[next..h] {
                held.push(c.blob.map(|_| read_blob(members, c, spool)).transpose()?);
            }
            let c = &self.d.contents[h];
            let blob = read_blob(members, c, spool)?;
            log::debug!(
                "starting content {} ({} bytes) ahead of the {} before it",
                crate::core::object::short_hex(&c.sha256),
                c.size,
                h - next
            );
            self.dispatch(s, c, Some(blob), 0)?;
            for (c, blob) in self.d.contents[next..h].iter().zip(held) {
                let counted = c.blob.map_or(0, |(_, n)| n);
                if self.has_failed() {
                    self.release(counted);
                    continue;
                }
                self.dispatch(s, c, blob, counted)?;
            }
            next = h + 1;
        }
        Ok(())
    }

    /// Waits until content `c` (`counted` of whose bytes are in flight already, as a held
    /// blob) may start, then hands it to a worker (or, when every object of it is in the pool
    /// already, only records it).
    fn dispatch<'s>(
        &'s self,
        s: &rayon::Scope<'s>,
        c: &'s Content,
        blob: Option<Blob>,
        counted: u64,
    ) -> Result<()> {
        let Some(metas) = self.plan.metas.get(&c.sha256).filter(|m| !m.is_empty()) else {
            self.release(counted);
            self.skip(c);
            return Ok(());
        };
        let cost = self.cost(c).max(counted);
        if !self.reserve(cost - counted, c.source.base()) {
            self.release(counted);
            return Ok(());
        }
        self.flight.lock().expect("poisoned").shas.insert(c.sha256);
        self.prefetch(c);
        let landed = Landed {
            w: self,
            sha: c.sha256,
            cost,
        };
        s.spawn(move |_| {
            self.write_one(c, blob.as_ref(), metas);
            drop(landed);
        });
        Ok(())
    }

    /// Waits until `more` bytes fit in flight (or no content is in flight) and reference `r`, if
    /// given, is not being made, then counts them. `false` (nothing counted) if a worker
    /// failed meanwhile.
    fn reserve(&self, more: u64, r: Option<&Hash>) -> bool {
        let mut f = self.flight.lock().expect("poisoned");
        loop {
            if self.has_failed() {
                return false;
            }
            let waits = r.is_some_and(|r| f.shas.contains(r));
            // Held blobs alone are no reason to wait: only a content in flight gives back bytes.
            let full = !f.shas.is_empty() && f.bytes.saturating_add(more) > IN_FLIGHT_BYTES;
            if !waits && !full {
                f.bytes = f.bytes.saturating_add(more);
                return true;
            }
            f = self.done.wait(f).expect("poisoned");
        }
    }

    /// Gives back `n` bytes counted in flight.
    fn release(&self, n: u64) {
        if n > 0 {
            let mut f = self.flight.lock().expect("poisoned");
            f.bytes = f.bytes.saturating_sub(n);
        }
    }

    /// What decoding `c` may hold at once, as the format bounds it: its blob (in memory or
    /// spooled), its reference, and the decoder's window.
    fn cost(&self, c: &Content) -> u64 {
        let blob = c.blob.map_or(0, |(_, n)| n);
        let reference = if c.source.base().is_some() {
            MAX_REFERENCE.min(c.size.max(1 << 20))
        } else {
            0
        };
        let window = match c.source {
            Source::Base => 0,
            _ => c.size.min(1 << WINDOW_LOG_MAX),
        };
        blob.saturating_add(reference).saturating_add(window)
    }

    /// A content every object of which is in the pool already: nothing to write, but later
    /// patches may still use it as their reference.
    fn skip(&self, c: &Content) {
        self.progress.inc(1);
        if let Some(id) = self.plan.existing.get(&c.sha256) {
            self.have
                .lock()
                .expect("poisoned")
                .entry(c.sha256)
                .or_insert(*id);
        }
    }

    /// Without a snapshot, asks the kernel to start reading the pool object the content is
    /// made from (its patch reference, or for a `base` content the content itself), so that a
    /// worker does not wait for the cold read alone.
    fn prefetch(&self, c: &Content) {
        let source = match c.source {
            Source::Base => Some(c.sha256),
            _ => c.source.base().copied(),
        };
        if self.files.tree.is_none()
            && let Some(id) = source.and_then(|h| self.object_of(&h))
            && let Ok(fd) = self.pool.open_object(&id)
        {
            sys::fadvise_willneed(fd.as_fd());
        }
    }

    /// On a worker: writes content `c` and records its object, or the failure.
    fn write_one(&self, c: &Content, blob: Option<&Blob>, metas: &[(Meta, ObjectId)]) {
        match self.write_content(c, blob, metas) {
            Ok(id) => {
                if c.size >= HEAVY {
                    log::debug!(
                        "wrote content {} ({} bytes, {})",
                        crate::core::object::short_hex(&c.sha256),
                        c.size,
                        c.source_name()
                    );
                }
                self.have.lock().expect("poisoned").insert(c.sha256, id);
            }
            Err(e) => {
                self.failed.lock().expect("poisoned").get_or_insert(e);
            }
        }
        self.progress.inc(1);
    }

    /// Makes the objects `metas` (at least one) of content `c` from its blob or reference;
    /// returns the first one's id. The others are copies of the first.
    fn write_content(
        &self,
        c: &Content,
        blob: Option<&Blob>,
        metas: &[(Meta, ObjectId)],
    ) -> Result<ObjectId> {
        let ((meta0, id0), rest) = metas.split_first().expect("an object to make");
        let created = match &c.source {
            Source::Base => {
                self.copy_base_content(c, meta0)?;
                false
            }
            Source::Zstd if c.codec == Codec::Xz => {
                let blob = blob.expect("blob");
                self.write_xz(c, blob, meta0)?
            }
            Source::Zstd | Source::ZstdPatch { .. } | Source::Bsdiff { .. } => {
                let reference = c.source.base().map(|r| self.reference(r)).transpose()?;
                let blob = blob.expect("blob");
                let decoder =
                    || crate::core::codec::decoder_of(c, blob.reader(), reference.as_deref());
                let store = |dec: &mut dyn Read| {
                    self.pool
                        .store_bounded(dec, meta0, c.size, &c.sha256, c.data)
                };
                if c.size >= HEAVY {
                    pipelined(&decoder, store)
                } else {
                    store(&mut decoder()?)
                }
                .with_context(|| what(c))?
            }
        };
        if created {
            self.checked.lock().expect("poisoned").insert(c.sha256);
        }
        crate::core::failpoint::hit("apply-after-object");
        for (meta, _) in rest {
            self.copy_of(c, id0, meta)?;
        }
        Ok(*id0)
    }

    /// Writes content `c` from its `xz` blob: the blocks of a stream of several
    /// (`core::xz::index`) decoded on every core, else the stream in this thread.
    fn write_xz(&self, c: &Content, blob: &Blob, meta: &Meta) -> Result<bool> {
        let (_, len) = c.blob.expect("blob");
        let blocks = crate::core::xz::index(len, &mut |off, buf| blob.read_at(off, buf), c.size)
            .context("cannot read a blob")?;
        let Some(blocks) = blocks else {
            let mut dec = crate::core::codec::decoder_of(c, blob.reader(), None)?;
            return self
                .pool
                .store_bounded(&mut dec, meta, c.size, &c.sha256, c.data)
                .with_context(|| what(c));
        };
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        log::debug!(
            "decoding content {} ({} bytes) in {} blocks on {threads} threads",
            crate::core::object::short_hex(&c.sha256),
            c.size,
            blocks.blocks.len()
        );
        crate::core::xz::decode_parallel(
            &blocks,
            &|off| blob.reader_at(off),
            crate::core::codec::xz_memlimit(c.size.min(crate::core::xz::MAX_BLOCK)),
            threads,
            |r| self.pool.store_bounded(r, meta, c.size, &c.sha256, c.data),
        )
        .with_context(|| what(c))
    }

    /// A content the base has, as an object with other metadata: from the base tree's file if
    /// it has the content (`store` checks it), else from the pool.
    fn copy_base_content(&self, c: &Content, meta: &Meta) -> Result<()> {
        let id = self
            .object_of(&c.sha256)
            .ok_or_else(|| anyhow!("content {} is not available", hex::encode(c.sha256)))?;
        let from_tree = self
            .files
            .open(&c.sha256)
            .map(|fd| self.pool.store_file(fd.as_fd(), meta, c.size, &c.sha256));
        match from_tree {
            Some(Ok(_)) => self.files.used_one(),
            Some(Err(e)) => {
                log::debug!("{e:#}; reading the pool");
                self.copy_of(c, &id, meta)?;
            }
            None => self.copy_of(c, &id, meta)?,
        }
        Ok(())
    }

    /// The bytes of reference `sha`, checked: from the base tree's file if it has them, else
    /// from the pool object that holds it.
    fn reference(&self, sha: &Hash) -> Result<Vec<u8>> {
        let id = self
            .object_of(sha)
            .ok_or_else(|| anyhow!("reference {} is not available", hex::encode(sha)))?;
        if self.checked.lock().expect("poisoned").contains(sha) {
            return read_reference(self.pool, &id, sha, false);
        }
        match self.files.read(sha) {
            Some(data) => Ok(data),
            None => read_reference(self.pool, &id, sha, true),
        }
    }

    /// Another object of content `c`, with metadata `meta`, copied from object `id`.
    fn copy_of(&self, c: &Content, id: &ObjectId, meta: &Meta) -> Result<()> {
        let src = self.pool.open_object(id)?;
        self.pool
            .store_file(src.as_fd(), meta, c.size, &c.sha256)
            .with_context(|| what(c))?;
        Ok(())
    }
}

/// The bytes a [`pipelined`] decoder hands over at a time, and how many such chunks wait.
const CHUNK: usize = 1 << 20;
const CHUNKS_AHEAD: usize = 3;

/// Runs the decoder `decoder` makes on a thread of its own, handing its output over in
/// chunks of [`CHUNK`] bytes (at most [`CHUNKS_AHEAD`] waiting), while `consume` reads them
/// here: for a heavy content, decoding (a bsdiff patch applied, a zstd frame) and hashing
/// and writing it (`Pool::store`) then take a core each instead of one core in turn. Errors
/// of the decoder reach `consume` as read errors, the [`Fail`] inside kept. If no thread can
/// start, both run here.
fn pipelined<'d, T>(
    decoder: &(dyn Fn() -> Result<Box<dyn Read + 'd>> + Sync),
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(CHUNKS_AHEAD);
    // Spent chunks go back to the decoder's thread, so that no chunk is allocated twice.
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let produce = move || {
            let mut dec = match decoder() {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(as_read_error(e)));
                    return;
                }
            };
            loop {
                let mut buf = back_rx.try_recv().unwrap_or_default();
                buf.resize(CHUNK, 0);
                let got = crate::core::tar::read_full(&mut dec, &mut buf).map(|n| {
                    buf.truncate(n);
                    buf
                });
                let last = !matches!(&got, Ok(b) if !b.is_empty());
                // A closed channel: the reader is done (or failed).
                if tx.send(got).is_err() || last {
                    return;
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("decode".into())
            .spawn_scoped(s, produce)
        {
            log::debug!("cannot start a thread to decode: {e}; decoding in this one");
            return consume(&mut decoder()?);
        }
        let mut reader = Chunks {
            rx,
            back: back_tx,
            buf: Vec::new(),
            at: 0,
            done: false,
        };
        consume(&mut reader)
        // Dropping the reader closes the channel: the decoder's thread stops.
    })
}

/// A read error carrying `e`'s [`Fail`], if it has one, for the reader that meets it.
fn as_read_error(e: anyhow::Error) -> std::io::Error {
    match e.downcast::<Fail>() {
        Ok(f) => std::io::Error::new(std::io::ErrorKind::InvalidData, f),
        Err(e) => std::io::Error::other(format!("{e:#}")),
    }
}

/// What a [`pipelined`] decoder hands over, as one stream.
struct Chunks {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    back: std::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    /// The decoder's end has been read.
    done: bool,
}

impl Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let spent = std::mem::take(&mut self.buf);
            if spent.capacity() > 0 {
                let _ = self.back.send(spent);
            }
            self.at = 0;
            match self.rx.recv() {
                Ok(Ok(b)) if !b.is_empty() => self.buf = b,
                Ok(Ok(_)) => self.done = true,
                // After an error, every read fails (the channel is closed then).
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("the decoding thread stopped")),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The content an error is about.
fn what(c: &Content) -> String {
    format!("content {}", hex::encode(c.sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(n: u8, size: u64, blob: u64, source: Source) -> Content {
        Content {
            sha256: [n; 32],
            size,
            data: None,
            source,
            codec: Codec::Zstd,
            blob: Some(([n; 32], blob)),
        }
    }

    fn delta(contents: Vec<Content>) -> Delta {
        Delta {
            contents,
            ..Delta::default()
        }
    }

    #[test]
    fn a_heavy_content_is_started_ahead_of_cheap_ones() {
        let d = delta(vec![
            content(1, 100, 50, Source::ZstdPatch { base: [9; 32] }),
            content(2, 100, 60, Source::Zstd),
            content(3, 40 << 20, 10 << 20, Source::Zstd),
        ]);
        assert_eq!(dispatch_ahead(&d, 0, 2), Some(110));
        assert_eq!(dispatch_ahead(&d, 1, 2), Some(60));
        // Not a heavy one.
        assert_eq!(dispatch_ahead(&d, 0, 1), None);
    }

    #[test]
    fn not_ahead_of_its_reference_nor_of_too_many_blob_bytes() {
        let patch = Source::Bsdiff { base: [2; 32] };
        let d = delta(vec![
            content(1, 100, 50, Source::Zstd),
            content(2, 100, 60, Source::Zstd),
            content(3, 40 << 20, 4096, patch),
        ]);
        assert_eq!(dispatch_ahead(&d, 0, 2), None, "its reference is content 2");
        let d = delta(vec![
            content(1, 9 << 20, LOOKAHEAD_BYTES, Source::Zstd),
            content(2, 100, 1, Source::Zstd),
            content(3, 40 << 20, 10 << 20, Source::Zstd),
        ]);
        assert_eq!(dispatch_ahead(&d, 0, 2), None, "over the lookahead");
        assert_eq!(dispatch_ahead(&d, 1, 2), Some(1));
        // A content of the base has no blob to start.
        let mut d = d;
        d.contents[2].source = Source::Base;
        d.contents[2].blob = None;
        assert_eq!(dispatch_ahead(&d, 1, 2), None);
    }
}
