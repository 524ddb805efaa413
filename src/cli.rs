//! The command line: clap's definitions, and `run`, which loads the config once, opens the
//! state root, calls the command's `ops` function and prints what it returns.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::core::config::{self, Config};
use crate::core::error::{EXIT_CODES_HELP, Fail};
use crate::core::{manifest, version};
use crate::ops::{apply, boot, checkout, diff, flip, gc, import, show, status, verify};
use crate::ops::{publish, update};
use crate::store::root::{DEFAULT_ROOT, Lock, Root};
use crate::tree::scan;

#[derive(Parser)]
#[command(
    name = "treeswap",
    version,
    about = "Atomic tree-swap updates from a content-addressed pool of hardlinked objects",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// The state root [default: the config file's `root`, else /versions].
    #[arg(long, global = true, env = "TREESWAP_ROOT")]
    pub root: Option<PathBuf>,
    /// The config file [default: /etc/treeswap.toml; a missing default means defaults].
    #[arg(long, global = true, env = "TREESWAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Wait for the lock instead of failing with "busy".
    #[arg(long, global = true)]
    pub wait: bool,
    /// Flip `current` back to `previous` (the same as the `revert` command).
    #[arg(long)]
    pub revert: bool,
    #[command(flatten)]
    pub flip: FlipArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How the commands that flip `current` treat the guests.
#[derive(clap::Args, Clone, Copy, Default)]
pub struct FlipArgs {
    /// Do not restart the guests after the flip.
    #[arg(long)]
    pub no_restart: bool,
    /// If a guest fails to restart on the new tree, leave the new tree current and only
    /// report (exit 5) instead of flipping back.
    #[arg(long)]
    pub no_auto_revert: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Make the state root's layout (idempotent).
    Init,
    /// Hash a directory into the pool and install it as version V.
    Import {
        /// The directory to import (it is read, never changed).
        dir: PathBuf,
        /// The version name to install it as.
        #[arg(long)]
        version: String,
        /// Point `current` at it: the guests are restarted onto it, and unless it is the
        /// root's first tree it is pending until marked good.
        #[arg(long)]
        activate: bool,
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Print a directory's manifest, or check a manifest file with --load.
    Manifest {
        /// The directory to read.
        #[arg(required_unless_present = "load")]
        dir: Option<PathBuf>,
        /// Parse a manifest file, check its digest and print a summary.
        #[arg(long, conflicts_with = "dir")]
        load: Option<PathBuf>,
    },
    /// Check an installed tree (default: current) against its manifest.
    Verify {
        /// The installed version to check [default: current].
        version: Option<String>,
        /// Also re-hash every pool object the tree uses.
        #[arg(long)]
        full: bool,
    },
    /// Show installed versions, current, previous, the pool, boot counting, and what a
    /// writer is doing now (it never waits for one).
    Status {
        /// Print JSON (its schema is in FORMAT.md).
        #[arg(long)]
        json: bool,
    },
    /// List installed versions (`*` current, `-` previous).
    List {
        /// Print the installed trees as JSON (the `trees` of `status --json`).
        #[arg(long)]
        json: bool,
    },
    /// Build a hardlink farm of installed version V at DEST (which must not exist).
    Checkout {
        /// The installed version.
        version: String,
        /// Where to build it (must not exist).
        dest: PathBuf,
    },
    /// Make a delta from one tree to another.
    Diff(DiffArgs),
    /// Apply a delta (`-` reads standard input): stage, verify, flip.
    Apply {
        /// The delta file, or `-` for standard input.
        file: PathBuf,
        /// Stop after staging and verifying the new tree.
        #[arg(long)]
        stage_only: bool,
        /// Do not check the delta's signature (development only; logged loudly).
        #[arg(long)]
        insecure: bool,
        /// Accept a delta whose result is older than the current version.
        #[arg(long)]
        allow_downgrade: bool,
        /// Check everything that can be checked before writing (signature, base, result,
        /// free space), say what it would do, and write nothing; exits as `apply` would.
        #[arg(long, conflicts_with = "stage_only")]
        dry_run: bool,
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Describe a delta (`-` reads standard input): its versions, signature, what changes and
    /// how many bytes; reads only its head, with every limit `apply` has, and changes nothing.
    Show {
        /// The delta file, or `-` for standard input.
        file: PathBuf,
        /// Print JSON (its schema is in FORMAT.md).
        #[arg(long)]
        json: bool,
    },
    /// Point `current` at an installed version.
    Switch {
        /// The installed version to make current.
        version: String,
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Flip `current` back to `previous`.
    Revert {
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Run at boot before the guests start: repair interrupted work, count the boot, and
    /// revert a pending tree that used up its tries.
    Boot {
        #[command(flatten)]
        flip: FlipArgs,
    },
    /// Mark the pending tree good, so that boot counting stops for it.
    MarkGood {
        /// Only if it is healthy: it runs in this boot, its guests were all restarted onto
        /// it, and every configured check (each guest's `check`, `[health] command`) passes;
        /// else it stays pending (exit 3).
        #[arg(long)]
        check: bool,
    },
    /// Remove trees that are not current, previous, pending or pinned, then unused objects.
    Gc {
        /// Keep the N newest of the other trees.
        #[arg(long, default_value_t = 0)]
        keep: usize,
        /// Also remove partial downloads (`downloads/*.part`) touched in the last 7 days;
        /// without it gc removes only older ones (an interrupted `update` resumes the others).
        #[arg(long)]
        downloads: bool,
    },
    /// Protect an installed version from gc.
    Pin {
        /// The installed version.
        version: String,
    },
    /// Let gc remove a pinned version again.
    Unpin {
        /// The installed version.
        version: String,
    },
    // --- release repository (issue 18) ---
    /// Publish a version to a release repository (a directory any static web server can
    /// serve): import it unless installed, write its deltas, then the signed index.
    Publish(PublishArgs),
    /// Bring this machine to the latest version of its channel in the release repository:
    /// fetch and check the signed index, pick the cheapest path, download (resuming) and apply.
    Update(UpdateArgs),
    // --- end of release repository ---
    // ---- guests (issue 16) ----
    /// Overlay guests: what each changed against its tree, its conflicts, and dropping its
    /// local changes.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Restart guests onto `current` now: the named ones, or (with none named) those whose
    /// restart an interrupted flip left pending. Counts no boot; flips nothing back.
    RestartGuests {
        /// Guests to restart [default: those still pending].
        names: Vec<String>,
    },
}

// --- release repository (issue 18) ---
/// The arguments of `treeswap publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The repository's top directory (made if missing).
    #[arg(long)]
    pub repo: PathBuf,
    /// The channel (its directory in the repository).
    #[arg(long)]
    pub channel: String,
    /// The version to publish.
    #[arg(long, required_unless_present = "refresh", conflicts_with = "refresh")]
    pub version: Option<String>,
    /// The directory to import as the version (not needed if it is installed already).
    #[arg(long, conflicts_with = "refresh")]
    pub from_dir: Option<PathBuf>,
    /// Only write the index again, with a new serial and expiry (for a cron job).
    #[arg(long)]
    pub refresh: bool,
    /// Sign the index and the deltas with this unencrypted minisign secret key.
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: Option<PathBuf>,
    /// How many of the versions published before get a delta to the new one (machines that
    /// skipped releases leapfrog in one step).
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// How long the index is valid, like 30d, 12h, 10s.
    #[arg(long, default_value = "7d")]
    pub expires: String,
    /// zstd level of the deltas' blobs (1-22), as for `diff`.
    #[arg(long, default_value_t = crate::core::codec::LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
}

/// The arguments of `treeswap update`.
#[derive(clap::Args)]
pub struct UpdateArgs {
    /// The repository's top URL (http://, https://, file://) [default: `[update] url`].
    #[arg(long)]
    pub url: Option<String>,
    /// The channel to follow [default: `[update] channel`, else `stable`].
    #[arg(long)]
    pub channel: Option<String>,
    /// Only say whether an update exists: exit 0 if one does, 4 if none; writes nothing.
    #[arg(long, conflicts_with_all = ["dry_run", "stage_only"])]
    pub check: bool,
    /// Install the latest version without making it current.
    #[arg(long)]
    pub stage_only: bool,
    /// Print the path that would be taken and its bytes; writes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as JSON (its schema is in FORMAT.md).
    #[arg(long)]
    pub json: bool,
    /// Check no signature, of the index or of the deltas (development only; logged loudly).
    /// Without it, `update` refuses to run with no `[trust] public_keys`.
    #[arg(long)]
    pub insecure: bool,
    /// Accept a latest version older than the current one.
    #[arg(long)]
    pub allow_downgrade: bool,
    #[command(flatten)]
    pub flip: FlipArgs,
}
// --- end of release repository ---

/// `treeswap guest ...`.
#[derive(Subcommand)]
pub enum GuestCommand {
    /// Each configured guest: overlay or tree, its layer, where it is mounted, its conflicts.
    List {
        /// Print JSON (the `guests` of `status --json`).
        #[arg(long)]
        json: bool,
    },
    /// One guest: its layer, the tree it was merged for, the conflicts of its last merge.
    Status {
        /// The guest's name.
        name: String,
    },
    /// What a guest's layer changes against its tree: `A` added, `M` changed, `D` deleted,
    /// `R` a directory replaced whole.
    Diff {
        /// The guest's name.
        name: String,
    },
    /// Drop a guest's local changes: stop it, give it an empty layer on `current`, start it.
    Reset {
        /// The guest's name.
        name: String,
    },
}
// ---- end of guests ----

impl Command {
    /// How this command, if it flips, treats the guests.
    fn flip_args(&self) -> Option<FlipArgs> {
        match self {
            Command::Import { flip, .. }
            | Command::Apply { flip, .. }
            | Command::Switch { flip, .. }
            | Command::Revert { flip }
            | Command::Boot { flip } => Some(*flip),
            Command::Update(u) => Some(u.flip),
            _ => None,
        }
    }

    /// The command's name on the command line.
    fn name(&self) -> &'static str {
        match self {
            Command::Init => "init",
            Command::Import { .. } => "import",
            Command::Manifest { .. } => "manifest",
            Command::Verify { .. } => "verify",
            Command::Status { .. } => "status",
            Command::List { .. } => "list",
            Command::Checkout { .. } => "checkout",
            Command::Diff(_) => "diff",
            Command::Apply { .. } => "apply",
            Command::Show { .. } => "show",
            Command::Switch { .. } => "switch",
            Command::Revert { .. } => "revert",
            Command::Boot { .. } => "boot",
            Command::MarkGood { .. } => "mark-good",
            Command::Gc { .. } => "gc",
            Command::Pin { .. } => "pin",
            Command::Unpin { .. } => "unpin",
            Command::Publish(_) => "publish",
            Command::Update(_) => "update",
            Command::Guest(_) => "guest",
            Command::RestartGuests { .. } => "restart-guests",
        }
    }
}

/// The arguments of `treeswap diff`.
#[derive(clap::Args)]
pub struct DiffArgs {
    /// The base tree, as a directory (no state root needed).
    #[arg(long, requires = "to_dir", conflicts_with_all = ["from", "to"])]
    pub from_dir: Option<PathBuf>,
    /// The result tree, as a directory.
    #[arg(long, requires = "from_dir")]
    pub to_dir: Option<PathBuf>,
    /// The base tree's version name, recorded in the delta (with --from-dir).
    #[arg(long)]
    pub from_version: Option<String>,
    /// The result's version name (with --to-dir).
    #[arg(long)]
    pub to_version: Option<String>,
    /// The base, as an installed version.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// The result, as an installed version.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Where to write the delta (`-` for standard output).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Sign the delta with this unencrypted minisign secret key (`minisign -G -W`).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: Option<PathBuf>,
    /// Write a plain tar instead of a zstd-compressed one.
    #[arg(long)]
    pub uncompressed: bool,
    /// zstd level of the blobs (1-22): higher is smaller and slower to make. From 12 (the
    /// default) on, a content of 256 KiB or more that no reference serves is also tried as xz.
    #[arg(long, default_value_t = crate::core::codec::LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
}

/// What every command shares: the config (loaded once), where the root is, and the flags
/// that shape locking and flipping.
struct Env<'a> {
    cli: &'a Cli,
    cfg: Config,
    /// The command's name, which a writer records in the lock for `status`.
    op: &'static str,
    /// How a flip treats the guests.
    flip: FlipArgs,
}

impl Env<'_> {
    fn root_path(&self) -> PathBuf {
        self.cli
            .root
            .clone()
            .or_else(|| self.cfg.root.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    /// Opens the state root (making it first with `create`) and takes the lock.
    fn root(&self, how: Lock, create: bool) -> Result<Root> {
        let path = self.root_path();
        let mut root = if create {
            Root::create(&path)?
        } else {
            Root::open(&path)?
        };
        root.lock(how, self.cli.wait, self.op)?;
        Ok(root)
    }

    /// The one line a command that changed something prints on success (`-q` silences it).
    fn say(&self, line: &str) {
        if !self.cli.quiet {
            // A summary that cannot be written is no reason to fail what was done.
            let _ = out(&format!("{line}\n"));
        }
    }

    /// The line that says a flip happened: to `to` from `was`, the guests restarted, and
    /// whether the new tree is pending.
    fn flipped(&self, root: &Root, to: &str, was: Option<&str>) -> Result<String> {
        let from = was.map(|w| format!(" (was `{w}`)")).unwrap_or_default();
        let guests = match (self.flip.no_restart, self.cfg.guests.len()) {
            (_, 0) => String::new(),
            (true, _) => "; guests not restarted (--no-restart)".into(),
            (false, n) => format!("; {n} guest(s) restarted"),
        };
        let st = crate::store::state::load(root.fd())?;
        let pending = match st.pending {
            Some(p) if p.version == to => format!(
                "; pending until marked good ({} boot tries)",
                self.cfg.boot.tries
            ),
            _ => String::new(),
        };
        Ok(format!("current is `{to}`{from}{guests}{pending}"))
    }

    fn flip(&self) -> flip::Options {
        flip::Options {
            restart: !self.flip.no_restart,
            auto_revert: !self.flip.no_auto_revert,
        }
    }
}

/// Writes `text` to standard output. A reader that went away (`treeswap status | head`) is
/// no error: the output was for it alone.
fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

/// Whether `e` is a write to a pipe whose reader went away.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs the command `cli` names.
pub fn run(cli: &Cli) -> Result<()> {
    let revert = Command::Revert { flip: cli.flip };
    let command = match (&cli.command, cli.revert) {
        (Some(_), true) => {
            return Err(Fail::Usage("--revert cannot be combined with a command".into()).into());
        }
        (Some(c), false) => c,
        (None, true) => &revert,
        (None, false) => {
            return Err(Fail::Usage("no command given; see `treeswap --help`".into()).into());
        }
    };
    // Read the config up front, so that a broken one is reported by every command.
    let cx = Env {
        cli,
        cfg: config::load(cli.config.as_deref())?,
        op: command.name(),
        flip: command.flip_args().unwrap_or(cli.flip),
    };
    match command {
        Command::Init => {
            let root = cx.root(Lock::Exclusive, true)?;
            cx.say(&format!("state root `{}` is ready", root.path.display()));
        }
        Command::Import {
            dir,
            version,
            activate,
            ..
        } => import_command(&cx, dir, version, *activate)?,
        Command::Manifest { dir, load } => {
            match manifest_command(dir.as_deref(), load.as_deref()) {
                // `manifest DIR | head`: the reader has what it wanted.
                Err(e) if broken_pipe(&e) => {}
                r => r?,
            }
        }
        Command::Verify { version, full } => verify_command(&cx, version.as_deref(), *full)?,
        Command::Status { json } => {
            let s = status::status(&cx.root(Lock::Shared, false)?, &cx.cfg)?;
            match json {
                true => out(&format!("{}\n", serde_json::to_string_pretty(&s)?))?,
                false => out(&s.to_text())?,
            }
        }
        Command::List { json } => {
            let s = status::status(&cx.root(Lock::Shared, false)?, &cx.cfg)?;
            match json {
                true => out(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&s.list_json())?
                ))?,
                false => out(&s.to_list())?,
            }
        }
        Command::Checkout { version, dest } => {
            // A writer: in immutable mode, it records that objects are briefly unprotected.
            let root = cx.root(Lock::Exclusive, false)?;
            checkout::checkout(&root, &cx.cfg, version, dest)?;
            cx.say(&format!("checked out `{version}` at `{}`", dest.display()));
        }
        Command::Diff(args) => diff_command(&cx, args)?,
        Command::Apply {
            file,
            stage_only,
            insecure,
            allow_downgrade,
            dry_run,
            ..
        } => {
            let opts = apply::Options {
                stage_only: *stage_only,
                flip: cx.flip(),
                insecure: *insecure,
                allow_downgrade: *allow_downgrade,
                dry_run: *dry_run,
            };
            apply_command(&cx, file, opts)?
        }
        Command::Show { file, json } => show_command(&cx, file, *json)?,
        Command::Switch { version, .. } => {
            let root = cx.root(Lock::Exclusive, false)?;
            let was = root.link("current")?;
            flip::switch(&root, &cx.cfg, version, cx.flip())?;
            cx.say(&cx.flipped(&root, version, was.as_deref())?);
        }
        Command::Revert { .. } => {
            let root = cx.root(Lock::Exclusive, false)?;
            let was = root.link("current")?;
            let v = flip::revert(&root, &cx.cfg, cx.flip())?;
            cx.say(&format!(
                "reverted: {}",
                cx.flipped(&root, &v, was.as_deref())?
            ));
        }
        Command::Boot { .. } => boot_command(&cx)?,
        Command::Gc { keep, downloads } => {
            let root = cx.root(Lock::Exclusive, false)?;
            root.warn_stuck();
            let mut r = gc::gc(&root, &cx.cfg, *keep, &[])?;
            gc::downloads(&root, *downloads, &mut r)?;
            cx.say(&r.summary());
        }
        Command::Pin { version } => {
            gc::pin(&cx.root(Lock::Exclusive, false)?, version, true)?;
            cx.say(&format!("pinned `{version}`: gc keeps it"));
        }
        Command::Unpin { version } => {
            gc::pin(&cx.root(Lock::Exclusive, false)?, version, false)?;
            cx.say(&format!("unpinned `{version}`"));
        }
        Command::Publish(a) => publish_command(&cx, a)?,
        Command::Update(a) => update_command(&cx, a)?,
        Command::Guest(g) => guest_command(&cx, g)?,
        Command::RestartGuests { names } => {
            let root = cx.root(Lock::Exclusive, false)?;
            let n = flip::restart_guests(&root, &cx.cfg, names)?;
            cx.say(&format!("{n} guest(s) restarted"));
        }
        Command::MarkGood { check } => {
            match boot::mark_good(&cx.root(Lock::Exclusive, false)?, &cx.cfg, *check)? {
                Some(v) => cx.say(&format!("`{v}` is marked good")),
                None => cx.say("nothing pending: the current tree is already good"),
            }
        }
    }
    Ok(())
}

fn boot_command(cx: &Env) -> Result<()> {
    let root = cx.root(Lock::Exclusive, false)?;
    root.warn_stuck();
    match boot::boot(&root, &cx.cfg, cx.flip())? {
        boot::BootOutcome::Ok => log::info!("boot: state root is consistent"),
        boot::BootOutcome::Reverted(v, None) => {
            return Err(Fail::GuestsReverted(format!(
                "the pending tree did not prove healthy (boot tries used up, or its guests failed); reverted to `{v}`"
            ))
            .into());
        }
        boot::BootOutcome::Reverted(v, Some(why)) => {
            return Err(Fail::GuestsReverted(format!(
                "{why}; the pending tree is reverted to `{v}`"
            ))
            .into());
        }
    }
    Ok(())
}

// ---- guests (issue 16) ----
fn guest_command(cx: &Env, g: &GuestCommand) -> Result<()> {
    use crate::ops::guest;
    match g {
        GuestCommand::List { json } => {
            let root = cx.root(Lock::Shared, false)?;
            let st = crate::store::state::load(root.fd())?;
            let infos = guest::infos(&root, &cx.cfg, &st)?;
            match json {
                true => out(&format!("{}\n", serde_json::to_string_pretty(&infos)?))?,
                false => out(&infos
                    .iter()
                    .map(|i| format!("{}\n", i.line()))
                    .collect::<String>())?,
            }
        }
        GuestCommand::Status { name } => out(&guest::status_text(
            &cx.root(Lock::Shared, false)?,
            &cx.cfg,
            name,
        )?)?,
        GuestCommand::Diff { name } => {
            let lines = guest::diff(&cx.root(Lock::Shared, false)?, &cx.cfg, name)?;
            match out(&lines.iter().map(|l| format!("{l}\n")).collect::<String>()) {
                Err(e) if broken_pipe(&e) => {}
                r => r?,
            }
        }
        GuestCommand::Reset { name } => {
            let root = cx.root(Lock::Exclusive, false)?;
            guest::reset(&root, &cx.cfg, name)?;
            cx.say(&format!(
                "guest `{}` reset: it runs on an empty layer",
                crate::core::path::quote(name)
            ));
        }
    }
    Ok(())
}
// ---- end of guests ----

fn import_command(cx: &Env, dir: &Path, version: &str, activate: bool) -> Result<()> {
    version::validate(version)?;
    if !dir.is_dir() {
        bail!("cannot import `{}`: not a directory", dir.display());
    }
    let root = cx.root(Lock::Exclusive, false)?;
    import::import(&root, &cx.cfg, dir, version)?;
    if activate {
        let was = root.link("current")?;
        import::activate(&root, &cx.cfg, version, cx.flip())?;
        cx.say(&format!(
            "imported `{version}`; {}",
            cx.flipped(&root, version, was.as_deref())?
        ));
    } else {
        cx.say(&format!("imported `{version}`"));
    }
    Ok(())
}

fn manifest_command(dir: Option<&Path>, load: Option<&Path>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if let Some(file) = load {
        let f = fs_err::File::open(file)?;
        let m = manifest::parse_reader(std::io::BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("invalid manifest `{}`", file.display()))?;
        let digest = hex::encode(m.digest());
        writeln!(out, "{} entries, digest {digest}", m.entries.len())?;
    } else {
        let m = scan::scan(dir.expect("required"), None)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
        m.write_toml(&mut w)?;
        w.flush()?;
    }
    Ok(())
}

fn verify_command(cx: &Env, version: Option<&str>, full: bool) -> Result<()> {
    let r = verify::verify(&cx.root(Lock::Shared, false)?, version, full)?;
    let mut out = std::io::stdout().lock();
    for p in &r.problems {
        writeln!(out, "{p}")?;
    }
    if !r.problems.is_empty() {
        return Err(Fail::Verify(format!(
            "verification of `{}` failed: {} problem(s)",
            r.version,
            r.problems.len()
        ))
        .into());
    }
    let how = if full { " in full" } else { "" };
    // A check that passes says so: silence would look like nothing was done.
    cx.say(&format!(
        "`{}` verified{how}: {} entries",
        r.version, r.entries
    ));
    Ok(())
}

fn diff_command(cx: &Env, a: &DiffArgs) -> Result<()> {
    let usage = |m: &str| -> anyhow::Error { Fail::Usage(m.into()).into() };
    let root;
    let (trees, to_version) = match (&a.from_dir, &a.to_dir, &a.from, &a.to) {
        (Some(from), Some(to), None, None) => {
            let to_version = a
                .to_version
                .as_deref()
                .ok_or_else(|| usage("--to-dir needs --to-version"))?;
            let from_version = a.from_version.as_deref();
            (
                diff::Trees::Dirs {
                    from,
                    to,
                    from_version,
                },
                to_version,
            )
        }
        (None, None, Some(from), Some(to)) => {
            if a.from_version.is_some() || a.to_version.is_some() {
                return Err(usage(
                    "--from-version and --to-version go with --from-dir and --to-dir",
                ));
            }
            root = cx.root(Lock::Shared, false)?;
            (diff::Trees::Installed { root: &root, from }, to.as_str())
        }
        _ => {
            return Err(usage(
                "give either --from-dir and --to-dir, or --from and --to",
            ));
        }
    };
    let stats = diff::make(&diff::Request {
        trees,
        to_version,
        output: &a.output,
        sign: a.sign.as_deref(),
        compress: !a.uncompressed,
        level: a.level,
    })?;
    log::info!("delta: {}", stats.summary());
    Ok(())
}

fn show_command(cx: &Env, file: &Path, json: bool) -> Result<()> {
    // The root, if there is one, tells whether the base is installed; none is needed.
    let root = Root::open(&cx.root_path()).ok();
    let shown = with_delta(file, "read", |r| show::show(r, root.as_ref(), &cx.cfg))?;
    match json {
        true => out(&format!("{}\n", serde_json::to_string_pretty(&shown)?))?,
        false => out(&shown.to_text())?,
    }
    Ok(())
}

/// Runs `f` on the delta `file` (`-`: standard input), read through a 1 MiB buffer; its
/// errors say "cannot `what` FILE" (for a file).
fn with_delta<T>(
    file: &Path,
    what: &str,
    f: impl FnOnce(&mut dyn std::io::Read) -> Result<T>,
) -> Result<T> {
    if file.as_os_str() == "-" {
        return f(&mut std::io::stdin().lock());
    }
    open_delta(file)
        .and_then(|d| f(&mut std::io::BufReader::with_capacity(1 << 20, d)))
        .with_context(|| format!("cannot {what} `{}`", file.display()))
}

/// Opens a delta file: a directory or anything but a regular file, FIFO or character device
/// is refused as an error of the command line's (exit 1), not as a malformed delta.
fn open_delta(file: &Path) -> Result<fs_err::File> {
    let f = fs_err::File::open(file)?;
    let ft = f.metadata()?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(ft.is_file() || ft.is_fifo() || ft.is_char_device()) {
        bail!(
            "`{}` is not a delta file (it is a {})",
            file.display(),
            if ft.is_dir() {
                "directory"
            } else {
                "special file"
            }
        );
    }
    Ok(f)
}

fn apply_command(cx: &Env, file: &Path, opts: apply::Options) -> Result<()> {
    // A dry run is a reader: no lock, no root made, nothing recorded.
    let root = match opts.dry_run {
        true => Root::open(&cx.root_path())?,
        false => cx.root(Lock::Exclusive, false)?,
    };
    let outcome = with_delta(file, "apply", |r| apply::apply(&root, &cx.cfg, r, opts));
    if !opts.dry_run {
        record_last_apply(&root, &outcome);
    }
    match outcome? {
        apply::Outcome::Applied { from, to } => {
            cx.say(&format!("applied `{from}` -> `{to}`; current is `{to}`"))
        }
        apply::Outcome::Staged { to } => cx.say(&format!("staged `{to}`; current is unchanged")),
        apply::Outcome::Switched { to } => cx.say(&format!(
            "`{to}` was already installed; current is now `{to}`"
        )),
        apply::Outcome::WouldApply {
            from,
            to,
            objects,
            bytes,
            need,
            free,
        } => out(&format!(
            "would apply: `{from}` -> `{to}` (the base `{from}` is installed)\n\
             new objects: {objects} ({bytes} bytes)\n\
             space: needs {} MiB, {} MiB are free\n",
            need.div_ceil(1 << 20),
            free >> 20
        ))?,
        apply::Outcome::WouldSwitch { to } => out(&format!(
            "would switch: `{to}` is installed already; it would become current\n"
        ))?,
    }
    Ok(())
}

/// Records what an apply that held the lock came to, for `status` (a failure to record is
/// only logged).
fn record_last_apply(root: &Root, outcome: &Result<apply::Outcome>) {
    let done = match outcome {
        Ok(apply::Outcome::Applied { to, .. }) => Ok(("applied", to.as_str())),
        Ok(apply::Outcome::Staged { to }) => Ok(("staged", to.as_str())),
        Ok(apply::Outcome::Switched { to }) => Ok(("switched", to.as_str())),
        Ok(apply::Outcome::WouldApply { .. } | apply::Outcome::WouldSwitch { .. }) => return,
        Err(e) => Err(e),
    };
    record_outcome(root, done);
}

/// Records the outcome of a writer's `apply` or `update` in `last-apply.toml`: its result
/// (`applied`, `staged`, `switched`) and the version it came to, or its error (`nothing` for
/// exit 4, else `failed`) with the exit code. A failure to record is only logged.
fn record_outcome(root: &Root, done: std::result::Result<(&str, &str), &anyhow::Error>) {
    let (result, to, code, error) = match done {
        Ok((result, to)) => (result, Some(to.to_owned()), 0, None),
        Err(e) => {
            let code = crate::core::error::exit_code(e);
            let result = match code == crate::core::error::EXIT_NOTHING {
                true => "nothing",
                false => "failed",
            };
            let msg = crate::core::path::quote_at_most(format!("{e:#}"), 300);
            (result, None, code, Some(msg))
        }
    };
    let last = crate::store::root::LastApply {
        time: crate::store::root::now(),
        result: result.into(),
        code,
        to,
        error,
    };
    if let Err(e) = root.record_last_apply(&last) {
        log::warn!("cannot record the outcome: {e:#}");
    }
}

// --- release repository (issue 18) ---
fn publish_command(cx: &Env, a: &PublishArgs) -> Result<()> {
    let expires = crate::core::index::parse_duration(&a.expires)
        .map_err(|e| Fail::Usage(format!("--expires: {e:#}")))?;
    let what = match (&a.version, a.refresh) {
        (_, true) => publish::What::Refresh,
        (Some(version), false) => publish::What::Version {
            version,
            from_dir: a.from_dir.as_deref().unwrap_or(Path::new("")),
        },
        (None, false) => return Err(Fail::Usage("give --version or --refresh".into()).into()),
    };
    let root = cx.root(Lock::Exclusive, false)?;
    let r = publish::publish(
        &root,
        &cx.cfg,
        &publish::Request {
            repo: &a.repo,
            channel: &a.channel,
            what,
            sign: a.sign.as_deref(),
            keep: a.keep,
            expires,
            level: a.level,
        },
    )?;
    cx.say(&format!(
        "published `{}` on `{}`: serial {}, {} delta(s) written, {} pruned, expires in {} s",
        r.latest,
        a.channel,
        r.serial,
        r.written,
        r.pruned,
        r.expires.saturating_sub(crate::store::root::now())
    ));
    Ok(())
}

fn update_command(cx: &Env, a: &UpdateArgs) -> Result<()> {
    let url = a
        .url
        .clone()
        .or_else(|| cx.cfg.update.url.clone())
        .ok_or_else(|| Fail::Usage("no repository: give --url or set `[update] url`".into()))?;
    let channel = a
        .channel
        .clone()
        .unwrap_or_else(|| cx.cfg.update.channel.clone());
    // --check and --dry-run are readers: no lock, nothing written.
    let writer = !(a.check || a.dry_run);
    let root = match writer {
        true => cx.root(Lock::Exclusive, false)?,
        false => Root::open(&cx.root_path())?,
    };
    let opts = update::Options {
        url,
        channel,
        check: a.check,
        dry_run: a.dry_run,
        stage_only: a.stage_only,
        flip: cx.flip(),
        writer,
        insecure: a.insecure,
        allow_downgrade: a.allow_downgrade,
    };
    let outcome = update::update(&root, &cx.cfg, &opts);
    // A writer's outcome is recorded as an apply's is (`status` shows it).
    if writer {
        record_outcome(
            &root,
            outcome.as_ref().map(|r| (r.result, r.latest.as_str())),
        );
    }
    let report = outcome?;
    match (a.json, writer) {
        (true, _) => out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?,
        (false, false) => out(&report.to_text())?,
        (false, true) => cx.say(report.to_text().trim_end()),
    }
    Ok(())
}
// --- end of release repository ---
