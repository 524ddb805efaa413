//! The reader of the TOML subset both manifests are written in (the tree manifest and the
//! delta manifest): a cursor over one line, the fields of an inline table, and an entry read
//! from its fields.

use std::borrow::Cow;

use anyhow::{Context, Result, bail};

use super::{Entry, Kind};
use crate::core::object::{Hash, Meta};
use crate::core::path::{decode_path, quote, validate_path};

/// A value in the TOML subset: a string, an integer or an inline table of strings. Strings
/// borrow from the line unless they hold escapes.
#[derive(Debug)]
pub(crate) enum Value<'a> {
    Str(Cow<'a, str>),
    Int(u64),
    Table(Vec<(Cow<'a, str>, Cow<'a, str>)>),
}

/// A tiny cursor over one line of the TOML subset.
pub(crate) struct Cursor<'a> {
    text: &'a str,
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(s: &'a str) -> Self {
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
    pub(crate) fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    pub(crate) fn expect(&mut self, c: u8) -> Result<()> {
        if !self.eat(c) {
            bail!("expected `{}` at column {}", c as char, self.i + 1);
        }
        Ok(())
    }
    pub(crate) fn at_end(&mut self) -> bool {
        self.ws();
        self.i >= self.s.len() || self.s[self.i] == b'#'
    }
    pub(crate) fn key(&mut self) -> Result<Cow<'a, str>> {
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
    pub(crate) fn string(&mut self) -> Result<Cow<'a, str>> {
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
    pub(crate) fn int(&mut self) -> Result<u64> {
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
    /// A string holding a version (FORMAT.md, "Versions").
    pub(crate) fn version(&mut self) -> Result<String> {
        let v = self.string()?.into_owned();
        crate::core::version::validate(&v)?;
        Ok(v)
    }
    /// A string holding a sha256 in hex.
    pub(crate) fn hash(&mut self) -> Result<Hash> {
        parse_hash(&self.string()?)
    }
    pub(crate) fn value(&mut self) -> Result<Value<'a>> {
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
    pub(crate) fn inline_table(&mut self) -> Result<Vec<(Cow<'a, str>, Value<'a>)>> {
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
                bail!("key `{}` given twice", quote(&*k));
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

/// The top level both manifests share: blank and comment lines; `key = value` lines, each
/// key at most once; `format = N`, which must be the format this treeswap reads; and lists,
/// opened by `key = [` and closed by a line `]`, each given once. The reader of one manifest
/// reads the other keys' values and the lists' items.
pub(crate) struct HeaderReader {
    /// What is read, for messages: "manifest", "delta manifest".
    what: &'static str,
    /// The format version this treeswap reads.
    supported: u32,
    /// The keys that open a list.
    lists: &'static [&'static str],
    /// Whether nothing but blank lines may follow once every list is closed.
    lists_end: bool,
    seen: Vec<String>,
    format: Option<u64>,
    open: Option<&'static str>,
    closed: Vec<&'static str>,
}

impl HeaderReader {
    pub(crate) fn new(
        what: &'static str,
        supported: u32,
        lists: &'static [&'static str],
        lists_end: bool,
    ) -> Self {
        HeaderReader {
            what,
            supported,
            lists,
            lists_end,
            seen: Vec::new(),
            format: None,
            open: None,
            closed: Vec::new(),
        }
    }

    /// Whether a list is open: the next line is one of its items or its `]`.
    pub(crate) fn in_list(&self) -> bool {
        self.open.is_some()
    }

    /// Reads one line. A `key = value` line of a key other than `format` and the lists goes to
    /// `value` with the cursor at the value, and must end after it. A line inside a list
    /// (but its `]`) is returned, with the list's name, for the caller to read the item.
    pub(crate) fn line<'a>(
        &mut self,
        line: &'a str,
        value: &mut dyn FnMut(&str, &mut Cursor<'_>) -> Result<()>,
    ) -> Result<Option<(&'static str, Cursor<'a>)>> {
        let mut c = Cursor::new(line);
        if c.at_end() {
            return Ok(None);
        }
        if let Some(list) = self.open {
            if !c.eat(b']') {
                return Ok(Some((list, c)));
            }
            if !c.at_end() {
                bail!("text after `]`");
            }
            self.open = None;
            self.closed.push(list);
            return Ok(None);
        }
        if self.lists_end && self.closed.len() == self.lists.len() {
            bail!(
                "text after the end of `{}`",
                self.closed.last().expect("a list")
            );
        }
        let key = c.key()?;
        c.expect(b'=')?;
        if self.seen.iter().any(|k| *k == key) {
            bail!("`{}` given twice", quote(&*key));
        }
        self.seen.push(key.to_string());
        if let Some(list) = self.lists.iter().find(|l| **l == key) {
            c.expect(b'[')?;
            self.open = Some(list);
        } else if key == "format" {
            self.format = Some(c.int()?);
        } else {
            value(&key, &mut c)?;
        }
        if !c.at_end() {
            bail!("text after the value");
        }
        Ok(None)
    }

    /// Checks, after the last line, that every list was given and closed and that the format
    /// was given and is the one this treeswap reads.
    pub(crate) fn finish(self) -> Result<()> {
        let what = self.what;
        if let Some(list) = self.open {
            bail!("{what} is truncated: `{list}` is not closed");
        }
        if let Some(list) = self.lists.iter().find(|l| !self.closed.contains(l)) {
            bail!("{what} is truncated or lacks `{list}`");
        }
        match self.format {
            Some(f) if f == u64::from(self.supported) => Ok(()),
            Some(f) => bail!(
                "{what} format {f} is not supported (this treeswap reads {})",
                self.supported
            ),
            None => bail!("{what} has no `format`"),
        }
    }
}

/// The fields of one inline table, taken out by name so that unknown and missing keys are
/// errors.
pub(crate) struct Fields<'a>(Vec<(Cow<'a, str>, Value<'a>)>);

impl<'a> Fields<'a> {
    pub(crate) fn new(v: Vec<(Cow<'a, str>, Value<'a>)>) -> Self {
        Fields(v)
    }
    fn take(&mut self, k: &str) -> Option<Value<'a>> {
        let i = self.0.iter().position(|(key, _)| key == k)?;
        Some(self.0.swap_remove(i).1)
    }
    pub(crate) fn str(&mut self, k: &str) -> Result<Cow<'a, str>> {
        match self.take(k) {
            Some(Value::Str(s)) => Ok(s),
            Some(_) => bail!("`{k}` must be a string"),
            None => bail!("missing `{k}`"),
        }
    }
    pub(crate) fn int(&mut self, k: &str) -> Result<u64> {
        match self.take(k) {
            Some(Value::Int(n)) => Ok(n),
            Some(_) => bail!("`{k}` must be an integer"),
            None => bail!("missing `{k}`"),
        }
    }
    /// An optional integer key.
    pub(crate) fn opt_int(&mut self, k: &str) -> Result<Option<u64>> {
        match self.take(k) {
            Some(Value::Int(n)) => Ok(Some(n)),
            Some(_) => bail!("`{k}` must be an integer"),
            None => Ok(None),
        }
    }
    pub(crate) fn u32(&mut self, k: &str) -> Result<u32> {
        u32::try_from(self.int(k)?).with_context(|| format!("`{k}` out of range"))
    }
    pub(crate) fn hash(&mut self, k: &str) -> Result<Hash> {
        parse_hash(&self.str(k)?).with_context(|| format!("`{k}`"))
    }
    pub(crate) fn table(&mut self, k: &str) -> Result<Vec<(Cow<'a, str>, Cow<'a, str>)>> {
        match self.take(k) {
            Some(Value::Table(t)) => Ok(t),
            Some(_) => bail!("`{k}` must be an inline table"),
            None => Ok(Vec::new()),
        }
    }
    pub(crate) fn finish(self) -> Result<()> {
        if let Some((k, _)) = self.0.first() {
            bail!("unknown key `{}`", quote(&**k));
        }
        Ok(())
    }
}

pub(crate) fn parse_hash(s: &str) -> Result<Hash> {
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
        bail!("not a sha256 in hex: `{}`", quote(s));
    }
    for (i, out) in h.iter_mut().enumerate() {
        match (nibble(b[2 * i]), nibble(b[2 * i + 1])) {
            (Some(hi), Some(lo)) => *out = hi << 4 | lo,
            _ => bail!("not a sha256 in hex: `{}`", quote(s)),
        }
    }
    Ok(h)
}

/// Parses one entry from its fields.
pub(crate) fn entry_from_fields(mut f: Fields) -> Result<Entry> {
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
        other => bail!("unknown entry type `{}`", quote(other)),
    };
    let mut xattrs = Vec::new();
    for (k, v) in f.table("xattrs")? {
        let name = decode_path(&k)?;
        if name.is_empty() || name.contains(&0) {
            bail!("empty or NUL xattr name");
        }
        let value =
            hex::decode(&*v).with_context(|| format!("xattr `{}` value is not hex", quote(&*k)))?;
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

/// Parses one entry line, `{ ... },`, in any form the TOML subset allows (the general path
/// under [`super::canonical::canonical_entry_line`]).
pub(super) fn general_entry_line(line: &[u8]) -> Result<Entry> {
    let line = std::str::from_utf8(line).context("not UTF-8")?;
    let mut c = Cursor::new(line);
    let e = entry_from_fields(Fields::new(c.inline_table()?))?;
    c.expect(b',')?;
    if !c.at_end() {
        bail!("text after the entry");
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reader_refuses_what_both_manifests_refuse() {
        let read = |text: &str| -> Result<Vec<String>> {
            let mut top = HeaderReader::new("test", 1, &["list"], true);
            let mut items = Vec::new();
            for line in text.lines() {
                let mut value = |k: &str, c: &mut Cursor| -> Result<()> {
                    if k != "k" {
                        bail!("unknown key `{k}`");
                    }
                    c.int().map(drop)
                };
                if let Some((_, mut c)) = top.line(line, &mut value)? {
                    items.push(c.string()?.into_owned());
                }
            }
            top.finish()?;
            Ok(items)
        };
        let good = "# a comment\nformat = 1\nk = 2\n\nlist = [\n\"a\"\n]\n";
        assert_eq!(read(good).unwrap(), ["a"]);
        for (text, want) in [
            (
                "format = 1\nformat = 1\nlist = [\n]",
                "`format` given twice",
            ),
            (
                "format = 1\nlist = [\n]\nlist = [\n]",
                "text after the end of `list`",
            ),
            ("format = 1\nk = 1\nk = 1\nlist = [\n]", "`k` given twice"),
            ("format = 1\nj = 1\nlist = [\n]", "unknown key `j`"),
            ("format = 2\nlist = [\n]", "test format 2 is not supported"),
            ("list = [\n]", "test has no `format`"),
            ("format = 1\nlist = [\n\"a\"", "`list` is not closed"),
            ("format = 1\n", "lacks `list`"),
            ("format = 1\nk = 1 2\nlist = [\n]", "text after the value"),
            ("format = 1\nlist = [ x\n]", "text after the value"),
            ("format = 1\nlist = [\n] x", "text after `]`"),
        ] {
            let err = format!("{:#}", read(text).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
