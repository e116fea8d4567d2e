//! The `feedsync` command line. Thin by design: it parses arguments, calls the library, renders
//! its events, and maps errors to exit codes (see `cli::error`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::args::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_quiet() => e.exit_code(),
        Err(e) => {
            eprintln!("feedsync: {e}");
            e.exit_code()
        }
    }
}
