//! `cargo xtask`: developer workflows for ddpm-rs: fetching data, benchmarks against PyTorch and
//! the quality measurement of the MNIST preset.

// The flags' doc comments are their `--help` text, written for a terminal: `<dataset>` and
// `[:SPLIT]` there are placeholders, not HTML or links.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod bench;
mod bench_gpu;
mod build_cuda;
mod fetch_data;
// The proxy and CA bundle of the environment, read as `ddpm` reads them.
mod fixtures;
mod fuzz;
mod lint_ci;
#[path = "../../crates/ddpm-cli/src/net_env.rs"]
mod net_env;
mod parity;
mod parity_inception;
mod quality;
mod reliability;
mod test_matrix;
mod test_real;
mod tidy;

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
    /// Check the architecture invariants of ARCHITECTURE.md (layering, no environment reads in
    /// libraries, unsafe code only in known places, no timings in comments).
    Tidy(tidy::TidyArgs),
    /// The real-data suite: fetch MNIST and Flowers (verified), then run the tests marked ignored.
    TestReal(test_real::TestRealArgs),
    /// Write the small committed test fixtures (crates/ddpm-data/fixtures) from the real data.
    MakeFixtures(fixtures::MakeFixturesArgs),
    /// Benchmark our models side by side with their PyTorch reference (docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Train the MNIST CPU preset from a fixed seed and evaluate it (docs/quality.md).
    Quality(quality::QualityArgs),
    /// Benchmark a training and a sampling step on a CUDA device against PyTorch.
    BenchGpu(bench_gpu::BenchGpuArgs),
    /// Build `ddpm` and this xtask with CUDA (toolkit from PyPI) into dist/cuda/.
    BuildCuda(build_cuda::BuildCudaArgs),
    /// End-to-end checks on every device and precision, as a pass/fail matrix.
    TestMatrix(test_matrix::TestMatrixArgs),
    /// Run every fuzz target for a bounded time (skips when cargo-fuzz is missing).
    Fuzz(fuzz::FuzzArgs),
    /// Kill, fill, lock and corrupt: every reliability attack, then a table (docs/reliability.md).
    Reliability(reliability::ReliabilityArgs),
    /// Compare with the Python reference: `parity dpm-solver` (diffusers, docs/sampling.md),
    /// `parity inception` (pytorch-fid, docs/fid.md).
    Parity(parity::ParityArgs),
    /// Check .github/workflows/ci.yml offline: structure, MSRV job = rust-version, actionlint.
    LintCi(lint_ci::LintCiArgs),
    /// Our side of `bench`, one measurement per process (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

/// A `cargo` command (the cargo that runs this xtask) without the variables `cargo run` set for
/// this process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Passed on, they reach build scripts
/// that track them (ring's reruns on `CARGO_MANIFEST_DIR`), and everything above them was
/// compiled again after the README's test command, which ran without them.
pub fn cargo() -> std::process::Command {
    let mut c =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_by_run = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || matches!(&*key, "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE");
        if set_by_run {
            c.env_remove(&*key);
        }
    }
    c
}

/// The mirror named by `DDPM_DATA_MIRROR` ([`ddpm_data::fetch::MIRROR_ENV`]), if it is set.
pub fn mirror_from_env() -> Option<ddpm_data::fetch::Source> {
    std::env::var(ddpm_data::fetch::MIRROR_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| ddpm_data::fetch::Source::parse(&v))
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
    // The kernel policy and GPU memory pool of the environment, for every workflow that runs our
    // models (the variables are listed in `ddpm_unet::policy::OVERRIDES` and docs/environment.md).
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    match ddpm_unet::KernelPolicy::default().with_overrides(var) {
        Ok(policy) => {
            policy.install();
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match ddpm_train::device::parse_cuda_pool(var("DDPM_CUDA_POOL").as_deref()) {
        Ok(release) => ddpm_train::device::set_cuda_pool_release(release),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match Cli::parse().command {
        Command::FetchData(args) => fetch_data::run(args),
        Command::TestReal(args) => test_real::run(args),
        Command::Tidy(args) => tidy::run(args),
        Command::MakeFixtures(args) => fixtures::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Quality(args) => quality::run_quality(args),
        Command::BenchWorker(args) => bench::run_worker(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::LintCi(args) => lint_ci::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Reliability(args) => reliability::run(args),
        Command::BenchGpu(args) => bench_gpu::run(args),
        Command::BuildCuda(args) => build_cuda::run(args),
        Command::TestMatrix(args) => test_matrix::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
