//! Building a tree from a manifest and the pool: directories, hardlinks to pool objects,
//! symlinks and special files, all created relative to directory handles that were opened
//! without following any symlink, so no manifest path can leave the tree being built.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, bail};
use rustix::fs::FileType;

use crate::core::manifest::{Entry, Kind, Manifest};
use crate::core::path::split_parent;
use crate::core::progress::Progress;
use crate::fs::sys;
use crate::store::layout::Layout;
use crate::store::pool::Pool;
use rayon::prelude::*;

/// Directory handles kept open while building; beyond this the cache starts over.
const DIR_CACHE: usize = 256;
/// Entries made by one task, which keeps its own directory handles.
const CHUNK: usize = 512;
/// Threads per core for making entries.
const IO_THREADS_PER_CORE: usize = 4;

/// Threads for work that waits on metadata reads as much as on the CPU: more threads than
/// cores keep the cores busy on a cold cache.
pub(crate) fn io_threads() -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads() * IO_THREADS_PER_CORE)
        .build()
        .context("cannot start threads")
}

/// Work to do while a tree is built: [`build`] runs `work` on the calling thread while it
/// makes everything but the entries at the paths in `late`, which need what `work` makes;
/// those are made once `work` has succeeded.
pub(crate) struct During<'a> {
    pub late: HashSet<&'a [u8]>,
    pub work: &'a mut dyn FnMut() -> Result<()>,
}

/// Builds the tree of `m` as the new directory `name` in `parent`, which must not exist.
/// Regular files are hardlinks to their pool objects, or copies where `layout` says so.
/// Timestamps: regular files share the pool object's mtime (the epoch); directories,
/// symlinks and special files get the time they were built.
///
/// Directories are made first, in order (a parent sorts before its children); then every
/// other entry is made in parallel, in chunks that each keep their own directory handles.
/// With `subvolume`, the top is a new btrfs subvolume. With `during`, its work runs at the
/// same time (see [`During`]).
pub(crate) fn build(
    m: &Manifest,
    pool: &Pool,
    layout: &Layout,
    parent: BorrowedFd,
    name: &[u8],
    subvolume: bool,
    during: Option<During>,
) -> Result<()> {
    let top = make_top(m, parent, name, subvolume)?;
    let progress = Progress::items(m.entries.len() as u64, "staging");
    let (dirs, others): (Vec<&Entry>, Vec<&Entry>) =
        m.entries[1..].iter().partition(|e| e.is_dir());
    let make_dirs = || make_dirs(top.as_fd(), &dirs, &progress);
    let pool_threads = io_threads()?;
    let make_all = |entries: &[&Entry]| -> Result<()> {
        pool_threads.install(|| make_entries(top.as_fd(), entries, pool, layout, &progress))
    };
    match during {
        None => {
            make_dirs()?;
            make_all(&others)?;
        }
        Some(During { late, work }) => {
            let (late, early): (Vec<&Entry>, Vec<&Entry>) =
                others.into_iter().partition(|e| late.contains(&*e.path));
            let (built, worked) = std::thread::scope(|s| {
                let builder = s.spawn(|| -> Result<()> {
                    make_dirs()?;
                    make_all(&early)
                });
                let worked = work();
                (builder.join(), worked)
            });
            let built = built.unwrap_or_else(|_| Err(anyhow::anyhow!("a staging thread panicked")));
            // The work's error comes first: a build that failed because of it says less.
            worked?;
            built?;
            make_all(&late)?;
        }
    }
    progress.finish();
    Ok(())
}

/// Makes the top directory `name` in `parent` (a btrfs subvolume with `subvolume`) with the
/// metadata of `m`'s first entry, which must be the top (`.`).
fn make_top(m: &Manifest, parent: BorrowedFd, name: &[u8], subvolume: bool) -> Result<OwnedFd> {
    let top_entry = m.entries.first().context("empty manifest")?;
    if m.entries.len() > 1 && m.entries[0].path.as_ref() != b"." {
        bail!("manifest does not start with the top directory");
    }
    if subvolume {
        crate::fs::btrfs::create(parent, name)?;
    } else {
        sys::mkdirat(parent, name, 0o700, false)?;
    }
    let top = sys::open_dir_beneath(parent, name)?;
    sys::apply_meta_fd(top.as_fd(), &top_entry.meta).context("on the top directory")?;
    Ok(top)
}

/// Makes the directories `dirs` (in manifest order: parents first) under `top`, on this
/// thread.
fn make_dirs(top: BorrowedFd, dirs: &[&Entry], progress: &Progress) -> Result<()> {
    let mut cache = DirCache::new(top);
    for e in dirs {
        progress.inc(1);
        let (ppath, base) = split_parent(&e.path);
        let res: Result<OwnedFd> = (|| {
            let pfd = cache.get(ppath)?;
            sys::mkdirat(pfd, base, 0o700, false)?;
            let fd = sys::open_dir_beneath(pfd, base)?;
            sys::apply_meta_fd(fd.as_fd(), &e.meta)?;
            Ok(fd)
        })();
        let fd = res.with_context(|| format!("cannot create `{}`", e.display()))?;
        cache.put(&e.path, fd);
    }
    Ok(())
}

/// Makes the entries (no directories; their parents exist) under `top`, in chunks on the
/// current thread pool.
fn make_entries(
    top: BorrowedFd,
    entries: &[&Entry],
    pool: &Pool,
    layout: &Layout,
    progress: &Progress,
) -> Result<()> {
    entries
        .par_chunks(CHUNK)
        .try_for_each(|chunk| -> Result<()> {
            let mut cache = DirCache::new(top);
            for e in chunk {
                let (ppath, base) = split_parent(&e.path);
                make(e, pool, layout, cache.get(ppath)?, base)
                    .with_context(|| format!("cannot create `{}`", e.display()))?;
            }
            progress.inc(chunk.len() as u64);
            Ok(())
        })
}

/// Directory handles by path, opened beneath the top without following symlinks; starts
/// over when it holds [`DIR_CACHE`] of them.
struct DirCache<'a> {
    top: BorrowedFd<'a>,
    fds: HashMap<Box<[u8]>, OwnedFd>,
}

impl<'a> DirCache<'a> {
    fn new(top: BorrowedFd<'a>) -> Self {
        DirCache {
            top,
            fds: HashMap::new(),
        }
    }
    fn get(&mut self, path: &[u8]) -> Result<BorrowedFd<'_>> {
        if path == b"." {
            return Ok(self.top);
        }
        if !self.fds.contains_key(path) {
            let fd = sys::open_dir_beneath(self.top, path)?;
            self.put(path, fd);
        }
        Ok(self.fds[path].as_fd())
    }
    fn put(&mut self, path: &[u8], fd: OwnedFd) {
        if self.fds.len() >= DIR_CACHE {
            self.fds.clear();
        }
        self.fds.insert(path.into(), fd);
    }
}

/// Makes one entry that is not a directory as `base` in `pfd`.
pub(crate) fn make(
    e: &Entry,
    pool: &Pool,
    layout: &Layout,
    pfd: BorrowedFd,
    base: &[u8],
) -> Result<()> {
    match &e.kind {
        Kind::Dir => bail!("directories are made first"),
        Kind::File { .. } => {
            let id = e.object().expect("file");
            if layout.is_copy(&e.path) {
                pool.copy_to(&id, &e.meta, pfd, base)?;
            } else {
                pool.link(&id, pfd, base)?;
            }
        }
        Kind::Symlink { target } => {
            sys::symlinkat(target, pfd, base)?;
            sys::apply_meta_at(pfd, base, &e.meta, true)?;
        }
        Kind::Char { major, minor } | Kind::Block { major, minor } => {
            let ft = if matches!(e.kind, Kind::Char { .. }) {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            sys::mknodat(pfd, base, ft, 0o600, rustix::fs::makedev(*major, *minor))?;
            sys::apply_meta_at(pfd, base, &e.meta, false)?;
        }
        Kind::Fifo => {
            sys::mknodat(pfd, base, FileType::Fifo, 0o600, 0)?;
            sys::apply_meta_at(pfd, base, &e.meta, false)?;
        }
    }
    Ok(())
}
