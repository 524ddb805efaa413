//! The release repository's index (`<channel>/index.toml`, FORMAT.md "Release repository"):
//! which versions a channel publishes and the deltas that reach each one. Pure: the parser
//! takes text (at most [`MAX_INDEX_BYTES`], which the caller reads through a cap) and checks
//! every field and count against the limits below; the writer gives text.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::core::error::Fail;
use crate::core::object::Hash;
use crate::core::version;

/// The index format version; see FORMAT.md for what changes it.
pub(crate) const FORMAT: u32 = 1;
/// The index file's name in its channel's directory, and its signature's.
pub(crate) const INDEX_NAME: &str = "index.toml";
pub(crate) const SIGNATURE_NAME: &str = "index.toml.minisig";
/// The largest index read (a thousand versions with five deltas each is about 1.5 MB).
pub(crate) const MAX_INDEX_BYTES: u64 = 4 << 20;
/// The largest signature file read (minisign's are about 300 bytes).
pub(crate) const MAX_SIGNATURE_BYTES: u64 = 8 << 10;
/// The most versions and deltas an index may list.
pub(crate) const MAX_VERSIONS: usize = 4096;
pub(crate) const MAX_DELTAS: usize = 32768;
/// The largest delta an index may list (1 TiB), and the most chunks all its deltas may have.
pub(crate) const MAX_DELTA_SIZE: u64 = 1 << 40;
pub(crate) const MAX_CHUNKS: usize = 1 << 18;
/// The chunk size `publish` writes, and the bounds a reader accepts.
pub(crate) const CHUNK_SIZE: u64 = 1 << 20;
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 64 << 20;
/// The longest path of a delta file in an index.
const MAX_PATH: usize = 512;
/// How far in the future an index's `timestamp` may be (clocks differ a little).
pub(crate) const CLOCK_SKEW: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Index {
    pub format: u32,
    pub channel: String,
    /// Strictly increasing with every index the channel publishes (`publish`, `--refresh`).
    pub serial: u64,
    /// When it was made and until when a machine may accept it, seconds since the epoch.
    pub timestamp: u64,
    pub expires: u64,
    /// The version machines should run: the newest published.
    pub latest: String,
    /// The size of the chunks each delta's `chunks` hashes (the last one may be shorter).
    pub chunk_size: u64,
    /// In the order they were published, oldest first.
    #[serde(default, rename = "version")]
    pub versions: Vec<Version>,
    #[serde(default, rename = "delta")]
    pub deltas: Vec<DeltaFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Version {
    pub name: String,
    /// The tree digest (hex).
    pub digest: String,
    pub entries: u64,
    /// The bytes of its regular files.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeltaFile {
    /// The version it makes.
    pub to: String,
    /// The version it applies to; absent for the delta from the empty tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The digest of the tree it applies to (hex; the empty tree's for a first install).
    pub from_digest: String,
    /// Relative to the repository's top, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The sha256 of each `chunk_size` bytes of the file, in order.
    pub chunks: Vec<String>,
}

impl Version {
    pub(crate) fn digest(&self) -> Hash {
        hash(&self.digest).expect("checked by parse")
    }
}

impl DeltaFile {
    pub(crate) fn base_digest(&self) -> Hash {
        hash(&self.from_digest).expect("checked by parse")
    }
    pub(crate) fn sha256(&self) -> Hash {
        hash(&self.sha256).expect("checked by parse")
    }
    pub(crate) fn chunk(&self, i: usize) -> Hash {
        hash(&self.chunks[i]).expect("checked by parse")
    }
}

fn hash(s: &str) -> Result<Hash> {
    let mut h = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut h).is_err() {
        bail!(
            "`{}` is not a sha256 in hex",
            crate::core::path::quote_at_most(s, 80)
        );
    }
    Ok(h)
}

/// A channel name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or a digit (it names a
/// directory of the repository).
pub(crate) fn validate_channel(c: &str) -> Result<()> {
    let ok = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch);
    if c.is_empty()
        || c.len() > 64
        || !c.chars().all(ok)
        || !c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
    {
        bail!(
            "invalid channel `{}`: use 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit",
            crate::core::path::quote(c)
        );
    }
    Ok(())
}

/// A delta's path: relative, `/`-separated components of `A-Z a-z 0-9 . _ + ~ -`, none
/// empty, `.` or `..`, none starting with `.`; so it needs no escaping in a URL and stays
/// beneath the repository.
fn validate_path(p: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._+~-".contains(c);
    let bad = p.is_empty()
        || p.len() > MAX_PATH
        || p.split('/')
            .any(|c| c.is_empty() || c.starts_with('.') || !c.chars().all(ok));
    if bad {
        bail!(
            "invalid delta path `{}`",
            crate::core::path::quote_at_most(p, 80)
        );
    }
    Ok(())
}

/// The path `publish` gives the delta to `to` from the tree of digest `from` (`None`: the
/// empty tree): the channel, the version and the base in it, so no two collide.
pub(crate) fn delta_path(channel: &str, to: &str, from: Option<&Hash>) -> String {
    let from = from.map(hex::encode).unwrap_or_else(|| "empty".into());
    format!("{channel}/deltas/{to}/{from}.delta")
}

/// Parses and checks an index (FORMAT.md, "Release repository"): its format, names, hashes,
/// sizes, chunk lists and counts. Freshness, serial and channel are the caller's to check
/// ([`Index::check_fresh`]), as they depend on the clock and the machine.
pub(crate) fn parse(text: &str) -> Result<Index> {
    if text.len() as u64 > MAX_INDEX_BYTES {
        bail!("the index is larger than {MAX_INDEX_BYTES} bytes");
    }
    let ix: Index = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = crate::core::path::quote_at_most(e.message().replace('\n', " "), 120);
        match line {
            Some(l) => anyhow::anyhow!("line {l}: {msg}"),
            None => anyhow::anyhow!("{msg}"),
        }
    })?;
    ix.check().map(|()| ix)
}

impl Index {
    fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!(
                "index format {} is not supported (this treeswap reads {FORMAT})",
                self.format
            );
        }
        validate_channel(&self.channel)?;
        if self.serial == 0 {
            bail!("the serial must be at least 1");
        }
        if self.expires <= self.timestamp {
            bail!("it expires before it was made");
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) || !self.chunk_size.is_power_of_two()
        {
            bail!("chunk_size {} is out of bounds", self.chunk_size);
        }
        if self.versions.len() > MAX_VERSIONS || self.deltas.len() > MAX_DELTAS {
            bail!(
                "more than {MAX_VERSIONS} versions or {MAX_DELTAS} deltas ({} and {})",
                self.versions.len(),
                self.deltas.len()
            );
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.versions {
            version::validate(&v.name)?;
            hash(&v.digest).with_context(|| format!("version `{}`", v.name))?;
            if !names.insert(v.name.as_str()) {
                bail!("version `{}` is listed twice", v.name);
            }
        }
        if !names.contains(self.latest.as_str()) {
            bail!(
                "the latest version `{}` is not listed",
                crate::core::path::quote(&self.latest)
            );
        }
        let mut chunks = 0usize;
        let mut paths = std::collections::HashSet::new();
        for d in &self.deltas {
            let what = || format!("the delta `{}`", crate::core::path::quote(&d.path));
            validate_path(&d.path)?;
            if !paths.insert(d.path.as_str()) {
                bail!("{} is listed twice", what());
            }
            if !names.contains(d.to.as_str()) {
                bail!("{} makes a version the index does not list", what());
            }
            if let Some(f) = &d.from {
                version::validate(f).with_context(what)?;
            }
            hash(&d.from_digest).with_context(what)?;
            hash(&d.sha256).with_context(what)?;
            if d.size == 0 || d.size > MAX_DELTA_SIZE {
                bail!("{} has a size out of bounds ({})", what(), d.size);
            }
            let want = d.size.div_ceil(self.chunk_size);
            if d.chunks.len() as u64 != want {
                bail!(
                    "{} lists {} chunk hashes, not {want}",
                    what(),
                    d.chunks.len()
                );
            }
            chunks += d.chunks.len();
            if chunks > MAX_CHUNKS {
                bail!("more than {MAX_CHUNKS} chunks in all");
            }
            for c in &d.chunks {
                hash(c).with_context(what)?;
            }
        }
        Ok(())
    }

    /// The index as text (canonical: fields in a fixed order).
    pub(crate) fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("an index always encodes");
        format!("# treeswap release index; see FORMAT.md\n{body}")
    }

    pub(crate) fn version(&self, name: &str) -> Option<&Version> {
        self.versions.iter().find(|v| v.name == name)
    }

    /// Refuses an index that a machine must not act on at time `now`: expired, or dated in
    /// the future beyond [`CLOCK_SKEW`] (a freeze: an attacker replays an old index, or holds a
    /// new one back); of another channel than `channel`; or older than the serial `last`
    /// this machine accepted (a rollback).
    pub(crate) fn check_fresh(&self, channel: &str, now: u64, last: Option<u64>) -> Result<()> {
        if self.channel != channel {
            return Err(Fail::WrongChannel(format!(
                "the index is of channel `{}`, not `{channel}`",
                self.channel
            ))
            .into());
        }
        if self.expires <= now {
            return Err(Fail::Stale(format!(
                "the index expired {} s ago (serial {}); the server must refresh it (`treeswap publish --refresh`)",
                now - self.expires,
                self.serial
            ))
            .into());
        }
        if self.timestamp > now.saturating_add(CLOCK_SKEW) {
            return Err(Fail::Stale(format!(
                "the index is dated {} s in the future (more than the {CLOCK_SKEW} s of clock skew allowed); check the clocks",
                self.timestamp - now
            ))
            .into());
        }
        if let Some(last) = last
            && self.serial < last
        {
            return Err(Fail::Rollback(format!(
                "the index has serial {}, older than serial {last} which this machine accepted already (a replayed index)",
                self.serial
            ))
            .into());
        }
        Ok(())
    }
}

/// Parses a duration like `30d`, `12h`, `15m` or `10s` into seconds.
pub(crate) fn parse_duration(s: &str) -> Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!(
            "invalid duration `{}`: a number and one of s, m, h, d (like 30d)",
            crate::core::path::quote(s)
        ),
    };
    let n: u64 = num
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .with_context(|| format!("invalid duration `{}`", crate::core::path::quote(s)))?;
    n.checked_mul(mult)
        .filter(|&d| d <= 10 * 365 * 86400)
        .with_context(|| format!("duration `{s}` is longer than ten years"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        Index {
            format: FORMAT,
            channel: "stable".into(),
            serial: 3,
            timestamp: 1000,
            expires: 2000,
            latest: "2".into(),
            chunk_size: CHUNK_SIZE,
            versions: vec![
                Version {
                    name: "1".into(),
                    digest: "11".repeat(32),
                    entries: 3,
                    size: 10,
                },
                Version {
                    name: "2".into(),
                    digest: "22".repeat(32),
                    entries: 4,
                    size: 12,
                },
            ],
            deltas: vec![DeltaFile {
                to: "2".into(),
                from: Some("1".into()),
                from_digest: "11".repeat(32),
                path: delta_path("stable", "2", Some(&[0x11; 32])),
                size: CHUNK_SIZE + 1,
                sha256: "33".repeat(32),
                chunks: vec!["44".repeat(32), "55".repeat(32)],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let ix = sample();
        assert_eq!(parse(&ix.to_toml()).unwrap(), ix);
    }

    #[test]
    fn refuses_what_breaks_a_rule() {
        type Change = Box<dyn Fn(&mut Index)>;
        let cases: Vec<(&str, Change)> = vec![
            ("format", Box::new(|i| i.format = 2)),
            ("channel", Box::new(|i| i.channel = "../x".into())),
            ("serial", Box::new(|i| i.serial = 0)),
            ("expires", Box::new(|i| i.expires = i.timestamp)),
            ("chunk", Box::new(|i| i.chunk_size = 1000)),
            ("latest", Box::new(|i| i.latest = "9".into())),
            ("version", Box::new(|i| i.versions[0].name = "a/b".into())),
            ("twice", Box::new(|i| i.versions[1].name = "1".into())),
            ("digest", Box::new(|i| i.versions[0].digest = "zz".into())),
            ("path", Box::new(|i| i.deltas[0].path = "../x".into())),
            ("dot", Box::new(|i| i.deltas[0].path = "a/.x".into())),
            ("query", Box::new(|i| i.deltas[0].path = "a?b".into())),
            ("to", Box::new(|i| i.deltas[0].to = "7".into())),
            ("size", Box::new(|i| i.deltas[0].size = 0)),
            (
                "chunks",
                Box::new(|i| i.deltas[0].chunks.pop().map(drop).unwrap()),
            ),
            ("sha", Box::new(|i| i.deltas[0].sha256 = "00".into())),
        ];
        for (what, change) in cases {
            let mut ix = sample();
            change(&mut ix);
            assert!(parse(&ix.to_toml()).is_err(), "{what}");
        }
        assert!(parse(&format!("{}extra = 1\n", sample().to_toml())).is_err());
        assert!(parse(&"x".repeat(MAX_INDEX_BYTES as usize + 1)).is_err());
    }

    #[test]
    fn freshness() {
        let ix = sample();
        ix.check_fresh("stable", 1500, Some(3)).unwrap();
        let code = |r: Result<()>| crate::core::error::exit_code(&r.unwrap_err());
        assert_eq!(code(ix.check_fresh("stable", 2000, None)), 12);
        assert_eq!(
            code(ix.check_fresh("stable", 1000 - CLOCK_SKEW - 1, None)),
            12
        );
        ix.check_fresh("stable", 1000 - CLOCK_SKEW, None).unwrap();
        assert_eq!(code(ix.check_fresh("stable", 1500, Some(4))), 13);
        assert_eq!(code(ix.check_fresh("testing", 1500, None)), 14);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86400);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_duration("10s").unwrap(), 10);
        for bad in ["", "d", "10", "0s", "1w", "-1d", "99999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
