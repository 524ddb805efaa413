//! Planning an apply before anything is written: the new manifest composed from the base's
//! and the delta (its digest checked), every reference checked, the objects to write, and the
//! free space they need.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};

use super::bad;
use crate::core::delta::{Delta, Source};
use crate::core::error::Fail;
use crate::core::manifest::{Entry, Kind, Manifest, check_tree, tree_digest};
use crate::core::object::{Hash, Meta, ObjectId};
use crate::store::pool::Pool;
use crate::store::root::Root;

/// Applies the delta manifest to the base manifest: the result's manifest, checked to be a
/// tree whose digest is the delta's `to` digest.
/// The base is consumed and changed in place (replaced entries swapped, removed ones dropped,
/// new ones merged in from the back), so that only one tree's worth of entries is in memory.
pub(super) fn compose(base: Manifest, d: &Delta) -> Result<Manifest> {
    let mut entries = base.entries;
    for p in &d.removed {
        if entries.binary_search_by(|e| (*e.path).cmp(p)).is_err() {
            return Err(bad(format!(
                "it removes `{}`, which the base tree does not have",
                crate::core::path::display(p)
            )));
        }
    }
    // Changed entries replace the base's entry at their path, or are new paths.
    let mut added: Vec<Entry> = Vec::new();
    for y in &d.changed {
        match entries.binary_search_by(|e| e.path.cmp(&y.path)) {
            Ok(i) => entries[i] = y.clone(),
            Err(_) => added.push(y.clone()),
        }
    }
    if !d.removed.is_empty() {
        let mut removed = d.removed.iter().peekable();
        entries.retain(|x| {
            while removed.next_if(|p| p[..] < x.path[..]).is_some() {}
            removed.next_if(|p| p[..] == x.path[..]).is_none()
        });
    }
    // Both lists are sorted: merge from the back into the grown vector.
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

/// For contents of the base tree: the path of a file of the base tree that has it.
pub(super) type BasePaths = HashMap<Hash, Box<[u8]>>;

/// What applying needs to write.
pub(super) struct Plan {
    /// For each content of the delta that some new object needs: the metadata of each object
    /// to make from it.
    pub(super) metas: HashMap<Hash, Vec<(Meta, ObjectId)>>,
    /// Objects of the base tree by content, the references a delta may use.
    pub(super) base_content: HashMap<Hash, ObjectId>,
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
pub(super) fn base_contents(base: &Manifest, d: &Delta) -> (HashMap<Hash, ObjectId>, BasePaths) {
    let wanted: HashSet<Hash> = d
        .contents
        .iter()
        .flat_map(|c| [Some(c.sha256), c.source.base().copied()])
        .flatten()
        .collect();
    let mut base_content: HashMap<Hash, ObjectId> = HashMap::new();
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

/// Which of `ids` the pool has, looked up in parallel, as each lookup may wait on the disk.
pub(super) fn lookup(pool: &Pool, ids: Vec<ObjectId>) -> Result<HashSet<ObjectId>> {
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
    base_content: HashMap<Hash, ObjectId>,
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
    // Check every content's references before anything is written.
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
    let mut plan = Plan {
        metas: HashMap::new(),
        base_content,
        base_paths,
        existing: HashMap::new(),
        bytes: 0,
        objects: 0,
    };
    // Unchanged entries link to base objects the pool has; `verify` catches a pool that lost
    // them. Changed ones may need new objects: `in_pool` says which.
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
    Ok(plan)
}

/// Refuses, before anything is written, an apply that would not fit: new objects rounded up to
/// blocks, one block per new directory, the manifest, and a margin of 5% plus 16 MiB.
pub(super) fn check_space(root: &Root, plan: &Plan, new: &Manifest) -> Result<()> {
    let st = rustix::fs::fstatvfs(root.fd()).context("cannot read free space")?;
    let block = st.f_frsize.max(512);
    let round = |n: u64| n.div_ceil(block).saturating_mul(block);
    let dirs = new.entries.iter().filter(|e| e.is_dir()).count() as u64;
    let mut need: u64 = round(plan.bytes)
        .saturating_add(plan.objects.saturating_mul(block))
        .saturating_add(dirs.saturating_mul(block))
        .saturating_add(new.entries.len() as u64 * 200);
    need = need.saturating_add(need / 20).saturating_add(16 << 20);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if need > free {
        return Err(Fail::NoSpace(format!(
            "not enough space in `{}`: the update needs {} MiB, {} MiB are free ({} MiB missing)",
            root.path.display(),
            need.div_ceil(1 << 20),
            free >> 20,
            (need - free).div_ceil(1 << 20)
        ))
        .into());
    }
    let inodes_needed = plan.objects + new.entries.len() as u64 / 4 + 16;
    if st.f_favail != 0 && st.f_files != 0 && inodes_needed > st.f_favail {
        return Err(Fail::NoSpace(format!(
            "not enough inodes in `{}`: the update needs about {inodes_needed}, {} are free",
            root.path.display(),
            st.f_favail
        ))
        .into());
    }
    Ok(())
}
