//! Building a tree from a manifest and the pool: directories, hardlinks to pool objects,
//! symlinks and special files, all created relative to directory handles that were opened
//! without following any symlink, so no manifest path can leave the tree being built.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, bail};
use rustix::fs::{FileType, Mode};

use crate::manifest::{Kind, Manifest};
use crate::path::split_parent;
use crate::pool::Pool;
use crate::progress::Progress;
use crate::protect::Layout;
use crate::sys;

/// Directory handles kept open while building; beyond this the cache starts over.
const DIR_CACHE: usize = 256;

/// Builds the tree of `m` as the new directory `name` in `parent`, which must not exist.
/// Regular files are hardlinks to their pool objects, or copies where `layout` says so.
/// Timestamps: regular files share the pool object's mtime (the epoch); directories,
/// symlinks and special files get the time they were built.
pub fn build(
    m: &Manifest,
    pool: &Pool,
    layout: &Layout,
    parent: BorrowedFd,
    name: &[u8],
) -> Result<()> {
    let top_entry = m.entries.first().context("empty manifest")?;
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
        .with_context(|| format!("cannot create `{}`", crate::path::display(name)))?;
    let top = sys::open_dir_beneath(parent, name)?;
    sys::apply_meta_fd(top.as_fd(), &top_entry.meta).context("on the top directory")?;
    let mut dirs: HashMap<Box<[u8]>, OwnedFd> = HashMap::new();
    let progress = Progress::items(m.entries.len() as u64, "staging");
    for e in &m.entries[1..] {
        progress.inc(1);
        let (ppath, base) = split_parent(&e.path);
        if ppath != b"." && !dirs.contains_key(ppath) {
            if dirs.len() >= DIR_CACHE {
                dirs.clear();
            }
            let fd = sys::open_dir_beneath(top.as_fd(), ppath)?;
            dirs.insert(ppath.into(), fd);
        }
        let pfd = if ppath == b"." {
            top.as_fd()
        } else {
            dirs[ppath].as_fd()
        };
        let res: Result<Option<OwnedFd>> = (|| {
            match &e.kind {
                Kind::Dir => {
                    rustix::fs::mkdirat(pfd, base, Mode::from_raw_mode(0o700))?;
                    let fd = sys::open_dir_beneath(pfd, base)?;
                    sys::apply_meta_fd(fd.as_fd(), &e.meta)?;
                    return Ok(Some(fd));
                }
                Kind::File { .. } => {
                    let id = e.object().expect("file");
                    if layout.is_copy(&e.path) {
                        pool.copy_to(&id, &e.meta, pfd, base)?;
                    } else {
                        pool.link(&id, pfd, base)?;
                    }
                }
                Kind::Symlink { target } => {
                    rustix::fs::symlinkat(&target[..], pfd, base)?;
                    sys::apply_meta_at(pfd, base, &e.meta, true)?;
                }
                Kind::Char { major, minor } | Kind::Block { major, minor } => {
                    let ft = if matches!(e.kind, Kind::Char { .. }) {
                        FileType::CharacterDevice
                    } else {
                        FileType::BlockDevice
                    };
                    rustix::fs::mknodat(
                        pfd,
                        base,
                        ft,
                        Mode::from_raw_mode(0o600),
                        rustix::fs::makedev(*major, *minor),
                    )?;
                    sys::apply_meta_at(pfd, base, &e.meta, false)?;
                }
                Kind::Fifo => {
                    rustix::fs::mknodat(pfd, base, FileType::Fifo, Mode::from_raw_mode(0o600), 0)?;
                    sys::apply_meta_at(pfd, base, &e.meta, false)?;
                }
            }
            Ok(None)
        })();
        if let Some(fd) = res.with_context(|| format!("cannot create `{}`", e.display()))? {
            if dirs.len() >= DIR_CACHE {
                dirs.clear();
            }
            dirs.insert(e.path.clone(), fd);
        }
    }
    progress.finish();
    if m.entries.len() > 1 && m.entries[0].path.as_ref() != b"." {
        bail!("manifest does not start with the top directory");
    }
    Ok(())
}
