//! `treeswap import DIR --version V`: hash a directory into the pool and install it as a tree.
//!
//! Steps: scan and hash DIR (each new object is copied into the pool as it is hashed, and
//! re-hashed while copied so that a file changed under our feet is caught); build
//! `staging/<V>` from the pool; write `manifests/<V>.toml` (through a temporary name; when
//! staging from a snapshot, on another thread meanwhile); `syncfs`; rename `staging/<V>` to
//! `trees/<V>` (the commit point); fsync `trees/`. DIR is only read.

use std::path::Path;

use anyhow::{Result, bail};

use crate::core::config::Config;
use crate::core::error::Fail;
use crate::core::manifest::Manifest;
use crate::core::object::object_id;
use crate::core::version;
use crate::ops::install::{install, while_linking};
use crate::ops::{boot, flip};
use crate::store::root::Root;
use crate::store::state;
use crate::tree::scan;

pub(crate) fn import(root: &Root, cfg: &Config, dir: &Path, version: &str) -> Result<Manifest> {
    version::validate(version)?;
    if root.is_installed(version)? {
        bail!(
            "version `{version}` is already installed in `{}`",
            root.path.display()
        );
    }
    version::check_spelling(version, &root.versions()?)?;
    let pool = root.pool_for(cfg)?;
    let hook = |fd: std::os::fd::BorrowedFd,
                meta: &crate::core::object::Meta,
                size: u64,
                sha: &crate::core::object::Hash|
     -> Result<()> {
        if pool.has(&object_id(meta, size, sha))? {
            return Ok(());
        }
        // Only an integrity error says the file changed; a full disk says so itself.
        match pool.store_file(fd, meta, size, sha) {
            Err(e) if matches!(e.downcast_ref::<Fail>(), Some(Fail::Integrity(_))) => {
                Err(e.context("the file changed while it was being imported"))
            }
            r => r.map(drop),
        }
    };
    // In immutable mode a new object is in the pool before its flag is set: that is recorded
    // (as while staging), so that a crash in between makes `boot` re-protect the pool.
    let mut m = while_linking(root, &pool, || scan::scan(dir, Some(&hook)))??;
    crate::core::failpoint::hit("import-after-objects");
    m.version = Some(version.to_owned());
    log::info!(
        "hashed `{}`: {} entries, digest {}",
        dir.display(),
        m.entries.len(),
        hex::encode(m.digest())
    );
    install(root, cfg, &pool, &m, false, None)?;
    Ok(m)
}

/// `import --activate`: points `current` at the freshly imported `version` (restarting the
/// guests unless `opts` says not to). The first install of a root has nothing to fall back
/// to, so it is marked good at once; any later one is pending until a health check marks it.
pub(crate) fn activate(
    root: &Root,
    cfg: &Config,
    version: &str,
    opts: flip::Options,
) -> Result<()> {
    let st = state::load(root.fd())?;
    flip::switch(root, cfg, version, opts)?;
    if st.pending.is_none() && root.link("previous")?.is_none() {
        boot::mark_good(root, cfg, false)?;
    }
    Ok(())
}
