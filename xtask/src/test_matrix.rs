//! `cargo xtask test-matrix [--cpu] [--gpu]`: the end-to-end checks (a short training run,
//! exact resume, deterministic sampling, evaluation) on every available device and precision,
//! through the real `ddpm` binary, printed as a pass/fail matrix.
//!
//! A device that is not there is reported as skipped with the reason, never as a pass. Half
//! precision on the CPU is expected to be refused with a clear message, and that refusal is what
//! its column checks. With a CUDA device, one forward pass of the same weights on the CPU and on
//! the GPU must also agree within a stated tolerance per precision, and (in a build with the
//! `nccl` feature) a launched world of one rank must train bit for bit like the plain run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use ddpm_unet::{DiffusionModel, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bench::workspace_root;

/// Arguments of `test-matrix`.
#[derive(Args, Debug)]
pub struct TestMatrixArgs {
    /// Run the CPU column (default: both columns).
    #[arg(long)]
    cpu: bool,
    /// Run the CUDA column (default: both columns).
    #[arg(long)]
    gpu: bool,
    /// The `ddpm` binary to test (default: the one beside this xtask, else `cargo build`).
    #[arg(long)]
    ddpm: Option<PathBuf>,
    /// Data root holding mnist/ (fetched there when missing, from DDPM_DATA_MIRROR if set).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Precisions to test, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16")]
    precisions: Vec<String>,
    /// Keep the scratch directory (printed) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Seconds each `ddpm` command may take before it counts as a failure.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Outcome of one cell.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Pass(String),
    Fail(String),
    Skipped(String),
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Pass(d) if d.is_empty() => "pass".into(),
            Cell::Pass(d) => format!("pass ({d})"),
            Cell::Fail(d) => format!("FAIL: {d}"),
            Cell::Skipped(d) => format!("skipped: {d}"),
        }
    }
}

/// The checks, one row each.
const CHECKS: &[&str] = &[
    "train (6 steps)",
    "resume = uninterrupted",
    "sample deterministic",
    "eval (bits/dim)",
    "forward CPU vs GPU",
    "nccl world size 1 = plain",
];

/// The checks [`column()`] makes; the GPU-only ones after them are made by [`run`].
const COLUMN_CHECKS: usize = 4;

/// A column: one device and precision.
struct Column {
    device: &'static str,
    precision: String,
    cells: Vec<Cell>,
}

/// A tiny paper-style U-Net on MNIST at 16x16 (with dropout and attention), so that each step
/// takes milliseconds on either device.
fn tiny_config(data_root: &Path) -> String {
    format!(
        r#"steps = 6
batch_size = 8
warmup_steps = 2
checkpoint_every = 3
keep_checkpoints = 100
sample_every = 0
log_every = 1
workers = 1

[data]
root = "{}"
image_size = 16

[model]
arch = "ddpm_unet"
image_size = 16
in_channels = 1
ch = 16
ch_mult = [1, 2]
num_res_blocks = 1
attn_resolutions = [8]
dropout = 0.1
groups = 4

[sampler]
kind = "ddim"
steps = 5
"#,
        data_root.display()
    )
}

/// Runs `cmd` with a time limit; the output, or an error saying it timed out.
fn run_limited(mut cmd: Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ddpm")?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `error:` line of a failed command (or the tail of its stderr).
fn error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    err.lines()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or_else(|| err.lines().last().unwrap_or("no output"))
        .trim()
        .chars()
        .take(200)
        .collect()
}

/// Whether the output shows a panic rather than a handled error.
fn panicked(o: &Output) -> bool {
    let err = String::from_utf8_lossy(&o.stderr);
    err.contains("panicked") || err.contains("RUST_BACKTRACE")
}

struct Ctx {
    ddpm: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    scratch: PathBuf,
    limit: Duration,
}

impl Ctx {
    fn ddpm(&self) -> Command {
        let mut c = Command::new(&self.ddpm);
        c.current_dir(&self.scratch).env("RUST_LOG", "warn");
        // A plain run is one process, even when this runs under a data-parallel launcher.
        for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "DDPM_NCCL_ID_FILE"] {
            c.env_remove(var);
        }
        // `ddpm` runs in the scratch directory: a relative mirror path must keep meaning what
        // it meant here.
        if let Some(m) = std::env::var_os("DDPM_DATA_MIRROR") {
            let m = PathBuf::from(m);
            if m.is_relative() && m.exists() {
                if let Ok(abs) = std::path::absolute(&m) {
                    c.env("DDPM_DATA_MIRROR", abs);
                }
            }
        }
        c
    }

    fn train(&self, out: &Path, device: &str, precision: &str, steps: usize) -> Command {
        let mut c = self.ddpm();
        c.args(["train", "--quiet", "--config"])
            .arg(&self.config)
            .arg("--out")
            .arg(out)
            .args(["--device", device, "--precision", precision])
            .args(["--steps", &steps.to_string()]);
        c
    }

    fn resume(&self, out: &Path, device: &str, steps: usize) -> Command {
        let mut c = self.ddpm();
        c.args(["train", "--quiet", "--resume"]).arg(out).args([
            "--device",
            device,
            "--steps",
            &steps.to_string(),
        ]);
        c
    }
}

/// Max |a - b| over every tensor of two safetensors files, and their largest |a|.
fn compare_tensor_files(a: &Path, b: &Path) -> anyhow::Result<(f64, f64)> {
    let ta = candle_core::safetensors::load(a, &Device::Cpu)
        .with_context(|| format!("reading {}", a.display()))?;
    let tb = candle_core::safetensors::load(b, &Device::Cpu)
        .with_context(|| format!("reading {}", b.display()))?;
    if ta.len() != tb.len() {
        bail!("{} and {} hold different tensors", a.display(), b.display());
    }
    let (mut diff, mut scale) = (0f64, 0f64);
    for (name, x) in &ta {
        let y = tb
            .get(name)
            .with_context(|| format!("{name} missing in {}", b.display()))?;
        let x = x.to_dtype(DType::F64)?;
        let y = y.to_dtype(DType::F64)?;
        diff = diff.max((&x - &y)?.abs()?.max_all()?.to_scalar::<f64>()?);
        scale = scale.max(x.abs()?.max_all()?.to_scalar::<f64>()?);
    }
    Ok((diff, scale))
}

fn checkpoint_file(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints")
        .join(format!("ckpt-{step:08}.safetensors"))
}

/// The cells of one device and precision.
fn column(ctx: &Ctx, device: &'static str, precision: &str) -> Vec<Cell> {
    let tag = format!("{}-{precision}", device.replace(':', ""));
    let straight = ctx.scratch.join(format!("{tag}-straight"));
    let mut cells = Vec::new();

    // 1. Train. Half precision on the CPU must be refused clearly.
    let refuse = device == "cpu" && precision != "f32";
    let train = run_limited(ctx.train(&straight, device, precision, 6), ctx.limit);
    let trained = match (&train, refuse) {
        (Err(e), _) => {
            cells.push(Cell::Fail(e.to_string()));
            false
        }
        (Ok(o), true) => {
            let line = error_line(o);
            cells.push(
                if !o.status.success() && !panicked(o) && line.contains("needs a CUDA device") {
                    Cell::Pass("refused with a clear message".into())
                } else {
                    Cell::Fail(format!("expected a clear refusal, got: {line}"))
                },
            );
            false
        }
        (Ok(o), false) if !o.status.success() => {
            cells.push(Cell::Fail(error_line(o)));
            false
        }
        (Ok(_), false) => {
            let loss = std::fs::read_to_string(straight.join("metrics.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["loss"].as_f64())
                .collect::<Vec<_>>();
            let stored = std::fs::read_to_string(straight.join("config.toml")).unwrap_or_default();
            let want = format!("precision = \"{precision}\"");
            if !stored.lines().any(|l| l.trim() == want) {
                cells.push(Cell::Fail(format!("config.toml lacks `{want}`")));
                false
            } else if loss.len() == 6 && loss.iter().all(|l| l.is_finite()) {
                cells.push(Cell::Pass(format!(
                    "loss {:.3} -> {:.3}",
                    loss[0],
                    loss[loss.len() - 1]
                )));
                true
            } else {
                cells.push(Cell::Fail(format!("bad metrics: {loss:?}")));
                false
            }
        }
    };
    if !trained {
        let why = if refuse {
            "half precision is refused on the CPU"
        } else {
            "training failed"
        };
        while cells.len() < COLUMN_CHECKS {
            cells.push(Cell::Skipped(why.into()));
        }
        return cells;
    }

    // 2. Resume: 3 steps, then resume to 6; the weights must equal the uninterrupted run's.
    let split = ctx.scratch.join(format!("{tag}-split"));
    let resumed = run_limited(ctx.train(&split, device, precision, 3), ctx.limit).and_then(|o| {
        if !o.status.success() {
            bail!("first half: {}", error_line(&o));
        }
        let o = run_limited(ctx.resume(&split, device, 6), ctx.limit)?;
        if !o.status.success() {
            bail!("resume: {}", error_line(&o));
        }
        compare_tensor_files(&checkpoint_file(&straight, 6), &checkpoint_file(&split, 6))
    });
    cells.push(match resumed {
        Ok((0.0, _)) => Cell::Pass("bit-exact".into()),
        // On CUDA, kernels may reorder floating-point sums; a tiny difference is what CUDA
        // allows, and it is stated.
        Ok((d, s)) if device != "cpu" && d <= 1e-5 * s.max(1.0) => {
            Cell::Pass(format!("max diff {d:.1e}, not bit-exact"))
        }
        Ok((d, s)) => Cell::Fail(format!("weights differ: max diff {d:.3e} (scale {s:.2})")),
        Err(e) => Cell::Fail(e.to_string()),
    });

    // 3. Sampling twice with one seed gives the same PNG.
    let sample = |name: &str| -> anyhow::Result<Vec<u8>> {
        let png = ctx.scratch.join(format!("{tag}-{name}.png"));
        let mut c = ctx.ddpm();
        c.args(["sample", "--quiet", "--checkpoint"])
            .arg(&straight)
            .args(["--num", "8", "--steps", "10", "--seed", "3"])
            .args(["--device", device, "--precision", precision, "--out"])
            .arg(&png);
        let o = run_limited(c, ctx.limit)?;
        if !o.status.success() {
            bail!("{}", error_line(&o));
        }
        Ok(std::fs::read(&png)?)
    };
    cells.push(match (sample("a"), sample("b")) {
        (Ok(a), Ok(b)) if a == b => Cell::Pass("identical PNGs".into()),
        (Ok(_), Ok(_)) => Cell::Fail("two runs with one seed differ".into()),
        (Err(e), _) | (_, Err(e)) => Cell::Fail(e.to_string()),
    });

    // 4. Evaluation: bits/dim on a few test images.
    let report = ctx.scratch.join(format!("{tag}-eval.json"));
    let mut c = ctx.ddpm();
    c.args(["eval", "--quiet", "--checkpoint"])
        .arg(&straight)
        .args(["--nll", "--limit", "8", "--nll-timesteps", "8"])
        .args(["--device", device, "--precision", precision, "--data-dir"])
        .arg(&ctx.data_dir)
        .arg("--report")
        .arg(&report);
    cells.push(match run_limited(c, ctx.limit) {
        Ok(o) if o.status.success() => {
            let text = std::fs::read_to_string(&report).unwrap_or_default();
            let bpd = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["nll"]["bpd"].as_f64());
            match bpd {
                Some(b) if b.is_finite() && b > 0.0 => Cell::Pass(format!("{b:.2} bits/dim")),
                other => Cell::Fail(format!("no finite bits/dim in the report: {other:?}")),
            }
        }
        Ok(o) => Cell::Fail(error_line(&o)),
        Err(e) => Cell::Fail(e.to_string()),
    });
    cells
}

/// With NCCL, a launched world of one rank (`RANK=0 WORLD_SIZE=1 LOCAL_RANK=0`, whose gradients
/// and loss go through a one-rank all-reduce) must give the plain run's final checkpoint bit for
/// bit (docs/distributed.md). Without the `nccl` feature the check is skipped, never passed.
fn world_of_one(ctx: &Ctx, device: &str, precision: &str) -> Cell {
    if !cfg!(feature = "nccl") {
        return Cell::Skipped("built without nccl".into());
    }
    let tag = format!("{}-{precision}", device.replace(':', ""));
    let plain = checkpoint_file(&ctx.scratch.join(format!("{tag}-straight")), 6);
    if !plain.is_file() {
        return Cell::Skipped("training failed".into());
    }
    let run = |name: &str, launched: bool| -> anyhow::Result<PathBuf> {
        let out = ctx.scratch.join(format!("{tag}-{name}"));
        let mut c = ctx.train(&out, device, precision, 6);
        if launched {
            c.env("RANK", "0")
                .env("WORLD_SIZE", "1")
                .env("LOCAL_RANK", "0");
        }
        let o = run_limited(c, ctx.limit)?;
        if !o.status.success() {
            bail!("{name}: {}", error_line(&o));
        }
        Ok(checkpoint_file(&out, 6))
    };
    let world1 = match run("world1", true) {
        Ok(p) => p,
        Err(e) => return Cell::Fail(e.to_string()),
    };
    match compare_tensor_files(&plain, &world1) {
        Ok((0.0, _)) => Cell::Pass("bit-identical".into()),
        Ok((d, s)) => {
            // Say whether the plain run is itself deterministic here; either way it is a fail.
            let again = run("plain-again", false)
                .and_then(|p| compare_tensor_files(&plain, &p))
                .map(|(d2, _)| format!("two plain runs differ by {d2:.1e}"))
                .unwrap_or_else(|e| format!("second plain run: {e}"));
            Cell::Fail(format!(
                "weights differ: max diff {d:.3e} (scale {s:.2}); {again}"
            ))
        }
        Err(e) => Cell::Fail(e.to_string()),
    }
}

/// Tolerance of the CPU-vs-GPU forward check: max |gpu - cpu| / max |cpu|.
fn forward_tolerance(precision: &str) -> f64 {
    match precision {
        "bf16" => 5e-2,
        "f16" => 1e-2,
        _ => 1e-4,
    }
}

/// One forward pass of the same seeded `mnist-small` weights on the CPU (f32) and on `gpu` in
/// `precision`; the relative max difference.
fn forward_cpu_vs_gpu(gpu: &Device, precision: &str) -> anyhow::Result<f64> {
    let config = ModelConfig::preset("mnist-small")?;
    let p = ddpm_train::Precision::parse(precision)?;
    let cpu_model = DiffusionModel::new(&config, 7, &Device::Cpu, DType::F32)?;
    let gpu_model =
        DiffusionModel::new(&config, 7, gpu, DType::F32)?.with_compute_dtype(p.compute_dtype());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 4 * 28 * 28;
    let x: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let x = Tensor::from_vec(x, (4, 1, 28, 28), &Device::Cpu)?;
    let t = Tensor::new(&[0u32, 250, 500, 999], &Device::Cpu)?;
    let want = cpu_model.forward(&x, &t)?;
    let got = gpu_model
        .forward(&x.to_device(gpu)?, &t.to_device(gpu)?)?
        .to_device(&Device::Cpu)?;
    let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(diff / scale.max(1e-12))
}

/// Finds or builds the `ddpm` binary.
fn find_ddpm(args: &TestMatrixArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.ddpm {
        // Absolute: the checks run `ddpm` from a scratch directory.
        return Ok(std::path::absolute(p)?);
    }
    let exe = std::env::current_exe()?;
    if let Some(sibling) = exe.parent().map(|d| d.join("ddpm")) {
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    eprintln!("test-matrix: building ddpm (cargo build --release -p ddpm-cli)");
    let status = crate::cargo()
        .args(["build", "--release", "-p", "ddpm-cli"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building ddpm failed");
    }
    Ok(crate::bench::target_dir().join("release/ddpm"))
}

/// Whether a CUDA device can be used: `Ok(device)` or the reason it cannot.
fn cuda_device() -> Result<Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err(
            "this build has no CUDA support (build it with `cargo xtask build-cuda`)".into(),
        );
    }
    Device::new_cuda(0).map_err(|e| format!("no CUDA device ({e})"))
}

/// Runs `test-matrix`.
pub fn run(args: TestMatrixArgs) -> anyhow::Result<()> {
    let (want_cpu, want_gpu) = match (args.cpu, args.gpu) {
        (false, false) => (true, true),
        other => other,
    };
    for p in &args.precisions {
        ddpm_train::Precision::parse(p)?;
    }
    let ddpm = find_ddpm(&args)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("data"));
    let data_dir = std::path::absolute(&data_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("ddpm-test-matrix-")
        .tempdir()
        .context("creating a scratch directory")?;
    let config = scratch.path().join("tiny.toml");
    std::fs::write(&config, tiny_config(&data_dir))?;
    let ctx = Ctx {
        ddpm,
        config,
        data_dir,
        scratch: scratch.path().to_path_buf(),
        limit: Duration::from_secs(args.timeout),
    };
    let started = Instant::now();
    let mut columns = Vec::new();
    let gpu = if want_gpu { Some(cuda_device()) } else { None };
    for device in ["cpu", "cuda:0"] {
        for p in &args.precisions {
            let cells = if device == "cpu" {
                if !want_cpu {
                    continue;
                }
                let mut c = column(&ctx, device, p);
                while c.len() < CHECKS.len() {
                    c.push(Cell::Skipped("GPU column only".into()));
                }
                c
            } else {
                match &gpu {
                    None => continue,
                    Some(Err(reason)) => CHECKS
                        .iter()
                        .map(|_| Cell::Skipped(reason.clone()))
                        .collect(),
                    Some(Ok(dev)) => {
                        let mut c = column(&ctx, device, p);
                        let tol = forward_tolerance(p);
                        c.push(match forward_cpu_vs_gpu(dev, p) {
                            Ok(r) if r <= tol => {
                                Cell::Pass(format!("rel. diff {r:.1e} <= {tol:.0e}"))
                            }
                            Ok(r) => Cell::Fail(format!("rel. diff {r:.2e} > {tol:.0e}")),
                            Err(e) => Cell::Fail(e.to_string()),
                        });
                        c.push(world_of_one(&ctx, device, p));
                        c
                    }
                }
            };
            eprintln!(
                "test-matrix: {device} {p}: {}",
                cells.iter().map(Cell::text).collect::<Vec<_>>().join("; ")
            );
            columns.push(Column {
                device,
                precision: p.clone(),
                cells,
            });
        }
    }
    let gpu_name = match &gpu {
        Some(Ok(_)) => gpu_name().unwrap_or_else(|| "CUDA device 0".into()),
        Some(Err(r)) => format!("none: {r}"),
        None => "not asked for".into(),
    };
    println!(
        "{}",
        render(&columns, &gpu_name, started.elapsed().as_secs_f64())
    );
    if args.keep {
        let kept = scratch.keep();
        eprintln!("test-matrix: scratch kept in {}", kept.display());
    }
    let failed = columns
        .iter()
        .flat_map(|c| &c.cells)
        .filter(|c| matches!(c, Cell::Fail(_)))
        .count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// The GPU's name from `nvidia-smi`, when it is there.
fn gpu_name() -> Option<String> {
    let o = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()?
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// The matrix as Markdown: one row per check, one column per device and precision.
fn render(columns: &[Column], gpu: &str, secs: f64) -> String {
    let mut s = format!("GPU: {gpu}; {secs:.0} s\n\n| check |");
    for c in columns {
        s.push_str(&format!(" {} {} |", c.device, c.precision));
    }
    s.push_str("\n|---|");
    for _ in columns {
        s.push_str("---|");
    }
    for (i, check) in CHECKS.iter().enumerate() {
        s.push_str(&format!("\n| {check} |"));
        for c in columns {
            let cell = c.cells.get(i).map_or("-".into(), Cell::text);
            s.push_str(&format!(" {cell} |"));
        }
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_gpu_is_skipped_never_passed() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        let reason = cuda_device().err().unwrap_or_default();
        assert!(reason.contains("no CUDA support"), "{reason}");
        let col = Column {
            device: "cuda:0",
            precision: "f32".into(),
            cells: CHECKS
                .iter()
                .map(|_| Cell::Skipped(reason.clone()))
                .collect(),
        };
        let md = render(&[col], "none", 1.0);
        assert!(!md.contains("pass"), "{md}");
        assert_eq!(
            md.matches("skipped: this build has no CUDA support")
                .count(),
            CHECKS.len()
        );
    }

    #[test]
    fn world_of_one_without_nccl_is_skipped_never_passed() {
        if cfg!(feature = "nccl") {
            return;
        }
        let ctx = Ctx {
            ddpm: PathBuf::from("/nonexistent/ddpm"),
            config: PathBuf::new(),
            data_dir: PathBuf::new(),
            scratch: std::env::temp_dir(),
            limit: Duration::from_secs(1),
        };
        assert_eq!(
            world_of_one(&ctx, "cuda:0", "f32"),
            Cell::Skipped("built without nccl".into())
        );
        assert_eq!(CHECKS.len(), COLUMN_CHECKS + 2);
    }

    #[test]
    fn tolerances_widen_with_lower_precision() {
        assert!(forward_tolerance("f32") < forward_tolerance("f16"));
        assert!(forward_tolerance("f16") < forward_tolerance("bf16"));
    }
}
