//! `cargo xtask`: developer workflows for ddpm-rs (fetching data, benchmarks, test matrices).

use clap::{Parser, Subcommand};

/// Developer workflows for ddpm-rs.
#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the datasets (filled by the datasets issue).
    FetchData,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::FetchData => anyhow::bail!("fetch-data is not implemented yet"),
    }
}
