//! Named failpoints: `TREESWAP_FAILPOINT=<name>` makes the process kill itself with SIGKILL
//! when it reaches that point, the way a power cut or an OOM kill would stop it. Tests use
//! them to prove that every interruption leaves the old tree or the new one. `ALL` lists every
//! name; a test checks that the list and the calls in the code agree.
//!
//! Many points are passed more than once in one command (`apply-after-object` after each
//! content, the guest points for each guest, the state points at each write of the state
//! file, `gc-before-object` for each object). `<name>@<N>` kills at the N-th hit of `name`
//! in this process (counting from 1; `<name>` alone is `<name>@1`), so that the later steps
//! can be interrupted too. Hits on other threads count in the order they happen.
//!
//! Where the code can fail with an error (an I/O error, a full disk), the point is a
//! [`check`]: `TREESWAP_FAILPOINT=<name>:error` (or `<name>@<N>:error`) makes it fail there,
//! at that one hit, with an I/O error instead, to prove that the error path gives back
//! everything.
//!
//! To find how often an operation passes each point, `TREESWAP_FAILPOINT_COUNT=1` writes a
//! line `treeswap: failpoint `<name>` hit <N>` to stderr at every hit of every point.
//!
//! With neither variable set, a point costs one read of a value cached at the first hit.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every failpoint, in the order an apply meets them.
pub const ALL: &[&str] = &[
    "import-after-objects",
    "stage-after-build",
    "stage-before-syncfs",
    "stage-after-syncfs",
    "stage-before-commit",
    "stage-after-commit",
    "tmpfile-before-publish",
    "pool-link-unprotected",
    "pool-flags-midway",
    "apply-after-object",
    "apply-after-objects",
    "flip-before-rename",
    "flip-after-rename",
    "flip-after-previous",
    "guest-before-restart",
    "guest-before-remount",
    "guest-merge-midway",
    "guest-before-start",
    "guest-after-restart",
    "state-before-write",
    "state-after-write",
    "boot-before-count",
    "boot-after-count",
    "gc-after-uninstall",
    "gc-before-object",
];

/// What the environment asks for.
#[derive(Debug, PartialEq, Eq)]
struct Armed {
    /// The armed point and the hit (from 1) that fires, if any.
    point: Option<(String, u64)>,
    /// Fail with an error at that hit instead of being killed.
    error: bool,
    /// Write every hit of every point to stderr.
    count: bool,
}

/// Parses `TREESWAP_FAILPOINT` (`<name>[@<N>][:error]`) and whether counting is on; `None`
/// when nothing is asked for. A value that does not parse arms nothing, with a warning.
fn parse(spec: Option<&str>, count: bool) -> Option<Armed> {
    let mut armed = Armed {
        point: None,
        error: false,
        count,
    };
    if let Some(spec) = spec.filter(|s| !s.is_empty()) {
        let (rest, error) = match spec.strip_suffix(":error") {
            Some(r) => (r, true),
            None => (spec, false),
        };
        let (name, at) = match rest.split_once('@') {
            Some((n, at)) => (n, at.parse::<u64>().ok().filter(|&at| at > 0)),
            None => (rest, Some(1)),
        };
        match at {
            Some(at) if ALL.contains(&name) => {
                armed.point = Some((name.to_owned(), at));
                armed.error = error;
            }
            Some(_) => log::warn!("TREESWAP_FAILPOINT: no failpoint is named `{name}`"),
            None => log::warn!("TREESWAP_FAILPOINT: `{spec}` is not `<name>@<N>` with N >= 1"),
        }
    }
    (armed.point.is_some() || armed.count).then_some(armed)
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Hits of the armed point so far.
static HITS: AtomicU64 = AtomicU64::new(0);

/// Hits of each point of [`ALL`] so far, when counting.
static COUNTS: [AtomicU64; ALL.len()] = [const { AtomicU64::new(0) }; ALL.len()];

fn armed() -> Option<&'static Armed> {
    ARMED
        .get_or_init(|| {
            let count = std::env::var_os("TREESWAP_FAILPOINT_COUNT").is_some_and(|v| v == "1");
            parse(std::env::var("TREESWAP_FAILPOINT").ok().as_deref(), count)
        })
        .as_ref()
}

/// Counts a hit of `name`; `Some(n)` if it is the armed hit, the n-th.
fn reached(name: &str) -> Option<(&'static Armed, u64)> {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    let a = armed()?;
    if a.count
        && let Some(i) = ALL.iter().position(|&p| p == name)
    {
        let n = COUNTS[i].fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("treeswap: failpoint `{name}` hit {n}");
    }
    let (point, at) = a.point.as_ref()?;
    if point != name {
        return None;
    }
    let n = HITS.fetch_add(1, Ordering::Relaxed) + 1;
    (n == *at).then_some((a, n))
}

fn kill(name: &str, n: u64) {
    log::error!("failpoint `{name}` reached at hit {n}: killing this process");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

/// Stops the process here with SIGKILL if `TREESWAP_FAILPOINT` names this point and this hit.
pub fn hit(name: &str) {
    if let Some((a, n)) = reached(name)
        && !a.error
    {
        kill(name, n);
    }
}

/// [`hit`], and fails here with an I/O error if `TREESWAP_FAILPOINT` is `<name>[@<N>]:error`
/// and this is that hit.
pub fn check(name: &str) -> std::io::Result<()> {
    match reached(name) {
        Some((a, n)) if a.error => Err(std::io::Error::other(format!(
            "an error injected at failpoint `{name}` (hit {n})"
        ))),
        Some((_, n)) => {
            kill(name, n);
            Ok(())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, at: u64, error: bool) -> Option<Armed> {
        Some(Armed {
            point: Some((name.to_owned(), at)),
            error,
            count: false,
        })
    }

    #[test]
    fn parses_the_name_the_hit_and_the_error_form() {
        assert_eq!(parse(None, false), None);
        assert_eq!(parse(Some(""), false), None);
        assert_eq!(
            parse(Some("apply-after-object"), false),
            point("apply-after-object", 1, false)
        );
        assert_eq!(
            parse(Some("apply-after-object@3"), false),
            point("apply-after-object", 3, false)
        );
        assert_eq!(
            parse(Some("stage-before-commit:error"), false),
            point("stage-before-commit", 1, true)
        );
        assert_eq!(
            parse(Some("stage-before-commit@2:error"), false),
            point("stage-before-commit", 2, true)
        );
        for bad in [
            "no-such-point",
            "apply-after-object@0",
            "apply-after-object@x",
            "@2",
        ] {
            assert_eq!(parse(Some(bad), false), None, "{bad}");
        }
        assert_eq!(
            parse(Some("apply-after-object@0"), true),
            Some(Armed {
                point: None,
                error: false,
                count: true
            })
        );
    }
}
