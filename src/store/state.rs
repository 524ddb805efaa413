//! The state file (`<root>/state.toml`): boot counting and guest restarts still to do.
//! Replaced atomically; parsing is pure.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::core::{failpoint, version};
use crate::fs::sys;

pub(crate) const FORMAT: u32 = 1;
const NAME: &str = "state.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub format: u32,
    /// The tree flipped to that has not been marked good yet, and the boots it has had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// Guests still to restart onto `target`, recorded before the first restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// A flip in progress: recorded before `current` changes, cleared once `previous` is set,
    /// so that `boot` can finish one cut short between the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<Flip>,
    /// Set while pool objects may be without their immutable flag (see `ops::install::while_linking`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unprotected: bool,
    /// Set once a sweep cleared the immutable flag from every pool object, for a pool now
    /// written in a mode without it (overlay guests, `reflink`, `hardlink`); cleared again by
    /// any work in immutable mode (see `ops::install::match_flags`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unflagged: bool,
    /// Versions `gc` never removes (`treeswap pin`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
    // --- release repository (issue 18) ---
    /// Per channel, the serial of the last release index `update` accepted: an index with a
    /// lower one is a replay (a rollback) and refused.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub serials: std::collections::BTreeMap<String, u64>,
    // --- end of release repository ---
    // ---- guest records (issue 16) ----
    /// Overlay guests: which layer of `guests/<name>/` each runs on, and for which tree it
    /// was merged.
    #[serde(default, rename = "guest", skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<GuestRecord>,
    /// Tree-mode guests: the tree each runs on (last restarted onto, or `current` when a
    /// flip first left it there), so that `gc` never removes it under the guest.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tree_guests: std::collections::BTreeMap<String, String>,
}

/// An overlay guest's layer (`guests/<name>/layer-<layer>`), merged for the tree `base`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuestRecord {
    pub name: String,
    pub layer: u64,
    /// The tree the layer was last merged for (what it is mounted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The layer before the last merge, kept until every guest of the flip has started, so
    /// that a flip back gives the guest exactly the layer it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<GuestUndo>,
    /// The conflicts of the last merge (at most `MAX_CONFLICTS` paths) and how many more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conflicts_more: u64,
}

/// The most conflict paths a guest record keeps.
pub(crate) const MAX_CONFLICTS: usize = 100;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuestUndo {
    pub layer: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

impl State {
    /// The record of guest `name`, made if missing.
    pub(crate) fn guest_mut(&mut self, name: &str) -> &mut GuestRecord {
        match self.guests.iter().position(|g| g.name == name) {
            Some(i) => &mut self.guests[i],
            None => {
                self.guests.push(GuestRecord {
                    name: name.to_owned(),
                    ..Default::default()
                });
                self.guests.last_mut().expect("just pushed")
            }
        }
    }

    pub(crate) fn guest(&self, name: &str) -> Option<&GuestRecord> {
        self.guests.iter().find(|g| g.name == name)
    }
}
// ---- end of guest records ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pending {
    pub version: String,
    pub boots: u32,
    /// The last boot that ran this tree (its `boot_id`): the one in which it was flipped to,
    /// or the last one `treeswap boot` counted. `mark-good --check` marks a tree good only in
    /// such a boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Flip {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Restart {
    pub target: String,
    pub guests: Vec<String>,
}

pub(crate) fn parse(text: &str) -> Result<State> {
    let s: State = toml::from_str(text).map_err(|e| {
        // The message may quote what was read: a bounded part of it, and the line.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = crate::core::path::quote_at_most(e.message().replace('\n', " "), 120);
        match line {
            Some(l) => anyhow::anyhow!("invalid state file, line {l}: {msg}"),
            None => anyhow::anyhow!("invalid state file: {msg}"),
        }
    })?;
    if s.format != FORMAT {
        bail!(
            "state file format {} is not supported (this treeswap reads {FORMAT})",
            s.format
        );
    }
    // Every version the file names is used as a path under `trees/`: it must be a version
    // name like any other, or an edited file could point `previous` outside the root.
    let named = s
        .pending
        .iter()
        .map(|p| &p.version)
        .chain(s.restart.iter().map(|r| &r.target));
    let named = named.chain(s.flip.iter().flat_map(|f| [&f.from, &f.to]));
    for v in named.chain(&s.pins) {
        version::validate(v).context("in the state file")?;
    }
    for c in s.serials.keys() {
        crate::core::index::validate_channel(c).context("in the state file")?;
    }
    // Guest records: names are directories of `guests/`, bases are versions.
    for g in &s.guests {
        if g.name.is_empty() || g.name.starts_with('.') || g.name.contains('/') {
            bail!(
                "invalid state file: guest `{}` is not a guest name",
                crate::core::path::quote(&g.name)
            );
        }
        let bases = g.base.iter().chain(g.undo.iter().flat_map(|u| &u.base));
        for v in bases {
            version::validate(v).context("in the state file")?;
        }
    }
    for v in s.tree_guests.values() {
        version::validate(v).context("in the state file")?;
    }
    Ok(s)
}

/// Reads the state file; a missing one is the empty state.
pub(crate) fn load(root: BorrowedFd) -> Result<State> {
    let fd = match sys::openat(
        root,
        NAME.as_bytes(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => {
            return Ok(State {
                format: FORMAT,
                ..Default::default()
            });
        }
        Err(e) => return Err(e).context("cannot open the state file"),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
        .context("cannot read the state file")?;
    parse(&text).context("in state.toml")
}

/// Replaces the state file atomically, between the failpoints `state-before-write` and
/// `state-after-write`: write a temporary file, fsync it, rename it over `state.toml`, fsync
/// the directory.
pub(crate) fn save(root: BorrowedFd, s: &State) -> Result<()> {
    failpoint::hit("state-before-write");
    write(root, s)?;
    failpoint::hit("state-after-write");
    Ok(())
}

fn write(root: BorrowedFd, s: &State) -> Result<()> {
    let mut s = s.clone();
    s.format = FORMAT;
    let text = format!(
        "# treeswap state; see FORMAT.md\n{}",
        toml::to_string(&s).context("cannot encode the state")?
    );
    let tmp = ".state.toml.tmp";
    let fd = sys::openat(
        root,
        tmp.as_bytes(),
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::TRUNC
            | rustix::fs::OFlags::CLOEXEC
            | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .context("cannot write the state file")?;
    sys::write_all(fd.as_fd(), text.as_bytes()).context("cannot write the state file")?;
    sys::fsync(fd.as_fd()).context("cannot sync the state file")?;
    drop(fd);
    sys::renameat(root, tmp.as_bytes(), root, NAME.as_bytes())
        .context("cannot replace the state file")?;
    sys::fsync(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_guest_versions_are_checked() {
        let t = format!("format = {FORMAT}\n[tree_guests]\ndb = \"../../etc\"\n");
        assert!(parse(&t).is_err());
        let t = format!("format = {FORMAT}\n[tree_guests]\ndb = \"2\"\n");
        assert_eq!(parse(&t).unwrap().tree_guests["db"], "2");
    }

    #[test]
    fn round_trip() {
        let s = State {
            format: FORMAT,
            pending: Some(Pending {
                version: "2".into(),
                boots: 1,
                boot_id: Some("5e3b1c2a-0d4f-4a7e-9f2b-1c3d5e7f9a0b".into()),
            }),
            restart: Some(Restart {
                target: "2".into(),
                guests: vec!["a".into(), "b".into()],
            }),
            pins: vec!["1".into()],
            serials: [("stable".to_string(), 7)].into(),
            unprotected: true,
            unflagged: true,
            tree_guests: [("db".to_string(), "1".to_string())].into(),
            flip: Some(Flip {
                from: "1".into(),
                to: "2".into(),
            }),
            guests: vec![GuestRecord {
                name: "web".into(),
                layer: 2,
                base: Some("2".into()),
                undo: Some(GuestUndo {
                    layer: 1,
                    base: Some("1".into()),
                }),
                conflicts: vec!["etc/hostname".into()],
                conflicts_more: 0,
            }],
        };
        let text = toml::to_string(&s).unwrap();
        assert_eq!(parse(&text).unwrap(), s);
        assert!(parse("format = 2\n").is_err());
        // Regression (issue 15, 8): version names in the file are checked like any other.
        for bad in [
            "[flip]\nfrom = \"../../x\"\nto = \"2\"\n",
            "[pending]\nversion = \"a/b\"\nboots = 0\n",
            "[restart]\ntarget = \"..\"\nguests = []\n",
            "pins = [\"\"]\n",
            "[[guest]]\nname = \"g\"\nlayer = 1\nbase = \"../x\"\n",
        ] {
            let err = parse(&format!("format = 1\n{bad}")).unwrap_err();
            assert!(
                format!("{err:#}").contains("in the state file"),
                "{bad}: {err:#}"
            );
        }
        assert!(parse("format = 1\nextra = 1\n").is_err());
    }
}
