//! `treeswap import DIR --version V`: hash a directory into the pool and install it as a tree.
//!
//! Steps: scan and hash DIR (each new object is copied into the pool as it is hashed, and
//! re-hashed while copied so that a file changed under our feet is caught); build
//! `staging/<V>` from the pool; write `manifests/<V>.toml`; `syncfs`; rename `staging/<V>` to
//! `trees/<V>` (the commit point); fsync `trees/`. DIR is only read.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::manifest::Manifest;
use crate::object::object_id;
use crate::pool::FdReader;
use crate::protect::Layout;
use crate::root::Root;
use crate::{scan, stage, sys, version};

pub fn import(root: &Root, cfg: &Config, dir: &Path, version: &str) -> Result<Manifest> {
    version::validate(version)?;
    if root.is_installed(version)? {
        bail!(
            "version `{version}` is already installed in `{}`",
            root.path.display()
        );
    }
    let pool = root.pool_for(cfg)?;
    let hook = |fd: std::os::fd::BorrowedFd,
                meta: &crate::object::Meta,
                size: u64,
                sha: &crate::manifest::Hash|
     -> Result<()> {
        if pool.has(&object_id(meta, size, sha))? {
            return Ok(());
        }
        pool.store(&mut FdReader { fd, off: 0 }, meta, size, sha)
            .context("the file changed while it was being imported")?;
        Ok(())
    };
    let scanned = scan::scan(dir, true, Some(&hook))?;
    crate::failpoint::hit("import-after-objects");
    let mut m = scanned.manifest;
    m.version = Some(version.to_owned());
    log::info!(
        "hashed `{}`: {} entries, digest {}",
        dir.display(),
        m.entries.len(),
        hex::encode(m.digest())
    );
    install(root, cfg, &pool, &m, false, None)?;
    Ok(m)
}

/// Builds `staging/<V>` from the pool and commits it as `trees/<V>` (see the module doc);
/// with `verify`, the staged tree is checked entry by entry against `m` before the commit.
/// `during` is work to do while the tree is built (see [`stage::During`]).
pub fn install(
    root: &Root,
    cfg: &Config,
    pool: &crate::pool::Pool,
    m: &Manifest,
    verify: bool,
    during: Option<stage::During>,
) -> Result<()> {
    let version = m.version.as_deref().context("manifest has no version")?;
    let staging = root.subdir("staging")?;
    sys::remove_tree_at(staging.as_fd(), version.as_bytes())?;
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let immutable = pool.mode() == crate::protect::Mode::Immutable;
    if immutable {
        // Objects are briefly unprotected while they are linked; a crash before the record is
        // cleared makes `boot` re-protect the pool.
        crate::protect::mark_unprotected(root, true)?;
    }
    let built = stage::build(
        m,
        pool,
        &layout,
        staging.as_fd(),
        version.as_bytes(),
        during,
    );
    if immutable {
        crate::protect::mark_unprotected(root, false)?;
    }
    if let Err(e) = built {
        // Give back what the half-built tree took; the next writer would remove it anyway.
        if let Err(e2) = sys::remove_tree_at(staging.as_fd(), version.as_bytes()) {
            log::warn!("cannot remove `staging/{version}`: {e2:#}");
        }
        return Err(e.context(format!("cannot build `staging/{version}`")));
    }
    log::debug!("staged `staging/{version}`");
    crate::failpoint::hit("stage-after-build");
    if verify {
        let staged = sys::open_dir_beneath(staging.as_fd(), version.as_bytes())?;
        let problems = crate::verify::verify_tree(staged.as_fd(), m, pool, &layout, false)?;
        if !problems.is_empty() {
            return Err(crate::error::Fail::Verify(format!(
                "the staged tree `staging/{version}` does not match its manifest: {}",
                problems.join("; ")
            ))
            .into());
        }
    }
    log::debug!("verified `staging/{version}`");
    root.write_manifest(version, m)?;
    fs_err::write(root.layout_path(version), layout.to_toml())?;
    crate::failpoint::hit("stage-before-syncfs");
    root.syncfs()?;
    log::debug!("wrote the manifest and synced the file system");
    crate::failpoint::hit("stage-after-syncfs");
    let trees = root.subdir("trees")?;
    rustix::fs::renameat(staging.as_fd(), version, trees.as_fd(), version)
        .with_context(|| format!("cannot rename `staging/{version}` to `trees/{version}`"))?;
    sys::fsync(trees.as_fd())?;
    crate::failpoint::hit("stage-after-commit");
    log::info!("installed version `{version}`");
    Ok(())
}
