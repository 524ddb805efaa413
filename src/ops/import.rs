//! `treeswap import DIR --version V`: hash a directory into the pool and install it as a tree.
//!
//! Steps: scan and hash DIR (each new object is copied into the pool as it is hashed, and
//! re-hashed while copied so that a file changed under our feet is caught); build
//! `staging/<V>` from the pool; write `manifests/<V>.toml` (through a temporary name; when
//! staging from a snapshot, on another thread meanwhile); `syncfs`; rename `staging/<V>` to
//! `trees/<V>` (the commit point); fsync `trees/`. DIR is only read.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::core::config::Config;
use crate::core::manifest::Manifest;
use crate::core::object::object_id;
use crate::core::version;
use crate::fs::sys;
use crate::store::pool::FdReader;
use crate::store::protect::Layout;
use crate::store::root::Root;
use crate::tree::{scan, stage};

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
                meta: &crate::core::object::Meta,
                size: u64,
                sha: &crate::core::manifest::Hash|
     -> Result<()> {
        if pool.has(&object_id(meta, size, sha))? {
            return Ok(());
        }
        pool.store(&mut FdReader { fd, off: 0 }, meta, size, sha)
            .context("the file changed while it was being imported")?;
        Ok(())
    };
    let scanned = scan::scan(dir, true, Some(&hook))?;
    crate::core::failpoint::hit("import-after-objects");
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
    pool: &crate::store::pool::Pool,
    m: &Manifest,
    verify: bool,
    during: Option<stage::During>,
) -> Result<()> {
    let version = m.version.as_deref().context("manifest has no version")?;
    let staging = root.subdir("staging")?;
    sys::remove_tree_at(staging.as_fd(), version.as_bytes())?;
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let snapshots = crate::tree::snapshot::enabled(root.fd(), pool);
    let built = crate::store::protect::while_linking(root, pool, || {
        stage::build(
            m,
            pool,
            &layout,
            staging.as_fd(),
            version.as_bytes(),
            snapshots,
            during,
        )
    })?;
    if let Err(e) = built {
        discard_staging(staging.as_fd(), version);
        return Err(e.context(format!("cannot build `staging/{version}`")));
    }
    log::debug!("staged `staging/{version}`");
    crate::core::failpoint::hit("stage-after-build");
    let res = (|| -> Result<()> {
        if verify {
            let staged = sys::open_dir_beneath(staging.as_fd(), version.as_bytes())?;
            let problems =
                crate::tree::verify::verify_tree(staged.as_fd(), m, pool, &layout, false)?;
            if !problems.is_empty() {
                return Err(crate::core::error::Fail::Verify(format!(
                    "the staged tree `staging/{version}` does not match its manifest: {}",
                    problems.join("; ")
                ))
                .into());
            }
        }
        log::debug!("verified `staging/{version}`");
        root.write_manifest_tmp(version, m, None)?;
        commit(root, version, &layout, staging.as_fd(), snapshots)
    })();
    if let Err(e) = res {
        if !root.is_installed(version).unwrap_or(true) {
            discard_staging(staging.as_fd(), version);
        }
        return Err(e);
    }
    Ok(())
}

/// Runs `stage`, which builds and checks `staging/<V>`, while the manifest `m` is written to
/// its temporary name on another thread. If either fails, the temporary manifest is removed.
/// (For a tree staged from a snapshot, writing the manifest takes as long as the staging.)
fn with_manifest_written(
    root: &Root,
    m: &Manifest,
    digest: Option<&crate::core::manifest::Hash>,
    version: &str,
    stage: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let res = std::thread::scope(|s| {
        let written = s.spawn(|| root.write_manifest_tmp(version, m, digest));
        let staged = stage();
        let written = written
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the manifest writer panicked")));
        staged.and(written)
    });
    if res.is_err() {
        root.discard_manifest_tmp(version);
    }
    res
}

/// Commits the staged and verified `staging/<V>`, whose manifest is written to its temporary
/// name: writes the layout, names the manifest, syncs, keeps the tree's read-only snapshot
/// (`snapshots`), and renames it to `trees/<V>`, the commit point.
fn commit(
    root: &Root,
    version: &str,
    layout: &Layout,
    staging: std::os::fd::BorrowedFd,
    snapshots: bool,
) -> Result<()> {
    root.publish_manifest(version)?;
    let trees = root.subdir("trees")?;
    let committed = (|| -> Result<()> {
        fs_err::write(root.layout_path(version), layout.to_toml())?;
        log::debug!("wrote the manifest");
        crate::core::failpoint::check("stage-before-syncfs")?;
        root.syncfs()?;
        log::debug!("wrote the manifest and synced the file system");
        crate::core::failpoint::check("stage-after-syncfs")?;
        if snapshots {
            let staged = sys::open_dir_beneath(staging, version.as_bytes())?;
            crate::tree::snapshot::keep_pristine(root, staged.as_fd(), version)?;
            log::debug!("kept the read-only snapshot `snapshots/{version}`");
        }
        crate::core::failpoint::check("stage-before-commit")?;
        rustix::fs::renameat(staging, version, trees.as_fd(), version)
            .with_context(|| format!("cannot rename `staging/{version}` to `trees/{version}`"))
    })();
    if let Err(e) = committed {
        // The version is not installed: what names it goes, as if nothing had happened.
        if let Err(e) = root.forget(version) {
            log::warn!("cannot remove what names the uninstalled version `{version}`: {e:#}");
        }
        return Err(e);
    }
    sys::fsync(trees.as_fd())?;
    crate::core::failpoint::hit("stage-after-commit");
    log::info!("installed version `{version}`");
    Ok(())
}

/// Installs the tree of `m`, which is installed version `base` changed by `d`, by starting
/// from the read-only snapshot of `base` (see snapshot.rs): only the entries `d` changes are
/// made and checked, while `write` makes the new objects on the calling thread. Returns `false`, having done
/// nothing, where that is not possible (not btrfs in reflink mode, or no snapshot of
/// `base`); the caller then builds the whole tree.
pub fn install_by_snapshot(
    root: &Root,
    cfg: &Config,
    pool: &crate::store::pool::Pool,
    m: &Manifest,
    base: &str,
    d: &crate::core::delta::Delta,
    write: &mut dyn FnMut() -> Result<()>,
) -> Result<bool> {
    if !crate::tree::snapshot::enabled(root.fd(), pool) {
        return Ok(false);
    }
    let version = m.version.as_deref().context("manifest has no version")?;
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let staging = root.subdir("staging")?;
    sys::remove_tree_at(staging.as_fd(), version.as_bytes())?;
    if !crate::tree::snapshot::start_from(root, staging.as_fd(), base, version)? {
        return Ok(false);
    }
    log::debug!("snapshot of `{base}` taken");
    let stage = || -> Result<()> {
        let top = sys::open_dir_beneath(staging.as_fd(), version.as_bytes())?;
        let problems = crate::tree::snapshot::change(
            top.as_fd(),
            m,
            &d.changed,
            &d.removed,
            pool,
            &layout,
            write,
        )?;
        log::debug!("changed and checked the entries");
        log::info!(
            "staged `staging/{version}` from the snapshot of `{base}` ({} entries changed, {} removed)",
            d.changed.len(),
            d.removed.len()
        );
        crate::core::failpoint::hit("stage-after-build");
        if !problems.is_empty() {
            return Err(crate::core::error::Fail::Verify(format!(
                "the staged tree `staging/{version}` does not match its manifest: {}",
                problems.join("; ")
            ))
            .into());
        }
        Ok(())
    };
    let res = with_manifest_written(root, m, Some(&d.to_digest), version, stage)
        .and_then(|()| commit(root, version, &layout, staging.as_fd(), true));
    if let Err(e) = res {
        discard_staging(staging.as_fd(), version);
        return Err(e);
    }
    Ok(true)
}

/// Gives back what a tree that failed half-way took: removes `staging/<version>`, only warning
/// if it cannot (the next writer removes it anyway).
fn discard_staging(staging: std::os::fd::BorrowedFd, version: &str) {
    if let Err(e) = sys::remove_tree_at(staging, version.as_bytes()) {
        log::warn!("cannot remove `staging/{version}`: {e:#}");
    }
}
