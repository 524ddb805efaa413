//! Inode flags ([ioctl_iflags(2)]): the immutable flag that protects pool objects, removing
//! a file that carries it, and probing what a file system can do.
//!
//! [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use rustix::fs::IFlags;
use rustix::io::Errno;

/// The inode flags of an open file (`FS_IOC_GETFLAGS`, [ioctl_iflags(2)]), with the bare
/// `Errno`.
///
/// [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html
#[inline]
pub(crate) fn ioctl_getflags(fd: BorrowedFd) -> rustix::io::Result<IFlags> {
    rustix::fs::ioctl_getflags(fd)
}

/// Sets the inode flags of an open file (`FS_IOC_SETFLAGS`, [ioctl_iflags(2)]), with the
/// bare `Errno`.
///
/// [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html
#[inline]
pub(crate) fn ioctl_setflags(fd: BorrowedFd, flags: IFlags) -> rustix::io::Result<()> {
    rustix::fs::ioctl_setflags(fd, flags)
}

/// Sets or clears the immutable flag of an open file ([ioctl_iflags(2)]).
///
/// [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html
pub(crate) fn set_immutable(fd: BorrowedFd, on: bool) -> Result<()> {
    let flags = ioctl_getflags(fd).context("cannot read inode flags")?;
    let want = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    if want != flags {
        ioctl_setflags(fd, want).context("cannot change the immutable flag")?;
    }
    Ok(())
}

/// Whether an open file is immutable; false where the file system has no such flag.
pub(crate) fn is_immutable(fd: BorrowedFd) -> bool {
    ioctl_getflags(fd).is_ok_and(|f| f.contains(IFlags::IMMUTABLE))
}

/// Unlinks `name` in `dir` even if its inode is immutable: the flag is cleared, the name
/// removed, and the flag set again if the inode still has other names (other trees, the pool).
/// A file without the flag whose unlink is refused keeps its flags: `EPERM`.
pub(crate) fn unlink_protected(dir: BorrowedFd, name: &[u8]) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::PERM) => unlink_immutable(dir, name),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove `{}`", crate::core::path::display(name)))
        }
    }
}

/// The rest of [`unlink_protected`], for a caller whose own `unlink` of `name` was refused
/// (`EPERM`): the flags are read once, the immutable and append-only ones cleared, the name
/// removed, and the flags restored if the inode still has other names. The name is opened
/// with `O_PATH` first and read through only if it is a regular file or a directory: a
/// device node a guest put there is never opened (its driver would see the open and the
/// ioctl).
pub(crate) fn unlink_immutable(dir: BorrowedFd, name: &[u8]) -> Result<()> {
    use rustix::fs::FileType;
    let shown = || crate::core::path::display(name);
    let (pfd, st) = super::guestfs::open_path_at(dir, name)
        .with_context(|| format!("cannot open `{}`", shown()))?;
    let ft = FileType::from_raw_mode(st.st_mode);
    let fd = match ft {
        FileType::RegularFile | FileType::Directory => super::guestfs::reopen(pfd.as_fd(), &st)
            .with_context(|| format!("cannot open `{}`", shown()))?,
        _ => return Err(Errno::PERM).with_context(|| format!("cannot remove `{}`", shown())),
    };
    let protecting = IFlags::IMMUTABLE | IFlags::APPEND;
    let had = ioctl_getflags(fd.as_fd())
        .ok()
        .filter(|f| f.intersects(protecting));
    let Some(had) = had else {
        // Refused for another reason (the directory is immutable or append-only): the file
        // must not come out of this with a flag it did not have.
        return Err(Errno::PERM).with_context(|| format!("cannot remove `{}`", shown()));
    };
    ioctl_setflags(fd.as_fd(), had - protecting)
        .with_context(|| format!("cannot clear the immutable flag of `{}`", shown()))?;
    let dir_flag = if ft == FileType::Directory {
        rustix::fs::AtFlags::REMOVEDIR
    } else {
        rustix::fs::AtFlags::empty()
    };
    let r = rustix::fs::unlinkat(dir, name, dir_flag);
    let st = rustix::fs::fstat(&fd).with_context(|| format!("cannot stat `{}`", shown()))?;
    if st.st_nlink > 0 {
        ioctl_setflags(fd.as_fd(), had)
            .with_context(|| format!("cannot set the immutable flag of `{}` again", shown()))?;
    }
    r.with_context(|| format!("cannot remove `{}`", shown()))
}

/// Whether the file system of the directory `tmp` can clone files (`FICLONE`) and set the
/// immutable flag, found by trying both on two probe files made (and removed) in `tmp`.
pub(crate) fn probe(tmp: BorrowedFd) -> Result<(bool, bool)> {
    use rustix::fs::{Mode as M, OFlags};
    let name_a = format!("probe-{}-a", std::process::id());
    let name_b = format!("probe-{}-b", std::process::id());
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let a = rustix::fs::openat(tmp, name_a.as_str(), flags, M::from_raw_mode(0o600))
        .context("cannot create a probe file in tmp/")?;
    rustix::io::write(&a, b"probe").context("cannot write a probe file")?;
    let b = rustix::fs::openat(tmp, name_b.as_str(), flags, M::from_raw_mode(0o600))
        .context("cannot create a probe file in tmp/")?;
    let can_clone = rustix::fs::ioctl_ficlone(&b, &a).is_ok();
    let can_flag = match rustix::fs::ioctl_getflags(&a) {
        Ok(f) => {
            let ok = rustix::fs::ioctl_setflags(&a, f | IFlags::IMMUTABLE).is_ok();
            if ok {
                rustix::fs::ioctl_setflags(&a, f).context("cannot clear a probe's flag")?;
            }
            ok
        }
        Err(_) => false,
    };
    drop((a, b));
    super::sys::unlinkat_ok(tmp, name_a.as_bytes(), false)?;
    super::sys::unlinkat_ok(tmp, name_b.as_bytes(), false)?;
    Ok((can_clone, can_flag))
}
