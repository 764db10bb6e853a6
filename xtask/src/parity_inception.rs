//! `cargo xtask parity inception`: our FID Inception-v3 (ddpm-train's `eval::inception`)
//! against pytorch-fid's own `InceptionV3([3])` with the same random weights.
//!
//! `bench/parity/inception.py` (run with the bench virtual environment's Python, which has
//! torch and pytorch-fid) builds pytorch-fid's module with random weights and random BatchNorm
//! statistics, saves its state dict as legacy `torch.save`, zip `torch.save` and safetensors, and
//! saves a few images in [0, 1] with their pool3 features and their 299x299 bilinear resizing.
//! This side loads each weights file, computes the features of the same images (as `2 x - 1`,
//! our [-1, 1] convention) and the resizing, and compares: the largest absolute difference
//! relative to the largest reference value must stay within `--tolerance` (1e-4).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use ddpm_train::eval::inception::{resize, InceptionFid, INPUT_SIZE};

use crate::bench::{target_dir, workspace_root};

/// Arguments of `cargo xtask parity inception`.
#[derive(clap::Args, Debug)]
pub struct InceptionArgs {
    /// A Python with torch, safetensors and pytorch-fid (default: target/bench-venv/bin/python,
    /// which `cargo xtask bench` creates).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Where the reference files go (default: target/parity/inception).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The seed of the random weights and images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The largest allowed max |ours - torch| / max |torch| of the features.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Reuse the reference files in --out instead of running the Python side again.
    #[arg(long)]
    pub reuse: bool,
}

/// One comparison: the largest absolute difference and the largest reference value.
struct Row {
    what: String,
    max_abs: f64,
    max_ref: f64,
}

impl Row {
    fn rel(&self) -> f64 {
        self.max_abs / self.max_ref.max(f64::MIN_POSITIVE)
    }
}

fn compare(what: String, ours: &Tensor, reference: &Tensor) -> anyhow::Result<Row> {
    anyhow::ensure!(
        ours.dims() == reference.dims(),
        "{what}: shape {:?} against pytorch-fid's {:?}",
        ours.dims(),
        reference.dims()
    );
    let a = ours.flatten_all()?.to_vec1::<f32>()?;
    let b = reference.flatten_all()?.to_vec1::<f32>()?;
    let max_abs = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max);
    let max_ref = b.iter().map(|y| f64::from(y.abs())).fold(0.0, f64::max);
    Ok(Row {
        what,
        max_abs,
        max_ref,
    })
}

fn python(args: &InceptionArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.python {
        return Ok(p.clone());
    }
    let venv = target_dir().join("bench-venv");
    if !venv.join(".ddpm-bench-ready").exists() {
        bail!(
            "{} is not ready: run `cargo xtask bench` once to create it (then pip install \
             pytorch-fid into it), or pass --python",
            venv.display()
        );
    }
    Ok(venv.join("bin/python"))
}

fn run_reference(args: &InceptionArgs, out: &Path) -> anyhow::Result<()> {
    let python = python(args)?;
    let script = workspace_root().join("bench/parity/inception.py");
    let status = Command::new(&python)
        .arg(&script)
        .arg(out)
        .arg("--seed")
        .arg(args.seed.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
    Ok(())
}

/// Runs the parity check (see the module doc) and prints its table.
pub fn run(args: InceptionArgs) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("parity/inception"));
    if !args.reuse {
        run_reference(&args, &out)?;
    }
    let device = Device::Cpu;
    let cases_path = out.join("cases.safetensors");
    let cases = candle_core::safetensors::load(&cases_path, &device)
        .with_context(|| format!("reading {}", cases_path.display()))?;
    let names = ["gray28", "rgb32"];
    let get = |key: String| {
        cases
            .get(&key)
            .cloned()
            .with_context(|| format!("{} has no {key}", cases_path.display()))
    };
    let mut rows = Vec::new();
    for case in names {
        let images = get(format!("{case}.images"))?;
        let ours = resize::resize_bilinear(&resize::to_rgb(&images.narrow(0, 0, 1)?)?, INPUT_SIZE)?;
        rows.push(compare(
            format!("resize {case} -> 299 (F.interpolate)"),
            &ours,
            &get(format!("{case}.resized"))?,
        )?);
    }
    for file in [
        "weights-legacy.pth",
        "weights-zip.pth",
        "weights.safetensors",
    ] {
        let path = out.join(file);
        let model = InceptionFid::load(&path, &device)
            .with_context(|| format!("loading {}", path.display()))?;
        for case in names {
            let images = get(format!("{case}.images"))?;
            let start = std::time::Instant::now();
            let ours = model.features(&((images * 2.0)? - 1.0)?)?;
            let secs = start.elapsed().as_secs_f64();
            let row = compare(
                format!("features {case} ({file}, {secs:.1} s)"),
                &ours,
                &get(format!("{case}.features"))?,
            )?;
            rows.push(row);
        }
    }
    println!("| check | max abs diff | max abs ref | relative |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3e} | {:.3e} | {:.3e} |",
            r.what,
            r.max_abs,
            r.max_ref,
            r.rel()
        );
    }
    let worst = rows.iter().map(Row::rel).fold(0.0, f64::max);
    if worst > args.tolerance {
        bail!(
            "Inception parity failed: relative difference {worst:.3e} above {:.1e}",
            args.tolerance
        );
    }
    println!(
        "Inception parity: worst relative difference {worst:.3e} <= {:.1e}",
        args.tolerance
    );
    Ok(())
}
