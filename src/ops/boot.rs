//! `treeswap boot` and `treeswap mark-good`: run early at boot, before the guests start, to
//! finish or undo interrupted work and to count the boots of a tree not yet proven healthy.

use anyhow::Result;

use crate::core::config::Config;
use crate::core::failpoint;
use crate::fs::sys;
use crate::ops::flip::{self, Options};
use crate::store::root::Root;
use crate::store::state;

#[derive(Debug, PartialEq, Eq)]
pub enum BootOutcome {
    /// Nothing pending, or the pending tree has boots left.
    Ok,
    /// The pending tree used up its tries; treeswap flipped back to this version.
    Reverted(String),
}

/// Repairs the root (see [`repair`]), finishes recorded guest restarts, then counts the boot.
pub fn boot(root: &Root, cfg: &Config, opts: Options) -> Result<BootOutcome> {
    repair(root)?;
    let mut st = state::load(root.fd())?;
    if st.unprotected {
        let n = root.pool()?.reprotect()?;
        log::warn!("re-protected {n} pool object(s) left unprotected by an interrupted run");
        st.unprotected = false;
    }
    let current = root.link("current")?;
    // A flip cut short: finish it (point `previous` at the tree it left) if `current` changed,
    // forget it if not.
    if let Some(f) = st.flip.take()
        && current.as_deref() == Some(f.to.as_str())
        && f.from != f.to
        && root.is_installed(&f.from)?
    {
        log::info!("finishing an interrupted flip: `previous` is `{}`", f.from);
        root.set_link("previous", &f.from)?;
    }
    // A record for a flip that never happened (the crash came before the rename).
    if st
        .pending
        .as_ref()
        .map(|p| Some(&p.version) != current.as_ref())
        == Some(true)
    {
        log::info!("dropping the pending mark of a flip that did not happen");
        st.pending = None;
    }
    if st
        .restart
        .as_ref()
        .map(|r| Some(&r.target) != current.as_ref())
        == Some(true)
    {
        log::info!("dropping the guest restarts of a flip that did not happen");
        st.restart = None;
    }
    state::save(root.fd(), &st)?;
    if opts.restart && st.restart.is_some() {
        log::info!("finishing guest restarts cut short by an interruption");
        if let Err(e) = flip::finish_restarts(root, cfg, &mut st) {
            // As in apply: an unproven tree whose guests do not start is reverted.
            if st.pending.is_none() || root.link("previous")?.is_none() {
                return Err(e);
            }
            log::error!("{e:#}; reverting the pending tree");
            let prev = flip::revert(root, cfg, no_auto_revert(opts))?;
            return Ok(BootOutcome::Reverted(prev));
        }
    }
    failpoint::hit("boot-before-count");
    let Some(p) = st.pending.as_mut() else {
        return Ok(BootOutcome::Ok);
    };
    p.boots += 1;
    if p.boots <= cfg.boot.tries {
        log::info!(
            "`{}` is pending: boot {} of {} before it must be marked good",
            p.version,
            p.boots,
            cfg.boot.tries
        );
        state::save(root.fd(), &st)?;
        failpoint::hit("boot-after-count");
        return Ok(BootOutcome::Ok);
    }
    let version = p.version.clone();
    log::warn!(
        "`{version}` used up its {} boot(s) without being marked good; reverting",
        cfg.boot.tries
    );
    // Back to the tree that was good; never forward again to the unproven one.
    let prev = flip::revert(root, cfg, no_auto_revert(opts))?;
    failpoint::hit("boot-after-count");
    Ok(BootOutcome::Reverted(prev))
}

fn no_auto_revert(opts: Options) -> Options {
    Options {
        auto_revert: false,
        ..opts
    }
}

/// Makes `current` and `previous` name installed trees: a `current` naming a missing tree is
/// pointed at `previous` (or removed if there is none), a `previous` naming a missing tree or
/// the current one is removed. Leftovers in `tmp/` and `staging/` were removed when the lock
/// was taken.
pub fn repair(root: &Root) -> Result<()> {
    let named = |name: &str| -> Result<Option<String>> {
        match root.link(name) {
            Ok(v) => Ok(v),
            Err(e) => {
                log::warn!("{e:#}");
                Ok(Some(String::new()))
            }
        }
    };
    let installed = |v: &Option<String>| -> Result<bool> {
        match v {
            Some(v) if !v.is_empty() => root.is_installed(v),
            _ => Ok(false),
        }
    };
    let mut cur = named("current")?;
    let prev = named("previous")?;
    if cur.is_some() && !installed(&cur)? {
        if installed(&prev)? {
            let p = prev.clone().unwrap_or_default();
            log::warn!("`current` names a missing tree; pointing it at previous `{p}`");
            root.set_link("current", &p)?;
            cur = Some(p);
        } else {
            log::warn!("`current` names a missing tree and there is no previous; removing it");
            sys::unlinkat_ok(root.fd(), b"current", false)?;
            cur = None;
        }
    }
    if prev.is_some() && (!installed(&prev)? || prev == cur) {
        log::warn!("removing `previous`, which names a missing tree or the current one");
        sys::unlinkat_ok(root.fd(), b"previous", false)?;
        sys::fsync(root.fd())?;
    }
    Ok(())
}

/// Marks the pending tree good: boot counting stops for it.
pub fn mark_good(root: &Root) -> Result<Option<String>> {
    let mut st = state::load(root.fd())?;
    let Some(p) = st.pending.take() else {
        return Ok(None);
    };
    state::save(root.fd(), &st)?;
    Ok(Some(p.version))
}
