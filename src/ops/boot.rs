//! `treeswap boot` and `treeswap mark-good`: run early at boot, before the guests start, to
//! finish or undo interrupted work and to count the boots of a tree not yet proven healthy.

use anyhow::Result;

use crate::core::config::Config;
use crate::core::failpoint;
use crate::fs::sys;
use crate::ops::flip::{self, Options};
use crate::ops::install;
use crate::store::root::Root;
use crate::store::state::{self, State};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BootOutcome {
    /// Nothing pending, or the pending tree has boots left.
    Ok,
    /// The pending tree used up its tries, or its guests failed (the error, for the one
    /// error line); treeswap flipped back to this version.
    Reverted(String, Option<String>),
}

/// Repairs the root (see [`repair`]), re-protects the pool if immutable work was cut short,
/// settles the records of an interrupted flip, finishes recorded guest restarts, then counts
/// the boot.
pub(crate) fn boot(root: &Root, cfg: &Config, opts: Options) -> Result<BootOutcome> {
    repair(root)?;
    let mut st = state::load(root.fd())?;
    // After a sweep (`unflagged`) there is work only if the pool may be immutable again:
    // the mode is then probed (files made in `tmp/`), which boots need not do otherwise.
    let may_be_immutable = matches!(
        cfg.protect,
        crate::core::config::Protect::Auto | crate::core::config::Protect::Immutable
    );
    if st.unprotected || st.unflagged && may_be_immutable {
        // Re-protected in immutable mode; in another (overlay guests came since) the flags
        // are cleared instead. A failure is warned about and the boot still counted: the
        // records stay, so the next writer does it again.
        let done = root
            .pool_for(cfg)
            .and_then(|pool| install::match_flags(root, &pool, &mut st));
        if let Err(e) = done {
            log::warn!("cannot bring the pool's immutable flags in line with its mode: {e:#}");
            st = state::load(root.fd())?;
        }
    }
    settle_flip(root, &mut st)?;
    state::save(root.fd(), &st)?;
    // From here on each guest on its own, and the boot is counted whatever they do: a
    // guest that fails is warned about, the others are restarted and mounted, and the error
    // (the first) comes after the count.
    let mut failed: Option<anyhow::Error> = None;
    if opts.restart && st.restart.is_some() {
        log::info!("finishing guest restarts cut short by an interruption");
        if let Err(e) = flip::finish_restarts_each(root, cfg, &mut st) {
            // As in apply: an unproven tree whose guests do not start is reverted.
            if st.pending.is_some() && root.link("previous")?.is_some() {
                // Said once, in the command's error line.
                log::info!("a guest did not restart on the pending tree; reverting it");
                let prev = flip::revert(root, cfg, no_auto_revert(opts))?;
                return Ok(BootOutcome::Reverted(prev, Some(format!("{e:#}"))));
            }
            failed = Some(e);
        }
    }
    // Overlay guests with nothing mounted (as after a reboot) get their overlay on `current`.
    if let Err(e) = crate::ops::guest::mount_all(root, cfg, &mut st) {
        failed.get_or_insert(e);
    }
    failpoint::hit("boot-before-count");
    match (count(root, cfg, opts, st)?, failed) {
        (BootOutcome::Ok, Some(e)) => Err(e),
        (outcome, _) => Ok(outcome),
    }
}

/// Settles what the state file says of a flip against where `current` points: a flip cut
/// short is finished (`previous` pointed at the tree it left) if `current` changed and
/// forgotten if not; a pending mark or guest restarts recorded for a flip that never happened
/// (the crash came before the rename) are dropped.
fn settle_flip(root: &Root, st: &mut State) -> Result<()> {
    let current = root.link("current")?;
    if let Some(f) = st.flip.take()
        && current.as_deref() == Some(f.to.as_str())
        && f.from != f.to
        && root.is_installed(&f.from)?
    {
        log::info!("finishing an interrupted flip: `previous` is `{}`", f.from);
        root.set_link("previous", &f.from)?;
    }
    if st
        .pending
        .as_ref()
        .is_some_and(|p| Some(&p.version) != current.as_ref())
    {
        log::info!("dropping the pending mark of a flip that did not happen");
        st.pending = None;
    }
    if st
        .restart
        .as_ref()
        .is_some_and(|r| Some(&r.target) != current.as_ref())
    {
        log::info!("dropping the guest restarts of a flip that did not happen");
        st.restart = None;
    }
    Ok(())
}

/// Counts this boot of the pending tree, if there is one, and reverts it once it has used up
/// its tries without being marked good.
fn count(root: &Root, cfg: &Config, opts: Options, mut st: State) -> Result<BootOutcome> {
    let Some(p) = st.pending.as_mut() else {
        return Ok(BootOutcome::Ok);
    };
    p.boots += 1;
    p.boot_id = Some(sys::boot_id()?);
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
    Ok(BootOutcome::Reverted(prev, None))
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
pub(crate) fn repair(root: &Root) -> Result<()> {
    let mut cur = Link::read(root, "current");
    let prev = Link::read(root, "previous");
    if cur != Link::Absent && !cur.is_installed(root)? {
        if let Link::Version(p) = &prev
            && root.is_installed(p)?
        {
            log::warn!("`current` names a missing tree; pointing it at previous `{p}`");
            root.set_link("current", p)?;
            cur = prev.clone();
        } else {
            log::warn!("`current` names a missing tree and there is no previous; removing it");
            sys::unlinkat_ok(root.fd(), b"current", false)?;
            cur = Link::Absent;
        }
    }
    if prev != Link::Absent && (!prev.is_installed(root)? || prev == cur) {
        log::warn!("removing `previous`, which names a missing tree or the current one");
        sys::unlinkat_ok(root.fd(), b"previous", false)?;
        sys::fsync(root.fd())?;
    }
    Ok(())
}

/// What `current` or `previous` is, as `repair` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Link {
    /// There is no such link.
    Absent,
    /// The link exists but names no version (a wrong target, not a symlink): logged.
    Broken,
    Version(String),
}

impl Link {
    fn read(root: &Root, name: &str) -> Link {
        match root.link(name) {
            Ok(Some(v)) => Link::Version(v),
            Ok(None) => Link::Absent,
            Err(e) => {
                log::warn!("{e:#}");
                Link::Broken
            }
        }
    }

    fn is_installed(&self, root: &Root) -> Result<bool> {
        match self {
            Link::Version(v) => root.is_installed(v),
            Link::Absent | Link::Broken => Ok(false),
        }
    }
}

/// Marks the pending tree good: boot counting stops for it. With `check`, only if it is
/// healthy (see [`check_health`]); a failed check leaves it pending and says why.
pub(crate) fn mark_good(root: &Root, cfg: &Config, check: bool) -> Result<Option<String>> {
    let mut st = state::load(root.fd())?;
    let Some(p) = st.pending.take() else {
        return Ok(None);
    };
    if check {
        check_health(cfg, &p, &st)?;
    }
    state::save(root.fd(), &st)?;
    Ok(Some(p.version))
}

/// Whether the pending tree `p` is healthy: it runs in this boot (it was flipped to in this
/// boot, or `treeswap boot` counted this boot of it), every guest was restarted onto it (no
/// restart is left to finish), and every configured check passes: each guest's `check`,
/// then `[health] command`. With no check configured, the first two are the health check.
fn check_health(cfg: &Config, p: &state::Pending, st: &State) -> Result<()> {
    let unhealthy = |why: String| -> anyhow::Error {
        crate::core::error::Fail::Verify(format!("`{}` stays pending: {why}", p.version)).into()
    };
    if p.boot_id.as_deref() != Some(sys::boot_id()?.as_str()) {
        return Err(unhealthy(
            "it has not run in this boot yet (`treeswap boot` did not count this boot)".into(),
        ));
    }
    if let Some(r) = &st.restart {
        return Err(unhealthy(format!(
            "guest restarts onto it are unfinished ({} left)",
            r.guests.len()
        )));
    }
    for g in &cfg.guests {
        crate::ops::guests::check(g).map_err(|e| unhealthy(format!("{e:#}")))?;
    }
    if let Some(argv) = &cfg.health.command {
        crate::ops::guests::run("health check", argv, cfg.health.timeout)
            .map_err(|e| unhealthy(format!("{e:#}")))?;
    }
    Ok(())
}
