//! `treeswap status` and `treeswap list`. Both read without the lock (what writers replace
//! atomically), so they answer while a writer works, and say what it is doing.

use std::collections::HashMap;

use anyhow::Result;
use serde::Serialize;

use crate::core::config::Config;
use crate::core::object::ObjectId;
use crate::store::root::{Activity, LastApply, Root};

/// The version of the JSON that `status --json` and `list --json` print (FORMAT.md).
pub(crate) const SCHEMA: u32 = 1;

#[derive(Serialize)]
pub(crate) struct Status {
    pub schema: u32,
    pub root: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub versions: Vec<String>,
    pub pool_objects: u64,
    pub pool_bytes: u64,
    pub boot: BootStatus,
    /// Guests recorded as still to restart (after an interrupted flip).
    pub guests_pending: Vec<String>,
    /// Versions gc keeps.
    pub pinned: Vec<String>,
    /// The copy-on-write protection new trees get (`immutable`, `reflink` or `hardlink`).
    pub protect: &'static str,
    /// Each installed tree.
    pub trees: Vec<Tree>,
    /// The writer holding the lock, if one is working now.
    pub activity: Option<Activity>,
    /// The outcome of the last `apply` that got the lock.
    pub last_apply: Option<LastApply>,
    /// `update`'s partial downloads (`downloads/*.part`).
    pub downloads: Downloads,
    // ---- guests (issue 16) ----
    /// Each configured guest: overlay or tree, its layer, where it is mounted, the conflicts
    /// of its last merge.
    pub guests: Vec<crate::ops::guest::Info>,
}

/// One installed tree, as `status --json` and `list --json` show it.
#[derive(Serialize)]
pub(crate) struct Tree {
    pub version: String,
    pub digest: String,
    /// Entries of its manifest.
    pub entries: u64,
    /// When it was installed (its manifest was published), in seconds since the epoch.
    pub installed: Option<u64>,
    /// Bytes of the objects no other installed tree uses: what removing it frees.
    pub unique_bytes: u64,
    pub current: bool,
    pub previous: bool,
    pub pending: bool,
    pub pinned: bool,
}

/// The partial downloads `update` keeps to resume: how many, and their bytes.
#[derive(Serialize)]
pub(crate) struct Downloads {
    pub partial: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub(crate) struct BootStatus {
    /// `good` or `pending`.
    pub state: &'static str,
    /// The pending version, if any.
    pub pending: Option<String>,
    pub boots: u32,
    pub tries_left: Option<u32>,
}

pub(crate) fn status(root: &Root, cfg: &Config) -> Result<Status> {
    let objects = root.pool()?.list()?;
    let st = crate::store::state::load(root.fd())?;
    let boot = match &st.pending {
        Some(p) => BootStatus {
            state: "pending",
            pending: Some(p.version.clone()),
            boots: p.boots,
            tries_left: Some(cfg.boot.tries.saturating_sub(p.boots)),
        },
        None => BootStatus {
            state: "good",
            pending: None,
            boots: 0,
            tries_left: None,
        },
    };
    let current = root.link("current")?;
    let previous = root.link("previous")?;
    let versions = root.versions()?;
    let trees = trees(root, &versions, &current, &previous, &st)?;
    let guests = crate::ops::guest::infos(root, cfg, &st)?;
    let partial = crate::ops::gc::partial_downloads(root)?;
    Ok(Status {
        schema: SCHEMA,
        root: root.path.display().to_string(),
        current,
        previous,
        versions,
        pool_objects: objects.len() as u64,
        pool_bytes: objects.iter().map(|o| o.1).sum(),
        boot,
        guests_pending: st.restart.map(|r| r.guests).unwrap_or_default(),
        pinned: st.pins,
        // Probing needs a writable root; a read-only one gets no new trees anyway.
        protect: root
            .pool_for(cfg)
            .map(|p| p.mode().name())
            .unwrap_or("unknown"),
        trees,
        activity: root.activity()?,
        last_apply: root.last_apply()?,
        downloads: Downloads {
            partial: partial.len() as u64,
            bytes: partial.iter().map(|p| p.bytes).sum(),
        },
        guests,
    })
}

/// Each installed tree, from its manifest: digest, entries, install time, and the bytes of
/// the objects only it uses. A tree removed meanwhile (by a `gc` running now) is left out.
fn trees(
    root: &Root,
    versions: &[String],
    current: &Option<String>,
    previous: &Option<String>,
    st: &crate::store::state::State,
) -> Result<Vec<Tree>> {
    // Each object's first tree, whether another tree uses it too, and its size.
    let mut users: HashMap<ObjectId, (usize, bool, u64)> = HashMap::new();
    let mut out = Vec::new();
    for v in versions {
        let (m, digest) = match root.load_manifest_declared(v) {
            Ok(md) => md,
            Err(e) if !root.is_installed(v)? => {
                log::debug!("`{v}` went away while it was read: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        for e in &m.entries {
            if let (Some(id), crate::core::manifest::Kind::File { size, .. }) =
                (e.object(), &e.kind)
            {
                let u = users.entry(id).or_insert((out.len(), false, *size));
                u.1 |= u.0 != out.len();
            }
        }
        out.push(Tree {
            version: v.clone(),
            digest: hex::encode(digest),
            entries: m.entries.len() as u64,
            installed: root.installed_at(v)?,
            unique_bytes: 0,
            current: current.as_ref() == Some(v),
            previous: previous.as_ref() == Some(v),
            pending: st.pending.as_ref().is_some_and(|p| &p.version == v),
            pinned: st.pins.contains(v),
        });
    }
    for &(first, shared, size) in users.values() {
        if !shared {
            out[first].unique_bytes += size;
        }
    }
    Ok(out)
}

impl Status {
    pub(crate) fn to_text(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        format!(
            "root:     {}\ncurrent:  {}\nprevious: {}\nversions: {}\npool:     {} objects, {} bytes\nboot:     {}\nprotect:  {}\ndownloads: {} partial, {} bytes\n{}{}",
            self.root,
            show(&self.current),
            show(&self.previous),
            if self.versions.is_empty() {
                "(none)".to_string()
            } else {
                self.versions.join(" ")
            },
            self.pool_objects,
            self.pool_bytes,
            match &self.boot.pending {
                Some(v) => format!(
                    "`{v}` pending, {} boot(s) left before it reverts",
                    self.boot.tries_left.unwrap_or(0)
                ),
                None => "good".to_string(),
            },
            self.protect,
            self.downloads.partial,
            self.downloads.bytes,
            match &self.activity {
                Some(a) => format!("working:  `{}` (pid {}) since {}\n", a.op, a.pid, a.since),
                None => String::new(),
            },
            match &self.last_apply {
                Some(l) => format!(
                    "last apply: {}{} at {}\n",
                    l.result,
                    l.to.as_ref().map(|t| format!(" `{t}`")).unwrap_or_default(),
                    l.time
                ),
                None => String::new(),
            }
        ) + &self
            .guests
            .iter()
            .map(|g| format!("guest:    {}\n", g.line()))
            .collect::<String>()
    }

    /// What `list --json` prints: the schema version and the trees.
    pub(crate) fn list_json(&self) -> serde_json::Value {
        serde_json::json!({ "schema": self.schema, "trees": self.trees })
    }

    /// One line per installed version, marked `*` for current and `-` for previous.
    pub(crate) fn to_list(&self) -> String {
        let mut out = String::new();
        for v in &self.versions {
            let mark = if Some(v) == self.current.as_ref() {
                "* "
            } else if Some(v) == self.previous.as_ref() {
                "- "
            } else {
                "  "
            };
            out.push_str(mark);
            out.push_str(v);
            out.push('\n');
        }
        out
    }
}
