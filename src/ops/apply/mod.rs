//! `treeswap apply`: check a delta against the installed trees, write its new objects, stage
//! the new tree beside the running one, verify it, and flip.
//!
//! Nothing is written before the delta manifest has been parsed, its base found, the
//! resulting manifest composed and its digest checked against the delta's `to` digest, and
//! the free space checked. Blobs are then read in order from the stream (so a delta can be
//! piped in), each checked against its hash before it is decoded, and each decoded content
//! checked against its hash before it is published.

mod plan;
pub(crate) mod read;
mod write;

use std::io::Read;

use anyhow::{Result, bail};

pub use self::read::read_delta_head;
use crate::core::config::Config;
use crate::core::delta::Delta;
use crate::core::error::Fail;
use crate::ops::flip;
use crate::ops::trust::Policy;
use crate::store::root::Root;

#[derive(Clone, Copy, Default)]
pub struct Options {
    /// Stop after staging and verifying.
    pub stage_only: bool,
    /// How to flip.
    pub flip: flip::Options,
    /// Skip the signature check (development only).
    pub insecure: bool,
    /// Accept a delta whose result is older than the current version.
    pub allow_downgrade: bool,
    /// Check everything that can be checked before writing (signature, base, result, space)
    /// and stop: nothing is written.
    pub dry_run: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new tree is installed and current.
    Applied { from: String, to: String },
    /// The new tree is installed (staged) but not current.
    Staged { to: String },
    /// The delta's result was already installed; it is now current.
    Switched { to: String },
    /// `dry_run`: the delta would apply to `from`, making `objects` new objects of `bytes`
    /// bytes; the update needs `need` bytes of the `free` ones.
    WouldApply {
        from: String,
        to: String,
        objects: u64,
        bytes: u64,
        need: u64,
        free: u64,
    },
    /// `dry_run`: the result is installed; applying would only make it current.
    WouldSwitch { to: String },
}

/// A failure of the delta itself (exit code of `Fail::BadDelta`).
fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    Fail::BadDelta(format!("invalid delta: {e}")).into()
}

/// Applies the delta read from `input`: read and check its head (`read`), compose and plan the
/// new tree (`plan`), write its objects while it is staged (`write`), and flip to it.
pub fn apply(root: &Root, cfg: &Config, input: impl Read, opts: Options) -> Result<Outcome> {
    let keys = crate::ops::trust::load_keys(&cfg.trust.public_keys)?;
    let policy = if opts.insecure {
        Policy::Insecure
    } else {
        Policy::Keys(&keys)
    };
    let mut members = read::members(input)?;
    let d = read::read_manifest(&mut members, policy, root.spool()?, cfg.trust.max_entries)?;
    log::debug!(
        "read the delta manifest: {} changed, {} removed, {} contents",
        d.changed.len(),
        d.removed.len(),
        d.contents.len()
    );
    let to = d.to_version.clone();
    let current = root.link("current")?;
    let allow_devices = cfg.trust.allow_devices;
    plan::check_allowed(&d, current.as_deref(), opts.allow_downgrade, allow_devices)?;
    crate::core::version::check_spelling(&to, &root.versions()?)?;
    if root.is_installed(&to)? {
        return switch_to_installed(root, cfg, &d, current.as_deref(), opts);
    }
    let base_version = read::base_version(root, &d, current.as_deref())?;
    let in_pool = plan::start_lookup(root, &d)?;
    let (new, base_content, base_paths) = plan::compose_from(root, &base_version, &d)?;
    let in_pool = plan::finish_lookup(in_pool)?;
    let plan = plan::plan(base_content, base_paths, &d, in_pool)?;
    log::debug!("planned {} new objects, {} bytes", plan.objects, plan.bytes);
    if opts.dry_run {
        let (need, free) = plan::check_space(root, &plan, &new)?;
        return Ok(Outcome::WouldApply {
            from: base_version,
            to,
            objects: plan.objects,
            bytes: plan.bytes,
            need,
            free,
        });
    }
    plan::ensure_space(root, cfg, &plan, &new, &base_version)?;
    let pool = root.pool_for(cfg)?;

    let base_tree = write::open_base_tree(root, &pool, &base_version)?;
    let spool = || root.spool();
    let mut work =
        || write::write_objects(&d, &plan, &pool, base_tree.as_ref(), &mut members, &spool);
    if let Err(e) = write::stage(root, cfg, &pool, &new, &base_version, &d, &mut work) {
        // Give the pool back as it was: the objects this apply wrote are used by no tree
        // (unless the new tree got installed after all, before a late error).
        if !root.is_installed(&to).unwrap_or(true) {
            pool.discard_created();
        }
        return Err(e);
    }
    if opts.stage_only {
        return Ok(Outcome::Staged { to });
    }
    flip::switch(root, cfg, &to, opts.flip)?;
    Ok(Outcome::Applied {
        from: base_version,
        to,
    })
}

/// The delta's result is installed already: if it is the same tree, it only needs to become
/// current (unless it is, or only staging was asked for).
fn switch_to_installed(
    root: &Root,
    cfg: &Config,
    d: &Delta,
    current: Option<&str>,
    opts: Options,
) -> Result<Outcome> {
    let to = d.to_version.clone();
    if root.manifest_digest(&to)? != Some(d.to_digest) {
        bail!(
            "version `{to}` is already installed with another digest than this delta's result {}",
            hex::encode(d.to_digest)
        );
    }
    if current == Some(to.as_str()) {
        return Err(Fail::Nothing(format!("nothing to do: `{to}` is already current")).into());
    }
    if opts.dry_run {
        return Ok(Outcome::WouldSwitch { to });
    }
    if opts.stage_only {
        return Ok(Outcome::Staged { to });
    }
    flip::switch(root, cfg, &to, opts.flip)?;
    Ok(Outcome::Switched { to })
}
