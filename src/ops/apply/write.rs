//! Writing the new objects: blobs read in order from the stream, decoded (zstd, zstd
//! patch-from, bsdiff) by worker threads against references from the base tree or the pool,
//! and each content published to the pool after its hash is checked.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

use super::plan::{BasePaths, Plan};
use super::read::read_blob;
use crate::core::delta::{Content, Delta, Source};
use crate::core::error::Fail;
use crate::core::object::{Hash, Meta, ObjectId};
use crate::fs::hash::FdReader;
use crate::store::pool::Pool;

/// Reads a whole object's bytes and checks them against the content hash they must have.
fn read_checked(pool: &Pool, id: &ObjectId, sha: &Hash) -> Result<Vec<u8>> {
    let fd = pool.open_object(id)?;
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
        let data = read_all(self.open(sha)?.as_fd()).ok()?;
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

/// The contents being decoded at once hold at most this many bytes (blobs plus results),
/// unless one content alone is larger.
const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// Writes every new object. Blobs are read from the stream in delta order, and each content
/// is decoded and written by a worker thread as soon as its blob is in, so that the cold reads
/// of references overlap. References and contents of the base are read from `base_tree` (the
/// base's read-only snapshot) where it has them, else from the pool. A patch against a
/// content still being made waits until the contents in flight are done.
pub(super) fn materialize<R: Read>(
    d: &Delta,
    plan: &Plan,
    pool: &Pool,
    base_tree: Option<&OwnedFd>,
    entries: &mut tar::Entries<R>,
) -> Result<()> {
    let files = BaseFiles {
        tree: base_tree,
        paths: &plan.base_paths,
        used: 0.into(),
    };
    use std::sync::Mutex;
    // Where each content can be read from once it exists: an object of the base or one this
    // apply wrote.
    let have: Mutex<HashMap<Hash, ObjectId>> = Mutex::new(plan.base_content.clone());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let progress = crate::core::progress::Progress::items(d.contents.len() as u64, "writing");
    // From a snapshot, workers wait on cold reads of the snapshot's metadata: many keep
    // several in flight. Otherwise one per core, and the main thread announces each
    // reference to the kernel (`POSIX_FADV_WILLNEED`) before handing its content out.
    let threads = match base_tree {
        Some(_) => crate::tree::stage::io_threads()?,
        None => rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .build()
            .context("cannot start threads")?,
    };
    let mut next = 0;
    while next < d.contents.len() {
        // One round: contents are handed to workers until one needs a content still in
        // flight, or the bytes in flight reach the limit; the round ends when all are done.
        threads.in_place_scope(|s| -> Result<()> {
            let mut in_flight: HashSet<Hash> = HashSet::new();
            let mut bytes = 0u64;
            while let Some(c) = d.contents.get(next) {
                if failed.lock().expect("poisoned").is_some() {
                    break;
                }
                let waits = c.source.base().is_some_and(|r| in_flight.contains(r));
                if !in_flight.is_empty() && (waits || bytes >= IN_FLIGHT_BYTES) {
                    break;
                }
                next += 1;
                let blob = match c.blob {
                    Some(_) => Some(read_blob(entries, c)?),
                    None => None,
                };
                let Some(metas) = plan.metas.get(&c.sha256).filter(|m| !m.is_empty()) else {
                    // Every object this content makes is in the pool already; later patches
                    // may still use it as their reference.
                    progress.inc(1);
                    if let Some(id) = plan.existing.get(&c.sha256) {
                        have.lock()
                            .expect("poisoned")
                            .entry(c.sha256)
                            .or_insert(*id);
                    }
                    continue;
                };
                let source = match c.source {
                    Source::Base => Some(c.sha256),
                    _ => c.source.base().copied(),
                };
                if base_tree.is_none()
                    && let Some(id) =
                        source.and_then(|h| have.lock().expect("poisoned").get(&h).copied())
                    && let Ok(fd) = pool.open_object(&id)
                {
                    let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::WillNeed);
                }
                bytes = bytes
                    .saturating_add(blob.as_ref().map_or(0, |b| b.len() as u64))
                    .saturating_add(c.size);
                in_flight.insert(c.sha256);
                let (have, failed, progress, files) = (&have, &failed, &progress, &files);
                s.spawn(move |_| {
                    match write_content(c, blob.as_deref(), metas, have, pool, files) {
                        Ok(id) => {
                            have.lock().expect("poisoned").insert(c.sha256, id);
                        }
                        Err(e) => {
                            failed.lock().expect("poisoned").get_or_insert(e);
                        }
                    }
                    progress.inc(1);
                });
            }
            Ok(())
        })?;
        if let Some(e) = failed.lock().expect("poisoned").take() {
            return Err(e);
        }
    }
    progress.finish();
    if base_tree.is_some() {
        log::debug!(
            "read {} of the base's contents from its snapshot",
            files.used.into_inner()
        );
    }
    Ok(())
}

/// Makes the objects `metas` (at least one) of content `c` from its blob or reference;
/// returns the first one's id.
fn write_content(
    c: &Content,
    blob: Option<&[u8]>,
    metas: &[(Meta, ObjectId)],
    have: &std::sync::Mutex<HashMap<Hash, ObjectId>>,
    pool: &Pool,
    files: &BaseFiles,
) -> Result<ObjectId> {
    let have = |sha: &Hash| have.lock().expect("poisoned").get(sha).copied();
    let ((meta0, id0), rest) = metas.split_first().expect("an object to make");
    let what = || format!("content {}", hex::encode(c.sha256));
    let reference = |sha: &Hash| -> Result<Vec<u8>> {
        let id =
            have(sha).ok_or_else(|| anyhow!("reference {} is not available", hex::encode(sha)))?;
        match files.read(sha) {
            Some(data) => Ok(data),
            None => read_checked(pool, &id, sha),
        }
    };
    let copy_of = |id: &ObjectId, meta: &Meta| -> Result<()> {
        let src = pool.open_object(id)?;
        pool.store(
            &mut FdReader {
                fd: src.as_fd(),
                off: 0,
            },
            meta,
            c.size,
            &c.sha256,
        )
        .with_context(what)?;
        Ok(())
    };
    match &c.source {
        Source::Base => {
            let id = have(&c.sha256)
                .ok_or_else(|| anyhow!("content {} is not available", hex::encode(c.sha256)))?;
            // From the base tree's file if it has the content (`store` checks it), else
            // from the pool.
            let from_tree = files.open(&c.sha256).map(|fd| {
                let mut src = FdReader {
                    fd: fd.as_fd(),
                    off: 0,
                };
                pool.store(&mut src, meta0, c.size, &c.sha256)
            });
            match from_tree {
                Some(Ok(_)) => files.used_one(),
                Some(Err(e)) => {
                    log::debug!("{e:#}; reading the pool");
                    copy_of(&id, meta0)?;
                }
                None => copy_of(&id, meta0)?,
            }
        }
        Source::Zstd | Source::ZstdPatch { .. } => {
            let reference = c.source.base().map(reference).transpose()?;
            let blob = blob.expect("blob");
            let mut dec =
                crate::core::codec::stream(&c.source, blob, reference.as_deref(), c.size)?;
            pool.store(&mut dec, meta0, c.size, &c.sha256)
                .with_context(what)?;
        }
        Source::Bsdiff { base } => {
            let reference = reference(base)?;
            let out = crate::core::codec::bsdiff_apply(&reference, blob.expect("blob"), c.size)?;
            pool.store(&mut &out[..], meta0, c.size, &c.sha256)
                .with_context(what)?;
        }
    }
    crate::core::failpoint::hit("apply-after-object");
    for (meta, _) in rest {
        copy_of(id0, meta)?;
    }
    Ok(*id0)
}
