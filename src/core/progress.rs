//! Progress bars on a terminal; nothing otherwise (log lines say what happens).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns every bar off (`-q`).
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

pub struct Progress(ProgressBar);

impl Progress {
    fn new(len: u64, msg: &'static str, template: &str) -> Self {
        let visible = !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal();
        let bar = if visible {
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(msg);
        Progress(bar)
    }
    /// A bar counting bytes.
    pub fn bytes(len: u64, msg: &'static str) -> Self {
        Self::new(
            len,
            msg,
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
    }
    /// A bar counting items.
    pub fn items(len: u64, msg: &'static str) -> Self {
        Self::new(len, msg, "{msg:>10} [{bar:30}] {pos}/{len} {eta}")
    }
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Progress {
    /// A bar that ends early (an error) leaves nothing behind on the screen.
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Says on a terminal which phase a command has reached (`verifying`, `syncing`, `flipping`),
/// the steps that have no bar; nothing when quiet or when stderr is not a terminal (the log
/// says it with `-v`).
pub fn phase(what: &str) {
    if !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal() {
        eprintln!("treeswap: {what}");
    }
}
