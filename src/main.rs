//! The `treeswap` command: parses the command line, sets up logging, calls the library, and
//! maps errors to the documented exit codes.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use treeswap::error::{self, EXIT_CODES_HELP, Fail};
use treeswap::root::{DEFAULT_ROOT, Lock, Root};
use treeswap::{flip, import, manifest, scan, stage, status, verify};

#[derive(Parser)]
#[command(
    name = "treeswap",
    version,
    about = "Atomic tree-swap updates from a content-addressed pool of hardlinked objects",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// The state root.
    #[arg(long, global = true, env = "TREESWAP_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
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
    /// Point `current` at an installed version.
    Switch { version: String },
    /// Flip `current` back to `previous`.
    Revert,
}

fn main() {
    let cli = Cli::parse();
    treeswap::logging::init(cli.verbose, cli.quiet);
    treeswap::progress::set_quiet(cli.quiet);
    let code = match run(cli) {
        Ok(()) => error::EXIT_OK,
        Err(e) => {
            let code = error::exit_code(&e);
            // One line: the causes joined, innermost last.
            let msg = format!("{e:#}").replace('\n', " ");
            if code == error::EXIT_NOTHING {
                eprintln!("treeswap: {msg}");
            } else {
                eprintln!("treeswap: error: {msg}");
            }
            code
        }
    };
    std::process::exit(code);
}

fn open_root(cli: &Cli, how: Lock, create: bool) -> Result<Root> {
    let mut root = if create {
        Root::create(&cli.root)?
    } else {
        Root::open(&cli.root)?
    };
    root.lock(how, cli.wait)?;
    Ok(root)
}

fn run(cli: Cli) -> Result<()> {
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
            treeswap::version::validate(version)?;
            if !dir.is_dir() {
                bail!("cannot import `{}`: not a directory", dir.display());
            }
            let root = open_root(&cli, Lock::Exclusive, true)?;
            import::import(&root, dir, version)?;
            if *activate {
                flip::switch(&root, version)?;
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
                out.write_all(m.to_toml().as_bytes())?;
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
            treeswap::version::validate(&version)?;
            let m = root.load_manifest(&version)?;
            let trees = root.subdir("trees")?;
            let tree = treeswap::sys::open_dir_beneath(trees.as_fd(), version.as_bytes())
                .with_context(|| format!("version `{version}` is not installed"))?;
            let problems = verify::verify_tree(tree.as_fd(), &m, &root.pool()?, *full)?;
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
            let s = status::status(&root)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.to_text());
            }
        }
        Command::List => {
            let root = open_root(&cli, Lock::Shared, false)?;
            print!("{}", status::status(&root)?.to_list());
        }
        Command::Checkout { version, dest } => {
            let root = open_root(&cli, Lock::Shared, false)?;
            treeswap::version::validate(version)?;
            let m = root.load_manifest(version)?;
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let name = dest
                .file_name()
                .with_context(|| format!("`{}` has no file name", dest.display()))?;
            let pfd = treeswap::sys::open_dir(&parent)?;
            use std::os::unix::ffi::OsStrExt;
            stage::build(&m, &root.pool()?, pfd.as_fd(), name.as_bytes())
                .with_context(|| format!("cannot check out `{version}` to `{}`", dest.display()))?;
        }
        Command::Switch { version } => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            flip::switch(&root, version)?;
        }
        Command::Revert => {
            let root = open_root(&cli, Lock::Exclusive, false)?;
            let v = flip::revert(&root)?;
            log::info!("reverted to `{v}`");
        }
    }
    Ok(())
}
