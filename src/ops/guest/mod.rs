//! Guests that live on the tree (issue 16). A guest in overlay mode runs on an overlay
//! mounted at `guests/<name>/rootfs`: the tree below, read-only, and its own layer
//! (`guests/<name>/layer-<N>`, persistent across versions) above, so that whatever the guest
//! writes, the pool and every tree stay as installed. A guest in tree mode runs on the tree.
//!
//! Moving a guest onto a tree ([`restart`]): `stop`, unmount, merge the layer for the new tree
//! ([`merge`]), mount, `start`. The merge works on a new layer, a hardlink copy of the old one
//! (it only removes and renames names, never writes a file), so the old layer stays whole
//! until every guest of the flip has started ([`settle`]): a flip back gives each guest
//! exactly the layer it had. The state file records which layer each guest runs on and for
//! which tree it was merged, after the merge and before the mount; a crash anywhere leaves
//! the recorded layer whole, and `boot` finishes the move.

pub(crate) mod merge;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rustix::fs::FileType;
use rustix::io::Errno;

use crate::core::config::{Config, Guest, Policy};
use crate::core::failpoint;
use crate::core::manifest::{Entry, Kind, Manifest};
use crate::core::path::{display, quote};
use crate::fs::{guestfs, hash, mount, sparse, sys};
use crate::ops::guests::{HookEnv, hook};
use crate::store::root::Root;
use crate::store::state::{self, GuestRecord, GuestUndo, MAX_CONFLICTS, State};
use crate::tree::scan;

/// `guests/` in the root.
const GUESTS: &str = "guests";

/// The places of one overlay guest.
pub(crate) struct Place {
    /// `<root>/guests/<name>`, absolute.
    pub dir: PathBuf,
    pub fd: OwnedFd,
    pub rootfs: PathBuf,
    pub work: PathBuf,
}

impl Place {
    fn layer_name(n: u64) -> String {
        format!("layer-{n}")
    }
    pub(crate) fn layer(&self, n: u64) -> PathBuf {
        self.dir.join(Self::layer_name(n))
    }
}

/// The absolute path of the root (overlay options and mount points are names).
fn root_abs(root: &Root) -> Result<PathBuf> {
    mount::absolute(&root.path)
}

/// `guests/<name>/` with `rootfs/` and `work/`, made if missing. `guests/` and
/// `guests/<name>/` are 0700, enforced each time: a guest's layer and overlay hold what root
/// in the guest made (setuid files, device nodes), which no other user of the host may reach.
pub(crate) fn place(root: &Root, g: &Guest) -> Result<Place> {
    sys::mkdirat(root.fd(), GUESTS.as_bytes(), 0o700, true)?;
    let guests = root.subdir(GUESTS)?;
    guestfs::enforce_mode(guests.as_fd(), 0o700, GUESTS.as_bytes())?;
    sys::mkdirat(guests.as_fd(), g.name.as_bytes(), 0o700, true)?;
    let fd = sys::open_dir_beneath(guests.as_fd(), g.name.as_bytes())?;
    guestfs::enforce_mode(fd.as_fd(), 0o700, g.name.as_bytes())?;
    for d in ["rootfs", "work"] {
        sys::mkdirat(fd.as_fd(), d.as_bytes(), 0o755, true)?;
    }
    let dir = root_abs(root)?.join(GUESTS).join(&g.name);
    Ok(Place {
        rootfs: dir.join("rootfs"),
        work: dir.join("work"),
        dir,
        fd,
    })
}

/// The tree `version`'s directory, absolute.
fn tree_path(root: &Root, version: &str) -> Result<PathBuf> {
    Ok(root_abs(root)?.join("trees").join(version))
}

/// Moves guest `g` onto `target`: in tree mode its `restart` (or `stop` and `start`); in
/// overlay mode `stop`, unmount, merge, mount, `start` (see the module). `st` is the state
/// file as last saved; guest records in it are saved as they change.
pub(crate) fn restart(
    root: &Root,
    g: &Guest,
    target: &str,
    previous: Option<&str>,
    st: &mut State,
) -> Result<()> {
    if !g.is_overlay() {
        let env = HookEnv {
            version: target.to_owned(),
            previous: previous.map(str::to_owned),
            rootfs: tree_path(root, target)?,
            state_root: root_abs(root)?,
        };
        if let Some(argv) = &g.restart {
            hook(g, "restart", argv, &env)?;
        } else {
            let (Some(stop), Some(start)) = (&g.stop, &g.start) else {
                bail!("guest `{}` has no hook", quote(&g.name));
            };
            hook(g, "stop", stop, &env)?;
            hook(g, "start", start, &env)?;
        }
        st.tree_guests.insert(g.name.clone(), target.to_owned());
        return state::save(root.fd(), st);
    }
    let p = place(root, g)?;
    let env = HookEnv {
        version: target.to_owned(),
        previous: st.guest(&g.name).and_then(|r| r.base.clone()),
        rootfs: p.rootfs.clone(),
        state_root: root_abs(root)?,
    };
    let (Some(stop), Some(start)) = (&g.stop, &g.start) else {
        bail!("guest `{}` has no `stop` and `start`", quote(&g.name));
    };
    // Before the stop: the one sweep of a large pool is no downtime of the guest.
    unflag_pool(root, st)?;
    stop_and_unmount(g, &p, stop, &env)?;
    prepare(root, g, &p, target, st)?;
    mount_layer(root, &p, st.guest(&g.name).expect("prepared"), target)?;
    failpoint::hit("guest-before-start");
    hook(g, "start", start, &env)
}

/// Runs the guest's `stop` hook and takes its overlay down; fails if the guest's overlay
/// then still lives (see [`ensure_stopped`]).
fn stop_and_unmount(g: &Guest, p: &Place, stop: &[String], env: &HookEnv) -> Result<()> {
    hook(g, "stop", stop, env)?;
    failpoint::hit("guest-before-remount");
    unmount_all(p)?;
    ensure_stopped(g, p)
}

/// Fails if guest `g`'s overlay still lives once treeswap's own mount of it is gone: a guest
/// that runs in a mount namespace of its own (a container) keeps its copy there, and a
/// process may hold a file of a detached one. Its layer must then not be merged (a survivor
/// would write into inodes the merged layer shares) nor a second overlay mounted on it. The
/// kernel knows ([`mount::work_in_use`]); where it cannot tell, the mount namespaces of all
/// processes are searched instead. Copies that mount propagation gives other namespaces
/// (services with private mounts on a systemd host) went with the unmount.
fn ensure_stopped(g: &Guest, p: &Place) -> Result<()> {
    // A container's mount namespace goes a moment after its last process (the kernel puts
    // its mounts from a work queue): asked again for a while before the answer counts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(g.stop_grace);
    loop {
        let busy = match mount::work_in_use(&p.work, &p.dir.join("probe"))? {
            Some(busy) => busy,
            None => mount::overlay_holder(&p.work, false)?.is_some(),
        };
        if !busy {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let by = match mount::overlay_holder(&p.work, false)? {
        Some(h) => format!(
            "process {} (`{}`) still has it mounted, in a mount namespace of its own",
            h.pid,
            h.comm.escape_debug()
        ),
        None => "a process still holds a file of it".to_owned(),
    };
    bail!(
        "guest `{}` has not stopped: its overlay is still in use ({by}); stop it, then run \
         `treeswap restart-guests {}`",
        quote(&g.name),
        quote(&g.name)
    )
}

/// Before an overlay is mounted: no lower file may carry the immutable flag, which
/// overlayfs copies up and which then refuses the guest's write. Overlay guests never run
/// with the pool in immutable mode (the config refuses it), but a pool made in that mode
/// before (the old default on ext4) keeps its flags until this sweep clears them, once.
fn unflag_pool(root: &Root, st: &mut State) -> Result<()> {
    if st.unflagged {
        return Ok(());
    }
    crate::ops::install::match_flags(root, &root.pool()?, st)
}

/// Unmounts whatever is mounted at the guest's `rootfs`.
fn unmount_all(p: &Place) -> Result<()> {
    // Bounded: a mount point holds few stacked mounts; more is not ours to undo.
    for _ in 0..16 {
        if !mount::unmount(&p.rootfs)? {
            return Ok(());
        }
    }
    bail!("`{}` still has mounts on it", p.rootfs.display())
}

fn mount_layer(root: &Root, p: &Place, rec: &GuestRecord, target: &str) -> Result<()> {
    mount::mount_overlay(
        &tree_path(root, target)?,
        &p.layer(rec.layer),
        &p.work,
        &p.rootfs,
    )?;
    log::info!(
        "guest `{}`: its overlay is mounted on `{target}` (layer {})",
        quote(&rec.name),
        rec.layer
    );
    Ok(())
}

/// Makes the guest's recorded layer the one for `target`: a first, empty layer; the undo
/// layer if it was for `target` (a flip back); else a merged copy of the current one.
fn prepare(root: &Root, g: &Guest, p: &Place, target: &str, st: &mut State) -> Result<()> {
    let mut rec = st.guest_mut(&g.name).clone();
    let name = quote(&g.name);
    if rec.layer == 0
        && let Some(n) = layers(p)?.into_iter().max()
    {
        // Layers on disk but no record (a state file replaced by hand): the newest is the
        // guest's, merged for a tree nobody knows. Its data is never thrown away.
        log::warn!("guest `{name}`: no record of its layer; taking `layer-{n}` as it");
        rec = GuestRecord {
            name: g.name.clone(),
            layer: n,
            ..Default::default()
        };
        *st.guest_mut(&g.name) = rec.clone();
    }
    if rec.layer == 0 {
        let top = root.load_manifest(target)?;
        new_layer(p, 1, &top)?;
        *st.guest_mut(&g.name) = GuestRecord {
            name: g.name.clone(),
            layer: 1,
            base: Some(target.to_owned()),
            ..Default::default()
        };
        return state::save(root.fd(), st);
    }
    if rec.base.as_deref() == Some(target) {
        return Ok(());
    }
    let on_disk = layers(p)?;
    if let Some(u) = rec.undo.as_ref().filter(|u| !on_disk.contains(&u.layer)) {
        // A crash between the removal of the undo layer and the record without it.
        log::warn!(
            "guest `{name}`: its undo layer {} is gone; merging its layer {} instead",
            u.layer,
            rec.layer
        );
    }
    if let Some(u) = rec
        .undo
        .as_ref()
        .filter(|u| u.base.as_deref() == Some(target) && on_disk.contains(&u.layer))
    {
        log::info!(
            "guest `{name}`: back to its layer {} for `{target}`",
            u.layer
        );
        *st.guest_mut(&g.name) = GuestRecord {
            name: g.name.clone(),
            layer: u.layer,
            base: u.base.clone(),
            ..Default::default()
        };
        state::save(root.fd(), st)?;
        return remove_leftovers(p, &[u.layer]);
    }
    // The merge starts from the current layer only: an older undo is no longer needed. The
    // record says so before anything is removed, so that it never names a layer that is gone.
    if rec.undo.is_some() {
        st.guest_mut(&g.name).undo = None;
        state::save(root.fd(), st)?;
    }
    remove_leftovers(p, &[rec.layer])?;
    let Some(next) = rec.layer.checked_add(1) else {
        bail!("guest `{name}`: its layer number {} cannot grow", rec.layer);
    };
    // Made and merged under a name no one adopts, then renamed: a `layer-<N>` is complete.
    let partial = partial_name(next);
    farm(p, rec.layer, &partial)?;
    let old = match &rec.base {
        Some(b) if root.is_installed(b)? => Some(root.load_manifest(b)?),
        _ => None,
    };
    let new = root.load_manifest(target)?;
    let (conflicts, more) = merge_layer(g, p, &partial, old.as_ref(), &new, target)?;
    sys::renameat(
        p.fd.as_fd(),
        partial.as_bytes(),
        p.fd.as_fd(),
        Place::layer_name(next).as_bytes(),
    )
    .with_context(|| format!("cannot name the merged layer `{}`", Place::layer_name(next)))?;
    *st.guest_mut(&g.name) = GuestRecord {
        name: g.name.clone(),
        layer: next,
        base: Some(target.to_owned()),
        undo: Some(GuestUndo {
            layer: rec.layer,
            base: rec.base.clone(),
        }),
        conflicts,
        conflicts_more: more,
    };
    state::save(root.fd(), st)
}

/// The name a layer is made and merged under before it becomes `layer-<n>`.
fn partial_name(n: u64) -> String {
    format!("partial-{n}")
}

/// The numbers of the guest's `layer-<N>` directories (`N` in decimal, as written: not
/// `layer-+1` nor `layer-01`).
fn layers(p: &Place) -> Result<Vec<u64>> {
    Ok(sys::read_dir(p.fd.as_fd())?
        .iter()
        .filter_map(|n| layer_number(n.strip_prefix(b"layer-")?))
        .collect())
}

fn layer_number(digits: &[u8]) -> Option<u64> {
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || digits.len() == 1);
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .filter(|_| canonical)
}

/// Removes every `layer-<N>` of the guest but those in `keep`, and every partial layer:
/// layers a crash left unrecorded, or kept for a flip back that did not come.
fn remove_leftovers(p: &Place, keep: &[u64]) -> Result<()> {
    for n in sys::read_dir(p.fd.as_fd())? {
        let leftover = match n.strip_prefix(b"layer-") {
            Some(d) => layer_number(d).is_some_and(|n| !keep.contains(&n)),
            None => n.starts_with(b"partial-"),
        };
        if leftover {
            remove_layer(p, &n).with_context(|| format!("cannot remove `{}`", display(&n)))?;
        }
    }
    Ok(())
}

/// Removes the layer directory `name`. Where that is refused (`EPERM`: a directory of it
/// carries the append-only or immutable flag, which refuses every unlink in it and its own
/// removal), the flags of its directories are cleared and the removal tried again; flagged
/// files are unflagged by the removal itself.
fn remove_layer(p: &Place, name: &[u8]) -> Result<()> {
    let Err(e) = sys::remove_tree_at(p.fd.as_fd(), name) else {
        return Ok(());
    };
    if errno(&e) != Some(Errno::PERM) {
        return Err(e);
    }
    let top = sys::open_dir_beneath(p.fd.as_fd(), name)?;
    let mut cleared = 0usize;
    guestfs::clear_protecting(top.as_fd())?.inspect(|_| cleared += 1);
    scan::walk_all(
        top.as_fd(),
        &mut |e, _| {
            if e.is_dir() && &*e.path != b"." {
                let d = guestfs::open_dir_deep(top.as_fd(), &e.path)
                    .with_context(|| format!("cannot open `{}`", display(&e.path)))?;
                if guestfs::clear_protecting(d.as_fd())?.is_some() {
                    cleared += 1;
                }
            }
            Ok(true)
        },
        &mut |_| Ok(()),
    )?;
    log::info!(
        "`{}`: cleared the append-only or immutable flag of {cleared} director(ies)",
        display(name)
    );
    sys::remove_tree_at(p.fd.as_fd(), name)
}

/// The errno at the bottom of an error, if it is one.
fn errno(e: &anyhow::Error) -> Option<Errno> {
    e.chain().find_map(|c| c.downcast_ref::<Errno>().copied())
}

/// An empty layer `n` whose top has the owner and mode of the tree's top (the overlay's
/// top is its upper layer's).
fn new_layer(p: &Place, n: u64, tree: &Manifest) -> Result<()> {
    let name = Place::layer_name(n);
    sys::mkdirat(p.fd.as_fd(), name.as_bytes(), 0o755, false)?;
    if let Some(top) = tree.find(b".") {
        let fd = sys::open_dir_beneath(p.fd.as_fd(), name.as_bytes())?;
        let mut meta = top.meta.clone();
        meta.xattrs.clear();
        sys::apply_meta_fd(fd.as_fd(), &meta)?;
    }
    Ok(())
}

/// `path`'s parent directory and last name (`.` for a top-level name).
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b"."[..], path),
    }
}

/// The directory `parent` below `top` (`top` itself for `.`), whatever the path's length.
fn open_parent<'a>(
    top: BorrowedFd<'a>,
    parent: &[u8],
    held: &'a mut Option<OwnedFd>,
) -> Result<BorrowedFd<'a>> {
    if parent == b"." {
        return Ok(top);
    }
    let fd = guestfs::open_dir_deep(top, parent)
        .with_context(|| format!("cannot open directory `{}`", display(parent)))?;
    let fd: &'a OwnedFd = held.insert(fd);
    Ok(fd.as_fd())
}

/// Layer `to` (a directory name) as a copy of layer `from`: its directories made anew (owner,
/// mode, extended attributes: an opaque directory stays opaque), every other entry a
/// hardlink, or a copy where the link is refused: too many links (`EMLINK`: a file linked
/// 65000 times, or the one whiteout inode overlayfs shares between deletions) or a flagged
/// inode (`EPERM`: immutable or append-only). A copy carries no inode flags.
fn farm(p: &Place, from: u64, to: &str) -> Result<()> {
    let src_name = Place::layer_name(from);
    let src = sys::open_dir_beneath(p.fd.as_fd(), src_name.as_bytes())?;
    sys::mkdirat(p.fd.as_fd(), to.as_bytes(), 0o700, false)?;
    let dst = sys::open_dir_beneath(p.fd.as_fd(), to.as_bytes())?;
    let mut copied = 0u64;
    scan::walk_all(
        src.as_fd(),
        &mut |e, _| {
            let path: &[u8] = &e.path;
            if path == b"." {
                sys::set_meta_exact_fd(dst.as_fd(), &e.meta)?;
                return Ok(true);
            }
            let (parent, name) = split(path);
            let (mut hs, mut hd) = (None, None);
            let sp = open_parent(src.as_fd(), parent, &mut hs)?;
            let dp = open_parent(dst.as_fd(), parent, &mut hd)?;
            if e.is_dir() {
                sys::mkdirat(dp, name, 0o700, false)?;
                let fd = sys::open_dir_beneath(dp, name)?;
                sys::set_meta_exact_fd(fd.as_fd(), &e.meta)?;
                return Ok(true);
            }
            match sys::linkat(sp, name, dp, name) {
                Ok(()) => {}
                Err(Errno::MLINK | Errno::PERM) => {
                    copy_entry(sp, dp, name, &e).with_context(|| {
                        format!("cannot copy `{}` into the new layer", display(path))
                    })?;
                    copied += 1;
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("cannot link `{}` into the new layer", display(path))
                    });
                }
            }
            Ok(true)
        },
        // A socket in a layer is the guest's (it made one in its own file system): it has no
        // entry, and a hardlink keeps it as it is.
        &mut |path| {
            let (parent, name) = split(path);
            let (mut hs, mut hd) = (None, None);
            let sp = open_parent(src.as_fd(), parent, &mut hs)?;
            let dp = open_parent(dst.as_fd(), parent, &mut hd)?;
            match sys::linkat(sp, name, dp, name) {
                Ok(()) | Err(Errno::MLINK | Errno::PERM | Errno::NOENT) => Ok(()),
                Err(err) => Err(err)
                    .with_context(|| format!("cannot link `{}` into the new layer", display(path))),
            }
        },
    )?;
    if copied > 0 {
        log::info!("{copied} file(s) copied into the new layer `{to}` (their links were refused)");
    }
    Ok(())
}

/// Copies the non-directory entry `e` (as the walk saw it) from `name` in `sp` to `name` in
/// `dp`: a regular file's content, hole for hole, and its owner, mode and extended
/// attributes; a special file or symlink made anew.
fn copy_entry(sp: BorrowedFd, dp: BorrowedFd, name: &[u8], e: &Entry) -> Result<()> {
    let (ft, rdev) = match &e.kind {
        Kind::File { .. } => {
            let Some((src, st)) = guestfs::open_regular_at(sp, name)? else {
                bail!("it changed while it was being copied");
            };
            let flags = rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC;
            let dst = sys::openat(dp, name, flags, rustix::fs::Mode::from_raw_mode(0o600))
                .context("cannot create the copy")?;
            sparse::copy(src.as_fd(), dst.as_fd(), st.st_size as u64)?;
            let meta = sys::meta_of(&st, sys::fd_xattrs(src.as_fd())?);
            return sys::apply_meta_fd(dst.as_fd(), &meta);
        }
        Kind::Symlink { target } => {
            sys::symlinkat(target, dp, name)?;
            return sys::apply_meta_at(dp, name, &e.meta, true);
        }
        Kind::Char { major, minor } => (
            FileType::CharacterDevice,
            rustix::fs::makedev(*major, *minor),
        ),
        Kind::Block { major, minor } => {
            (FileType::BlockDevice, rustix::fs::makedev(*major, *minor))
        }
        Kind::Fifo => (FileType::Fifo, 0),
        Kind::Dir => bail!("a directory is made, not copied"),
    };
    sys::mknodat(dp, name, ft, e.meta.mode, rdev)?;
    sys::apply_meta_at(dp, name, &e.meta, false)
}

/// The layer open as `top`, as a manifest sorted by path (paths of any length). Regular
/// files are hashed (and their extended attributes read) only where the merge compares their
/// content: not below a `state` glob or an opaque directory, and only if the old or the new
/// tree has a file of that size there ([`merge::same`] cannot match otherwise). A guest's
/// 16 TiB sparse file or its database under `state` is never read. For a merge, what no
/// tree has is left out (see below): the manifest is bounded by the trees', not by what
/// the guest made.
fn layer_manifest(
    top: BorrowedFd,
    old: Option<&Manifest>,
    new: &Manifest,
    rules: Option<&merge::Rules>,
) -> Result<Manifest> {
    let mut entries: Vec<Entry> = Vec::new();
    // For a merge (`rules`), only paths a tree has can be set aside or conflict: what the
    // guest alone has is neither kept in memory nor walked below, whatever its size. One
    // such entry per directory stands for all of them, so that the directory does not look
    // emptied by the drops. Whiteouts are all listed: one that hides nothing is dropped, or
    // it would hide the path from a later release.
    let in_trees = |p: &[u8]| old.is_some_and(|m| m.find(p).is_some()) || new.find(p).is_some();
    let mut busy: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    scan::walk_all(
        top,
        &mut |e, _| {
            if rules.is_some() && &*e.path != b"." && !merge::is_whiteout(&e) && !in_trees(&e.path)
            {
                let (parent, _) = split(&e.path);
                if busy.insert(parent.to_vec()) {
                    entries.push(e);
                }
                return Ok(false);
            }
            entries.push(e);
            Ok(true)
        },
        &mut |_| Ok(()),
    )?;
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let wanted: Vec<usize> = {
        let opaque = merge::Opaque::of(&entries);
        let size_at = |m: Option<&Manifest>, p: &[u8]| match m.and_then(|m| m.find(p)) {
            Some(Entry {
                kind: Kind::File { size, .. },
                ..
            }) => Some(*size),
            _ => None,
        };
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                let Kind::File { size, .. } = e.kind else {
                    return false;
                };
                !opaque.covers(&e.path)
                    && !rules.is_some_and(|r| r.is_state(&e.path))
                    && (size_at(old, &e.path) == Some(size)
                        || size_at(Some(new), &e.path) == Some(size))
            })
            .map(|(i, _)| i)
            .collect()
    };
    for i in wanted {
        let e = &mut entries[i];
        let (parent, name) = split(&e.path);
        let mut held = None;
        let dir = open_parent(top, parent, &mut held)?;
        let Some((fd, st)) = guestfs::open_regular_at(dir, name)
            .with_context(|| format!("cannot open `{}`", display(&e.path)))?
        else {
            bail!("`{}` changed while it was being read", display(&e.path));
        };
        let (size, h) = hash::hash_fd_upto(fd.as_fd(), &st, (st.st_size as u64).saturating_add(1))
            .with_context(|| format!("cannot read `{}`", display(&e.path)))?;
        if size != st.st_size as u64 {
            bail!(
                "`{}` changed size while it was being read",
                display(&e.path)
            );
        }
        e.meta = sys::meta_of(&st, sys::fd_xattrs(fd.as_fd())?);
        e.kind = Kind::File { size, sha256: h };
    }
    Ok(Manifest {
        version: None,
        entries,
    })
}

/// Renames `name` in `dir` to the first free one of `<name>.treeswap-local`,
/// `<name>.treeswap-local.1`, … (never over anything: an earlier conflict's copy, a
/// directory the guest made). `false`, with a warning, if there is none (or the name would
/// be too long): the guest's copy then stays where it is.
fn set_aside(dir: BorrowedFd, name: &[u8], path: &[u8]) -> Result<bool> {
    for i in 0..1000u32 {
        let mut aside = name.to_vec();
        aside.extend_from_slice(merge::LOCAL_SUFFIX);
        if i > 0 {
            aside.extend_from_slice(format!(".{i}").as_bytes());
        }
        match sys::renameat_noreplace(dir, name, dir, &aside) {
            Ok(()) => return Ok(true),
            Err(Errno::EXIST) => continue,
            Err(Errno::NAMETOOLONG) => break,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot set `{}` aside", display(path)));
            }
        }
    }
    log::warn!(
        "`{}`: no free name to set the guest's copy aside under; it stays",
        display(path)
    );
    Ok(false)
}

/// Merges the layer directory `dir_name` (see [`merge`]) from `old` onto `new`: drops, sets
/// aside, logs and returns the conflicts (at most [`MAX_CONFLICTS`] paths, and how many more).
fn merge_layer(
    g: &Guest,
    p: &Place,
    dir_name: &str,
    old: Option<&Manifest>,
    new: &Manifest,
    target: &str,
) -> Result<(Vec<String>, u64)> {
    let top = sys::open_dir_beneath(p.fd.as_fd(), dir_name.as_bytes())?;
    let rules = merge::Rules::of(g)?;
    let layer = layer_manifest(top.as_fd(), old, new, Some(&rules))
        .with_context(|| format!("while reading the layer of guest `{}`", quote(&g.name)))?;
    let plan = merge::plan(&layer, old, new, &rules);
    let midway = plan.actions.len() / 2;
    if plan.actions.is_empty() {
        failpoint::hit("guest-merge-midway");
    }
    for (i, (path, action)) in plan.actions.iter().enumerate() {
        if i == midway {
            failpoint::hit("guest-merge-midway");
        }
        let (parent, name) = split(path);
        let mut held = None;
        let dir = open_parent(top.as_fd(), parent, &mut held)?;
        match action {
            merge::Action::Drop => {
                let is_dir = layer.find(path).is_some_and(|e| e.is_dir());
                match sys::unlinkat_ok(dir, name, is_dir) {
                    Ok(()) => {}
                    // A directory that still holds what no manifest shows (a socket): kept.
                    Err(e) if is_dir && errno(&e) == Some(Errno::NOTEMPTY) => {}
                    Err(e) => return Err(e),
                }
            }
            merge::Action::SetAside => {
                set_aside(dir, name, path)?;
            }
        }
    }
    let gname = quote(&g.name);
    for (path, policy) in &plan.conflicts {
        let what = match policy {
            Policy::Keep => "kept the guest's copy",
            Policy::Take => "took the release's; the guest's is `<name>.treeswap-local`",
        };
        log::warn!(
            "guest `{gname}`: `{}` changed both in the guest and in `{target}`: {what}",
            display(path)
        );
    }
    log::info!(
        "guest `{gname}`: merged for `{target}`: {} dropped or set aside, {} kept, {} conflict(s)",
        plan.actions.len(),
        plan.kept,
        plan.conflicts.len()
    );
    let shown: Vec<String> = plan
        .conflicts
        .iter()
        .take(MAX_CONFLICTS)
        .map(|(p, _)| display(p))
        .collect();
    let more = plan.conflicts.len().saturating_sub(MAX_CONFLICTS) as u64;
    Ok((shown, more))
}

/// Once every guest of a flip has started: the layers kept for a flip back go. Best effort
/// once the records are saved: what is left on disk then is a leftover, which a warning
/// names and the next move of the guest removes again.
pub(crate) fn settle(root: &Root, cfg: &Config, st: &mut State) -> Result<()> {
    let mut changed = false;
    for g in cfg.guests.iter().filter(|g| g.is_overlay()) {
        let Some(rec) = st.guest(&g.name).cloned() else {
            continue;
        };
        if rec.undo.is_some() {
            st.guest_mut(&g.name).undo = None;
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    state::save(root.fd(), st)?;
    for g in cfg.guests.iter().filter(|g| g.is_overlay()) {
        if let Some(rec) = st.guest(&g.name) {
            let done = place(root, g).and_then(|p| remove_leftovers(&p, &[rec.layer]));
            if let Err(e) = done {
                log::warn!(
                    "guest `{}`: its old layers stay for now: {e:#}",
                    quote(&g.name)
                );
            }
        }
    }
    Ok(())
}

/// At boot, after the recorded restarts: every overlay guest with nothing mounted gets its
/// overlay on `current` (merged first if it was for another tree). A guest that runs on
/// another tree (a flip with `--no-restart`) is left alone. Each guest on its own: one that
/// fails does not stop the others from being mounted; the error names the first, warnings the rest.
pub(crate) fn mount_all(root: &Root, cfg: &Config, st: &mut State) -> Result<()> {
    let Some(current) = root.link("current")? else {
        return Ok(());
    };
    let mut failed: Vec<anyhow::Error> = Vec::new();
    for g in cfg.guests.iter().filter(|g| g.is_overlay()) {
        let done = (|| -> Result<()> {
            // Also under a guest already mounted: overlayfs reads the flag at copy-up.
            unflag_pool(root, st)?;
            let p = place(root, g)?;
            if mount::mounted_at(&p.rootfs)?.is_some() {
                return Ok(());
            }
            // Nothing mounted here, but a container may still run on an old overlay.
            ensure_stopped(g, &p)?;
            prepare(root, g, &p, &current, st)?;
            mount_layer(root, &p, st.guest(&g.name).expect("prepared"), &current)
        })();
        if let Err(e) = done {
            failed.push(e.context(format!(
                "guest `{}`: cannot mount its overlay on `{current}`",
                quote(&g.name)
            )));
        }
    }
    // The first is the command's error line; the others are warned about.
    let n = failed.len();
    let mut failed = failed.into_iter();
    let first = failed.next();
    for e in failed {
        log::warn!("{e:#}");
    }
    match first {
        None => Ok(()),
        Some(first) if n == 1 => Err(first),
        Some(first) => Err(first.context(format!("{n} overlay guests were not mounted"))),
    }
}

// ---------------------------------------------------------------------------------------------
// `treeswap guest list|status|diff|reset` and `status`

/// A guest as `guest list`, `guest status` and `status` show it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Info {
    pub name: String,
    /// `overlay` or `tree`.
    pub root: &'static str,
    /// Overlay: the layer it runs on (`guests/<name>/layer-<N>`).
    pub layer: Option<u64>,
    /// Overlay: the tree its layer was last merged for.
    pub base: Option<String>,
    /// Overlay: the tree its overlay is mounted on now (`?`: something else is mounted
    /// there), or none.
    pub mounted_on: Option<String>,
    /// Overlay: the conflicts of the last merge (paths) and how many more there were.
    pub conflicts: Vec<String>,
    pub conflicts_more: u64,
}

/// The trees guests run on or may be put back on, which `gc` keeps: each overlay guest's
/// `base` and `undo` base, and each tree-mode guest's tree. Records of guests no longer
/// configured (or configured in the other mode) count only while their overlay is still
/// mounted: they would otherwise keep trees for good.
pub(crate) fn trees_in_use(root: &Root, cfg: &Config, st: &State) -> Result<Vec<String>> {
    let configured = |name: &str, overlay: bool| {
        cfg.guests
            .iter()
            .any(|g| g.name == name && g.is_overlay() == overlay)
    };
    let mut out = Vec::new();
    for rec in &st.guests {
        let in_use = configured(&rec.name, true) || {
            let rootfs = root_abs(root)?.join(GUESTS).join(&rec.name).join("rootfs");
            rootfs.is_dir() && mount::mounted_at(&rootfs)?.is_some()
        };
        if in_use {
            out.extend(rec.base.iter().cloned());
            out.extend(rec.undo.iter().flat_map(|u| u.base.clone()));
        }
    }
    out.extend(
        st.tree_guests
            .iter()
            .filter(|(n, _)| configured(n, false))
            .map(|(_, v)| v.clone()),
    );
    Ok(out)
}

/// Where guest `g`'s files are, without making anything (for readers).
fn paths(root: &Root, g: &Guest) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = root_abs(root)?.join(GUESTS).join(&g.name);
    Ok((dir.join("rootfs"), dir.join("work"), dir))
}

/// Every configured guest; reads only (no lock needed).
pub(crate) fn infos(root: &Root, cfg: &Config, st: &State) -> Result<Vec<Info>> {
    cfg.guests.iter().map(|g| info(root, g, st)).collect()
}

fn info(root: &Root, g: &Guest, st: &State) -> Result<Info> {
    let rec = st.guest(&g.name).filter(|_| g.is_overlay());
    let mounted_on = match rec {
        Some(rec) => {
            let (rootfs, work, dir) = paths(root, g)?;
            match mount::mounted_at(&rootfs)? {
                None => None,
                Some(m) => {
                    let ours = m.fs_type == "overlay"
                        && m.option("upperdir") == dir.join(Place::layer_name(rec.layer)).to_str()
                        && m.option("workdir") == work.to_str();
                    let trees = tree_path(root, "")?;
                    let lower = m.option("lowerdir").unwrap_or_default();
                    let v = std::path::Path::new(lower)
                        .strip_prefix(&trees)
                        .ok()
                        .and_then(|v| v.to_str())
                        .filter(|_| ours);
                    Some(v.unwrap_or("?").to_owned())
                }
            }
        }
        None => None,
    };
    Ok(Info {
        name: g.name.clone(),
        root: if g.is_overlay() { "overlay" } else { "tree" },
        layer: rec.map(|r| r.layer),
        base: rec.and_then(|r| r.base.clone()),
        mounted_on,
        conflicts: rec.map(|r| r.conflicts.clone()).unwrap_or_default(),
        conflicts_more: rec.map_or(0, |r| r.conflicts_more),
    })
}

impl Info {
    /// One line for `guest list` and `status`.
    pub(crate) fn line(&self) -> String {
        let name = quote(&self.name);
        if self.root == "tree" {
            return format!("{name}: runs on the tree");
        }
        let mounted = match &self.mounted_on {
            Some(v) => format!("mounted on `{v}`"),
            None => "not mounted".into(),
        };
        let n = self.conflicts.len() as u64 + self.conflicts_more;
        let conflicts = match n {
            0 => String::new(),
            n => format!(", {n} conflict(s) in its last merge"),
        };
        match self.layer {
            Some(l) => format!("{name}: overlay, layer {l}, {mounted}{conflicts}"),
            None => format!("{name}: overlay, no layer yet, {mounted}"),
        }
    }
}

fn find<'a>(cfg: &'a Config, name: &str) -> Result<&'a Guest> {
    cfg.guests
        .iter()
        .find(|g| g.name == name)
        .ok_or_else(|| anyhow::anyhow!("no guest is named `{}` in the config", quote(name)))
}

/// `guest status NAME`: its line, then each conflict of its last merge.
pub(crate) fn status_text(root: &Root, cfg: &Config, name: &str) -> Result<String> {
    let st = state::load(root.fd())?;
    let i = info(root, find(cfg, name)?, &st)?;
    let mut out = format!("{}\n", i.line());
    if let Some(b) = &i.base {
        out.push_str(&format!("merged for: `{b}`\n"));
    }
    for c in &i.conflicts {
        out.push_str(&format!("conflict: {c}\n"));
    }
    if i.conflicts_more > 0 {
        out.push_str(&format!("conflicts: {} more\n", i.conflicts_more));
    }
    Ok(out)
}

/// `guest diff NAME`: what the guest's layer changes against the tree it was merged for, one
/// line per path: `A` added, `M` changed, `D` deleted, `R` a directory replaced whole.
pub(crate) fn diff(root: &Root, cfg: &Config, name: &str) -> Result<Vec<String>> {
    let g = find(cfg, name)?;
    if !g.is_overlay() {
        bail!("guest `{}` runs on the tree: it has no layer", quote(name));
    }
    let st = state::load(root.fd())?;
    let Some(rec) = st.guest(name) else {
        return Ok(Vec::new());
    };
    let (_, _, dir) = paths(root, g)?;
    let base = match &rec.base {
        Some(b) if root.is_installed(b)? => root.load_manifest(b)?,
        _ => Manifest::default(),
    };
    let layer_dir = dir.join(Place::layer_name(rec.layer));
    let top = sys::open_dir(&layer_dir)?;
    let layer = layer_manifest(top.as_fd(), None, &base, None)
        .with_context(|| format!("while reading `{}`", layer_dir.display()))?;
    let mut out = Vec::new();
    for e in layer.entries.iter().filter(|e| &*e.path != b".") {
        let b = base.find(&e.path);
        let tag = if merge::is_whiteout(e) {
            "D"
        } else if merge::is_opaque(e) && b.is_some() {
            "R"
        } else if b.is_some_and(|b| merge::same(e, b)) {
            continue;
        } else if b.is_some() {
            "M"
        } else {
            "A"
        };
        out.push(format!("{tag} /{}", display(&e.path)));
    }
    Ok(out)
}

/// `guest reset NAME`: drops the guest's local changes. `stop`, unmount, a new empty layer,
/// mount on `current`, `start`; the old layer goes once the new one is recorded.
pub(crate) fn reset(root: &Root, cfg: &Config, name: &str) -> Result<()> {
    let g = find(cfg, name)?;
    if !g.is_overlay() {
        bail!("guest `{}` runs on the tree: it has no layer", quote(name));
    }
    let Some(current) = root.link("current")? else {
        bail!("there is no current tree to reset the guest onto");
    };
    let (Some(stop), Some(start)) = (&g.stop, &g.start) else {
        bail!("guest `{}` has no `stop` and `start`", quote(name));
    };
    let mut st = state::load(root.fd())?;
    let p = place(root, g)?;
    let env = HookEnv {
        version: current.clone(),
        previous: st.guest(name).and_then(|r| r.base.clone()),
        rootfs: p.rootfs.clone(),
        state_root: root_abs(root)?,
    };
    unflag_pool(root, &mut st)?;
    stop_and_unmount(g, &p, stop, &env)?;
    let rec = st.guest_mut(name).clone();
    let keep: Vec<u64> = std::iter::once(rec.layer)
        .chain(rec.undo.as_ref().map(|u| u.layer))
        .collect();
    remove_leftovers(&p, &keep)?;
    let Some(next) = keep.iter().max().copied().unwrap_or(0).checked_add(1) else {
        bail!("guest `{}`: its layer number cannot grow", quote(name));
    };
    new_layer(&p, next, &root.load_manifest(&current)?)?;
    *st.guest_mut(name) = GuestRecord {
        name: name.to_owned(),
        layer: next,
        base: Some(current.clone()),
        ..Default::default()
    };
    state::save(root.fd(), &st)?;
    remove_leftovers(&p, &[next])?;
    mount_layer(root, &p, st.guest(name).expect("recorded"), &current)?;
    hook(g, "start", start, &env)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What only the guest has (a directory of its own, files beside the release's) is not
    /// held for a merge, whatever its size: one entry per directory stands for it. `guest
    /// diff` (no rules) still sees everything.
    #[test]
    fn a_merge_holds_only_what_a_tree_has() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        let layer = d.path().join("layer");
        for top in [&tree, &layer] {
            std::fs::create_dir_all(top.join("etc")).unwrap();
            std::fs::create_dir_all(top.join("var/lib")).unwrap();
            std::fs::write(top.join("etc/conf"), "release\n").unwrap();
        }
        let new = scan::scan(&tree, None).unwrap();
        std::fs::write(layer.join("etc/conf"), "mine\n").unwrap();
        for i in 0..50 {
            let own = layer.join(format!("var/lib/cache/d{i}"));
            std::fs::create_dir_all(&own).unwrap();
            std::fs::write(own.join("f"), "x").unwrap();
            std::fs::write(layer.join(format!("etc/own-{i}")), "x").unwrap();
        }
        let cfg = crate::core::config::parse(
            "[[guest]]\nname = \"g\"\nstart = [\"x\"]\nstop = [\"x\"]\n",
            "t",
        )
        .unwrap();
        let rules = merge::Rules::of(&cfg.guests[0]).unwrap();
        let top = sys::open_dir(&layer).unwrap();
        let m = layer_manifest(top.as_fd(), None, &new, Some(&rules)).unwrap();
        let paths: Vec<String> = m.entries.iter().map(|e| display(&e.path)).collect();
        // The tree's five entries, and one of the guest's own per directory (etc, var/lib).
        assert_eq!(paths.len(), 7, "{paths:?}");
        for p in [".", "etc", "etc/conf", "var", "var/lib"] {
            assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
        }
        // Nothing is dropped: the guest's own names keep its directories.
        let plan = merge::plan(&m, None, &new, &rules);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        let all = layer_manifest(top.as_fd(), None, &new, None).unwrap();
        assert_eq!(all.entries.len(), 5 + 50 * 3 + 1);
    }
}
