//! Helpers shared by the integration tests: build a tree from a short description, describe a
//! tree entry by entry without using treeswap's library, compare two descriptions with a
//! readable diff, and run the real `treeswap` binary.
//!
//! Every test makes its own temporary directory, so tests run in parallel.
// The helpers are shared by every suite: `pub` for them, not for a public API.
#![allow(unreachable_pub)]
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rustix::fs::{AtFlags, FileType, Mode};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Paths as bytes

/// A path from raw bytes (names on Linux need not be UTF-8).
pub fn bpath(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// `dir/rel` where `rel` is raw bytes; `.` is `dir` itself.
pub fn join(dir: &Path, rel: &[u8]) -> PathBuf {
    if rel == b"." {
        dir.to_owned()
    } else {
        dir.join(bpath(rel))
    }
}

/// Bytes for messages: printable ASCII as is, everything else escaped.
pub fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Set to `1` to let tests that cannot run here (not root, say) skip instead of failing.
pub const ALLOW_SKIP_VAR: &str = "TREESWAP_TEST_ALLOW_SKIP";
/// The file a skip is recorded in (one line each), so that the skip is counted and shown
/// (`scripts/test.sh` sets it, reads it and subtracts the skips from "passed").
pub const SKIP_LOG_VAR: &str = "TREESWAP_TEST_SKIP_LOG";

/// For tests that need root: `false` as root. Otherwise see [`skip`]: the test fails, or,
/// with `TREESWAP_TEST_ALLOW_SKIP=1`, the skip is recorded and the caller is told to return.
#[track_caller]
pub fn skip_unless_root() -> bool {
    !is_root() && skip("needs root")
}

/// A test that cannot run here, for `reason`. libtest would count a test that returns early
/// as passed, so this panics unless `TREESWAP_TEST_ALLOW_SKIP=1`; then it appends the test's
/// name and the reason to the file `TREESWAP_TEST_SKIP_LOG` names (which must be set, or the
/// skip would go unrecorded) and returns `true`: the caller returns at once.
#[track_caller]
pub fn skip(reason: &str) -> bool {
    let here = std::panic::Location::caller();
    let test = test_name();
    if std::env::var_os(ALLOW_SKIP_VAR).as_deref() != Some(OsStr::new("1")) {
        panic!(
            "{test} cannot run here ({reason}; {here}). Run it where it can (e.g. as root), \
             or set {ALLOW_SKIP_VAR}=1 (scripts/test.sh records and counts the skips) to let \
             it skip"
        );
    }
    let Some(log) = std::env::var_os(SKIP_LOG_VAR) else {
        panic!(
            "{test} would skip ({reason}; {here}), but {SKIP_LOG_VAR} is not set: a skip \
             must be recorded; set it to a file, as scripts/test.sh does"
        );
    };
    // One short line per write, appended: lines of tests running in parallel do not mix.
    let line = format!("{test}\t{reason}\n");
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .unwrap_or_else(|e| panic!("recording the skip of {test} in {log:?}: {e}"));
    eprintln!("skipping {test}: {reason}");
    true
}

/// `SUITE::TEST`: the test binary's name without cargo's hash, and the running test's name
/// (libtest names each test's thread after it).
pub fn test_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    let suite = match exe.rsplit_once('-') {
        Some((s, hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => s.to_owned(),
        _ => exe,
    };
    let thread = std::thread::current();
    format!("{suite}::{}", thread.name().unwrap_or("?"))
}

// ---------------------------------------------------------------------------------------------
// Building trees

/// What an entry of a [`TreeSpec`] is.
#[derive(Clone, Debug)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    /// Another name for an earlier regular file of the spec (its path, relative to the top).
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

#[derive(Clone, Debug)]
pub struct Item {
    pub path: Vec<u8>,
    pub node: Node,
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A tree described entry by entry; build it with [`TreeSpec::build`].
///
/// Paths are relative to the top and given as bytes (`"a/b"` or `b"a/\xff"`); `.` is the top.
/// Missing parent directories are made with mode 0755. `mode`, `owner` and `xattr` apply to
/// the entry added last. Defaults: directories 0755, everything else 0644, owner of the
/// creator. Metadata is applied in the order that keeps it: owner, then mode (a `chown` clears
/// setuid and setgid), then extended attributes (a `chown` clears `security.capability`).
/// Directory metadata is applied last, deepest first, so that a read-only directory can
/// still be filled.
#[derive(Clone, Debug, Default)]
pub struct TreeSpec {
    pub items: Vec<Item>,
}

/// A valid `security.capability` value (VFS_CAP_REVISION_2, effective, permitted
/// CAP_NET_BIND_SERVICE), i.e. `setcap cap_net_bind_service=ep`.
pub fn capability_value() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

impl TreeSpec {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, path: impl AsRef<[u8]>, node: Node) -> Self {
        self.items.push(Item {
            path: path.as_ref().to_vec(),
            node,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
        });
        self
    }

    fn last(&mut self) -> &mut Item {
        let it = self.items.last_mut().expect("no entry to modify yet");
        assert!(
            !matches!(it.node, Node::Hardlink(_)),
            "metadata lives on the inode: set it on the first name of a hardlink group"
        );
        it
    }

    /// The top directory itself, so that `mode`/`owner`/`xattr` can follow.
    pub fn top(self) -> Self {
        self.push(".", Node::Dir)
    }
    pub fn dir(self, path: impl AsRef<[u8]>) -> Self {
        self.push(path, Node::Dir)
    }
    pub fn file(self, path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Self {
        let c = content.as_ref().to_vec();
        self.push(path, Node::File(c))
    }
    pub fn empty(self, path: impl AsRef<[u8]>) -> Self {
        self.push(path, Node::File(Vec::new()))
    }
    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let t = target.as_ref().to_vec();
        self.push(path, Node::Symlink(t))
    }
    /// `path` becomes another name of the earlier file `existing`.
    pub fn hardlink(self, path: impl AsRef<[u8]>, existing: impl AsRef<[u8]>) -> Self {
        let e = existing.as_ref().to_vec();
        self.push(path, Node::Hardlink(e))
    }
    pub fn char_dev(self, path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        self.push(path, Node::Char(major, minor))
    }
    pub fn block_dev(self, path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        self.push(path, Node::Block(major, minor))
    }
    pub fn fifo(self, path: impl AsRef<[u8]>) -> Self {
        self.push(path, Node::Fifo)
    }
    pub fn socket(self, path: impl AsRef<[u8]>) -> Self {
        self.push(path, Node::Socket)
    }

    /// Permission bits of the last entry, `0o7777` included (setuid, setgid, sticky).
    pub fn mode(mut self, mode: u32) -> Self {
        self.last().mode = Some(mode);
        self
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.last().owner = Some((uid, gid));
        self
    }
    pub fn xattr(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        let kv = (name.as_ref().to_vec(), value.as_ref().to_vec());
        self.last().xattrs.push(kv);
        self
    }
    /// `security.capability` on the last entry; skipped with a note where it cannot be set.
    pub fn capability(self) -> Self {
        self.xattr("security.capability", capability_value())
    }

    /// Creates the tree at `dest` (made if missing). Panics with the path on any failure.
    pub fn build(&self, dest: &Path) {
        fs::create_dir_all(dest).unwrap_or_else(|e| panic!("mkdir {}: {e}", dest.display()));
        let mut dirs: Vec<&Item> = Vec::new();
        let mut made_dirs: BTreeSet<Vec<u8>> = BTreeSet::new();
        for it in &self.items {
            let full = join(dest, &it.path);
            if it.path != b"." {
                make_parents(dest, &it.path, &mut made_dirs);
            }
            let res = match &it.node {
                Node::Dir => {
                    if it.path != b"." && !made_dirs.contains(&it.path) {
                        fs::create_dir(&full).and_then(|()| {
                            fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        })
                    } else {
                        Ok(())
                    }
                }
                Node::File(content) => fs::write(&full, content),
                Node::Symlink(target) => std::os::unix::fs::symlink(bpath(target), &full),
                Node::Hardlink(existing) => fs::hard_link(join(dest, existing), &full),
                Node::Char(ma, mi) => mknod(&full, FileType::CharacterDevice, *ma, *mi),
                Node::Block(ma, mi) => mknod(&full, FileType::BlockDevice, *ma, *mi),
                Node::Fifo => mknod(&full, FileType::Fifo, 0, 0),
                Node::Socket => mknod(&full, FileType::Socket, 0, 0),
            };
            res.unwrap_or_else(|e| panic!("creating {}: {e}", full.display()));
            match it.node {
                Node::Dir => {
                    made_dirs.insert(it.path.clone());
                    dirs.push(it);
                }
                Node::Hardlink(_) => {}
                _ => apply_meta(dest, it),
            }
        }
        // Deepest first, so that a directory is not made read-only before its children.
        dirs.sort_by_key(|it| std::cmp::Reverse(it.path.iter().filter(|&&b| b == b'/').count()));
        for it in dirs {
            apply_meta(dest, it);
        }
    }
}

fn make_parents(dest: &Path, rel: &[u8], made: &mut BTreeSet<Vec<u8>>) {
    let mut i = 0;
    while let Some(off) = rel[i..].iter().position(|&b| b == b'/') {
        let parent = &rel[..i + off];
        if !made.contains(parent) {
            let full = join(dest, parent);
            match fs::create_dir(&full) {
                Ok(()) => fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", full.display())),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mkdir {}: {e}", full.display()),
            }
            made.insert(parent.to_vec());
        }
        i += off + 1;
    }
}

/// [mknodat(2)] relative to the current directory.
///
/// [mknodat(2)]: https://man7.org/linux/man-pages/man2/mknodat.2.html
pub fn mknod(path: &Path, ft: FileType, major: u32, minor: u32) -> std::io::Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        ft,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(major, minor),
    )?;
    Ok(())
}

fn apply_meta(dest: &Path, it: &Item) {
    let full = join(dest, &it.path);
    let is_symlink = matches!(it.node, Node::Symlink(_));
    if let Some((uid, gid)) = it.owner {
        std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", full.display()));
    }
    if !is_symlink {
        let mode = it.mode.unwrap_or(match it.node {
            Node::Dir => 0o755,
            _ => 0o644,
        });
        // Through the path: fine for devices and FIFOs, which must not be opened.
        rustix::fs::chmodat(
            rustix::fs::CWD,
            &full,
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("chmod {}: {e}", full.display()));
    }
    for (k, v) in &it.xattrs {
        match rustix::fs::lsetxattr(&full, &k[..], v, rustix::fs::XattrFlags::empty()) {
            Ok(()) => {}
            Err(e) if k.starts_with(b"security.") => eprintln!(
                "note: cannot set {} on {}: {e}; leaving it out",
                show(k),
                full.display()
            ),
            Err(e) => panic!("setxattr {} on {}: {e}", show(k), full.display()),
        }
    }
}

/// Deterministic bytes that do not compress (a xorshift stream).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Creates `count` empty files named `f<i>` spread over `dirs` directories `d<j>` of `top`:
/// the quick way to make a very large tree.
pub fn many_empty_files(top: &Path, dirs: usize, count: usize) {
    let per = count.div_ceil(dirs);
    for j in 0..dirs {
        let d = top.join(format!("d{j}"));
        fs::create_dir_all(&d).unwrap();
        for i in (j * per)..((j + 1) * per).min(count) {
            fs::File::create(d.join(format!("f{i}"))).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Describing trees

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// One entry as `lstat` and friends see it. Timestamps are left out; so are the device and
/// inode numbers and the link count, which only say which entries share an inode (`links`).
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub kind: Type,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only.
    pub size: Option<u64>,
    /// Regular files only, in hex.
    pub sha256: Option<String>,
    pub target: Option<Vec<u8>>,
    /// Device nodes only: (major, minor).
    pub rdev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a non-directory whose inode has other names in this tree: all those names, this
    /// one included. Empty otherwise.
    pub links: BTreeSet<Vec<u8>>,
    /// (st_dev, st_ino): not compared.
    pub ino: (u64, u64),
    /// st_nlink: not compared.
    pub nlink: u64,
}

/// A tree: relative path (bytes; `.` for the top) to its description.
pub type Snapshot = BTreeMap<Vec<u8>, EntryInfo>;

/// Extended attributes of `path` itself (never following a symlink), by name.
pub fn xattrs_of(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut list[..])
        .unwrap_or_else(|e| panic!("llistxattr {}: {e}", path.display()));
    for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 64 * 1024];
        let m = rustix::fs::lgetxattr(path, name, &mut v[..])
            .unwrap_or_else(|e| panic!("lgetxattr {} {}: {e}", show(name), path.display()));
        out.insert(name.to_vec(), v[..m].to_vec());
    }
    out
}

fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Describes every entry under `dir` (and `dir` itself as `.`), never following a symlink.
pub fn snapshot(dir: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    let mut by_inode: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut pending = vec![b".".to_vec()];
    while let Some(rel) = pending.pop() {
        let full = join(dir, &rel);
        let md =
            fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("lstat {}: {e}", full.display()));
        let ft = FileType::from_raw_mode(md.mode());
        let kind = match ft {
            FileType::Directory => Type::Dir,
            FileType::RegularFile => Type::File,
            FileType::Symlink => Type::Symlink,
            FileType::CharacterDevice => Type::Char,
            FileType::BlockDevice => Type::Block,
            FileType::Fifo => Type::Fifo,
            FileType::Socket => Type::Socket,
            other => panic!("{}: unknown file type {other:?}", full.display()),
        };
        let info = EntryInfo {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: (kind == Type::File).then_some(md.len()),
            sha256: (kind == Type::File).then(|| sha256_file(&full)),
            target: (kind == Type::Symlink).then(|| {
                fs::read_link(&full)
                    .unwrap_or_else(|e| panic!("readlink {}: {e}", full.display()))
                    .into_os_string()
                    .into_encoded_bytes()
            }),
            rdev: matches!(kind, Type::Char | Type::Block)
                .then(|| (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev()))),
            xattrs: xattrs_of(&full),
            links: BTreeSet::new(),
            ino: (md.dev(), md.ino()),
            nlink: md.nlink(),
        };
        if kind == Type::Dir {
            for ent in
                fs::read_dir(&full).unwrap_or_else(|e| panic!("readdir {}: {e}", full.display()))
            {
                let name = ent.unwrap().file_name();
                let child = if rel == b"." {
                    name.as_bytes().to_vec()
                } else {
                    [&rel[..], b"/", name.as_bytes()].concat()
                };
                pending.push(child);
            }
        } else if md.nlink() > 1 {
            by_inode.entry(info.ino).or_default().push(rel.clone());
        }
        out.insert(rel, info);
    }
    for group in by_inode.into_values().filter(|g| g.len() > 1) {
        let set: BTreeSet<Vec<u8>> = group.iter().cloned().collect();
        for p in group {
            out.get_mut(&p).unwrap().links = set.clone();
        }
    }
    out
}

fn show_set(s: &BTreeSet<Vec<u8>>) -> String {
    let v: Vec<String> = s.iter().map(|p| show(p)).collect();
    format!("{{{}}}", v.join(", "))
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let v: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{}={}", show(k), show(v)))
        .collect();
    format!("{{{}}}", v.join(", "))
}

/// How hardlinks must correspond between two trees.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Names that share an inode in `expected` share one in `actual`; `actual` may join more
    /// (treeswap links identical files to one pool object).
    Subset,
    /// Exactly the same groups.
    Exact,
}

/// The differences between two trees, one line each; empty if they are the same.
pub fn diff_trees(expected: &Snapshot, actual: &Snapshot, links: Links) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in expected {
        let Some(b) = actual.get(p) else {
            out.push(format!("only in expected: {} ({:?})", show(p), a.kind));
            continue;
        };
        let mut d = String::new();
        macro_rules! field {
            ($f:ident, $fmt:expr) => {
                if a.$f != b.$f {
                    let _ = write!(
                        d,
                        " {}: {} != {};",
                        stringify!($f),
                        $fmt(&a.$f),
                        $fmt(&b.$f)
                    );
                }
            };
        }
        field!(kind, |v: &Type| format!("{v:?}"));
        // The mode bits of a symlink mean nothing and are not portable.
        if a.kind != Type::Symlink {
            field!(mode, |v: &u32| format!("0o{v:o}"));
        }
        field!(uid, |v: &u32| v.to_string());
        field!(gid, |v: &u32| v.to_string());
        field!(size, |v: &Option<u64>| format!("{v:?}"));
        field!(sha256, |v: &Option<String>| format!("{v:?}"));
        field!(target, |v: &Option<Vec<u8>>| v
            .as_deref()
            .map(show)
            .unwrap_or_else(|| "-".into()));
        field!(rdev, |v: &Option<(u32, u32)>| format!("{v:?}"));
        field!(xattrs, show_xattrs);
        let links_ok = match links {
            Links::Subset => a.links.is_subset(&b.links) || a.links.is_empty(),
            Links::Exact => a.links == b.links,
        };
        if !links_ok {
            let _ = write!(
                d,
                " hardlinked with: {} vs {};",
                show_set(&a.links),
                show_set(&b.links)
            );
        }
        if !d.is_empty() {
            out.push(format!("{}:{d} (expected != actual)", show(p)));
        }
    }
    for (p, b) in actual {
        if !expected.contains_key(p) {
            out.push(format!("only in actual: {} ({:?})", show(p), b.kind));
        }
    }
    out
}

/// Panics with a readable diff unless the trees are the same (timestamps aside). Hardlinks:
/// [`Links::Subset`].
#[track_caller]
pub fn assert_same_tree(expected: &Snapshot, actual: &Snapshot) {
    assert_trees(expected, actual, Links::Subset);
}

#[track_caller]
pub fn assert_trees(expected: &Snapshot, actual: &Snapshot, links: Links) {
    let d = diff_trees(expected, actual, links);
    if !d.is_empty() {
        panic!(
            "trees differ in {} entr{}:\n  {}",
            d.len(),
            if d.len() == 1 { "y" } else { "ies" },
            d.join("\n  ")
        );
    }
}

/// The same as [`assert_same_tree`] on two directories.
#[track_caller]
pub fn assert_same_dirs(expected: &Path, actual: &Path) {
    assert_same_tree(&snapshot(expected), &snapshot(actual));
}

// ---------------------------------------------------------------------------------------------
// Running treeswap

pub const BIN: &str = env!("CARGO_BIN_EXE_treeswap");

/// A finished run of the binary, with assertions that print everything on failure.
pub struct Run {
    pub cmdline: String,
    pub out: Output,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }
    #[track_caller]
    pub fn success(&self) -> &Self {
        self.exit(0)
    }
    #[track_caller]
    pub fn exit(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "expected exit code {code}\n{}",
            self.report()
        );
        self
    }
    /// A non-zero exit code (not a signal, not a panic).
    #[track_caller]
    pub fn failure(&self) -> &Self {
        match self.code() {
            Some(c) if c != 0 && c != 101 => {}
            _ => panic!("expected a clean failure\n{}", self.report()),
        }
        self
    }
    #[track_caller]
    pub fn stdout_has(&self, s: &str) -> &Self {
        assert!(
            self.stdout().contains(s),
            "stdout should contain {s:?}\n{}",
            self.report()
        );
        self
    }
    #[track_caller]
    pub fn stderr_has(&self, s: &str) -> &Self {
        assert!(
            self.stderr().contains(s),
            "stderr should contain {s:?}\n{}",
            self.report()
        );
        self
    }
    #[track_caller]
    pub fn stderr_lacks(&self, s: &str) -> &Self {
        assert!(
            !self.stderr().contains(s),
            "stderr should not contain {s:?}\n{}",
            self.report()
        );
        self
    }
    /// Exactly one line on stderr, in treeswap's error shape.
    #[track_caller]
    pub fn one_line_error(&self) -> &Self {
        let err = self.stderr();
        assert!(
            err.ends_with('\n') && err.lines().count() == 1 && err.starts_with("treeswap: "),
            "expected exactly one `treeswap: ...` line on stderr\n{}",
            self.report()
        );
        self
    }
    /// The lines of stdout that mention `needle`.
    pub fn stdout_lines_with(&self, needle: &str) -> Vec<String> {
        self.stdout()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// The binary with a clean environment as far as treeswap is concerned.
pub fn ts_cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("TREESWAP_ROOT");
    // Plain hardlinks unless a test asks for protection: tests tamper with trees and the pool
    // on purpose, and remove their roots afterwards.
    if std::env::var_os("TREESWAP_PROTECT").is_none() {
        c.env("TREESWAP_PROTECT", "hardlink");
    }
    c
}

/// Runs a prepared command and captures its output.
pub fn run(cmd: &mut Command) -> Run {
    let cmdline = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    Run { cmdline, out }
}

/// `treeswap --root ROOT ARGS...`
pub fn ts<I, S>(root: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = ts_cmd();
    c.arg("--root").arg(root).args(args);
    run(&mut c)
}

/// Makes a state root at `root` (`treeswap init`): every other command refuses a directory
/// that is not one.
pub fn init_root(root: &Path) {
    ts(root, ["init"]).success();
}

/// A test's own scratch directory, with a state root inside it (made).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Drop for Env {
    /// Pool objects may be immutable (protect = "immutable"): clear the flag so that the
    /// scratch directory can be removed.
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .args(["-R", "-f", "-i"])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("treeswap-test-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        init_root(&root);
        Env { dir, root }
    }
    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// `treeswap --root <root> ARGS...`
    pub fn ts<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ts(&self.root, args)
    }
    /// Builds `spec` at `name` in the scratch directory and returns its path.
    pub fn tree(&self, name: &str, spec: &TreeSpec) -> PathBuf {
        let p = self.path(name);
        spec.build(&p);
        p
    }
    /// `import DIR --version V` and checks it succeeded.
    pub fn import(&self, dir: &Path, version: &str) -> Run {
        let r = self.ts([
            OsStr::new("import"),
            dir.as_os_str(),
            OsStr::new("--version"),
            OsStr::new(version),
        ]);
        r.success();
        r
    }
    pub fn tree_dir(&self, version: &str) -> PathBuf {
        self.root.join("trees").join(version)
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// The state root, seen from outside

/// The names in a directory (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<Vec<u8>> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<Vec<u8>> = rd
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("readdir {}: {e}", dir.display()),
    }
}

/// After a failed run: nothing half-written. `tmp/` and `staging/` are empty and `version`
/// has neither a tree nor a manifest, not even a temporary one.
#[track_caller]
pub fn assert_clean(root: &Path, version: &str) {
    for d in ["tmp", "staging"] {
        let left = names(&root.join(d));
        assert!(
            left.is_empty(),
            "`{d}/` should be empty after a failed run, has: {:?}",
            left.iter().map(|n| show(n)).collect::<Vec<_>>()
        );
    }
    let tree = root.join("trees").join(version);
    assert!(
        fs::symlink_metadata(&tree).is_err(),
        "`{}` should not exist",
        tree.display()
    );
    let names = [
        format!("manifests/{version}.toml"),
        format!("manifests/.{version}.toml.tmp"),
        format!("manifests/{version}.layout.toml"),
        format!("layouts/{version}.toml"),
        format!("snapshots/{version}"),
    ];
    for m in names {
        let m = root.join(m);
        assert!(
            fs::symlink_metadata(&m).is_err(),
            "`{}` should not exist",
            m.display()
        );
    }
}

/// Every file in `pool/` (relative paths like `abcd…` and `abcd….1`, or `ab/abcd…` in a
/// sharded pool).
pub fn pool_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for name in names(&root.join("pool")) {
        let p = root.join("pool").join(bpath(&name));
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for n in names(&p) {
                out.push(bpath(&name).join(bpath(&n)));
            }
        } else {
            out.push(bpath(&name).to_owned());
        }
    }
    out.sort();
    out
}

/// The pool file that `file` is a hardlink to.
pub fn pool_object_of(root: &Path, file: &Path) -> PathBuf {
    let md = fs::symlink_metadata(file).unwrap();
    for rel in pool_files(root) {
        let p = root.join("pool").join(&rel);
        let pm = fs::symlink_metadata(&p).unwrap();
        if (pm.dev(), pm.ino()) == (md.dev(), md.ino()) {
            return p;
        }
    }
    panic!("{} is not a link to any pool object", file.display());
}

pub fn inode(path: &Path) -> (u64, u64) {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (md.dev(), md.ino())
}

// ---------------------------------------------------------------------------------------------
// Mounts

/// A mount that is undone when dropped, even when the test panics.
pub struct Mount {
    pub path: PathBuf,
}

impl Mount {
    /// `mount ARGS... PATH` (PATH is made if missing).
    pub fn new(args: &[&str], path: &Path) -> Mount {
        fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(args)
            .arg(path)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount {args:?} {} failed", path.display());
        Mount {
            path: path.to_owned(),
        }
    }
    pub fn tmpfs(path: &Path, size: &str) -> Mount {
        Mount::new(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ],
            path,
        )
    }
    /// A fresh ext4 file system of `size_mib` MiB with `inodes` inodes on a loop device,
    /// its image in `image`.
    pub fn ext4_loop(image: &Path, size_mib: u64, inodes: u64, path: &Path) -> Mount {
        let f = fs::File::create(image).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-N", &inodes.to_string()])
            .arg(image)
            .status()
            .expect("run mkfs.ext4");
        assert!(st.success(), "mkfs.ext4 failed");
        Mount::new(&["-o", "loop", image.to_str().unwrap()], path)
    }
    /// A fresh btrfs file system of `size_mib` MiB on a loop device, its image in `image`.
    pub fn btrfs_loop(image: &Path, size_mib: u64, path: &Path) -> Mount {
        let f = fs::File::create(image).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        let st = Command::new("mkfs.btrfs")
            .args(["-q", "-f"])
            .arg(image)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run mkfs.btrfs");
        assert!(st.success(), "mkfs.btrfs failed");
        Mount::new(&["-o", "loop", image.to_str().unwrap()], path)
    }
    /// `mount -o remount,OPTS`.
    pub fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(st.success(), "remount {opts} failed");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it (a failed test's open file): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes `data` over the start of an existing file without truncating it or making a new
/// inode.
pub fn overwrite_in_place(path: &Path, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(data).unwrap();
}

/// The state root is consistent, as `treeswap boot` leaves it: `current` and `previous`, where
/// they exist, name installed trees under `trees/` (and not the same one), every installed
/// tree has a manifest, and `tmp/` and `staging/` are empty.
#[track_caller]
pub fn assert_no_dangling(root: &Path) {
    let mut named = Vec::new();
    for link in ["current", "previous"] {
        let p = root.join(link);
        let Ok(target) = fs::read_link(&p) else {
            assert!(
                fs::symlink_metadata(&p).is_err(),
                "`{link}` is not a symlink"
            );
            continue;
        };
        let t = target.as_os_str().as_bytes();
        let v = t
            .strip_prefix(b"trees/")
            .unwrap_or_else(|| panic!("`{link}` points to `{}`, not into trees/", show(t)));
        assert!(
            root.join(&target).is_dir(),
            "`{link}` dangles: `{}`",
            show(t)
        );
        named.push(v.to_vec());
    }
    if let [a, b] = &named[..] {
        assert_ne!(a, b, "`current` and `previous` name the same tree");
    }
    for v in names(&root.join("trees")) {
        let mut m = v.clone();
        m.extend_from_slice(b".toml");
        assert!(
            root.join("manifests").join(bpath(&m)).is_file(),
            "installed tree `{}` has no manifest",
            show(&v)
        );
    }
    for d in ["tmp", "staging"] {
        let left = names(&root.join(d));
        assert!(
            left.is_empty(),
            "`{d}/` should be empty, has: {:?}",
            left.iter().map(|n| show(n)).collect::<Vec<_>>()
        );
    }
}

/// The object id (FORMAT.md, "Object id") of the regular file at `path`, from its content,
/// permission bits, owner, group and every extended attribute, as hex.
pub fn object_id_of_file(path: &Path) -> String {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta = treeswap::core::object::Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        xattrs: xattrs_of(path)
            .into_iter()
            .map(|(k, v)| (k.into_boxed_slice(), v.into_boxed_slice()))
            .collect(),
    };
    let mut sha = [0u8; 32];
    hex::decode_to_slice(sha256_file(path), &mut sha).expect("hex");
    hex::encode(treeswap::core::object::object_id(&meta, md.len(), &sha))
}

/// Every file of `root/pool` (flat or sharded) is a complete object: a regular file named
/// `<id>` or `<id>.<n>` whose id is that of its content and metadata, recomputed here, so
/// that objects no tree uses (which `verify --full` does not read) are checked too.
#[track_caller]
pub fn assert_pool_complete(root: &Path) {
    let mut bad = Vec::new();
    for rel in pool_files(root) {
        let p = root.join("pool").join(&rel);
        let name = rel.file_name().unwrap().to_str().unwrap_or("");
        let want = name.split('.').next().unwrap_or("");
        if !fs::symlink_metadata(&p).unwrap().is_file() {
            bad.push(format!("pool/{} is not a regular file", rel.display()));
            continue;
        }
        let got = object_id_of_file(&p);
        if got != want {
            bad.push(format!(
                "pool/{} is incomplete: its content and metadata have the id {got}",
                rel.display()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} incomplete pool object(s):\n  {}",
        bad.len(),
        bad.join("\n  ")
    );
}

/// A loop-mounted file system of `kind` (ext4, xfs with reflinks, btrfs) of 320 MiB in the
/// test's scratch directory.
pub fn loop_fs(env: &Env, kind: &str) -> Mount {
    let image = env.path(&format!("{kind}.img"));
    let f = fs::File::create(&image).unwrap();
    // xfs and btrfs want some room for their logs and metadata.
    f.set_len(320 << 20).unwrap();
    drop(f);
    let mkfs = match kind {
        "ext4" => Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status(),
        "xfs" => Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image)
            .status(),
        "btrfs" => Command::new("mkfs.btrfs")
            .args(["-q", "-f"])
            .arg(&image)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status(),
        _ => unreachable!(),
    }
    .expect("mkfs");
    assert!(mkfs.success(), "mkfs.{kind} failed");
    Mount::new(
        &["-o", "loop", image.to_str().unwrap()],
        &env.path(&format!("mnt-{kind}")),
    )
}

/// A key pair `NAME.pub`, `NAME.key` in the test's scratch directory, made by `minisign -G -W`
/// (no password), as a vendor would make it.
pub fn minisign_keypair(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    let (public, secret) = (
        env.path(&format!("{name}.pub")),
        env.path(&format!("{name}.key")),
    );
    let st = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run minisign (Debian package minisign)");
    assert!(st.success());
    (public, secret)
}

/// `treeswap diff --from-dir A --to-dir B --from-version FROM --to-version TO -o OUT`.
pub fn diff_from_dirs(a: &Path, b: &Path, from: &str, to: &str, out: &Path) -> Run {
    let mut c = ts_cmd();
    c.arg("diff")
        .arg("--from-dir")
        .arg(a)
        .arg("--to-dir")
        .arg(b)
        .args(["--from-version", from, "--to-version", to, "-o"])
        .arg(out);
    run(&mut c)
}

// ---------------------------------------------------------------------------------------------
// Peak memory of a run

/// What a run's standard input is fed: called on a thread of its own while the run goes on.
pub type Feed<'a> = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'a>;

/// A finished run and the most resident memory it used.
pub struct Measured {
    pub run: Run,
    /// `ru_maxrss` of the program run (KiB): its peak resident set, its threads included, or
    /// that of what it `exec`ed (`sh -c 'ulimit ... && exec treeswap ...'` measures
    /// treeswap).
    pub peak_rss_kib: u64,
}

/// A command whose peak resident memory [`run_measured`] reports: `PROGRAM` run by GNU
/// `time -f %M` (Debian package `time`), which reaps it with `wait4` and writes its
/// `ru_maxrss` to a file.
///
/// Why not `wait4` on the child here: the test process is large (it holds whole deltas), and
/// a process's `ru_maxrss` keeps the high-water mark of the memory it `exec`ed from, which for
/// a direct child (forked, or `vfork`ed as `std` does) is this process's. GNU time is small,
/// and the program it forks starts from its few hundred KiB.
pub struct MeasuredCmd {
    pub cmd: Command,
    peak: tempfile::NamedTempFile,
}

impl MeasuredCmd {
    /// `time -q -f %M -o PEAKFILE PROGRAM`: add PROGRAM's arguments to `cmd`.
    pub fn new(program: impl AsRef<OsStr>) -> MeasuredCmd {
        let peak = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut cmd = Command::new("/usr/bin/time");
        cmd.args(["-q", "-f", "%M", "-o"])
            .arg(peak.path())
            .arg(program);
        MeasuredCmd { cmd, peak }
    }
}

/// Runs a [`MeasuredCmd`], captures its output, feeds its standard input from `feed` on a
/// thread of its own (or gives it none), and reads its peak resident memory. A program killed
/// by a signal exits `128 + signal` (GNU time's way).
pub fn run_measured(mut m: MeasuredCmd, feed: Option<Feed<'_>>) -> Measured {
    use std::process::Stdio;
    let cmdline = format!("{:?}", m.cmd);
    m.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    m.cmd.stdin(if feed.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = m
        .cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    let stdin = child.stdin.take();
    let out = std::thread::scope(|s| {
        if let (Some(feed), Some(mut stdin)) = (feed, stdin) {
            // The program may stop reading once it refuses the input: the rest fails with
            // EPIPE, which is not a failure of the test.
            s.spawn(move || drop(feed(&mut stdin)));
        }
        child.wait_with_output()
    })
    .unwrap_or_else(|e| panic!("wait for {cmdline}: {e}"));
    let text = fs::read_to_string(m.peak.path()).expect("read GNU time's output");
    let peak_rss_kib = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("GNU time wrote no peak for {cmdline}: {text:?}"));
    Measured {
        run: Run { cmdline, out },
        peak_rss_kib,
    }
}

// ---------------------------------------------------------------------------------------------
// Listing every path, inode and flag

/// One path of a [`Listing`]: what `lstat` says of its inode, and its inode flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub ino: u64,
    /// `st_mode`: the type and the permission bits.
    pub mode: u32,
    pub size: u64,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    /// `FS_IOC_GETFLAGS` ([ioctl_iflags(2)]: immutable, append-only, ...) of regular files and
    /// directories; `None` for other types (never opened) and where the file system has none.
    ///
    /// [ioctl_iflags(2)]: https://man7.org/linux/man-pages/man2/ioctl_iflags.2.html
    pub flags: Option<u32>,
}

/// Every path under a directory (`.` for itself), never following a symlink, with its
/// inode number, type and mode, size, link count, owner and inode flags: two listings taken
/// before and after a command that must change nothing must be equal. Timestamps are left
/// out (reading a file changes its atime).
pub type Listing = BTreeMap<Vec<u8>, Listed>;

/// The [`Listing`] of `dir`. Regular files and directories are opened (read-only,
/// `O_NOFOLLOW | O_NONBLOCK`) to read their flags; nothing else is opened.
pub fn listing(dir: &Path) -> Listing {
    let mut out = Listing::new();
    let mut pending = vec![b".".to_vec()];
    while let Some(rel) = pending.pop() {
        let full = join(dir, &rel);
        let md =
            fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("lstat {}: {e}", full.display()));
        let ft = FileType::from_raw_mode(md.mode());
        let flags = match ft {
            FileType::RegularFile | FileType::Directory => inode_flags(&full),
            _ => None,
        };
        if ft == FileType::Directory {
            for ent in
                fs::read_dir(&full).unwrap_or_else(|e| panic!("readdir {}: {e}", full.display()))
            {
                let name = ent.unwrap().file_name();
                pending.push(if rel == b"." {
                    name.as_bytes().to_vec()
                } else {
                    [&rel[..], b"/", name.as_bytes()].concat()
                });
            }
        }
        out.insert(
            rel,
            Listed {
                ino: md.ino(),
                mode: md.mode(),
                size: md.len(),
                nlink: md.nlink(),
                uid: md.uid(),
                gid: md.gid(),
                flags,
            },
        );
    }
    out
}

/// The inode flags of a regular file or directory (`None` where the file system has none).
fn inode_flags(path: &Path) -> Option<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    match rustix::fs::ioctl_getflags(&f) {
        Ok(fl) => Some(fl.bits()),
        Err(rustix::io::Errno::NOTTY | rustix::io::Errno::NOTSUP) => None,
        Err(e) => panic!("FS_IOC_GETFLAGS {}: {e}", path.display()),
    }
}

/// The differences between two listings, one line each (empty if they are equal).
pub fn diff_listings(before: &Listing, after: &Listing) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in before {
        match after.get(p) {
            None => out.push(format!("{}: gone", show(p))),
            Some(b) if a != b => out.push(format!("{}: {a:?} became {b:?}", show(p))),
            Some(_) => {}
        }
    }
    for (p, b) in after {
        if !before.contains_key(p) {
            out.push(format!("{}: new {b:?}", show(p)));
        }
    }
    out
}
