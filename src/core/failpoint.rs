//! Named failpoints: `TREESWAP_FAILPOINT=<name>` makes the process kill itself with SIGKILL
//! when it reaches that point, the way a power cut or an OOM kill would stop it. Tests use
//! them to prove that every interruption leaves the old tree or the new one. `ALL` lists every
//! name; a test checks that the list and the calls in the code agree.
//! Where the code can fail with an error (an I/O error, a full disk), the point is a
//! [`check`]: `TREESWAP_FAILPOINT=<name>:error` makes it fail there with an I/O error
//! instead, to prove that the error path gives back everything.

use std::sync::OnceLock;

/// Every failpoint, in the order an apply meets them.
pub const ALL: &[&str] = &[
    "import-after-objects",
    "stage-after-build",
    "stage-before-syncfs",
    "stage-after-syncfs",
    "stage-before-commit",
    "stage-after-commit",
    "pool-link-unprotected",
    "apply-after-object",
    "apply-after-objects",
    "flip-before-rename",
    "flip-after-rename",
    "flip-after-previous",
    "guest-before-restart",
    "guest-after-restart",
    "state-before-write",
    "state-after-write",
    "boot-before-count",
    "boot-after-count",
    "gc-after-uninstall",
    "gc-before-object",
];

static ARMED: OnceLock<Option<String>> = OnceLock::new();

fn armed() -> Option<&'static str> {
    ARMED
        .get_or_init(|| std::env::var("TREESWAP_FAILPOINT").ok())
        .as_deref()
}

/// Stops the process here with SIGKILL if `TREESWAP_FAILPOINT` names this point.
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    if armed() == Some(name) {
        log::error!("failpoint `{name}` reached: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// [`hit`], and fails here with an I/O error if `TREESWAP_FAILPOINT` is `<name>:error`.
pub fn check(name: &str) -> std::io::Result<()> {
    hit(name);
    match armed().and_then(|a| a.strip_suffix(":error")) {
        Some(n) if n == name => Err(std::io::Error::other(format!(
            "an error injected at failpoint `{name}`"
        ))),
        _ => Ok(()),
    }
}
