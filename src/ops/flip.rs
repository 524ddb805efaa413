//! Flipping `current`: the one `rename(2)` at which the running system changes, followed by
//! the guest restarts that make every guest run on the new tree.
//!
//! Order, so that a crash at any point is finished or undone by `treeswap boot`:
//! 1. the state file records the new tree as pending and the guests still to restart onto it;
//! 2. `current` is replaced (the commit point), then `previous`;
//! 3. each guest is restarted and struck off the list as it succeeds.
//!
//! If a restart fails, treeswap flips back and restarts the guests onto the old tree.

use anyhow::{Result, bail};

use crate::core::config::Config;
use crate::core::error::Fail;
use crate::core::failpoint;
use crate::store::root::Root;
use crate::store::state::{self, Pending, Restart, State};

#[derive(Clone, Copy)]
pub struct Options {
    /// Restart the guests after the flip.
    pub restart: bool,
    /// Flip back if a guest fails to restart.
    pub auto_revert: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            restart: true,
            auto_revert: true,
        }
    }
}

/// Points `current` at `version` (pending until marked good) and `previous` at what was
/// current, then restarts the guests.
pub(crate) fn switch(root: &Root, cfg: &Config, version: &str, opts: Options) -> Result<()> {
    flip(root, cfg, version, opts, true)
}

/// Flips `current` back to `previous`, and `previous` to what was current. The tree flipped
/// to is good.
pub(crate) fn revert(root: &Root, cfg: &Config, opts: Options) -> Result<String> {
    let Some(prev) = root.link("previous")? else {
        return Err(Fail::Nothing("there is no previous version to revert to".into()).into());
    };
    flip(root, cfg, &prev, opts, false)?;
    Ok(prev)
}

fn flip(root: &Root, cfg: &Config, version: &str, opts: Options, pending: bool) -> Result<()> {
    crate::core::version::validate(version)?;
    if !root.is_installed(version)? {
        bail!(
            "version `{version}` is not installed in `{}`",
            root.path.display()
        );
    }
    let old = root.link("current")?;
    if old.as_deref() == Some(version) {
        return Err(Fail::Nothing(format!("`{version}` is already current")).into());
    }
    let mut st = state::load(root.fd())?;
    // Restored if the guests fail and treeswap flips back: an unproven tree stays unproven.
    let pending_before = st.pending.clone();
    if pending {
        st.pending = (cfg.boot.tries > 0).then(|| Pending {
            version: version.to_owned(),
            boots: 0,
            // The tree runs from this boot on: its guests are restarted onto it now.
            boot_id: crate::fs::sys::boot_id().ok(),
        });
    }
    // A flip back to a good tree clears the pending mark only once `current` has changed: a
    // crash before that must leave the unproven tree counted, so that `boot` reverts it.
    st.flip = old.as_ref().map(|from| state::Flip {
        from: from.clone(),
        to: version.to_owned(),
    });
    // Tree-mode guests run on the tree being left until they are restarted (never, with
    // `--no-restart`): recorded for gc. A guest no longer configured in tree mode drops out.
    st.tree_guests
        .retain(|n, _| cfg.guests.iter().any(|g| &g.name == n && !g.is_overlay()));
    if let Some(from) = &old {
        for g in cfg.guests.iter().filter(|g| !g.is_overlay()) {
            st.tree_guests
                .entry(g.name.clone())
                .or_insert_with(|| from.clone());
        }
    }
    st.restart = (opts.restart && !cfg.guests.is_empty()).then(|| Restart {
        target: version.to_owned(),
        guests: cfg.guests.iter().map(|g| g.name.clone()).collect(),
    });
    state::save(root.fd(), &st)?;
    failpoint::hit("flip-before-rename");
    crate::core::progress::phase(&format!("flipping `current` to `{version}`"));
    root.set_link("current", version)?;
    failpoint::hit("flip-after-rename");
    if let Some(old) = &old {
        root.set_link("previous", old)?;
    }
    failpoint::hit("flip-after-previous");
    st.flip = None;
    if !pending {
        st.pending = None;
    }
    state::save(root.fd(), &st)?;
    log::info!("current is now `{version}`");
    if !opts.restart {
        return Ok(());
    }
    // With a flip back to come, the first failure stops the restarts; without, each guest is
    // restarted whatever the others do (a flip back that stopped at one guest left the later
    // ones on the tree it left).
    let restarted = if opts.auto_revert && old.is_some() {
        finish_restarts(root, cfg, &mut st)
    } else {
        finish_restarts_each(root, cfg, &mut st)
    };
    if let Err(e) = restarted {
        let Some(old) = old.filter(|_| opts.auto_revert) else {
            return Err(e.context(format!(
                "the guests did not all restart on `{version}`, which stays current"
            )));
        };
        // The error is said once, in the command's error line, which carries `e`.
        log::info!("a guest did not restart on `{version}`; flipping back to `{old}`");
        let back = flip(
            root,
            cfg,
            &old,
            Options {
                restart: true,
                auto_revert: false,
            },
            false,
        );
        let also = match back {
            Ok(()) => String::new(),
            Err(e2) => format!("; restarting the guests on `{old}` failed too: {e2:#}"),
        };
        if pending_before.as_ref().is_some_and(|p| p.version == old) {
            let mut st = state::load(root.fd())?;
            st.pending = pending_before;
            state::save(root.fd(), &st)?;
        }
        return Err(Fail::GuestsReverted(format!("{e:#}; flipped back to `{old}`{also}")).into());
    }
    Ok(())
}

/// Restarts the guests the state file still lists, striking each off as it succeeds; once
/// the list is done, the layers overlay guests kept for a flip back go (`guest::settle`).
pub(crate) fn finish_restarts(root: &Root, cfg: &Config, st: &mut State) -> Result<()> {
    // What the guests ran on before: told to their hooks as `TREESWAP_PREVIOUS`.
    let previous = root.link("previous")?;
    while let Some(r) = &st.restart {
        let target = r.target.clone();
        let Some(name) = r.guests.first().cloned() else {
            st.restart = None;
            state::save(root.fd(), st)?;
            crate::ops::guest::settle(root, cfg, st)?;
            break;
        };
        match cfg.guests.iter().find(|g| g.name == name) {
            Some(g) => {
                failpoint::hit("guest-before-restart");
                crate::ops::guest::restart(root, g, &target, previous.as_deref(), st)?;
            }
            None => log::warn!(
                "guest `{}` is no longer configured; not restarting it",
                crate::core::path::quote(&name)
            ),
        }
        if let Some(r) = &mut st.restart {
            r.guests.remove(0);
        }
        state::save(root.fd(), st)?;
        failpoint::hit("guest-after-restart");
    }
    Ok(())
}

/// [`finish_restarts`], going on past a guest that fails: each listed guest is restarted,
/// those that failed stay listed (so that `mark-good` refuses the tree and the next `boot`
/// tries them again), and the error names the first failure and how many guests failed.
pub(crate) fn finish_restarts_each(root: &Root, cfg: &Config, st: &mut State) -> Result<()> {
    let previous = root.link("previous")?;
    let mut failed: Vec<String> = Vec::new();
    let mut first: Option<anyhow::Error> = None;
    while let Some(r) = &st.restart {
        let target = r.target.clone();
        let Some(name) = r.guests.iter().find(|n| !failed.contains(n)).cloned() else {
            break;
        };
        let done = match cfg.guests.iter().find(|g| g.name == name) {
            Some(g) => {
                failpoint::hit("guest-before-restart");
                crate::ops::guest::restart(root, g, &target, previous.as_deref(), st)
            }
            None => {
                log::warn!(
                    "guest `{}` is no longer configured; not restarting it",
                    crate::core::path::quote(&name)
                );
                Ok(())
            }
        };
        match done {
            Ok(()) => {
                if let Some(r) = &mut st.restart {
                    r.guests.retain(|n| *n != name);
                }
                state::save(root.fd(), st)?;
                failpoint::hit("guest-after-restart");
            }
            Err(e) => {
                log::warn!("{e:#}");
                failed.push(name);
                first.get_or_insert(e);
            }
        }
    }
    match first {
        // Nothing failed: the list is empty; clear it and settle as `finish_restarts` does.
        None => finish_restarts(root, cfg, st),
        Some(e) if failed.len() == 1 => Err(e),
        Some(e) => Err(e.context(format!("{} guests did not restart", failed.len()))),
    }
}

/// `treeswap restart-guests [NAME…]`: with names, restarts those guests onto `current` now
/// (recorded first, so that `boot` finishes what a crash cuts short); without, finishes the
/// restarts the state file records. Counts no boot and flips nothing back. Returns how many
/// guests it restarted.
pub(crate) fn restart_guests(root: &Root, cfg: &Config, names: &[String]) -> Result<usize> {
    let mut st = state::load(root.fd())?;
    let Some(current) = root.link("current")? else {
        return Err(Fail::Nothing("there is no current tree to restart guests on".into()).into());
    };
    if names.is_empty() {
        match &st.restart {
            None => return Err(Fail::Nothing("no guest restarts are pending".into()).into()),
            Some(r) if r.target != current => {
                bail!(
                    "the pending restarts are onto `{}`, not current `{current}`: run `treeswap boot`",
                    r.target
                )
            }
            Some(_) => {}
        }
    } else {
        for n in names {
            if !cfg.guests.iter().any(|g| &g.name == n) {
                bail!(
                    "no guest is named `{}` in the config",
                    crate::core::path::quote(n)
                );
            }
        }
        // Those already pending onto `current` first, then the named ones.
        let mut guests = match st.restart.take() {
            Some(r) if r.target == current => r.guests,
            _ => Vec::new(),
        };
        for n in names {
            if !guests.contains(n) {
                guests.push(n.clone());
            }
        }
        st.restart = Some(Restart {
            target: current,
            guests,
        });
        state::save(root.fd(), &st)?;
    }
    let n = st.restart.as_ref().map_or(0, |r| r.guests.len());
    finish_restarts(root, cfg, &mut st)?;
    Ok(n)
}
