//! Named failpoints: `TREESWAP_FAILPOINT=<name>` makes the process kill itself with SIGKILL
//! when it reaches that point, the way a power cut or an OOM kill would stop it. Tests use
//! them to prove that every interruption leaves the old tree or the new one. `ALL` lists every
//! name; a test checks that the list and the calls in the code agree.

use std::sync::OnceLock;

/// Every failpoint, in the order an apply meets them.
pub const ALL: &[&str] = &[
    "import-after-objects",
    "stage-after-build",
    "stage-before-syncfs",
    "stage-after-syncfs",
    "stage-after-commit",
    "apply-after-object",
    "apply-after-objects",
    "flip-after-state",
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

/// Stops the process here with SIGKILL if `TREESWAP_FAILPOINT` names this point.
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    let armed = ARMED.get_or_init(|| std::env::var("TREESWAP_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        log::error!("failpoint `{name}` reached: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
