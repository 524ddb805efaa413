//! The `treeswap` command: parses the command line, sets up logging, runs the command (the
//! library's `cli::run`), and maps an error to its documented exit code.

use clap::Parser;

use treeswap::cli::{self, Cli};
use treeswap::core::{error, logging, progress};

fn main() {
    let cli = Cli::parse();
    logging::init(cli.verbose, cli.quiet);
    progress::set_quiet(cli.quiet);
    let code = match cli::run(&cli) {
        Ok(()) => error::EXIT_OK,
        Err(e) => {
            let code = error::exit_code(&e);
            // One line: the causes joined, innermost last.
            let msg = logging::one_line(&format!("{e:#}"));
            match (code == error::EXIT_NOTHING, logging::to_journal()) {
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
