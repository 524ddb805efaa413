//! `treeswap verify [V] [--full]`: checks an installed tree against its manifest.

use std::os::fd::AsFd;

use anyhow::{Context, Result};

use crate::core::version;
use crate::fs::sys;
use crate::store::root::Root;
use crate::tree::verify::verify_tree;

/// What `verify` found.
pub(crate) struct Report {
    pub version: String,
    pub entries: usize,
    /// One line per difference; empty when the tree matches.
    pub problems: Vec<String>,
}

/// Checks installed `version` (default: `current`) against its manifest; with `full`, every
/// pool object it uses is re-hashed too.
pub(crate) fn verify(root: &Root, version: Option<&str>, full: bool) -> Result<Report> {
    let version = match version {
        Some(v) => v.to_owned(),
        None => root
            .link("current")?
            .context("no version given and no current version")?,
    };
    version::validate(&version)?;
    let m = root.load_manifest(&version)?;
    let trees = root.subdir("trees")?;
    let tree = sys::open_dir_beneath(trees.as_fd(), version.as_bytes())
        .with_context(|| format!("version `{version}` is not installed"))?;
    let layout = root.load_layout(&version)?;
    let problems = verify_tree(tree.as_fd(), &m, &root.pool()?, &layout, full)?;
    Ok(Report {
        version,
        entries: m.entries.len(),
        problems,
    })
}
