//! The manifest reader: whole manifests from a [`BufRead`], in blocks of a few MiB whose entry
//! lines are parsed in parallel.

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::canonical::canonical_entry_line;
use super::text::{Cursor, HeaderReader, general_entry_line};
use super::{Entry, FORMAT, Manifest, check_tree, digest_start, encode_entry};
use crate::core::object::Hash;

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
pub(crate) fn parse_reader_unverified(r: impl BufRead) -> Result<(Manifest, Hash)> {
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
#[derive(Debug, Default)]
pub(crate) struct Header {
    pub version: Option<String>,
    pub digest: Option<Hash>,
    pub count: Option<u64>,
}

/// Reads a stored tree manifest without keeping it: `sink` gets its entries in order, a block
/// (a few thousand) at a time. Checks the format, that paths are sorted and unique, and the
/// declared count and digest (which must come before the entries, as treeswap writes them);
/// not that the entries form a tree, which needs them all ([`parse_reader`] does).
pub(crate) fn stream_reader(
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
    let mut lines = Lines {
        top: HeaderReader::new("manifest", FORMAT, &["entries"], true),
        header: Header::default(),
        line_no: 0,
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some((cut, eof)) = next_block(&mut r, &mut buf, lines.line_no)? else {
            continue;
        };
        lines.block(&buf[..cut], sink)?;
        buf.drain(..cut);
        if eof {
            break;
        }
    }
    lines.top.finish()?;
    Ok(lines.header)
}

/// How much text [`read_blocks`] reads at a time.
const BLOCK: u64 = 4 << 20;

/// Appends up to a block of `r` to `buf`. Returns how much of `buf` is whole lines (all of it
/// once the input has ended) and whether it has; `None` when no line ends in `buf` yet (a
/// line longer than a block) and more must be read.
fn next_block(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    line_no: usize,
) -> Result<Option<(usize, bool)>> {
    use std::io::Read;
    let n = Read::by_ref(r)
        .take(BLOCK)
        .read_to_end(buf)
        .with_context(|| format!("after line {line_no}"))?;
    if n == 0 {
        return Ok(Some((buf.len(), true)));
    }
    Ok(buf
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|p| (p + 1, false)))
}

/// [`read_blocks`]'s state from block to block.
struct Lines {
    top: HeaderReader,
    header: Header,
    /// The number of the last line read.
    line_no: usize,
}

impl Lines {
    /// Reads the lines of `text`, whole lines: runs of entry lines go to `sink` parsed in
    /// parallel, other lines are read one by one.
    fn block(
        &mut self,
        text: &[u8],
        sink: &mut dyn FnMut(Option<u64>, Vec<Entry>) -> Result<()>,
    ) -> Result<()> {
        let mut batch: Vec<(usize, &[u8])> = Vec::new();
        for raw in text.split(|&b| b == b'\n') {
            self.line_no += 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if self.top.in_list() && raw.first() == Some(&b'{') {
                batch.push((self.line_no, raw));
                continue;
            }
            flush(&mut batch, self.header.count, sink)?;
            self.header_line(raw)
                .with_context(|| format!("manifest line {}", self.line_no))?;
        }
        flush(&mut batch, self.header.count, sink)?;
        // `split` yields one empty piece after the last newline; it is not a line.
        if text.last() == Some(&b'\n') {
            self.line_no -= 1;
        }
        Ok(())
    }

    /// Reads a line that is not an entry line: a header line, or the end of `entries`.
    fn header_line(&mut self, raw: &[u8]) -> Result<()> {
        let line = std::str::from_utf8(raw).context("not UTF-8")?;
        let header = &mut self.header;
        if self
            .top
            .line(line, &mut |key, c| header.value(key, c))?
            .is_some()
        {
            bail!("expected an entry or `]`");
        }
        Ok(())
    }
}

impl Header {
    /// Reads the value of a header key.
    fn value(&mut self, key: &str, c: &mut Cursor) -> Result<()> {
        match key {
            "version" => self.version = Some(c.version()?),
            "digest" => self.digest = Some(c.hash()?),
            "count" => self.count = Some(c.int()?),
            other => bail!("unknown key `{}`", crate::core::path::quote(other)),
        }
        Ok(())
    }
}

/// Parses a run of entry lines in parallel and hands them to `sink`; empties `batch`.
fn flush(
    batch: &mut Vec<(usize, &[u8])>,
    count: Option<u64>,
    sink: &mut dyn FnMut(Option<u64>, Vec<Entry>) -> Result<()>,
) -> Result<()> {
    use rayon::prelude::*;
    if batch.is_empty() {
        return Ok(());
    }
    let parsed: Result<Vec<Entry>> = batch
        .par_iter()
        .map(|(n, l)| entry_line(l).with_context(|| format!("manifest line {n}")))
        .collect();
    batch.clear();
    sink(count, parsed?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Kind;
    use crate::core::object::Meta;

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
}
