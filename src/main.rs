//! The `treeswap` command: parses the command line, sets up logging, calls the library, and
//! maps errors to the documented exit codes.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use treeswap::core::config::Config;
use treeswap::core::error::{self, EXIT_CODES_HELP, Fail};
use treeswap::core::manifest;
use treeswap::ops::{apply, diff, flip, import, status};
use treeswap::store::root::{DEFAULT_ROOT, Lock, Root};
use treeswap::tree::{scan, stage, verify};

#[derive(Parser)]
#[command(
    name = "treeswap",
    version,
    about = "Atomic tree-swap updates from a content-addressed pool of hardlinked objects",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// The state root [default: the config file's `root`, else /versions].
    #[arg(long, global = true, env = "TREESWAP_ROOT")]
    root: Option<PathBuf>,
    /// The config file [default: /etc/treeswap.toml; a missing default means defaults].
    #[arg(long, global = true, env = "TREESWAP_CONFIG")]
    config: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Wait for the lock instead of failing with "busy".
    #[arg(long, global = true)]
    wait: bool,
    /// Flip `current` back to `previous` (the same as the `revert` command).
    #[arg(long)]
    revert: bool,
    /// Do not restart the guests after a flip.
    #[arg(long, global = true)]
    no_restart: bool,
    /// If a guest fails to restart on the new tree, leave the new tree current and only report.
    #[arg(long, global = true)]
    no_auto_revert: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
    Diff {
        /// The base tree, as a directory (no state root needed).
        #[arg(long, requires = "to_dir", conflicts_with_all = ["from", "to"])]
        from_dir: Option<PathBuf>,
        /// The result tree, as a directory.
        #[arg(long, requires = "from_dir")]
        to_dir: Option<PathBuf>,
        /// The base tree's version name, recorded in the delta (with --from-dir).
        #[arg(long)]
        from_version: Option<String>,
        /// The result's version name (with --to-dir).
        #[arg(long)]
        to_version: Option<String>,
        /// The base, as an installed version.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// The result, as an installed version.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Where to write the delta (`-` for standard output).
        #[arg(short, long)]
        output: PathBuf,
        /// Sign the delta with this unencrypted minisign secret key (`minisign -G -W`).
        #[arg(long, value_name = "SECRET_KEY_FILE")]
        sign: Option<PathBuf>,
        /// Write a plain tar instead of a zstd-compressed one.
        #[arg(long)]
        uncompressed: bool,
        /// zstd level of the blobs (1-22): higher is smaller and slower to make.
        #[arg(long, default_value_t = treeswap::core::codec::LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
    },
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

fn main() {
    let cli = Cli::parse();
    treeswap::core::logging::init(cli.verbose, cli.quiet);
    treeswap::core::progress::set_quiet(cli.quiet);
    let code = match run(cli) {
        Ok(()) => error::EXIT_OK,
        Err(e) => {
            let code = error::exit_code(&e);
            // One line: the causes joined, innermost last.
            let msg = format!("{e:#}").replace('\n', " ");
            match (
                code == error::EXIT_NOTHING,
                treeswap::core::logging::to_journal(),
            ) {
                (true, false) => eprintln!("treeswap: {msg}"),
                (false, false) => eprintln!("treeswap: error: {msg}"),
                // Under systemd the journal takes the priority from the prefix.
                (true, true) => eprintln!("<5>{msg}"),
                (false, true) => eprintln!("<3>error: {msg}"),
            }
            code
        }
    };
    std::process::exit(code);
}

fn root_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(r) = &cli.root {
        return Ok(r.clone());
    }
    Ok(config(cli)?
        .root
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)))
}

fn config(cli: &Cli) -> Result<Config> {
    treeswap::core::config::load(cli.config.as_deref())
}

fn flip_opts(cli: &Cli) -> flip::Options {
    flip::Options {
        restart: !cli.no_restart,
        auto_revert: !cli.no_auto_revert,
    }
}

fn open_root(cli: &Cli, how: Lock, create: bool) -> Result<Root> {
    let path = root_path(cli)?;
    let mut root = if create {
        Root::create(&path)?
    } else {
        Root::open(&path)?
    };
    root.lock(how, cli.wait)?;
    Ok(root)
}

fn run(cli: Cli) -> Result<()> {
    // Read the config up front, so that a broken one is reported by every command.
    config(&cli)?;
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
        Command::Init => {
            open_root(&cli, Lock::Exclusive, true)?;
        }
        Command::Import {
            dir,
            version,
            activate,
        } => {
            treeswap::core::version::validate(version)?;
            if !dir.is_dir() {
                bail!("cannot import `{}`: not a directory", dir.display());
            }
            let root = open_root(&cli, Lock::Exclusive, true)?;
            let cfg = config(&cli)?;
            import::import(&root, &cfg, dir, version)?;
            if *activate {
                let cfg = config(&cli)?;
                // The first install: nothing to fall back to, so it is good at once.
                let st = treeswap::store::state::load(root.fd())?;
                flip::switch(&root, &cfg, version, flip_opts(&cli))?;
                if st.pending.is_none() && root.link("previous")?.is_none() {
                    treeswap::ops::boot::mark_good(&root)?;
                }
            }
        }
        Command::Manifest { dir, load } => {
            let mut out = std::io::stdout().lock();
            if let Some(file) = load {
                let f = fs_err::File::open(file)?;
                let m = manifest::parse_reader(std::io::BufReader::with_capacity(1 << 20, f))
                    .with_context(|| format!("invalid manifest `{}`", file.display()))?;
                writeln!(
                    out,
                    "{} entries, digest {}",
                    m.entries.len(),
                    hex::encode(m.digest())
                )?;
            } else {
                let dir = dir.as_ref().expect("required");
                let m = scan::scan(dir, true, None)?.manifest;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
                m.write_toml(&mut w)?;
                w.flush()?;
            }
        }
        Command::Verify { version, full } => {
            let root = open_root(&cli, Lock::Shared, false)?;
            let version = match version {
                Some(v) => v.clone(),
                None => root
                    .link("current")?
                    .context("no version given and no current version")?,
            };
            treeswap::core::version::validate(&version)?;
            let m = root.load_manifest(&version)?;
            let trees = root.subdir("trees")?;
            let tree = treeswap::fs::sys::open_dir_beneath(trees.as_fd(), version.as_bytes())
                .with_context(|| format!("version `{version}` is not installed"))?;
            let layout = root.load_layout(&version)?;
            let problems = verify::verify_tree(tree.as_fd(), &m, &root.pool()?, &layout, *full)?;
            let mut out = std::io::stdout().lock();
            for p in &problems {
                writeln!(out, "{p}")?;
            }
            if !problems.is_empty() {
                return Err(Fail::Verify(format!(
                    "verification of `{version}` failed: {} problem(s)",
                    problems.len()
                ))
                .into());
            }
            log::info!(
                "`{version}` verified{}: {} entries",
                if *full { " in full" } else { "" },
                m.entries.len()
            );
        }
        Command::Status { json } => {
            let root = open_root(&cli, Lock::Shared, false)?;
            let s = status::status(&root, &config(&cli)?)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.to_text());
            }
        }
        Command::List => {
            let root = open_root(&cli, Lock::Shared, false)?;
            print!("{}", status::status(&root, &config(&cli)?)?.to_list());
        }
        Command::Checkout { version, dest } => {
            // A writer: in immutable mode, it records that objects are briefly unprotected.
            let root = open_root(&cli, Lock::Exclusive, false)?;
            treeswap::core::version::validate(version)?;
            let m = root.load_manifest(version)?;
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let name = dest
                .file_name()
                .with_context(|| format!("`{}` has no file name", dest.display()))?;
            let pfd = treeswap::fs::sys::open_dir(&parent)?;
            use std::os::unix::ffi::OsStrExt;
            let cfg = config(&cli)?;
            let pool = root.pool_for(&cfg)?;
            let layout = treeswap::store::protect::Layout::new(pool.mode(), &cfg.private)?;
            let built = treeswap::store::protect::while_linking(&root, &pool, || {
                stage::build(
                    &m,
                    &pool,
                    &layout,
                    pfd.as_fd(),
                    name.as_bytes(),
                    false,
                    None,
                )
            })?;
            if let Err(e) = built {
                // Remove what was built, unless DEST existed before (then nothing was).
                if !e.chain().any(|c| {
                    c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::EXIST)
                }) {
                    let _ = treeswap::fs::sys::remove_tree_at(pfd.as_fd(), name.as_bytes());
                }
                return Err(e.context(format!(
                    "cannot check out `{version}` to `{}`",
                    dest.display()
                )));
            }
        }
        Command::Diff {
            from_dir,
            to_dir,
            from_version,
            to_version,
            from,
            to,
            output,
            sign,
            uncompressed,
            level,
        } => diff_command(
            &cli,
            from_dir.as_deref(),
            to_dir.as_deref(),
            from_version.as_deref(),
            to_version.as_deref(),
            from.as_deref(),
            to.as_deref(),
            output,
            sign.as_deref(),
            !*uncompressed,
            *level,
        )?,
        Command::Apply {
            file,
            stage_only,
            insecure,
            allow_downgrade,
        } => {
            let cfg = config(&cli)?;
            let root = open_root(&cli, Lock::Exclusive, true)?;
            let opts = apply::Options {
                stage_only: *stage_only,
                flip: flip_opts(&cli),
                insecure: *insecure,
                allow_downgrade: *allow_downgrade,
            };
            let outcome = if file.as_os_str() == "-" {
                apply::apply(&root, &cfg, std::io::stdin().lock(), opts)?
            } else {
                let f = fs_err::File::open(file)?;
                apply::apply(
                    &root,
                    &cfg,
                    std::io::BufReader::with_capacity(1 << 20, f),
                    opts,
                )
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
        }
        Command::Switch { version } => {
            let cfg = config(&cli)?;
            let root = open_root(&cli, Lock::Exclusive, false)?;
            flip::switch(&root, &cfg, version, flip_opts(&cli))?;
        }
        Command::Revert => {
            let cfg = config(&cli)?;
            let root = open_root(&cli, Lock::Exclusive, false)?;
            let v = flip::revert(&root, &cfg, flip_opts(&cli))?;
            log::info!("reverted to `{v}`");
        }
        Command::Boot => {
            let cfg = config(&cli)?;
            let root = open_root(&cli, Lock::Exclusive, false)?;
            match treeswap::ops::boot::boot(&root, &cfg, flip_opts(&cli))? {
                treeswap::ops::boot::BootOutcome::Ok => {
                    log::info!("boot: state root is consistent")
                }
                treeswap::ops::boot::BootOutcome::Reverted(v) => {
                    return Err(Fail::GuestsReverted(format!(
                        "the pending tree did not prove healthy (boot tries used up, or its guests failed); reverted to `{v}`"
                    ))
                    .into());
                }
            }
        }
        Command::Gc { keep } => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            let r = treeswap::ops::gc::gc(&root, *keep, &[])?;
            println!(
                "removed {} tree(s){}, {} object(s), {} bytes",
                r.trees_removed.len(),
                if r.trees_removed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.trees_removed.join(" "))
                },
                r.objects_removed,
                r.bytes_freed
            );
        }
        Command::Pin { version } => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            treeswap::ops::gc::pin(&root, version, true)?;
        }
        Command::Unpin { version } => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            treeswap::ops::gc::pin(&root, version, false)?;
        }
        Command::MarkGood => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            match treeswap::ops::boot::mark_good(&root)? {
                Some(v) => log::info!("`{v}` is marked good"),
                None => log::info!("nothing pending: the current tree is already good"),
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn diff_command(
    cli: &Cli,
    from_dir: Option<&std::path::Path>,
    to_dir: Option<&std::path::Path>,
    from_version: Option<&str>,
    to_version: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    output: &std::path::Path,
    sign: Option<&std::path::Path>,
    compress: bool,
    level: i32,
) -> Result<()> {
    let (delta, blobs, stats) = match (from_dir, to_dir, from, to) {
        (Some(d1), Some(d2), None, None) => {
            let to_version =
                to_version.ok_or_else(|| Fail::Usage("--to-dir needs --to-version".into()))?;
            let mut m1 = scan::scan(d1, true, None)?.manifest;
            if let Some(v) = from_version {
                treeswap::core::version::validate(v)?;
                m1.version = Some(v.to_owned());
            }
            let m2 = scan::scan(d2, true, None)?.manifest;
            let (t1, t2) = (
                treeswap::fs::sys::open_dir(d1)?,
                treeswap::fs::sys::open_dir(d2)?,
            );
            let r1 = |e: &treeswap::core::manifest::Entry| {
                treeswap::fs::sys::open_file_beneath(t1.as_fd(), &e.path)
            };
            let r2 = |e: &treeswap::core::manifest::Entry| {
                treeswap::fs::sys::open_file_beneath(t2.as_fd(), &e.path)
            };
            let changes = diff::compare(&m1, m2);
            let mut base = diff::Base::new(m1.version.clone(), m1.digest(), &changes);
            for e in &m1.entries {
                base.keep(e);
            }
            drop(m1);
            diff::diff(&base, &r1, changes, &r2, to_version, level)?
        }
        (None, None, Some(v1), Some(v2)) => {
            if from_version.is_some() || to_version.is_some() {
                return Err(Fail::Usage(
                    "--from-version and --to-version go with --from-dir and --to-dir".into(),
                )
                .into());
            }
            let root = open_root(cli, Lock::Shared, false)?;
            // Neither manifest is held whole.
            let (base, changes) = diff::installed(&root, v1, v2)?;
            let pool = root.pool()?;
            let read = |e: &treeswap::core::manifest::Entry| {
                pool.open_object(&e.object().context("not a file")?)
            };
            diff::diff(&base, &read, changes, &read, v2, level)?
        }
        _ => {
            return Err(Fail::Usage(
                "give either --from-dir and --to-dir, or --from and --to".into(),
            )
            .into());
        }
    };
    if output.as_os_str() == "-" {
        diff::write_delta(&delta, &blobs, sign, compress, std::io::stdout().lock())?;
    } else {
        // Written beside its final name and renamed, so a reader never sees half a delta.
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(&dir)
            .with_context(|| format!("cannot create a temporary file in `{}`", dir.display()))?;
        diff::write_delta(
            &delta,
            &blobs,
            sign,
            compress,
            std::io::BufWriter::new(tmp.as_file()),
        )?;
        // Deltas are meant to be passed around: readable by all, like any download.
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .with_context(|| format!("cannot set the mode of `{}`", tmp.path().display()))?;
        tmp.persist(output)
            .with_context(|| format!("cannot write `{}`", output.display()))?;
    }
    log::info!(
        "delta: {} changed, {} removed, {} contents ({} from the base, {} whole, {} zstd patches, {} bsdiff), {} bytes of blobs",
        stats.changed,
        stats.removed,
        stats.contents,
        stats.from_base,
        stats.whole,
        stats.zstd_patch,
        stats.bsdiff,
        stats.bytes
    );
    Ok(())
}
