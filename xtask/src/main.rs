//! `cargo xtask`: developer workflows for ddpm-rs: fetching data, benchmarks against PyTorch and
//! the quality measurement of the MNIST preset.

mod bench;
mod fetch_data;
mod quality;

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
    /// Benchmark our models side by side with their PyTorch reference (docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Train the MNIST CPU preset from a fixed seed and evaluate it (docs/quality.md).
    Quality(quality::QualityArgs),
    /// Our side of `bench`, one measurement per process (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
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
        Command::Bench(args) => bench::run(args),
        Command::Quality(args) => quality::run_quality(args),
        Command::BenchWorker(args) => bench::run_worker(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
