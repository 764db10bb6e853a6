//! `ddpm eval --pretrained DIR` on the tiny random diffusers pipeline of
//! crates/ddpm-unet/tests/fixtures/diffusers-tiny (3-channel 16x16, T = 1000, linear betas,
//! epsilon), on the committed Flowers fixture resized to 16x16: the bound in bits/dim and the
//! sample quality, the schedule from its scheduler_config.json; a pipeline with `trained_betas`
//! (a cosine-schedule run exported by `ddpm export`) gives the run's own bound, its betas recorded
//! by count and hash, the bound's variance the scheduler's `variance_type` unless
//! `--nll-variance` says otherwise; combinations that make no sense are one error line.

mod common;

use std::path::Path;

use common::{
    assert_ok, assert_one_clean_error, ddpm, ddpm_bare, fixtures, num, read_json, run, train_tiny,
};
use ddpm_train::checkpoint::{load_model, WeightsKind};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "../../ddpm-unet/tests/support/diffusers_fixture.rs"]
mod diffusers_fixture;
use diffusers_fixture::fixture;

/// The Flowers fixture as a folder data set, resized to the pipeline's 16x16.
fn flowers() -> String {
    format!("folder:{}", fixtures().join("flowers").display())
}

#[test]
fn eval_pretrained_reports_the_bound_and_sample_quality() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let pipeline = fixture("pipeline");
    let o = run(ddpm_bare(p)
        .args(["eval", "--pretrained"])
        .arg(&pipeline)
        .args(["--dataset", &flowers(), "--image-size", "16"])
        .args(["--limit", "4", "--nll-timesteps", "5"])
        .args(["--num-samples", "4", "--steps", "5"])
        .args(["--classifier-steps", "20", "--classifier-width", "4"])
        .args(["--classifier-features", "8", "--classifier-batch-size", "8"])
        .args(["--data-dir", "data", "--report", "r.json", "--quiet"]));
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("bits/dim"), "{text}");
    let r = read_json(&p.join("r.json"));
    assert_eq!(r["checkpoint"], pipeline.display().to_string());
    assert_eq!(r["weights"], "diffusers");
    assert!(r["step"].is_null());
    assert_eq!(r["objective"], "eps");
    // The schedule of scheduler_config.json: 1000 steps of linear betas, a named schedule.
    assert_eq!(r["schedule"]["timesteps"], 1000);
    assert!(r.get("betas").is_none(), "named betas are not listed: {r}");
    assert_eq!(
        (r["image_size"].clone(), r["channels"].clone()),
        (16.into(), 3.into())
    );
    let n = &r["nll"];
    assert_eq!(n["images"], 4);
    assert_eq!(n["dims"], 3 * 16 * 16);
    assert!(num(&n["bpd"], "bpd") > 0.0);
    // No --nll-variance: the scheduler's variance_type, fixed_small.
    assert_eq!(n["bound"]["variance"], "fixed_small");
    let q = &r["quality"];
    assert_eq!(q["num_samples"], 4);
    assert!(num(&q["fid"], "fid") >= 0.0);
    assert_eq!(q["recognisable"]["samples"]["images"], 4);
}

#[test]
fn eval_pretrained_refuses_what_makes_no_sense() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let pipeline = fixture("pipeline");
    let pipeline = pipeline.to_str().expect("utf-8 path");
    let eval = |extra: &[&str]| {
        run(ddpm_bare(p)
            .args(["eval", "--pretrained", pipeline, "--quiet"])
            .args(extra))
    };
    // No data set: a pipeline does not say what it was trained on.
    assert_one_clean_error(&eval(&["--nll"]), "--dataset");
    // A checkpoint, samples from files, or EMA/raw weights as well.
    assert_one_clean_error(&eval(&["--checkpoint", "run"]), "--checkpoint");
    assert_one_clean_error(&eval(&["--samples", "x"]), "--samples");
    assert_one_clean_error(&eval(&["--weights", "raw"]), "--weights");
    // A revision of a local directory.
    let flowers = flowers();
    assert_one_clean_error(
        &eval(&["--dataset", &flowers, "--revision", "v1"]),
        "--revision v1",
    );
    // --revision without --pretrained.
    let o = run(ddpm_bare(p).args(["eval", "--checkpoint", "run", "--revision", "v1"]));
    assert_one_clean_error(&o, "--pretrained");
    // A missing local directory.
    let o = run(ddpm_bare(p).args(["eval", "--pretrained", "./missing", "--dataset", &flowers]));
    assert_one_clean_error(&o, "no such directory");
}

/// `ddpm eval --nll` on 8 MNIST fixture test images at 16x16 (every term of the bound, seed 3)
/// of `source` (`--checkpoint RUN` or `--pretrained DIR --dataset mnist ...`) with `extra` flags;
/// the report.
fn bound(dir: &Path, source: &[&str], extra: &[&str], report: &str) -> Value {
    let o = run(ddpm(dir)
        .arg("eval")
        .args(source)
        .args(["--nll", "--limit", "8", "--seed", "3", "--quiet"])
        .args(extra)
        .args(["--report", report]));
    assert_ok(&o);
    read_json(&dir.join(report))
}

#[test]
fn eval_pretrained_of_an_exported_cosine_run_is_the_runs_bound() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // Our cosine clips its betas to [1e-4, 0.9999], which no diffusers formula does: the export
    // lists them as trained_betas, with variance_type fixed_small.
    train_tiny(p, "[schedule.beta_schedule]\nkind = \"cosine\"\n");
    assert_ok(&run(ddpm(p).args([
        "export",
        "--checkpoint",
        "run",
        "--out",
        "pipe",
    ])));
    let sched_file = p.join("pipe/scheduler/scheduler_config.json");
    let sched = std::fs::read_to_string(&sched_file).expect("scheduler config");
    assert!(sched.contains("\"trained_betas\": ["), "{sched}");
    assert!(
        sched.contains("\"variance_type\": \"fixed_small\""),
        "{sched}"
    );
    // The same pipeline with a scheduler that asks for fixed_large.
    for f in ["model_index.json", "unet/config.json"] {
        copy(&p.join("pipe").join(f), &p.join("large").join(f));
    }
    copy(
        &p.join("pipe/unet/diffusion_pytorch_model.safetensors"),
        &p.join("large/unet/diffusion_pytorch_model.safetensors"),
    );
    let large = sched.replace("\"fixed_small\"", "\"fixed_large\"");
    std::fs::create_dir_all(p.join("large/scheduler")).expect("dir");
    std::fs::write(p.join("large/scheduler/scheduler_config.json"), large).expect("write");

    let run_flags = ["--checkpoint", "run"];
    let data = [
        "--dataset",
        "mnist",
        "--image-size",
        "16",
        "--data-dir",
        "data",
    ];
    let pipe = [&["--pretrained", "pipe"][..], &data].concat();
    let large = [&["--pretrained", "large"][..], &data].concat();
    let run_small = bound(p, &run_flags, &["--nll-variance", "fixed-small"], "rs.json");
    let run_large = bound(p, &run_flags, &[], "rl.json");
    let pipe_small = bound(p, &pipe, &[], "ps.json");
    let pipe_forced = bound(p, &pipe, &["--nll-variance", "fixed-large"], "pf.json");
    let large_default = bound(p, &large, &[], "pl.json");

    // A checkpoint's default is the DDPM paper's fixed_large; a pipeline's is its scheduler's
    // variance_type; --nll-variance overrides it. The report records the one used.
    let variance = |r: &Value| r["nll"]["bound"]["variance"].clone();
    assert_eq!(variance(&run_small), "fixed_small");
    assert_eq!(variance(&run_large), "fixed_large");
    assert_eq!(variance(&pipe_small), "fixed_small");
    assert_eq!(variance(&pipe_forced), "fixed_large");
    assert_eq!(variance(&large_default), "fixed_large");

    // The export holds the run's EMA weights bit for bit and its betas exactly (export.rs), and
    // the bound draws the same images, timesteps and noise from the same seed: the same f32
    // computation, so the bounds agree to f32 rounding of the per-image sums (a few ulps of
    // numbers of order 10 bits/dim).
    let bpd = |r: &Value| num(&r["nll"]["bpd"], "bpd");
    for (ours, theirs) in [
        (&run_small, &pipe_small),
        (&run_large, &pipe_forced),
        (&run_large, &large_default),
    ] {
        let (a, b) = (bpd(ours), bpd(theirs));
        assert!((a - b).abs() <= 1e-5 * a.abs(), "run {a} vs pipeline {b}");
    }

    // The run's report names its cosine schedule; the pipeline's lists the betas it used: how
    // many, the SHA-256 of their little-endian f64 bytes, and the file they came from.
    assert_eq!(run_small["schedule"]["beta_schedule"]["kind"], "cosine");
    assert!(run_small.get("betas").is_none());
    assert!(pipe_small["schedule"].is_null(), "{pipe_small}");
    let listed = &pipe_small["betas"];
    assert_eq!(listed["beta_schedule"], "trained_betas");
    assert_eq!(listed["count"], 50);
    let file = Path::new("pipe")
        .join("scheduler")
        .join("scheduler_config.json");
    assert_eq!(listed["file"], file.display().to_string());
    let betas = load_model(&p.join("run"), WeightsKind::Ema, &candle_core::Device::Cpu)
        .expect("run")
        .schedule
        .betas()
        .expect("betas");
    let bytes: Vec<u8> = betas.iter().flat_map(|b| b.to_le_bytes()).collect();
    assert_eq!(listed["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(listed["first"].as_f64(), Some(betas[0]));
    assert_eq!(listed["last"].as_f64(), Some(betas[49]));
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("a file in a folder")).expect("dir");
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
