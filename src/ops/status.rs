//! `treeswap status` and `treeswap list`.

use anyhow::Result;
use serde::Serialize;

use crate::core::config::Config;
use crate::store::root::Root;

#[derive(Serialize)]
pub(crate) struct Status {
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
    Ok(Status {
        root: root.path.display().to_string(),
        current: root.link("current")?,
        previous: root.link("previous")?,
        versions: root.versions()?,
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
    })
}

impl Status {
    pub(crate) fn to_text(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        format!(
            "root:     {}\ncurrent:  {}\nprevious: {}\nversions: {}\npool:     {} objects, {} bytes\nboot:     {}\nprotect:  {}\n",
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
            self.protect
        )
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
