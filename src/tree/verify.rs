//! Checking a tree on disk against its manifest, entry by entry.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::Result;
use rayon::prelude::*;

use crate::core::manifest::{Entry, Kind, Manifest};
use crate::core::object::ObjectId;
use crate::store::layout::Layout;
use crate::store::pool::Pool;
use crate::tree::scan;

/// Compares the tree under `tree` with `m` and returns every difference, each naming its
/// path. The fast check compares metadata and that each regular file is (a copy of) its
/// pool object; `full` also re-hashes every object the tree uses.
pub(crate) fn verify_tree(
    tree: BorrowedFd,
    m: &Manifest,
    pool: &Pool,
    layout: &Layout,
    full: bool,
) -> Result<Vec<String>> {
    let walked = walk_tree(tree, m, layout)?;
    let mut problems = walked.problems;
    let ids = check_links(m, pool, &walked.linked, &mut problems)?;
    if full {
        let results: Vec<Result<Vec<String>>> =
            ids.par_iter().map(|id| pool.check_object(id)).collect();
        for r in results {
            problems.extend(r?);
        }
        let results: Vec<Result<Option<String>>> = walked
            .copies
            .par_iter()
            .map(|&(i, dev, ino)| check_copy(tree, &m.entries[i], (dev, ino)))
            .collect();
        for r in results {
            problems.extend(r?);
        }
    }
    Ok(problems)
}

/// What walking a tree against its manifest found.
struct Walked {
    /// Extra, missing and differing entries, sorted by path.
    problems: Vec<String>,
    /// Files that should be links to their objects, with the inode found (entry index,
    /// device, inode: compact, as a million of them may be kept).
    linked: Vec<(u32, u64, u64)>,
    /// Files that are private copies, not links, with the inode found: compared by content in
    /// a full check.
    copies: Vec<(usize, u64, u64)>,
}

/// Walks the tree and looks each entry up in the manifest: no second manifest in memory.
fn walk_tree(tree: BorrowedFd, m: &Manifest, layout: &Layout) -> Result<Walked> {
    let a = &m.entries;
    let mut seen = vec![false; a.len()];
    let mut found: Vec<(Vec<u8>, String)> = Vec::new();
    let (mut linked, mut copies) = (Vec::new(), Vec::new());
    // A socket has no entry (a manifest cannot hold one), but a tree that has one is not its
    // manifest: a guest made it.
    let mut sockets: Vec<Vec<u8>> = Vec::new();
    let mut visit = |y: Entry, ino: (u64, u64)| -> Result<bool> {
        let Some(i) = m.index(&y.path) else {
            found.push((y.path.to_vec(), format!("extra: {}", y.display())));
            // The contents of an extra directory are extra too; naming it is enough.
            return Ok(false);
        };
        seen[i] = true;
        let x = &a[i];
        let mut p = Vec::new();
        compare(x, &y, &mut p);
        found.extend(p.into_iter().map(|s| (y.path.to_vec(), s)));
        if matches!(x.kind, Kind::File { .. }) && matches!(y.kind, Kind::File { .. }) {
            if layout.is_copy(&x.path) {
                copies.push((i, ino.0, ino.1));
            } else {
                linked.push((i as u32, ino.0, ino.1));
            }
        }
        Ok(x.is_dir() && y.is_dir())
    };
    scan::walk_all(tree, &mut visit, &mut |path| {
        sockets.push(path.to_vec());
        Ok(())
    })?;
    for path in sockets {
        let p = crate::core::path::display(&path);
        let problem = match m.index(&path) {
            Some(i) => {
                seen[i] = true;
                format!(
                    "wrong type: {p} (is a socket, expected a {})",
                    a[i].kind.name()
                )
            }
            None => format!("extra: {p} (a socket)"),
        };
        found.push((path, problem));
    }
    for (i, e) in a.iter().enumerate() {
        if !seen[i] {
            found.push((e.path.to_vec(), format!("missing: {}", e.display())));
        }
    }
    found.sort();
    Ok(Walked {
        problems: found.into_iter().map(|(_, s)| s).collect(),
        linked,
        copies,
    })
}

/// Checks that each linked file is its pool object (or one of the object's extra copies),
/// adding a problem for each that is not. Returns the objects' ids, sorted, once each.
fn check_links(
    m: &Manifest,
    pool: &Pool,
    linked: &[(u32, u64, u64)],
    problems: &mut Vec<String>,
) -> Result<Vec<ObjectId>> {
    let a = &m.entries;
    // The ids, sorted, with the index in `linked` of the file that wants each.
    let mut wanted: Vec<(ObjectId, u32)> = linked
        .par_iter()
        .enumerate()
        .map(|(k, &(i, _, _))| (a[i as usize].object().expect("file"), k as u32))
        .collect();
    wanted.par_sort_unstable();
    let (dev, inodes) = pool.primary_inodes(&wanted)?;
    for (&(id, k), &ino) in wanted.iter().zip(&inodes) {
        let (i, have_dev, have_ino) = linked[k as usize];
        let have = (have_dev, have_ino);
        let e = &a[i as usize];
        match ino {
            Some(ino) if (dev, ino) == have => {}
            None if !pool.has(&id)? => problems.push(format!(
                "missing object: {} (pool object {} is gone)",
                e.display(),
                hex::encode(id)
            )),
            _ if pool.inodes(&id)?.contains(&have) => {}
            _ => problems.push(format!(
                "modified: {} (not a link to its pool object)",
                e.display()
            )),
        }
    }
    drop(inodes);
    let mut ids: Vec<ObjectId> = wanted.into_iter().map(|(id, _)| id).collect();
    ids.dedup();
    Ok(ids)
}

/// Re-reads a file that is a copy of its object and compares content and extended
/// attributes with its entry. The walk saw it as the regular file `ino` (device, inode); a
/// guest may have put something else there since, which is reported, never waited on.
fn check_copy(tree: BorrowedFd, e: &Entry, ino: (u64, u64)) -> Result<Option<String>> {
    let Kind::File { sha256, size } = &e.kind else {
        return Ok(None);
    };
    let Some((fd, st)) = scan::open_regular(tree, &e.path, ino)? else {
        return Ok(Some(format!(
            "modified: {} (changed while it was being checked)",
            e.display()
        )));
    };
    // No further than one byte past the entry's size, however long a guest makes it.
    let (_, got) = crate::fs::hash::hash_fd_upto(fd.as_fd(), &st, size.saturating_add(1))?;
    if &got != sha256 {
        return Ok(Some(format!("modified: {} (content)", e.display())));
    }
    if crate::fs::sys::fd_xattrs(fd.as_fd())? != e.meta.xattrs {
        return Ok(Some(format!("wrong xattrs: {}", e.display())));
    }
    Ok(None)
}

/// Compares an entry found on disk with the one wanted, as [`verify_tree`] does; regular
/// files by metadata and size only.
pub(crate) fn compare(want: &Entry, have: &Entry, problems: &mut Vec<String>) {
    let p = want.display();
    if want.kind.name() != have.kind.name() {
        problems.push(format!(
            "wrong type: {p} (is a {}, expected a {})",
            have.kind.name(),
            want.kind.name()
        ));
        return;
    }
    if want.meta.mode != have.meta.mode && !matches!(want.kind, Kind::Symlink { .. }) {
        problems.push(format!(
            "wrong mode: {p} (0o{:o}, expected 0o{:o})",
            have.meta.mode, want.meta.mode
        ));
    }
    if (want.meta.uid, want.meta.gid) != (have.meta.uid, have.meta.gid) {
        problems.push(format!(
            "wrong owner: {p} ({}:{}, expected {}:{})",
            have.meta.uid, have.meta.gid, want.meta.uid, want.meta.gid
        ));
    }
    match (&want.kind, &have.kind) {
        (Kind::File { size: s1, .. }, Kind::File { size: s2, .. }) => {
            if s1 != s2 {
                problems.push(format!("modified: {p} (size {s2}, expected {s1})"));
            }
            // A file's extended attributes live on its pool object, checked through it.
            return;
        }
        (Kind::Symlink { target: t1 }, Kind::Symlink { target: t2 }) if t1 != t2 => {
            problems.push(format!(
                "modified: {p} (symlink to `{}`, expected `{}`)",
                crate::core::path::display(t2),
                crate::core::path::display(t1)
            ));
        }
        (w, h) if w != h => problems.push(format!("modified: {p} (device numbers)")),
        _ => {}
    }
    if want.meta.xattrs != have.meta.xattrs {
        problems.push(format!("wrong xattrs: {p}"));
    }
}
