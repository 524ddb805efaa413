//! Writes treeswap's man pages and shell completions, generated from the command line's
//! definition (`treeswap::cli::Cli`), into a directory; `scripts/build-deb.sh` runs it before
//! cargo-deb packs what it wrote.
//!
//! ```sh
//! cargo run --release --example gen-docs -- DIR DATE
//! ```
//!
//! DATE (YYYY-MM-DD) goes in every page's footer; build-deb.sh passes the last commit's, so
//! one commit gives the same pages. DIR gets `man/treeswap.8`, one `man/treeswap-COMMAND.8` per command (section 8: every
//! command is for the administrator), and `completions/treeswap.bash`, `completions/_treeswap`
//! (zsh) and `completions/treeswap.fish`. It prints each file it writes, and warns on stderr
//! about each argument or command that has no description (its man page entry is then bare).
//!
//! An example, not a `src/bin/` binary: `cargo install --path .` installs no generator, and
//! clap_mangen and clap_complete stay dev-dependencies, out of the binary's build.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{ArgAction, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use treeswap::cli::Cli;

const SECTION: &str = "8";

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), Some(date), None) = (args.next(), args.next(), args.next()) else {
        bail!("usage: gen-docs DIR DATE");
    };
    let out = PathBuf::from(out);
    let date = date
        .into_string()
        .map_err(|_| anyhow::anyhow!("DATE is not UTF-8"))?;
    let man_dir = out.join("man");
    let completions_dir = out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        fs::create_dir_all(dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
    }

    // No `help` command in the pages: `--help` is on every page already.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("treeswap {}", cmd.get_version().unwrap_or_default());
    write_page(&cmd, &source, &date, &man_dir, Page::Top)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(sub, &source, &date, &man_dir, Page::Command)?;
    }
    for warning in undocumented(&cmd) {
        eprintln!("gen-docs: warning: {warning} has no description");
    }

    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "treeswap", &completions_dir)
            .with_context(|| format!("failed to write the {shell} completions"))?;
        println!("{}", path.display());
    }
    Ok(())
}

#[derive(PartialEq)]
enum Page {
    /// `treeswap(8)`: the global options, the list of commands, exit status, files.
    Top,
    /// `treeswap-COMMAND(8)`: one command's arguments and options.
    Command,
}

/// Writes one man page: clap_mangen's sections, then what clap has no place for: on the top
/// page EXIT STATUS (from the after-help) and FILES, on a command's page SEE ALSO.
fn write_page(cmd: &clap::Command, source: &str, date: &str, dir: &Path, page: Page) -> Result<()> {
    let man = Man::new(cmd.clone())
        .section(SECTION)
        .date(date)
        .source(source)
        .manual("treeswap");
    let path = dir.join(man.get_filename());
    let mut text = Vec::new();
    man.render_title(&mut text)?;
    man.render_name_section(&mut text)?;
    man.render_synopsis_section(&mut text)?;
    man.render_description_section(&mut text)?;
    man.render_options_section(&mut text)?;
    let mut roff = Roff::default();
    match page {
        Page::Top => {
            man.render_subcommands_section(&mut text)?;
            exit_status(&mut roff, cmd);
            roff.control("SH", ["FILES"]);
            roff.control("TP", []);
            roff.text([bold("/etc/treeswap.toml")]);
            roff.text([roman(
                "The configuration (see --config). As the package ships it every line is \
                 commented out, which means the defaults.",
            )]);
            roff.control("TP", []);
            roff.text([bold("/usr/share/doc/treeswap/README.md")]);
            roff.text([roman(
                "The configuration keys, the boot integration and the exit codes, explained.",
            )]);
        }
        Page::Command => {
            roff.control("SH", ["SEE ALSO"]);
            roff.text([roman(format!("treeswap({SECTION})"))]);
        }
    }
    roff.to_writer(&mut text)?;
    // Commands have no version of their own; the footer names the program's on every page.
    if page == Page::Top {
        man.render_version_section(&mut text)?;
    }
    fs::write(&path, text).with_context(|| format!("failed to write `{}`", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// EXIT STATUS from the after-help's "  CODE  meaning" lines, one tagged paragraph each.
fn exit_status(roff: &mut Roff, cmd: &clap::Command) {
    let Some(help) = cmd.get_after_help().map(|h| h.to_string()) else {
        return;
    };
    roff.control("SH", ["EXIT STATUS"]);
    for line in help.lines() {
        let line = line.trim();
        match line.split_once(char::is_whitespace) {
            Some((code, meaning)) if code.parse::<u8>().is_ok() => {
                roff.control("TP", []);
                roff.text([bold(code)]);
                roff.text([roman(meaning.trim())]);
            }
            // The heading ("Exit codes:") is the section's title already.
            _ if line.ends_with(':') => {}
            _ => {
                roff.text([roman(line)]);
            }
        }
    }
}

/// Each visible argument and command of `cmd` (and its commands) that has no help text.
fn undocumented(cmd: &clap::Command) -> Vec<String> {
    let mut found = Vec::new();
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
        found.push(format!("`{name}`"));
    }
    for arg in cmd.get_arguments() {
        let builtin = matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        );
        if builtin || arg.is_hide_set() {
            continue;
        }
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            let what = match (arg.get_long(), arg.get_short()) {
                (Some(long), _) => format!("--{long}"),
                (None, Some(short)) => format!("-{short}"),
                (None, None) => arg
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| arg.get_id().as_str().to_uppercase()),
            };
            found.push(format!("`{name} {what}`"));
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        found.extend(undocumented(sub));
    }
    found
}
