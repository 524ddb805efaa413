//! `treeswap show DELTA`: what a delta holds, read with every limit `apply` reads it with (its
//! head only: the manifest, spooled, and the signature), without changing anything.

use std::collections::HashMap;
use std::io::Read;

use anyhow::Result;
use serde::Serialize;

use crate::core::config::Config;
use crate::core::delta::{Delta, Source};
use crate::core::manifest::Kind;
use crate::core::object::Hash;
use crate::ops::apply::read;
use crate::store::root::Root;

/// The version of the JSON that `show --json` prints (FORMAT.md).
const SCHEMA: u32 = 1;
/// How many of the largest changed files `show` lists.
const LARGEST: usize = 5;

#[derive(Serialize)]
pub(crate) struct Shown {
    pub schema: u32,
    pub from_version: Option<String>,
    pub from_digest: String,
    pub to_version: String,
    pub to_digest: String,
    pub to_count: u64,
    pub signature: Signature,
    /// The installed version the delta applies to, if this machine has it.
    pub base_installed: Option<String>,
    pub entries: Entries,
    pub contents: Contents,
    /// Bytes of the blobs: what the delta ships besides its manifest.
    pub blob_bytes: u64,
    /// Bytes of the contents the blobs make: at most what new objects take.
    pub content_bytes: u64,
    /// The largest changed files.
    pub largest: Vec<Change>,
}

#[derive(Serialize)]
pub(crate) struct Signature {
    /// `unsigned`, `verified`, `not-verified` (keys are configured and none verifies it), or
    /// `not-checked` (signed, but no keys are configured).
    pub state: &'static str,
    /// The key file that verifies it.
    pub key: Option<String>,
    /// Why it does not verify.
    pub error: Option<String>,
}

#[derive(Serialize, Default)]
pub(crate) struct Entries {
    pub removed: u64,
    /// Entries the delta lists in full (added, changed or with new metadata).
    pub changed: u64,
    /// With the base installed here: of `changed`, those the base lacks, those whose kind or
    /// content changes, and those whose metadata only changes.
    pub added: Option<u64>,
    pub modified: Option<u64>,
    pub metadata_only: Option<u64>,
}

#[derive(Serialize, Default)]
pub(crate) struct Contents {
    pub whole: u64,
    pub zstd_patch: u64,
    pub bsdiff: u64,
    /// Contents the base has (no bytes shipped).
    pub from_base: u64,
}

#[derive(Serialize)]
pub(crate) struct Change {
    pub path: String,
    pub size: u64,
    /// How its content comes: `zstd`, `zstd-patch`, `bsdiff`, `base`, or `pool` (the delta
    /// ships none: another tree has it).
    pub source: &'static str,
}

/// Reads the head of the delta from `input` and describes it; `root`, if there is one, says
/// whether its base is installed and tells added from changed entries.
pub(crate) fn show(input: impl Read, root: Option<&Root>, cfg: &Config) -> Result<Shown> {
    let keys = crate::ops::trust::load_keys(&cfg.trust.public_keys)?;
    let spool = match root {
        Some(r) => r.spool()?,
        None => crate::fs::file::spool_in(&std::env::temp_dir())?,
    };
    let mut signature = Signature {
        state: "unsigned",
        key: None,
        error: None,
    };
    let mut members = read::members(input)?;
    let d = read::read_head(
        &mut members,
        spool,
        cfg.trust.max_entries,
        &mut |data, len, sig| {
            signature = match (sig.trim().is_empty(), keys.is_empty()) {
                (true, _) => signature_of("unsigned"),
                (false, true) => signature_of("not-checked"),
                (false, false) => match crate::ops::trust::verify(data, len, sig, &keys) {
                    Ok(path) => Signature {
                        key: Some(path.display().to_string()),
                        ..signature_of("verified")
                    },
                    Err(e) => Signature {
                        error: Some(format!("{e:#}")),
                        ..signature_of("not-verified")
                    },
                },
            };
            Ok(())
        },
    )?;
    let base_installed = match root {
        Some(r) => read::find_base(r, &d.from_digest)?,
        None => None,
    };
    let entries = match (root, &base_installed) {
        (Some(r), Some(v)) => entries_against(r, v, &d)?,
        _ => Entries {
            removed: d.removed.len() as u64,
            changed: d.changed.len() as u64,
            ..Default::default()
        },
    };
    Ok(describe(d, signature, base_installed, entries))
}

fn signature_of(state: &'static str) -> Signature {
    Signature {
        state,
        key: None,
        error: None,
    }
}

/// Counts the changed entries against the installed base `base`.
fn entries_against(root: &Root, base: &str, d: &Delta) -> Result<Entries> {
    let m = root.load_manifest_unverified(base)?;
    let mut e = Entries {
        removed: d.removed.len() as u64,
        changed: d.changed.len() as u64,
        added: Some(0),
        modified: Some(0),
        metadata_only: Some(0),
    };
    for c in &d.changed {
        let slot = match m.entries.binary_search_by(|b| b.path.cmp(&c.path)) {
            Err(_) => &mut e.added,
            Ok(i) if m.entries[i].kind == c.kind => &mut e.metadata_only,
            Ok(_) => &mut e.modified,
        };
        *slot.as_mut().expect("set") += 1;
    }
    Ok(e)
}

fn describe(
    d: Delta,
    signature: Signature,
    base_installed: Option<String>,
    entries: Entries,
) -> Shown {
    let mut contents = Contents::default();
    let mut source: HashMap<Hash, &'static str> = HashMap::new();
    for c in &d.contents {
        let n = match c.source {
            Source::Base => &mut contents.from_base,
            Source::Zstd => &mut contents.whole,
            Source::ZstdPatch { .. } => &mut contents.zstd_patch,
            Source::Bsdiff { .. } => &mut contents.bsdiff,
        };
        *n += 1;
        source.insert(c.sha256, c.source.name());
    }
    let mut files: Vec<Change> = d
        .changed
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::File { size, sha256 } => Some(Change {
                path: e.display(),
                size: *size,
                source: source.get(sha256).copied().unwrap_or("pool"),
            }),
            _ => None,
        })
        .collect();
    files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    files.truncate(LARGEST);
    Shown {
        schema: SCHEMA,
        from_version: d.from_version.clone(),
        from_digest: hex::encode(d.from_digest),
        to_version: d.to_version.clone(),
        to_digest: hex::encode(d.to_digest),
        to_count: d.to_count,
        signature,
        base_installed,
        entries,
        contents,
        blob_bytes: d.contents.iter().filter_map(|c| c.blob.map(|b| b.1)).sum(),
        content_bytes: d
            .contents
            .iter()
            .filter(|c| c.source != Source::Base)
            .map(|c| c.size)
            .sum(),
        largest: files,
    }
}

impl Shown {
    pub(crate) fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let v = |v: &Option<String>| v.as_ref().map_or("(unnamed)".into(), |v| format!("`{v}`"));
        let _ = writeln!(
            o,
            "from:      {} ({})",
            v(&self.from_version),
            self.from_digest
        );
        let _ = writeln!(
            o,
            "to:        `{}` ({}, {} entries)",
            self.to_version, self.to_digest, self.to_count
        );
        let sig = match self.signature.state {
            "verified" => format!(
                "verified with `{}`",
                self.signature.key.as_deref().unwrap_or("?")
            ),
            "not-verified" => format!(
                "NOT verified: {}",
                self.signature.error.as_deref().unwrap_or("?")
            ),
            "not-checked" => "signed; no keys are configured to check it".into(),
            _ => "unsigned".into(),
        };
        let _ = writeln!(o, "signature: {sig}");
        let _ = writeln!(
            o,
            "base:      {}",
            match &self.base_installed {
                Some(b) => format!("`{b}` is installed here"),
                None => "not installed here".into(),
            }
        );
        let e = &self.entries;
        let detail = match (e.added, e.modified, e.metadata_only) {
            (Some(a), Some(m), Some(md)) => {
                format!(" ({a} added, {m} changed, {md} metadata only)")
            }
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "entries:   {} listed{detail}, {} removed",
            e.changed, e.removed
        );
        let c = &self.contents;
        let _ = writeln!(
            o,
            "contents:  {} whole, {} zstd patches, {} bsdiff, {} from the base",
            c.whole, c.zstd_patch, c.bsdiff, c.from_base
        );
        let _ = writeln!(
            o,
            "bytes:     {} of blobs to download, at most {} of new objects",
            self.blob_bytes, self.content_bytes
        );
        if !self.largest.is_empty() {
            let _ = writeln!(o, "largest:");
            for f in &self.largest {
                let _ = writeln!(o, "  {:>12}  {:<10}  {}", f.size, f.source, f.path);
            }
        }
        o
    }
}
