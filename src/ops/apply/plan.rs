//! Planning an apply before anything is written: what the options and the config allow, the
//! new manifest composed from the base's and the delta (its digest checked), every reference
//! checked, the objects to write, and the free space they need. The cores (`check_allowed`,
//! `compose`, `plan`, `check_fits`) are pure.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};

use super::bad;
use crate::core::config::Config;
use crate::core::delta::{Delta, Source};
use crate::core::error::Fail;
use crate::core::manifest::{Entry, Kind, Manifest, check_tree, tree_digest};
use crate::core::object::{Hash, Meta, ObjectId};
use crate::store::pool::Pool;
use crate::store::root::Root;

/// Refuses a delta the options or the config forbid, before its base is looked for: a result
/// older than `current` (unless `allow_downgrade`), or a device node (unless `allow_devices`).
pub(super) fn check_allowed(
    d: &Delta,
    current: Option<&str>,
    allow_downgrade: bool,
    allow_devices: bool,
) -> Result<()> {
    let to = &d.to_version;
    if let Some(cur) = current
        && crate::core::version::compare(to, cur) == std::cmp::Ordering::Less
        && !allow_downgrade
    {
        return Err(Fail::Downgrade(format!(
            "refusing to downgrade from `{cur}` to `{to}` (use --allow-downgrade; `treeswap revert` goes back to previous)"
        ))
        .into());
    }
    if !allow_devices
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
    Ok(())
}

/// The objects of the base tree by content: the references a delta may use.
pub(super) type BaseContent = HashMap<Hash, ObjectId>;

/// For contents of the base tree: the path of a file of the base tree that has it.
pub(super) type BasePaths = HashMap<Hash, Box<[u8]>>;

/// The new tree's manifest, composed from the stored manifest of `base_version` and the delta,
/// and the base's objects and paths for the contents the delta refers to.
///
/// The base's entries are not checked against its digest here: the digest of the tree
/// composed from them is, which covers every entry the new tree keeps. The base's entries
/// move into the new manifest (at a million entries a manifest is ~150 MB; there is never a
/// second one).
pub(super) fn compose_from(
    root: &Root,
    base_version: &str,
    d: &Delta,
) -> Result<(Manifest, BaseContent, BasePaths)> {
    let base = root.load_manifest_unverified(base_version)?;
    log::debug!("loaded the manifest of `{base_version}`");
    let (base_content, base_paths) = base_contents(&base, d);
    let new = compose(base, d).map_err(|e| {
        // A result that does not check out may come from a damaged stored base manifest
        // rather than from the delta: say so if it is.
        match root.load_manifest(base_version) {
            Err(damaged) => damaged.context("the installed base tree's manifest is damaged"),
            Ok(_) => e,
        }
    })?;
    log::debug!("composed the new manifest: {} entries", new.entries.len());
    Ok((new, base_content, base_paths))
}

/// Applies the delta manifest to the base manifest: the result's manifest, checked to be a
/// tree whose digest is the delta's `to` digest.
/// The base is consumed and changed in place (replaced entries swapped, removed ones dropped,
/// new ones merged in from the back), so that only one tree's worth of entries is in memory.
pub(super) fn compose(base: Manifest, d: &Delta) -> Result<Manifest> {
    let mut entries = base.entries;
    check_removed(&entries, &d.removed)?;
    let added = replace_changed(&mut entries, &d.changed);
    drop_removed(&mut entries, &d.removed);
    merge_added(&mut entries, added);
    check_result(entries, d)
}

/// Refuses a delta that removes a path the base does not have: it was made for another base.
fn check_removed(entries: &[Entry], removed: &[Box<[u8]>]) -> Result<()> {
    for p in removed {
        if entries.binary_search_by(|e| (*e.path).cmp(p)).is_err() {
            return Err(bad(format!(
                "it removes `{}`, which the base tree does not have",
                crate::core::path::display(p)
            )));
        }
    }
    Ok(())
}

/// Changed entries replace the base's entry at their path; the others are new paths, returned
/// in their (sorted) order.
fn replace_changed(entries: &mut [Entry], changed: &[Entry]) -> Vec<Entry> {
    let mut added: Vec<Entry> = Vec::new();
    for y in changed {
        match entries.binary_search_by(|e| e.path.cmp(&y.path)) {
            Ok(i) => entries[i] = y.clone(),
            Err(_) => added.push(y.clone()),
        }
    }
    added
}

/// Drops the removed paths; both lists are sorted, so one pass does.
fn drop_removed(entries: &mut Vec<Entry>, removed: &[Box<[u8]>]) {
    if removed.is_empty() {
        return;
    }
    let mut removed = removed.iter().peekable();
    entries.retain(|x| {
        while removed.next_if(|p| p[..] < x.path[..]).is_some() {}
        removed.next_if(|p| p[..] == x.path[..]).is_none()
    });
}

/// Merges the sorted new entries into the sorted entries from the back of the grown vector,
/// moving each entry once and never holding a second copy of the tree.
fn merge_added(entries: &mut Vec<Entry>, mut added: Vec<Entry>) {
    let n = entries.len();
    entries.reserve_exact(added.len());
    entries.resize_with(n + added.len(), || Entry {
        path: Box::default(),
        meta: Meta::default(),
        kind: Kind::Dir,
    });
    let (mut i, mut w) = (n, n + added.len());
    while let Some(y) = added.pop() {
        while i > 0 && entries[i - 1].path > y.path {
            i -= 1;
            w -= 1;
            entries.swap(i, w);
        }
        w -= 1;
        entries[w] = y;
    }
}

/// The composed manifest, if its entries form a tree with the count and digest the delta
/// declares.
fn check_result(entries: Vec<Entry>, d: &Delta) -> Result<Manifest> {
    // Both passes over every entry at once: the tree check's error comes first.
    let (tree, got) = rayon::join(|| check_tree(&entries), || tree_digest(&entries));
    tree.map_err(|e| bad(format!("its result is not a valid tree: {e:#}")))?;
    let m = Manifest {
        version: Some(d.to_version.clone()),
        entries,
    };
    if m.entries.len() as u64 != d.to_count {
        return Err(Fail::Integrity(format!(
            "the delta's result has {} entries, but it declares {}",
            m.entries.len(),
            d.to_count
        ))
        .into());
    }
    if got != d.to_digest {
        return Err(Fail::Integrity(format!(
            "the delta's result has digest {}, but it declares {}",
            hex::encode(got),
            hex::encode(d.to_digest)
        ))
        .into());
    }
    Ok(m)
}

/// What applying needs to write.
pub(super) struct Plan {
    /// For each content of the delta that some new object needs: the metadata of each object
    /// to make from it.
    pub(super) metas: HashMap<Hash, Vec<(Meta, ObjectId)>>,
    /// Objects of the base tree by content, the references a delta may use.
    pub(super) base_content: BaseContent,
    /// The path of a file of the base tree with each of those contents.
    pub(super) base_paths: BasePaths,
    /// For contents whose objects the pool already has: one of those objects, a reference
    /// for later patches.
    pub(super) existing: HashMap<Hash, ObjectId>,
    /// Bytes of new objects.
    pub(super) bytes: u64,
    pub(super) objects: u64,
}

/// The objects of the base tree that hold the contents the delta refers to (as contents it
/// already has, or as patch references), and a path in the base tree of each. Only those: a
/// map of the whole base would cost ~100 MB at a million entries.
fn base_contents(base: &Manifest, d: &Delta) -> (BaseContent, BasePaths) {
    let wanted: HashSet<Hash> = d
        .contents
        .iter()
        .flat_map(|c| [Some(c.sha256), c.source.base().copied()])
        .flatten()
        .collect();
    let mut base_content = BaseContent::new();
    let mut base_paths = BasePaths::new();
    for e in &base.entries {
        if !matches!(&e.kind, Kind::File { sha256, .. } if wanted.contains(sha256)) {
            continue;
        }
        if let Kind::File { sha256, .. } = &e.kind {
            base_content
                .entry(*sha256)
                .or_insert_with(|| e.object().expect("file"));
            base_paths.entry(*sha256).or_insert_with(|| e.path.clone());
        }
    }
    (base_content, base_paths)
}

/// The pool lookup running on its own threads (`start_lookup`).
pub(super) type Lookup = JoinHandle<Result<HashSet<ObjectId>>>;

/// Starts looking up which of the new tree's changed objects the pool has already: lookups
/// that wait on the disk when the cache is cold, made meanwhile on other threads.
pub(super) fn start_lookup(root: &Root, d: &Delta) -> Result<Lookup> {
    let pool = root.pool()?;
    let ids: HashSet<ObjectId> = d.changed.iter().filter_map(Entry::object).collect();
    Ok(std::thread::spawn(move || {
        lookup(&pool, ids.into_iter().collect())
    }))
}

/// The answer of a lookup started with `start_lookup`, once it is done.
pub(super) fn finish_lookup(lookup: Lookup) -> Result<HashSet<ObjectId>> {
    lookup
        .join()
        .unwrap_or_else(|_| Err(anyhow!("a pool lookup thread panicked")))
}

/// Which of `ids` the pool has, looked up in parallel, as each lookup may wait on the disk.
fn lookup(pool: &Pool, ids: Vec<ObjectId>) -> Result<HashSet<ObjectId>> {
    use rayon::prelude::*;
    let has: Vec<Result<bool>> = crate::tree::stage::io_threads()?
        .install(|| ids.par_iter().map(|id| pool.has(id)).collect());
    let mut in_pool = HashSet::new();
    for (id, h) in ids.iter().zip(has) {
        if h? {
            in_pool.insert(*id);
        }
    }
    Ok(in_pool)
}

/// What applying `d` needs to write, given the objects of the changed entries that the pool
/// has (`in_pool`).
pub(super) fn plan(
    base_content: BaseContent,
    base_paths: BasePaths,
    d: &Delta,
    in_pool: HashSet<ObjectId>,
) -> Result<Plan> {
    let in_delta: HashMap<Hash, usize> = d
        .contents
        .iter()
        .enumerate()
        .map(|(i, c)| (c.sha256, i))
        .collect();
    check_references(d, &base_content, &in_delta)?;
    let mut plan = Plan {
        metas: HashMap::new(),
        base_content,
        base_paths,
        existing: HashMap::new(),
        bytes: 0,
        objects: 0,
    };
    plan_objects(&mut plan, d, &in_delta, &in_pool)?;
    Ok(plan)
}

/// Checks every content's references before anything is written: a `base` content must be in
/// the base tree, and a patch's reference in the base tree or earlier in the delta (blobs are
/// decoded in order).
fn check_references(
    d: &Delta,
    base_content: &BaseContent,
    in_delta: &HashMap<Hash, usize>,
) -> Result<()> {
    for (i, c) in d.contents.iter().enumerate() {
        if c.source == Source::Base && !base_content.contains_key(&c.sha256) {
            return Err(bad(format!(
                "content {} is said to be in the base tree, which does not have it",
                hex::encode(c.sha256)
            )));
        }
        if let Some(r) = c.source.base() {
            let earlier = in_delta.get(r).is_some_and(|&k| k < i);
            if !earlier && !base_content.contains_key(r) {
                return Err(bad(format!(
                    "content {} is a patch against {}, which is neither in the base tree nor earlier in the delta",
                    hex::encode(c.sha256),
                    hex::encode(r)
                )));
            }
        }
    }
    Ok(())
}

/// Adds to `plan` the new objects the changed files need, each once. Unchanged entries link to
/// base objects the pool has; `verify` catches a pool that lost them. Changed ones may need
/// new objects: `in_pool` says which.
fn plan_objects(
    plan: &mut Plan,
    d: &Delta,
    in_delta: &HashMap<Hash, usize>,
    in_pool: &HashSet<ObjectId>,
) -> Result<()> {
    let mut seen: HashSet<ObjectId> = HashSet::new();
    for e in &d.changed {
        let Kind::File { size, sha256 } = &e.kind else {
            continue;
        };
        let id = e.object().expect("file");
        if !seen.insert(id) {
            continue;
        }
        if let Some(&k) = in_delta.get(sha256)
            && d.contents[k].size != *size
        {
            return Err(bad(format!(
                "`{}` has size {size}, but its content {} has size {}",
                e.display(),
                hex::encode(sha256),
                d.contents[k].size
            )));
        }
        if in_pool.contains(&id) {
            plan.existing.entry(*sha256).or_insert(id);
            continue;
        }
        if !in_delta.contains_key(sha256) {
            return Err(Fail::Integrity(format!(
                "`{}` needs content {} which neither the delta nor the pool has",
                e.display(),
                hex::encode(sha256)
            ))
            .into());
        }
        plan.metas
            .entry(*sha256)
            .or_default()
            .push((e.meta.clone(), id));
        plan.bytes = plan.bytes.saturating_add(*size);
        plan.objects += 1;
    }
    Ok(())
}

/// Checks the free space, and when it is short and the config says so (`gc_before_apply`),
/// runs gc (keeping the base) and checks again.
pub(super) fn ensure_space(
    root: &Root,
    cfg: &Config,
    plan: &Plan,
    new: &Manifest,
    base_version: &str,
) -> Result<()> {
    let Err(e) = check_space(root, plan, new) else {
        return Ok(());
    };
    if !cfg.gc_before_apply {
        return Err(e);
    }
    log::warn!("{e:#}; running gc first (gc_before_apply = true)");
    let r = crate::ops::gc::gc(root, 0, &[base_version])?;
    log::warn!(
        "gc removed {} tree(s) and {} object(s), freeing {} bytes",
        r.trees_removed.len(),
        r.objects_removed,
        r.bytes_freed
    );
    check_space(root, plan, new)
}

/// `check_fits` on the free space of the root's file system.
fn check_space(root: &Root, plan: &Plan, new: &Manifest) -> Result<()> {
    let free = crate::fs::sys::free_bytes(root.fd())?;
    check_fits(&root.path, free, plan, new)
}

/// Refuses, before anything is written, an apply that would not fit: new objects rounded up to
/// blocks, one block per new directory, the manifest, and a margin of 5% plus 16 MiB; and
/// about one inode per new object and per four entries, where the file system counts inodes.
/// `free` is what `fs::sys::free_bytes` says of the file system at `path`.
fn check_fits(
    path: &Path,
    free: (u64, u64, Option<u64>),
    plan: &Plan,
    new: &Manifest,
) -> Result<()> {
    let (free, frsize, free_inodes) = free;
    let block = frsize.max(512);
    let round = |n: u64| n.div_ceil(block).saturating_mul(block);
    let dirs = new.entries.iter().filter(|e| e.is_dir()).count() as u64;
    let mut need: u64 = round(plan.bytes)
        .saturating_add(plan.objects.saturating_mul(block))
        .saturating_add(dirs.saturating_mul(block))
        .saturating_add(new.entries.len() as u64 * 200);
    need = need.saturating_add(need / 20).saturating_add(16 << 20);
    if need > free {
        return Err(Fail::NoSpace(format!(
            "not enough space in `{}`: the update needs {} MiB, {} MiB are free ({} MiB missing)",
            path.display(),
            need.div_ceil(1 << 20),
            free >> 20,
            (need - free).div_ceil(1 << 20)
        ))
        .into());
    }
    let inodes_needed = plan.objects + new.entries.len() as u64 / 4 + 16;
    if let Some(free_inodes) = free_inodes
        && inodes_needed > free_inodes
    {
        return Err(Fail::NoSpace(format!(
            "not enough inodes in `{}`: the update needs about {inodes_needed}, {free_inodes} are free",
            path.display(),
        ))
        .into());
    }
    Ok(())
}
