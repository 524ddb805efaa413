//! Guest hooks (vservers, containers, services): `stop`, `start` or `restart` after a flip,
//! so that every guest runs on the new tree, and health checks. Each is an argv run without a
//! shell, with a timeout and the `TREESWAP_*` environment ([`HookEnv`]); its output goes to
//! the log, and the last lines of a failed hook's output into its error.

use std::io::{Read, Seek};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::core::config::Guest;
use crate::fs::sys;

/// What a hook is told, in its environment: `TREESWAP_GUEST`, `TREESWAP_VERSION` (the tree it
/// is to run on), `TREESWAP_PREVIOUS` (the tree it ran on, if any), `TREESWAP_ROOTFS` (where
/// to start it: its overlay's mount point, or the tree) and `TREESWAP_STATE_ROOT`.
pub(crate) struct HookEnv {
    pub version: String,
    pub previous: Option<String>,
    pub rootfs: std::path::PathBuf,
    pub state_root: std::path::PathBuf,
}

/// Runs one of a guest's hooks (`stop`, `start`, `restart`) and waits for it, at most the
/// guest's timeout.
pub(crate) fn hook(g: &Guest, which: &str, argv: &[String], env: &HookEnv) -> Result<()> {
    let name = crate::core::path::quote(&g.name);
    let vars = [
        ("TREESWAP_GUEST", g.name.clone().into()),
        ("TREESWAP_VERSION", env.version.clone().into()),
        (
            "TREESWAP_PREVIOUS",
            env.previous.clone().unwrap_or_default().into(),
        ),
        ("TREESWAP_ROOTFS", env.rootfs.clone().into_os_string()),
        (
            "TREESWAP_STATE_ROOT",
            env.state_root.clone().into_os_string(),
        ),
    ];
    run_with(&format!("guest `{name}`: {which}"), argv, g.timeout, &vars)
}

/// Runs a guest's health check, if it has one.
pub(crate) fn check(g: &Guest) -> Result<()> {
    match &g.check {
        Some(argv) => run(
            &format!("guest `{}`: check", crate::core::path::quote(&g.name)),
            argv,
            g.check_timeout,
        ),
        None => Ok(()),
    }
}

/// Runs `argv` (no shell; `what` names it in messages) and waits for it, at most `timeout`
/// seconds; its output goes to the log. Fails unless it exits 0 in time.
pub(crate) fn run(what: &str, argv: &[String], timeout: u64) -> Result<()> {
    run_with(what, argv, timeout, &[])
}

/// The last lines of a failed hook's output that its error quotes.
const TAIL_LINES: usize = 3;

/// How much of a hook's output is read back (its end).
const OUTPUT_TAIL: u64 = 64 << 10;

/// [`run`] with `vars` added to the environment.
fn run_with(
    what: &str,
    argv: &[String],
    timeout: u64,
    vars: &[(&str, std::ffi::OsString)],
) -> Result<()> {
    // For messages: the config's command, quoted briefly.
    let shown = crate::core::path::quote_at_most(argv.join(" "), 160);
    log::info!("{what}: running {shown}");
    // Output goes to a file, not a pipe: a restart script may leave a daemon holding it open.
    let mut out = tempfile::tempfile().context("cannot create a file for guest output")?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .spawn()
        .with_context(|| format!("{what}: cannot run `{shown}`"))?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            sys::killpg(child.id());
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The last 64 KiB (what the error line quotes is at the end), any bytes: a stray byte
    // that is not UTF-8 must not lose the output.
    let len = out.seek(std::io::SeekFrom::End(0))?;
    out.seek(std::io::SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL)))?;
    let mut bytes = Vec::new();
    out.take(OUTPUT_TAIL).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    for line in text.lines() {
        log::info!("{what}: {line}");
    }
    // The one error line says why: the last lines of the output, each quoted briefly.
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &tail[tail.len().saturating_sub(TAIL_LINES)..];
    let said = match tail {
        [] => String::new(),
        lines => format!(
            "; its output ends: {}",
            lines
                .iter()
                .map(|l| format!("`{}`", crate::core::path::quote_at_most(l.trim(), 200)))
                .collect::<Vec<_>>()
                .join(" / ")
        ),
    };
    match status {
        None => bail!("{what}: `{shown}` did not finish within {timeout} s{said}"),
        Some(s) if !s.success() => bail!("{what}: `{shown}` failed ({s}){said}"),
        Some(_) => Ok(()),
    }
}
