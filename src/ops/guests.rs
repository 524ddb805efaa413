//! Restarting guests (vservers, containers, services) after a flip, so that they all run on
//! the new tree. Each restart is an argv run without a shell, with a timeout; its output goes
//! to the log.

use std::io::{Read, Seek};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::core::config::Guest;
use crate::fs::sys;

/// Runs a guest's restart command and waits for it, at most its timeout.
pub(crate) fn restart(g: &Guest) -> Result<()> {
    let name = crate::core::path::quote(&g.name);
    run(&format!("guest `{name}`"), &g.argv(), g.timeout)
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
    let mut text = String::new();
    out.rewind()?;
    let _ = out.take(1 << 20).read_to_string(&mut text);
    for line in text.lines() {
        log::info!("{what}: {line}");
    }
    match status {
        None => bail!("{what}: `{shown}` did not finish within {timeout} s"),
        Some(s) if !s.success() => bail!("{what}: `{shown}` failed ({s})"),
        Some(_) => Ok(()),
    }
}
