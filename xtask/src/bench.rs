//! `cargo xtask bench`: our models side by side with their PyTorch reference (`bench/pytorch/`),
//! measured in one run on the same machine with the same thread count.
//!
//! For each preset, a parity check first proves that the PyTorch reference is our model (same
//! parameter count, same tensor names, same output on the same weights and input, same FLOP
//! count); then both sides measure the machine's matrix-multiply rate (its peak), and rounds of
//! alternating processes time a training step, a sampling step and a whole DDIM sample on our
//! side and on PyTorch in eager mode and in its best mode (`torch.compile`, channels_last, fused
//! AdamW, and on CUDA cudnn.benchmark and TF32). The medians, spreads, ratios (ours against the
//! best mode is the headline), FLOP/s and fractions of peak, compile times and peak memory go to
//! a Markdown report (`docs/benchmarks-run.md`, quoted by `docs/benchmarks.md`). Our side runs
//! in a separate process (`xtask bench-worker`), with mimalloc as the `ddpm` binary has, and
//! prints JSON; PyTorch's runs `bench/pytorch/bench.py`
//! from a virtual environment that is created in `target/bench-venv` when missing.
//!
//! The code, by job: this file holds the arguments, the plan of each preset, the orchestration
//! of a run (processes, rounds, parity, where the report goes) and the CUDA profiler's capture
//! range (the one `unsafe` call, in the file `tidy` lists for it); `bench/worker.rs` our side's
//! measurements (`bench-worker time` and `export`), `bench/ops.rs` the single-op timings
//! (`bench-worker ops`), `bench/torch.rs` the Python environment and PyTorch's processes,
//! `bench/stats.rs` the statistics, `bench/report.rs` the Markdown report and
//! `bench/probe.rs` what is read of the machine (CPU, versions, clock, memory), `bench/isa.rs`
//! the run capped at AVX2 (`--isa avx2`).

mod isa;
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

pub use isa::Isa;
use report::{render_parity, Report};
use stats::Measured;
use torch::{setup_torch, Torch};

/// The presets of a full run on the CPU.
const DEFAULT_PRESETS: &[&str] = &[
    "mnist-small",
    "fashion",
    "cifar-small",
    "learnopencv",
    "cifar10",
];
/// The presets of a full run on a CUDA device.
const DEFAULT_GPU_PRESETS: &[&str] = &["cifar10", "celebahq-256"];
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

/// How PyTorch runs (`bench/pytorch/bench.py --mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TorchMode {
    /// Eager PyTorch.
    Eager,
    /// `torch.compile` alone.
    Compile,
    /// `torch.compile` + channels_last + fused AdamW (+ cudnn.benchmark, TF32 on CUDA).
    Best,
    /// Eager and best, as two columns (the default).
    All,
}

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Smoke run: mnist-small only (unless --presets), small batches, one round; writes
    /// target/bench/quick.md instead of docs/benchmarks-run.md.
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
    /// Where to write the Markdown report. Default: docs/benchmarks-run.md for a full CPU run
    /// with PyTorch (the whole generated report, whose tables docs/benchmarks.md quotes),
    /// target/bench/quick.md with --quick, target/bench/report.md otherwise.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// PyTorch's modes: eager, compile (torch.compile alone), best (compile, channels_last,
    /// fused AdamW; cudnn.benchmark and TF32 on CUDA) or all (eager and best side by side).
    #[arg(long, value_enum, default_value_t = TorchMode::All)]
    torch_mode: TorchMode,
    /// torch.compile's mode for compile and best (default: max-autotune for best on CUDA,
    /// inductor's default otherwise).
    #[arg(long, value_name = "MODE")]
    compile_mode: Option<String>,
    /// cpu, or cuda[:N] (needs a CUDA build of this xtask: `cargo xtask build-cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 on both sides (half precision on CUDA only).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Seconds one worker process may take before it is killed and its cell reports the
    /// timeout (a compile that does not finish, say). Default: no limit.
    #[arg(long, value_name = "SECONDS")]
    worker_timeout: Option<u64>,
    /// Instruction sets of both sides: native, or avx2 (an AVX-512 CPU capped at AVX2 on both
    /// sides, built and run as bench/isa.rs describes; the report goes to
    /// docs/benchmarks-run-avx2.md for a full run).
    #[arg(long, value_enum, default_value_t = Isa::Native)]
    isa: Isa,
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
    /// PyTorch's mode (`eager`, `compile`, `best`).
    #[serde(default)]
    mode: Option<String>,
    /// torch.compile's mode, where compiled.
    #[serde(default)]
    compile_mode: Option<String>,
    /// Seconds spent compiling (the warm-up beyond as many steady steps).
    #[serde(default)]
    compile_s: Option<f64>,
    /// Why there are no times (the first line of the compile error, a timeout).
    #[serde(default)]
    error: Option<String>,
}

impl WorkerResult {
    /// A result without times that says why.
    fn failed(engine: Engine, plan: &Plan, task: Task, error: String) -> Self {
        Self {
            engine: engine.label().into(),
            preset: plan.preset.clone(),
            task: task.name().into(),
            batch: 0,
            threads: 0,
            params: 0,
            times_s: Vec::new(),
            ddim_s: Vec::new(),
            ddim_batch: plan.ddim_batch,
            ddim_steps: DDIM_STEPS,
            peak_rss_kb: None,
            version: String::new(),
            kernels: None,
            device: None,
            precision: None,
            gpu_peak_kb: None,
            gpu_name: None,
            mode: engine.torch_mode().map(str::to_string),
            compile_mode: None,
            compile_s: None,
            error: Some(error),
        }
    }
}

/// The JSON line of a peak measurement (`bench-worker peak`, `bench.py --task peak`): FLOP/s of
/// a large square matrix product per dtype (`f32`, and `bf16` on CUDA).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeakResult {
    engine: String,
    size: usize,
    rates: BTreeMap<String, f64>,
    #[serde(default)]
    version: String,
}

impl PeakResult {
    /// Keeps, for each dtype, the higher of this rate and `other`'s.
    fn keep_higher(&mut self, other: &PeakResult) {
        for (dtype, &rate) in &other.rates {
            let r = self.rates.entry(dtype.clone()).or_insert(rate);
            *r = r.max(rate);
        }
    }
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
    /// Our FLOP count of one image's forward pass (`ddpm_unet::flops`).
    #[serde(default)]
    flops_ours: Option<u64>,
    /// PyTorch's `FlopCounterMode` count of the same forward pass.
    #[serde(default)]
    flops_torch: Option<u64>,
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
    /// Per-round sizes on the CPU: batch 32 training and batch 64 sampling for the small
    /// presets; the paper's 35.7M-parameter `cifar10` and the 25.6M-parameter `learnopencv`
    /// train at batch 8 and sample DDIM at batch 4 on our 2-core machines. On CUDA: training at
    /// batch 128 and sampling (steps and DDIM) at batch 256, the 256x256 `celebahq-256` at 16.
    /// `--quick` shrinks everything to a smoke run.
    fn new(preset: &str, quick: bool, gpu: bool) -> Self {
        let big = matches!(preset, "cifar10" | "learnopencv");
        if gpu {
            let huge = preset == "celebahq-256";
            let (train, sample) = if huge { (16, 16) } else { (128, 256) };
            let (warmup, iters) = if quick {
                (2, 2)
            } else {
                (3, if huge { 5 } else { 10 })
            };
            return Self {
                preset: preset.to_string(),
                train_batch: train,
                train_warmup: warmup,
                train_iters: iters,
                sample_batch: sample,
                sample_warmup: warmup,
                sample_iters: iters,
                ddim_batch: sample,
                ddim_runs: 1,
            };
        }
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
    /// PyTorch eager.
    PyTorch,
    /// PyTorch under `torch.compile` alone.
    TorchCompile,
    /// PyTorch's best mode.
    TorchBest,
}

impl Engine {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Engine::Ours => "ours",
            Engine::OursCandle => "ours, candle ops",
            Engine::PyTorch => "PyTorch eager",
            Engine::TorchCompile => "PyTorch compile",
            Engine::TorchBest => "PyTorch best",
        }
    }

    /// `bench.py --mode` of a PyTorch engine; `None` for ours.
    pub(crate) fn torch_mode(self) -> Option<&'static str> {
        match self {
            Engine::Ours | Engine::OursCandle => None,
            Engine::PyTorch => Some("eager"),
            Engine::TorchCompile => Some("compile"),
            Engine::TorchBest => Some("best"),
        }
    }

    /// Whether this is one of our engines.
    pub(crate) fn is_ours(self) -> bool {
        self.torch_mode().is_none()
    }
}

/// The PyTorch engines of a `--torch-mode`.
fn torch_engines(mode: TorchMode) -> Vec<Engine> {
    match mode {
        TorchMode::Eager => vec![Engine::PyTorch],
        TorchMode::Compile => vec![Engine::TorchCompile],
        TorchMode::Best => vec![Engine::TorchBest],
        TorchMode::All => vec![Engine::PyTorch, Engine::TorchBest],
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
    cmd: Command,
    what: &str,
) -> anyhow::Result<T> {
    run_json_timeout(cmd, what, None)
}

/// [`run_json`], killing the process after `timeout` (an error that says so).
fn run_json_timeout<T: serde::de::DeserializeOwned>(
    mut cmd: Command,
    what: &str,
    timeout: Option<std::time::Duration>,
) -> anyhow::Result<T> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut pipe = child.stdout.take().context("the worker's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut pipe, &mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break status;
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} timed out after {:.0} s (--worker-timeout)",
                started.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stdout_bytes = reader.join().unwrap_or_default();
    let out = std::process::Output {
        status,
        stdout: stdout_bytes,
        stderr: Vec::new(),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match last {
        Some(line) if line.trim_start().starts_with('{') => serde_json::from_str(line)
            .with_context(|| format!("reading the JSON of {what}: {line}")),
        _ if !out.status.success() => bail!("{what} failed ({})", out.status),
        _ => bail!("{what} printed no JSON: {stdout}"),
    }
}

/// Runs one timed worker process of `engine`. A PyTorch process in a compiled mode that fails
/// or times out gives a result without times that says why (the report shows it in that
/// cell); any other failure is an error.
fn measure(
    engine: Engine,
    plan: &Plan,
    task: Task,
    args: &BenchArgs,
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
        "--device".into(),
        args.device.clone(),
        "--precision".into(),
        args.precision.clone(),
    ];
    let gpu = args.device.starts_with("cuda");
    let mut cmd = match (engine.torch_mode(), python) {
        (Some(mode), Some(py)) => {
            let mut cmd = python_cmd(py, "bench.py", threads);
            cmd.arg("--threads")
                .arg(threads.to_string())
                .args(["--mode", mode]);
            if let (Some(m), true) = (&args.compile_mode, mode != "eager") {
                cmd.args(["--compile-mode", m]);
            }
            cmd
        }
        (Some(_), None) => bail!("PyTorch is not available"),
        (None, _) => {
            let mut cmd = our_worker(engine, threads)?;
            // On CUDA the kernel choice of the caller's environment is what is measured.
            if let (Ok(k), true) = (std::env::var("DDPM_KERNELS"), gpu && engine == Engine::Ours) {
                cmd.env("DDPM_KERNELS", k);
            }
            cmd.arg("time");
            cmd
        }
    };
    cmd.args(common);
    let what = format!(
        "the {} worker ({} {})",
        engine.label(),
        plan.preset,
        task.name()
    );
    let timeout = args.worker_timeout.map(std::time::Duration::from_secs);
    // On a GPU machine, where time is scarce, any failed process (out of memory, say) becomes a
    // cell that says so instead of ending the run.
    match run_json_timeout::<WorkerResult>(cmd, &what, timeout) {
        Ok(r) => Ok(r),
        Err(e) if matches!(engine, Engine::TorchCompile | Engine::TorchBest) || gpu => {
            let first = format!("{e:#}");
            let first = first.lines().next().unwrap_or("").to_string();
            eprintln!("bench: {what} failed: {first}");
            Ok(WorkerResult::failed(engine, plan, task, first))
        }
        Err(e) => Err(e),
    }
}

/// The machine's matrix-multiply rates, measured by our side and (when available) PyTorch's.
fn measure_peak(
    args: &BenchArgs,
    threads: usize,
    python: Option<&Path>,
) -> anyhow::Result<Vec<PeakResult>> {
    let mut cmd = our_worker(Engine::Ours, threads)?;
    cmd.args(["peak", "--device", &args.device]);
    let mut peaks = vec![run_json::<PeakResult>(cmd, "our peak measurement")?];
    if let Some(py) = python {
        let mut cmd = python_cmd(py, "bench.py", threads);
        cmd.args(["--task", "peak", "--device", &args.device, "--threads"])
            .arg(threads.to_string());
        match run_json::<PeakResult>(cmd, "PyTorch's peak measurement") {
            Ok(p) => peaks.push(p),
            Err(e) => eprintln!("bench: {e:#}; the peak is ours alone"),
        }
    }
    Ok(peaks)
}

/// One line per side and dtype of `peaks`, `what` after the matrix size.
fn print_peaks(peaks: &[PeakResult], what: &str) {
    for p in peaks {
        for (dtype, rate) in &p.rates {
            eprintln!(
                "bench: peak {} {dtype} {}x{}{what}: {:.1} GFLOP/s",
                p.engine,
                p.size,
                p.size,
                rate / 1e9
            );
        }
    }
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
        .arg(PARITY_TOL.to_string())
        .arg("--threads")
        .arg(threads.to_string());
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
    let gpu = args.device.starts_with("cuda");
    if !gpu && args.device != "cpu" {
        bail!("--device {}: use cpu, cuda or cuda:N", args.device);
    }
    if args.isa == Isa::Avx2 {
        if gpu {
            bail!("--isa avx2 caps the CPU's instruction sets: use it with --device cpu");
        }
        if !isa::running_capped() {
            return isa::rerun_capped();
        }
    }
    let presets: Vec<String> = if !args.presets.is_empty() {
        args.presets.clone()
    } else if gpu {
        DEFAULT_GPU_PRESETS.iter().map(|s| s.to_string()).collect()
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

    eprintln!("bench: the machine's matrix-multiply rate (peak)");
    let mut peaks = measure_peak(&args, threads, python.as_deref())?;
    if args.isa == Isa::Avx2 {
        // PyTorch ignores a capability it does not know: make sure the cap took.
        if let Some(p) = peaks.iter().find(|p| p.engine == "pytorch") {
            if !p.version.contains(isa::TORCH_AVX2_CAPABILITY) {
                bail!(
                    "--isa avx2: PyTorch did not cap itself at AVX2 (it reports: {})",
                    p.version
                );
            }
        }
    }
    print_peaks(&peaks, "");

    let mut engines = match args.kernels {
        KernelChoice::Ours => vec![Engine::Ours],
        KernelChoice::Candle => vec![Engine::OursCandle],
        KernelChoice::Both => vec![Engine::Ours, Engine::OursCandle],
    };
    if python.is_some() {
        engines.extend(torch_engines(args.torch_mode));
    }
    let plans: Vec<Plan> = presets
        .iter()
        .map(|p| Plan::new(p, args.quick, gpu))
        .collect();
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
                    let r = measure(engine, plan, task, &args, threads, python.as_deref())?;
                    let s = Stats::of(&r.times_s);
                    eprintln!(
                        "bench: {} round {}/{rounds} {} {}: {:.1} ms/step{}{}",
                        plan.preset,
                        round + 1,
                        engine.label(),
                        task.name(),
                        s.map_or(f64::NAN, |s| s.median * 1e3),
                        match r.ddim_s.first() {
                            Some(d) => format!(", DDIM sample {d:.1} s"),
                            None => String::new(),
                        },
                        match (&r.error, r.compile_s) {
                            (Some(e), _) => format!(" (failed: {e})"),
                            (None, Some(c)) => format!(", compile {c:.1} s"),
                            (None, None) => String::new(),
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

    // Once more at the end: a rate measured while another process shared the cores would make
    // every fraction of peak too high, so each side keeps the higher of its two rates.
    eprintln!("bench: the matrix-multiply rate again, at the end of the run");
    for p in measure_peak(&args, threads, python.as_deref())? {
        match peaks.iter_mut().find(|q| q.engine == p.engine) {
            Some(q) => q.keep_higher(&p),
            None => peaks.push(p),
        }
    }
    print_peaks(&peaks, ", the higher of the two");

    let report = Report {
        args: &args,
        threads,
        rounds,
        plans: &plans,
        engines: &engines,
        results: &results,
        parities: &parities,
        peaks: &peaks,
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
        None if python.is_none() || args.kernels == KernelChoice::Candle || gpu => {
            target_dir().join("bench/report.md")
        }
        None if args.isa == Isa::Avx2 => workspace_root().join("docs/benchmarks-run-avx2.md"),
        None => workspace_root().join("docs/benchmarks-run.md"),
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
        let p = Plan::new("mnist-small", true, false);
        assert!(p.train_batch <= 8 && p.train_iters <= 2 && p.ddim_runs == 1);
        let g = Plan::new("cifar10", false, true);
        assert_eq!((g.train_batch, g.ddim_batch), (128, 256));
    }

    /// The peak kept from two measurements is, per dtype, the higher one.
    #[test]
    fn peak_keeps_the_higher_rate_per_dtype() {
        let peak = |rates: &[(&str, f64)]| PeakResult {
            engine: "ours".into(),
            size: 2048,
            rates: rates.iter().map(|&(d, r)| (d.to_string(), r)).collect(),
            version: String::new(),
        };
        let mut start = peak(&[("f32", 147e9), ("bf16", 900e9)]);
        start.keep_higher(&peak(&[("f32", 229e9), ("bf16", 800e9), ("f16", 700e9)]));
        assert_eq!(start.rates["f32"], 229e9);
        assert_eq!(start.rates["bf16"], 900e9);
        assert_eq!(start.rates["f16"], 700e9);
    }

    /// `--torch-mode all` measures eager and best; every mode has its engines and labels.
    #[test]
    fn torch_modes_and_engines() {
        assert_eq!(
            torch_engines(TorchMode::All),
            vec![Engine::PyTorch, Engine::TorchBest]
        );
        assert_eq!(Engine::TorchBest.torch_mode(), Some("best"));
        assert!(Engine::Ours.is_ours() && !Engine::TorchCompile.is_ours());
    }

    /// bench/gpu/run-on-gpu.sh parses, and `--dry-run` checks its inputs: with the files of
    /// `cargo xtask build-cuda` (stand-ins here) and a Python that imports (`true` here) it
    /// lists every stage with its budget and exits 0; without them it names what is missing in
    /// one line and exits nonzero. Runs nothing else.
    #[test]
    fn gpu_script_parses_and_dry_run_lists_its_stages() -> anyhow::Result<()> {
        let root = workspace_root();
        let script = "bench/gpu/run-on-gpu.sh";
        let syntax = Command::new("bash")
            .args(["-n", script])
            .current_dir(&root)
            .status()?;
        assert!(syntax.success(), "bash -n {script}");

        let bin = tempfile::tempdir()?;
        let dry_run = |bin: &Path| -> anyhow::Result<std::process::Output> {
            Ok(Command::new("bash")
                .args([script, "--dry-run"])
                .current_dir(&root)
                .env("BIN", bin)
                .env("PYTHON", "true")
                .env("OUT", bin.join("out"))
                .output()?)
        };
        let missing = dry_run(bin.path())?;
        assert!(!missing.status.success());
        let err = String::from_utf8_lossy(&missing.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("missing inputs") && err.contains("unet-tests"),
            "{err}"
        );

        for f in ["xtask", "unet-tests.xz", "env.sh"] {
            std::fs::write(bin.path().join(f), "")?;
        }
        let ok = dry_run(bin.path())?;
        let out = String::from_utf8_lossy(&ok.stdout);
        assert!(
            ok.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        for stage in [
            "gpu",
            "kernel-tests",
            "profile",
            "bench-cifar10",
            "bench-256",
        ] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&format!("stage {stage} "))),
                "no stage {stage}: {out}"
            );
        }
        assert!(out.contains("--presets cifar10 --torch-mode all"), "{out}");
        assert!(out.contains("--presets celebahq-256"), "{out}");
        assert!(!bin.path().join("out").exists(), "a dry run writes nothing");
        Ok(())
    }

    /// A process that outlives its timeout is killed and reported as timed out.
    #[test]
    fn run_json_times_out() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let started = Instant::now();
        let err = run_json_timeout::<serde_json::Value>(
            cmd,
            "sleep",
            Some(std::time::Duration::from_millis(100)),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("timed out"), "{err}");
        assert!(started.elapsed().as_secs_f64() < 4.0);
    }
}
