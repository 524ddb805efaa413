//! The state root (`--root`, default `/versions`): its layout, its lock, and the `current`
//! and `previous` symlinks.
//!
//! ```text
//! pool/abcdef…        objects (see store/pool.rs; roots made before have pool/ab/abcdef…)
//! tmp/                temporary files of objects being written
//! staging/<V>/        a tree being built; renamed to trees/<V> once complete
//! trees/<V>/          installed trees, farms of hardlinks into pool/
//! manifests/<V>.toml  the manifest of each installed tree (`.<V>.toml.tmp` while written)
//! layouts/<V>.toml    its per-tree layout (see store/layout.rs)
//! snapshots/<V>/      on btrfs: read-only snapshots of installed trees (snapshots_enabled)
//! current, previous   relative symlinks to trees/<V>
//! lock                flock(2) target: one writer at a time
//! format              the root format, `2` (none: format 1, see [`Root::migrate`])
//! trash/<n>           leftovers that could not be removed, set aside; every writer retries
//! ```
//!
//! A version is installed when `trees/<V>` exists: that rename is the commit point of an
//! import or a staging, and it happens after the manifest is written and the file system is
//! synced.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::core::error::Fail;
use crate::core::manifest::{self, Manifest};
use crate::fs::{btrfs, sys};
use crate::store::layout::Layout;
use crate::store::pool::Pool;
use crate::store::protect::Protection;

pub(crate) const DEFAULT_ROOT: &str = "/versions";

/// The root format this treeswap writes (FORMAT.md, "Root format"), recorded in `format`. A
/// root without that file is format 1, which kept each layout as `manifests/<V>.layout.toml`:
/// also the manifest's name of the version `<V>.layout`.
pub(crate) const ROOT_FORMAT: u32 = 2;

/// A layout is a few lines; a larger file by a layout's name is not one.
const LAYOUT_MAX: u64 = 1 << 20;

pub struct Root {
    pub path: PathBuf,
    pub fd: OwnedFd,
    lock: Option<OwnedFd>,
    /// The root format, read when the root is opened and again once it is locked.
    format: u32,
    /// What `trash/` still held after the lock's cleanup tried to remove it (one line each).
    stuck: Vec<String>,
}

/// How a command holds the lock.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Readers (status, list, verify, diff of installed versions) take no lock and never wait:
    /// they read what writers replace atomically (links, the state file, published
    /// manifests), and [`Root::activity`] says what a writer is doing meanwhile.
    Shared,
    /// Writers hold it alone.
    Exclusive,
}

/// The outcome of the last `apply` that got the lock (`last-apply.toml`; `status` shows it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LastApply {
    /// When it ended, in seconds since the epoch.
    pub time: u64,
    /// `applied`, `staged`, `switched`, `nothing` or `failed`.
    pub result: String,
    /// The exit code.
    pub code: i32,
    /// The version it made current or staged, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The error, briefly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The seconds since the epoch now.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The file that records the last apply's outcome.
const LAST_APPLY: &str = "last-apply.toml";

/// What the writer holding the lock is doing (`status` shows it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Activity {
    pub pid: u32,
    /// The command: `apply`, `switch`, `gc`, ...
    pub op: String,
    /// Since when, in seconds since the epoch.
    pub since: u64,
}

impl Root {
    /// Makes the layout under `path` (idempotent) and opens it.
    pub fn create(path: &Path) -> Result<Root> {
        fs_err::create_dir_all(path)
            .with_context(|| format!("cannot create the state root `{}`", path.display()))?;
        let fd = sys::open_dir(path)?;
        // The common case: a complete root (the last thing made below is `manifests/`).
        if sys::lstatat(fd.as_fd(), b"manifests")?.is_some() {
            return Ok(Root {
                format: read_format(fd.as_fd(), path)?,
                path: path.to_owned(),
                fd,
                lock: None,
                stuck: Vec::new(),
            });
        }
        for d in ["pool", "tmp", "staging", "trees"] {
            sys::mkdirat(fd.as_fd(), d.as_bytes(), 0o755, true)
                .with_context(|| format!("in the state root `{}`", path.display()))?;
        }
        // A root that an older treeswap began making: finish its shards (store/pool.rs, `Shape`).
        let pool = sys::open_dir_beneath(fd.as_fd(), b"pool")?;
        if sys::lstatat(pool.as_fd(), b"00")?.is_some() {
            for i in 0..=255u8 {
                sys::mkdirat(pool.as_fd(), format!("{i:02x}").as_bytes(), 0o755, true)
                    .with_context(|| format!("in `{}/pool`", path.display()))?;
            }
        }
        // No manifest or layout exists yet, so the root is of the current format from the start.
        sys::mkdirat(fd.as_fd(), b"layouts", 0o755, true)
            .with_context(|| format!("in the state root `{}`", path.display()))?;
        write_format(fd.as_fd(), ROOT_FORMAT)
            .with_context(|| format!("in the state root `{}`", path.display()))?;
        sys::mkdirat(fd.as_fd(), b"manifests", 0o755, true)
            .with_context(|| format!("in the state root `{}`", path.display()))?;
        Ok(Root {
            path: path.to_owned(),
            fd,
            lock: None,
            format: ROOT_FORMAT,
            stuck: Vec::new(),
        })
    }

    /// Opens an existing root.
    pub fn open(path: &Path) -> Result<Root> {
        let fd = sys::open_dir(path).with_context(|| {
            format!(
                "no treeswap state root at `{}` (make one with `treeswap --root {} init`)",
                path.display(),
                path.display()
            )
        })?;
        if sys::lstatat(fd.as_fd(), b"pool")?.is_none() {
            bail!(
                "`{}` is not a treeswap state root: it has no pool/ (make one with `treeswap --root {} init`)",
                path.display(),
                path.display()
            );
        }
        Ok(Root {
            format: read_format(fd.as_fd(), path)?,
            path: path.to_owned(),
            fd,
            lock: None,
            stuck: Vec::new(),
        })
    }

    /// Takes the root's lock; a held lock is a "busy" error unless `wait`. Writers also bring
    /// a root of an older format to [`ROOT_FORMAT`] ([`Root::migrate`]), clear what an
    /// interrupted writer left in `tmp/` and `staging/` (nothing else can be using it) and
    /// retry `trash/`; what cannot be removed never fails the command (see
    /// [`Root::remove_or_set_aside`]).
    pub fn lock(&mut self, how: Lock, wait: bool, op: &str) -> Result<()> {
        if how == Lock::Shared {
            return Ok(());
        }
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fd = sys::openat(self.fd.as_fd(), b"lock", flags, Mode::from_raw_mode(0o644))
            .with_context(|| format!("cannot open `{}/lock`", self.path.display()))?;
        let op_flag = match wait {
            true => FlockOperation::LockExclusive,
            false => FlockOperation::NonBlockingLockExclusive,
        };
        match sys::flock(fd.as_fd(), op_flag) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let doing = match self.activity() {
                    Ok(Some(a)) => format!(" (`{}`, pid {})", a.op, a.pid),
                    _ => String::new(),
                };
                return Err(Fail::Busy(format!(
                    "busy: another treeswap is working on `{}`{doing} (use --wait to wait for it)",
                    self.path.display()
                ))
                .into());
            }
            Err(e) => return Err(e).context("cannot lock the state root"),
        }
        // For readers: who holds the lock and for what (not synced: it only informs).
        let activity = Activity {
            pid: std::process::id(),
            op: op.to_owned(),
            since: now(),
        };
        let text = toml::to_string(&activity).expect("serializable");
        sys::replace_contents(fd.as_fd(), text.as_bytes()).context("cannot write `lock`")?;
        self.lock = Some(fd);
        // A writer may have migrated the root while this one waited for the lock.
        self.format = read_format(self.fd.as_fd(), &self.path)?;
        self.migrate()?;
        self.clear_leftovers()?;
        Ok(())
    }

    /// What the writer holding the lock is doing, if one holds it: found in `/proc/locks`
    /// (no lock is taken), described by what it wrote into `lock`.
    pub fn activity(&self) -> Result<Option<Activity>> {
        let fd = match sys::openat(
            self.fd.as_fd(),
            b"lock",
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e).context("cannot open `lock`"),
        };
        let Some(pid) = sys::flock_writer(fd.as_fd())? else {
            return Ok(None);
        };
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(std::fs::File::from(fd), 4096),
            &mut text,
        )
        .context("cannot read `lock`")?;
        // The text is the holder's unless it has not written it yet (or it is another pid).
        Ok(Some(match toml::from_str::<Activity>(&text) {
            Ok(a) if a.pid == pid => a,
            _ => Activity {
                pid,
                op: "unknown".into(),
                since: 0,
            },
        }))
    }

    /// Brings a format-1 root to format 2, under the exclusive lock. Format 1 kept each layout
    /// as `manifests/<V>.layout.toml`, the name of the manifest of the version `<V>.layout`
    /// too; format 2 keeps it as `layouts/<V>.toml`. Steps: make `layouts/`; move each such
    /// file that is a layout with one rename (one that is not a layout is the manifest of
    /// `<V>.layout` and stays); `syncfs`, so the moves are durable before the next step says
    /// they are done; write `format` (a temporary file, fsync, rename, fsync of the root). A
    /// run cut short leaves a format-1 root with each layout in one place or the other, which
    /// readers find ([`Root::load_layout`]) and the next writer finishes migrating.
    fn migrate(&mut self) -> Result<()> {
        if self.format >= ROOT_FORMAT {
            return Ok(());
        }
        let at = || format!("cannot migrate the state root `{}`", self.path.display());
        sys::mkdirat(self.fd.as_fd(), b"layouts", 0o755, true).with_context(at)?;
        let manifests = self.subdir("manifests")?;
        let layouts = self.subdir("layouts")?;
        let mut moved = 0;
        for name in self.read_dir(manifests.as_fd(), "manifests")? {
            let Some(version) = std::str::from_utf8(&name)
                .ok()
                .and_then(|s| s.strip_suffix(".layout.toml"))
                .filter(|v| crate::core::version::validate(v).is_ok())
            else {
                continue;
            };
            if self.format1_layout(version)?.is_none() {
                continue;
            }
            sys::renameat(
                manifests.as_fd(),
                &name,
                layouts.as_fd(),
                format!("{version}.toml").as_bytes(),
            )
            .with_context(|| {
                format!("cannot move `manifests/{version}.layout.toml` to `layouts/{version}.toml`")
            })?;
            moved += 1;
        }
        self.syncfs().with_context(at)?;
        write_format(self.fd.as_fd(), ROOT_FORMAT).with_context(at)?;
        log::info!(
            "migrated the state root `{}` to root format {ROOT_FORMAT} ({moved} layout(s) moved to layouts/)",
            self.path.display()
        );
        self.format = ROOT_FORMAT;
        Ok(())
    }

    /// In a format-1 root, the text of `manifests/<V>.layout.toml` if that file is a layout;
    /// it may instead be the manifest of the version `<V>.layout` (a manifest has keys no
    /// layout has, so it never parses as one).
    fn format1_layout(&self, version: &str) -> Result<Option<String>> {
        use std::io::Read;
        let p = self
            .path
            .join("manifests")
            .join(format!("{version}.layout.toml"));
        let f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open `{}`", p.display())),
        };
        let mut bytes = Vec::new();
        f.take(LAYOUT_MAX + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read `{}`", p.display()))?;
        let text = match String::from_utf8(bytes) {
            Ok(t) if t.len() as u64 <= LAYOUT_MAX => t,
            _ => return Ok(None),
        };
        Ok(Layout::parse(&text).is_ok().then_some(text))
    }

    /// `snapshots/`, the read-only snapshots of installed trees on btrfs (see `snapshots_enabled`),
    /// made if missing.
    pub fn snapshots_dir(&self) -> Result<OwnedFd> {
        sys::mkdirat(self.fd.as_fd(), b"snapshots", 0o700, true)?;
        sys::open_dir_beneath(self.fd.as_fd(), b"snapshots")
    }

    /// `snapshots/`, if there is one.
    pub fn snapshots_dir_opt(&self) -> Result<Option<OwnedFd>> {
        self.subdir_opt("snapshots")
    }

    /// The root's directory `name`, open, if there is one.
    fn subdir_opt(&self, name: &str) -> Result<Option<OwnedFd>> {
        match sys::openat2_dir(self.fd.as_fd(), name.as_bytes()) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("cannot open `{}/{name}`", self.path.display()))
            }
        }
    }

    /// The names in the root's directory `name`, open as `fd`.
    fn read_dir(&self, fd: BorrowedFd, name: &str) -> Result<Vec<Vec<u8>>> {
        sys::read_dir(fd).with_context(|| format!("in `{}/{name}`", self.path.display()))
    }

    /// Whether trees of this root are subvolumes with read-only snapshots: on btrfs, in
    /// reflink mode, unless `TREESWAP_SNAPSHOTS=0`.
    pub fn snapshots_enabled(&self, pool: &Pool) -> bool {
        pool.mode() == Protection::Reflink
            && std::env::var("TREESWAP_SNAPSHOTS").map_or(true, |v| v != "0")
            && btrfs::is_btrfs(self.fd())
    }

    /// Takes the read-only snapshot `snapshots/<version>` of the verified tree open as `tree`.
    pub fn keep_pristine(&self, tree: BorrowedFd, version: &str) -> Result<()> {
        let dir = self.snapshots_dir()?;
        sys::remove_tree_at(dir.as_fd(), version.as_bytes())?;
        btrfs::snapshot(tree, dir.as_fd(), version.as_bytes(), true)
    }

    /// The read-only snapshot `snapshots/<version>`, open, if the version has one.
    pub fn open_snapshot(&self, version: &str) -> Result<Option<OwnedFd>> {
        let dir = self.snapshots_dir()?;
        Ok(sys::open_dir_beneath(dir.as_fd(), version.as_bytes())
            .ok()
            .filter(|fd| btrfs::is_subvolume(fd.as_fd())))
    }

    /// Starts `staging/<new>` as a writable snapshot of `snapshots/<base>`, if the base has
    /// one. Returns whether it did.
    pub fn stage_from_snapshot(&self, staging: BorrowedFd, base: &str, new: &str) -> Result<bool> {
        let Some(src) = self.open_snapshot(base)? else {
            return Ok(false);
        };
        btrfs::snapshot(src.as_fd(), staging, new.as_bytes(), false)?;
        Ok(true)
    }

    /// Removes `snapshots/<V>` for every version that is not installed (left by a crash
    /// between taking the snapshot and the commit, or by gc).
    fn clear_orphan_snapshots(&self) -> Result<()> {
        let Some(dir) = self.snapshots_dir_opt()? else {
            return Ok(());
        };
        for name in self.read_dir(dir.as_fd(), "snapshots")? {
            let v = String::from_utf8_lossy(&name).into_owned();
            if !self.is_installed(&v)? {
                log::info!("removing `snapshots/{v}`, which belongs to no installed tree");
                self.remove_or_set_aside(dir.as_fd(), "snapshots", &name);
            }
        }
        Ok(())
    }

    fn clear_leftovers(&mut self) -> Result<()> {
        // What earlier runs set aside: tried again quietly (gc and boot say what is left).
        self.stuck.clear();
        if let Some(trash) = self.trash_dir_opt()? {
            for name in self.read_dir(trash.as_fd(), "trash")? {
                if let Err(e) = sys::remove_tree_at(trash.as_fd(), &name) {
                    let line = format!("`trash/{}`: {e:#}", crate::core::path::display(&name));
                    log::debug!("cannot remove {line} yet");
                    self.stuck.push(line);
                }
            }
        }
        // Manifests and layouts whose tree never got installed (a crash before the commit
        // rename) or was removed (a crash in gc after the uninstall rename). Both are
        // `<V>.toml`, in their own directories; no version starts with `.`.
        let trees = sys::open_dir_beneath(self.fd.as_fd(), b"trees")?;
        for dir in ["manifests", "layouts"] {
            let dfd = sys::open_dir_beneath(self.fd.as_fd(), dir.as_bytes())?;
            for name in self.read_dir(dfd.as_fd(), dir)? {
                let s = String::from_utf8_lossy(&name);
                let version = s.strip_suffix(".toml").filter(|v| !v.starts_with('.'));
                let orphan = match version {
                    Some(v) => sys::lstatat(trees.as_fd(), v.as_bytes())?.is_none(),
                    // A temporary file of an interrupted write.
                    None => true,
                };
                if orphan {
                    log::info!("removing `{dir}/{s}`, which belongs to no installed tree");
                    if let Err(e) = sys::unlinkat_ok(dfd.as_fd(), &name, false) {
                        log::warn!("{e:#} (in `{dir}/`); leaving it");
                    }
                }
            }
        }
        self.clear_orphan_snapshots()?;
        for d in ["tmp", "staging"] {
            let dfd = sys::open_dir_beneath(self.fd.as_fd(), d.as_bytes())?;
            for name in self.read_dir(dfd.as_fd(), d)? {
                log::info!(
                    "removing `{d}/{}` left by an interrupted run",
                    crate::core::path::display(&name)
                );
                self.remove_or_set_aside(dfd.as_fd(), d, &name);
            }
        }
        Ok(())
    }

    /// `trash/`, if there is one.
    fn trash_dir_opt(&self) -> Result<Option<OwnedFd>> {
        self.subdir_opt("trash")
    }

    /// Removes `name` in `dir`, the root's directory `dir_name` (`staging`, `tmp`,
    /// `snapshots`), with everything in it; if that fails, warns and sets it aside as
    /// `trash/<n>` (a rename, `RENAME_NOREPLACE`, to the first free number from the count of
    /// what is there), where every later writer tries again. Never fails: a leftover must not
    /// stop the command. If even the rename fails (a mount point), it stays, with the warning.
    pub fn remove_or_set_aside(&self, dir: BorrowedFd, dir_name: &str, name: &[u8]) {
        let Err(e) = sys::remove_tree_at(dir, name) else {
            return;
        };
        let shown = format!("{dir_name}/{}", crate::core::path::display(name));
        match self.set_aside(dir, name) {
            Ok(n) => log::warn!(
                "cannot remove `{shown}` ({e:#}); set it aside as `trash/{n}`, which later runs try to remove"
            ),
            Err(e2) => {
                log::warn!("cannot remove `{shown}` ({e:#}), nor set it aside ({e2:#}); leaving it")
            }
        }
    }

    /// Renames `name` in `dir` to `trash/<n>`, the first free `n`; returns `n`.
    fn set_aside(&self, dir: BorrowedFd, name: &[u8]) -> Result<u64> {
        sys::mkdirat(self.fd.as_fd(), b"trash", 0o700, true)?;
        let trash = sys::open_dir_beneath(self.fd.as_fd(), b"trash")?;
        let mut n = self.read_dir(trash.as_fd(), "trash")?.len() as u64 + 1;
        loop {
            match sys::renameat_noreplace(dir, name, trash.as_fd(), n.to_string().as_bytes()) {
                Ok(()) => break,
                Err(Errno::EXIST) => n += 1,
                Err(e) => return Err(e).context("cannot rename it into `trash/`"),
            }
        }
        sys::fsync(trash.as_fd())?;
        Ok(n)
    }

    /// Warns, in one line, if `trash/` still holds leftovers the lock's cleanup could not
    /// remove (gc and boot say it; other commands stay quiet).
    pub fn warn_stuck(&self) {
        if let Some(first) = self.stuck.first() {
            log::warn!(
                "`trash/` holds {} leftover(s) that cannot be removed yet, each writer tries again; {first}",
                self.stuck.len()
            );
        }
    }

    /// An anonymous read-write file in `tmp/` for bytes that are spooled and never published;
    /// it is gone when closed.
    pub fn spool(&self) -> Result<std::fs::File> {
        crate::fs::file::spool_in(&self.path.join("tmp"))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The pool, for reading.
    pub fn pool(&self) -> Result<Pool> {
        Pool::open(self.fd.as_fd())
    }

    /// The pool, for writing in the protection mode the config asks for.
    pub fn pool_for(&self, cfg: &crate::core::config::Config) -> Result<Pool> {
        let pool = Pool::open(self.fd.as_fd())?;
        let mode = crate::store::protect::resolve(cfg.protect, pool.tmp_fd())?;
        Ok(pool.with_mode(mode))
    }

    /// `layouts/<V>.toml`, the layout of `version` (written only under the exclusive lock, so
    /// in a root of format 2).
    pub fn layout_path(&self, version: &str) -> PathBuf {
        self.path.join("layouts").join(format!("{version}.toml"))
    }

    /// Which files of a tree are copies (see store/layout.rs); links only if no layout was
    /// recorded. A reader of a format-1 root (not yet migrated, see [`Root::migrate`]) looks
    /// in `layouts/`, where a cut-short migration may have moved it, then beside the manifest.
    pub fn load_layout(&self, version: &str) -> Result<Layout> {
        let p = self.layout_path(version);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.format >= 2 {
                    return Ok(Default::default());
                }
                match self.format1_layout(version)? {
                    Some(t) => t,
                    None => return Ok(Default::default()),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read `{}`", p.display())),
        };
        Layout::parse(&text).with_context(|| format!("in `{}`", p.display()))
    }

    pub fn subdir(&self, name: &str) -> Result<OwnedFd> {
        sys::open_dir_beneath(self.fd.as_fd(), name.as_bytes())
            .with_context(|| format!("in the state root `{}`", self.path.display()))
    }

    /// The version a `current` or `previous` symlink names, if it exists.
    pub fn link(&self, name: &str) -> Result<Option<String>> {
        let Some(target) = sys::readlinkat(self.fd.as_fd(), name.as_bytes())? else {
            return Ok(None);
        };
        let t = String::from_utf8_lossy(&target);
        match t.strip_prefix("trees/") {
            Some(v) if crate::core::version::validate(v).is_ok() => Ok(Some(v.to_owned())),
            _ => bail!(
                "`{}/{name}` points to `{t}`, not to a tree under trees/",
                self.path.display()
            ),
        }
    }

    /// Points `current` or `previous` at `trees/<version>` atomically (see
    /// [`sys::replace_symlink`]).
    pub fn set_link(&self, name: &str, version: &str) -> Result<()> {
        sys::replace_symlink(self.fd.as_fd(), name, &format!("trees/{version}")).with_context(
            || {
                format!(
                    "cannot point `{}/{name}` at `{version}`",
                    self.path.display()
                )
            },
        )
    }

    pub fn is_installed(&self, version: &str) -> Result<bool> {
        let trees = self.subdir("trees")?;
        Ok(sys::lstatat(trees.as_fd(), version.as_bytes())?.is_some())
    }

    /// Installed versions, sorted by name.
    pub fn versions(&self) -> Result<Vec<String>> {
        let trees = self.subdir("trees")?;
        let mut out: Vec<String> = self
            .read_dir(trees.as_fd(), "trees")?
            .into_iter()
            .filter_map(|n| String::from_utf8(n).ok())
            .filter(|n| crate::core::version::validate(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// When `version` was installed: its manifest's modification time, in seconds since the
    /// epoch (`None` if it has no manifest).
    pub fn installed_at(&self, version: &str) -> Result<Option<u64>> {
        match std::fs::metadata(self.manifest_path(version)) {
            Ok(m) => Ok(m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("cannot read a manifest's time"),
        }
    }

    /// Records the outcome of an apply in `last-apply.toml` (written to a temporary name and
    /// renamed; not synced: it only informs). Only a holder of the lock records.
    pub fn record_last_apply(&self, last: &LastApply) -> Result<()> {
        let text = toml::to_string(last).expect("serializable");
        let tmp = self.path.join(".last-apply.toml.tmp");
        fs_err::write(&tmp, text)?;
        fs_err::rename(&tmp, self.path.join(LAST_APPLY))?;
        Ok(())
    }

    /// The outcome of the last apply, if one was recorded.
    pub fn last_apply(&self) -> Result<Option<LastApply>> {
        match std::fs::read_to_string(self.path.join(LAST_APPLY)) {
            Ok(text) => Ok(toml::from_str(&text).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("cannot read `last-apply.toml`"),
        }
    }

    pub fn manifest_path(&self, version: &str) -> PathBuf {
        self.path.join("manifests").join(format!("{version}.toml"))
    }

    pub fn load_manifest(&self, version: &str) -> Result<Manifest> {
        self.load_manifest_with(version, manifest::parse_reader)
    }

    /// [`Root::load_manifest`] without checking the entries against the stored digest (see
    /// [`manifest::parse_reader_unverified`]); the caller checks them otherwise.
    pub fn load_manifest_unverified(&self, version: &str) -> Result<Manifest> {
        self.load_manifest_declared(version).map(|(m, _)| m)
    }

    /// [`Root::load_manifest_unverified`] with the digest its header declares.
    pub fn load_manifest_declared(
        &self,
        version: &str,
    ) -> Result<(Manifest, crate::core::object::Hash)> {
        let mut digest = [0; 32];
        let m = self.load_manifest_with(version, |r| {
            let (m, d) = manifest::parse_reader_unverified(r)?;
            digest = d;
            Ok(m)
        })?;
        Ok((m, digest))
    }

    fn load_manifest_with(
        &self,
        version: &str,
        parse: impl FnOnce(std::io::BufReader<fs_err::File>) -> Result<Manifest>,
    ) -> Result<Manifest> {
        let p = self.manifest_path(version);
        let f = fs_err::File::open(&p)?;
        let m = parse(std::io::BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("cannot load the manifest `{}`", p.display()))?;
        if m.version.as_deref() != Some(version) {
            bail!("`{}` is the manifest of another version", p.display());
        }
        Ok(m)
    }

    /// Reads a stored manifest block by block into `sink`, without keeping it (see
    /// [`manifest::stream_reader`]); returns its declared digest and entry count.
    pub fn stream_manifest(
        &self,
        version: &str,
        sink: &mut dyn FnMut(Vec<manifest::Entry>) -> Result<()>,
    ) -> Result<(crate::core::object::Hash, u64)> {
        let p = self.manifest_path(version);
        let f = fs_err::File::open(&p)?;
        let h = manifest::stream_reader(std::io::BufReader::with_capacity(1 << 20, f), sink)
            .with_context(|| format!("cannot load the manifest `{}`", p.display()))?;
        if h.version.as_deref() != Some(version) {
            bail!("`{}` is the manifest of another version", p.display());
        }
        Ok((
            h.digest.context("manifest has no digest")?,
            h.count.context("manifest has no count")?,
        ))
    }

    /// The digest a stored manifest declares, read from its header only (a full load checks
    /// it against the entries). `None` if the version has no manifest.
    pub fn manifest_digest(&self, version: &str) -> Result<Option<crate::core::object::Hash>> {
        use std::io::BufRead;
        let p = self.manifest_path(version);
        let f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open `{}`", p.display())),
        };
        for line in std::io::BufReader::new(f).lines().take(16) {
            let line = line.with_context(|| format!("cannot read `{}`", p.display()))?;
            if let Some(rest) = line.strip_prefix("digest = ") {
                let h = manifest::text::parse_hash(rest.trim().trim_matches('"'))
                    .with_context(|| format!("in `{}`", p.display()))?;
                return Ok(Some(h));
            }
        }
        bail!("`{}` has no digest in its header", p.display())
    }

    /// Writes the manifest of `version` to its temporary name, `manifests/.<V>.toml.tmp`, and
    /// starts its writing to the disk; [`Root::publish_manifest`] gives it its name.
    /// Durability comes from the caller's `syncfs` before its commit point. If writing fails,
    /// nothing is left. `digest`, if given, is `m`'s digest, already computed.
    pub fn write_manifest_tmp(
        &self,
        version: &str,
        m: &Manifest,
        digest: Option<&crate::core::object::Hash>,
    ) -> Result<()> {
        let tmp = self.manifest_tmp_path(version);
        let f = fs_err::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let digest = digest.copied().unwrap_or_else(|| m.digest());
        let res = m
            .write_toml_with_digest(&mut w, &digest)
            .and_then(|()| std::io::Write::flush(&mut w))
            .with_context(|| format!("cannot write `{}`", tmp.display()));
        match res {
            Ok(()) => sys::start_writeback(w.get_ref().file().as_fd()),
            Err(_) => {
                drop(w);
                self.discard_manifest_tmp(version);
            }
        }
        res
    }

    /// Renames the manifest written by [`Root::write_manifest_tmp`] to `manifests/<V>.toml`.
    pub fn publish_manifest(&self, version: &str) -> Result<()> {
        fs_err::rename(self.manifest_tmp_path(version), self.manifest_path(version))?;
        Ok(())
    }

    /// Removes what names version `version` besides its tree: its manifest, its layout and
    /// its read-only snapshot, those that are there. For a version whose tree is gone, or was
    /// never committed.
    pub fn forget(&self, version: &str) -> Result<()> {
        for p in [self.manifest_path(version), self.layout_path(version)] {
            if let Err(e) = fs_err::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(e.into());
            }
        }
        if let Some(snapshots) = self.snapshots_dir_opt()? {
            self.remove_or_set_aside(snapshots.as_fd(), "snapshots", version.as_bytes());
        }
        Ok(())
    }

    /// Removes the manifest written by [`Root::write_manifest_tmp`], if it is there.
    pub fn discard_manifest_tmp(&self, version: &str) {
        let tmp = self.manifest_tmp_path(version);
        if let Err(e) = std::fs::remove_file(&tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cannot remove `{}`: {e}", tmp.display());
        }
    }

    fn manifest_tmp_path(&self, version: &str) -> PathBuf {
        self.path
            .join("manifests")
            .join(format!(".{version}.toml.tmp"))
    }

    /// The one durability point before a commit rename: flush the whole file system.
    pub fn syncfs(&self) -> Result<()> {
        sys::syncfs(self.fd.as_fd())
    }
}

/// The root format recorded in `<root>/format`; 1 where there is none (roots made before the
/// file). A format this treeswap does not know is refused.
fn read_format(root: BorrowedFd, path: &Path) -> Result<u32> {
    use std::io::Read;
    let fd = match sys::openat(
        root,
        b"format",
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(1),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open `{}/format`", path.display()));
        }
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(64)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read `{}/format`", path.display()))?;
    match text.trim().parse::<u32>() {
        Ok(n @ 1..=ROOT_FORMAT) => Ok(n),
        _ => bail!(
            "`{}/format` says root format `{}`, which this treeswap does not know (it reads 1 to {ROOT_FORMAT}; a newer treeswap made it?)",
            path.display(),
            text.trim().escape_debug()
        ),
    }
}

/// Replaces `<root>/format` atomically: `.format.tmp`, fsync, rename, fsync of the root.
fn write_format(root: BorrowedFd, format: u32) -> Result<()> {
    let tmp = b".format.tmp";
    let fd = sys::openat(
        root,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o644),
    )
    .context("cannot write `format`")?;
    sys::write_all(fd.as_fd(), format!("{format}\n").as_bytes())
        .context("cannot write `format`")?;
    sys::fsync(fd.as_fd()).context("cannot sync `format`")?;
    drop(fd);
    sys::renameat(root, tmp, root, b"format").context("cannot replace `format`")?;
    sys::fsync(root)
}
