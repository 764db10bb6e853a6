//! `cargo xtask parity dpm-solver`: our DPM-Solver++ (2M) against diffusers'
//! `DPMSolverMultistepScheduler`, step by step (docs/sampling.md).
//!
//! Writes our betas (linear and cosine, T = 1000) to `target/parity/betas.json`, runs
//! `bench/parity/dpm_solver.py` with the benchmark environment's Python twice (diffusers as it is,
//! and with float64 `alphas_cumprod`), feeds every step's input and the script's analytic model to
//! our sampler and prints, per case, the largest error of a step relative to the size of
//! diffusers' state. With `--golden` the float64-buffer run also replaces the committed fixture
//! of the hermetic test (`crates/ddpm-schedule/tests/fixtures/dpm_solver_diffusers.json`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use ddpm_schedule::{DpmSpacing, Objective, SamplerConfig, Schedule, ScheduleConfig, StepHistory};
use serde_json::Value;

use crate::bench::{target_dir, workspace_root};

/// What to compare.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Target {
    /// DPM-Solver++ (2M) against diffusers' DPMSolverMultistepScheduler.
    DpmSolver,
    /// pytorch-fid's Inception-v3 against ours, same random weights (docs/fid.md).
    Inception,
}

/// Arguments of `cargo xtask parity`.
#[derive(Args)]
pub struct ParityArgs {
    /// What to compare.
    target: Target,
    /// A Python with diffusers, torch and numpy (default: target/bench-venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Also rewrite the committed golden file of the hermetic test from this run.
    #[arg(long)]
    golden: bool,
    /// The largest step error allowed (relative to max(1, |diffusers' state|)) for the run with
    /// float64 buffers; diffusers as it is is reported, not checked.
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
}

const GOLDEN: &str = "crates/ddpm-schedule/tests/fixtures/dpm_solver_diffusers.json";
const T: usize = 1000;

pub fn run(a: ParityArgs) -> Result<()> {
    if let Target::Inception = a.target {
        return crate::parity_inception::run(crate::parity_inception::InceptionArgs {
            python: a.python,
            out: None,
            seed: 0,
            tolerance: 1e-4,
            reuse: false,
        });
    }
    let root = workspace_root();
    let python = a
        .python
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-venv/bin/python"));
    if !python.is_file() {
        bail!(
            "{} not found: create the benchmark environment (cargo xtask bench does) or pass \
             --python PATH to a Python with diffusers, torch and numpy",
            python.display()
        );
    }
    let dir = target_dir().join("parity");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let betas_path = dir.join("betas.json");
    let betas = serde_json::json!({
        "linear": ScheduleConfig::linear(T).betas()?,
        "cosine": ScheduleConfig::cosine(T).betas()?,
    });
    std::fs::write(&betas_path, serde_json::to_vec(&betas)?)
        .with_context(|| format!("writing {}", betas_path.display()))?;
    let as_is = dir.join("dpm_solver_f32_abar.json");
    let exact = dir.join("dpm_solver.json");
    for (out, extra) in [(&as_is, None), (&exact, Some("--exact-abar"))] {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("bench/parity/dpm_solver.py"))
            .arg("--betas")
            .arg(&betas_path)
            .arg("--out")
            .arg(out)
            .args(extra)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null());
        let status = cmd
            .status()
            .with_context(|| format!("running {}", python.display()))?;
        if !status.success() {
            bail!("bench/parity/dpm_solver.py failed ({status})");
        }
    }
    let read = |p: &Path| -> Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let (doc_as_is, doc_exact) = (read(&as_is)?, read(&exact)?);
    let rows_as_is = compare(&doc_as_is)?;
    let rows_exact = compare(&doc_exact)?;
    println!(
        "DPM-Solver++ (2M) vs diffusers {} DPMSolverMultistepScheduler: largest step error / \
         max(1, |state|), each step from diffusers' own input",
        doc_exact["diffusers"].as_str().unwrap_or("?")
    );
    println!(
        "{:<8} {:<9} {:<4} {:>5}  {:>14}  {:>14}  {:>14}  {:>12}",
        "schedule", "spacing", "obj", "steps", "f32 abar", "f64 abar", "f64, in place", "whole run"
    );
    let mut worst: f64 = 0.0;
    for (r, s) in rows_exact.iter().zip(&rows_as_is) {
        println!(
            "{:<8} {:<9} {:<4} {:>5}  {:>14.2e}  {:>14.2e}  {:>14.2e}  {:>12.2e}",
            r.schedule, r.spacing, r.objective, r.steps, s.tensor, r.tensor, r.in_place, r.whole
        );
        worst = worst.max(r.tensor).max(r.in_place);
    }
    println!(
        "worst with float64 buffers: {worst:.2e} (tolerance {:.0e}); diffusers as it is: {:.2e}",
        a.tol,
        rows_as_is.iter().fold(0.0f64, |m, r| m.max(r.tensor))
    );
    if a.golden {
        let golden = root.join(GOLDEN);
        std::fs::copy(&exact, &golden).with_context(|| format!("writing {}", golden.display()))?;
        println!("golden file rewritten: {}", golden.display());
    }
    if worst > a.tol {
        bail!(
            "DPM-Solver++ differs from diffusers by {worst:.2e} > {:.0e}",
            a.tol
        );
    }
    Ok(())
}

/// One case's largest errors.
struct Row {
    schedule: String,
    spacing: String,
    objective: String,
    steps: usize,
    tensor: f64,
    in_place: f64,
    whole: f64,
}

/// The script's model: `out[k] = gain * x[k] + 0.3 * sin(1.3 k + 0.7 i + 0.5)`.
fn model(x: &[f64], i: usize, gain: f64) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(k, &v)| gain * v + 0.3 * (1.3 * k as f64 + 0.7 * i as f64 + 0.5).sin())
        .collect()
}

fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .context("expected an array")?
        .iter()
        .map(|x| x.as_f64().context("expected a number"))
        .collect()
}

/// `max_k |a_k - b_k| / max(1, max_k |b_k|)`.
fn err(a: &[f64], b: &[f64]) -> f64 {
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    d / b.iter().fold(1.0f64, |m, y| m.max(y.abs()))
}

fn compare(doc: &Value) -> Result<Vec<Row>> {
    let x_start = floats(&doc["x_start"])?;
    let n = x_start.len();
    let tensor = |v: &[f64]| Tensor::from_vec(v.to_vec(), n, &Device::Cpu);
    let mut rows = Vec::new();
    for case in doc["cases"].as_array().context("no cases")? {
        let word = |k: &str| case[k].as_str().unwrap_or("?").to_string();
        let config = match case["schedule"].as_str() {
            Some("linear") => ScheduleConfig::linear(T),
            Some("cosine") => ScheduleConfig::cosine(T),
            other => bail!("unknown schedule {other:?}"),
        };
        // diffusers holds the betas in float32: ours the same.
        let betas = config.betas()?.iter().map(|&b| b as f32 as f64).collect();
        let schedule = Schedule::from_betas(betas, &Device::Cpu, DType::F64)?;
        let spacing: DpmSpacing = serde_json::from_value(case["spacing"].clone())?;
        let objective: Objective = serde_json::from_value(case["objective"].clone())?;
        let gain = case["gain"].as_f64().context("gain")?;
        let steps = case["steps"].as_u64().context("steps")? as usize;
        let sampler = SamplerConfig::DpmSolver {
            steps: Some(steps),
            spacing,
            clip_x0: false,
        }
        .build(&schedule)?;
        let want_ts: Vec<usize> = floats(&case["timesteps"])?
            .iter()
            .map(|&t| t as usize)
            .collect();
        if sampler.timesteps() != want_ts.as_slice() {
            bail!(
                "timesteps differ for {case:.60}: ours {:?}, diffusers {want_ts:?}",
                sampler.timesteps()
            );
        }
        let mut row = Row {
            schedule: word("schedule"),
            spacing: word("spacing"),
            objective: word("objective"),
            steps,
            tensor: 0.0,
            in_place: 0.0,
            whole: 0.0,
        };
        let (mut history, mut free_history) = (StepHistory::new(), StepHistory::new());
        let mut last_x0 = vec![0f32; n];
        let (mut input, mut free) = (x_start.clone(), x_start.clone());
        for (i, state) in case["states"]
            .as_array()
            .context("states")?
            .iter()
            .enumerate()
        {
            let want = floats(state)?;
            let out = model(&input, i, gain);
            let got: Vec<f64> = sampler
                .step_with_history(
                    &tensor(&out)?,
                    &tensor(&input)?,
                    i,
                    objective,
                    None,
                    &mut history,
                )?
                .to_vec1()?;
            let mut xs: Vec<f32> = input.iter().map(|&v| v as f32).collect();
            let outs: Vec<f32> = out.iter().map(|&v| v as f32).collect();
            sampler.affine_step(i, objective)?.apply_multistep(
                &outs,
                &mut xs,
                &mut last_x0,
                || 0.0,
            );
            let xs: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
            let out = model(&free, i, gain);
            free = sampler
                .step_with_history(
                    &tensor(&out)?,
                    &tensor(&free)?,
                    i,
                    objective,
                    None,
                    &mut free_history,
                )?
                .to_vec1()?;
            row.tensor = row.tensor.max(err(&got, &want));
            row.in_place = row.in_place.max(err(&xs, &want));
            row.whole = row.whole.max(err(&free, &want));
            input = want;
        }
        rows.push(row);
    }
    Ok(rows)
}
