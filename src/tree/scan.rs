//! Reading a directory tree into a manifest: a walk that never follows a symlink, and a
//! parallel pass that hashes each distinct inode once.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use rustix::fs::FileType;
use rustix::io::Errno;

use crate::core::manifest::{Entry, Kind, Manifest};
use crate::core::object::Hash;
use crate::core::object::Meta;
use crate::core::path::display;
use crate::core::progress::Progress;
use crate::fs::{hash, sys};

/// What the hashing pass hands to a caller for each distinct regular file: the open file
/// (positioned anywhere), its metadata, size and content hash.
pub(crate) type FileHook<'a> = &'a (dyn Fn(BorrowedFd, &Meta, u64, &Hash) -> Result<()> + Sync);

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent == b"." {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
        p.extend_from_slice(parent);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// Reads `dir` into a manifest: every regular file is read and hashed (and its extended
/// attributes read), and `hook` sees each distinct inode.
pub(crate) fn scan(dir: &Path, hook: Option<FileHook>) -> Result<Manifest> {
    let top = sys::open_dir(dir)?;
    scan_fd(top.as_fd(), hook).with_context(|| format!("while reading `{}`", dir.display()))
}

fn scan_fd(top: BorrowedFd, hook: Option<FileHook>) -> Result<Manifest> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut inodes: Vec<(u64, u64)> = Vec::new();
    walk(top, &mut |e, ino| {
        entries.push(e);
        inodes.push(ino);
        Ok(true)
    })?;
    // Sorted by path through a permutation, applied in place: no second copy of the entries.
    let mut order: Vec<u32> = (0..entries.len() as u32).collect();
    order.par_sort_unstable_by(|&x, &y| entries[x as usize].path.cmp(&entries[y as usize].path));
    permute(&mut entries, &mut inodes, order);
    hash_files(top, &mut entries, &inodes, hook)?;
    let mut manifest = Manifest {
        version: None,
        entries,
    };
    manifest.normalize()?;
    Ok(manifest)
}

/// Reorders both vectors so that position `i` holds what was at `order[i]`.
fn permute(entries: &mut [Entry], inodes: &mut [(u64, u64)], mut order: Vec<u32>) {
    for i in 0..order.len() {
        // Follow the cycle through `i`; a done position points to itself.
        let mut cur = i;
        loop {
            let next = order[cur] as usize;
            order[cur] = cur as u32;
            if next == i || next == cur {
                break;
            }
            entries.swap(cur, next);
            inodes.swap(cur, next);
            cur = next;
        }
    }
}

/// What [`walk`] calls for each entry, with its device and inode; for a directory, whether to
/// descend into it.
pub(crate) type Visit<'a> = &'a mut dyn FnMut(Entry, (u64, u64)) -> Result<bool>;

/// What [`walk_all`] calls for the path of each socket, which has no entry.
pub(crate) type Sockets<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

/// Walks the tree under `top` without following any symlink: the top (`.`) first, then every
/// entry, a directory before its children but in no other order. Regular files get a zero
/// hash and no extended attributes; sockets are skipped with a warning.
pub(crate) fn walk(top: BorrowedFd, visit: Visit) -> Result<()> {
    walk_all(top, visit, &mut |path| {
        log::warn!("skipping socket `{}`", display(path));
        Ok(())
    })
}

/// [`walk`], handing the path of each socket to `sockets` instead of warning: a tree that
/// must be exactly its manifest (`verify`) reports them.
pub(crate) fn walk_all(top: BorrowedFd, visit: Visit, sockets: Sockets) -> Result<()> {
    let st = sys::fstat(top).context("cannot stat the top directory")?;
    visit(top_entry(top, &st)?, (st.st_dev, st.st_ino))?;
    let mut pending: Vec<Vec<u8>> = vec![b".".to_vec()];
    while let Some(rel) = pending.pop() {
        let fd = if rel == b"." {
            None
        } else {
            // Piece by piece past 3 KiB: a guest's layer may nest deeper than PATH_MAX.
            Some(
                crate::fs::guestfs::open_dir_deep(top, &rel)
                    .with_context(|| format!("cannot open directory `{}`", display(&rel)))?,
            )
        };
        let dfd = fd.as_ref().map(|f| f.as_fd()).unwrap_or(top);
        let names = sys::read_dir(dfd).with_context(|| format!("in `{}`", display(&rel)))?;
        for name in names {
            let path = join(&rel, &name);
            let Some(st) = sys::lstatat(dfd, &name)? else {
                bail!("`{}` vanished while it was being read", display(&path));
            };
            let ino = (st.st_dev, st.st_ino);
            if FileType::from_raw_mode(st.st_mode) == FileType::Socket {
                sockets(&path)?;
                continue;
            }
            let Some(e) = entry_of(dfd, &name, path, &st)? else {
                continue;
            };
            if e.is_dir() {
                let path = e.path.to_vec();
                if visit(e, ino)? {
                    pending.push(path);
                }
            } else {
                visit(e, ino)?;
            }
        }
    }
    Ok(())
}

fn top_entry(top: BorrowedFd, st: &rustix::fs::Stat) -> Result<Entry> {
    Ok(Entry {
        path: (*b".").into(),
        meta: sys::meta_of(st, sys::fd_xattrs(top)?),
        kind: Kind::Dir,
    })
}

/// The entry [`walk`] makes of `name` in `dfd` (at `path` in the tree), given its `lstat`;
/// `None` for a socket, which is skipped with a warning.
fn entry_of(
    dfd: BorrowedFd,
    name: &[u8],
    path: Vec<u8>,
    st: &rustix::fs::Stat,
) -> Result<Option<Entry>> {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let sub = sys::open_dir_beneath(dfd, name)?;
            return Ok(Some(Entry {
                path: path.into(),
                meta: sys::meta_of(st, sys::fd_xattrs(sub.as_fd())?),
                kind: Kind::Dir,
            }));
        }
        FileType::RegularFile => {
            return Ok(Some(Entry {
                path: path.into(),
                meta: sys::meta_of(st, Vec::new()),
                kind: Kind::File {
                    size: st.st_size as u64,
                    sha256: [0; 32],
                },
            }));
        }
        FileType::Symlink => {
            let target = sys::readlinkat(dfd, name)?.with_context(|| {
                format!("`{}` vanished while it was being read", display(&path))
            })?;
            Kind::Symlink {
                target: target.into(),
            }
        }
        FileType::CharacterDevice => Kind::Char {
            major: rustix::fs::major(st.st_rdev),
            minor: rustix::fs::minor(st.st_rdev),
        },
        FileType::BlockDevice => Kind::Block {
            major: rustix::fs::major(st.st_rdev),
            minor: rustix::fs::minor(st.st_rdev),
        },
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => {
            log::warn!("skipping socket `{}`", display(&path));
            return Ok(None);
        }
        other => bail!("`{}` has an unknown file type {other:?}", display(&path)),
    };
    let mut meta = sys::meta_of(st, sys::xattrs_at(dfd, name)?);
    if matches!(kind, Kind::Symlink { .. }) {
        meta.mode = 0o777;
    }
    Ok(Some(Entry {
        path: path.into(),
        meta,
        kind,
    }))
}

/// The entry [`walk`] would make of `name` in `dfd`, or `None` if there is none; `path` is
/// its path in the tree, `.` for the directory `dfd` itself.
pub(crate) fn entry_at(dfd: BorrowedFd, name: &[u8], path: &[u8]) -> Result<Option<Entry>> {
    if path == b"." {
        let st = sys::fstat(dfd).context("cannot stat the top directory")?;
        return top_entry(dfd, &st).map(Some);
    }
    match sys::lstatat(dfd, name)? {
        Some(st) => entry_of(dfd, name, path.to_vec(), &st),
        None => Ok(None),
    }
}

/// Hashes each distinct inode once, in parallel, and fills in content hashes and extended
/// attributes of every regular file.
fn hash_files(
    top: BorrowedFd,
    entries: &mut [Entry],
    inodes: &[(u64, u64)],
    hook: Option<FileHook>,
) -> Result<()> {
    // Files by inode: each group of names of one inode is hashed once, through its first name.
    let mut files: Vec<u32> = (0..entries.len() as u32)
        .filter(|&i| matches!(entries[i as usize].kind, Kind::File { .. }))
        .collect();
    files.par_sort_unstable_by_key(|&i| (inodes[i as usize], i));
    let mut job = vec![false; entries.len()];
    for (k, &i) in files.iter().enumerate() {
        if k == 0 || inodes[files[k - 1] as usize] != inodes[i as usize] {
            job[i as usize] = true;
        }
    }
    let bytes: u64 = entries
        .iter()
        .zip(&job)
        .filter(|(_, j)| **j)
        .map(|(e, _)| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let progress = Progress::bytes(bytes, "hashing");
    // Each result goes straight into its entry: no vector of a million results.
    entries
        .par_iter_mut()
        .zip(inodes.par_iter())
        .zip(job.par_iter())
        .filter(|(_, j)| **j)
        .try_for_each(|((e, ino), _)| -> Result<()> {
            let (meta, size, h) = hash_one(top, &e.path, *ino, hook)
                .with_context(|| format!("cannot read `{}`", e.display()))?;
            progress.inc(size);
            e.meta = meta;
            e.kind = Kind::File { size, sha256: h };
            Ok(())
        })?;
    progress.finish();
    // Other names of an inode copy the result from the first.
    for w in files.windows(2) {
        let (j, k) = (w[0] as usize, w[1] as usize);
        if inodes[j] == inodes[k] {
            let (meta, kind) = (entries[j].meta.clone(), entries[j].kind.clone());
            entries[k].meta = meta;
            entries[k].kind = kind;
        }
    }
    Ok(())
}

fn hash_one(
    top: BorrowedFd,
    rel: &[u8],
    ino: (u64, u64),
    hook: Option<FileHook>,
) -> Result<(Meta, u64, Hash)> {
    let Some((fd, st)) = open_regular(top, rel, ino)? else {
        bail!("it changed while it was being read");
    };
    let meta = sys::meta_of(&st, sys::fd_xattrs(fd.as_fd())?);
    let (size, h) = hash::hash_fd_upto(fd.as_fd(), &st, (st.st_size as u64).saturating_add(1))?;
    if size != st.st_size as u64 {
        bail!("it changed size while it was being read");
    }
    if let Some(hook) = hook {
        hook(fd.as_fd(), &meta, size, &h)?;
    }
    Ok((meta, size, h))
}

/// Opens `rel` under `top` for reading if it is still the regular file that [`walk`] saw as
/// inode `ino` (device, inode), with its `fstat`; `None` if the name is gone or is now
/// something else. Never blocks and never follows a symlink, whatever was put in its place
/// since (a FIFO, a socket, a device, a symlink, a leased file): see
/// [`sys::open_file_beneath`].
pub(crate) fn open_regular(
    top: BorrowedFd,
    rel: &[u8],
    ino: (u64, u64),
) -> Result<Option<(OwnedFd, rustix::fs::Stat)>> {
    open_regular_if(top, rel, |st| (st.st_dev, st.st_ino) == ino)
}

/// Opens `rel` under `top` as [`open_regular`] does, if it is a regular file whose `fstat`
/// passes `still`.
fn open_regular_if(
    top: BorrowedFd,
    rel: &[u8],
    still: impl FnOnce(&rustix::fs::Stat) -> bool,
) -> Result<Option<(OwnedFd, rustix::fs::Stat)>> {
    let fd = match sys::openat2_file(top, rel) {
        Ok(fd) => fd,
        Err(e) if gone(e) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open `{}`", display(rel))),
    };
    let st = sys::fstat(fd.as_fd()).with_context(|| format!("cannot stat `{}`", display(rel)))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || !still(&st) {
        return Ok(None);
    }
    Ok(Some((fd, st)))
}

/// Whether an error of [`sys::openat2_file`] says that the name is no longer the file that was
/// looked at: removed; now a symlink, a socket, or below something that is no directory;
/// moved out from under the directory handle while it was being opened (`EXDEV`); renamed
/// meanwhile, or leased (`EAGAIN`).
fn gone(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::LOOP | Errno::NXIO | Errno::NOTDIR | Errno::XDEV | Errno::AGAIN
    )
}

/// Opens the regular file of `e`, an entry [`scan`] made of the directory open as `top`, for
/// reading again (as `diff --from-dir` does): refused, never waited for, if it is no longer a
/// regular file of the entry's size.
pub(crate) fn open_scanned(top: BorrowedFd, e: &Entry) -> Result<OwnedFd> {
    let Kind::File { size, .. } = e.kind else {
        bail!("`{}` is not a file", e.display());
    };
    match open_regular_if(top, &e.path, |st| st.st_size as u64 == size)? {
        Some((fd, _)) => Ok(fd),
        None => bail!("`{}` changed while it was being read", e.display()),
    }
}
