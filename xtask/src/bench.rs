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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use ddpm_schedule::{DiffusionLoss, Objective, SamplerConfig, Schedule, ScheduleConfig};
use ddpm_train::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};
use ddpm_train::sample::{gaussian, sample, SampleOptions};
use ddpm_unet::{DiffusionModel, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

// candle allocates a fresh buffer for every op; the `ddpm` binary uses mimalloc for that reason
// (much faster training steps; docs/benchmarks.md), so our benchmark process must too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The presets of a full run.
const DEFAULT_PRESETS: &[&str] = &["mnist-small", "cifar-small", "cifar10"];
/// Diffusion steps of the timed DDIM samples.
const DDIM_STEPS: usize = 50;
/// The Python packages of the PyTorch side.
const PIP_PACKAGES: &[&str] = &["torch", "safetensors", "numpy"];
/// Written into the virtual environment only once every package imports.
const VENV_READY_MARKER: &str = ".ddpm-bench-ready";
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

/// Arguments of the hidden `bench-worker` (our side of the benchmark, one process per task).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(subcommand)]
    mode: WorkerMode,
}

#[derive(Subcommand, Debug)]
enum WorkerMode {
    /// Time a training step or sampling; prints one line of JSON.
    Time(TimeArgs),
    /// Write a preset's weights (perturbed so that every tensor matters) and a fixed input with
    /// our output on it, for the parity check.
    Export(ExportArgs),
    /// Time single hot ops (convolution variants, GroupNorm, a GEMM, per-op overhead) on one
    /// device; prints one line per op to stdout.
    Ops(OpsArgs),
}

#[derive(Args, Debug)]
struct OpsArgs {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    precision: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    channels: usize,
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

#[derive(Args, Debug)]
struct TimeArgs {
    #[arg(long)]
    preset: String,
    #[arg(long, value_enum)]
    task: Task,
    #[arg(long)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, default_value_t = 0)]
    ddim_batch: usize,
    #[arg(long, default_value_t = DDIM_STEPS)]
    ddim_steps: usize,
    #[arg(long, default_value_t = 0)]
    ddim_runs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (half precision on CUDA only).
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[arg(long)]
    preset: String,
    #[arg(long)]
    out_dir: PathBuf,
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

/// Runs the hidden `bench-worker`.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    ddpm_train::device::keep_freed_host_memory();
    match args.mode {
        WorkerMode::Time(a) => {
            println!("{}", serde_json::to_string(&worker_time(&a)?)?);
            Ok(())
        }
        WorkerMode::Export(a) => worker_export(a),
        WorkerMode::Ops(a) => worker_ops(&a),
    }
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Where a training step's time goes (`DDPM_BENCH_PHASES=1`): each phase ends with a device
/// synchronization, so the split is exact on CUDA (and the total is a little slower).
struct Phases {
    on: bool,
    last: Instant,
    spent: Vec<(&'static str, f64)>,
}

impl Phases {
    fn from_env() -> Self {
        Self {
            on: std::env::var_os("DDPM_BENCH_PHASES").is_some(),
            last: Instant::now(),
            spent: Vec::new(),
        }
    }

    fn start(&mut self) {
        self.last = Instant::now();
        self.spent.clear();
    }

    fn mark(&mut self, dev: &Device, phase: &'static str) -> candle_core::Result<()> {
        if self.on {
            dev.synchronize()?;
            self.spent.push((phase, self.last.elapsed().as_secs_f64()));
            self.last = Instant::now();
        }
        Ok(())
    }

    fn report(&self, preset: &str) {
        if self.on {
            let parts: Vec<String> = self
                .spent
                .iter()
                .map(|(p, s)| format!("{p} {:.1} ms", s * 1e3))
                .collect();
            eprintln!("phases {preset}: {}", parts.join(", "));
        }
    }
}

/// Median seconds of `iters` runs of `f` after two warm-up runs, each ended by a device sync.
fn time_op(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        dev.synchronize()?;
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(Stats::of(&times).map_or(f64::NAN, |s| s.median))
}

/// `bench-worker ops`: where a device spends its time on the U-Nets' hot ops.
fn worker_ops(a: &OpsArgs) -> anyhow::Result<()> {
    use ddpm_unet::ops::{self, ConvParams};
    let dev = ddpm_train::parse_device(&a.device)?;
    let dtype = ddpm_train::Precision::parse(&a.precision)?.compute_dtype();
    let (b, c, s) = (a.batch, a.channels, a.size);
    let x = candle_core::Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?.to_dtype(dtype)?,
    )?;
    let w = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (c, c, 3, 3), &dev)? * 0.05)?.to_dtype(dtype)?,
    )?;
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    let flops = 2.0 * (b * c * c * 9 * s * s) as f64;
    let line = |name: &str, secs: f64, work: f64| {
        println!(
            "ops {}: {name}: {:.3} ms{}",
            a.device,
            secs * 1e3,
            if work > 0.0 {
                format!(", {:.0} GFLOP/s", work / secs / 1e9)
            } else {
                String::new()
            }
        );
    };
    // ops::conv2d: our CPU kernel, or on CUDA our im2col kernel and a cuBLAS GEMM (the same
    // as the tensor-op im2col below with DDPM_CUDA_KERNELS=off).
    let t = time_op(&dev, a.iters, || {
        ops::conv2d(x.as_tensor(), w.as_tensor(), None, p).map(|_| ())
    })?;
    line("conv3x3 forward, ops::conv2d (our kernels)", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = ops::conv2d(x.as_tensor(), w.as_tensor(), None, p)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line(
        "conv3x3 forward+backward, ops::conv2d (our kernels)",
        t,
        3.0 * flops,
    );
    let t = time_op(&dev, a.iters, || {
        ops::conv2d_unfold(x.as_tensor(), w.as_tensor(), p).map(|_| ())
    })?;
    line("conv3x3 forward, im2col from tensor ops", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = ops::conv2d_unfold(x.as_tensor(), w.as_tensor(), p)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line(
        "conv3x3 forward+backward, im2col from tensor ops",
        t,
        3.0 * flops,
    );
    let t = time_op(&dev, a.iters, || {
        x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).map(|_| ())
    })?;
    line("conv3x3 forward, candle conv2d", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("conv3x3 forward+backward, candle conv2d", t, 3.0 * flops);
    let lhs = Tensor::randn(0f32, 1.0, (b * s * s, 9 * c), &dev)?.to_dtype(dtype)?;
    let rhs = Tensor::randn(0f32, 1.0, (9 * c, c), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || lhs.matmul(&rhs).map(|_| ()))?;
    line("GEMM of the conv's size", t, flops);
    let big = Tensor::randn(0f32, 1.0, (2048, 2048), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || big.matmul(&big).map(|_| ()))?;
    line(
        "GEMM 2048x2048x2048 (the machine's matmul)",
        t,
        2.0 * 2048f64.powi(3),
    );
    let gw = Tensor::ones(c, DType::F32, &dev)?;
    let gb = Tensor::zeros(c, DType::F32, &dev)?;
    let t = time_op(&dev, a.iters, || {
        let y = ops::group_norm(x.as_tensor(), 32.min(c), &gw, &gb, 1e-5)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("GroupNorm forward+backward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        ops::group_norm(x.as_tensor(), 32.min(c), &gw, &gb, 1e-5).map(|_| ())
    })?;
    line("GroupNorm forward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        let y = ops::upsample_nearest_2x(x.as_tensor())?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("nearest 2x upsampling forward+backward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        ops::cat_channels(x.as_tensor(), x.as_tensor()).map(|_| ())
    })?;
    line("skip concatenation (channels)", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        x.as_tensor().sum_all()?.backward().map(|_| ())
    })?;
    line(
        "sum_all + backward (the loss the timings above add)",
        t,
        0.0,
    );
    #[cfg(feature = "cuda")]
    if ddpm_unet::kernels::cuda_supported(x.as_tensor()) {
        use ddpm_unet::kernels::cuda::{im2col, Unfold};
        let g = Unfold {
            b,
            c,
            h: s,
            w: s,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
            oh: s,
            ow: s,
        };
        let t = time_op(&dev, a.iters, || im2col(x.as_tensor(), g).map(|_| ()))?;
        line("our im2col kernel alone", t, 0.0);
        let cols = im2col(x.as_tensor(), g)?;
        let w2 = w.as_tensor().reshape((c, 9 * c))?;
        let t = time_op(&dev, a.iters, || w2.broadcast_matmul(&cols).map(|_| ()))?;
        line(
            "the conv's batched GEMM alone (weight broadcast over images)",
            t,
            flops,
        );
    }
    // The element-wise and small ops a U-Net forward is made of besides convolutions.
    let xt = x.as_tensor();
    let bias = Tensor::ones((1, c, 1, 1), dtype, &dev)?;
    let t = time_op(&dev, a.iters, || xt.broadcast_add(&bias).map(|_| ()))?;
    line("bias add, (1, c, 1, 1) broadcast", t, 0.0);
    let image_bias = Tensor::ones((b, c, 1, 1), dtype, &dev)?;
    let t = time_op(&dev, a.iters, || xt.broadcast_add(&image_bias).map(|_| ()))?;
    line("per-image bias add, (b, c, 1, 1) broadcast", t, 0.0);
    let t = time_op(&dev, a.iters, || (xt + xt).map(|_| ()))?;
    line("residual add, same shapes", t, 0.0);
    let t = time_op(&dev, a.iters, || xt.to_dtype(DType::F32).map(|_| ()))?;
    line("cast to f32", t, 0.0);
    let t = time_op(&dev, a.iters, || ops::silu(xt).map(|_| ()))?;
    line("SiLU", t, 0.0);
    let qkv = Tensor::randn(0f32, 1.0, (b, 3 * 2 * c, s / 2, s / 2), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || {
        ops::attention(&qkv, 1, 2 * c, 0.05).map(|_| ())
    })?;
    line("attention forward, 2c channels at half the size", t, 0.0);
    let scores = Tensor::randn(0f32, 1.0, (b, 1, s * s / 4, s * s / 4), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || ops::softmax(&scores, 3).map(|_| ()))?;
    line("softmax over the attention scores alone", t, 0.0);
    let t = time_op(&dev, a.iters, || xt.sum_keepdim(0).map(|_| ()))?;
    line(
        "sum over the batch dimension (a broadcast's backward)",
        t,
        0.0,
    );
    let small = Tensor::ones(1024, DType::F32, &dev)?;
    let t = time_op(&dev, a.iters, || {
        let mut acc = small.clone();
        for _ in 0..1000 {
            acc = (acc + &small)?;
        }
        Ok(())
    })?;
    line("1000 dependent tiny adds (per-op overhead x 1000)", t, 0.0);
    let strided = Tensor::ones((32, 32), DType::F32, &dev)?.t()?;
    let t = time_op(&dev, a.iters, || {
        for _ in 0..1000 {
            let _ = strided.contiguous()?;
        }
        Ok(())
    })?;
    line("1000 tiny strided copies (layout upload x 1000)", t, 0.0);
    Ok(())
}

/// Times `a.task` in this process (our side of one measurement).
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

fn worker_time(a: &TimeArgs) -> anyhow::Result<WorkerResult> {
    let config = ModelConfig::preset(&a.preset)?;
    let dev = ddpm_train::parse_device(&a.device)?;
    let precision = ddpm_train::Precision::parse(&a.precision)?;
    precision.check_device(&dev)?;
    let model = DiffusionModel::new(&config, a.seed, &dev, DType::F32)?
        .with_compute_dtype(precision.compute_dtype());
    let schedule = Schedule::new(&ScheduleConfig::default(), &dev)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let shape = [
        a.batch,
        config.channels(),
        config.image_size(),
        config.image_size(),
    ];
    let t_max = schedule.timesteps() as u32;
    let mut times = Vec::with_capacity(a.iters);
    let mut ddim = Vec::new();
    match a.task {
        Task::Train => {
            // As ddpm-train's step (without EMA): eps objective through q_sample, MSE, backward,
            // clipping to norm 1, AdamW.
            let vars = model.vars();
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
            let lr = AdamWConfig::default().lr;
            let n: usize = shape.iter().product();
            let x0: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let x0 = Tensor::from_vec(x0, &shape, &dev)?;
            let mut phases = Phases::from_env();
            for i in 0..a.warmup + a.iters {
                if i + 1 == a.warmup + a.iters {
                    profile_range(&dev, true)?;
                }
                let start = Instant::now();
                phases.start();
                let ts: Vec<u32> = (0..a.batch).map(|_| rng.random_range(0..t_max)).collect();
                let t = Tensor::from_vec(ts, a.batch, &dev)?;
                let noise = gaussian(&mut rng, &shape, &dev)?;
                let x_t = schedule.q_sample(&x0, &t, &noise)?;
                phases.mark(&dev, "inputs")?;
                let pred = model.forward_t(&x_t, &t, None, Some(&mut rng))?;
                let loss = DiffusionLoss::default().compute(
                    &schedule,
                    Objective::Eps,
                    &pred,
                    &noise,
                    &t,
                )?;
                let _value = loss.to_scalar::<f32>()?;
                phases.mark(&dev, "forward")?;
                let g = loss.backward()?;
                phases.mark(&dev, "backward")?;
                let mut grads = BTreeMap::new();
                for (name, var) in &vars {
                    if let Some(gv) = g.get(var.as_tensor()) {
                        grads.insert(name.clone(), gv.clone());
                    }
                }
                // As the trainer: the clipping factor goes into AdamW's in-place update.
                let clip = clip_factor(grad_norm(&grads)?, 1.0);
                phases.mark(&dev, "clip")?;
                opt.step_scaled(&grads, lr, clip)?;
                dev.synchronize()?;
                phases.mark(&dev, "adamw")?;
                if i >= a.warmup {
                    phases.report(&a.preset);
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            profile_range(&dev, false)?;
        }
        Task::Sample => {
            let x = gaussian(&mut rng, &shape, &dev)?;
            let ts: Vec<u32> = (0..a.batch).map(|_| rng.random_range(0..t_max)).collect();
            let t = Tensor::from_vec(ts, a.batch, &dev)?;
            let frozen = model.frozen()?;
            for i in 0..a.warmup + a.iters {
                dev.synchronize()?;
                let start = Instant::now();
                let _eps = frozen.forward(&x, &t)?.detach();
                dev.synchronize()?;
                if i >= a.warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            let ddim_batch = if a.ddim_batch == 0 {
                a.batch
            } else {
                a.ddim_batch
            };
            let opts = SampleOptions {
                num: ddim_batch,
                sampler: SamplerConfig::Ddim {
                    steps: Some(a.ddim_steps),
                    eta: 0.0,
                    clip_x0: true,
                },
                seed: a.seed,
                batch_size: ddim_batch,
                frames: 0,
                progress: false,
            };
            for _ in 0..a.ddim_runs {
                let start = Instant::now();
                let _images = sample(&model, &schedule, Objective::Eps, &opts)?;
                ddim.push(start.elapsed().as_secs_f64());
            }
        }
    }
    let kernels = match ddpm_unet::ops::kernels() {
        ddpm_unet::ops::Kernels::Ours => "ours",
        ddpm_unet::ops::Kernels::Candle => "candle",
    };
    tracing::debug!(policy = %ddpm_unet::KernelPolicy::active(), "bench worker kernels");
    let result = WorkerResult {
        engine: "ours".into(),
        preset: a.preset.clone(),
        task: a.task.name().into(),
        batch: a.batch,
        threads: candle_core::utils::get_num_threads(),
        params: model.num_parameters(),
        times_s: times,
        ddim_s: ddim,
        ddim_batch: if a.ddim_batch == 0 {
            a.batch
        } else {
            a.ddim_batch
        },
        ddim_steps: a.ddim_steps,
        peak_rss_kb: peak_rss_kb(),
        version: format!("ddpm-rs {}", env!("CARGO_PKG_VERSION")),
        kernels: Some(kernels.into()),
        device: Some(a.device.clone()),
        precision: Some(precision.name().into()),
        gpu_peak_kb: None,
        gpu_name: None,
    };
    Ok(result)
}

fn worker_export(a: ExportArgs) -> anyhow::Result<()> {
    let config = ModelConfig::preset(&a.preset)?;
    let dev = Device::Cpu;
    let model = DiffusionModel::new(&config, 0, &dev, DType::F32)?;
    // GroupNorm scales start at 1 and shifts at 0: perturb every vector so that a mix-up of
    // affine parameters (or of any two same-shaped vectors) changes the output.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut tensors = HashMap::new();
    for (name, t) in model.tensors() {
        // (Fresh storage either way: a variable cannot be set from its own storage.)
        let t = if t.rank() == 1 {
            (&t + (gaussian(&mut rng, t.dims(), &dev)? * 0.1)?)?
        } else {
            t.copy()?
        };
        tensors.insert(name, t);
    }
    model.set_tensors(&tensors, Path::new("<perturbed init>"))?;
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let weights = a.out_dir.join("weights.safetensors");
    model
        .save(&weights)
        .with_context(|| format!("writing {}", weights.display()))?;

    let (c, s) = (config.channels(), config.image_size());
    let x = gaussian(&mut rng, &[3, c, s, s], &dev)?;
    let t = Tensor::new(&[0u32, 417, 999], &dev)?;
    let out = model.forward(&x, &t)?;
    let io_tensors = BTreeMap::from([
        ("x".to_string(), x),
        ("t".to_string(), t.to_dtype(DType::I64)?),
        ("out".to_string(), out),
    ]);
    let metadata = HashMap::from([
        ("preset".to_string(), a.preset.clone()),
        (
            "num_parameters".to_string(),
            model.num_parameters().to_string(),
        ),
        ("model_config".to_string(), serde_json::to_string(&config)?),
    ]);
    let io = a.out_dir.join("io.safetensors");
    let bytes = ddpm_unet::weights::to_safetensors_bytes(&io_tensors, metadata)?;
    ddpm_unet::weights::write_atomic(&io, &bytes)
        .with_context(|| format!("writing {}", io.display()))?;
    println!(
        "{}",
        serde_json::json!({"weights": weights, "io": io, "params": model.num_parameters()})
    );
    Ok(())
}

/// Where PyTorch comes from in this run.
enum Torch {
    Available { python: PathBuf, version: String },
    Unavailable { reason: String },
}

/// Checks that `python` imports every package; returns "torch X, Python Y".
pub(crate) fn check_python(python: &Path) -> anyhow::Result<String> {
    let out = Command::new(python)
        .args([
            "-c",
            "import platform, numpy, safetensors, torch; \
             print(f'torch {torch.__version__}, Python {platform.python_version()}')",
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import torch, safetensors and numpy: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Creates `venv` with the packages from PyPI; on any failure removes it again, so that a broken
/// environment is never taken for a good one. The marker file is written last.
fn install_venv(venv: &Path) -> anyhow::Result<String> {
    eprintln!(
        "bench: creating {} with {} from PyPI (about 2-3 GB, several minutes; done once)",
        venv.display(),
        PIP_PACKAGES.join(", ")
    );
    let result = (|| -> anyhow::Result<String> {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .context("running `python3 -m venv` (is Python 3 installed?)")?;
        if !status.success() {
            bail!("`python3 -m venv {}` failed ({status})", venv.display());
        }
        let python = venv.join("bin/python");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
            ])
            .args(PIP_PACKAGES)
            .stdout(Stdio::inherit())
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("`pip install {}` failed ({status})", PIP_PACKAGES.join(" "));
        }
        let version = check_python(&python)?;
        std::fs::write(venv.join(VENV_READY_MARKER), format!("{version}\n"))
            .context("writing the ready marker")?;
        Ok(version)
    })();
    if result.is_err() && venv.exists() {
        let _ = std::fs::remove_dir_all(venv);
    }
    result
}

/// Finds or creates the Python of the PyTorch side; never tries to install more than once.
fn setup_torch(args: &BenchArgs) -> anyhow::Result<Torch> {
    if args.no_torch {
        return Ok(Torch::Unavailable {
            reason: "--no-torch was given".into(),
        });
    }
    if let Some(python) = &args.python {
        let version = check_python(python)?;
        return Ok(Torch::Available {
            python: python.clone(),
            version,
        });
    }
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin/python");
    if venv.join(VENV_READY_MARKER).exists() {
        match check_python(&python) {
            Ok(version) => return Ok(Torch::Available { python, version }),
            Err(e) => eprintln!("bench: {} is broken ({e:#}); reinstalling", venv.display()),
        }
    } else if venv.exists() {
        eprintln!(
            "bench: {} is incomplete (an interrupted or failed install); reinstalling",
            venv.display()
        );
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    Ok(match install_venv(&venv) {
        Ok(version) => Torch::Available { python, version },
        Err(e) => Torch::Unavailable {
            reason: format!("installing PyTorch into {} failed: {e:#}", venv.display()),
        },
    })
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

pub(crate) fn our_worker(engine: Engine, threads: usize) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding the xtask executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench-worker")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string());
    if engine == Engine::OursCandle {
        cmd.env("DDPM_KERNELS", "candle");
    } else {
        cmd.env_remove("DDPM_KERNELS");
    }
    Ok(cmd)
}

pub(crate) fn python_cmd(python: &Path, script: &str, threads: usize) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(workspace_root().join("bench/pytorch").join(script))
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
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

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Stats {
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Half the min-to-max range, relative to the median, in percent.
    pub(crate) fn spread_pct(&self) -> f64 {
        if self.median > 0.0 {
            50.0 * (self.max - self.min) / self.median
        } else {
            0.0
        }
    }
}

/// Everything measured for one preset on one engine.
#[derive(Debug, Default, Clone)]
struct Measured {
    train: Vec<f64>,
    sample: Vec<f64>,
    ddim: Vec<f64>,
    rss_train_kb: Option<u64>,
    rss_sample_kb: Option<u64>,
    params: Option<usize>,
    version: Option<String>,
    threads: Option<usize>,
}

impl Measured {
    fn add(&mut self, r: &WorkerResult, task: Task) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        match task {
            Task::Train => {
                self.train.extend(&r.times_s);
                self.rss_train_kb = max(self.rss_train_kb, r.peak_rss_kb);
            }
            Task::Sample => {
                self.sample.extend(&r.times_s);
                self.ddim.extend(&r.ddim_s);
                self.rss_sample_kb = max(self.rss_sample_kb, r.peak_rss_kb);
            }
        }
        self.params = Some(r.params);
        self.version = Some(r.version.clone());
        self.threads = Some(r.threads);
    }
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
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string));

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

fn render_parity(parities: &[ParityResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| preset | parameters (ours) | parameters (PyTorch) | max relative error | relative L2 error | result |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
    for p in parities {
        let result = if p.ok {
            format!("ok (tolerance {:.0e})", p.tol)
        } else {
            format!("**FAILED**: {}", p.failures.join("; "))
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.1e} | {:.1e} | {} |",
            p.preset, p.params_ours, p.params_torch, p.max_rel_err, p.rel_l2_err, result
        );
    }
    s
}

struct Report<'a> {
    args: &'a BenchArgs,
    threads: usize,
    rounds: usize,
    plans: &'a [Plan],
    engines: &'a [Engine],
    results: &'a BTreeMap<(String, Engine), Measured>,
    parities: &'a [ParityResult],
    torch: &'a Torch,
    load_at_start: Option<String>,
    elapsed_s: f64,
}

/// A time in ms below 10 s, else in s.
fn fmt_time(s: f64) -> String {
    if s < 10.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

fn fmt_mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0))
}

impl Report<'_> {
    fn get(&self, preset: &str, engine: Engine) -> Option<&Measured> {
        self.results.get(&(preset.to_string(), engine))
    }

    /// The results table: per preset and measurement, each engine's median (spread) and the
    /// ratio of each of our columns to PyTorch's.
    fn results_table(&self) -> String {
        let ours: Vec<Engine> = self
            .engines
            .iter()
            .copied()
            .filter(|e| *e != Engine::PyTorch)
            .collect();
        let has_torch = self.engines.contains(&Engine::PyTorch);
        let mut s = String::new();
        let mut header = "| preset | measurement |".to_string();
        let mut rule = "|---|---|".to_string();
        for e in self.engines {
            let _ = write!(header, " {} |", e.label());
            rule.push_str("---:|");
        }
        if has_torch {
            for e in &ours {
                let _ = write!(header, " {} / PyTorch |", e.label());
                rule.push_str("---:|");
            }
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for plan in self.plans {
            type Row<'r> = (String, Box<dyn Fn(&Measured) -> (Option<f64>, String) + 'r>);
            let timed = |values: fn(&Measured) -> &Vec<f64>, batch: usize| {
                move |m: &Measured| match Stats::of(values(m)) {
                    Some(st) => (
                        Some(st.median),
                        format!(
                            "{} ±{:.0}% · {:.1} img/s",
                            fmt_time(st.median),
                            st.spread_pct(),
                            batch as f64 / st.median
                        ),
                    ),
                    None => (None, "n/a".into()),
                }
            };
            let rows: Vec<Row> = vec![
                (
                    format!("training step, batch {}", plan.train_batch),
                    Box::new(timed(|m| &m.train, plan.train_batch)),
                ),
                (
                    format!("sampling step (forward), batch {}", plan.sample_batch),
                    Box::new(timed(|m| &m.sample, plan.sample_batch)),
                ),
                (
                    format!("DDIM sample, {DDIM_STEPS} steps, batch {}", plan.ddim_batch),
                    Box::new(timed(|m| &m.ddim, plan.ddim_batch)),
                ),
                (
                    "peak RSS, training process".into(),
                    Box::new(|m: &Measured| {
                        (m.rss_train_kb.map(|v| v as f64), fmt_mib(m.rss_train_kb))
                    }),
                ),
                (
                    "peak RSS, sampling process".into(),
                    Box::new(|m: &Measured| {
                        (m.rss_sample_kb.map(|v| v as f64), fmt_mib(m.rss_sample_kb))
                    }),
                ),
            ];
            for (i, (name, cell)) in rows.iter().enumerate() {
                let preset = if i == 0 {
                    format!("`{}`", plan.preset)
                } else {
                    String::new()
                };
                let mut line = format!("| {preset} | {name} |");
                let mut values: BTreeMap<Engine, Option<f64>> = BTreeMap::new();
                for &e in self.engines {
                    let (v, text) = match self.get(&plan.preset, e) {
                        Some(m) => cell(m),
                        None => (None, "n/a".into()),
                    };
                    values.insert(e, v);
                    let _ = write!(line, " {text} |");
                }
                if has_torch {
                    for e in &ours {
                        let ratio = match (values.get(e), values.get(&Engine::PyTorch)) {
                            (Some(Some(a)), Some(Some(b))) if *b > 0.0 => format!("{:.2}", a / b),
                            _ => "n/a".into(),
                        };
                        let _ = write!(line, " {ratio} |");
                    }
                }
                let _ = writeln!(s, "{line}");
            }
        }
        s
    }

    fn command_line(&self) -> String {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect();
        format!("cargo xtask {}", args.join(" "))
    }

    fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks: ddpm-rs and PyTorch side by side\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench` (xtask/src/bench.rs); do not edit by hand. Every \
             number below comes from one run of the command shown, on the machine described, with \
             our side and PyTorch's measured alternately in the same run. Speed claims about \
             ddpm-rs count only as the ratios in this table.\n"
        );
        if self.args.quick {
            let _ = writeln!(
                s,
                "**This is a `--quick` smoke run** (tiny batches, one repetition): it checks that \
                 the harness works; its numbers are not benchmarks.\n"
            );
        }
        let _ = writeln!(s, "## Machine and run\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| command | `{}` |", self.command_line());
        let _ = writeln!(s, "| date | {} |", utc_now());
        let _ = writeln!(s, "| CPU | {} |", cpu_model());
        let _ = writeln!(
            s,
            "| cores | {} logical CPUs (`/proc/cpuinfo`); available to this process: {} |",
            cpu_count().map_or("unknown".into(), |n| n.to_string()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            s,
            "| threads | {} on both sides (ours: `RAYON_NUM_THREADS`; PyTorch: \
             `torch.set_num_threads`, `OMP_NUM_THREADS`) |",
            self.threads
        );
        if let Some(load) = &self.load_at_start {
            let _ = writeln!(s, "| load average at start | {load} (1 min) |");
        }
        let _ = writeln!(s, "| ddpm-rs | {} |", ddpm_version());
        let _ = writeln!(
            s,
            "| candle | {} (`candle-core` in Cargo.lock); {} |",
            candle_version(),
            rustc_version()
        );
        let kernels = match self.args.kernels {
            KernelChoice::Ours => "ours (the default; `DDPM_KERNELS=candle` selects candle's ops)",
            KernelChoice::Candle => "candle's ops only (`DDPM_KERNELS=candle`)",
            KernelChoice::Both => {
                "ours, and candle's ops (`DDPM_KERNELS=candle`) as a second column"
            }
        };
        let _ = writeln!(
            s,
            "| our kernels | {kernels}; allocator mimalloc, as the `ddpm` binary |"
        );
        let _ = writeln!(
            s,
            "| kernel policy | `{}` (`ddpm_unet::KernelPolicy`; the candle column switches only \
             its backend) |",
            ddpm_unet::KernelPolicy::active()
        );
        match self.torch {
            Torch::Available { version, .. } => {
                let _ = writeln!(
                    s,
                    "| PyTorch | {version}, CPU, float32, default allocator |"
                );
            }
            Torch::Unavailable { reason } => {
                let _ = writeln!(s, "| PyTorch | **unavailable**: {reason} |");
            }
        }
        let _ = writeln!(
            s,
            "| rounds | {} (each round: one process per side and task; sides alternate going \
             first) |",
            self.rounds
        );
        let _ = writeln!(s, "| wall time of the run | {:.0} s |\n", self.elapsed_s);

        if !self.parities.is_empty() {
            let _ = writeln!(s, "## Parity: the PyTorch reference is our model\n");
            let _ = writeln!(
                s,
                "`bench/pytorch/models.py` re-implements both architectures in PyTorch from our \
                 Rust sources, with module names equal to our tensor names. For each preset, \
                 our worker writes the model's weights (seeded init, every vector perturbed so \
                 that GroupNorm affines and biases matter) with `DiffusionModel::save`, and our \
                 output on a fixed input (batch 3, t = 0, 417, 999); `bench/pytorch/parity.py` \
                 loads the weights with `load_state_dict(strict=True)`, compares the parameter \
                 count and the preset's config, and runs the same input. Relative error is \
                 max |ours - PyTorch| / max |ours|. Run it alone with `cargo xtask bench \
                 --parity-only`.\n"
            );
            s.push_str(&render_parity(self.parities));
            s.push('\n');
        }

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "Each cell: median time, ± half the min-to-max range as a percentage of the median, \
             and the throughput at that median; memory is the largest peak resident set size \
             (`VmHWM`) of the processes doing that task. **ours / PyTorch** is the ratio of \
             times (or of memory): above 1 means ddpm-rs is slower (or uses more), below 1 \
             that it is faster (or uses less).\n"
        );
        s.push_str(&self.results_table());
        s.push('\n');

        let _ = writeln!(s, "## What is measured\n");
        let _ = writeln!(
            s,
            "- **training step**: draw timesteps and Gaussian noise, `q_sample` (linear \
             schedule, T = 1000), predict eps in training mode (dropout on for the DdpmUnet \
             presets), MSE loss, backward, clip the gradient norm to 1, AdamW (lr 2e-4, betas \
             0.9/0.999, eps 1e-8, no weight decay). Ours: `DiffusionModel::forward_t`, \
             `Schedule::q_sample`, `DiffusionLoss`, `ddpm_train::optim::{{grad_norm, \
             clip_factor, AdamW::step_scaled}}` (clipping folded into the in-place update), as `ddpm train` does minus the EMA update and data loading; PyTorch: \
             `torch.optim.AdamW`, `clip_grad_norm_`.\n\
             - **sampling step**: one forward pass without gradients (evaluation mode).\n\
             - **DDIM sample**: a whole deterministic {DDIM_STEPS}-step DDIM sample (eta 0, x0 \
             clipped) from noise; ours through `ddpm_train::sample`.\n\
             - Inputs are random (images uniform in [-1, 1]); weights are each side's seeded \
             default init (values do not change the work).\n\
             - Per process: warm-up steps first (not timed), then the timed steps; the DDIM \
             sample runs after the sampling steps in the same process."
        );
        let _ = writeln!(s, "\n| preset | parameters | training: batch, warm-up + timed steps per round | sampling: batch, warm-up + timed steps per round | DDIM: batch, samples per round |");
        let _ = writeln!(s, "|---|---:|---|---|---|");
        for p in self.plans {
            let params = self
                .engines
                .iter()
                .find_map(|e| self.get(&p.preset, *e).and_then(|m| m.params))
                .map_or("n/a".into(), |n| n.to_string());
            let _ = writeln!(
                s,
                "| `{}` | {params} | {}, {} + {} | {}, {} + {} | {}, {} |",
                p.preset,
                p.train_batch,
                p.train_warmup,
                p.train_iters,
                p.sample_batch,
                p.sample_warmup,
                p.sample_iters,
                p.ddim_batch,
                p.ddim_runs
            );
        }
        if let Some(p) = self.plans.iter().find(|p| p.preset == "cifar10") {
            let _ = writeln!(
                s,
                "\n`cifar10` (the paper's 35.7M-parameter model) trains at batch {} and samples \
                 DDIM at batch {} here, smaller than the other presets, to keep the whole run \
                 under 15 minutes on 2 cores.",
                p.train_batch, p.ddim_batch
            );
        }
        let _ = writeln!(s, "\n## Reproduce\n");
        let _ = writeln!(
            s,
            "```sh\n{}\n```\n\nThe first run creates `target/bench-venv` with {} from PyPI \
             (about 2-3 GB); `--python PATH` uses an existing interpreter instead and \
             `--no-torch` times our side alone. `--quick` is a smoke run of a couple of \
             minutes (report in target/bench/quick.md). `--kernels both` adds a column with \
             candle's own ops (`DDPM_KERNELS=candle`). Raw per-step timings of the last run are \
             in target/bench/last-run.json. Run it on an otherwise idle machine: these are \
             wall-clock times, and PyTorch's OpenMP threads slow down by an order of magnitude \
             when another process competes for the cores.\n\n\
             Micro-benchmarks of the hot ops (3x3 conv2d forward and forward + backward, \
             GroupNorm, linear and full attention, one `mnist-small` forward) through \
             `ddpm_unet::ops` and the layers: `cargo bench -p ddpm-unet` (criterion, a few \
             minutes); with `DDPM_KERNELS=candle` they run on candle's ops.",
            self.command_line(),
            PIP_PACKAGES.join(", ")
        );
        s
    }
}

/// The CPU's model name, clock and vector extensions, from /proc/cpuinfo.
fn cpu_model() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return "unknown".into();
    };
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut s = field("model name").unwrap_or_else(|| "unknown".into());
    if let Some(mhz) = field("cpu MHz").and_then(|v| v.parse::<f64>().ok()) {
        let _ = write!(s, ", {mhz:.0} MHz");
    }
    let flags = field("flags").unwrap_or_default();
    let known = [
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("avx512f", "AVX-512F"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("avx512_fp16", "AVX-512 FP16"),
        ("amx_bf16", "AMX-BF16"),
    ];
    let have: Vec<&str> = known
        .iter()
        .filter(|(flag, _)| flags.split_whitespace().any(|f| f == *flag))
        .map(|(_, name)| *name)
        .collect();
    if !have.is_empty() {
        let _ = write!(s, "; {}", have.join(", "));
    }
    s
}

fn cpu_count() -> Option<usize> {
    let c = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    Some(c.lines().filter(|l| l.starts_with("processor")).count())
}

fn candle_version() -> String {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"candle-core\"" {
            if let Some(v) = lines
                .next()
                .and_then(|v| v.trim().strip_prefix("version = "))
            {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "unknown".into()
}

fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc unknown".into())
}

fn ddpm_version() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut v = format!("{} (release build)", env!("CARGO_PKG_VERSION"));
    if let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) {
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        let _ = write!(
            v,
            ", commit {commit}{}",
            if dirty {
                " with uncommitted changes"
            } else {
                ""
            }
        );
    }
    v
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_time(secs)
}

/// `secs` after the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
fn utc_time(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_spread() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 10.0));
        assert!((s.spread_pct() - 180.0).abs() < 1e-9);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn utc_time_of_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00 UTC");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc_time(1_709_210_096), "2024-02-29 12:34 UTC");
    }

    /// Our worker end to end on tiny sizes: every timed step is reported, the DDIM sample ran.
    #[test]
    fn worker_times_training_and_sampling() -> anyhow::Result<()> {
        let args = |task| TimeArgs {
            preset: "mnist-small".into(),
            task,
            batch: 2,
            warmup: 1,
            iters: 2,
            ddim_batch: 1,
            ddim_steps: 2,
            ddim_runs: 1,
            seed: 0,
            device: "cpu".into(),
            precision: "f32".into(),
        };
        let train = worker_time(&args(Task::Train))?;
        assert_eq!((train.times_s.len(), train.ddim_s.len()), (2, 0));
        assert_eq!(train.params, 714_753);
        let sample = worker_time(&args(Task::Sample))?;
        assert_eq!((sample.times_s.len(), sample.ddim_s.len()), (2, 1));
        assert!(sample
            .times_s
            .iter()
            .chain(&sample.ddim_s)
            .all(|t| *t > 0.0));
        Ok(())
    }

    fn fake(engine: &str, step_s: f64, rss_kb: u64) -> WorkerResult {
        WorkerResult {
            engine: engine.into(),
            preset: "mnist-small".into(),
            task: "train".into(),
            batch: 32,
            threads: 2,
            params: 714_753,
            times_s: vec![step_s * 0.9, step_s, step_s * 1.1],
            ddim_s: vec![],
            ddim_batch: 64,
            ddim_steps: DDIM_STEPS,
            peak_rss_kb: Some(rss_kb),
            version: String::new(),
            kernels: None,
            device: None,
            precision: None,
            gpu_peak_kb: None,
            gpu_name: None,
        }
    }

    /// The table shows each side's median and the ratio ours / PyTorch of times and memory.
    #[test]
    fn table_has_medians_and_ratios() {
        let args = BenchArgs {
            quick: false,
            threads: None,
            presets: vec![],
            rounds: None,
            kernels: KernelChoice::Ours,
            no_torch: false,
            python: None,
            parity_only: false,
            out: None,
        };
        let plans = vec![Plan::new("mnist-small", false)];
        let engines = vec![Engine::Ours, Engine::PyTorch];
        let mut results = BTreeMap::new();
        let mut ours = Measured::default();
        ours.add(&fake("ours", 1.0, 400 * 1024), Task::Train);
        let mut torch = Measured::default();
        torch.add(&fake("pytorch", 0.5, 800 * 1024), Task::Train);
        results.insert(("mnist-small".to_string(), Engine::Ours), ours);
        results.insert(("mnist-small".to_string(), Engine::PyTorch), torch);
        let torch_state = Torch::Unavailable {
            reason: "test".into(),
        };
        let report = Report {
            args: &args,
            threads: 2,
            rounds: 1,
            plans: &plans,
            engines: &engines,
            results: &results,
            parities: &[],
            torch: &torch_state,
            load_at_start: None,
            elapsed_s: 1.0,
        };
        let table = report.results_table();
        assert!(
            table.contains("| `mnist-small` | training step, batch 32 | 1000 ms ±10% · 32.0 img/s | 500 ms ±10% · 64.0 img/s | 2.00 |"),
            "{table}"
        );
        assert!(table.contains("| peak RSS, training process | 400 MiB | 800 MiB | 0.50 |"));
        assert!(table.contains("| sampling step (forward), batch 64 | n/a | n/a | n/a |"));
        assert!(report.render().contains("**unavailable**: test"));
    }

    #[test]
    fn quick_plan_is_small() {
        let p = Plan::new("mnist-small", true);
        assert!(p.train_batch <= 8 && p.train_iters <= 2 && p.ddim_runs == 1);
    }
}
