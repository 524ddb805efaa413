//! Temporary files published atomically: written under no name (`O_TMPFILE`, [open(2)]) or
//! a temporary one, then given their final name in one step that never replaces a file
//! ([linkat(2)], or [rename(2)] with `RENAME_NOREPLACE`).
//!
//! [open(2)]: https://man7.org/linux/man-pages/man2/open.2.html
//! [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
//! [rename(2)]: https://man7.org/linux/man-pages/man2/rename.2.html

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary file in a directory that is removed unless it was published: an unnamed one
/// (`O_TMPFILE`) where the file system has them, which a crash cannot leave behind, else one
/// named `<prefix>-<pid>-<n>`.
pub(crate) struct TmpFile<'a> {
    dir: BorrowedFd<'a>,
    /// `None` for an unnamed file.
    name: Option<String>,
    fd: Option<OwnedFd>,
    published: bool,
}

impl<'a> TmpFile<'a> {
    /// Creates a temporary file, mode 0600, open for writing in `dir` ([openat(2)]).
    ///
    /// [openat(2)]: https://man7.org/linux/man-pages/man2/openat.2.html
    pub(crate) fn create(dir: BorrowedFd<'a>, prefix: &str) -> Result<Self> {
        match rustix::fs::openat(
            dir,
            ".",
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => {
                return Ok(TmpFile {
                    dir,
                    name: None,
                    fd: Some(fd),
                    published: false,
                });
            }
            // No O_TMPFILE on this file system (or kernel): a named file.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOENT) => {}
            Err(e) => return Err(e).context("cannot create an unnamed file"),
        }
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let fd = rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("cannot create temporary file `{name}`"))?;
        Ok(TmpFile {
            dir,
            name: Some(name),
            fd: Some(fd),
            published: false,
        })
    }

    #[inline]
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("open").as_fd()
    }

    /// Gives the file the name `name` in `dir`, never replacing a file there (`EEXIST` if
    /// taken, as the bare `Errno`): [renameat2(2)] with `RENAME_NOREPLACE` from its temporary
    /// name (where the file system has no such flag, [linkat(2)] and an unlink of the
    /// temporary name), or for an unnamed file [`link_unnamed`]. After success the file is
    /// kept (no temporary name is left to remove) and stays open.
    ///
    /// [renameat2(2)]: https://man7.org/linux/man-pages/man2/renameat2.2.html
    /// [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
    pub(crate) fn publish(&mut self, dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<()> {
        crate::core::failpoint::hit("tmpfile-before-publish");
        match &self.name {
            Some(tmp) => {
                match super::sys::renameat_noreplace(self.dir, tmp.as_bytes(), dir, name) {
                    // No RENAME_NOREPLACE here (FUSE file systems, which often lack O_TMPFILE
                    // too): a hardlink never replaces either; then the temporary name goes.
                    Err(Errno::INVAL) => {
                        super::sys::linkat(self.dir, tmp.as_bytes(), dir, name)?;
                        let _ = rustix::fs::unlinkat(self.dir, tmp.as_str(), AtFlags::empty());
                        Ok(())
                    }
                    r => r,
                }
            }
            None => link_unnamed(self.fd(), dir, name),
        }?;
        self.published = true;
        Ok(())
    }
}

impl Drop for TmpFile<'_> {
    fn drop(&mut self) {
        self.fd.take();
        if self.published {
            return;
        }
        if let Some(name) = &self.name {
            let _ = rustix::fs::unlinkat(self.dir, name.as_str(), AtFlags::empty());
        }
    }
}

/// Gives the unnamed file `fd` the name `name` in `dir` (`EEXIST` if taken) with
/// [linkat(2)]: through the descriptor itself where allowed (`AT_EMPTY_PATH` needs
/// `CAP_DAC_READ_SEARCH`), else through `/proc/self/fd`.
///
/// [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
fn link_unnamed(fd: BorrowedFd, dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<()> {
    match rustix::fs::linkat(fd, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => {}
        r => return r,
    }
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc.as_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
}

/// An anonymous read-write file in `dir` for bytes that are spooled, never published (a
/// delta's manifest until its signature is checked, a large blob until its hash is): an
/// unnamed one (`O_TMPFILE`) where the file system has them, else one unlinked as soon as it
/// is made.
pub(crate) fn spool_in(dir: &std::path::Path) -> Result<std::fs::File> {
    tempfile::tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in `{}`", dir.display()))
}
