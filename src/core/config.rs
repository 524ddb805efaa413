//! The configuration file (`--config`, `TREESWAP_CONFIG`, default `/etc/treeswap.toml`).
//! Parsing is pure; an unknown key or a wrong type is an error naming the file, line and key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub(crate) const DEFAULT_CONFIG: &str = "/etc/treeswap.toml";
/// The longest a guest restart may be given, in seconds (a day): a bigger number is a typo,
/// and one near `u64::MAX` overflowed the deadline after `current` had flipped.
const MAX_TIMEOUT: u64 = 24 * 3600;
/// The most boots a new tree may be given before it must be marked good.
const MAX_TRIES: u32 = 1000;
/// The largest `[trust] max_entries`: far more entries than any tree has.
const MAX_ENTRIES: u64 = 1 << 30;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The state root; `--root` overrides it.
    #[serde(default)]
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub boot: Boot,
    /// Guests, in the order they are restarted.
    #[serde(default, rename = "guest")]
    pub guests: Vec<Guest>,
    #[serde(default)]
    pub trust: Trust,
    /// What `mark-good --check` runs before it marks a tree good.
    #[serde(default)]
    pub health: Health,
    /// Run `gc` before an apply that does not fit in the free space.
    #[serde(default)]
    pub gc_before_apply: bool,
    /// Copy-on-write protection of the pool: auto, immutable, reflink or hardlink.
    #[serde(default)]
    pub protect: Protect,
    /// Globs of paths that get private, writable copies instead of links.
    #[serde(default)]
    pub private: Vec<String>,
    /// Where `treeswap update` gets releases (issue 18).
    #[serde(default)]
    pub update: Update,
}

// --- [update] (issue 18) ---
/// The `[update]` table: the release repository `treeswap update` follows.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// The repository's top (`http://`, `https://` or `file://`); the index is
    /// `<url>/<channel>/index.toml`. `--url` overrides it.
    #[serde(default)]
    pub url: Option<String>,
    /// The channel followed; `--channel` overrides it.
    #[serde(default = "default_channel")]
    pub channel: String,
    /// Servers that hold copies of the repository's delta files, tried before `url`; the
    /// index never comes from them.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// A PEM file of the CA certificates that https servers are checked against, instead of
    /// the built-in web roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Seconds without a byte (or with less than 1 KiB) after which a transfer counts as
    /// stalled and is retried.
    #[serde(default = "default_stall")]
    pub stall_timeout: u64,
    /// How many times a source is tried again after a failure without progress.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_channel() -> String {
    "stable".into()
}
fn default_stall() -> u64 {
    30
}
fn default_retries() -> u32 {
    4
}

impl Default for Update {
    fn default() -> Self {
        Update {
            url: None,
            channel: default_channel(),
            mirrors: Vec::new(),
            ca: None,
            stall_timeout: default_stall(),
            retries: default_retries(),
        }
    }
}
// --- end of [update] ---

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    /// minisign public key files; with any, only deltas signed by one of them are applied.
    #[serde(default)]
    pub public_keys: Vec<PathBuf>,
    /// Whether a delta may create device nodes.
    #[serde(default = "yes")]
    pub allow_devices: bool,
    /// The most entries a delta may change or remove, and the most its result may have:
    /// `apply` holds each changed entry in memory (about 400 bytes).
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
}

fn default_max_entries() -> u64 {
    crate::core::delta::DEFAULT_MAX_ENTRIES
}

fn yes() -> bool {
    true
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            public_keys: Vec::new(),
            allow_devices: true,
            max_entries: default_max_entries(),
        }
    }
}

/// The `[health]` table: the site's own health check.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// An argv (no shell) that must exit 0 for the current tree to be healthy; none by default.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Seconds the command may take before it counts as failed.
    #[serde(default = "default_check_timeout")]
    pub timeout: u64,
}

fn default_check_timeout() -> u64 {
    60
}

impl Default for Health {
    fn default() -> Self {
        Health {
            command: None,
            timeout: default_check_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// Boots a new tree gets before it must be marked good; 0 turns boot counting off.
    #[serde(default = "default_tries")]
    pub tries: u32,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            tries: default_tries(),
        }
    }
}

fn default_tries() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub name: String,
    /// The argv that restarts it (no shell); default `["vserver", NAME, "restart"]`.
    #[serde(default)]
    pub restart: Option<Vec<String>>,
    /// Seconds a restart may take before it counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// An argv (no shell) that must exit 0 for the guest to be healthy (`mark-good --check`),
    /// within `check_timeout` seconds; none by default.
    #[serde(default)]
    pub check: Option<Vec<String>>,
    #[serde(default = "default_check_timeout")]
    pub check_timeout: u64,
}

fn default_timeout() -> u64 {
    120
}

impl Guest {
    pub fn argv(&self) -> Vec<String> {
        match &self.restart {
            Some(v) => v.clone(),
            None => vec!["vserver".into(), self.name.clone(), "restart".into()],
        }
    }
}

/// Parses configuration text; `origin` names it in errors.
pub(crate) fn parse(text: &str, origin: &str) -> Result<Config> {
    let cfg: Config = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        // The message may quote what was read (an unknown key, a value): a bounded part of it.
        let msg = crate::core::path::quote_at_most(e.message().replace('\n', " "), 120);
        match line {
            Some(l) => anyhow::anyhow!("{origin}, line {l}: {msg}"),
            None => anyhow::anyhow!("{origin}: {msg}"),
        }
    })?;
    let mut names = std::collections::HashSet::new();
    for g in &cfg.guests {
        if g.name.is_empty() || !names.insert(g.name.as_str()) {
            bail!(
                "{origin}: guest names must be non-empty and unique (`{}`)",
                crate::core::path::quote(&g.name)
            );
        }
        if g.argv().is_empty() {
            bail!(
                "{origin}: guest `{}` has an empty `restart`",
                crate::core::path::quote(&g.name)
            );
        }
        let name = crate::core::path::quote(&g.name);
        check_seconds(origin, &format!("guest `{name}`: timeout"), g.timeout)?;
        check_argv(
            origin,
            &format!("guest `{name}`: check"),
            g.check.as_deref(),
        )?;
        check_seconds(
            origin,
            &format!("guest `{name}`: check_timeout"),
            g.check_timeout,
        )?;
    }
    check_argv(origin, "health.command", cfg.health.command.as_deref())?;
    check_seconds(origin, "health.timeout", cfg.health.timeout)?;
    if !(1..=MAX_ENTRIES).contains(&cfg.trust.max_entries) {
        bail!(
            "{origin}: trust.max_entries = {} is out of range (1 to {MAX_ENTRIES})",
            cfg.trust.max_entries
        );
    }
    // [update] (issue 18)
    crate::core::index::validate_channel(&cfg.update.channel)
        .with_context(|| format!("{origin}: update.channel"))?;
    check_seconds(origin, "update.stall_timeout", cfg.update.stall_timeout)?;
    if cfg.update.retries > 100 {
        bail!(
            "{origin}: update.retries = {} is out of range (0 to 100)",
            cfg.update.retries
        );
    }
    if cfg.boot.tries > MAX_TRIES {
        bail!(
            "{origin}: boot.tries = {} is out of range (0 to {MAX_TRIES})",
            cfg.boot.tries
        );
    }
    Ok(cfg)
}

/// An argv from the config must name a program.
fn check_argv(origin: &str, what: &str, argv: Option<&[String]>) -> Result<()> {
    if argv.is_some_and(|a| a.first().is_none_or(|p| p.is_empty())) {
        bail!("{origin}: {what} is empty (give an argv: a program and its arguments)");
    }
    Ok(())
}

fn check_seconds(origin: &str, what: &str, n: u64) -> Result<()> {
    if !(1..=MAX_TIMEOUT).contains(&n) {
        bail!("{origin}: {what} = {n} is out of range (1 to {MAX_TIMEOUT} seconds)");
    }
    Ok(())
}

/// Loads the configuration: `explicit` (from `--config` or the environment) must exist; the
/// default file may be missing, which means built-in defaults.
pub(crate) fn load(explicit: Option<&Path>) -> Result<Config> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut cfg = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text, &format!("config file `{}`", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config file `{}`", path.display()));
        }
    };
    // `TREESWAP_PROTECT` overrides `protect` (tests and one-off runs).
    if let Ok(p) = std::env::var("TREESWAP_PROTECT") {
        cfg.protect = toml::Value::String(p.clone()).try_into().map_err(|_| {
            anyhow::anyhow!(
                "TREESWAP_PROTECT=`{}`: use auto, immutable, reflink or hardlink",
                crate::core::path::quote(&p)
            )
        })?;
    }
    Ok(cfg)
}

/// The `protect` key: how the pool is protected from writes through a tree (see
/// `store::protect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protect {
    #[default]
    Auto,
    Immutable,
    Reflink,
    Hardlink,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example() {
        let c = parse(
            "root = \"/versions\"\n[boot]\ntries = 2\n[[guest]]\nname = \"web\"\n[[guest]]\nname = \"db\"\nrestart = [\"/bin/true\"]\ntimeout = 5\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.boot.tries, 2);
        assert_eq!(c.guests[0].argv(), ["vserver", "web", "restart"]);
        assert_eq!(c.guests[1].argv(), ["/bin/true"]);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("root = \"/v\"\n\n[boot]\ntires = 3\n", "cfg").unwrap_err();
        let s = format!("{e:#}");
        assert!(s.contains("line 4") && s.contains("tires"), "{s}");
        let e = parse("[boot]\ntries = \"x\"\n", "cfg").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }

    /// Regression (issue 15, 8): a huge timeout panicked after `current` had flipped.
    #[test]
    fn numbers_out_of_range_are_refused() {
        let guest = |timeout: &str| format!("[[guest]]\nname = \"g\"\ntimeout = {timeout}\n");
        let cases = [
            (
                guest("9223372036854775807"),
                "timeout = 9223372036854775807 is out of range",
            ),
            (guest("0"), "timeout = 0 is out of range"),
            (guest("86401"), "timeout = 86401 is out of range"),
            (
                "[boot]\ntries = 1001\n".to_owned(),
                "boot.tries = 1001 is out of range",
            ),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", parse(&text, "cfg").unwrap_err());
            assert!(e.starts_with("cfg: ") && e.contains(want), "{text}: {e}");
        }
        assert!(parse(&guest("86400"), "cfg").is_ok());
        assert!(parse("[boot]\ntries = 1000\n", "cfg").is_ok());
    }
}

#[cfg(test)]
mod readme_tests {
    /// The example in the README's Configuration section is a valid config.
    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("README has a Configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let cfg = super::parse(block, "README").unwrap();
        assert_eq!(cfg.guests.len(), 1);
        assert_eq!(cfg.trust.public_keys.len(), 1);
        assert_eq!(cfg.private.len(), 2);
    }
}
