//! `treeswap checkout V DEST`: a hardlink farm of an installed version outside the root.

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::io::Errno;

use crate::core::config::Config;
use crate::core::version;
use crate::fs::sys;
use crate::ops::install::while_linking;
use crate::store::layout::Layout;
use crate::store::root::Root;
use crate::tree::stage;

/// Builds installed `version` at `dest`, which must not exist. The caller holds the lock
/// exclusively: in immutable mode the objects are briefly unprotected while they are linked,
/// which is recorded. On an error, what was built is removed (nothing, if `dest` existed).
pub(crate) fn checkout(root: &Root, cfg: &Config, version: &str, dest: &Path) -> Result<()> {
    version::validate(version)?;
    if !root.is_installed(version)? {
        bail!(
            "version `{version}` is not installed in `{}`",
            root.path.display()
        );
    }
    let m = root.load_manifest(version)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .with_context(|| format!("`{}` has no file name", dest.display()))?
        .as_bytes();
    let pfd = sys::open_dir(&parent)?;
    let pool = root.pool_for(cfg)?;
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let built = while_linking(root, &pool, || {
        stage::build(&m, &pool, &layout, pfd.as_fd(), name, false, None)
    })?;
    if let Err(e) = built {
        let existed = e
            .chain()
            .any(|c| c.downcast_ref::<Errno>() == Some(&Errno::EXIST));
        if !existed && let Err(r) = sys::remove_tree_at(pfd.as_fd(), name) {
            log::warn!(
                "cannot remove the partial checkout `{}`: {r:#}",
                dest.display()
            );
        }
        return Err(e.context(format!(
            "cannot check out `{version}` to `{}`",
            dest.display()
        )));
    }
    Ok(())
}
