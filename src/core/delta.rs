//! The delta format: what changes between two trees, and the bytes that change needs.
//!
//! A delta is one tar file. Its first member is `delta.toml`, the delta manifest (this
//! module's [`Delta`]); the second `delta.toml.minisig`, its minisign signature (empty when
//! unsigned); then one member `blobs/<sha256 of the content>` per content that ships bytes, in
//! the order the manifest lists them. Parsing is pure; FORMAT.md is the reference.

use std::fmt::Write as _;
use std::io::{BufRead, Read};

use anyhow::{Context, Result, bail};

use crate::core::manifest::text::{Cursor, Fields, HeaderReader, entry_from_fields};
use crate::core::manifest::{self, Entry};
use crate::core::object::Hash;
use crate::core::path::{decode_path, encode_path, validate_path};

/// The delta format version; see FORMAT.md for what changes it.
pub(crate) const FORMAT: u32 = 1;

/// The name of the first tar member.
pub(crate) const MANIFEST_MEMBER: &str = "delta.toml";
/// The name of the second tar member: the minisign signature of the first, empty if unsigned.
pub(crate) const SIGNATURE_MEMBER: &str = "delta.toml.minisig";

/// How the bytes of a content are obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The base tree already has this content (a metadata-only change): no bytes shipped.
    Base,
    /// The blob is the whole content, compressed: with zstd (`source = "zstd"`), or with xz
    /// when the content's [`Codec`] is [`Codec::Xz`] (`source = "xz"`).
    Zstd,
    /// The blob is a zstd frame compressed with the content `base` as reference prefix.
    ZstdPatch { base: Hash },
    /// The blob is a zstd-compressed bsdiff patch against the content `base`.
    Bsdiff { base: Hash },
}

impl Source {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Source::Base => "base",
            Source::Zstd => "zstd",
            Source::ZstdPatch { .. } => "zstd-patch",
            Source::Bsdiff { .. } => "bsdiff",
        }
    }
    /// The content a patch applies to.
    pub fn base(&self) -> Option<&Hash> {
        match self {
            Source::ZstdPatch { base } | Source::Bsdiff { base } => Some(base),
            _ => None,
        }
    }
}

/// The compressor of a blob. Patches are always zstd; a whole content may be either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Codec {
    #[default]
    Zstd,
    /// One .xz stream (FORMAT.md): `source = "xz"`, with [`Source::Zstd`] (whole).
    Xz,
}

/// A content (file bytes, identified by their sha256) the result needs and the base lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub sha256: Hash,
    pub size: u64,
    /// For a content with holes: the bytes of it outside them (at most `size`), which is
    /// what its object takes on disk at most; `None` means all of `size`. A delta that writes
    /// more is refused as it is written.
    pub data: Option<u64>,
    pub source: Source,
    /// How the blob is compressed; [`Codec::Xz`] only with [`Source::Zstd`].
    pub codec: Codec,
    /// sha256 and size of the blob member, for every source but `base`.
    pub blob: Option<(Hash, u64)>,
}

impl Content {
    /// The `source` the manifest gives it.
    pub fn source_name(&self) -> &'static str {
        match (&self.source, self.codec) {
            (Source::Zstd, Codec::Xz) => "xz",
            (s, _) => s.name(),
        }
    }
}

/// The delta manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub from_version: Option<String>,
    pub from_digest: Hash,
    pub to_version: String,
    pub to_digest: Hash,
    pub to_count: u64,
    /// Paths of the base that the result does not have.
    pub removed: Vec<Box<[u8]>>,
    /// Entries of the result that the base lacks or has differently, in full.
    pub changed: Vec<Entry>,
    pub contents: Vec<Content>,
}

impl Delta {
    pub fn to_toml(&self) -> String {
        let mut out = String::with_capacity(256 + self.changed.len() * 180);
        out.push_str("# treeswap delta manifest; see FORMAT.md\n");
        let _ = writeln!(out, "format = {FORMAT}");
        if let Some(v) = &self.from_version {
            let _ = writeln!(out, "from_version = \"{v}\"");
        }
        let _ = writeln!(out, "from_digest = \"{}\"", hex::encode(self.from_digest));
        let _ = writeln!(out, "to_version = \"{}\"", self.to_version);
        let _ = writeln!(out, "to_digest = \"{}\"", hex::encode(self.to_digest));
        let _ = writeln!(out, "to_count = {}", self.to_count);
        out.push_str("removed = [\n");
        for p in &self.removed {
            let _ = writeln!(out, "\"{}\",", encode_path(p));
        }
        out.push_str("]\nchanged = [\n");
        for e in &self.changed {
            manifest::write_entry(&mut out, e);
            out.push_str(",\n");
        }
        out.push_str("]\ncontents = [\n");
        for c in &self.contents {
            let _ = write!(
                out,
                "{{ sha256 = \"{}\", size = {}",
                hex::encode(c.sha256),
                c.size,
            );
            if let Some(n) = c.data {
                let _ = write!(out, ", data = {n}");
            }
            let _ = write!(out, ", source = \"{}\"", c.source_name());
            if let Some(b) = c.source.base() {
                let _ = write!(out, ", base = \"{}\"", hex::encode(b));
            }
            if let Some((h, n)) = &c.blob {
                let _ = write!(
                    out,
                    ", blob_sha256 = \"{}\", blob_size = {n}",
                    hex::encode(h)
                );
            }
            out.push_str(" },\n");
        }
        out.push_str("]\n");
        out
    }

    /// The tar member name of a content's blob.
    pub(crate) fn blob_member(c: &Content) -> String {
        format!("blobs/{}", hex::encode(c.sha256))
    }
}

/// The largest blob a content of `size` bytes may have (FORMAT.md): a little more than the
/// content itself, which whole zstd never exceeds; an encoder ships the smallest encoding.
pub(crate) fn max_blob_size(size: u64) -> u64 {
    size.saturating_add(size / 128).saturating_add(64 << 10)
}

fn content_from_fields(mut f: Fields) -> Result<Content> {
    let sha256 = f.hash("sha256")?;
    let size = f.int("size")?;
    let data = f.opt_int("data")?;
    if data.is_some_and(|n| n > size) {
        bail!(
            "content {}: data = {} is more than its size {size}",
            hex::encode(sha256),
            data.unwrap_or_default()
        );
    }
    let mut codec = Codec::Zstd;
    let source = match &*f.str("source")? {
        "base" => Source::Base,
        "zstd" => Source::Zstd,
        "xz" => {
            codec = Codec::Xz;
            Source::Zstd
        }
        "zstd-patch" => Source::ZstdPatch {
            base: f.hash("base")?,
        },
        "bsdiff" => Source::Bsdiff {
            base: f.hash("base")?,
        },
        other => bail!(
            "unknown content source `{}`",
            crate::core::path::quote(other)
        ),
    };
    let blob = if source == Source::Base {
        None
    } else {
        let blob_size = f.int("blob_size")?;
        if blob_size > max_blob_size(size) {
            bail!(
                "content {}: blob_size = {blob_size} is larger than any encoding of {size} bytes",
                hex::encode(sha256)
            );
        }
        Some((f.hash("blob_sha256")?, blob_size))
    };
    f.finish()?;
    Ok(Content {
        sha256,
        size,
        data,
        source,
        codec,
        blob,
    })
}

/// The most entries a delta may change or remove unless the config says otherwise (`[trust]
/// max_entries`): `apply` holds each changed entry in memory, about 400 bytes apiece.
pub const DEFAULT_MAX_ENTRIES: u64 = 2_000_000;
/// The longest line of a delta manifest (FORMAT.md): an entry with a long path and large
/// extended attributes is far shorter.
pub const MAX_LINE: usize = 1 << 20;

/// Parses delta manifest text; see [`parse_reader`].
pub fn parse(text: &str) -> Result<Delta> {
    parse_reader(text.as_bytes(), DEFAULT_MAX_ENTRIES)
}

/// Parses a delta manifest and checks what can be checked without the base tree: valid,
/// sorted, unique paths; no path both removed and changed; contents listed once. Memory is
/// bounded by the limits, not by the input: lines of at most [`MAX_LINE`] bytes, `to_count`
/// and each list at most `max_entries`, and no more changed entries than `to_count` says
/// the result has.
pub(crate) fn parse_reader(mut r: impl BufRead, max_entries: u64) -> Result<Delta> {
    let mut reader = Reader {
        top: HeaderReader::new(
            "delta manifest",
            FORMAT,
            &["removed", "changed", "contents"],
            false,
        ),
        header: Header::default(),
        delta: Delta::default(),
        max_entries,
    };
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        let got = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("line {n}"))?;
        if got == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE {
            bail!("delta manifest line {n} is longer than {MAX_LINE} bytes");
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|_| anyhow::anyhow!("delta manifest line {n} is not UTF-8"))?;
        reader
            .line(line)
            .with_context(|| format!("delta manifest line {n}"))?;
    }
    reader.finish()
}

/// [`parse_reader`]'s state from line to line.
struct Reader {
    top: HeaderReader,
    header: Header,
    /// The lists read so far.
    delta: Delta,
    /// The most items a list may have, and the largest `to_count`.
    max_entries: u64,
}

/// The header values of a delta manifest, as far as they are read.
#[derive(Default)]
struct Header {
    from_version: Option<String>,
    from_digest: Option<Hash>,
    to_version: Option<String>,
    to_digest: Option<Hash>,
    to_count: Option<u64>,
}

impl Reader {
    fn line(&mut self, line: &str) -> Result<()> {
        let (header, max) = (&mut self.header, self.max_entries);
        let Some((list, mut c)) = self
            .top
            .line(line, &mut |key, c| header.value(key, c, max))?
        else {
            return Ok(());
        };
        self.item(list, &mut c)?;
        c.expect(b',')?;
        if !c.at_end() {
            bail!("text after the item");
        }
        Ok(())
    }

    /// Reads one item of the list `list`.
    fn item(&mut self, list: &str, c: &mut Cursor) -> Result<()> {
        let d = &mut self.delta;
        let (have, most) = match list {
            "removed" => (d.removed.len(), self.max_entries),
            "changed" => (
                d.changed.len(),
                self.header.to_count.unwrap_or(self.max_entries),
            ),
            _ => (d.contents.len(), self.max_entries),
        };
        if have as u64 >= most {
            bail!(
                "`{list}` has more than {most} items (to_count, or the limit `[trust] max_entries`)"
            );
        }
        match list {
            "removed" => {
                let p = decode_path(&c.string()?)?;
                validate_path(&p)?;
                d.removed.push(p.into());
            }
            "changed" => d
                .changed
                .push(entry_from_fields(Fields::new(c.inline_table()?))?),
            _ => d
                .contents
                .push(content_from_fields(Fields::new(c.inline_table()?))?),
        }
        Ok(())
    }

    /// Checks, after the last line, that the manifest is whole and consistent.
    fn finish(self) -> Result<Delta> {
        self.top.finish()?;
        let h = self.header;
        let d = Delta {
            from_version: h.from_version,
            from_digest: h
                .from_digest
                .context("delta manifest has no `from_digest`")?,
            to_digest: h.to_digest.context("delta manifest has no `to_digest`")?,
            to_version: h.to_version.context("delta manifest has no `to_version`")?,
            to_count: h.to_count.context("delta manifest has no `to_count`")?,
            ..self.delta
        };
        check(&d)?;
        Ok(d)
    }
}

impl Header {
    /// Reads the value of a header key; `to_count` may be at most `max_entries`.
    fn value(&mut self, key: &str, c: &mut Cursor, max_entries: u64) -> Result<()> {
        match key {
            "from_version" => self.from_version = Some(c.version()?),
            "to_version" => self.to_version = Some(c.version()?),
            "from_digest" => self.from_digest = Some(c.hash()?),
            "to_digest" => self.to_digest = Some(c.hash()?),
            "to_count" => {
                let n = c.int()?;
                if n > max_entries {
                    bail!(
                        "to_count = {n} is over the limit of {max_entries} entries (`[trust] max_entries`)"
                    );
                }
                self.to_count = Some(n);
            }
            other => bail!("unknown key `{}`", crate::core::path::quote(other)),
        }
        Ok(())
    }
}

fn check(d: &Delta) -> Result<()> {
    for w in d.removed.windows(2) {
        if w[0] >= w[1] {
            bail!(
                "`removed` is not sorted or lists `{}` twice",
                crate::core::path::display(&w[1])
            );
        }
    }
    for w in d.changed.windows(2) {
        if w[0].path >= w[1].path {
            bail!(
                "`changed` is not sorted or lists `{}` twice",
                w[1].display()
            );
        }
    }
    for e in &d.changed {
        if d.removed.binary_search(&e.path).is_ok() {
            bail!("`{}` is both removed and changed", e.display());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for c in &d.contents {
        if !seen.insert(c.sha256) {
            bail!("content {} is listed twice", hex::encode(c.sha256));
        }
        if c.source.base() == Some(&c.sha256) {
            bail!(
                "content {} is a patch against itself",
                hex::encode(c.sha256)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Kind;
    use crate::core::object::Meta;

    fn sample() -> Delta {
        Delta {
            from_version: Some("1".into()),
            from_digest: [1; 32],
            to_version: "2".into(),
            to_digest: [2; 32],
            to_count: 3,
            removed: vec![(*b"gone").into(), (*b"old\xff").into()],
            changed: vec![Entry {
                path: (*b"new").into(),
                meta: Meta {
                    mode: 0o644,
                    ..Default::default()
                },
                kind: Kind::File {
                    size: 5,
                    sha256: [3; 32],
                },
            }],
            contents: vec![
                Content {
                    sha256: [3; 32],
                    size: 5,
                    data: Some(4),
                    source: Source::ZstdPatch { base: [4; 32] },
                    codec: Codec::Zstd,
                    blob: Some(([5; 32], 9)),
                },
                Content {
                    sha256: [6; 32],
                    size: 1,
                    data: None,
                    source: Source::Base,
                    codec: Codec::Zstd,
                    blob: None,
                },
                Content {
                    sha256: [7; 32],
                    size: 300_000,
                    data: None,
                    source: Source::Zstd,
                    codec: Codec::Xz,
                    blob: Some(([8; 32], 1000)),
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let d = sample();
        let text = d.to_toml();
        assert_eq!(parse(&text).unwrap(), d);
        let _: toml::Table = text.parse().unwrap();
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let text = sample().to_toml();
        for bad in [
            text.replace("\"gone\"", "\"../gone\""),
            text.replace("\"gone\"", "\"/etc/passwd\""),
            text.replace("\"gone\"", "\"\""),
            text.replace("\"gone\"", "\"new\""),
            text.replace("\"gone\"", "\"old%FF\""),
            text.replace("source = \"base\"", "source = \"lzma\""),
            text[..text.len() / 2].to_string(),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_patch_against_its_own_content_is_refused() {
        for source in [
            Source::ZstdPatch { base: [3; 32] },
            Source::Bsdiff { base: [3; 32] },
        ] {
            let mut d = sample();
            d.contents[0].source = source;
            let err = format!("{:#}", parse(&d.to_toml()).unwrap_err());
            assert!(err.contains("is a patch against itself"), "{err}");
        }
    }
}
