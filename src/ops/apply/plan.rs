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
use crate::core::object::{Hash, Meta, ObjectId, short_hex};
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
    let empty = base_version == super::read::EMPTY_BASE;
    let base = match empty {
        true => crate::core::manifest::empty_tree(),
        false => root.load_manifest_unverified(base_version)?,
    };
    log::debug!("loaded the manifest of `{base_version}`");
    let (base_content, base_paths) = base_contents(&base, d);
    let new = compose(base, d).map_err(|e| {
        // A result that does not check out may come from a damaged stored base manifest
        // rather than from the delta: say so if it is.
        match (empty, root.load_manifest(base_version)) {
            (false, Err(damaged)) => {
                damaged.context("the installed base tree's manifest is damaged")
            }
            _ => e,
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
    /// The most bytes of blobs spooled to `tmp/` at once (`write`: blobs over
    /// `BLOB_IN_MEMORY`, as many at a time as the bytes in flight allow, or one larger one).
    pub(super) spool: u64,
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
        spool: spooled_at_once(d),
    };
    plan_objects(&mut plan, d, &in_delta, &in_pool)?;
    Ok(plan)
}

/// The most blob bytes `write` spools at once: the blobs over `BLOB_IN_MEMORY`, no more of
/// them at a time than the bytes it keeps in flight, or the largest one if that is larger.
fn spooled_at_once(d: &Delta) -> u64 {
    let spooled = d
        .contents
        .iter()
        .filter_map(|c| c.blob.map(|(_, n)| n))
        .filter(|&n| n > super::read::BLOB_IN_MEMORY);
    let (total, largest) = spooled.fold((0u64, 0u64), |(t, l), n| (t.saturating_add(n), l.max(n)));
    total.min(largest.max(super::write::IN_FLIGHT_BYTES))
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
                    short_hex(&c.sha256),
                    short_hex(r)
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
        // A content with holes takes its data, not its size (`Pool::store_bounded` holds it
        // to that; the parser refuses `data` over `size`).
        let takes = in_delta
            .get(sha256)
            .and_then(|&k| d.contents[k].data)
            .unwrap_or(*size);
        plan.bytes = plan.bytes.saturating_add(takes);
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
    let r = crate::ops::gc::gc(root, cfg, 0, &[base_version])?;
    log::warn!("gc: {}", r.summary());
    check_space(root, plan, new).map(drop)
}

/// `check_fits` on the free space of the root's file system; returns the bytes needed and
/// free.
pub(super) fn check_space(root: &Root, plan: &Plan, new: &Manifest) -> Result<(u64, u64)> {
    let free = crate::fs::sys::free_bytes(root.fd())?;
    check_fits(&root.path, free, plan, new)
}

/// Refuses, before anything is written, an apply that would not fit: new objects rounded up to
/// blocks, the blobs spooled at once, one block per new directory, the manifest, and a margin of 5% plus 16 MiB; and
/// about one inode per new object and per four entries, where the file system counts inodes.
/// `free` is what `fs::sys::free_bytes` says of the file system at `path`.
fn check_fits(
    path: &Path,
    free: (u64, u64, Option<u64>),
    plan: &Plan,
    new: &Manifest,
) -> Result<(u64, u64)> {
    let (free, frsize, free_inodes) = free;
    let block = frsize.max(512);
    let round = |n: u64| n.div_ceil(block).saturating_mul(block);
    let dirs = new.entries.iter().filter(|e| e.is_dir()).count() as u64;
    let mut need: u64 = round(plan.bytes)
        .saturating_add(round(plan.spool))
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
    Ok((need, free))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::delta::Content;

    fn sha(n: u8) -> Hash {
        [n; 32]
    }

    fn hex(n: u8) -> String {
        hex::encode(sha(n))
    }

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
            kind: Kind::Dir,
        }
    }

    /// A regular file of content `n` (size 10·n) with mode `mode`.
    fn file_mode(path: &str, n: u8, mode: u32) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            meta: Meta {
                mode,
                ..Meta::default()
            },
            kind: Kind::File {
                size: 10 * u64::from(n),
                sha256: sha(n),
            },
        }
    }

    fn file(path: &str, n: u8) -> Entry {
        file_mode(path, n, 0o644)
    }

    /// Content `n` (size 10·n) shipped as `source`.
    fn content(n: u8, source: Source) -> Content {
        let blob = (source != Source::Base).then_some((sha(200), 1));
        Content {
            sha256: sha(n),
            size: 10 * u64::from(n),
            data: None,
            source,
            codec: Default::default(),
            blob,
        }
    }

    fn patch(n: u8, base: u8) -> Content {
        content(n, Source::ZstdPatch { base: sha(base) })
    }

    fn bsdiff(n: u8, base: u8) -> Content {
        content(n, Source::Bsdiff { base: sha(base) })
    }

    /// A delta that declares `declared` as its result (its count and digest).
    fn delta(removed: &[&str], changed: &[Entry], declared: &[Entry]) -> Delta {
        Delta {
            to_version: "2".into(),
            to_digest: tree_digest(declared),
            to_count: declared.len() as u64,
            removed: removed.iter().map(|p| p.as_bytes().into()).collect(),
            changed: changed.to_vec(),
            ..Delta::default()
        }
    }

    fn manifest(entries: &[Entry]) -> Manifest {
        Manifest {
            version: Some("1".into()),
            entries: entries.to_vec(),
        }
    }

    fn not_a_tree(path: &str, parent: &str) -> String {
        format!(
            "invalid delta: its result is not a valid tree: `{path}` is listed but its parent \
             `{parent}` is not a directory of the tree"
        )
    }

    /// Composing: each case's delta declares its expected result (or, for the error cases,
    /// the base: so a result that differs in count or digest is an error).
    #[test]
    fn compose_cases() {
        let base = vec![
            dir("."),
            file("a", 1),
            dir("d"),
            file("d/x", 2),
            file("d/y", 3),
            file("e", 4),
        ];
        let with_a7 = |rest: &[Entry]| [&[dir("."), file("a", 7)], rest].concat();
        /// A name, the removed paths, the changed entries, and the result or the error.
        type Case = (
            &'static str,
            &'static [&'static str],
            Vec<Entry>,
            Result<Vec<Entry>, String>,
        );
        let cases: Vec<Case> = vec![
            (
                "a new file",
                &[],
                vec![file("b", 5)],
                Ok(vec![
                    dir("."),
                    file("a", 1),
                    file("b", 5),
                    dir("d"),
                    file("d/x", 2),
                    file("d/y", 3),
                    file("e", 4),
                ]),
            ),
            (
                "a new directory and a file in it, between old entries",
                &[],
                vec![dir("c"), file("c/z", 6), file("d/w", 8)],
                Ok(vec![
                    dir("."),
                    file("a", 1),
                    dir("c"),
                    file("c/z", 6),
                    dir("d"),
                    file("d/w", 8),
                    file("d/x", 2),
                    file("d/y", 3),
                    file("e", 4),
                ]),
            ),
            (
                "a changed content and a changed mode",
                &[],
                vec![file("a", 7), file_mode("e", 4, 0o755)],
                Ok(with_a7(&[
                    dir("d"),
                    file("d/x", 2),
                    file("d/y", 3),
                    file_mode("e", 4, 0o755),
                ])),
            ),
            (
                "a removed file",
                &["a"],
                vec![],
                Ok(vec![
                    dir("."),
                    dir("d"),
                    file("d/x", 2),
                    file("d/y", 3),
                    file("e", 4),
                ]),
            ),
            (
                "a removed directory with its children",
                &["d", "d/x", "d/y"],
                vec![],
                Ok(vec![dir("."), file("a", 1), file("e", 4)]),
            ),
            (
                "a directory replaced by a file",
                &["d/x", "d/y"],
                vec![file("d", 9)],
                Ok(vec![dir("."), file("a", 1), file("d", 9), file("e", 4)]),
            ),
            (
                "added, changed and removed at once",
                &["d/y"],
                vec![file("a", 7), file("b", 5), file("d/w", 8), file("f", 6)],
                Ok(with_a7(&[
                    file("b", 5),
                    dir("d"),
                    file("d/w", 8),
                    file("d/x", 2),
                    file("e", 4),
                    file("f", 6),
                ])),
            ),
            (
                "a removed directory whose children stay",
                &["d"],
                vec![],
                Err(not_a_tree("d/x", "d")),
            ),
            (
                "a change under a removed directory",
                &["d", "d/x", "d/y"],
                vec![file("d/z", 5)],
                Err(not_a_tree("d/z", "d")),
            ),
            (
                "a new file under a file",
                &[],
                vec![file("a/z", 5)],
                Err(not_a_tree("a/z", "a")),
            ),
            (
                "a removed path the base lacks",
                &["b"],
                vec![],
                Err("invalid delta: it removes `b`, which the base tree does not have".into()),
            ),
            (
                "a result with another count than declared",
                &[],
                vec![file("b", 5)],
                Err("the delta's result has 7 entries, but it declares 6".into()),
            ),
            (
                "a result with another digest than declared",
                &[],
                vec![file("a", 7)],
                Err(format!(
                    "the delta's result has digest {}, but it declares {}",
                    hex::encode(tree_digest(&with_a7(&base[2..]))),
                    hex::encode(tree_digest(&base))
                )),
            ),
        ];
        for (name, removed, changed, want) in cases {
            let declared = want.as_ref().unwrap_or(&base);
            let d = delta(removed, &changed, declared);
            let got = compose(manifest(&base), &d).map_err(|e| format!("{e:#}"));
            let want = want.map(|entries| Manifest {
                version: Some("2".into()),
                entries,
            });
            assert_eq!(got, want, "{name}");
        }
    }

    /// What a plan says, by content number and changed path, for comparing with a case.
    #[derive(Debug, PartialEq)]
    struct Summary {
        /// Contents with new objects, and the paths of the changed files they are made for.
        new: Vec<(u8, Vec<&'static str>)>,
        /// Contents whose object the pool has, and the path of the changed file it is for.
        existing: Vec<(u8, &'static str)>,
        /// Contents of the base the delta refers to, and a path of the base with each.
        base: Vec<(u8, &'static str)>,
        bytes: u64,
        objects: u64,
    }

    /// Checks that `plan` is what `want` says, the objects and metadata included.
    fn check_plan(plan: &Plan, want: &Summary, base: &[Entry], changed: &[Entry], name: &str) {
        let entry = |set: &[Entry], p: &str| -> Entry {
            set.iter()
                .find(|e| *e.path == *p.as_bytes())
                .unwrap()
                .clone()
        };
        let metas: HashMap<Hash, Vec<(Meta, ObjectId)>> = want
            .new
            .iter()
            .map(|(n, paths)| {
                let objects = paths.iter().map(|p| entry(changed, p)).map(|e| {
                    let id = e.object().unwrap();
                    (e.meta, id)
                });
                (sha(*n), objects.collect())
            })
            .collect();
        let existing: HashMap<Hash, ObjectId> = want
            .existing
            .iter()
            .map(|(n, p)| (sha(*n), entry(changed, p).object().unwrap()))
            .collect();
        let base_content: BaseContent = want
            .base
            .iter()
            .map(|(n, p)| (sha(*n), entry(base, p).object().unwrap()))
            .collect();
        let base_paths: BasePaths = want
            .base
            .iter()
            .map(|(n, p)| (sha(*n), p.as_bytes().into()))
            .collect();
        assert_eq!(plan.metas, metas, "{name}: new objects");
        assert_eq!(plan.existing, existing, "{name}: objects in the pool");
        assert_eq!(plan.base_content, base_content, "{name}: base objects");
        assert_eq!(plan.base_paths, base_paths, "{name}: base paths");
        assert_eq!(
            (plan.bytes, plan.objects),
            (want.bytes, want.objects),
            "{name}: bytes and objects"
        );
    }

    fn summary(
        new: &[(u8, &[&'static str])],
        existing: &[(u8, &'static str)],
        base: &[(u8, &'static str)],
        bytes: u64,
        objects: u64,
    ) -> Summary {
        Summary {
            new: new.iter().map(|(n, p)| (*n, p.to_vec())).collect(),
            existing: existing.to_vec(),
            base: base.to_vec(),
            bytes,
            objects,
        }
    }

    /// Planning, on the base `.`, `a` (content 1), `b` (2), `c` (3) and `c2` (3 again); each
    /// case has the delta's contents, its changed entries, the changed paths whose objects
    /// the pool has, and the plan or the error.
    #[test]
    fn plan_cases() {
        let base = vec![
            dir("."),
            file("a", 1),
            file("b", 2),
            file("c", 3),
            file("c2", 3),
        ];
        let missing = |n: u8| {
            format!(
                "`e` needs content {} which neither the delta nor the pool has",
                hex(n)
            )
        };
        let neither = |n: u8, r: u8| {
            format!(
                "invalid delta: content {} is a patch against {}, which is neither in the base \
                 tree nor earlier in the delta",
                short_hex(&sha(n)),
                short_hex(&sha(r))
            )
        };
        type Case = (
            &'static str,
            Vec<Content>,
            Vec<Entry>,
            &'static [&'static str],
            Result<Summary, String>,
        );
        let cases: Vec<Case> = vec![
            (
                "a new content",
                vec![content(5, Source::Zstd)],
                vec![file("e", 5)],
                &[],
                Ok(summary(&[(5, &["e"])], &[], &[], 50, 1)),
            ),
            (
                "one content with two modes makes two objects",
                vec![content(5, Source::Zstd)],
                vec![file("e", 5), file_mode("f", 5, 0o600)],
                &[],
                Ok(summary(&[(5, &["e", "f"])], &[], &[], 100, 2)),
            ),
            (
                "the same object at two paths is made once",
                vec![content(5, Source::Zstd)],
                vec![file("e", 5), file("f", 5)],
                &[],
                Ok(summary(&[(5, &["e"])], &[], &[], 50, 1)),
            ),
            (
                "an object the pool has is not made",
                vec![content(5, Source::Zstd)],
                vec![file("e", 5), file_mode("f", 5, 0o600)],
                &["e"],
                Ok(summary(&[(5, &["f"])], &[(5, "e")], &[], 50, 1)),
            ),
            (
                "an object the pool has needs no content",
                vec![],
                vec![file("e", 5)],
                &["e"],
                Ok(summary(&[], &[(5, "e")], &[], 0, 0)),
            ),
            (
                "a base content with new metadata (the first base path kept)",
                vec![content(3, Source::Base)],
                vec![file_mode("a", 3, 0o600)],
                &[],
                Ok(summary(&[(3, &["a"])], &[], &[(3, "c")], 30, 1)),
            ),
            (
                "a patch against the base",
                vec![patch(5, 2)],
                vec![file("b", 5)],
                &[],
                Ok(summary(&[(5, &["b"])], &[], &[(2, "b")], 50, 1)),
            ),
            (
                "a patch against an earlier content only used as a reference",
                vec![content(5, Source::Zstd), bsdiff(6, 5)],
                vec![file("f", 6)],
                &[],
                Ok(summary(&[(6, &["f"])], &[], &[], 60, 1)),
            ),
            (
                "a base content the base lacks",
                vec![content(5, Source::Base)],
                vec![file("e", 5)],
                &[],
                Err(format!(
                    "invalid delta: content {} is said to be in the base tree, which does not \
                     have it",
                    hex(5)
                )),
            ),
            (
                "a patch against a later content",
                vec![bsdiff(6, 5), content(5, Source::Zstd)],
                vec![file("e", 5), file("f", 6)],
                &[],
                Err(neither(6, 5)),
            ),
            (
                "a patch against a content nobody has",
                vec![patch(6, 9)],
                vec![file("f", 6)],
                &[],
                Err(neither(6, 9)),
            ),
            (
                "a content neither in the delta nor in the pool",
                vec![],
                vec![file("e", 5)],
                &[],
                Err(missing(5)),
            ),
            (
                "a base content not in the delta is missing too",
                vec![],
                vec![file_mode("e", 1, 0o600)],
                &[],
                Err(missing(1)),
            ),
            (
                "a file whose size is not its content's",
                vec![content(5, Source::Zstd)],
                vec![Entry {
                    kind: Kind::File {
                        size: 7,
                        sha256: sha(5),
                    },
                    ..file("e", 5)
                }],
                &[],
                Err(format!(
                    "invalid delta: `e` has size 7, but its content {} has size 50",
                    hex(5)
                )),
            ),
        ];
        for (name, contents, changed, in_pool, want) in cases {
            let d = Delta {
                contents,
                ..delta(&[], &changed, &[])
            };
            let in_pool: HashSet<ObjectId> = in_pool
                .iter()
                .map(|p| {
                    let e = changed.iter().find(|e| *e.path == *p.as_bytes()).unwrap();
                    e.object().unwrap()
                })
                .collect();
            let (base_content, base_paths) = base_contents(&manifest(&base), &d);
            let got = plan(base_content, base_paths, &d, in_pool);
            match (got, want) {
                (Ok(p), Ok(want)) => check_plan(&p, &want, &base, &changed, name),
                (Err(e), Err(want)) => assert_eq!(format!("{e:#}"), want, "{name}"),
                (Ok(_), Err(want)) => panic!("{name}: planned, but wanted: {want}"),
                (Err(e), Ok(_)) => panic!("{name}: {e:#}"),
            }
        }
    }

    /// The free-space check: a plan of 1000 bytes in one new object, for a tree of one
    /// directory. Each case: the fragment size, the free bytes and inodes, and the error.
    #[test]
    fn check_fits_cases() {
        let plan = Plan {
            metas: HashMap::new(),
            base_content: BaseContent::new(),
            base_paths: BasePaths::new(),
            existing: HashMap::new(),
            bytes: 1000,
            objects: 1,
            spool: 0,
        };
        let new = manifest(&[dir(".")]);
        // 4096-byte blocks: 3 blocks (content, object, directory), 200 bytes of manifest, 5%
        // and 16 MiB; 512-byte blocks (and a file system that says 0): 2 + 1 + 1 blocks.
        let (need_4k, need_512) = (16790328, 16779576);
        let short = |need: u64, free: u64| {
            format!(
                "not enough space in `/r`: the update needs {} MiB, {} MiB are free ({} MiB \
                 missing)",
                need.div_ceil(1 << 20),
                free >> 20,
                (need - free).div_ceil(1 << 20)
            )
        };
        let inodes = "not enough inodes in `/r`: the update needs about 17, 16 are free";
        type Case = (u64, u64, Option<u64>, Result<(), String>);
        let cases: Vec<Case> = vec![
            (4096, need_4k, None, Ok(())),
            (4096, need_4k - 1, None, Err(short(need_4k, need_4k - 1))),
            (512, need_512, None, Ok(())),
            (512, need_512 - 1, None, Err(short(need_512, need_512 - 1))),
            (0, need_512, None, Ok(())),
            (0, need_512 - 1, None, Err(short(need_512, need_512 - 1))),
            (4096, 0, None, Err(short(need_4k, 0))),
            (4096, need_4k, Some(17), Ok(())),
            (4096, need_4k, Some(16), Err(inodes.into())),
        ];
        for (frsize, free, free_inodes, want) in cases {
            let got = check_fits(Path::new("/r"), (free, frsize, free_inodes), &plan, &new)
                .map(|(need, free_then)| {
                    assert_eq!(free_then, free);
                    assert!(need <= free, "{need} > {free}");
                })
                .map_err(|e| format!("{e:#}"));
            assert_eq!(
                got, want,
                "block {frsize}, {free} bytes, {free_inodes:?} inodes"
            );
        }
    }
}
