//! btrfs subvolumes and snapshots: the ioctls of `btrfs subvolume create|snapshot|delete`
//! ([btrfs-ioctl(2)](https://btrfs.readthedocs.io/en/latest/btrfs-ioctl.html)).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result, bail};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// The inode number of every subvolume's top directory.
const SUBVOLUME_ROOT_INO: u64 = 256;
const SUBVOL_RDONLY: u64 = 1 << 1;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

nix::ioctl_write_ptr!(ioc_subvol_create, 0x94, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, 0x94, 15, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, 0x94, 23, VolArgsV2);
nix::ioctl_read!(ioc_subvol_getflags, 0x94, 25, u64);
nix::ioctl_write_ptr!(ioc_subvol_setflags, 0x94, 26, u64);

fn name_field<const N: usize>(name: &[u8]) -> Result<[u8; N]> {
    if name.is_empty() || name.len() >= N || name.contains(&0) || name.contains(&b'/') {
        bail!(
            "invalid subvolume name `{}`",
            crate::core::path::display(name)
        );
    }
    let mut out = [0u8; N];
    out[..name.len()].copy_from_slice(name);
    Ok(out)
}

/// Whether `fd` is on btrfs.
// `f_type`'s integer type differs between architectures.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn is_btrfs(fd: BorrowedFd) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|st| st.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Whether the open directory `fd` is the top of a btrfs subvolume.
pub(crate) fn is_subvolume(fd: BorrowedFd) -> bool {
    is_btrfs(fd) && rustix::fs::fstat(fd).is_ok_and(|st| st.st_ino == SUBVOLUME_ROOT_INO)
}

/// Creates the empty subvolume `name` in `parent`.
pub(crate) fn create(parent: BorrowedFd, name: &[u8]) -> Result<()> {
    vol_ioctl(parent, name, ioc_subvol_create).with_context(|| {
        format!(
            "cannot create subvolume `{}`",
            crate::core::path::display(name)
        )
    })
}

/// One of the ioctls that take a `btrfs_ioctl_vol_args` naming `name` in `parent`.
fn vol_ioctl(
    parent: BorrowedFd,
    name: &[u8],
    ioctl: unsafe fn(i32, *const VolArgs) -> nix::Result<i32>,
) -> Result<()> {
    let args = VolArgs {
        fd: 0,
        name: name_field(name)?,
    };
    // SAFETY: `args` is a valid, initialised `btrfs_ioctl_vol_args` for the call's duration.
    unsafe { ioctl(parent.as_raw_fd(), &args) }?;
    Ok(())
}

/// Makes `name` in `parent` a snapshot of the subvolume open as `src`.
pub(crate) fn snapshot(
    src: BorrowedFd,
    parent: BorrowedFd,
    name: &[u8],
    read_only: bool,
) -> Result<()> {
    let args = VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: if read_only { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: name_field(name)?,
    };
    // SAFETY: `args` is a valid, initialised `btrfs_ioctl_vol_args_v2` for the call's duration.
    unsafe { ioc_snap_create_v2(parent.as_raw_fd(), &args) }
        .with_context(|| format!("cannot snapshot to `{}`", crate::core::path::display(name)))?;
    Ok(())
}

/// Makes the subvolume open as `fd` writable if it is read-only
/// (`BTRFS_IOC_SUBVOL_GETFLAGS`, `BTRFS_IOC_SUBVOL_SETFLAGS`), so that what is in it can be
/// removed: its owner may have made it read-only with a subvolume of its own inside, which
/// the subvolume ioctl cannot delete with it.
pub(crate) fn make_writable(fd: BorrowedFd) -> Result<()> {
    let mut flags = 0u64;
    // SAFETY: `flags` is a valid `u64` for the kernel to write for the call's duration.
    unsafe { ioc_subvol_getflags(fd.as_raw_fd(), &mut flags) }
        .context("cannot read the subvolume's flags")?;
    if flags & SUBVOL_RDONLY != 0 {
        let writable = flags & !SUBVOL_RDONLY;
        // SAFETY: `writable` is a valid `u64` for the call's duration.
        unsafe { ioc_subvol_setflags(fd.as_raw_fd(), &writable) }
            .context("cannot make the subvolume writable")?;
    }
    Ok(())
}

/// Deletes the subvolume `name` in `parent`, with everything in it.
pub(crate) fn destroy(parent: BorrowedFd, name: &[u8]) -> Result<()> {
    vol_ioctl(parent, name, ioc_snap_destroy).with_context(|| {
        format!(
            "cannot delete subvolume `{}`",
            crate::core::path::display(name)
        )
    })
}
