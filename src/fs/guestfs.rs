//! Calls for the directories overlay guests write to (their layers), where a guest chooses
//! what is there: paths of any length opened piece by piece, files opened only once `fstat`
//! says what they are, inode flags cleared before a layer is emptied, and modes enforced.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use rustix::fs::{FileType, IFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::core::path::display;

/// The longest relative path opened in one call: below `PATH_MAX` (4096) with room to spare.
const CHUNK: usize = 3072;

/// Opens the directory `rel` below `dir` as [`super::sys::openat2_dir`] does (beneath, no
/// symlink), for a path of any length: one longer than [`CHUNK`] is opened piece by piece,
/// each piece beneath the directory the last one opened (a guest can nest 2000 directories;
/// one path to them is longer than the kernel takes).
pub(crate) fn open_dir_deep(dir: BorrowedFd, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    let mut held: Option<OwnedFd> = None;
    let mut rest = rel;
    while rest.len() > CHUNK {
        // A name is at most 255 bytes: there is a `/` in the first CHUNK bytes.
        let cut = rest[..CHUNK]
            .iter()
            .rposition(|&b| b == b'/')
            .filter(|&i| i > 0)
            .ok_or(Errno::NAMETOOLONG)?;
        let base = held.as_ref().map_or(dir, |f| f.as_fd());
        let next = super::sys::openat2_dir(base, &rest[..cut])?;
        held = Some(next);
        rest = &rest[cut + 1..];
    }
    let base = held.as_ref().map_or(dir, |f| f.as_fd());
    super::sys::openat2_dir(base, rest)
}

/// Opens what `name` in `dir` is now with `O_PATH` (which opens nothing: no device driver,
/// no FIFO, no terminal sees it), with its `fstat`.
pub(crate) fn open_path_at(
    dir: BorrowedFd,
    name: &[u8],
) -> rustix::io::Result<(OwnedFd, rustix::fs::Stat)> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    Ok((fd, st))
}

/// Opens for reading the very inode an `O_PATH` descriptor holds, through `/proc/self/fd`
/// ([proc_pid_fd(5)]); only for a regular file or a directory, which opening cannot make do
/// anything.
///
/// [proc_pid_fd(5)]: https://man7.org/linux/man-pages/man5/proc_pid_fd.5.html
pub(crate) fn reopen(path_fd: BorrowedFd, st: &rustix::fs::Stat) -> rustix::io::Result<OwnedFd> {
    let extra = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => OFlags::empty(),
        FileType::Directory => OFlags::DIRECTORY,
        _ => return Err(Errno::PERM),
    };
    let proc = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
    rustix::fs::open(
        proc.as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC | extra,
        Mode::empty(),
    )
}

/// Opens `name` in `dir` for reading if it is a regular file, with its `fstat`; `None` if it
/// is gone or anything else (never opened then).
pub(crate) fn open_regular_at(
    dir: BorrowedFd,
    name: &[u8],
) -> rustix::io::Result<Option<(OwnedFd, rustix::fs::Stat)>> {
    let (pfd, st) = match open_path_at(dir, name) {
        Ok(x) => x,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    Ok(Some((reopen(pfd.as_fd(), &st)?, st)))
}

/// The flags that refuse an unlink, a link or a rename of the inode or in the directory.
const PROTECTING: IFlags = IFlags::IMMUTABLE.union(IFlags::APPEND);

/// Clears the immutable and append-only flags of an open file or directory, if it has them;
/// returns the flags it had when it changed them. Where the file system has no flags, nothing.
pub(crate) fn clear_protecting(fd: BorrowedFd) -> Result<Option<IFlags>> {
    let Ok(flags) = super::iflags::ioctl_getflags(fd) else {
        return Ok(None);
    };
    if !flags.intersects(PROTECTING) {
        return Ok(None);
    }
    super::iflags::ioctl_setflags(fd, flags - PROTECTING)
        .context("cannot clear the immutable and append-only flags")?;
    Ok(Some(flags))
}

/// Sets the permission bits of an open directory or file ([fchmod(2)]) if they differ.
///
/// [fchmod(2)]: https://man7.org/linux/man-pages/man2/fchmod.2.html
pub(crate) fn enforce_mode(fd: BorrowedFd, mode: u32, shown: &[u8]) -> Result<()> {
    let st = rustix::fs::fstat(fd).with_context(|| format!("cannot stat `{}`", display(shown)))?;
    if st.st_mode & 0o7777 != mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
            .with_context(|| format!("cannot change the mode of `{}`", display(shown)))?;
    }
    Ok(())
}
