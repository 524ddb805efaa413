//! Whole-tree manifests: what a tree is, entry by entry, and its digest.
//!
//! Parsing and writing are pure: they take and give text, never touch the disk. The text is a
//! strict subset of TOML that treeswap writes in one canonical shape (one inline table per
//! entry, on its own line) so it can be read by stock TOML tools and parsed here line by line in
//! constant memory per entry. FORMAT.md is the reference.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::BufRead;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::core::object::{Hash, Meta, ObjectId, object_id};
use crate::core::path::{decode_path, validate_path};

/// The manifest format version; see FORMAT.md for what changes it.
pub const FORMAT: u32 = 1;

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
    pub fn name(&self) -> &'static str {
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
    pub fn object(&self) -> Option<ObjectId> {
        match &self.kind {
            Kind::File { size, sha256 } => Some(object_id(&self.meta, *size, sha256)),
            _ => None,
        }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir)
    }
    pub fn display(&self) -> String {
        crate::core::path::display(&self.path)
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
    pub fn normalize(&mut self) -> Result<()> {
        self.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        check_tree(&self.entries)
    }

    /// The tree digest (FORMAT.md, "Tree digest").
    pub fn digest(&self) -> Hash {
        tree_digest(&self.entries)
    }

    /// The index of the entry at `path`.
    pub fn index(&self, path: &[u8]) -> Option<usize> {
        self.entries.binary_search_by(|e| (*e.path).cmp(path)).ok()
    }

    pub fn find(&self, path: &[u8]) -> Option<&Entry> {
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
    pub fn write_toml_with_digest(
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
pub fn check_tree(entries: &[Entry]) -> Result<()> {
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

/// sha256 over the canonical binary encoding of sorted entries (FORMAT.md, "Tree digest").
/// The tree digest's hasher before the first entry.
fn digest_start(count: u64) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"treeswap-tree-v1\0");
    h.update(count.to_be_bytes());
    h
}

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
pub fn encode_entry(buf: &mut Vec<u8>, e: &Entry) {
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
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

/// Writes one entry as a one-line TOML inline table, keys in canonical order.
pub fn write_entry(out: &mut String, e: &Entry) {
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

/// A value in the TOML subset: a string, an integer or an inline table of strings. Strings
/// borrow from the line unless they hold escapes.
#[derive(Debug)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Int(u64),
    Table(Vec<(Cow<'a, str>, Cow<'a, str>)>),
}

/// A tiny cursor over one line of the TOML subset.
pub struct Cursor<'a> {
    text: &'a str,
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(s: &'a str) -> Self {
        Cursor {
            text: s,
            s: s.as_bytes(),
            i: 0,
        }
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] == b' ' || self.s[self.i] == b'\t') {
            self.i += 1;
        }
    }
    pub fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    pub fn expect(&mut self, c: u8) -> Result<()> {
        if !self.eat(c) {
            bail!("expected `{}` at column {}", c as char, self.i + 1);
        }
        Ok(())
    }
    pub fn at_end(&mut self) -> bool {
        self.ws();
        self.i >= self.s.len() || self.s[self.i] == b'#'
    }
    pub fn key(&mut self) -> Result<Cow<'a, str>> {
        self.ws();
        if self.s.get(self.i) == Some(&b'"') {
            return self.string();
        }
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || matches!(self.s[self.i], b'_' | b'-'))
        {
            self.i += 1;
        }
        if start == self.i {
            bail!("expected a key at column {}", self.i + 1);
        }
        Ok(Cow::Borrowed(&self.text[start..self.i]))
    }
    /// A TOML basic string. Only the escapes treeswap writes plus the common ones are accepted.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.i;
        // The common case: no escapes, borrowed as it is.
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(Cow::Borrowed(&self.text[start..self.i - 1]));
                }
                b'\\' => break,
                c if c < 0x20 || c == 0x7f => bail!("control character in string"),
                _ => self.i += 1,
            }
        }
        let mut out = self.s[start..self.i].to_vec();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                bail!("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        bail!("unterminated escape");
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'u' => {
                            let hexs =
                                self.s.get(self.i..self.i + 4).context("short \\u escape")?;
                            let n = u32::from_str_radix(std::str::from_utf8(hexs)?, 16)
                                .context("bad \\u escape")?;
                            let ch = char::from_u32(n).context("bad \\u escape")?;
                            let mut b = [0; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                            self.i += 4;
                        }
                        _ => bail!("unsupported escape `\\{}`", e as char),
                    }
                }
                c if c < 0x20 || c == 0x7f => bail!("control character in string"),
                c => out.push(c),
            }
        }
        Ok(Cow::Owned(
            String::from_utf8(out).context("string is not UTF-8")?,
        ))
    }
    pub fn int(&mut self) -> Result<u64> {
        self.ws();
        let rest = &self.s[self.i..];
        let (radix, skip) = if rest.starts_with(b"0o") {
            (8, 2)
        } else if rest.starts_with(b"0x") {
            (16, 2)
        } else {
            (10, 0)
        };
        let start = self.i + skip;
        let mut end = start;
        while end < self.s.len() && (self.s[end] as char).is_digit(radix) {
            end += 1;
        }
        if end == start {
            bail!("expected an integer at column {}", self.i + 1);
        }
        let n =
            u64::from_str_radix(&self.text[start..end], radix).context("integer out of range")?;
        self.i = end;
        Ok(n)
    }
    pub fn value(&mut self) -> Result<Value<'a>> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b'{') => {
                self.i += 1;
                let mut t = Vec::new();
                if self.eat(b'}') {
                    return Ok(Value::Table(t));
                }
                loop {
                    let k = self.key()?;
                    self.expect(b'=')?;
                    let v = self.string()?;
                    t.push((k, v));
                    if self.eat(b'}') {
                        break;
                    }
                    self.expect(b',')?;
                }
                Ok(Value::Table(t))
            }
            Some(c) if c.is_ascii_digit() => Ok(Value::Int(self.int()?)),
            _ => bail!("expected a value at column {}", self.i + 1),
        }
    }
    /// `{ k = v, ... }` as a list of pairs.
    pub fn inline_table(&mut self) -> Result<Vec<(Cow<'a, str>, Value<'a>)>> {
        self.expect(b'{')?;
        let mut out: Vec<(Cow<'a, str>, Value<'a>)> = Vec::with_capacity(10);
        if self.eat(b'}') {
            return Ok(out);
        }
        loop {
            let k = self.key()?;
            self.expect(b'=')?;
            let v = self.value()?;
            if out.iter().any(|(ok, _)| *ok == k) {
                bail!("key `{k}` given twice");
            }
            out.push((k, v));
            if self.eat(b'}') {
                break;
            }
            self.expect(b',')?;
        }
        Ok(out)
    }
}

/// The fields of one inline table, taken out by name so that unknown and missing keys are
/// errors.
pub struct Fields<'a>(Vec<(Cow<'a, str>, Value<'a>)>);

impl<'a> Fields<'a> {
    pub fn new(v: Vec<(Cow<'a, str>, Value<'a>)>) -> Self {
        Fields(v)
    }
    fn take(&mut self, k: &str) -> Option<Value<'a>> {
        let i = self.0.iter().position(|(key, _)| key == k)?;
        Some(self.0.swap_remove(i).1)
    }
    pub fn str(&mut self, k: &str) -> Result<Cow<'a, str>> {
        match self.take(k) {
            Some(Value::Str(s)) => Ok(s),
            Some(_) => bail!("`{k}` must be a string"),
            None => bail!("missing `{k}`"),
        }
    }
    pub fn int(&mut self, k: &str) -> Result<u64> {
        match self.take(k) {
            Some(Value::Int(n)) => Ok(n),
            Some(_) => bail!("`{k}` must be an integer"),
            None => bail!("missing `{k}`"),
        }
    }
    pub fn u32(&mut self, k: &str) -> Result<u32> {
        u32::try_from(self.int(k)?).with_context(|| format!("`{k}` out of range"))
    }
    pub fn hash(&mut self, k: &str) -> Result<Hash> {
        parse_hash(&self.str(k)?).with_context(|| format!("`{k}`"))
    }
    pub fn table(&mut self, k: &str) -> Result<Vec<(Cow<'a, str>, Cow<'a, str>)>> {
        match self.take(k) {
            Some(Value::Table(t)) => Ok(t),
            Some(_) => bail!("`{k}` must be an inline table"),
            None => Ok(Vec::new()),
        }
    }
    pub fn finish(self) -> Result<()> {
        if let Some((k, _)) = self.0.first() {
            bail!("unknown key `{k}`");
        }
        Ok(())
    }
}

pub fn parse_hash(s: &str) -> Result<Hash> {
    // A table lookup per digit: hashes are a third of a manifest's text.
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    let mut h = [0u8; 32];
    if b.len() != 64 {
        bail!("not a sha256 in hex: `{s}`");
    }
    for (i, out) in h.iter_mut().enumerate() {
        match (nibble(b[2 * i]), nibble(b[2 * i + 1])) {
            (Some(hi), Some(lo)) => *out = hi << 4 | lo,
            _ => bail!("not a sha256 in hex: `{s}`"),
        }
    }
    Ok(h)
}

/// Parses one entry from its fields.
pub fn entry_from_fields(mut f: Fields) -> Result<Entry> {
    let path = decode_path(&f.str("path")?)?;
    let ty = f.str("type")?;
    let mode = if ty == "symlink" {
        0o777
    } else {
        f.u32("mode")?
    };
    if mode & !0o7777 != 0 {
        bail!("mode 0o{mode:o} has bits beyond 0o7777");
    }
    let uid = f.u32("uid")?;
    let gid = f.u32("gid")?;
    let kind = match &*ty {
        "dir" => Kind::Dir,
        "fifo" => Kind::Fifo,
        "file" => Kind::File {
            size: f.int("size")?,
            sha256: f.hash("sha256")?,
        },
        "symlink" => {
            let target = decode_path(&f.str("target")?)?;
            if target.is_empty() || target.contains(&0) {
                bail!("empty or NUL symlink target");
            }
            Kind::Symlink {
                target: target.into(),
            }
        }
        "char" | "block" => {
            let major = f.u32("major")?;
            let minor = f.u32("minor")?;
            if ty == "char" {
                Kind::Char { major, minor }
            } else {
                Kind::Block { major, minor }
            }
        }
        other => bail!("unknown entry type `{other}`"),
    };
    let mut xattrs = Vec::new();
    for (k, v) in f.table("xattrs")? {
        let name = decode_path(&k)?;
        if name.is_empty() || name.contains(&0) {
            bail!("empty or NUL xattr name");
        }
        let value = hex::decode(&*v).with_context(|| format!("xattr `{k}` value is not hex"))?;
        xattrs.push((name.into_boxed_slice(), value.into_boxed_slice()));
    }
    if xattrs.windows(2).any(|w| w[0].0 >= w[1].0) {
        bail!("xattrs are not sorted or repeat a name");
    }
    f.finish()?;
    if &*path != b"." {
        validate_path(&path)?;
    }
    Ok(Entry {
        path: path.into(),
        meta: Meta {
            mode,
            uid,
            gid,
            xattrs,
        },
        kind,
    })
}

/// Parses manifest text; see [`parse_reader`].
pub fn parse(text: &str) -> Result<Manifest> {
    parse_reader(text.as_bytes())
}

/// Parses one entry line: `{ ... },`.
fn entry_line(line: &[u8]) -> Result<Entry> {
    if let Some(e) = canonical_entry_line(line) {
        return Ok(e);
    }
    general_entry_line(line)
}

/// [`entry_line`] for any line of the TOML subset.
fn general_entry_line(line: &[u8]) -> Result<Entry> {
    let line = std::str::from_utf8(line).context("not UTF-8")?;
    let mut c = Cursor::new(line);
    let e = entry_from_fields(Fields::new(c.inline_table()?))?;
    c.expect(b',')?;
    if !c.at_end() {
        bail!("text after the entry");
    }
    Ok(e)
}

/// Parses an entry line written in the canonical form of [`write_entry`], for the entries
/// almost every tree is made of: directories, regular files and symlinks, without extended
/// attributes, whose strings need no escapes. About twice as fast as the general parser,
/// which loading a manifest is mostly made of. `None` for any other line, which the general
/// parser then reads: for every line this accepts, that gives the same entry (a property
/// test checks).
fn canonical_entry_line(line: &[u8]) -> Option<Entry> {
    let mut s = Scan(line);
    s.lit(b"{ path = \"")?;
    let path = s.plain()?;
    s.lit(b"\", type = \"")?;
    let ty = s.plain()?;
    s.lit(b"\"")?;
    let symlink = ty == b"symlink";
    let mode = if symlink {
        0o777
    } else {
        s.lit(b", mode = 0o")?;
        let mode = s.number(8)?;
        if mode & !0o7777 != 0 {
            return None;
        }
        mode as u32
    };
    s.lit(b", uid = ")?;
    let uid = u32::try_from(s.number(10)?).ok()?;
    s.lit(b", gid = ")?;
    let gid = u32::try_from(s.number(10)?).ok()?;
    let kind = match ty {
        b"dir" => Kind::Dir,
        b"file" => {
            s.lit(b", size = ")?;
            let size = s.number(10)?;
            s.lit(b", sha256 = \"")?;
            let sha256 = s.hash()?;
            s.lit(b"\"")?;
            Kind::File { size, sha256 }
        }
        _ if symlink => {
            s.lit(b", target = \"")?;
            let target = s.plain()?;
            s.lit(b"\"")?;
            if target.is_empty() {
                return None;
            }
            Kind::Symlink {
                target: target.into(),
            }
        }
        _ => return None,
    };
    s.lit(b" },")?;
    if !s.0.is_empty() || (path != b"." && validate_path(path).is_err()) {
        return None;
    }
    Some(Entry {
        path: path.into(),
        meta: Meta {
            mode,
            uid,
            gid,
            xattrs: Vec::new(),
        },
        kind,
    })
}

/// The rest of a canonical entry line, for [`canonical_entry_line`].
struct Scan<'a>(&'a [u8]);

impl<'a> Scan<'a> {
    fn lit(&mut self, want: &[u8]) -> Option<()> {
        self.0 = self.0.strip_prefix(want)?;
        Some(())
    }
    /// A string's text up to its closing quote, if it is all printable ASCII and needs no
    /// decoding (no `\` escape, no `%` escape).
    fn plain(&mut self) -> Option<&'a [u8]> {
        let n = self
            .0
            .iter()
            .position(|&b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\' || b == b'%')?;
        if self.0[n] != b'"' {
            return None;
        }
        let (text, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(text)
    }
    /// A number without a leading zero (but `0`), in `radix` (8 or 10).
    fn number(&mut self, radix: u64) -> Option<u64> {
        let n = self
            .0
            .iter()
            .position(|&b| !(b'0'..b'0' + radix as u8).contains(&b))
            .unwrap_or(self.0.len());
        let digits = &self.0[..n];
        if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let mut v: u64 = 0;
        for &d in digits {
            v = v.checked_mul(radix)?.checked_add(u64::from(d - b'0'))?;
        }
        self.0 = &self.0[n..];
        Some(v)
    }
    /// 64 lowercase hex digits.
    fn hash(&mut self) -> Option<Hash> {
        /// Each byte's value as a lowercase hex digit, or 0xff.
        const NIBBLE: [u8; 256] = {
            let mut t = [0xffu8; 256];
            let mut c = 0;
            while c < 16 {
                t[b"0123456789abcdef"[c] as usize] = c as u8;
                c += 1;
            }
            t
        };
        let digits = self.0.get(..64)?;
        let mut h = [0u8; 32];
        // No branch per digit: a bad digit sets high bits in `bad`.
        let mut bad = 0u8;
        for (out, pair) in h.iter_mut().zip(digits.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
            bad |= hi | lo;
            *out = hi << 4 | lo;
        }
        if bad > 0xf {
            return None;
        }
        self.0 = &self.0[64..];
        Some(h)
    }
}

/// Parses a tree manifest and checks its stored digest and count against its entries.
///
/// The text is read in blocks of a few MiB; within a block, runs of entry lines are parsed
/// in parallel, so a million entries load in well under two seconds with memory for the
/// entries plus one block.
pub fn parse_reader(r: impl BufRead) -> Result<Manifest> {
    let (m, want) = parse_reader_unverified(r)?;
    check_tree(&m.entries)?;
    check_digest(&want, &m.digest())?;
    Ok(m)
}

/// The error for a manifest whose entries do not give its declared digest.
fn check_digest(want: &Hash, got: &Hash) -> Result<()> {
    if got != want {
        bail!(
            "manifest digest mismatch: declared {}, entries give {}",
            hex::encode(want),
            hex::encode(got)
        );
    }
    Ok(())
}

/// [`parse_reader`] without the tree check and the digest check, which cost a pass over every
/// entry: for a manifest whose entries are checked otherwise (`apply` checks the digest of
/// the tree it composes from it). Checks the declared count; returns the declared digest.
pub fn parse_reader_unverified(r: impl BufRead) -> Result<(Manifest, Hash)> {
    let mut entries: Vec<Entry> = Vec::new();
    let h = read_blocks(r, &mut |_, block| {
        entries.extend(block);
        Ok(())
    })?;
    let m = Manifest {
        version: h.version,
        entries,
    };
    if h.count != Some(m.entries.len() as u64) {
        bail!(
            "manifest declares {:?} entries but has {}",
            h.count,
            m.entries.len()
        );
    }
    let want = h.digest.context("manifest has no `digest`")?;
    Ok((m, want))
}

/// What a manifest's header declares.
#[derive(Debug)]
pub struct Header {
    pub version: Option<String>,
    pub digest: Option<Hash>,
    pub count: Option<u64>,
}

/// Reads a stored tree manifest without keeping it: `sink` gets its entries in order, a block
/// (a few thousand) at a time. Checks the format, that paths are sorted and unique, and the
/// declared count and digest (which must come before the entries, as treeswap writes them);
/// not that the entries form a tree, which needs them all ([`parse_reader`] does).
pub fn stream_reader(
    r: impl BufRead,
    sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>,
) -> Result<Header> {
    let mut hasher: Option<Sha256> = None;
    let mut n = 0u64;
    let mut last: Option<Box<[u8]>> = None;
    let mut buf = Vec::with_capacity(256);
    let h = read_blocks(r, &mut |count, block| {
        let count = count.context("the manifest's `count` must come before its entries")?;
        let hs = hasher.get_or_insert_with(|| digest_start(count));
        for e in &block {
            if last.as_ref().is_some_and(|l| *l >= e.path) {
                bail!("manifest entries are not sorted at `{}`", e.display());
            }
            last = Some(e.path.clone());
            buf.clear();
            encode_entry(&mut buf, e);
            hs.update(&buf);
            n += 1;
        }
        sink(block)
    })?;
    if h.count != Some(n) {
        bail!("manifest declares {:?} entries but has {n}", h.count);
    }
    let want = h.digest.context("manifest has no `digest`")?;
    let got: Hash = hasher.unwrap_or_else(|| digest_start(0)).finalize().into();
    check_digest(&want, &got)?;
    Ok(h)
}

/// The line reader under [`parse_reader`] and [`stream_reader`]: parses the header and hands
/// the entries to `sink` in blocks, with the count declared so far; checks the format and
/// that `entries` is closed.
fn read_blocks(
    mut r: impl BufRead,
    sink: &mut dyn FnMut(Option<u64>, Vec<Entry>) -> Result<()>,
) -> Result<Header> {
    use rayon::prelude::*;
    use std::io::Read;
    const BLOCK: u64 = 4 << 20;
    let mut version = None;
    let mut digest = None;
    let mut count = None;
    let mut format = None;
    let mut in_entries = false;
    let mut seen: Vec<String> = Vec::new();
    let mut closed = false;
    let mut line_no = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let n = (&mut r)
            .take(BLOCK)
            .read_to_end(&mut buf)
            .with_context(|| format!("after line {line_no}"))?;
        let eof = n == 0;
        let cut = if eof {
            buf.len()
        } else {
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(p) => p + 1,
                // A line longer than a block: read on.
                None => continue,
            }
        };
        let mut batch: Vec<(usize, &[u8])> = Vec::new();
        let flush = |batch: &mut Vec<(usize, &[u8])>,
                     count: Option<u64>,
                     sink: &mut dyn FnMut(Option<u64>, Vec<Entry>) -> Result<()>|
         -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let parsed: Result<Vec<Entry>> = batch
                .par_iter()
                .map(|(n, l)| entry_line(l).with_context(|| format!("manifest line {n}")))
                .collect();
            batch.clear();
            sink(count, parsed?)
        };
        for raw in buf[..cut].split(|&b| b == b'\n') {
            line_no += 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if in_entries && raw.first() == Some(&b'{') {
                batch.push((line_no, raw));
                continue;
            }
            flush(&mut batch, count, sink)?;
            let res: Result<()> = (|| {
                let line = std::str::from_utf8(raw).context("not UTF-8")?;
                let mut c = Cursor::new(line);
                if c.at_end() {
                    return Ok(());
                }
                if closed {
                    bail!("text after the end of `entries`");
                }
                if in_entries {
                    if c.eat(b']') {
                        closed = true;
                        in_entries = false;
                        if !c.at_end() {
                            bail!("text after `]`");
                        }
                        return Ok(());
                    }
                    bail!("expected an entry or `]`");
                }
                let key = c.key()?.into_owned();
                c.expect(b'=')?;
                if seen.contains(&key) {
                    bail!("`{key}` given twice");
                }
                seen.push(key.clone());
                match key.as_str() {
                    "entries" => {
                        c.expect(b'[')?;
                        in_entries = true;
                    }
                    "format" => format = Some(c.int()?),
                    "version" => {
                        let v = c.string()?.into_owned();
                        crate::core::version::validate(&v)?;
                        version = Some(v);
                    }
                    "digest" => digest = Some(parse_hash(&c.string()?)?),
                    "count" => count = Some(c.int()?),
                    other => bail!("unknown key `{other}`"),
                }
                if !c.at_end() {
                    bail!("text after the value");
                }
                Ok(())
            })();
            res.with_context(|| format!("manifest line {line_no}"))?;
        }
        flush(&mut batch, count, sink)?;
        drop(batch);
        // `split` yields one empty piece after the last newline; it is not a line.
        if cut > 0 && buf[cut - 1] == b'\n' {
            line_no -= 1;
        }
        buf.drain(..cut);
        if eof {
            break;
        }
    }
    if !closed {
        bail!("manifest is truncated: `entries` is not closed");
    }
    match format {
        Some(f) if f == FORMAT as u64 => {}
        Some(f) => bail!("manifest format {f} is not supported (this treeswap reads {FORMAT})"),
        None => bail!("manifest has no `format`"),
    }
    Ok(Header {
        version,
        digest,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let meta = |mode| Meta {
            mode,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        };
        let mut m = Manifest {
            version: Some("1".into()),
            entries: vec![
                Entry {
                    path: (*b".").into(),
                    meta: meta(0o755),
                    kind: Kind::Dir,
                },
                Entry {
                    path: (*b"a\nb\xff").into(),
                    meta: Meta {
                        mode: 0o4755,
                        uid: 1,
                        gid: 2,
                        xattrs: vec![((*b"user.x").into(), (*b"\0\x01").into())],
                    },
                    kind: Kind::File {
                        size: 3,
                        sha256: [7; 32],
                    },
                },
                Entry {
                    path: (*b"l").into(),
                    meta: meta(0o777),
                    kind: Kind::Symlink {
                        target: (*b"../%x\"").into(),
                    },
                },
            ],
        };
        m.normalize().unwrap();
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let text = m.to_toml();
        let back = parse(&text).unwrap();
        assert_eq!(back, m);
        // The canonical text, byte for byte (FORMAT.md): escapes, xattrs, symlinks.
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
        assert_eq!(
            lines,
            [
                r#"{ path = ".", type = "dir", mode = 0o755, uid = 0, gid = 0 },"#,
                concat!(
                    r#"{ path = "a%0Ab%FF", type = "file", mode = 0o4755, uid = 1, gid = 2, "#,
                    r#"size = 3, sha256 = "0707070707070707070707070707070707070707070707070707070707070707", "#,
                    r#"xattrs = { "user.x" = "0001" } },"#
                ),
                r#"{ path = "l", type = "symlink", uid = 0, gid = 0, target = "../%25x%22" },"#,
            ]
        );
        // Stock TOML readers accept the text too.
        let v: toml::Table = text.parse().unwrap();
        assert_eq!(v["entries"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn tampered_digest_is_refused() {
        let text = sample().to_toml().replace("size = 3", "size = 4");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("digest mismatch"), "{err}");
    }

    #[test]
    fn truncated_is_refused() {
        let text = sample().to_toml();
        for cut in [10, text.len() / 2, text.len() - 3] {
            assert!(parse(&text[..cut]).is_err());
        }
    }

    #[test]
    fn streaming_reads_what_parsing_reads_and_checks_the_same() {
        let m = sample();
        let text = m.to_toml();
        let stream = |text: &str| -> Result<(Header, Vec<Entry>)> {
            let mut got = Vec::new();
            let h = stream_reader(text.as_bytes(), &mut |block| {
                got.extend(block);
                Ok(())
            })?;
            Ok((h, got))
        };
        let (h, got) = stream(&text).unwrap();
        assert_eq!(got, m.entries);
        assert_eq!(h.digest, Some(m.digest()));
        assert_eq!(h.count, Some(m.entries.len() as u64));
        let err = format!(
            "{:#}",
            stream(&text.replace("size = 3", "size = 4")).unwrap_err()
        );
        assert!(err.contains("digest mismatch"), "{err}");
        // Two entry lines swapped: out of order.
        let mut lines: Vec<&str> = text.lines().collect();
        let first = lines.iter().position(|l| l.starts_with('{')).unwrap();
        lines.swap(first + 1, first + 2);
        let err = format!("{:#}", stream(&lines.join("\n")).unwrap_err());
        assert!(err.contains("not sorted"), "{err}");
        for cut in [10, text.len() / 2, text.len() - 3] {
            assert!(stream(&text[..cut]).is_err());
        }
    }

    /// Fixed cases of the property below, run every time: every kind, every escape, the
    /// largest numbers, an xattr, names that are nearly `.` and `..`; and whether the canonical
    /// fast path reads the line.
    #[test]
    fn written_lines_of_fixed_entries_parse_back() {
        let e = |path: &[u8], mode, xattrs: &[(&[u8], &[u8])], kind| Entry {
            path: path.into(),
            meta: Meta {
                mode,
                uid: u32::MAX,
                gid: 0,
                xattrs: xattrs.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            },
            kind,
        };
        let file = Kind::File {
            size: u64::MAX,
            sha256: [0xff; 32],
        };
        let symlink = |t: &[u8]| Kind::Symlink { target: t.into() };
        let (major, minor) = (u32::MAX, 0);
        let block = Kind::Block {
            major: minor,
            minor: major,
        };
        let cases = [
            (e(b".", 0o7777, &[], Kind::Dir), true),
            (e(b"usr/bin/...", 0o4755, &[], file.clone()), true),
            (e(b".a/..b/c.", 0, &[(b"user.a", b"\0\xff")], file), false),
            (e(b" %\"\\\n\x7f\xc3\xa9\xff", 0o644, &[], Kind::Dir), false),
            (e(b"l", 0o777, &[], symlink(b"../%x\"")), false),
            (e(b"l2", 0o777, &[], symlink(b"../lib/x.so.1")), true),
            (e(b"dev/c", 0o600, &[], Kind::Char { major, minor }), false),
            (e(b"dev/b", 0, &[], block), false),
            (e(b"p", 0o644, &[], Kind::Fifo), false),
        ];
        for (entry, fast) in cases {
            let mut line = String::new();
            write_entry(&mut line, &entry);
            line.push(',');
            let general =
                general_entry_line(line.as_bytes()).unwrap_or_else(|err| panic!("{line}: {err:#}"));
            assert_eq!(general, entry, "{line}");
            let f = canonical_entry_line(line.as_bytes());
            assert_eq!(f.is_some(), fast, "fast path on {line}");
            if let Some(f) = f {
                assert_eq!(f, entry, "{line}");
            }
        }
    }

    /// Entries of every kind, with paths and targets that need escapes or not.
    fn any_entry() -> impl proptest::strategy::Strategy<Value = Entry> {
        use proptest::prelude::*;
        let name = proptest::collection::vec(
            prop_oneof![
                8 => proptest::sample::select(b"abcz.-_09".to_vec()),
                1 => proptest::sample::select(b" %\"\\\n\x7f\xc3\xa9\xff".to_vec()),
            ],
            1..6,
        );
        let path = prop_oneof![
            1 => Just(b".".to_vec()),
            9 => proptest::collection::vec(name.clone(), 1..4).prop_map(|parts| parts.join(&b'/')),
        ];
        let kind = prop_oneof![
            Just(Kind::Dir),
            Just(Kind::Fifo),
            (any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(size, sha256)| Kind::File { size, sha256 }),
            name.prop_map(|t| Kind::Symlink { target: t.into() }),
            (any::<u32>(), any::<u32>()).prop_map(|(major, minor)| Kind::Char { major, minor }),
        ];
        let xattrs = proptest::collection::vec((Just(b"user.a".to_vec()), any::<Vec<u8>>()), 0..2);
        (path, kind, 0u32..0o10000, any::<u32>(), 0u32..3, xattrs).prop_map(
            |(path, kind, mode, uid, gid, xattrs)| {
                let mode = if matches!(kind, Kind::Symlink { .. }) {
                    0o777
                } else {
                    mode
                };
                Entry {
                    path: path.into(),
                    meta: Meta {
                        mode,
                        uid,
                        gid,
                        xattrs: xattrs
                            .into_iter()
                            .map(|(k, v)| (k.into(), v.into()))
                            .collect(),
                    },
                    kind,
                }
            },
        )
    }

    proptest::proptest! {
        /// The canonical fast path reads what it accepts as the general parser does, and
        /// accepts every plain entry `write_entry` writes.
        #[test]
        fn canonical_lines_parse_as_the_general_parser_parses_them(
            e in any_entry(),
            edits in proptest::collection::vec((0usize..400, 0u8..128), 0..3),
        ) {
            let mut line = String::new();
            write_entry(&mut line, &e);
            line.push(',');
            let mut line = line.into_bytes();
            let general = general_entry_line(&line);
            // Every line `write_entry` writes parses, unless the entry's path is invalid (the
            // generator makes `.` and `..` components now and then), which must be refused.
            let valid = &*e.path == b"." || validate_path(&e.path).is_ok();
            proptest::prop_assert_eq!(general.is_ok(), valid, "{}: {:?}", String::from_utf8_lossy(&line), general);
            if general.is_ok() {
                proptest::prop_assert_eq!(general.as_ref().unwrap(), &e);
            }
            let fast = canonical_entry_line(&line);
            let plain = |b: &[u8]| b.iter().all(|&c| (b' '..=b'~').contains(&c) && !b"\"\\%".contains(&c));
            let expect_fast = general.is_ok()
                && e.meta.xattrs.is_empty()
                && plain(&e.path)
                && match &e.kind {
                    Kind::Dir | Kind::File { .. } => true,
                    Kind::Symlink { target } => plain(target),
                    _ => false,
                };
            proptest::prop_assert_eq!(fast.is_some(), expect_fast, "{}", String::from_utf8_lossy(&line));
            if let Some(f) = fast {
                proptest::prop_assert_eq!(&f, &e);
            }
            // Damaged lines: the fast path refuses them or agrees with the general parser.
            for (i, b) in edits {
                if line.is_empty() { break; }
                let i = i % line.len();
                line[i] = b;
                if let Some(f) = canonical_entry_line(&line) {
                    let g = general_entry_line(&line);
                    proptest::prop_assert!(g.is_ok(), "{}: fast {:?}, general {:?}", String::from_utf8_lossy(&line), f, g);
                    proptest::prop_assert_eq!(f, g.unwrap());
                }
            }
        }
    }
}
