//! `treeswap apply`: check a delta against the installed trees, write its new objects, stage
//! the new tree beside the running one, verify it, and flip.
//!
//! Nothing is written before the delta manifest has been parsed, its base found, the
//! resulting manifest composed and its digest checked against the delta's `to` digest, and
//! the free space checked. Blobs are then read in order from the stream (so a delta can be
//! piped in), each checked against its hash before it is decoded, and each decoded content
//! checked against its hash before it is published.

mod plan;
mod read;
mod write;

use std::collections::HashSet;
use std::io::Read;

use anyhow::{Result, anyhow, bail};

use self::plan::{base_contents, check_space, compose, lookup, plan};
pub use self::read::read_delta_head;
use self::read::{find_base, read_manifest, tar_stream};
use self::write::materialize;
use crate::core::config::Config;
use crate::core::error::Fail;
use crate::core::manifest::{Entry, Kind};
use crate::core::object::ObjectId;
use crate::ops::{flip, install};
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
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new tree is installed and current.
    Applied { from: String, to: String },
    /// The new tree is installed (staged) but not current.
    Staged { to: String },
    /// The delta's result was already installed; it is now current.
    Switched { to: String },
}

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    Fail::BadDelta(format!("invalid delta: {e}")).into()
}
pub fn apply(root: &Root, cfg: &Config, input: impl Read, opts: Options) -> Result<Outcome> {
    let keys = crate::ops::trust::load_keys(&cfg.trust.public_keys)?;
    let policy = if opts.insecure {
        crate::ops::trust::Policy::Insecure
    } else {
        crate::ops::trust::Policy::Keys(&keys)
    };
    let mut archive = tar::Archive::new(tar_stream(input)?);
    let mut entries = archive.entries().map_err(bad)?;
    let d = read_manifest(&mut entries, policy)?;
    log::debug!(
        "read the delta manifest: {} changed, {} removed, {} contents",
        d.changed.len(),
        d.removed.len(),
        d.contents.len()
    );
    let to = d.to_version.clone();
    let current = root.link("current")?;
    if let Some(cur) = &current
        && crate::core::version::compare(&to, cur) == std::cmp::Ordering::Less
        && !opts.allow_downgrade
    {
        return Err(Fail::Downgrade(format!(
            "refusing to downgrade from `{cur}` to `{to}` (use --allow-downgrade; `treeswap revert` goes back to previous)"
        ))
        .into());
    }
    if !cfg.trust.allow_devices
        && let Some(e) = d
            .changed
            .iter()
            .find(|e| matches!(e.kind, Kind::Char { .. } | Kind::Block { .. }))
    {
        return Err(bad(format!(
            "it creates the device node `{}`, and the config forbids device nodes ([trust] allow_devices = false)",
            e.display()
        )));
    }

    if root.is_installed(&to)? {
        if root.manifest_digest(&to)? != Some(d.to_digest) {
            bail!(
                "version `{to}` is already installed with another digest than this delta's result {}",
                hex::encode(d.to_digest)
            );
        }
        if current.as_deref() == Some(to.as_str()) {
            return Err(Fail::Nothing(format!("nothing to do: `{to}` is already current")).into());
        }
        if opts.stage_only {
            return Ok(Outcome::Staged { to });
        }
        flip::switch(root, cfg, &to, opts.flip)?;
        return Ok(Outcome::Switched { to });
    }

    let Some(base_version) = find_base(root, &d.from_digest)? else {
        let cur = match &current {
            Some(c) => format!(
                "current `{c}` has digest {}",
                root.manifest_digest(c)?
                    .map(hex::encode)
                    .unwrap_or_default()
            ),
            None => "no version is current".to_string(),
        };
        return Err(Fail::WrongBase(format!(
            "this delta is for a base tree{} with digest {}, which is not installed; {cur}",
            d.from_version
                .as_ref()
                .map(|v| format!(" `{v}`"))
                .unwrap_or_default(),
            hex::encode(d.from_digest)
        ))
        .into());
    };
    if current.as_deref() != Some(base_version.as_str()) {
        log::warn!(
            "this delta applies to installed version `{base_version}`, which is not current"
        );
    }
    // Which of the new tree's changed objects the pool has already: lookups that wait on the
    // disk when the cache is cold, made meanwhile on other threads.
    let in_pool = {
        let pool = root.pool()?;
        let ids: HashSet<ObjectId> = d.changed.iter().filter_map(Entry::object).collect();
        std::thread::spawn(move || lookup(&pool, ids.into_iter().collect()))
    };
    // The base's entries are not checked against its digest here: the digest of the tree
    // composed from them is, which covers every entry the new tree keeps.
    let base = root.load_manifest_unverified(&base_version)?;
    log::debug!("loaded the manifest of `{base_version}`");
    let (base_content, base_paths) = base_contents(&base, &d);
    // The base's entries move into the new manifest (at a million entries a manifest is
    // ~150 MB; there is never a second one).
    let new = compose(base, &d).map_err(|e| {
        // A result that does not check out may come from a damaged stored base manifest
        // rather than from the delta: say so if it is.
        match root.load_manifest(&base_version) {
            Err(damaged) => damaged.context("the installed base tree's manifest is damaged"),
            Ok(_) => e,
        }
    })?;
    log::debug!("composed the new manifest: {} entries", new.entries.len());
    let pool = root.pool_for(cfg)?;
    let in_pool = in_pool
        .join()
        .unwrap_or_else(|_| Err(anyhow!("a pool lookup thread panicked")))?;
    let plan = plan(base_content, base_paths, &d, in_pool)?;
    log::debug!("planned {} new objects, {} bytes", plan.objects, plan.bytes);
    if let Err(e) = check_space(root, &plan, &new) {
        if !cfg.gc_before_apply {
            return Err(e);
        }
        log::warn!("{e:#}; running gc first (gc_before_apply = true)");
        let r = crate::ops::gc::gc(root, 0, &[base_version.as_str()])?;
        log::warn!(
            "gc removed {} tree(s) and {} object(s), freeing {} bytes",
            r.trees_removed.len(),
            r.objects_removed,
            r.bytes_freed
        );
        check_space(root, &plan, &new)?;
    }

    // Staging from the base's read-only snapshot (btrfs) reads and changes the metadata of
    // the files the delta changes: patch references and contents the base has are read from
    // those same files there (the blocks are shared), not from their pool objects, whose
    // metadata would be one more cold read each.
    let base_tree = if root.snapshots_enabled(&pool) {
        root.open_snapshot(&base_version)?
    } else {
        None
    };
    let mut write_and_stage = || -> Result<()> {
        // The objects are written while everything that does not need them is staged.
        let late: HashSet<&[u8]> = d
            .changed
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .map(|e| &*e.path)
            .collect();
        let mut work = || -> Result<()> {
            materialize(&d, &plan, &pool, base_tree.as_ref(), &mut entries)?;
            log::debug!("wrote the new objects");
            crate::core::failpoint::hit("apply-after-objects");
            // Nothing may follow the last blob.
            if let Some(extra) = entries.next() {
                let name = extra
                    .map(|e| crate::core::path::display(&e.path_bytes()))
                    .unwrap_or_else(|e| e.to_string());
                return Err(bad(format!(
                    "unexpected member `{name}` after the last blob"
                )));
            }
            Ok(())
        };
        // On btrfs, from the base's read-only snapshot: only the changes are staged.
        if install::install_by_snapshot(root, cfg, &pool, &new, &base_version, &d, &mut work)? {
            return Ok(());
        }
        let during = crate::tree::stage::During {
            late,
            work: &mut work,
        };
        install::install(root, cfg, &pool, &new, true, Some(during))
    };
    let written = write_and_stage();
    if let Err(e) = written {
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
