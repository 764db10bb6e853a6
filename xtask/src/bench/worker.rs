//! Our side of the benchmark: the hidden `bench-worker`, one process per measurement, with
//! mimalloc as the `ddpm` binary has. `time` trains through `ddpm_train::Trainer::train_step` or
//! samples, and prints one line of JSON ([`WorkerResult`]); `export` writes a preset's weights
//! and reference output for the parity check; `ops` is in `ops.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use ddpm_data::Dataset;
use ddpm_schedule::{Objective, SamplerConfig, Schedule, ScheduleConfig};
use ddpm_train::sample::{gaussian, sample, SampleOptions};
use ddpm_train::{RunOptions, TrainConfig, Trainer};
use ddpm_unet::{DiffusionModel, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ops::{worker_ops, OpsArgs};
use super::probe::peak_rss_kb;
use super::{profile_range, Engine, PeakResult, Task, WorkerResult, DDIM_STEPS};

// candle allocates a fresh buffer for every op; the `ddpm` binary uses mimalloc for that reason
// (much faster training steps; docs/benchmarks.md), so our benchmark process must too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The device's matrix-multiply rate (candle's matmul of two square matrices; f32, and
    /// bf16 on CUDA); prints one line of JSON.
    Peak(PeakArgs),
}

#[derive(Args, Debug)]
struct PeakArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Side of the square matrices (default 2048 on the CPU, 8192 on CUDA).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// Timed repetitions (the best counts).
    #[arg(long, default_value_t = 5)]
    reps: usize,
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
        WorkerMode::Peak(a) => {
            println!("{}", serde_json::to_string(&worker_peak(&a)?)?);
            Ok(())
        }
    }
}

/// FLOP/s of the best of `reps` products of two `n x n` matrices (`2 n^3` FLOPs each) in
/// `dtype` on `dev`, through candle's matmul.
fn matmul_rate(n: usize, dtype: DType, reps: usize, dev: &Device) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let _c = a.matmul(&b)?;
        dev.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// Our side's peak: candle's f32 matmul (and bf16 on CUDA).
fn worker_peak(a: &PeakArgs) -> anyhow::Result<PeakResult> {
    let dev = ddpm_train::parse_device(&a.device)?;
    let n = match (a.size, dev.is_cuda()) {
        (0, true) => 8192,
        (0, false) => 2048,
        (n, _) => n,
    };
    let mut rates = BTreeMap::new();
    rates.insert("f32".to_string(), matmul_rate(n, DType::F32, a.reps, &dev)?);
    if dev.is_cuda() {
        rates.insert(
            "bf16".to_string(),
            matmul_rate(n, DType::BF16, a.reps, &dev)?,
        );
    }
    Ok(PeakResult {
        engine: "ours".into(),
        size: n,
        rates,
        version: format!("candle {}", super::probe::candle_version()),
    })
}

/// Times `a.task` in this process (our side of one measurement).
fn worker_time(a: &TimeArgs) -> anyhow::Result<WorkerResult> {
    let config = ModelConfig::preset(&a.preset)?;
    let dev = ddpm_train::parse_device(&a.device)?;
    let precision = ddpm_train::Precision::parse(&a.precision)?;
    precision.check_device(&dev)?;
    // The policy `cargo xtask` installed from the environment, given to the trainer and the
    // model explicitly.
    let policy = ddpm_unet::KernelPolicy::active();
    let (times, ddim, params) = match a.task {
        Task::Train => {
            let (times, params) = time_training(a, &config, precision, policy, &dev)?;
            (times, Vec::new(), params)
        }
        Task::Sample => time_sampling(a, &config, precision, policy, &dev)?,
    };
    let kernels = match policy.backend {
        ddpm_unet::ops::Kernels::Ours => "ours",
        ddpm_unet::ops::Kernels::Candle => "candle",
    };
    tracing::debug!(%policy, "bench worker kernels");
    let result = WorkerResult {
        engine: "ours".into(),
        preset: a.preset.clone(),
        task: a.task.name().into(),
        batch: a.batch,
        threads: candle_core::utils::get_num_threads(),
        params,
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
        mode: None,
        compile_mode: None,
        compile_s: None,
        error: None,
    };
    Ok(result)
}

/// Images in the random data set of a timed training: a few batches, so that the loader
/// shuffles and starts new epochs as in a run.
fn training_images(batch: usize) -> usize {
    (4 * batch).max(64)
}

/// `a.warmup + a.iters` steps of `ddpm train`, each one `Trainer::train_step`: the preset's
/// model at batch `a.batch` in `precision`, and `TrainConfig`'s defaults for everything else
/// (eps objective, MSE, AdamW, warm-up, clipping to norm 1, EMA, one loader worker) but the
/// kernel `policy`, on random images held in memory. With `DDPM_BENCH_PHASES` set, prints where each timed step's time
/// went (the trainer then synchronizes the device after each phase). Returns the seconds of each
/// timed step and the model's parameter count.
fn time_training(
    a: &TimeArgs,
    config: &ModelConfig,
    precision: ddpm_train::Precision,
    policy: ddpm_unet::KernelPolicy,
    dev: &Device,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let (c, s) = (config.channels(), config.image_size());
    let n = training_images(a.batch);
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let pixels: Vec<u8> = (0..n * c * s * s).map(|_| rng.random()).collect();
    let dataset = Dataset::from_u8(c, s, pixels, vec![0; n], vec!["random".into()])?;
    let train = TrainConfig {
        seed: a.seed,
        batch_size: a.batch,
        model: config.clone(),
        precision,
        kernels: policy,
        ..TrainConfig::default()
    };
    // The trainer writes nothing there unless asked to (it is not); a directory of its own all
    // the same.
    let run_dir = tempfile::tempdir().context("creating a temporary run directory")?;
    let mut trainer = Trainer::with_dataset(train, dataset, run_dir.path(), dev)?;
    trainer.time_phases(std::env::var_os("DDPM_BENCH_PHASES").is_some());
    let opts = RunOptions::default();
    let mut times = Vec::with_capacity(a.iters);
    for i in 0..a.warmup + a.iters {
        if i + 1 == a.warmup + a.iters {
            profile_range(dev, true)?;
        }
        let start = Instant::now();
        let step = trainer.train_step(&opts)?;
        dev.synchronize()?;
        if i >= a.warmup {
            times.push(start.elapsed().as_secs_f64());
            if !step.phases.is_empty() {
                let parts: Vec<String> = step
                    .phases
                    .iter()
                    .map(|(p, s)| format!("{p} {:.1} ms", s * 1e3))
                    .collect();
                eprintln!("phases {}: {}", a.preset, parts.join(", "));
            }
        }
    }
    profile_range(dev, false)?;
    Ok((times, trainer.model().num_parameters()))
}

/// `a.warmup + a.iters` forward passes without gradients (the model frozen), then
/// `a.ddim_runs` whole DDIM samples through `ddpm_train::sample`. Returns the seconds of each
/// timed step and of each sample, and the model's parameter count; the model runs under
/// `policy`.
fn time_sampling(
    a: &TimeArgs,
    config: &ModelConfig,
    precision: ddpm_train::Precision,
    policy: ddpm_unet::KernelPolicy,
    dev: &Device,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let model = DiffusionModel::new(config, a.seed, dev, DType::F32)?
        .with_compute_dtype(precision.compute_dtype())
        .with_kernel_policy(policy);
    let schedule = Schedule::new(&ScheduleConfig::default(), dev)?;
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
    let x = gaussian(&mut rng, &shape, dev)?;
    let ts: Vec<u32> = (0..a.batch).map(|_| rng.random_range(0..t_max)).collect();
    let t = Tensor::from_vec(ts, a.batch, dev)?;
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
        guidance: Default::default(),
    };
    for _ in 0..a.ddim_runs {
        let start = Instant::now();
        let _images = sample(&model, &schedule, Objective::Eps, &opts)?;
        ddim.push(start.elapsed().as_secs_f64());
    }
    Ok((times, ddim, model.num_parameters()))
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
        (
            "flops_forward".to_string(),
            ddpm_unet::flops::forward_flops(&config).total().to_string(),
        ),
    ]);
    let io = a.out_dir.join("io.safetensors");
    let bytes = ddpm_unet::weights::to_safetensors_bytes(&io_tensors, metadata)?;
    ddpm_fs::write_atomic(&io, &bytes).with_context(|| format!("writing {}", io.display()))?;
    println!(
        "{}",
        serde_json::json!({"weights": weights, "io": io, "params": model.num_parameters()})
    );
    Ok(())
}

/// The command of one worker process of `engine` (its mode and arguments still to add).
pub(crate) fn our_worker(engine: Engine, threads: usize) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding the xtask executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench-worker")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string());
    // candle's CPU threads sleep when its ops end, as in the `ddpm` binary (ddpm-cli's
    // `env::park_idle_candle_threads`), unless the user set the limit.
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        cmd.env(SPIN_LIMIT, "0");
    }
    // The worker's log would repeat what the bench's own lines say ("model and data ready"):
    // warnings only, unless RUST_LOG asks for more.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    if engine == Engine::OursCandle {
        cmd.env("DDPM_KERNELS", "candle");
    } else {
        cmd.env_remove("DDPM_KERNELS");
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The peak measurement gives a positive f32 rate (and no bf16 on the CPU).
    #[test]
    fn peak_measures_f32_matmul() -> anyhow::Result<()> {
        let p = worker_peak(&PeakArgs {
            device: "cpu".into(),
            size: 64,
            reps: 2,
        })?;
        assert_eq!(p.size, 64);
        assert!(p.rates["f32"] > 0.0 && !p.rates.contains_key("bf16"));
        Ok(())
    }
}
