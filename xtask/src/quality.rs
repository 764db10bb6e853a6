//! `cargo xtask quality`: train the MNIST CPU preset for a fixed number of steps from a fixed
//! seed, evaluate it with `ddpm eval`, and print bits/dim, classifier-feature FID, the IS-style
//! score and the training time (docs/quality.md keeps the table).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `cargo xtask quality`.
#[derive(Args)]
pub struct QualityArgs {
    /// Training steps of the MNIST preset.
    #[arg(long, default_value_t = 1600)]
    steps: usize,
    /// Seed of the training run and of the evaluation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Test images for the bound.
    #[arg(long, default_value_t = 256)]
    nll_limit: usize,
    /// Stratified timesteps per image for the bound (0: the full sum over all T).
    #[arg(long, default_value_t = 50)]
    nll_timesteps: usize,
    /// Samples (and test images) for the feature-space metrics.
    #[arg(long, default_value_t = 1000)]
    num_samples: usize,
    /// Where the run and its report go.
    #[arg(long, default_value = "target/quality")]
    out: PathBuf,
    /// Data root.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
}

fn ddpm_binary() -> Result<PathBuf> {
    let status = crate::cargo()
        .args(["build", "--release", "--quiet", "-p", "ddpm-cli"])
        .status()
        .context("building the ddpm binary")?;
    if !status.success() {
        bail!("building the ddpm binary failed");
    }
    let exe = Path::new("target/release/ddpm");
    if !exe.exists() {
        bail!("{} is missing after the build", exe.display());
    }
    Ok(exe.to_path_buf())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs the whole measurement and prints its table.
pub fn run_quality(a: QualityArgs) -> Result<()> {
    let ddpm = ddpm_binary()?;
    let run_dir = a.out.join("mnist");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("removing the previous run {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let start = Instant::now();
    run(
        Command::new(&ddpm)
            .args([
                "train",
                "--quiet",
                "--dataset",
                "mnist",
                "--model",
                "mnist-small",
            ])
            .args([
                "--steps",
                &a.steps.to_string(),
                "--seed",
                &a.seed.to_string(),
            ])
            .arg("--data-dir")
            .arg(&a.data_dir)
            .arg("--out")
            .arg(&run_dir),
        "ddpm train",
    )?;
    let train_secs = start.elapsed().as_secs_f64();
    let report = a.out.join("eval.json");
    let mut eval = Command::new(&ddpm);
    eval.args(["eval", "--nll", "--quality", "--checkpoint"])
        .arg(&run_dir)
        .args(["--limit", &a.nll_limit.to_string()])
        .args(["--num-samples", &a.num_samples.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .arg("--report")
        .arg(&report);
    if a.nll_timesteps > 0 {
        eval.args(["--nll-timesteps", &a.nll_timesteps.to_string()]);
    }
    let start = Instant::now();
    run(&mut eval, "ddpm eval")?;
    let eval_secs = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("reading {}", report.display()))?;
    let r: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", report.display()))?;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let nll = &r["nll"];
    let q = &r["quality"];
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| training | {} steps of mnist-small, seed {}, {:.0} s |",
        a.steps, a.seed, train_secs
    );
    println!(
        "| bits/dim (test, {} images) | {:.3} ± {:.3} |",
        a.nll_limit,
        num(&nll["bpd"]),
        num(&nll["bpd_stderr"])
    );
    println!(
        "| feature FID ({} samples vs test) | {:.2} |",
        a.num_samples,
        num(&q["fid"])
    );
    println!(
        "| feature FID floor (train vs test images) | {:.2} |",
        num(&q["fid_train_vs_test"])
    );
    println!(
        "| IS-style score (samples / test images) | {:.2} / {:.2} |",
        num(&q["inception_score"]),
        num(&q["inception_score_test"])
    );
    println!("| classes covered | {} |", q["classes_covered"]);
    println!("| evaluation time | {eval_secs:.0} s |");
    println!("\nreport: {}", report.display());
    Ok(())
}
