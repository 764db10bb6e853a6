//! `ddpm eval --pretrained DIR` on the tiny random diffusers pipeline of
//! crates/ddpm-unet/tests/fixtures/diffusers-tiny (3-channel 16x16, T = 1000, linear betas,
//! epsilon), on the committed Flowers fixture resized to 16x16: the bound in bits/dim and the
//! sample quality, the schedule from its scheduler_config.json; combinations that make no sense
//! are one error line.

mod common;

use common::{assert_ok, assert_one_clean_error, ddpm_bare, fixtures, num, read_json, run};

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
    // The schedule of scheduler_config.json: 1000 steps of linear betas.
    assert_eq!(r["schedule"]["timesteps"], 1000);
    assert_eq!(
        (r["image_size"].clone(), r["channels"].clone()),
        (16.into(), 3.into())
    );
    let n = &r["nll"];
    assert_eq!(n["images"], 4);
    assert_eq!(n["dims"], 3 * 16 * 16);
    assert!(num(&n["bpd"], "bpd") > 0.0);
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
