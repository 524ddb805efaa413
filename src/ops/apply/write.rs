//! Writing the new objects: blobs read in order from the stream, decoded (zstd, zstd
//! patch-from, bsdiff) by worker threads against references from the base tree or the pool,
//! and each content published to the pool after its hash is checked.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

use super::plan::{BasePaths, Plan};
use super::read::{Blob, Members, expect_end, read_blob};
use crate::core::codec::{MAX_REFERENCE, WINDOW_LOG_MAX};
use crate::core::config::Config;
use crate::core::delta::{Content, Delta, Source};
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

/// Reads a whole object's bytes and checks them against the content hash they must have.
fn read_checked(pool: &Pool, id: &ObjectId, sha: &Hash) -> Result<Vec<u8>> {
    let fd = pool.open_object(id)?;
    check_reference_size(sys::fstat(fd.as_fd())?.st_size as u64, sha)?;
    let data = read_all(fd.as_fd()).context("cannot read a patch base")?;
    let got: Hash = Sha256::digest(&data).into();
    if &got != sha {
        return Err(Fail::Integrity(format!(
            "patch base object {} in the pool is corrupt (run `treeswap verify --full`)",
            hex::encode(id)
        ))
        .into());
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

fn read_all(fd: BorrowedFd) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
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
        if sys::fstat(fd.as_fd()).ok()?.st_size as u64 > MAX_REFERENCE {
            return None;
        }
        let data = read_all(fd.as_fd()).ok()?;
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

/// Writes every new object. Blobs are read from the stream in delta order, and each content
/// is decoded and written by a worker thread as soon as its blob is in, so that the cold reads
/// of references overlap. References and contents of the base are read from `base_tree` (the
/// base's read-only snapshot) where it has them, else from the pool. A patch against a
/// content still being made waits until the contents in flight are done.
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
    let mut next = 0;
    while next < d.contents.len() {
        threads.in_place_scope(|s| w.round(s, members, &mut next, spool))?;
        if let Some(e) = w.failed.lock().expect("poisoned").take() {
            return Err(e);
        }
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

/// What the main thread and the workers share while the new objects are written.
struct Writer<'a> {
    d: &'a Delta,
    plan: &'a Plan,
    pool: &'a Pool,
    files: BaseFiles<'a>,
    /// Where each content can be read from once it exists: an object of the base or one this
    /// apply wrote.
    have: Mutex<HashMap<Hash, ObjectId>>,
    /// The first failure of a worker; the main thread stops handing out contents.
    failed: Mutex<Option<anyhow::Error>>,
    progress: Progress,
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
            failed: Mutex::new(None),
            progress: Progress::items(d.contents.len() as u64, "writing"),
        }
    }

    /// The object that holds content `sha`, if one exists yet.
    fn object_of(&self, sha: &Hash) -> Option<ObjectId> {
        self.have.lock().expect("poisoned").get(sha).copied()
    }

    /// One round, from content `next` on: contents are handed to workers until one needs a
    /// content still in flight, or the bytes in flight reach the limit; the round ends when
    /// all are done (the scope `s` waits for them).
    fn round<'s>(
        &'s self,
        s: &rayon::Scope<'s>,
        members: &mut Members,
        next: &mut usize,
        spool: &dyn Fn() -> Result<std::fs::File>,
    ) -> Result<()> {
        let mut in_flight: HashSet<Hash> = HashSet::new();
        let mut bytes = 0u64;
        while let Some(c) = self.d.contents.get(*next) {
            if self.failed.lock().expect("poisoned").is_some() {
                break;
            }
            let waits = c.source.base().is_some_and(|r| in_flight.contains(r));
            let cost = self.cost(c);
            if !in_flight.is_empty() && (waits || bytes.saturating_add(cost) > IN_FLIGHT_BYTES) {
                break;
            }
            *next += 1;
            let blob = match c.blob {
                Some(_) => Some(read_blob(members, c, spool)?),
                None => None,
            };
            let Some(metas) = self.plan.metas.get(&c.sha256).filter(|m| !m.is_empty()) else {
                self.skip(c);
                continue;
            };
            self.prefetch(c);
            bytes = bytes.saturating_add(cost);
            in_flight.insert(c.sha256);
            s.spawn(move |_| self.write_one(c, blob.as_ref(), metas));
        }
        Ok(())
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
        match &c.source {
            Source::Base => self.copy_base_content(c, meta0)?,
            Source::Zstd | Source::ZstdPatch { .. } | Source::Bsdiff { .. } => {
                let reference = c.source.base().map(|r| self.reference(r)).transpose()?;
                let blob = blob.expect("blob").reader();
                let mut dec = crate::core::codec::decoder_of(c, blob, reference.as_deref())?;
                self.pool
                    .store_bounded(&mut dec, meta0, c.size, &c.sha256, c.data)
                    .with_context(|| what(c))?;
            }
        }
        crate::core::failpoint::hit("apply-after-object");
        for (meta, _) in rest {
            self.copy_of(c, id0, meta)?;
        }
        Ok(*id0)
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
        match self.files.read(sha) {
            Some(data) => Ok(data),
            None => read_checked(self.pool, &id, sha),
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

/// The content an error is about.
fn what(c: &Content) -> String {
    format!("content {}", hex::encode(c.sha256))
}
