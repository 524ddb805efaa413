//! Flipping `current`: the one `rename(2)` at which the running system changes.

use anyhow::{Result, bail};

use crate::error::Fail;
use crate::root::Root;

/// Points `current` at `version` and `previous` at what was current. `current` is replaced
/// first (the commit point); a crash before `previous` is updated leaves `previous` naming an
/// older tree, which `boot` repairs.
pub fn switch(root: &Root, version: &str) -> Result<()> {
    crate::version::validate(version)?;
    if !root.is_installed(version)? {
        bail!(
            "version `{version}` is not installed in `{}`",
            root.path.display()
        );
    }
    let old = root.link("current")?;
    if old.as_deref() == Some(version) {
        return Err(Fail::Nothing(format!("`{version}` is already current")).into());
    }
    root.set_link("current", version)?;
    if let Some(old) = old {
        root.set_link("previous", &old)?;
    }
    log::info!("current is now `{version}`");
    Ok(())
}

/// Flips `current` back to `previous`, and `previous` to what was current.
pub fn revert(root: &Root) -> Result<String> {
    let Some(prev) = root.link("previous")? else {
        return Err(Fail::Nothing("there is no previous version to revert to".into()).into());
    };
    switch(root, &prev)?;
    Ok(prev)
}
