//! A `log` backend that writes `treeswap: level: message` lines to stderr. Under systemd
//! (stderr is the journal stream named by `JOURNAL_STREAM`), each line starts with its syslog
//! priority (`<3>` … `<7>`), which the journal records as the line's priority.

use std::io::Write;
use std::sync::OnceLock;

struct Logger;

/// The longest line treeswap writes to stderr, in bytes. Messages quote inputs briefly
/// (`core::path::quote`), so only a missed quote could make one longer; the cap keeps even
/// that one a line that a terminal and the journal take whole.
pub const MAX_LINE: usize = 1000;

/// `msg` on one line: newlines become spaces, and past [`MAX_LINE`] bytes it is cut (on a
/// character boundary) with `…`.
pub fn one_line(msg: &str) -> String {
    let mut end = msg.len().min(MAX_LINE);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = msg[..end].replace('\n', " ");
    if end < msg.len() {
        out.push('…');
    }
    out
}

static JOURNAL: OnceLock<bool> = OnceLock::new();

/// When logging started: debug lines carry the time since then, to show where time goes.
static START: OnceLock<std::time::Instant> = OnceLock::new();

/// Whether stderr is connected to the systemd journal (see `systemd.exec(5)`, `JOURNAL_STREAM`).
pub fn to_journal() -> bool {
    *JOURNAL.get_or_init(|| {
        let Ok(v) = std::env::var("JOURNAL_STREAM") else {
            return false;
        };
        let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
            return false;
        };
        v == format!("{}:{}", st.st_dev, st.st_ino)
    })
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Info => "info",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        let elapsed = match (r.level(), START.get()) {
            (log::Level::Debug | log::Level::Trace, Some(t)) => {
                format!("[{:.3}s] ", t.elapsed().as_secs_f64())
            }
            _ => String::new(),
        };
        let msg = one_line(&r.args().to_string());
        let mut err = std::io::stderr().lock();
        if to_journal() {
            let pri = match r.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            let _ = writeln!(err, "<{pri}>{level}: {elapsed}{msg}");
        } else {
            let _ = writeln!(err, "treeswap: {level}: {elapsed}{msg}");
        }
    }
    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// `verbose` raises and `quiet` lowers the level from the default (warnings and errors).
pub fn init(verbose: u8, quiet: bool) {
    let level = if quiet {
        log::LevelFilter::Error
    } else {
        match verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            2 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    };
    START.get_or_init(std::time::Instant::now);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
