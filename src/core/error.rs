//! The failures a caller (a boot script, a test) branches on, and their exit codes.
//! Everything else is an `anyhow` error with context and exits with [`EXIT_ERROR`].

/// Success.
pub const EXIT_OK: i32 = 0;
/// Any error not listed below (bad input, I/O failure).
pub const EXIT_ERROR: i32 = 1;
/// The command line is wrong (also clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Verification or integrity failure: a tree differs from its manifest, or data does not
/// match its hash.
pub const EXIT_VERIFY: i32 = 3;
/// Nothing to do: the requested state is already in place.
pub const EXIT_NOTHING: i32 = 4;
/// The new tree failed (a guest did not restart on it, or it used up its boot tries without
/// being marked good) and treeswap flipped back.
pub const EXIT_GUESTS_REVERTED: i32 = 5;
/// Another treeswap holds the lock on this root.
pub const EXIT_BUSY: i32 = 6;
/// The delta is for another base tree.
pub const EXIT_WRONG_BASE: i32 = 7;
/// The delta is malformed (truncated, unparseable, hostile paths).
pub const EXIT_BAD_DELTA: i32 = 8;
/// Not enough free space.
pub const EXIT_NO_SPACE: i32 = 9;
/// The delta is not signed by a trusted key.
pub const EXIT_UNTRUSTED: i32 = 10;
/// The delta would move the device to an older version.
pub const EXIT_DOWNGRADE: i32 = 11;
// --- release repository (`update`, issue 18) ---
/// The release index has expired, or is dated in the future beyond the clock skew allowed.
pub const EXIT_STALE_INDEX: i32 = 12;
/// The release index is older (a lower serial) than one this machine accepted.
pub const EXIT_ROLLBACK: i32 = 13;
/// The release index is of another channel than the machine follows.
pub const EXIT_WRONG_CHANNEL: i32 = 14;
/// A download did not match the size and sha256 the index gives, from every source.
pub const EXIT_DOWNLOAD_MISMATCH: i32 = 15;
// --- end of release repository codes ---

/// A table for `--help` and the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error (bad input, I/O failure)
  2  usage error
  3  verification or integrity failure
  4  nothing to do
  5  the new tree failed (guests, or boot tries used up); flipped back
  6  busy: another treeswap holds the lock
  7  the delta is for another base tree
  8  the delta is malformed
  9  not enough free space
  10 the delta is not signed by a trusted key
  11 the delta would downgrade (use --allow-downgrade)
  12 the release index expired or is dated in the future
  13 the release index is older than one accepted before
  14 the release index is of another channel
  15 a download does not match the release index";

#[derive(Debug, thiserror::Error)]
pub enum Fail {
    #[error("{0}")]
    Verify(String),
    #[error("{0}")]
    Integrity(String),
    #[error("{0}")]
    Nothing(String),
    #[error("{0}")]
    GuestsReverted(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    WrongBase(String),
    #[error("{0}")]
    BadDelta(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    Downgrade(String),
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    Rollback(String),
    #[error("{0}")]
    WrongChannel(String),
    #[error("{0}")]
    Mismatch(String),
}

impl Fail {
    pub fn code(&self) -> i32 {
        match self {
            Fail::Verify(_) | Fail::Integrity(_) => EXIT_VERIFY,
            Fail::Nothing(_) => EXIT_NOTHING,
            Fail::GuestsReverted(_) => EXIT_GUESTS_REVERTED,
            Fail::Busy(_) => EXIT_BUSY,
            Fail::WrongBase(_) => EXIT_WRONG_BASE,
            Fail::BadDelta(_) => EXIT_BAD_DELTA,
            Fail::NoSpace(_) => EXIT_NO_SPACE,
            Fail::Usage(_) => EXIT_USAGE,
            Fail::Untrusted(_) => EXIT_UNTRUSTED,
            Fail::Downgrade(_) => EXIT_DOWNGRADE,
            Fail::Stale(_) => EXIT_STALE_INDEX,
            Fail::Rollback(_) => EXIT_ROLLBACK,
            Fail::WrongChannel(_) => EXIT_WRONG_CHANNEL,
            Fail::Mismatch(_) => EXIT_DOWNLOAD_MISMATCH,
        }
    }
}

/// The exit code for an error: the first typed failure in its chain, or [`EXIT_ERROR`]. An
/// I/O error `ENOSPC` anywhere in the chain counts as "no space".
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Fail>() {
            return f.code();
        }
        // A typed failure carried through an I/O error (from a `Read` implementation).
        if let Some(f) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.get_ref())
            .and_then(|e| e.downcast_ref::<Fail>())
        {
            return f.code();
        }
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<rustix::io::Errno>()
            && *e == rustix::io::Errno::NOSPC
        {
            return EXIT_NO_SPACE;
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>()
            && (e.raw_os_error() == Some(libc::ENOSPC)
                || e.kind() == std::io::ErrorKind::StorageFull)
        {
            return EXIT_NO_SPACE;
        }
    }
    EXIT_ERROR
}
