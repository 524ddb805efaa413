//! Staging by btrfs snapshot: on btrfs in reflink mode, every tree is a subvolume, and each
//! installed version also keeps a read-only snapshot of itself as it was verified
//! (`snapshots/<V>`). An apply then starts `staging/<new>` as a writable snapshot of the base's
//! read-only one, which costs the same for ten files or a million, and changes only what the
//! delta changes; verification checks those entries. The rest of the tree is exactly the
//! verified base, which no guest can have written to, as the snapshot is read-only.
//!
//! The subvolume ioctls are in `fs::btrfs`; the snapshots a root keeps, in `store::root`.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use rustix::fs::{FileType, Mode};

use crate::core::manifest::{Entry, Kind, Manifest};
use crate::core::path::split_parent;
use crate::fs::sys;
use crate::store::layout::Layout;
use crate::store::pool::Pool;

/// Turns the snapshot of the base tree open as `top` into the tree of `m`: removes the
/// `removed` paths and re-makes every `changed` entry, checking each against `m` as soon as
/// it is made (nothing made later changes what is checked of it), then checks that each
/// removed path is gone.
/// `write`, which makes the new objects, runs on the calling thread meanwhile; the regular
/// files that need them are made once it is done.
/// Returns the problems found.
#[allow(clippy::too_many_arguments)]
pub(crate) fn change(
    top: BorrowedFd,
    m: &Manifest,
    changed: &[Entry],
    removed: &[Box<[u8]>],
    pool: &Pool,
    layout: &Layout,
    write: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<String>> {
    use rayon::prelude::*;
    // Lookups in a big cold tree wait on the disk: many threads keep several in flight.
    let threads = crate::tree::stage::io_threads()?;
    // Regular files need the new objects, which `write` makes on this thread meanwhile;
    // everything else is made first, on the others.
    let (files, others): (Vec<&Entry>, Vec<&Entry>) = changed
        .iter()
        .partition(|e| matches!(e.kind, Kind::File { .. }));
    let (first, written) = std::thread::scope(|s| {
        let first = s.spawn(|| {
            let r = threads.install(|| remove_and_make(top, removed, &others, pool, layout));
            if r.is_ok() {
                log::debug!("removed what the delta removes and made what is not a regular file");
            }
            r
        });
        let written = write();
        (first.join(), written)
    });
    written?;
    let mut problems =
        first.unwrap_or_else(|_| Err(anyhow::anyhow!("a staging thread panicked")))?;
    threads.install(|| -> Result<()> {
        let found = files
            .par_iter()
            .map(|e| make_changed(top, e, pool, layout))
            .collect::<Result<Vec<_>>>()?;
        problems.extend(found.into_iter().flatten());
        Ok(())
    })?;
    for p in removed {
        if m.find(p).is_some() {
            continue;
        }
        let (parent, base) = split_parent(p);
        if let Ok(pfd) = sys::open_dir_beneath(top, parent)
            && sys::lstatat(pfd.as_fd(), base)?.is_some()
        {
            problems.push(format!("extra: {}", crate::core::path::display(p)));
        }
    }
    Ok(problems)
}

/// Removes the `removed` paths and makes (and checks) the changed entries `others` (no
/// regular files), parents before children. Returns the problems found.
fn remove_and_make(
    top: BorrowedFd,
    removed: &[Box<[u8]>],
    others: &[&Entry],
    pool: &Pool,
    layout: &Layout,
) -> Result<Vec<String>> {
    use rayon::prelude::*;
    // Removed paths whose parent is not removed too (removing a directory removes what
    // is in it), independent of each other.
    let tops: Vec<&Box<[u8]>> = removed
        .iter()
        .filter(|p| {
            let parent = split_parent(p).0;
            parent == b"." || removed.binary_search_by(|q| (**q).cmp(parent)).is_err()
        })
        .collect();
    tops.par_iter().try_for_each(|p| -> Result<()> {
        let (parent, base) = split_parent(p);
        let pfd = sys::open_dir_beneath(top, parent)?;
        sys::remove_tree_at(pfd.as_fd(), base)
            .with_context(|| format!("cannot remove `{}`", crate::core::path::display(p)))
    })?;
    // Changed entries, depth by depth (parents before their children), each depth in
    // parallel.
    let depth = |e: &Entry| e.path.iter().filter(|&&b| b == b'/').count();
    let mut order: Vec<&Entry> = others.to_vec();
    order.sort_by_key(|e| (&*e.path != b".", depth(e)));
    let mut problems = Vec::new();
    for level in order.chunk_by(|a, b| (&*a.path != b".", depth(a)) == (&*b.path != b".", depth(b)))
    {
        let found = level
            .par_iter()
            .map(|e| make_changed(top, e, pool, layout))
            .collect::<Result<Vec<_>>>()?;
        problems.extend(found.into_iter().flatten());
    }
    Ok(problems)
}

/// Makes the changed entry `e` in the snapshot open as `top`, where its parent exists, and
/// checks it against `e`. Returns the problems found.
fn make_changed(top: BorrowedFd, e: &Entry, pool: &Pool, layout: &Layout) -> Result<Vec<String>> {
    if &*e.path == b"." {
        sys::set_meta_exact_fd(top, &e.meta).context("on the top directory")?;
        return Ok(check(e, crate::tree::scan::entry_at(top, b".", b".")?));
    }
    let (parent, base) = split_parent(&e.path);
    let res = (|| -> Result<Vec<String>> {
        let pfd = sys::open_dir_beneath(top, parent)?;
        make_in(pfd.as_fd(), base, e, pool, layout)?;
        Ok(check(
            e,
            crate::tree::scan::entry_at(pfd.as_fd(), base, &e.path)?,
        ))
    })();
    res.with_context(|| format!("cannot make `{}`", e.display()))
}

/// The problems of `found` (what is at `e`'s path) against `e`.
fn check(e: &Entry, found: Option<Entry>) -> Vec<String> {
    let mut problems = Vec::new();
    match found {
        Some(y) => crate::tree::verify::compare(e, &y, &mut problems),
        None => problems.push(format!("missing: {}", e.display())),
    }
    problems
}

/// Makes the changed entry `e` as `base` in its parent `pfd`, replacing what is there.
fn make_in(pfd: BorrowedFd, base: &[u8], e: &Entry, pool: &Pool, layout: &Layout) -> Result<()> {
    let st = sys::lstatat(pfd, base)?;
    let is_dir = st
        .as_ref()
        .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
    match (&e.kind, st) {
        // A directory stays (its entries are changed one by one); only its metadata.
        (Kind::Dir, Some(_)) if is_dir => {
            let fd = sys::open_dir_beneath(pfd, base)?;
            sys::set_meta_exact_fd(fd.as_fd(), &e.meta)
        }
        (Kind::Dir, old) => {
            if old.is_some() {
                sys::remove_tree_at(pfd, base)?;
            }
            sys::mkdirat(pfd, base, 0o700, false)?;
            let fd = sys::open_dir_beneath(pfd, base)?;
            sys::apply_meta_fd(fd.as_fd(), &e.meta)
        }
        (_, old) => {
            // A regular file that stays one: its inode gets the new content and metadata.
            if let (Kind::File { .. }, Some(st)) = (&e.kind, &old)
                && FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_nlink == 1
                && layout.is_copy(&e.path)
                && replace_file(pfd, base, e, pool)?
            {
                return Ok(());
            }
            if old.is_some() {
                sys::remove_tree_at(pfd, base)?;
            }
            crate::tree::stage::make(e, pool, layout, pfd, base)
        }
    }
}

/// Gives the regular file `base` in `pfd` (one name, a copy) the content and metadata of the
/// file entry `e`, in place: cheaper on btrfs than removing it and making a new one, which
/// frees and allocates an inode and edits the directory. Returns `false` where it cannot (the
/// file cannot be opened for writing, or its blocks cannot be shared); the caller then
/// replaces the file.
fn replace_file(pfd: BorrowedFd, base: &[u8], e: &Entry, pool: &Pool) -> Result<bool> {
    use rustix::fs::OFlags;
    let Ok(fd) = sys::openat(
        pfd,
        base,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Ok(false);
    };
    // It was a regular file with one name when looked at; the snapshot is ours alone.
    let st = sys::fstat(fd.as_fd())?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
        return Ok(false);
    }
    pool.clone_over(
        &e.object().expect("file"),
        &e.meta,
        fd.as_fd(),
        st.st_size as u64,
    )
}
