//! `treeswap gc`, `pin` and `unpin`: remove installed trees nobody needs, then the pool
//! objects no remaining tree uses.
//!
//! A tree is kept if it is current, previous, pending, pinned, named by an unsettled flip or
//! guest restart in the state file, or among the `keep` newest others (by version order).
//! Removing a tree: rename `trees/<V>` into `staging/` (the uninstall is that one rename, so a
//! crash leaves it installed or not), remove its manifest, then delete the files. Objects are
//! garbage when no remaining manifest names them; an object and its link-limit copies go
//! together.
//!
//! Partial downloads (`downloads/<sha256>.part`, kept so that an interrupted `update`
//! resumes) go only from the `gc` command, never from the gc an apply runs when it does not
//! fit (that apply may be reading one): those untouched for [`STALE_DOWNLOAD`], or all of them
//! when asked. The kept indexes cannot tell which are still wanted: `update` keeps an index
//! only once it has applied its deltas, so a download of a newer index is named by none.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::core::config::Config;
use crate::core::object::ObjectId;
use crate::fs::sys;
use crate::store::root::Root;
use crate::store::state;

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    pub trees_removed: Vec<String>,
    pub objects_removed: u64,
    pub bytes_freed: u64,
    /// Partial downloads removed, and their bytes (`downloads`).
    pub downloads_removed: u64,
    pub download_bytes_freed: u64,
}

/// How long a partial download may lie untouched before gc takes it for abandoned: a week,
/// long enough for a machine that was off or offline to come back and resume it.
pub(crate) const STALE_DOWNLOAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// A partial download: `downloads/<64 hex digits>.part`, a regular file.
pub(crate) struct Partial {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: SystemTime,
}

/// The partial downloads in `downloads/` (none if it does not exist). Only regular files
/// named `<sha256>.part` count; the kept indexes and anything else are not looked at. A file
/// removed meanwhile (by the writer `status` does not wait for) is left out.
pub(crate) fn partial_downloads(root: &Root) -> Result<Vec<Partial>> {
    let dir = root.path.join("downloads");
    let entries = match fs_err::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".part")) else {
            continue;
        };
        if stem.len() != 64 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let md = match fs_err::symlink_metadata(e.path()) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if md.is_file() {
            out.push(Partial {
                path: e.path(),
                bytes: md.len(),
                modified: md.modified()?,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Removes the partial downloads untouched for [`STALE_DOWNLOAD`] (`all`: every one) into
/// `report`. The caller holds the writer's lock, so no `update` is appending to one now.
pub(crate) fn downloads(root: &Root, all: bool, report: &mut Report) -> Result<()> {
    let now = SystemTime::now();
    let mut kept = 0;
    for p in partial_downloads(root)? {
        // A time in the future (a clock set back) is not old.
        let age = now.duration_since(p.modified).unwrap_or_default();
        if !all && age < STALE_DOWNLOAD {
            kept += 1;
            continue;
        }
        fs_err::remove_file(&p.path)?;
        log::info!(
            "removed the partial download `{}` ({} bytes, untouched for {} day(s))",
            p.path.display(),
            p.bytes,
            age.as_secs() / 86400
        );
        report.downloads_removed += 1;
        report.download_bytes_freed += p.bytes;
    }
    if kept > 0 {
        log::info!(
            "kept {kept} partial download(s) touched in the last {} days (`gc --downloads` removes them)",
            STALE_DOWNLOAD.as_secs() / 86400
        );
    }
    Ok(())
}

/// The versions gc must keep whatever `keep` says: current, previous, and every version the
/// state file names (pins, the pending tree, an unsettled flip, guests to restart).
fn protected(root: &Root, cfg: &Config) -> Result<HashSet<String>> {
    let st = state::load(root.fd())?;
    // The trees guests run on (after a `--no-restart` flip, say), and those a flip back
    // would remount overlay guests on.
    let mut keep: HashSet<String> = crate::ops::guest::trees_in_use(root, cfg, &st)?
        .into_iter()
        .collect();
    keep.extend(st.pins);
    keep.extend(root.link("current")?);
    keep.extend(root.link("previous")?);
    keep.extend(st.pending.map(|p| p.version));
    // A flip cut short (before `boot` settled it) names the tree it left, which may be the
    // only good one, and the tree whose guests are still to restart.
    keep.extend(st.flip.into_iter().flat_map(|f| [f.from, f.to]));
    keep.extend(st.restart.map(|r| r.target));
    Ok(keep)
}

impl Report {
    /// One line for the user: what was removed and how much it freed.
    pub(crate) fn summary(&self) -> String {
        let names = if self.trees_removed.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.trees_removed.join(" "))
        };
        let downloads = match self.downloads_removed {
            0 => String::new(),
            n => format!(
                ", {n} partial download(s) ({} bytes)",
                self.download_bytes_freed
            ),
        };
        format!(
            "removed {} tree(s){names}, {} object(s), {} bytes{downloads}",
            self.trees_removed.len(),
            self.objects_removed,
            self.bytes_freed
        )
    }
}

/// Runs gc; `also_keep` names versions an ongoing operation needs (the base of an apply).
pub(crate) fn gc(root: &Root, cfg: &Config, keep: usize, also_keep: &[&str]) -> Result<Report> {
    let mut report = Report::default();
    let mut protected = protected(root, cfg)?;
    protected.extend(also_keep.iter().map(|v| v.to_string()));
    let mut others: Vec<String> = root
        .versions()?
        .into_iter()
        .filter(|v| !protected.contains(v))
        .collect();
    others.sort_by(|a, b| crate::core::version::compare(b, a));
    let trees = root.subdir("trees")?;
    let staging = root.subdir("staging")?;
    for v in others.into_iter().skip(keep) {
        let doomed = format!(".gc-{v}");
        sys::renameat(
            trees.as_fd(),
            v.as_bytes(),
            staging.as_fd(),
            doomed.as_bytes(),
        )
        .with_context(|| format!("cannot remove `trees/{v}`"))?;
        sys::fsync(trees.as_fd())?;
        crate::core::failpoint::hit("gc-after-uninstall");
        root.forget(&v)?;
        // Uninstalled already: what cannot be removed is set aside, with a warning.
        root.remove_or_set_aside(staging.as_fd(), "staging", doomed.as_bytes());
        log::info!("removed version `{v}`");
        report.trees_removed.push(v);
    }

    // Objects any remaining tree names.
    let mut used: HashSet<ObjectId> = HashSet::new();
    for v in root.versions()? {
        let m = root
            .load_manifest(&v)
            .with_context(|| format!("gc needs the manifest of `{v}`"))?;
        used.extend(m.entries.iter().filter_map(|e| e.object()));
    }
    let pool = root.pool()?;
    pool.for_each_dir(|dir, prefix| {
        let mut names = sys::read_dir(dir)?;
        // Copies (`<id>.<n>`) sort after their object; remove them first.
        names.sort_by(|a, b| b.cmp(a));
        for name in names {
            let hexpart = name.split(|&b| b == b'.').next().unwrap_or_default();
            let mut id = [0u8; 32];
            if hex::decode_to_slice(hexpart, &mut id).is_err() {
                bail!(
                    "unexpected file `pool/{prefix}{}`",
                    crate::core::path::display(&name)
                );
            }
            if used.contains(&id) {
                continue;
            }
            if let Some(st) = sys::lstatat(dir, &name)? {
                report.bytes_freed += st.st_size as u64;
            }
            crate::core::failpoint::hit("gc-before-object");
            crate::fs::iflags::unlink_protected(dir, &name)?;
            if !name.contains(&b'.') {
                report.objects_removed += 1;
            }
        }
        Ok(())
    })?;
    root.syncfs()?;
    Ok(report)
}

/// Pins or unpins an installed version.
pub(crate) fn pin(root: &Root, version: &str, on: bool) -> Result<()> {
    crate::core::version::validate(version)?;
    if on && !root.is_installed(version)? {
        bail!("version `{version}` is not installed");
    }
    let mut st = state::load(root.fd())?;
    st.pins.retain(|p| p != version);
    if on {
        st.pins.push(version.to_owned());
        st.pins.sort_by(|a, b| crate::core::version::compare(a, b));
    }
    crate::store::state::save(root.fd(), &st)
}
