//! `treeswap status` and `treeswap list`.

use anyhow::Result;
use serde::Serialize;

use crate::root::Root;

#[derive(Serialize)]
pub struct Status {
    pub root: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub versions: Vec<String>,
    pub pool_objects: u64,
    pub pool_bytes: u64,
}

pub fn status(root: &Root) -> Result<Status> {
    let objects = root.pool()?.list()?;
    Ok(Status {
        root: root.path.display().to_string(),
        current: root.link("current")?,
        previous: root.link("previous")?,
        versions: root.versions()?,
        pool_objects: objects.len() as u64,
        pool_bytes: objects.iter().map(|o| o.1).sum(),
    })
}

impl Status {
    pub fn to_text(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        format!(
            "root:     {}\ncurrent:  {}\nprevious: {}\nversions: {}\npool:     {} objects, {} bytes\n",
            self.root,
            show(&self.current),
            show(&self.previous),
            if self.versions.is_empty() {
                "(none)".to_string()
            } else {
                self.versions.join(" ")
            },
            self.pool_objects,
            self.pool_bytes
        )
    }

    /// One line per installed version, marked `*` for current and `-` for previous.
    pub fn to_list(&self) -> String {
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
