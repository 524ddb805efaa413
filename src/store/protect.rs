//! Copy-on-write protection of the pool. Every file of a tree is a hardlink to a pool object,
//! so a write through one tree would change the file in every tree. Mainline Linux has no
//! VServer-style break-on-write, so treeswap offers three modes (config `protect`):
//!
//! - `immutable`: objects carry `FS_IMMUTABLE_FL`; the kernel then refuses writes, and also
//!   links, so staging clears the flag on an object, links it and sets it again. Before such
//!   work the state file records that objects may be unprotected; `boot` re-protects the whole
//!   pool if a crash cut the work short.
//! - `reflink`: trees get `FICLONE` copies of objects: separate inodes sharing blocks, so a
//!   write stays private to one tree. `verify` then compares such files by content.
//! - `hardlink`: no protection; `verify` reports tampering.
//!
//! `auto` (the default) picks reflink where the file system can clone, else immutable where it
//! supports the flag, else hardlink. Paths matching `private` globs get copies in every mode.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result, bail};
use rustix::fs::IFlags;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    #[default]
    Auto,
    Immutable,
    Reflink,
    Hardlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Immutable,
    Reflink,
    Hardlink,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Immutable => "immutable",
            Mode::Reflink => "reflink",
            Mode::Hardlink => "hardlink",
        }
    }
}

/// Sets or clears the immutable flag of an open file ([ioctl_iflags(2)]).
///
/// [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html
pub fn set_immutable(fd: BorrowedFd, on: bool) -> Result<()> {
    let flags = rustix::fs::ioctl_getflags(fd).context("cannot read inode flags")?;
    let want = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    if want != flags {
        rustix::fs::ioctl_setflags(fd, want).context("cannot change the immutable flag")?;
    }
    Ok(())
}

/// Whether an open file is immutable; false where the file system has no such flag.
pub fn is_immutable(fd: BorrowedFd) -> bool {
    rustix::fs::ioctl_getflags(fd).is_ok_and(|f| f.contains(IFlags::IMMUTABLE))
}

/// Resolves a setting to a mode by probing the file system of `tmp` (a directory of the root).
pub fn resolve(setting: Setting, tmp: BorrowedFd) -> Result<Mode> {
    let (can_clone, can_flag) = probe(tmp)?;
    let mode = match setting {
        Setting::Auto if can_clone => Mode::Reflink,
        Setting::Auto if can_flag => Mode::Immutable,
        Setting::Auto | Setting::Hardlink => Mode::Hardlink,
        Setting::Reflink if can_clone => Mode::Reflink,
        Setting::Reflink => {
            bail!("protect = \"reflink\": this file system cannot clone files (FICLONE)")
        }
        Setting::Immutable if can_flag => Mode::Immutable,
        Setting::Immutable => {
            bail!("protect = \"immutable\": this file system has no immutable flag")
        }
    };
    log::debug!("protection mode: {}", mode.name());
    Ok(mode)
}

fn probe(tmp: BorrowedFd) -> Result<(bool, bool)> {
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
    crate::fs::sys::unlinkat_ok(tmp, name_a.as_bytes(), false)?;
    crate::fs::sys::unlinkat_ok(tmp, name_b.as_bytes(), false)?;
    Ok((can_clone, can_flag))
}

/// Runs `link`, which links pool objects into a tree. In immutable mode objects are briefly
/// unprotected while they are linked, so that is recorded around it: a crash before the record
/// is cleared makes `boot` re-protect the pool.
pub fn while_linking<R>(
    root: &crate::store::root::Root,
    pool: &crate::store::pool::Pool,
    link: impl FnOnce() -> R,
) -> Result<R> {
    let immutable = pool.mode() == Mode::Immutable;
    if immutable {
        mark_unprotected(root, true)?;
    }
    let r = link();
    if immutable {
        mark_unprotected(root, false)?;
    }
    Ok(r)
}

/// Records (or clears the record) that pool objects may be unprotected right now.
fn mark_unprotected(root: &crate::store::root::Root, on: bool) -> Result<()> {
    let mut st = crate::store::state::load(root.fd())?;
    if st.unprotected != on {
        st.unprotected = on;
        crate::ops::flip::save(root, &st)?;
    }
    Ok(())
}

/// Sets the immutable flag on every object of the pool (after a crash in immutable mode).
pub fn reprotect_pool(pool: &crate::store::pool::Pool) -> Result<u64> {
    let mut n = 0;
    pool.for_each_dir(|dir, _| {
        for name in crate::fs::sys::read_dir(dir)? {
            let fd = crate::fs::sys::open_file_beneath(dir, &name)?;
            if !is_immutable(fd.as_fd()) {
                set_immutable(fd.as_fd(), true)?;
                n += 1;
            }
        }
        Ok(())
    })?;
    Ok(n)
}

/// Unlinks `name` in `dir` even if its inode is immutable: the flag is cleared, the name
/// removed, and the flag set again if the inode still has other names (other trees, the pool).
pub fn unlink_protected(dir: BorrowedFd, name: &[u8]) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::PERM) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot remove `{}`", crate::core::path::display(name)));
        }
    }
    let fd = crate::fs::sys::open_file_beneath(dir, name)?;
    set_immutable(fd.as_fd(), false)?;
    let r = rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty());
    let st = rustix::fs::fstat(&fd)?;
    if st.st_nlink > 0 {
        set_immutable(fd.as_fd(), true)?;
    }
    r.with_context(|| format!("cannot remove `{}`", crate::core::path::display(name)))
}

/// Which files of a tree are copies rather than links: all of them in reflink mode, and those
/// matching a `private` glob. Recorded beside the manifest as `<V>.layout.toml` so that
/// `verify` knows what to expect.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub copies: bool,
    #[serde(default)]
    pub private: Vec<String>,
    #[serde(skip)]
    patterns: Vec<glob::Pattern>,
}

impl Layout {
    pub fn new(mode: Mode, private: &[String]) -> Result<Layout> {
        let mut l = Layout {
            copies: mode == Mode::Reflink,
            private: private.to_vec(),
            patterns: Vec::new(),
        };
        l.compile()?;
        Ok(l)
    }

    fn compile(&mut self) -> Result<()> {
        self.patterns = self
            .private
            .iter()
            .map(|p| {
                glob::Pattern::new(p.trim_start_matches('/'))
                    .with_context(|| format!("invalid private glob `{p}`"))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Layout> {
        let mut l: Layout = toml::from_str(text).context("invalid layout file")?;
        l.compile()?;
        Ok(l)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Whether the file at `path` is a copy of its object rather than a link.
    pub fn is_copy(&self, path: &[u8]) -> bool {
        if self.copies {
            return true;
        }
        if self.patterns.is_empty() {
            return false;
        }
        let p = String::from_utf8_lossy(path);
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.patterns.iter().any(|g| g.matches_with(&p, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_globs() {
        let l = Layout::new(Mode::Hardlink, &["/etc/**".into(), "/var/**".into()]).unwrap();
        assert!(l.is_copy(b"etc/passwd"));
        assert!(l.is_copy(b"var/lib/dpkg/status"));
        assert!(!l.is_copy(b"usr/bin/ls"));
        assert!(!l.is_copy(b"etcetera"));
        let back = Layout::parse(&l.to_toml()).unwrap();
        assert!(back.is_copy(b"etc/x"));
        assert!(
            Layout::new(Mode::Reflink, &[])
                .unwrap()
                .is_copy(b"usr/bin/ls")
        );
    }
}
