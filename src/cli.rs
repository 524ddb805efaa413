//! The command line: clap's definitions, and `run`, which loads the config once, opens the
//! state root, calls the command's `ops` function and prints what it returns.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::core::config::{self, Config};
use crate::core::error::{EXIT_CODES_HELP, Fail};
use crate::core::{manifest, version};
use crate::ops::{apply, boot, checkout, diff, flip, gc, import, status, verify};
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
    /// Do not restart the guests after a flip.
    #[arg(long, global = true)]
    pub no_restart: bool,
    /// If a guest fails to restart on the new tree, leave the new tree current and only report.
    #[arg(long, global = true)]
    pub no_auto_revert: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Make the state root's layout (idempotent).
    Init,
    /// Hash a directory into the pool and install it as version V.
    Import {
        dir: PathBuf,
        #[arg(long)]
        version: String,
        /// Point `current` at it.
        #[arg(long)]
        activate: bool,
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
        version: Option<String>,
        /// Also re-hash every pool object the tree uses.
        #[arg(long)]
        full: bool,
    },
    /// Show installed versions, current, previous and the pool.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List installed versions (`*` current, `-` previous).
    List,
    /// Build a hardlink farm of installed version V at DEST (which must not exist).
    Checkout { version: String, dest: PathBuf },
    /// Make a delta from one tree to another.
    Diff(DiffArgs),
    /// Apply a delta (`-` reads standard input): stage, verify, flip.
    Apply {
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
    },
    /// Point `current` at an installed version.
    Switch { version: String },
    /// Flip `current` back to `previous`.
    Revert,
    /// Run at boot before the guests start: repair interrupted work, count the boot, and
    /// revert a pending tree that used up its tries.
    Boot,
    /// Mark the current tree good (run by a health check once the guests are up).
    MarkGood,
    /// Remove trees that are not current, previous, pending or pinned, then unused objects.
    Gc {
        /// Keep the N newest of the other trees.
        #[arg(long, default_value_t = 0)]
        keep: usize,
    },
    /// Protect an installed version from gc.
    Pin { version: String },
    /// Let gc remove a pinned version again.
    Unpin { version: String },
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
        root.lock(how, self.cli.wait)?;
        Ok(root)
    }

    fn flip(&self) -> flip::Options {
        flip::Options {
            restart: !self.cli.no_restart,
            auto_revert: !self.cli.no_auto_revert,
        }
    }
}

/// Runs the command `cli` names.
pub fn run(cli: &Cli) -> Result<()> {
    // Read the config up front, so that a broken one is reported by every command.
    let cx = Env {
        cli,
        cfg: config::load(cli.config.as_deref())?,
    };
    let command = match (&cli.command, cli.revert) {
        (Some(_), true) => {
            return Err(Fail::Usage("--revert cannot be combined with a command".into()).into());
        }
        (Some(c), false) => c,
        (None, true) => &Command::Revert,
        (None, false) => {
            return Err(Fail::Usage("no command given; see `treeswap --help`".into()).into());
        }
    };
    match command {
        Command::Init => drop(cx.root(Lock::Exclusive, true)?),
        Command::Import {
            dir,
            version,
            activate,
        } => import_command(&cx, dir, version, *activate)?,
        Command::Manifest { dir, load } => manifest_command(dir.as_deref(), load.as_deref())?,
        Command::Verify { version, full } => verify_command(&cx, version.as_deref(), *full)?,
        Command::Status { json } => {
            let s = status::status(&cx.root(Lock::Shared, false)?, &cx.cfg)?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&s)?),
                false => print!("{}", s.to_text()),
            }
        }
        Command::List => {
            let s = status::status(&cx.root(Lock::Shared, false)?, &cx.cfg)?;
            print!("{}", s.to_list());
        }
        Command::Checkout { version, dest } => {
            // A writer: in immutable mode, it records that objects are briefly unprotected.
            let root = cx.root(Lock::Exclusive, false)?;
            checkout::checkout(&root, &cx.cfg, version, dest)?;
        }
        Command::Diff(args) => diff_command(&cx, args)?,
        Command::Apply {
            file,
            stage_only,
            insecure,
            allow_downgrade,
        } => {
            let opts = apply::Options {
                stage_only: *stage_only,
                flip: cx.flip(),
                insecure: *insecure,
                allow_downgrade: *allow_downgrade,
            };
            apply_command(&cx, file, opts)?
        }
        Command::Switch { version } => {
            let root = cx.root(Lock::Exclusive, false)?;
            flip::switch(&root, &cx.cfg, version, cx.flip())?;
        }
        Command::Revert => {
            let root = cx.root(Lock::Exclusive, false)?;
            let v = flip::revert(&root, &cx.cfg, cx.flip())?;
            log::info!("reverted to `{v}`");
        }
        Command::Boot => boot_command(&cx)?,
        Command::Gc { keep } => {
            let root = cx.root(Lock::Exclusive, false)?;
            root.warn_stuck();
            let r = gc::gc(&root, *keep, &[])?;
            println!("{}", r.summary());
        }
        Command::Pin { version } => gc::pin(&cx.root(Lock::Exclusive, false)?, version, true)?,
        Command::Unpin { version } => gc::pin(&cx.root(Lock::Exclusive, false)?, version, false)?,
        Command::MarkGood => match boot::mark_good(&cx.root(Lock::Exclusive, false)?)? {
            Some(v) => log::info!("`{v}` is marked good"),
            None => log::info!("nothing pending: the current tree is already good"),
        },
    }
    Ok(())
}

fn boot_command(cx: &Env) -> Result<()> {
    let root = cx.root(Lock::Exclusive, false)?;
    root.warn_stuck();
    match boot::boot(&root, &cx.cfg, cx.flip())? {
        boot::BootOutcome::Ok => log::info!("boot: state root is consistent"),
        boot::BootOutcome::Reverted(v) => {
            return Err(Fail::GuestsReverted(format!(
                "the pending tree did not prove healthy (boot tries used up, or its guests failed); reverted to `{v}`"
            ))
            .into());
        }
    }
    Ok(())
}

fn import_command(cx: &Env, dir: &Path, version: &str, activate: bool) -> Result<()> {
    version::validate(version)?;
    if !dir.is_dir() {
        bail!("cannot import `{}`: not a directory", dir.display());
    }
    let root = cx.root(Lock::Exclusive, true)?;
    import::import(&root, &cx.cfg, dir, version)?;
    if activate {
        import::activate(&root, &cx.cfg, version, cx.flip())?;
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
    log::info!("`{}` verified{how}: {} entries", r.version, r.entries);
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

fn apply_command(cx: &Env, file: &Path, opts: apply::Options) -> Result<()> {
    let root = cx.root(Lock::Exclusive, true)?;
    let outcome = if file.as_os_str() == "-" {
        apply::apply(&root, &cx.cfg, std::io::stdin().lock(), opts)?
    } else {
        let f = fs_err::File::open(file)?;
        let r = std::io::BufReader::with_capacity(1 << 20, f);
        apply::apply(&root, &cx.cfg, r, opts)
            .with_context(|| format!("cannot apply `{}`", file.display()))?
    };
    match outcome {
        apply::Outcome::Applied { from, to } => {
            log::info!("applied: `{from}` -> `{to}`; current is `{to}`")
        }
        apply::Outcome::Staged { to } => log::info!("staged `{to}`; current is unchanged"),
        apply::Outcome::Switched { to } => {
            log::info!("`{to}` was already installed; current is now `{to}`")
        }
    }
    Ok(())
}
