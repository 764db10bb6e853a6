//! `cargo xtask`: developer workflows for ddpm-rs (fetching data; benchmarks and test matrices
//! can be added as further subcommands).

mod fetch_data;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Developer workflows for ddpm-rs.
#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download (or copy from a mirror) the data sets into the data directory, verified.
    FetchData(fetch_data::FetchDataArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::FetchData(args) => fetch_data::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
