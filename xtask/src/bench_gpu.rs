//! `cargo xtask bench-gpu`: a training step and a sampling step on a CUDA device, ours against
//! the PyTorch reference (`bench/pytorch/bench.py`, eager mode with `torch.autocast`), in the
//! same precision and batch, alternating processes over rounds.
//!
//! The GPU machines have PyTorch but no Rust: build this xtask with `cargo xtask build-cuda`,
//! carry `dist/cuda/` there and run `dist/cuda/xtask bench-gpu` from the repository root. The
//! parity of the two models is checked on the CPU by `cargo xtask bench` (it does not depend on
//! the device), so it is not repeated here.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm_unet::ModelConfig;

/// One engine's measurements of one preset and task: step times, DDIM times, the last result.
type PerEngine = (Engine, Vec<f64>, Vec<f64>, Option<WorkerResult>);

use crate::bench::{
    check_python, our_worker, python_cmd, run_json, target_dir, Engine, Stats, WorkerResult,
};

/// Arguments of `bench-gpu`.
#[derive(Args, Debug)]
pub struct BenchGpuArgs {
    /// The CUDA device.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// f32, bf16 or f16 (both sides).
    #[arg(long, default_value = "bf16")]
    precision: String,
    /// Presets to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cifar10")]
    presets: Vec<String>,
    /// Images per training step.
    #[arg(long, default_value_t = 128)]
    train_batch: usize,
    /// Images per sampling step (and per whole DDIM sample).
    #[arg(long, default_value_t = 128)]
    sample_batch: usize,
    /// Untimed steps first (CUDA context, kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps per process.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Whole DDIM samples (50 steps) timed per sampling process.
    #[arg(long, default_value_t = 1)]
    ddim_runs: usize,
    /// Rounds of alternating processes.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The Python with torch (default: `python3`).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Time our side only.
    #[arg(long)]
    no_torch: bool,
    /// Markdown report (default target/bench/gpu.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `bench-gpu`.
pub fn run(args: BenchGpuArgs) -> anyhow::Result<()> {
    if !args.device.starts_with("cuda") {
        bail!("bench-gpu measures a CUDA device: --device cuda[:N]");
    }
    ddpm_train::parse_device(&args.device).context("bench-gpu needs a CUDA build and device")?;
    for p in &args.presets {
        ModelConfig::preset(p).with_context(|| format!("--presets {p}"))?;
    }
    let torch = if args.no_torch {
        None
    } else {
        let v = check_python(&args.python)?;
        eprintln!("bench-gpu: PyTorch side: {v}");
        Some(v)
    };
    let mut engines = vec![Engine::Ours];
    if torch.is_some() {
        engines.push(Engine::PyTorch);
    }
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    for preset in &args.presets {
        for task in ["train", "sample"] {
            let batch = if task == "train" {
                args.train_batch
            } else {
                args.sample_batch
            };
            let mut per: Vec<PerEngine> = engines
                .iter()
                .map(|&e| (e, Vec::new(), Vec::new(), None))
                .collect();
            for round in 0..args.rounds {
                let mut order: Vec<usize> = (0..per.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let r = measure(&args, per[i].0, preset, task, batch)?;
                    eprintln!(
                        "bench-gpu: {preset} {task} round {}/{} {}: {:.2} ms/step",
                        round + 1,
                        args.rounds,
                        per[i].0.label(),
                        Stats::of(&r.times_s).map_or(f64::NAN, |s| s.median * 1e3)
                    );
                    per[i].1.extend(&r.times_s);
                    per[i].2.extend(&r.ddim_s);
                    raw.push(r.clone());
                    per[i].3 = Some(r);
                }
            }
            rows.push((preset.clone(), task, batch, per));
        }
    }
    let gpu = raw
        .iter()
        .find_map(|r| r.gpu_name.clone())
        .unwrap_or_else(|| "unknown GPU (PyTorch side not run)".into());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "GPU: {gpu}; device {}, precision {}, {} rounds of {} timed steps after {} warm-up \
         steps per process; median ms per step (spread = half the min-max range). Our side: \
         DDPM_KERNELS={}, DDPM_CUDA_POOL={}.\n",
        args.device,
        args.precision,
        args.rounds,
        args.iters,
        args.warmup,
        std::env::var("DDPM_KERNELS").unwrap_or_else(|_| "ours (default)".into()),
        std::env::var("DDPM_CUDA_POOL").unwrap_or_else(|_| "keep (default)".into()),
    );
    let _ = writeln!(
        md,
        "| preset | task | batch | ours ms/step | PyTorch ms/step | ours img/s | PyTorch img/s | \
         ours/PyTorch time | DDIM-50 sample ours / PyTorch (s) | PyTorch peak GPU memory |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for (preset, task, batch, per) in &rows {
        let med = |e: Engine| per.iter().find(|p| p.0 == e).and_then(|p| Stats::of(&p.1));
        let ddim = |e: Engine| {
            per.iter()
                .find(|p| p.0 == e)
                .and_then(|p| Stats::of(&p.2))
                .map_or("-".to_string(), |s| format!("{:.2}", s.median))
        };
        let fmt = |s: Option<Stats>| {
            s.map_or("-".into(), |s| {
                format!("{:.2} ± {:.0}%", s.median * 1e3, s.spread_pct())
            })
        };
        let ips =
            |s: Option<Stats>| s.map_or("-".into(), |s| format!("{:.0}", *batch as f64 / s.median));
        let (o, t) = (med(Engine::Ours), med(Engine::PyTorch));
        let ratio = match (o, t) {
            (Some(o), Some(t)) => format!("{:.2}", o.median / t.median),
            _ => "-".into(),
        };
        let mem = per
            .iter()
            .find(|p| p.0 == Engine::PyTorch)
            .and_then(|p| p.3.as_ref())
            .and_then(|r| r.gpu_peak_kb)
            .map_or("-".into(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0));
        let _ = writeln!(
            md,
            "| {preset} | {task} | {batch} | {} | {} | {} | {} | {ratio} | {} / {} | {mem} |",
            fmt(o),
            fmt(t),
            ips(o),
            ips(t),
            ddim(Engine::Ours),
            ddim(Engine::PyTorch)
        );
    }
    println!("{md}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench/gpu.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    let raw_path = out.with_extension("json");
    std::fs::write(&raw_path, serde_json::to_string_pretty(&raw)?)
        .with_context(|| format!("writing {}", raw_path.display()))?;
    eprintln!(
        "bench-gpu: wrote {} and {}",
        out.display(),
        raw_path.display()
    );
    Ok(())
}

/// One timed process of `engine`.
fn measure(
    args: &BenchGpuArgs,
    engine: Engine,
    preset: &str,
    task: &str,
    batch: usize,
) -> anyhow::Result<WorkerResult> {
    let ddim_runs = if task == "sample" { args.ddim_runs } else { 0 };
    let common = [
        "--preset".to_string(),
        preset.to_string(),
        "--task".into(),
        task.into(),
        "--batch".into(),
        batch.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--iters".into(),
        args.iters.to_string(),
        "--ddim-batch".into(),
        batch.to_string(),
        "--ddim-runs".into(),
        ddim_runs.to_string(),
        "--device".into(),
        args.device.clone(),
        "--precision".into(),
        args.precision.clone(),
    ];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = match engine {
        Engine::PyTorch => python_cmd(&args.python, "bench.py", threads),
        _ => {
            let mut c = our_worker(engine, threads)?;
            // On the GPU the kernel choice of the caller's environment is what is measured.
            if let Ok(k) = std::env::var("DDPM_KERNELS") {
                c.env("DDPM_KERNELS", k);
            }
            c.arg("time");
            c
        }
    };
    cmd.args(common);
    run_json(
        cmd,
        &format!("the {} worker ({preset} {task})", engine.label()),
    )
}
