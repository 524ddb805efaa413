//! Thin wrappers over the file-system calls treeswap makes, one per syscall, each with the
//! context a user needs (the path and the cause) and never following a symlink it was not
//! asked to follow. See the linked man pages for each call.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::core::object::Meta;
use crate::core::path::display;

/// Resolution that stays under the directory handle and follows no symlink at all.
pub(crate) const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

pub(crate) use crate::core::object::Xattrs;

/// [open(2)] a directory named by the user (the argument itself may be a symlink).
///
/// [open(2)]: https://man7.org/linux/man-pages/man2/open.2.html
pub(crate) fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open directory `{}`", p.display()))
}

/// [openat2(2)] a directory below `dir`, refusing any symlink on the way.
///
/// [openat2(2)]: https://man7.org/linux/man-pages/man2/openat2.2.html
pub(crate) fn open_dir_beneath(dir: BorrowedFd, rel: &[u8]) -> Result<OwnedFd> {
    openat2_dir(dir, rel).with_context(|| format!("cannot open directory `{}`", display(rel)))
}

/// [`open_dir_beneath`] with the bare `Errno`, for callers that branch on it (`ENOENT`).
///
/// [openat2(2)]: https://man7.org/linux/man-pages/man2/openat2.2.html
#[inline]
pub(crate) fn openat2_dir(dir: BorrowedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        dir,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        BENEATH,
    )
}

/// [openat(2)] with the caller's flags and mode, returning the bare `Errno`: every caller
/// branches on it (`ENOENT`, `EROFS`, no `O_TMPFILE`) or names the file in its own context.
///
/// [openat(2)]: https://man7.org/linux/man-pages/man2/openat.2.html
#[inline]
pub(crate) fn openat(
    dir: BorrowedFd,
    name: &[u8],
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, flags, mode)
}

/// [fstat(2)] of an open file, with the bare `Errno` (there is no name to report).
///
/// [fstat(2)]: https://man7.org/linux/man-pages/man2/fstat.2.html
#[inline]
pub(crate) fn fstat(fd: BorrowedFd) -> rustix::io::Result<rustix::fs::Stat> {
    rustix::fs::fstat(fd)
}

/// [openat2(2)] a regular file below `dir` for reading, refusing any symlink on the way.
/// With `O_NOATIME` where allowed (the owner, or root): objects have atime 0, so under
/// `relatime` each first read would write the inode, and in a snapshot or a hardlinked pool
/// that costs a copied metadata block per object read.
///
/// Never waits: with `O_NONBLOCK` (which changes nothing for a regular file) the open of a
/// FIFO returns at once instead of waiting for a writer, and the open of a file with a lease
/// fails with `EWOULDBLOCK` instead of waiting for the lease to break; with `O_NOCTTY` a
/// terminal never becomes the controlling one. A name in a tree may be swapped by a guest
/// between a `stat` and this open: a caller that reads a tree `fstat`s the descriptor and
/// reads only the regular file it expected.
///
/// [openat2(2)]: https://man7.org/linux/man-pages/man2/openat2.2.html
pub(crate) fn open_file_beneath(dir: BorrowedFd, rel: &[u8]) -> Result<OwnedFd> {
    openat2_file(dir, rel).with_context(|| format!("cannot open `{}`", display(rel)))
}

/// [`open_file_beneath`] with the bare `Errno`, for callers that branch on it (a name a guest
/// removed, replaced or moved away: `ENOENT`, `ELOOP`, `ENXIO`, `EXDEV`, `EAGAIN`).
///
/// [openat2(2)]: https://man7.org/linux/man-pages/man2/openat2.2.html
#[inline]
pub(crate) fn openat2_file(dir: BorrowedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    let flags =
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK;
    match rustix::fs::openat2(dir, rel, flags | OFlags::NOATIME, Mode::empty(), BENEATH) {
        Err(Errno::PERM) => rustix::fs::openat2(dir, rel, flags, Mode::empty(), BENEATH),
        r => r,
    }
}

/// [mkdirat(2)], treating "already exists as a directory" as success when `exist_ok`.
///
/// [mkdirat(2)]: https://man7.org/linux/man-pages/man2/mkdirat.2.html
pub(crate) fn mkdirat(dir: BorrowedFd, name: &[u8], mode: u32, exist_ok: bool) -> Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) if exist_ok => {
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
                bail!("`{}` exists and is not a directory", display(name));
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot create directory `{}`", display(name))),
    }
}

/// [fstatat(2)] without following a final symlink; `None` if the name does not exist.
///
/// [fstatat(2)]: https://man7.org/linux/man-pages/man2/fstatat.2.html
pub(crate) fn lstatat(dir: BorrowedFd, name: &[u8]) -> Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot stat `{}`", display(name))),
    }
}

/// The names in a directory, without `.` and `..`, in no particular order
/// ([getdents64(2)]).
///
/// [getdents64(2)]: https://man7.org/linux/man-pages/man2/getdents64.2.html
pub(crate) fn read_dir(dir: BorrowedFd) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for_each_dirent(dir, |name, _| {
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    })
    .context("cannot read directory")?;
    Ok(out)
}

/// Calls `f` with the name and inode number of each entry of a directory, `.` and `..`
/// included, in no particular order ([getdents64(2)]): the inode numbers come with the
/// names, without a `stat` each.
///
/// [getdents64(2)]: https://man7.org/linux/man-pages/man2/getdents64.2.html
#[inline]
pub(crate) fn for_each_dirent(
    dir: BorrowedFd,
    mut f: impl FnMut(&[u8], u64),
) -> rustix::io::Result<()> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        f(ent.file_name().to_bytes(), ent.ino());
    }
    Ok(())
}

/// The path under `/proc/self/fd` naming `name` in `dir`, for the calls that have no `*at()`
/// form (the `l*xattr` family). The final component is never followed by the `l*` calls.
fn proc_path(dir: BorrowedFd, name: &[u8]) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

fn parse_xattr_names(list: &[u8]) -> Vec<Vec<u8>> {
    list.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// All extended attributes of an open file, sorted by name ([flistxattr(2)], [fgetxattr(2)]).
///
/// [flistxattr(2)]: https://man7.org/linux/man-pages/man2/flistxattr.2.html
/// [fgetxattr(2)]: https://man7.org/linux/man-pages/man2/fgetxattr.2.html
pub(crate) fn fd_xattrs(fd: BorrowedFd) -> Result<Xattrs> {
    read_xattrs(
        |buf| rustix::fs::flistxattr(fd, buf),
        |name, buf| rustix::fs::fgetxattr(fd, name, buf),
        String::new,
    )
}

/// All extended attributes of `name` in `dir`, not following it if it is a symlink
/// ([llistxattr(2)], [lgetxattr(2)]).
///
/// [llistxattr(2)]: https://man7.org/linux/man-pages/man2/llistxattr.2.html
/// [lgetxattr(2)]: https://man7.org/linux/man-pages/man2/lgetxattr.2.html
pub(crate) fn xattrs_at(dir: BorrowedFd, name: &[u8]) -> Result<Xattrs> {
    let p = proc_path(dir, name);
    read_xattrs(
        |buf| rustix::fs::llistxattr(&p[..], buf),
        |xname, buf| rustix::fs::lgetxattr(&p[..], xname, buf),
        || format!(" of `{}`", display(name)),
    )
}

/// Lists the names with `list`, then reads each value with `get`, growing a buffer on
/// `ERANGE`; no attributes where the file system has none (`ENOTSUP`). Sorted by name.
/// `of` names the file in errors (` of `NAME``, or nothing for an open file).
fn read_xattrs(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&[u8], &mut [u8]) -> rustix::io::Result<usize>,
    of: impl Fn() -> String,
) -> Result<Xattrs> {
    let mut buf = vec![0u8; 1024];
    let n = loop {
        match list(&mut buf[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot list extended attributes{}", of()));
            }
        }
    };
    let mut out = Vec::new();
    for name in parse_xattr_names(&buf[..n]) {
        let mut v = vec![0u8; 256];
        let len = loop {
            match get(&name[..], &mut v[..]) {
                Ok(len) => break len,
                Err(Errno::RANGE) => v.resize(v.len() * 4, 0),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot read extended attribute `{}`{}",
                            display(&name),
                            of()
                        )
                    });
                }
            }
        };
        v.truncate(len);
        out.push((name.into_boxed_slice(), v.into_boxed_slice()));
    }
    out.sort();
    Ok(out)
}

/// The [`Meta`] of an inode from its `stat` and its extended attributes.
pub(crate) fn meta_of(st: &rustix::fs::Stat, xattrs: Xattrs) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        xattrs,
    }
}

/// Sets owner, then mode, then extended attributes on an open file or directory: in this
/// order because [fchown(2)] clears setuid, setgid and `security.capability`. Owner and mode
/// are only changed where they differ (each change is a file system transaction; `fstat` is
/// not).
///
/// [fchown(2)]: https://man7.org/linux/man-pages/man2/fchown.2.html
pub(crate) fn apply_meta_fd(fd: BorrowedFd, meta: &Meta) -> Result<()> {
    let st = rustix::fs::fstat(fd).context("cannot read metadata")?;
    let chown = st.st_uid != meta.uid || st.st_gid != meta.gid;
    if chown {
        rustix::fs::fchown(
            fd,
            Some(rustix::process::Uid::from_raw(meta.uid)),
            Some(rustix::process::Gid::from_raw(meta.gid)),
        )
        .context("cannot change owner")?;
    }
    if chown || st.st_mode & 0o7777 != meta.mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).context("cannot change mode")?;
    }
    for (k, v) in &meta.xattrs {
        rustix::fs::fsetxattr(fd, &k[..], v, rustix::fs::XattrFlags::empty())
            .with_context(|| format!("cannot set extended attribute `{}`", display(k)))?;
    }
    Ok(())
}

/// Like [`apply_meta_fd`], and also removes extended attributes that `meta` does not have:
/// for an existing directory whose metadata changed.
pub(crate) fn set_meta_exact_fd(fd: BorrowedFd, meta: &Meta) -> Result<()> {
    apply_meta_fd(fd, meta)?;
    for (k, _) in fd_xattrs(fd)? {
        if !meta.xattrs.iter().any(|(n, _)| *n == k) {
            rustix::fs::fremovexattr(fd, &k[..])
                .with_context(|| format!("cannot remove extended attribute `{}`", display(&k)))?;
        }
    }
    Ok(())
}

/// Sets owner, mode (unless a symlink) and extended attributes on `name` in `dir` without
/// following it ([fchownat(2)], [fchmodat(2)], [lsetxattr(2)]). Used for symlinks and special
/// files that treeswap itself just created, so `name` is known not to be a symlink to elsewhere.
///
/// [fchownat(2)]: https://man7.org/linux/man-pages/man2/fchownat.2.html
/// [fchmodat(2)]: https://man7.org/linux/man-pages/man2/fchmodat.2.html
/// [lsetxattr(2)]: https://man7.org/linux/man-pages/man2/lsetxattr.2.html
pub(crate) fn apply_meta_at(
    dir: BorrowedFd,
    name: &[u8],
    meta: &Meta,
    symlink: bool,
) -> Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::process::Uid::from_raw(meta.uid)),
        Some(rustix::process::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("cannot change owner of `{}`", display(name)))?;
    if !symlink {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())
            .with_context(|| format!("cannot change mode of `{}`", display(name)))?;
    }
    if !meta.xattrs.is_empty() {
        let p = proc_path(dir, name);
        for (k, v) in &meta.xattrs {
            rustix::fs::lsetxattr(&p[..], &k[..], v, rustix::fs::XattrFlags::empty())
                .with_context(|| {
                    format!(
                        "cannot set extended attribute `{}` on `{}`",
                        display(k),
                        display(name)
                    )
                })?;
        }
    }
    Ok(())
}

/// [syncfs(2)]: one flush of the whole file system, instead of an fsync per file.
///
/// [syncfs(2)]: https://man7.org/linux/man-pages/man2/syncfs.2.html
pub(crate) fn syncfs(fd: BorrowedFd) -> Result<()> {
    rustix::fs::syncfs(fd).context("syncfs failed")
}

/// Starts writing the dirty pages of the file open as `fd` to the disk, without waiting
/// ([sync_file_range(2)] with `SYNC_FILE_RANGE_WRITE`), so that a later `syncfs` finds less
/// to do. Only a hint: errors are ignored, and `syncfs` stays the durability point.
///
/// [sync_file_range(2)]: https://man7.org/linux/man-pages/man2/sync_file_range.2.html
#[allow(unsafe_code)]
pub(crate) fn start_writeback(fd: BorrowedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// [fsync(2)] of a file, or of a directory so that the renames in it are durable.
///
/// [fsync(2)]: https://man7.org/linux/man-pages/man2/fsync.2.html
pub(crate) fn fsync(fd: BorrowedFd) -> Result<()> {
    rustix::fs::fsync(fd).context("fsync failed")
}

/// Writes all of `buf` to the open file `fd` at its offset ([write(2)] until done), with
/// the bare `Errno` (`ENOSPC` is told apart by the exit code); callers name the file.
///
/// [write(2)]: https://man7.org/linux/man-pages/man2/write.2.html
#[inline]
pub(crate) fn write_all(fd: BorrowedFd, mut buf: &[u8]) -> rustix::io::Result<()> {
    while !buf.is_empty() {
        let n = rustix::io::write(fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Writes all of `buf` to the open file `fd` at offset `off` ([pwrite(2)] until done), with
/// the bare `Errno`, as [`write_all`].
///
/// [pwrite(2)]: https://man7.org/linux/man-pages/man2/pwrite.2.html
#[inline]
pub(crate) fn pwrite_all(fd: BorrowedFd, mut buf: &[u8], mut off: u64) -> rustix::io::Result<()> {
    while !buf.is_empty() {
        let n = rustix::io::pwrite(fd, buf, off)?;
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// The offset of the first byte of data at or after `off` in the open file `fd` ([lseek(2)]
/// with `SEEK_DATA`); `None` if there is none (`ENXIO`: only a hole, or the end, follows),
/// with the bare `Errno` otherwise (`EINVAL` where the file system cannot tell). Moves the
/// descriptor's offset, which no reader of treeswap's uses (they read with `pread`).
///
/// [lseek(2)]: https://man7.org/linux/man-pages/man2/lseek.2.html
#[inline]
pub(crate) fn seek_data(fd: BorrowedFd, off: u64) -> rustix::io::Result<Option<u64>> {
    match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(off)) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The offset of the first hole at or after `off` in the open file `fd` ([lseek(2)] with
/// `SEEK_HOLE`); the end of the file counts as a hole. The bare `Errno`, as [`seek_data`].
///
/// [lseek(2)]: https://man7.org/linux/man-pages/man2/lseek.2.html
#[inline]
pub(crate) fn seek_hole(fd: BorrowedFd, off: u64) -> rustix::io::Result<u64> {
    rustix::fs::seek(fd, rustix::fs::SeekFrom::Hole(off))
}

/// [ftruncate(2)]: sets the size of an open file.
///
/// [ftruncate(2)]: https://man7.org/linux/man-pages/man2/ftruncate.2.html
pub(crate) fn ftruncate(fd: BorrowedFd, len: u64) -> Result<()> {
    rustix::fs::ftruncate(fd, len).context("cannot truncate")
}

/// [renameat(2)], with the bare `Errno`: callers name both paths relative to the state root
/// (`staging/<V>`, `trees/<V>`), which this cannot.
///
/// [renameat(2)]: https://man7.org/linux/man-pages/man2/renameat.2.html
pub(crate) fn renameat(
    old_dir: BorrowedFd,
    old: &[u8],
    new_dir: BorrowedFd,
    new: &[u8],
) -> rustix::io::Result<()> {
    rustix::fs::renameat(old_dir, old, new_dir, new)
}

/// [renameat2(2)] with `RENAME_NOREPLACE`: `EEXIST` if `new` exists, with the bare `Errno`
/// (callers branch on it and name both paths).
///
/// [renameat2(2)]: https://man7.org/linux/man-pages/man2/renameat2.2.html
pub(crate) fn renameat_noreplace(
    old_dir: BorrowedFd,
    old: &[u8],
    new_dir: BorrowedFd,
    new: &[u8],
) -> rustix::io::Result<()> {
    rustix::fs::renameat_with(
        old_dir,
        old,
        new_dir,
        new,
        rustix::fs::RenameFlags::NOREPLACE,
    )
}

/// [linkat(2)] without following a symlink, with the bare `Errno`: callers branch on
/// `EMLINK` and `ENOENT`.
///
/// [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
#[inline]
pub(crate) fn linkat(
    old_dir: BorrowedFd,
    old: &[u8],
    new_dir: BorrowedFd,
    new: &[u8],
) -> rustix::io::Result<()> {
    rustix::fs::linkat(old_dir, old, new_dir, new, AtFlags::empty())
}

/// [symlinkat(2)]: makes `name` in `dir` a symlink to `target`.
///
/// [symlinkat(2)]: https://man7.org/linux/man-pages/man2/symlinkat.2.html
#[inline]
pub(crate) fn symlinkat(target: &[u8], dir: BorrowedFd, name: &[u8]) -> Result<()> {
    rustix::fs::symlinkat(target, dir, name)
        .with_context(|| format!("cannot create symlink `{}`", display(name)))
}

/// [mknodat(2)]: makes `name` in `dir` a special file of type `ft` (device `dev`, from
/// `rustix::fs::makedev`, for a device).
///
/// [mknodat(2)]: https://man7.org/linux/man-pages/man2/mknodat.2.html
#[inline]
pub(crate) fn mknodat(
    dir: BorrowedFd,
    name: &[u8],
    ft: rustix::fs::FileType,
    mode: u32,
    dev: u64,
) -> Result<()> {
    rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(mode), dev)
        .with_context(|| format!("cannot create `{}`", display(name)))
}

/// Shares all the blocks of `src` with `dst`, which then has `src`'s content
/// ([ioctl_ficlone(2)]); the bare `Errno`, as callers fall back to a copy on any error.
///
/// [ioctl_ficlone(2)]: https://man7.org/linux/man-pages/man2/ioctl_ficlone.2.html
#[inline]
pub(crate) fn ioctl_ficlone(dst: BorrowedFd, src: BorrowedFd) -> rustix::io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src)
}

/// [flock(2)], with the bare `Errno`: the caller tells `EWOULDBLOCK` (busy) apart.
///
/// [flock(2)]: https://man7.org/linux/man-pages/man2/flock.2.html
pub(crate) fn flock(fd: BorrowedFd, op: rustix::fs::FlockOperation) -> rustix::io::Result<()> {
    rustix::fs::flock(fd, op)
}

/// Asks the kernel to start reading the whole file open as `fd` ([posix_fadvise(2)] with
/// `POSIX_FADV_WILLNEED`). Only a hint: errors are ignored. A file with holes (fewer blocks
/// than its size needs) is advised run of data by run of data ([`seek_data`],
/// [`seek_hole`]): read ahead, a hole would become pages of zeros in the page cache.
///
/// [posix_fadvise(2)]: https://man7.org/linux/man-pages/man2/posix_fadvise.2.html
pub(crate) fn fadvise_willneed(fd: BorrowedFd) {
    use rustix::fs::Advice;
    let Ok(st) = fstat(fd) else { return };
    let size = st.st_size as u64;
    if (st.st_blocks as u64).saturating_mul(512) >= size {
        let _ = rustix::fs::fadvise(fd, 0, None, Advice::WillNeed);
        return;
    }
    let mut off = 0;
    while off < size {
        let Ok(Some(start)) = seek_data(fd, off) else {
            return;
        };
        let Ok(stop) = seek_hole(fd, start) else {
            return;
        };
        let Some(len) = std::num::NonZeroU64::new(stop.saturating_sub(start)) else {
            return;
        };
        let _ = rustix::fs::fadvise(fd, start, Some(len), Advice::WillNeed);
        off = stop;
    }
}

/// Sends `SIGKILL` to the process group `pgid` ([killpg(3)]); errors (the group is gone)
/// are ignored.
///
/// [killpg(3)]: https://man7.org/linux/man-pages/man3/killpg.3.html
pub(crate) fn killpg(pgid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// At most this many directories of a tree are open at once while [`remove_tree_at`] removes
/// it: the deepest ones on the way down (one more for a moment while it climbs back up).
const REMOVE_OPEN_DIRS: usize = 8;

/// One directory on the path from the top of a tree being removed to where the walk is.
struct Level {
    /// Where its name ends in the walk's `names` (it starts where its parent's ends).
    name_end: usize,
    /// Device and inode, to know it again when it is reached by `..`.
    dev: u64,
    ino: u64,
    /// The top of a btrfs subvolume, which is removed by the subvolume ioctl once empty.
    subvolume: bool,
    /// Its entries being read, while it is among the deepest `REMOVE_OPEN_DIRS`.
    stream: Option<rustix::fs::Dir>,
    /// The position after the entry last read, to go on from when it is opened again.
    pos: i64,
    /// Opened again and read on from `pos`: read once more from the start before it counts
    /// as empty, in case a file system's positions did not survive the removals.
    resumed: bool,
}

/// What [`open_to_remove`] found under a name.
enum Found {
    Gone,
    NotDir,
    Dir(OwnedFd, rustix::fs::Stat),
}

/// Opens `name` in `dir` as a directory, never following a symlink ([openat(2)] with
/// `O_NOFOLLOW | O_DIRECTORY`).
///
/// [openat(2)]: https://man7.org/linux/man-pages/man2/openat.2.html
fn open_to_remove(dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<Found> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => {
            let st = rustix::fs::fstat(&fd)?;
            Ok(Found::Dir(fd, st))
        }
        Err(Errno::NOENT) => Ok(Found::Gone),
        // A symlink (`ELOOP` under `O_NOFOLLOW`) or any other file that is no directory.
        Err(Errno::NOTDIR) | Err(Errno::LOOP) => Ok(Found::NotDir),
        Err(e) => Err(e),
    }
}

/// Whether the open directory `fd` is the root of a mount ([statx(2)]'s
/// `STATX_ATTR_MOUNT_ROOT`); false where the kernel cannot tell.
///
/// [statx(2)]: https://man7.org/linux/man-pages/man2/statx.2.html
fn is_mount_root(fd: BorrowedFd) -> bool {
    use rustix::fs::{StatxAttributes, StatxFlags};
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::empty()).is_ok_and(|x| {
        x.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
            && x.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
    })
}

/// The path of the walk's current directory (and `child` in it) for a message: the names
/// from `top` down, the middle left out when it is deep and each name cut to its first 32
/// bytes (a guest chose them: a message stays one short line).
fn walk_path(top: &[u8], names: &[u8], stack: &[Level], child: Option<&[u8]>) -> String {
    let display = |p: &[u8]| {
        if p.len() > 40 {
            format!("{}…", display(&p[..32]))
        } else {
            display(p)
        }
    };
    let mut parts: Vec<&[u8]> = vec![top];
    let mut start = 0;
    for l in stack.iter().skip(1) {
        parts.push(&names[start..l.name_end]);
        start = l.name_end;
    }
    parts.extend(child);
    let shown: Vec<String> = if parts.len() > 6 {
        let n = parts.len();
        let mut v: Vec<String> = parts[..2].iter().map(|p| display(p)).collect();
        v.push(format!("…({} more)…", n - 4));
        v.extend(parts[n - 2..].iter().map(|p| display(p)));
        v
    } else {
        parts.iter().map(|p| display(p)).collect()
    };
    shown.join("/")
}

/// Removes `name` in `dir` and everything below it, without following symlinks; a missing
/// name is fine.
///
/// A tree of any depth and width takes a bounded number of descriptors (at most
/// `REMOVE_OPEN_DIRS` + 1, plus the caller's) and memory for the names of one path from the top
/// down: the walk descends by [openat(2)] of each name beneath its parent with `O_NOFOLLOW |
/// O_DIRECTORY`, reads each directory as a stream (never all its names at once), keeps only the
/// deepest directories open, and climbs back to one it closed by opening `..`, which must be
/// the very directory it left (device and inode): if the tree was moved meanwhile it stops
/// with an error rather than remove anything outside it. It never descends into another mount
/// (an error instead). A btrfs subvolume goes by the subvolume ioctl, whole, or, if it holds
/// subvolumes of its own, made writable and emptied first; an immutable file by
/// [`crate::fs::iflags::unlink_protected`]. Names that vanish meanwhile are fine.
///
/// [openat(2)]: https://man7.org/linux/man-pages/man2/openat.2.html
pub(crate) fn remove_tree_at(dir: BorrowedFd, name: &[u8]) -> Result<()> {
    let Some(st) = lstatat(dir, name)? else {
        return Ok(());
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return crate::fs::iflags::unlink_protected(dir, name);
    }
    let (top, st) = match open_to_remove(dir, name)
        .with_context(|| format!("cannot open `{}` to remove it", display(name)))?
    {
        Found::Gone => return Ok(()),
        Found::NotDir => return crate::fs::iflags::unlink_protected(dir, name),
        Found::Dir(fd, st) => (fd, st),
    };
    if is_mount_root(top.as_fd()) {
        bail!("`{}` is a mount point: not removing it", display(name));
    }
    let subvolume = crate::fs::btrfs::is_subvolume(top.as_fd());
    // A tree on btrfs: deleting the subvolume removes it whole, unless it holds subvolumes
    // of its own (`ENOTEMPTY`): then they go first, with everything else, by the walk.
    if subvolume && crate::fs::btrfs::destroy(dir, name).is_ok() {
        return Ok(());
    }
    if subvolume {
        crate::fs::btrfs::make_writable(top.as_fd())
            .with_context(|| format!("in `{}`", display(name)))?;
    }
    empty_tree(top, &st, name)?;
    if subvolume {
        crate::fs::btrfs::destroy(dir, name)
    } else {
        unlinkat_ok(dir, name, true)
    }
}

/// Removes everything in the directory open as `top` (named `top_name` in messages), leaving
/// it empty; see [`remove_tree_at`].
fn empty_tree(top: OwnedFd, st: &rustix::fs::Stat, top_name: &[u8]) -> Result<()> {
    let mut walk = Removal {
        top_name,
        names: Vec::new(),
        stack: vec![Level {
            name_end: 0,
            dev: st.st_dev,
            ino: st.st_ino,
            subvolume: false,
            stream: Some(rustix::fs::Dir::new(top).context("cannot read directory")?),
            pos: 0,
            resumed: false,
        }],
        open: 1,
    };
    loop {
        match walk.next_entry()? {
            Next::Entry(ent) => walk.remove_or_descend(&ent)?,
            Next::Again => {}
            Next::End if walk.stack.len() == 1 => return Ok(()),
            Next::End => walk.finish_dir()?,
        }
    }
}

/// A removal walk in progress: the names of the path down to the deepest directory, one
/// [`Level`] per directory on it, and how many of them are open (the deepest ones).
struct Removal<'a> {
    top_name: &'a [u8],
    names: Vec<u8>,
    stack: Vec<Level>,
    open: usize,
}

/// What reading the deepest directory gave.
enum Next {
    Entry(rustix::fs::DirEntry),
    /// A resumed directory read to its end: read again from its start.
    Again,
    /// The deepest directory is read to its end: it is empty.
    End,
}

impl Removal<'_> {
    /// The path of the deepest directory (or of `child` in it), cut short, for messages.
    fn path(&self, child: Option<&[u8]>) -> String {
        walk_path(self.top_name, &self.names, &self.stack, child)
    }

    fn next_entry(&mut self) -> Result<Next> {
        let last = self.stack.last_mut().expect("the top stays until the end");
        let stream = last.stream.as_mut().expect("the deepest directory is open");
        match stream.read() {
            Some(Ok(ent)) => Ok(Next::Entry(ent)),
            None if last.resumed => {
                last.resumed = false;
                stream.rewind();
                Ok(Next::Again)
            }
            None => Ok(Next::End),
            Some(Err(e)) => {
                Err(e).with_context(|| format!("cannot read directory `{}`", self.path(None)))
            }
        }
    }

    /// The deepest directory, open.
    fn deepest_fd(&self) -> Result<BorrowedFd<'_>> {
        let here = self.stack.last().expect("the top stays");
        let stream = here.stream.as_ref().expect("the deepest directory is open");
        stream.fd().context("cannot read directory")
    }

    /// The deepest directory is empty: climbs back to its parent (opened again by `..` if it
    /// was closed) and removes it there, by the subvolume ioctl for a subvolume.
    fn finish_dir(&mut self) -> Result<()> {
        let done = self.stack.pop().expect("more than the top");
        let done_fd = done.stream.expect("the deepest directory is open");
        if climb_to_parent(&mut self.stack, &done_fd, self.top_name, &self.names)? {
            self.open += 1;
        }
        drop(done_fd);
        self.open -= 1;
        let pfd = self.deepest_fd()?;
        let end = self.stack.last().expect("more than the top").name_end;
        let child = &self.names[end..done.name_end];
        let removed = if done.subvolume {
            crate::fs::btrfs::destroy(pfd, child)
        } else {
            unlinkat_ok(pfd, child, true)
        };
        removed.with_context(|| format!("cannot remove `{}`", self.path(Some(child))))?;
        self.names.truncate(end);
        Ok(())
    }

    /// Removes the entry `ent` of the deepest directory if it is not a directory; if it is,
    /// opens it and makes it the deepest (a subvolume is deleted whole if it can be).
    fn remove_or_descend(&mut self, ent: &rustix::fs::DirEntry) -> Result<()> {
        use rustix::fs::FileType;
        let child = ent.file_name().to_bytes();
        if child == b"." || child == b".." {
            return Ok(());
        }
        self.stack.last_mut().expect("the top stays").pos = ent.offset();
        let fd = self.deepest_fd()?;
        let ft = ent.file_type();
        if ft != FileType::Directory && ft != FileType::Unknown && self.unlink_file(fd, child)? {
            return Ok(());
        }
        let (sub, st) = match open_to_remove(fd, child) {
            Ok(Found::Dir(sub, st)) => (sub, st),
            Ok(Found::Gone) => return Ok(()),
            Ok(Found::NotDir) => {
                return crate::fs::iflags::unlink_protected(fd, child)
                    .with_context(|| format!("in `{}`", self.path(None)));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open `{}` to remove it", self.path(Some(child)))
                });
            }
        };
        if is_mount_root(sub.as_fd()) {
            bail!(
                "`{}` is a mount point: not removing it",
                self.path(Some(child))
            );
        }
        let subvolume = crate::fs::btrfs::is_subvolume(sub.as_fd());
        if subvolume {
            if crate::fs::btrfs::destroy(fd, child).is_ok() {
                return Ok(());
            }
            crate::fs::btrfs::make_writable(sub.as_fd())
                .with_context(|| format!("in `{}`", self.path(Some(child))))?;
        }
        self.descend(child, sub, &st, subvolume)
    }

    /// Unlinks `child`, listed as no directory, in `fd`; false if it has become a directory
    /// since it was listed (it is then removed as one).
    fn unlink_file(&self, fd: BorrowedFd, child: &[u8]) -> Result<bool> {
        match rustix::fs::unlinkat(fd, child, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(true),
            Err(Errno::ISDIR) => Ok(false),
            // Immutable (or a directory on a file system that says EPERM for it).
            Err(Errno::PERM) => {
                crate::fs::iflags::unlink_immutable(fd, child)
                    .with_context(|| format!("in `{}`", self.path(None)))?;
                Ok(true)
            }
            Err(e) => Err(e).with_context(|| format!("cannot remove `{}`", self.path(Some(child)))),
        }
    }

    /// Makes the directory `child`, open as `sub`, the deepest, closing the shallowest open
    /// one if that would keep more than `REMOVE_OPEN_DIRS` open.
    fn descend(
        &mut self,
        child: &[u8],
        sub: OwnedFd,
        st: &rustix::fs::Stat,
        subvolume: bool,
    ) -> Result<()> {
        self.names.extend_from_slice(child);
        self.stack.push(Level {
            name_end: self.names.len(),
            dev: st.st_dev,
            ino: st.st_ino,
            subvolume,
            stream: Some(rustix::fs::Dir::new(sub).context("cannot read directory")?),
            pos: 0,
            resumed: false,
        });
        self.open += 1;
        if self.open > REMOVE_OPEN_DIRS {
            let i = self.stack.len() - self.open;
            self.stack[i].stream = None;
            self.open -= 1;
        }
        Ok(())
    }
}

/// Makes sure the last directory of `stack`, the parent of the directory open as `child`
/// that the walk just emptied, is open: if it was closed, opens `..` from `child` and checks
/// that it is the same directory (device and inode) before reading on where it stopped.
/// Returns whether it opened it.
fn climb_to_parent(
    stack: &mut [Level],
    child: &rustix::fs::Dir,
    top_name: &[u8],
    names: &[u8],
) -> Result<bool> {
    let parent = stack.last().expect("more than the top");
    if parent.stream.is_some() {
        return Ok(false);
    }
    let (dev, ino, pos) = (parent.dev, parent.ino, parent.pos);
    let opened = child
        .fd()
        .and_then(|c| {
            rustix::fs::openat(
                c,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        })
        .and_then(|fd| rustix::fs::fstat(&fd).map(|st| (fd, st)));
    let fd = match opened {
        Ok((fd, st)) if (st.st_dev, st.st_ino) == (dev, ino) => fd,
        r => {
            let why = r.err().map_or("it was moved".to_owned(), |e| e.to_string());
            bail!(
                "cannot climb back to `{}` while removing it: {why}",
                walk_path(top_name, names, stack, None)
            );
        }
    };
    let mut d = rustix::fs::Dir::new(fd).context("cannot read directory")?;
    // Read on from where it stopped; where that cannot be (`seekdir` needs a 64-bit target),
    // from the start, which only costs reading again the names still there.
    #[cfg(target_pointer_width = "64")]
    let resumed = match d.seek(pos) {
        Ok(()) => true,
        Err(_) => {
            d.rewind();
            false
        }
    };
    #[cfg(not(target_pointer_width = "64"))]
    let resumed = {
        let _ = pos;
        false
    };
    let parent = stack.last_mut().expect("more than the top");
    parent.stream = Some(d);
    parent.resumed = resumed;
    Ok(true)
}

/// [unlinkat(2)]; a missing name is fine.
///
/// [unlinkat(2)]: https://man7.org/linux/man-pages/man2/unlinkat.2.html
pub(crate) fn unlinkat_ok(dir: BorrowedFd, name: &[u8], is_dir: bool) -> Result<()> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove `{}`", display(name))),
    }
}

/// Replaces `name` in `dir` with a symlink to `target`, atomically: [symlinkat(2)] to a
/// temporary name beside it, [renameat(2)] over `name`, then [fsync(2)] of the directory so
/// that the rename is durable.
///
/// [symlinkat(2)]: https://man7.org/linux/man-pages/man2/symlinkat.2.html
/// [renameat(2)]: https://man7.org/linux/man-pages/man2/renameat.2.html
/// [fsync(2)]: https://man7.org/linux/man-pages/man2/fsync.2.html
pub(crate) fn replace_symlink(dir: BorrowedFd, name: &str, target: &str) -> Result<()> {
    let tmp = format!(".{name}.new");
    unlinkat_ok(dir, tmp.as_bytes(), false)?;
    rustix::fs::symlinkat(target, dir, tmp.as_str())
        .with_context(|| format!("cannot create symlink `{tmp}`"))?;
    rustix::fs::renameat(dir, tmp.as_str(), dir, name)
        .with_context(|| format!("cannot rename `{tmp}` to `{name}`"))?;
    fsync(dir)
}

/// [readlinkat(2)]; `None` if the name does not exist.
///
/// [readlinkat(2)]: https://man7.org/linux/man-pages/man2/readlinkat.2.html
pub(crate) fn readlinkat(dir: BorrowedFd, name: &[u8]) -> Result<Option<Vec<u8>>> {
    match rustix::fs::readlinkat(dir, name, Vec::new()) {
        Ok(t) => Ok(Some(CString::into_bytes(t))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read symlink `{}`", display(name))),
    }
}

/// Free space for an unprivileged writer on the file system of `fd` ([fstatvfs(3)]): the free
/// bytes, the fragment size (the unit of allocation), and the free inodes, `None` when the
/// file system reports no inode count (btrfs) or no free inode.
///
/// [fstatvfs(3)]: https://man7.org/linux/man-pages/man3/fstatvfs.3.html
pub(crate) fn free_bytes(fd: BorrowedFd) -> Result<(u64, u64, Option<u64>)> {
    let st = rustix::fs::fstatvfs(fd).context("cannot read free space")?;
    let inodes = (st.f_favail != 0 && st.f_files != 0).then_some(st.f_favail);
    Ok((st.f_bavail.saturating_mul(st.f_frsize), st.f_frsize, inodes))
}

/// Copies `len` bytes at offset `off` of `src` to the same offset of `dst` in the kernel
/// ([copy_file_range(2)]), with the bare `Errno` (`EXDEV`, `EOPNOTSUPP` or `EINVAL` where the
/// kernel cannot copy between these files); `Ok(false)` if `src` ended first.
///
/// [copy_file_range(2)]: https://man7.org/linux/man-pages/man2/copy_file_range.2.html
pub(crate) fn copy_range_at(
    src: BorrowedFd,
    dst: BorrowedFd,
    off: u64,
    len: u64,
) -> rustix::io::Result<bool> {
    let (mut off_in, mut off_out) = (off, off);
    let end = off.saturating_add(len);
    while off_in < end {
        let n = (end - off_in).min(1 << 30) as usize;
        if rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), n)? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sets atime and mtime of an open file to the epoch (FORMAT.md, "Timestamps").
pub(crate) fn zero_times(fd: BorrowedFd) -> Result<()> {
    let zero = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        fd,
        &rustix::fs::Timestamps {
            last_access: zero,
            last_modification: zero,
        },
    )
    .context("cannot set timestamps")
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): tells one boot from the next.
pub(crate) fn boot_id() -> Result<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("cannot read /proc/sys/kernel/random/boot_id")?;
    Ok(id.trim().to_owned())
}

/// The pid of the process holding an exclusive `flock` on the file open as `fd`, from
/// `/proc/locks`, without taking or testing the lock (a reader that tried it would make a
/// writer's non-blocking attempt fail).
pub(crate) fn flock_writer(fd: BorrowedFd) -> Result<Option<u32>> {
    let st = fstat(fd)?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev),
        st.st_ino
    );
    let locks = std::fs::read_to_string("/proc/locks").context("cannot read /proc/locks")?;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 2661 fe:00:5431388 0 EOF"; blocked waiters have "->".
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[3] == "WRITE" && f[5] == want {
            return Ok(f[4].parse().ok());
        }
    }
    Ok(None)
}

/// Replaces the whole content of the open file `fd` with `data` (truncate, then write at
/// offset 0): for small informational files, not crash-safe.
pub(crate) fn replace_contents(fd: BorrowedFd, data: &[u8]) -> Result<()> {
    ftruncate(fd, 0)?;
    pwrite_all(fd, data, 0).context("cannot write")
}
