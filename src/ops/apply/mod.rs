//! `treeswap apply`: check a delta against the installed trees, write its new objects, stage
//! the new tree beside the running one, verify it, and flip.
//!
//! Nothing is written before the delta manifest has been parsed, its base found, the
//! resulting manifest composed and its digest checked against the delta's `to` digest, and
//! the free space checked. Blobs are then read in order from the stream (so a delta can be
//! piped in), each checked against its hash before it is decoded, and each decoded content
//! checked against its hash before it is published.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::core::config::Config;
use crate::core::delta::{self, Content, Delta, MANIFEST_MEMBER, SIGNATURE_MEMBER, Source};
use crate::core::error::Fail;
use crate::core::manifest::{Entry, Kind, Manifest, check_tree, tree_digest};
use crate::core::object::Hash;
use crate::core::object::{Meta, ObjectId};
use crate::fs::hash::FdReader;
use crate::ops::{flip, install};
use crate::store::pool::Pool;
use crate::store::root::Root;

/// The largest delta manifest accepted (a million changed entries take about 200 MB).
const MAX_MANIFEST: u64 = 1 << 30;

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

/// Reads a small member that must come next, by name.
fn read_small<R: Read>(entries: &mut tar::Entries<R>, want: &str, limit: u64) -> Result<Vec<u8>> {
    let mut m = entries
        .next()
        .ok_or_else(|| bad(format!("it is truncated: member `{want}` is missing")))?
        .map_err(|e| bad(format!("cannot read member `{want}`: {e}")))?;
    let name = m.path_bytes().into_owned();
    if m.header().entry_type() != tar::EntryType::Regular {
        return Err(bad(format!("member `{want}` is not a regular file")));
    }
    if name != want.as_bytes() {
        return Err(bad(format!(
            "expected member `{want}`, found `{}`",
            crate::core::path::display(&name)
        )));
    }
    if m.header().size().unwrap_or(u64::MAX) > limit {
        return Err(bad(format!("member `{want}` is too large")));
    }
    let mut data = Vec::new();
    (&mut m)
        .take(limit)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("cannot read `{want}`: {e}")))?;
    Ok(data)
}

/// Reads the first two members of a delta, checks the signature, and parses the manifest.
fn read_manifest<R: Read>(
    entries: &mut tar::Entries<R>,
    policy: crate::ops::trust::Policy,
) -> Result<Delta> {
    let text = read_small(entries, MANIFEST_MEMBER, MAX_MANIFEST)?;
    let sig = read_small(entries, SIGNATURE_MEMBER, 64 << 10)?;
    let sig = String::from_utf8(sig).map_err(|_| bad("its signature is not text"))?;
    // The signature is checked on the exact bytes, before they are parsed.
    crate::ops::trust::check(&text, &sig, policy)?;
    let text = String::from_utf8(text).map_err(|_| bad("its manifest is not UTF-8"))?;
    delta::parse(&text).map_err(|e| bad(format!("{e:#}")))
}

/// Reads and parses the head of a delta (manifest and signature member) from a stream, with no
/// trusted keys and no state root: the entry point of the delta-reader fuzz target.
pub fn read_delta_head(input: impl Read) -> Result<Delta> {
    let mut archive = tar::Archive::new(tar_stream(input)?);
    let mut entries = archive.entries().map_err(bad)?;
    read_manifest(&mut entries, crate::ops::trust::Policy::Keys(&[]))
}

/// Applies the delta manifest to the base manifest: the result's manifest, checked to be a
/// tree whose digest is the delta's `to` digest.
/// The base is consumed and changed in place (replaced entries swapped, removed ones dropped,
/// new ones merged in from the back), so that only one tree's worth of entries is in memory.
pub fn compose(base: Manifest, d: &Delta) -> Result<Manifest> {
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

/// The version whose stored manifest has `digest`, preferring `current`.
fn find_base(root: &Root, digest: &Hash) -> Result<Option<String>> {
    let current = root.link("current")?;
    let mut versions = root.versions()?;
    if let Some(c) = &current {
        versions.retain(|v| v != c);
        versions.insert(0, c.clone());
    }
    for v in versions {
        if root.manifest_digest(&v)? == Some(*digest) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// zstd frames start with these bytes; a delta is a plain tar or a zstd-compressed one.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The delta's tar stream, decompressed if it is zstd-compressed. The outer window is capped
/// at zstd's default limit (128 MiB), whatever a frame header asks for.
fn tar_stream<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    use std::io::BufRead;
    let mut input = std::io::BufReader::with_capacity(1 << 16, input);
    let head = input
        .fill_buf()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if head.starts_with(&ZSTD_MAGIC) {
        let mut dec = zstd::stream::read::Decoder::with_buffer(input).map_err(bad)?;
        dec.window_log_max(27).map_err(bad)?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(input))
    }
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

/// For contents of the base tree: the path of a file of the base tree that has it.
type BasePaths = HashMap<Hash, Box<[u8]>>;

/// What applying needs to write.
struct Plan {
    /// For each content of the delta that some new object needs: the metadata of each object
    /// to make from it.
    metas: HashMap<Hash, Vec<(Meta, ObjectId)>>,
    /// Objects of the base tree by content, the references a delta may use.
    base_content: HashMap<Hash, ObjectId>,
    /// The path of a file of the base tree with each of those contents.
    base_paths: BasePaths,
    /// For contents whose objects the pool already has: one of those objects, a reference
    /// for later patches.
    existing: HashMap<Hash, ObjectId>,
    /// Bytes of new objects.
    bytes: u64,
    objects: u64,
}

/// The objects of the base tree that hold the contents the delta refers to (as contents it
/// already has, or as patch references), and a path in the base tree of each. Only those: a
/// map of the whole base would cost ~100 MB at a million entries.
fn base_contents(base: &Manifest, d: &Delta) -> (HashMap<Hash, ObjectId>, BasePaths) {
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
fn plan(
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
fn check_space(root: &Root, plan: &Plan, new: &Manifest) -> Result<()> {
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

/// Reads a whole object's bytes and checks them against the content hash they must have.
fn read_checked(pool: &Pool, id: &ObjectId, sha: &Hash) -> Result<Vec<u8>> {
    let fd = pool.open_object(id)?;
    let data = read_all(fd.as_fd()).context("cannot read a patch base")?;
    let got: Hash = Sha256::digest(&data).into();
    if &got != sha {
        return Err(Fail::Integrity(format!(
            "patch base object {} in the pool is corrupt (run `treeswap verify --full`)",
            hex::encode(id)
        ))
        .into());
    }
    Ok(data)
}

fn read_all(fd: BorrowedFd) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    FdReader { fd, off: 0 }.read_to_end(&mut data)?;
    Ok(data)
}

/// Where contents of the base tree are read from besides the pool: the base tree's read-only
/// snapshot, when staging from it (see `apply`).
struct BaseFiles<'a> {
    tree: Option<&'a OwnedFd>,
    paths: &'a BasePaths,
    /// How many contents were read from the tree.
    used: std::sync::atomic::AtomicU64,
}

impl BaseFiles<'_> {
    /// The base tree's file with content `sha`, open for reading, if there is one.
    fn open(&self, sha: &Hash) -> Option<OwnedFd> {
        let tree = self.tree?;
        let path = self.paths.get(sha)?;
        crate::fs::sys::open_file_beneath(tree.as_fd(), path).ok()
    }

    /// The bytes of content `sha` from the base tree's file, if it has them: anything else
    /// (no such file, another content there) is `None`, and the caller reads the pool.
    fn read(&self, sha: &Hash) -> Option<Vec<u8>> {
        let data = read_all(self.open(sha)?.as_fd()).ok()?;
        let got: Hash = Sha256::digest(&data).into();
        if &got != sha {
            log::debug!(
                "the base tree's file of content {} differs; reading the pool",
                hex::encode(sha)
            );
            return None;
        }
        self.used_one();
        Some(data)
    }

    fn used_one(&self) {
        self.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads the blob member of `c` from the stream and checks its hash.
fn read_blob<R: Read>(entries: &mut tar::Entries<R>, c: &Content) -> Result<Vec<u8>> {
    let (want_sha, want_size) = c.blob.expect("blob");
    let name = Delta::blob_member(c);
    let mut member = entries
        .next()
        .ok_or_else(|| bad(format!("it is truncated: member `{name}` is missing")))?
        .map_err(|e| bad(format!("cannot read member `{name}`: {e}")))?;
    let got_name = member.path_bytes().into_owned();
    if member.header().entry_type() != tar::EntryType::Regular {
        return Err(bad(format!("member `{name}` is not a regular file")));
    }
    if got_name != name.as_bytes() {
        return Err(bad(format!(
            "expected member `{name}`, found `{}`",
            crate::core::path::display(&got_name)
        )));
    }
    if member.header().size().ok() != Some(want_size) {
        return Err(bad(format!(
            "member `{name}` does not have its declared size {want_size}"
        )));
    }
    // No allocation ahead of the bytes: the vector grows as they arrive.
    let mut blob = Vec::new();
    (&mut member)
        .take(want_size)
        .read_to_end(&mut blob)
        .map_err(|e| bad(format!("cannot read member `{name}`: {e}")))?;
    if blob.len() as u64 != want_size {
        return Err(bad(format!("member `{name}` is truncated")));
    }
    let got: Hash = Sha256::digest(&blob).into();
    if got != want_sha {
        return Err(Fail::Integrity(format!(
            "member `{name}` does not match its sha256 (the delta is corrupt or was tampered with)"
        ))
        .into());
    }
    Ok(blob)
}

/// The contents being decoded at once hold at most this many bytes (blobs plus results),
/// unless one content alone is larger.
const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// Writes every new object. Blobs are read from the stream in delta order, and each content
/// is decoded and written by a worker thread as soon as its blob is in, so that the cold reads
/// of references overlap. References and contents of the base are read from `base_tree` (the
/// base's read-only snapshot) where it has them, else from the pool. A patch against a
/// content still being made waits until the contents in flight are done.
fn materialize<R: Read>(
    d: &Delta,
    plan: &Plan,
    pool: &Pool,
    base_tree: Option<&OwnedFd>,
    entries: &mut tar::Entries<R>,
) -> Result<()> {
    let files = BaseFiles {
        tree: base_tree,
        paths: &plan.base_paths,
        used: 0.into(),
    };
    use std::sync::Mutex;
    // Where each content can be read from once it exists: an object of the base or one this
    // apply wrote.
    let have: Mutex<HashMap<Hash, ObjectId>> = Mutex::new(plan.base_content.clone());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let progress = crate::core::progress::Progress::items(d.contents.len() as u64, "writing");
    // From a snapshot, workers wait on cold reads of the snapshot's metadata: many keep
    // several in flight. Otherwise one per core, and the main thread announces each
    // reference to the kernel (`POSIX_FADV_WILLNEED`) before handing its content out.
    let threads = match base_tree {
        Some(_) => crate::tree::stage::io_threads()?,
        None => rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .build()
            .context("cannot start threads")?,
    };
    let mut next = 0;
    while next < d.contents.len() {
        // One round: contents are handed to workers until one needs a content still in
        // flight, or the bytes in flight reach the limit; the round ends when all are done.
        threads.in_place_scope(|s| -> Result<()> {
            let mut in_flight: HashSet<Hash> = HashSet::new();
            let mut bytes = 0u64;
            while let Some(c) = d.contents.get(next) {
                if failed.lock().expect("poisoned").is_some() {
                    break;
                }
                let waits = c.source.base().is_some_and(|r| in_flight.contains(r));
                if !in_flight.is_empty() && (waits || bytes >= IN_FLIGHT_BYTES) {
                    break;
                }
                next += 1;
                let blob = match c.blob {
                    Some(_) => Some(read_blob(entries, c)?),
                    None => None,
                };
                let Some(metas) = plan.metas.get(&c.sha256).filter(|m| !m.is_empty()) else {
                    // Every object this content makes is in the pool already; later patches
                    // may still use it as their reference.
                    progress.inc(1);
                    if let Some(id) = plan.existing.get(&c.sha256) {
                        have.lock()
                            .expect("poisoned")
                            .entry(c.sha256)
                            .or_insert(*id);
                    }
                    continue;
                };
                let source = match c.source {
                    Source::Base => Some(c.sha256),
                    _ => c.source.base().copied(),
                };
                if base_tree.is_none()
                    && let Some(id) =
                        source.and_then(|h| have.lock().expect("poisoned").get(&h).copied())
                    && let Ok(fd) = pool.open_object(&id)
                {
                    let _ = rustix::fs::fadvise(&fd, 0, None, rustix::fs::Advice::WillNeed);
                }
                bytes = bytes
                    .saturating_add(blob.as_ref().map_or(0, |b| b.len() as u64))
                    .saturating_add(c.size);
                in_flight.insert(c.sha256);
                let (have, failed, progress, files) = (&have, &failed, &progress, &files);
                s.spawn(move |_| {
                    match write_content(c, blob.as_deref(), metas, have, pool, files) {
                        Ok(id) => {
                            have.lock().expect("poisoned").insert(c.sha256, id);
                        }
                        Err(e) => {
                            failed.lock().expect("poisoned").get_or_insert(e);
                        }
                    }
                    progress.inc(1);
                });
            }
            Ok(())
        })?;
        if let Some(e) = failed.lock().expect("poisoned").take() {
            return Err(e);
        }
    }
    progress.finish();
    if base_tree.is_some() {
        log::debug!(
            "read {} of the base's contents from its snapshot",
            files.used.into_inner()
        );
    }
    Ok(())
}

/// Makes the objects `metas` (at least one) of content `c` from its blob or reference;
/// returns the first one's id.
fn write_content(
    c: &Content,
    blob: Option<&[u8]>,
    metas: &[(Meta, ObjectId)],
    have: &std::sync::Mutex<HashMap<Hash, ObjectId>>,
    pool: &Pool,
    files: &BaseFiles,
) -> Result<ObjectId> {
    let have = |sha: &Hash| have.lock().expect("poisoned").get(sha).copied();
    let ((meta0, id0), rest) = metas.split_first().expect("an object to make");
    let what = || format!("content {}", hex::encode(c.sha256));
    let reference = |sha: &Hash| -> Result<Vec<u8>> {
        let id =
            have(sha).ok_or_else(|| anyhow!("reference {} is not available", hex::encode(sha)))?;
        match files.read(sha) {
            Some(data) => Ok(data),
            None => read_checked(pool, &id, sha),
        }
    };
    let copy_of = |id: &ObjectId, meta: &Meta| -> Result<()> {
        let src = pool.open_object(id)?;
        pool.store(
            &mut FdReader {
                fd: src.as_fd(),
                off: 0,
            },
            meta,
            c.size,
            &c.sha256,
        )
        .with_context(what)?;
        Ok(())
    };
    match &c.source {
        Source::Base => {
            let id = have(&c.sha256)
                .ok_or_else(|| anyhow!("content {} is not available", hex::encode(c.sha256)))?;
            // From the base tree's file if it has the content (`store` checks it), else
            // from the pool.
            let from_tree = files.open(&c.sha256).map(|fd| {
                let mut src = FdReader {
                    fd: fd.as_fd(),
                    off: 0,
                };
                pool.store(&mut src, meta0, c.size, &c.sha256)
            });
            match from_tree {
                Some(Ok(_)) => files.used_one(),
                Some(Err(e)) => {
                    log::debug!("{e:#}; reading the pool");
                    copy_of(&id, meta0)?;
                }
                None => copy_of(&id, meta0)?,
            }
        }
        Source::Zstd | Source::ZstdPatch { .. } => {
            let reference = c.source.base().map(reference).transpose()?;
            let blob = blob.expect("blob");
            let mut dec =
                crate::core::codec::stream(&c.source, blob, reference.as_deref(), c.size)?;
            pool.store(&mut dec, meta0, c.size, &c.sha256)
                .with_context(what)?;
        }
        Source::Bsdiff { base } => {
            let reference = reference(base)?;
            let out = crate::core::codec::bsdiff_apply(&reference, blob.expect("blob"), c.size)?;
            pool.store(&mut &out[..], meta0, c.size, &c.sha256)
                .with_context(what)?;
        }
    }
    crate::core::failpoint::hit("apply-after-object");
    for (meta, _) in rest {
        copy_of(id0, meta)?;
    }
    Ok(*id0)
}
