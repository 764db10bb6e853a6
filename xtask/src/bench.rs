//! `cargo xtask bench`: our models side by side with their PyTorch reference (`bench/pytorch/`),
//! measured in one run on the same machine with the same thread count.
//!
//! For each preset, a parity check first proves that the PyTorch reference is our model (same
//! parameter count, same tensor names, same output on the same weights and input); then rounds
//! of alternating processes time a training step, a sampling step and a whole DDIM sample on
//! both sides, and the medians, spreads, ratios and peak memory go to a Markdown report
//! (`docs/benchmarks.md`). Our side runs in a separate process (`xtask bench-worker`), with
//! mimalloc as the `ddpm` binary has, and prints JSON; PyTorch's runs `bench/pytorch/bench.py`
//! from a virtual environment that is created in `target/bench-venv` when missing.
//!
//! The code, by job: this file holds the arguments, the plan of each preset, the orchestration
//! of a run (processes, rounds, parity, where the report goes) and the CUDA profiler's capture
//! range (the one `unsafe` call, in the file `tidy` lists for it); `bench/worker.rs` our side's
//! measurements (`bench-worker time` and `export`), `bench/ops.rs` the single-op timings
//! (`bench-worker ops`), `bench/torch.rs` the Python environment and PyTorch's processes,
//! `bench/stats.rs` the statistics, `bench/report.rs` the Markdown report and
//! `bench/probe.rs` what is read of the machine (CPU, versions, clock, memory).

mod ops;
mod probe;
mod report;
mod stats;
mod torch;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};
use ddpm_unet::ModelConfig;
use serde::{Deserialize, Serialize};

pub(crate) use stats::Stats;
pub(crate) use torch::{check_python, python_cmd};
pub(crate) use worker::our_worker;
pub use worker::{run_worker, WorkerArgs};

use report::{render_parity, Report};
use stats::Measured;
use torch::{setup_torch, Torch};

/// The presets of a full run.
const DEFAULT_PRESETS: &[&str] = &["mnist-small", "cifar-small", "cifar10"];
/// Diffusion steps of the timed DDIM samples.
const DDIM_STEPS: usize = 50;
/// Relative tolerance of the parity check: max |ours - torch| <= PARITY_TOL * max |ours|.
const PARITY_TOL: f64 = 1e-4;

/// Which kernels our side uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// Our CPU kernels (the default of the `ddpm` binary).
    Ours,
    /// candle's own ops (`DDPM_KERNELS=candle`).
    Candle,
    /// Both, as two columns.
    Both,
}

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Smoke run: mnist-small only (unless --presets), small batches, one round; writes
    /// target/bench/quick.md instead of docs/benchmarks.md.
    #[arg(long)]
    quick: bool,
    /// Threads of both sides (RAYON_NUM_THREADS for ours, torch.set_num_threads for PyTorch).
    /// Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Presets to measure, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PRESET,...")]
    presets: Vec<String>,
    /// Rounds: each round runs every measurement once on each side, alternating which side goes
    /// first. Default 3 (1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Our kernels: ours, candle (DDPM_KERNELS=candle) or both (an extra column, slow).
    #[arg(long, value_enum, default_value_t = KernelChoice::Ours)]
    kernels: KernelChoice,
    /// Time our side only; skip PyTorch and the parity check.
    #[arg(long)]
    no_torch: bool,
    /// A Python that has torch, safetensors and numpy, used instead of target/bench-venv.
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Only check that the PyTorch reference computes our models (no timing).
    #[arg(long)]
    parity_only: bool,
    /// Where to write the Markdown report. Default: docs/benchmarks.md for a full run with
    /// PyTorch, target/bench/quick.md with --quick, target/bench/report.md otherwise.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// What one worker process measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Task {
    /// Training steps.
    Train,
    /// Sampling steps, then whole DDIM samples.
    Sample,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Train => "train",
            Task::Sample => "sample",
        }
    }
}

/// The JSON line a worker (ours or PyTorch's) prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerResult {
    engine: String,
    preset: String,
    task: String,
    batch: usize,
    threads: usize,
    params: usize,
    /// Seconds of each timed step.
    pub(crate) times_s: Vec<f64>,
    /// Seconds of each whole DDIM sample.
    pub(crate) ddim_s: Vec<f64>,
    ddim_batch: usize,
    ddim_steps: usize,
    peak_rss_kb: Option<u64>,
    version: String,
    #[serde(default)]
    kernels: Option<String>,
    /// `cpu` or `cuda[:N]`.
    #[serde(default)]
    device: Option<String>,
    /// `f32`, `bf16` or `f16`.
    #[serde(default)]
    precision: Option<String>,
    /// Peak GPU memory allocated (PyTorch's allocator), in KiB.
    #[serde(default)]
    pub(crate) gpu_peak_kb: Option<u64>,
    /// The GPU's name, on CUDA.
    #[serde(default)]
    pub(crate) gpu_name: Option<String>,
}

/// The JSON line `parity.py` prints.
#[derive(Debug, Clone, Deserialize)]
struct ParityResult {
    preset: String,
    ok: bool,
    params_ours: usize,
    params_torch: usize,
    max_rel_err: f64,
    rel_l2_err: f64,
    tol: f64,
    failures: Vec<String>,
}

/// The sizes and repetitions of one preset's measurements.
#[derive(Debug, Clone)]
struct Plan {
    preset: String,
    train_batch: usize,
    train_warmup: usize,
    train_iters: usize,
    sample_batch: usize,
    sample_warmup: usize,
    sample_iters: usize,
    ddim_batch: usize,
    ddim_runs: usize,
}

impl Plan {
    /// Per-round sizes: batch 32 training and batch 64 sampling for the small presets; the
    /// paper's 35.7M-parameter `cifar10` trains at batch 8 and samples DDIM at batch 4 on our
    /// 2-core machines (the whole run takes about 13 minutes there). `--quick` shrinks
    /// everything to a smoke run.
    fn new(preset: &str, quick: bool) -> Self {
        let big = preset == "cifar10";
        if quick {
            return Self {
                preset: preset.to_string(),
                train_batch: 8,
                train_warmup: 1,
                train_iters: 2,
                sample_batch: 8,
                sample_warmup: 1,
                sample_iters: 2,
                ddim_batch: if big { 1 } else { 8 },
                ddim_runs: 1,
            };
        }
        Self {
            preset: preset.to_string(),
            train_batch: if big { 8 } else { 32 },
            train_warmup: if big { 1 } else { 2 },
            train_iters: if big { 3 } else { 5 },
            sample_batch: 64,
            sample_warmup: 1,
            sample_iters: if big { 2 } else { 5 },
            ddim_batch: if big { 4 } else { 64 },
            ddim_runs: 1,
        }
    }
}

/// One side of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Engine {
    Ours,
    OursCandle,
    PyTorch,
}

impl Engine {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Ours => "ours",
            Engine::OursCandle => "ours, candle ops",
            Engine::PyTorch => "PyTorch",
        }
    }
}

/// The repository root: the current directory when it is a checkout of ours (so that a binary
/// carried to another machine finds `bench/`), else the root this xtask was built in.
pub(crate) fn workspace_root() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        if cwd.join("bench/pytorch/bench.py").is_file() {
            return cwd;
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// With `DDPM_PROFILE_LAST_STEP` set on CUDA: starts (`on`) or stops the profiler's capture
/// range around the last timed training step (`ncu --profile-from-start off` then sees one
/// step's kernels, see bench/gpu/profile.sh). The device is synchronized first.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn profile_range(dev: &Device, on: bool) -> anyhow::Result<()> {
    if std::env::var_os("DDPM_PROFILE_LAST_STEP").is_none() || !dev.is_cuda() {
        return Ok(());
    }
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: plain driver calls without arguments; the context is current (the device
        // was just used).
        let r = unsafe {
            if on {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            eprintln!(
                "warning: cuProfilerStart/Stop failed ({r:?}): the profile covers every step"
            );
        }
    }
    Ok(())
}

/// Runs a command whose last line of stdout is JSON, and parses it.
pub(crate) fn run_json<T: serde::de::DeserializeOwned>(
    mut cmd: Command,
    what: &str,
) -> anyhow::Result<T> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match last {
        Some(line) if line.trim_start().starts_with('{') => serde_json::from_str(line)
            .with_context(|| format!("reading the JSON of {what}: {line}")),
        _ if !out.status.success() => bail!("{what} failed ({})", out.status),
        _ => bail!("{what} printed no JSON: {stdout}"),
    }
}

/// Runs one timed worker process of `engine`.
fn measure(
    engine: Engine,
    plan: &Plan,
    task: Task,
    threads: usize,
    python: Option<&Path>,
) -> anyhow::Result<WorkerResult> {
    let (batch, warmup, iters) = match task {
        Task::Train => (plan.train_batch, plan.train_warmup, plan.train_iters),
        Task::Sample => (plan.sample_batch, plan.sample_warmup, plan.sample_iters),
    };
    let ddim_runs = if task == Task::Sample {
        plan.ddim_runs
    } else {
        0
    };
    let common = [
        "--preset".to_string(),
        plan.preset.clone(),
        "--task".into(),
        task.name().into(),
        "--batch".into(),
        batch.to_string(),
        "--warmup".into(),
        warmup.to_string(),
        "--iters".into(),
        iters.to_string(),
        "--ddim-batch".into(),
        plan.ddim_batch.to_string(),
        "--ddim-steps".into(),
        DDIM_STEPS.to_string(),
        "--ddim-runs".into(),
        ddim_runs.to_string(),
    ];
    let mut cmd = match (engine, python) {
        (Engine::PyTorch, Some(py)) => {
            let mut cmd = python_cmd(py, "bench.py", threads);
            cmd.arg("--threads").arg(threads.to_string());
            cmd
        }
        (Engine::PyTorch, None) => bail!("PyTorch is not available"),
        _ => {
            let mut cmd = our_worker(engine, threads)?;
            cmd.arg("time");
            cmd
        }
    };
    cmd.args(common);
    run_json(
        cmd,
        &format!(
            "the {} worker ({} {})",
            engine.label(),
            plan.preset,
            task.name()
        ),
    )
}

/// Exports a preset's weights and reference output, and checks the PyTorch reference on them.
fn parity(preset: &str, python: &Path, threads: usize) -> anyhow::Result<ParityResult> {
    let dir = target_dir().join("bench/parity").join(preset);
    let mut cmd = our_worker(Engine::Ours, threads)?;
    cmd.args(["export", "--preset", preset, "--out-dir"])
        .arg(&dir);
    let _: serde_json::Value = run_json(cmd, &format!("exporting {preset}"))?;
    let mut cmd = python_cmd(python, "parity.py", threads);
    cmd.arg(dir.join("weights.safetensors"))
        .arg(dir.join("io.safetensors"))
        .arg("--tol")
        .arg(PARITY_TOL.to_string());
    run_json(cmd, &format!("parity.py for {preset}"))
}

/// Runs `bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let presets: Vec<String> = if !args.presets.is_empty() {
        args.presets.clone()
    } else if args.quick {
        vec!["mnist-small".into()]
    } else {
        DEFAULT_PRESETS.iter().map(|s| s.to_string()).collect()
    };
    for p in &presets {
        ModelConfig::preset(p).with_context(|| format!("--presets {p}"))?;
    }
    let rounds = match args.rounds {
        Some(0) => bail!("--rounds must be at least 1"),
        Some(n) => n,
        None if args.quick => 1,
        None => 3,
    };
    let load_at_start = probe::load_average();

    let torch = setup_torch(&args)?;
    let python = match &torch {
        Torch::Available { python, version } => {
            eprintln!("bench: PyTorch side: {version} ({})", python.display());
            Some(python.clone())
        }
        Torch::Unavailable { reason } => {
            if args.parity_only {
                bail!("the parity check needs PyTorch, which is unavailable: {reason}");
            }
            eprintln!("bench: PyTorch is UNAVAILABLE ({reason}); timing our side only, no ratios");
            None
        }
    };

    let mut parities = Vec::new();
    if let Some(py) = &python {
        for p in &presets {
            eprintln!("bench: parity check of {p}");
            parities.push(parity(p, py, threads)?);
        }
    }
    if args.parity_only {
        print!("{}", render_parity(&parities));
        return check_parities(&parities);
    }

    let mut engines = match args.kernels {
        KernelChoice::Ours => vec![Engine::Ours],
        KernelChoice::Candle => vec![Engine::OursCandle],
        KernelChoice::Both => vec![Engine::Ours, Engine::OursCandle],
    };
    if python.is_some() {
        engines.push(Engine::PyTorch);
    }
    let plans: Vec<Plan> = presets.iter().map(|p| Plan::new(p, args.quick)).collect();
    let mut results: BTreeMap<(String, Engine), Measured> = BTreeMap::new();
    let mut raw = Vec::new();
    for plan in &plans {
        for round in 0..rounds {
            for task in [Task::Train, Task::Sample] {
                // Alternate which side goes first, so that drift in the machine's speed does not
                // favour one side.
                let mut order = engines.clone();
                if round % 2 == 1 {
                    order.reverse();
                }
                for &engine in &order {
                    let r = measure(engine, plan, task, threads, python.as_deref())?;
                    let s = Stats::of(&r.times_s);
                    eprintln!(
                        "bench: {} round {}/{rounds} {} {}: {:.1} ms/step{}",
                        plan.preset,
                        round + 1,
                        engine.label(),
                        task.name(),
                        s.map_or(f64::NAN, |s| s.median * 1e3),
                        match r.ddim_s.first() {
                            Some(d) => format!(", DDIM sample {d:.1} s"),
                            None => String::new(),
                        }
                    );
                    results
                        .entry((plan.preset.clone(), engine))
                        .or_default()
                        .add(&r, task);
                    raw.push(r);
                }
            }
        }
    }

    let report = Report {
        args: &args,
        threads,
        rounds,
        plans: &plans,
        engines: &engines,
        results: &results,
        parities: &parities,
        torch: &torch,
        load_at_start,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let table = report.results_table();
    println!("{table}");
    let md = report.render();
    let out = match &args.out {
        Some(p) => p.clone(),
        None if args.quick => target_dir().join("bench/quick.md"),
        None if python.is_none() || args.kernels == KernelChoice::Candle => {
            target_dir().join("bench/report.md")
        }
        None => workspace_root().join("docs/benchmarks.md"),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    let raw_path = target_dir().join("bench/last-run.json");
    std::fs::write(&raw_path, serde_json::to_string_pretty(&raw)?)
        .with_context(|| format!("writing {}", raw_path.display()))?;
    eprintln!(
        "bench: wrote {} (raw timings: {}) in {:.0} s",
        out.display(),
        raw_path.display(),
        started.elapsed().as_secs_f64()
    );
    if let Torch::Unavailable { reason } = &torch {
        eprintln!("bench: note: PyTorch was unavailable ({reason}); only our side was timed");
    }
    check_parities(&parities)
}

fn check_parities(parities: &[ParityResult]) -> anyhow::Result<()> {
    let failed: Vec<&str> = parities
        .iter()
        .filter(|p| !p.ok)
        .map(|p| p.preset.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "the PyTorch reference does not match our model for {}",
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plan_is_small() {
        let p = Plan::new("mnist-small", true);
        assert!(p.train_batch <= 8 && p.train_iters <= 2 && p.ddim_runs == 1);
    }
}
