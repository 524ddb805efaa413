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
//!
//! Overlay guests (`[[guest]] root = "overlay"`) never see a tree: they run on an overlay
//! whose lower layer is the tree, read-only, and whose upper layer is their own. A write
//! copies the file up first, so the tree and the pool stay as installed whatever the guest
//! does. But overlayfs copies the immutable flag up with the file, and the copy then refuses
//! the write: with overlay guests `auto` is `AutoUnflagged` (reflink, else hardlink) and an
//! explicit `immutable` is refused when the config is loaded.

use std::os::fd::BorrowedFd;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::core::config::Protect;
use crate::fs::iflags;

/// The protection a pool is written with: a config's [`Protect`] resolved on its file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    Immutable,
    Reflink,
    Hardlink,
}

impl Protection {
    pub fn name(self) -> &'static str {
        match self {
            Protection::Immutable => "immutable",
            Protection::Reflink => "reflink",
            Protection::Hardlink => "hardlink",
        }
    }
}

/// Resolves a setting to a mode by probing the file system of `tmp` (a directory of the root).
pub(crate) fn resolve(setting: Protect, tmp: BorrowedFd) -> Result<Protection> {
    let (can_clone, can_flag) = iflags::probe(tmp)?;
    let mode = match setting {
        Protect::Auto if can_clone => Protection::Reflink,
        Protect::Auto if can_flag => Protection::Immutable,
        Protect::AutoUnflagged if can_clone => Protection::Reflink,
        Protect::Auto | Protect::AutoUnflagged | Protect::Hardlink => Protection::Hardlink,
        Protect::Reflink if can_clone => Protection::Reflink,
        Protect::Reflink => {
            bail!("protect = \"reflink\": this file system cannot clone files (FICLONE)")
        }
        Protect::Immutable if can_flag => Protection::Immutable,
        Protect::Immutable => {
            bail!("protect = \"immutable\": this file system has no immutable flag")
        }
    };
    log::debug!("protection mode: {}", mode.name());
    Ok(mode)
}
