//! Whole-tree manifests: what a tree is, entry by entry, and its digest.
//!
//! Parsing and writing are pure: they take and give text, never touch the disk. The text is a
//! strict subset of TOML that treeswap writes in one canonical shape (one inline table per
//! entry, on its own line) so it can be read by stock TOML tools and parsed here line by line in
//! constant memory per entry. FORMAT.md is the reference.
//!
//! This file holds the model (entries, kinds, the manifest, the tree digest) and the canonical
//! writing; the reading is in [`stream`] (whole manifests, block by block), [`canonical`] (the
//! fast path for entry lines in the canonical form) and [`text`] (the TOML-subset reader that
//! the delta manifest shares).

mod canonical;
mod stream;
pub(crate) mod text;

use std::fmt::Write as _;

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

use crate::core::object::{Hash, Meta, ObjectId, object_id};

pub use stream::{parse, parse_reader};
pub(crate) use stream::{parse_reader_unverified, stream_reader};

/// The manifest format version; see FORMAT.md for what changes it.
pub(crate) const FORMAT: u32 = 1;

/// What an entry is, with the data that belongs to its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { size: u64, sha256: Hash },
    Symlink { target: Box<[u8]> },
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

impl Kind {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File { .. } => "file",
            Kind::Symlink { .. } => "symlink",
            Kind::Char { .. } => "char",
            Kind::Block { .. } => "block",
            Kind::Fifo => "fifo",
        }
    }
    fn code(&self) -> u8 {
        match self {
            Kind::Dir => b'd',
            Kind::File { .. } => b'f',
            Kind::Symlink { .. } => b'l',
            Kind::Char { .. } => b'c',
            Kind::Block { .. } => b'b',
            Kind::Fifo => b'p',
        }
    }
}

/// One entry of a tree. `path` is relative to the tree's top, `.` for the top itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: Box<[u8]>,
    pub meta: Meta,
    pub kind: Kind,
}

impl Entry {
    /// The pool object a regular file is a link to; `None` for other kinds.
    pub(crate) fn object(&self) -> Option<ObjectId> {
        match &self.kind {
            Kind::File { size, sha256 } => Some(object_id(&self.meta, *size, sha256)),
            _ => None,
        }
    }
    pub(crate) fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }
    pub(crate) fn display(&self) -> String {
        crate::core::path::display(&self.path)
    }
}

/// The empty tree: its top alone, a directory of mode 0755 owned by root. A delta from it is a
/// first install (a release repository lists one per version); `apply` takes it as the base
/// when no installed tree has its digest.
pub(crate) fn empty_tree() -> Manifest {
    Manifest {
        version: None,
        entries: vec![Entry {
            path: (*b".").into(),
            meta: Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                xattrs: Vec::new(),
            },
            kind: Kind::Dir,
        }],
    }
}

/// A whole tree: its entries sorted by path bytes, and the version it is installed as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub version: Option<String>,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Sorts the entries into canonical order and checks that they form a tree: unique paths,
    /// valid paths, a top directory, and every entry's parent a directory of the tree.
    pub(crate) fn normalize(&mut self) -> Result<()> {
        self.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        check_tree(&self.entries)
    }

    /// The tree digest (FORMAT.md, "Tree digest").
    pub fn digest(&self) -> Hash {
        tree_digest(&self.entries)
    }

    /// The index of the entry at `path`.
    pub(crate) fn index(&self, path: &[u8]) -> Option<usize> {
        self.entries.binary_search_by(|e| (*e.path).cmp(path)).ok()
    }

    pub(crate) fn find(&self, path: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| (*e.path).cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The canonical TOML text.
    pub fn to_toml(&self) -> String {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 160);
        self.write_toml(&mut out).expect("writing to memory");
        String::from_utf8(out).expect("manifests are UTF-8")
    }

    /// Writes the canonical TOML text, entry by entry (a million-entry manifest is ~200 MB of
    /// text; it is never held in memory whole).
    pub fn write_toml(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        self.write_toml_with_digest(out, &self.digest())
    }

    /// [`Manifest::write_toml`], where the caller has the digest already.
    pub(crate) fn write_toml_with_digest(
        &self,
        out: &mut impl std::io::Write,
        digest: &Hash,
    ) -> std::io::Result<()> {
        writeln!(out, "# treeswap tree manifest; see FORMAT.md")?;
        writeln!(out, "format = {FORMAT}")?;
        if let Some(v) = &self.version {
            writeln!(out, "version = \"{v}\"")?;
        }
        writeln!(out, "digest = \"{}\"", hex::encode(digest))?;
        writeln!(out, "count = {}", self.entries.len())?;
        writeln!(out, "entries = [")?;
        let mut line = String::with_capacity(512);
        for e in &self.entries {
            line.clear();
            write_entry(&mut line, e);
            line.push_str(",\n");
            out.write_all(line.as_bytes())?;
        }
        writeln!(out, "]")
    }
}

/// Checks that sorted entries form a tree.
pub(crate) fn check_tree(entries: &[Entry]) -> Result<()> {
    match entries.first() {
        Some(e) if &*e.path == b"." && e.is_dir() => {}
        Some(e) if &*e.path == b"." => bail!("the top of the tree (`.`) must be a directory"),
        _ => bail!("the tree has no top directory entry (`.`)"),
    }
    // Directories seen so far; since entries are sorted and a parent is a prefix of its
    // children, a parent always comes before its children.
    let mut dirs: rustc_hash::FxHashSet<&[u8]> = rustc_hash::FxHashSet::default();
    dirs.insert(b".");
    for w in entries.windows(2) {
        if w[0].path == w[1].path {
            bail!("the path `{}` is listed twice", w[1].display());
        }
        if w[0].path > w[1].path {
            bail!("entries are not sorted at `{}`", w[1].display());
        }
    }
    // Paths were validated when they were parsed or read from a directory.
    for e in &entries[1..] {
        let parent: &[u8] = match e.path.iter().rposition(|&b| b == b'/') {
            Some(i) => &e.path[..i],
            None => b".",
        };
        if !dirs.contains(parent) {
            bail!(
                "`{}` is listed but its parent `{}` is not a directory of the tree",
                e.display(),
                crate::core::path::display(parent)
            );
        }
        if e.is_dir() {
            dirs.insert(&e.path);
        }
    }
    Ok(())
}

/// The tree digest's hasher before the first entry.
fn digest_start(count: u64) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"treeswap-tree-v1\0");
    h.update(count.to_be_bytes());
    h
}

/// sha256 over the canonical binary encoding of sorted entries (FORMAT.md, "Tree digest").
pub fn tree_digest(entries: &[Entry]) -> Hash {
    let mut h = digest_start(entries.len() as u64);
    let mut buf = Vec::with_capacity(256);
    for e in entries {
        buf.clear();
        encode_entry(&mut buf, e);
        h.update(&buf);
    }
    h.finalize().into()
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
    buf.extend_from_slice(b);
}

/// The canonical binary encoding of one entry, used by the tree digest.
pub(crate) fn encode_entry(buf: &mut Vec<u8>, e: &Entry) {
    put_bytes(buf, &e.path);
    buf.push(e.kind.code());
    e.meta.encode(buf);
    match &e.kind {
        Kind::Dir | Kind::Fifo => {}
        Kind::File { size, sha256 } => {
            buf.extend_from_slice(&size.to_be_bytes());
            buf.extend_from_slice(sha256);
        }
        Kind::Symlink { target } => put_bytes(buf, target),
        Kind::Char { major, minor } | Kind::Block { major, minor } => {
            buf.extend_from_slice(&major.to_be_bytes());
            buf.extend_from_slice(&minor.to_be_bytes());
        }
    }
}

/// Appends the lowercase hex of `bytes` to `out`.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

/// Writes one entry as a one-line TOML inline table, keys in canonical order.
pub(crate) fn write_entry(out: &mut String, e: &Entry) {
    out.push_str("{ path = \"");
    crate::core::path::push_path(out, &e.path);
    out.push_str("\", type = \"");
    out.push_str(e.kind.name());
    out.push('"');
    if !matches!(e.kind, Kind::Symlink { .. }) {
        let _ = write!(out, ", mode = 0o{:o}", e.meta.mode);
    }
    let _ = write!(out, ", uid = {}, gid = {}", e.meta.uid, e.meta.gid);
    match &e.kind {
        Kind::Dir | Kind::Fifo => {}
        Kind::File { size, sha256 } => {
            let _ = write!(out, ", size = {size}, sha256 = \"");
            push_hex(out, sha256);
            out.push('"');
        }
        Kind::Symlink { target } => {
            out.push_str(", target = \"");
            crate::core::path::push_path(out, target);
            out.push('"');
        }
        Kind::Char { major, minor } | Kind::Block { major, minor } => {
            let _ = write!(out, ", major = {major}, minor = {minor}");
        }
    }
    if !e.meta.xattrs.is_empty() {
        out.push_str(", xattrs = { ");
        for (i, (k, v)) in e.meta.xattrs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push('"');
            crate::core::path::push_path(out, k);
            out.push_str("\" = \"");
            push_hex(out, v);
            out.push('"');
        }
        out.push_str(" }");
    }
    out.push_str(" }");
}
