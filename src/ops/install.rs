//! Installing a tree: staging it from the pool (or from its base's snapshot), verifying it,
//! writing its manifest and committing it as `trees/<V>`; shared by `import` and `apply`.
//!
//! Steps: build `staging/<V>` from the pool; write `manifests/<V>.toml` (through a temporary
//! name; when staging from a snapshot, on another thread meanwhile) and `layouts/<V>.toml`;
//! `syncfs`; rename `staging/<V>` to `trees/<V>` (the commit point); fsync `trees/`.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};

use crate::core::config::Config;
use crate::core::delta::Delta;
use crate::core::error::Fail;
use crate::core::failpoint;
use crate::core::manifest::Manifest;
use crate::core::object::Hash;
use crate::fs::sys;
use crate::store::layout::Layout;
use crate::store::pool::Pool;
use crate::store::protect::Protection;
use crate::store::root::Root;
use crate::store::state::{self, State};
use crate::tree::{restage, stage, verify};

/// Builds `staging/<V>` from the pool and commits it as `trees/<V>` (see the module doc);
/// with `verify`, the staged tree is checked entry by entry against `m` before the commit.
/// `during` is work to do while the tree is built (see [`stage::During`]).
pub(crate) fn install(
    root: &Root,
    cfg: &Config,
    pool: &Pool,
    m: &Manifest,
    verify: bool,
    during: Option<stage::During>,
) -> Result<()> {
    let version = m.version.as_deref().context("manifest has no version")?;
    let staging = root.subdir("staging")?;
    root.remove_or_set_aside(staging.as_fd(), "staging", version.as_bytes());
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let snapshots = root.snapshots_enabled(pool);
    let built = while_linking(root, pool, || {
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
        discard_staging(root, staging.as_fd(), version);
        return Err(e.context(format!("cannot build `staging/{version}`")));
    }
    log::debug!("staged `staging/{version}`");
    failpoint::hit("stage-after-build");
    let res = (|| -> Result<()> {
        if verify {
            let staged = sys::open_dir_beneath(staging.as_fd(), version.as_bytes())?;
            crate::core::progress::phase(&format!("verifying the staged tree `{version}`"));
            let problems = verify::verify_tree(staged.as_fd(), m, pool, &layout, false)?;
            if !problems.is_empty() {
                return Err(Fail::Verify(format!(
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
            discard_staging(root, staging.as_fd(), version);
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
    digest: Option<&Hash>,
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
    staging: BorrowedFd,
    snapshots: bool,
) -> Result<()> {
    root.publish_manifest(version)?;
    let trees = root.subdir("trees")?;
    let committed = (|| -> Result<()> {
        fs_err::write(root.layout_path(version), layout.to_toml())?;
        log::debug!("wrote the manifest");
        failpoint::check("stage-before-syncfs")?;
        crate::core::progress::phase("syncing to disk");
        root.syncfs()?;
        log::debug!("wrote the manifest and synced the file system");
        failpoint::check("stage-after-syncfs")?;
        if snapshots {
            let staged = sys::open_dir_beneath(staging, version.as_bytes())?;
            root.keep_pristine(staged.as_fd(), version)?;
            log::debug!("kept the read-only snapshot `snapshots/{version}`");
        }
        failpoint::check("stage-before-commit")?;
        sys::renameat(
            staging,
            version.as_bytes(),
            trees.as_fd(),
            version.as_bytes(),
        )
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
    failpoint::hit("stage-after-commit");
    log::info!("installed version `{version}`");
    Ok(())
}

/// Installs the tree of `m`, which is installed version `base` changed by `d`, by starting
/// from the read-only snapshot of `base` (see `tree::restage`): only the entries `d` changes are
/// made and checked, while `write` makes the new objects on the calling thread. Returns `false`, having done
/// nothing, where that is not possible (not btrfs in reflink mode, or no snapshot of
/// `base`); the caller then builds the whole tree.
pub(crate) fn install_by_snapshot(
    root: &Root,
    cfg: &Config,
    pool: &Pool,
    m: &Manifest,
    base: &str,
    d: &Delta,
    write: &mut dyn FnMut() -> Result<()>,
) -> Result<bool> {
    if !root.snapshots_enabled(pool) {
        return Ok(false);
    }
    let version = m.version.as_deref().context("manifest has no version")?;
    let layout = Layout::new(pool.mode(), &cfg.private)?;
    let staging = root.subdir("staging")?;
    root.remove_or_set_aside(staging.as_fd(), "staging", version.as_bytes());
    if !root.stage_from_snapshot(staging.as_fd(), base, version)? {
        return Ok(false);
    }
    log::debug!("snapshot of `{base}` taken");
    let stage = || -> Result<()> {
        let top = sys::open_dir_beneath(staging.as_fd(), version.as_bytes())?;
        let problems =
            restage::change(top.as_fd(), m, &d.changed, &d.removed, pool, &layout, write)?;
        log::debug!("changed and checked the entries");
        log::info!(
            "staged `staging/{version}` from the snapshot of `{base}` ({} entries changed, {} removed)",
            d.changed.len(),
            d.removed.len()
        );
        failpoint::hit("stage-after-build");
        if !problems.is_empty() {
            return Err(Fail::Verify(format!(
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
        discard_staging(root, staging.as_fd(), version);
        return Err(e);
    }
    Ok(true)
}

/// Gives back what a tree that failed half-way took: removes `staging/<version>`, or sets it
/// aside with a warning if it cannot (see [`Root::remove_or_set_aside`]).
fn discard_staging(root: &Root, staging: BorrowedFd, version: &str) {
    root.remove_or_set_aside(staging, "staging", version.as_bytes());
}

/// Runs `link`, which links pool objects into a tree. In immutable mode objects are briefly
/// unprotected while they are linked, so that is recorded around it: a crash before the record
/// is cleared makes `boot` re-protect the pool. A record found already set was left by an
/// interrupted run: the pool is re-protected first, as the record is about to be cleared. If
/// `link` fails, the record stays: an object whose flag it had cleared may still lack it, and
/// the next writer (or `boot`) re-protects the pool.
pub(crate) fn while_linking<T>(
    root: &Root,
    pool: &Pool,
    link: impl FnOnce() -> Result<T>,
) -> Result<Result<T>> {
    let mut st = state::load(root.fd())?;
    // A pool made in another mode before gets its flags first: the kernel refuses links to
    // an immutable object, and immutable mode means every object has the flag.
    match_flags(root, pool, &mut st)?;
    if pool.mode() != Protection::Immutable {
        return Ok(link());
    }
    st.unprotected = true;
    state::save(root.fd(), &st)?;
    let r = link();
    if r.is_ok() {
        // Nothing else writes the state file while the lock is held: `st` is what it holds.
        st.unprotected = false;
        state::save(root.fd(), &st)?;
    }
    Ok(r)
}

/// Brings the pool's flags in line with the mode it is written in (`pool.mode()`), and
/// records that in `st` (saved if it changes):
/// - in a mode without the flag (overlay guests, `reflink`, `hardlink`), clears it from every
///   object, once: a pool made in immutable mode (the default on ext4 before overlay guests)
///   still carries it, the kernel refuses links to those objects, and overlayfs copies the
///   flag up with a file and then refuses the guest's write. `unflagged` records the sweep;
/// - in immutable mode, sets it again on every object that lacks it: after such a sweep
///   (`unflagged`), or after work cut short with objects unprotected (`unprotected`).
pub(crate) fn match_flags(root: &Root, pool: &Pool, st: &mut State) -> Result<()> {
    let immutable = pool.mode() == Protection::Immutable;
    if immutable && !st.unflagged && !st.unprotected || !immutable && st.unflagged {
        return Ok(());
    }
    let was_swept = st.unflagged;
    // Recorded before the work: a kill midway leaves objects with and without the flag, and
    // `unprotected` then makes the next run in either mode do the whole pool again.
    if !st.unprotected || st.unflagged {
        st.unprotected = true;
        st.unflagged = false;
        state::save(root.fd(), st)?;
    }
    if immutable {
        let n = pool.reprotect()?;
        if was_swept {
            log::warn!(
                "set the immutable flag on {n} pool object(s): the pool is written in \
                 immutable mode again"
            );
        } else if n > 0 {
            log::warn!("re-protected {n} pool object(s) left unprotected by an interrupted run");
        }
    } else {
        let n = pool.unflag_all()?;
        if n > 0 {
            log::warn!(
                "cleared the immutable flag of {n} pool object(s): the pool is no longer \
                 written in immutable mode"
            );
        }
    }
    // The flags durable before the record says they are done (an fsync of the state file
    // alone does not make other inodes' changes durable on every file system).
    sys::syncfs(root.fd())?;
    st.unprotected = false;
    st.unflagged = !immutable;
    state::save(root.fd(), st)
}
