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

fn default_stop_grace() -> u64 {
    5
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

// ---- guests (issue 16) ------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub name: String,
    /// What the guest runs on: its own overlay over the tree (the default for a guest with
    /// `start` and `stop`), or the tree itself (the default for a guest with only `restart`,
    /// as before overlays existed).
    #[serde(default)]
    pub root: Option<GuestRoot>,
    /// The argv that restarts it in one step (no shell); tree mode only. There is no default:
    /// treeswap assumes no container tool.
    #[serde(default)]
    pub restart: Option<Vec<String>>,
    /// The argv that stops it (no shell); it must succeed when the guest is not running.
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// The argv that starts it on `TREESWAP_ROOTFS` (no shell).
    #[serde(default)]
    pub start: Option<Vec<String>>,
    /// Seconds each hook may take before it counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// An argv (no shell) that must exit 0 for the guest to be healthy (`mark-good --check`),
    /// within `check_timeout` seconds; none by default.
    #[serde(default)]
    pub check: Option<Vec<String>>,
    #[serde(default = "default_check_timeout")]
    pub check_timeout: u64,
    /// Overlay guests: seconds the guest's old overlay may take to go after `stop` (a
    /// container's mount namespace is torn down a moment after its last process) before the
    /// guest counts as not stopped.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: u64,
    /// Globs of paths (from the guest's `/`) whose local copies are always kept, whatever the
    /// release does: the guest's own data.
    #[serde(default)]
    pub state: Vec<String>,
    /// What a conflict (a file both the guest and the release changed) comes to, unless a
    /// `keep` or `take` glob says otherwise.
    #[serde(default)]
    pub conflict: Policy,
    /// Globs of paths whose conflicts keep the local copy (checked before `take`).
    #[serde(default)]
    pub keep: Vec<String>,
    /// Globs of paths whose conflicts take the release's copy; the local one is saved beside
    /// it as `<name>.treeswap-local`.
    #[serde(default)]
    pub take: Vec<String>,
}

/// `[[guest]] root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestRoot {
    Overlay,
    Tree,
}

/// `[[guest]] conflict`: what a file both the guest and the release changed comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The guest's copy stays.
    #[default]
    Keep,
    /// The release's copy shows; the guest's is saved as `<name>.treeswap-local`.
    Take,
}

fn default_timeout() -> u64 {
    120
}

impl Guest {
    /// Where the guest runs (see `root`).
    pub fn root(&self) -> GuestRoot {
        self.root.unwrap_or(match self.start {
            Some(_) => GuestRoot::Overlay,
            None => GuestRoot::Tree,
        })
    }

    pub fn is_overlay(&self) -> bool {
        self.root() == GuestRoot::Overlay
    }
}

/// The checks of one `[[guest]]` table beyond its types.
fn check_guest(origin: &str, g: &Guest) -> Result<()> {
    let name = crate::core::path::quote(&g.name);
    let what = |k: &str| format!("guest `{name}`: {k}");
    for (k, argv) in [
        ("restart", &g.restart),
        ("stop", &g.stop),
        ("start", &g.start),
    ] {
        check_argv(origin, &what(k), argv.as_deref())?;
    }
    match (&g.restart, &g.stop, &g.start) {
        (None, None, None) => bail!(
            "{origin}: guest `{name}` has no hook: give `stop` and `start` (or `restart`); \
             treeswap assumes no container tool (see scripts/guests/)"
        ),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            bail!("{origin}: guest `{name}`: give either `restart`, or `stop` and `start`")
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            bail!("{origin}: guest `{name}`: `stop` and `start` go together")
        }
        _ => {}
    }
    if g.is_overlay() {
        if g.start.is_none() {
            bail!(
                "{origin}: guest `{name}`: root = \"overlay\" needs `stop` and `start` (its \
                 overlay is remounted between the two); `restart` alone runs it on the tree"
            );
        }
        // The name is a directory of `<root>/guests/`, and a part of mount options.
        let plain = g
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain || g.name.starts_with('.') || g.name.len() > 64 {
            bail!(
                "{origin}: guest `{name}`: an overlay guest's name is at most 64 letters, \
                 digits, `.`, `_` and `-`, not starting with `.`"
            );
        }
    }
    for (k, globs) in [("state", &g.state), ("keep", &g.keep), ("take", &g.take)] {
        for p in globs {
            if let Err(e) = glob::Pattern::new(p.trim_start_matches('/')) {
                bail!(
                    "{origin}: {}: `{}` is not a glob: {e}",
                    what(k),
                    crate::core::path::quote(p)
                );
            }
        }
    }
    check_seconds(origin, &what("timeout"), g.timeout)?;
    check_argv(origin, &what("check"), g.check.as_deref())?;
    check_seconds(origin, &what("check_timeout"), g.check_timeout)?;
    if g.stop_grace > 3600 {
        bail!(
            "{origin}: {} = {} is out of range (0 to 3600 seconds)",
            what("stop_grace"),
            g.stop_grace
        );
    }
    Ok(())
}

/// Overlay guests and the pool's protection (see `store::protect`): the immutable flag of a
/// lower file is copied up and refuses the guest's write, so `auto` leaves it out and an
/// explicit `immutable` is refused.
fn check_protect(origin: &str, cfg: &mut Config) -> Result<()> {
    if !cfg.guests.iter().any(Guest::is_overlay) {
        return Ok(());
    }
    match cfg.protect {
        Protect::Immutable => bail!(
            "{origin}: protect = \"immutable\" cannot serve overlay guests (the flag is \
             copied up and refuses their writes); use auto, reflink or hardlink"
        ),
        Protect::Auto => cfg.protect = Protect::AutoUnflagged,
        _ => {}
    }
    Ok(())
}

// ---- end of guests ---------------------------------------------------------------------

/// Parses configuration text; `origin` names it in errors.
pub(crate) fn parse(text: &str, origin: &str) -> Result<Config> {
    let mut cfg: Config = toml::from_str(text).map_err(|e| {
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
    }
    for g in &cfg.guests {
        check_guest(origin, g)?;
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
    check_protect(origin, &mut cfg)?;
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
        check_protect("TREESWAP_PROTECT", &mut cfg)?;
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
    /// `auto` where overlay guests run: reflink, else hardlink, never the immutable flag.
    #[serde(skip)]
    AutoUnflagged,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_example() {
        let c = parse(
            "root = \"/versions\"\n[boot]\ntries = 2\n[[guest]]\nname = \"web\"\nrestart = [\"vserver\", \"web\", \"restart\"]\n[[guest]]\nname = \"db\"\nrestart = [\"/bin/true\"]\ntimeout = 5\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.boot.tries, 2);
        // Issue 16: there is no default hook (the old `["vserver", NAME, "restart"]` assumed
        // a tool no current distribution ships): a guest without one is refused.
        let e = format!(
            "{:#}",
            parse("[[guest]]\nname = \"web\"\n", "t").unwrap_err()
        );
        assert!(e.contains("has no hook"), "{e}");
        assert_eq!(
            c.guests[0].restart.as_deref().unwrap(),
            ["vserver", "web", "restart"]
        );
        assert_eq!(c.guests[1].restart.as_deref().unwrap(), ["/bin/true"]);
        assert_eq!(c.guests[1].root(), GuestRoot::Tree);
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
        let guest = |timeout: &str| {
            format!("[[guest]]\nname = \"g\"\nrestart = [\"true\"]\ntimeout = {timeout}\n")
        };
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
