//! End-to-end tests of `ddpm eval` on MNIST (the committed fixture of 500 real images, and in the
//! real-data suite the whole fetched set): a tiny model trained a few steps at 16x16 with T = 50,
//! its bound in bits/dim, the sample-quality metrics with a tiny classifier trained for a few
//! steps, and bad input.

mod common;

use serde_json::Value;

use common::{
    assert_ok, assert_one_clean_error, ddpm, num, place_real_mnist, read_json, run, train_tiny,
    FIXTURE_TEST_IMAGES,
};

/// The bound's fields are present, finite and add up.
fn check_nll(n: &Value, images: u64, timesteps: u64) {
    assert_eq!(n["images"], images);
    assert_eq!(n["dims"], 256);
    assert_eq!(n["timesteps"], timesteps);
    let bpd = num(&n["bpd"], "bpd");
    assert!(bpd > 0.0, "{bpd}");
    assert!(num(&n["bpd_stderr"], "bpd_stderr") >= 0.0);
    let parts = num(&n["prior_bpd"], "prior")
        + num(&n["decoder_bpd"], "decoder")
        + num(&n["middle_bpd"], "middle");
    assert!((bpd - parts).abs() < 1e-9, "{bpd} vs {parts}");
    let ranges = n["middle"].as_array().expect("ranges");
    assert_eq!(ranges.len(), 4);
    assert_eq!(ranges[0]["first_t"], 1);
    assert_eq!(ranges[3]["last_t"], timesteps - 1);
    let sum: f64 = ranges.iter().map(|r| num(&r["bpd"], "range")).sum();
    assert!((sum - num(&n["middle_bpd"], "middle")).abs() < 1e-9);
}

#[test]
fn eval_reports_the_bound_and_sample_quality_of_a_tiny_model() {
    let dir = tempfile::tempdir().expect("tmp");
    eval_reports_the_bound_and_sample_quality(dir.path(), FIXTURE_TEST_IMAGES);
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn eval_on_the_real_mnist_reports_the_bound_and_sample_quality() {
    let dir = tempfile::tempdir().expect("tmp");
    let test_images = place_real_mnist(dir.path());
    eval_reports_the_bound_and_sample_quality(dir.path(), test_images);
}

/// Trains the tiny model in `p` (on the MNIST already placed in `p/data/mnist`, else the fixture),
/// then checks every report `ddpm eval` writes; the test split has `test_images` images.
fn eval_reports_the_bound_and_sample_quality(p: &std::path::Path, test_images: usize) {
    train_tiny(p, "beta_schedule = { kind = \"scaled_linear\" }\n");

    // The full bound on 8 test images, default report path RUN/eval.json.
    let o = run(ddpm(p).args([
        "eval",
        "--checkpoint",
        "run",
        "--nll",
        "--limit",
        "8",
        "--quiet",
    ]));
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("bits/dim"));
    let r = read_json(&p.join("run/eval.json"));
    assert_eq!(r["format"], "ddpm-rs/eval/v1");
    assert_eq!(r["step"], 30);
    assert_eq!(r["weights"], "ema");
    assert_eq!(r["dataset"], "mnist");
    assert_eq!(r["split"], "test");
    assert_eq!(r["split_images"], test_images);
    assert_eq!(
        (r["image_size"].clone(), r["channels"].clone()),
        (16.into(), 1.into())
    );
    assert!(r["quality"].is_null());
    let n = &r["nll"];
    check_nll(n, 8, 50);
    assert_eq!(n["estimator"], "full");
    assert_eq!(n["bound"]["variance"], "fixed_large");
    assert_eq!(n["bound"]["cdf"], "exact");
    let per_t = n["per_timestep_bpd"].as_array().expect("per t");
    assert_eq!(per_t.len(), 50);
    let total: f64 =
        per_t.iter().map(|v| num(v, "per t")).sum::<f64>() + num(&n["prior_bpd"], "prior");
    assert!((total - num(&n["bpd"], "bpd")).abs() < 1e-9);

    // The stratified estimate with the other variance and the DDPM code's CDF.
    assert_ok(&run(ddpm(p).args([
        "eval",
        "--checkpoint",
        "run",
        "--nll",
        "--limit",
        "4",
        "--nll-timesteps",
        "5",
        "--nll-variance",
        "fixed-small",
        "--nll-cdf",
        "approx",
        "--report",
        "strat.json",
        "--quiet",
    ])));
    let n = read_json(&p.join("strat.json"))["nll"].clone();
    check_nll(&n, 4, 50);
    assert_eq!(n["estimator"], "stratified");
    assert_eq!(n["sampled_timesteps"], 5);
    assert!(n["per_timestep_bpd"].is_null());
    assert_eq!(n["bound"]["variance"], "fixed_small");
    assert_eq!(n["bound"]["cdf"], "approx");

    // Sample quality with a tiny classifier trained for a few steps.
    let quality = |extra: &[&str]| {
        let mut c = ddpm(p);
        c.args([
            "eval",
            "--checkpoint",
            "run",
            "--num-samples",
            "16",
            "--steps",
            "5",
            "--classifier-steps",
            "20",
            "--classifier-width",
            "4",
            "--classifier-features",
            "8",
            "--report",
            "q.json",
            "--quiet",
        ])
        .args(extra);
        run(&mut c)
    };
    assert_ok(&quality(&["--train-classifier"]));
    let r = read_json(&p.join("q.json"));
    assert!(r["nll"].is_null());
    let q = &r["quality"];
    assert_eq!(q["num_samples"], 16);
    assert_eq!(q["test_images"], 16);
    assert!(num(&q["fid"], "fid") >= 0.0);
    assert!(num(&q["fid_train_vs_test"], "fid_train_vs_test") >= 0.0);
    for key in ["inception_score", "inception_score_test"] {
        let is = num(&q[key], key);
        assert!((1.0 - 1e-9..=10.0 + 1e-9).contains(&is), "{key} {is}");
    }
    let hist: Vec<u64> = q["class_histogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|v| v.as_u64().expect("count"))
        .collect();
    assert_eq!(hist.len(), 10);
    assert_eq!(hist.iter().sum::<u64>(), 16);
    assert_eq!(
        q["classes_covered"],
        hist.iter().filter(|&&c| c > 0).count()
    );
    let c = &q["classifier"];
    assert_eq!(c["trained_now"], true);
    assert_eq!(c["config"]["width"], 4);
    assert!((0.0..=1.0).contains(&num(&c["test_accuracy"], "accuracy")));
    let m = &q["memorization"];
    for key in ["fraction", "test_fraction"] {
        assert!((0.0..=1.0).contains(&num(&m[key], key)), "{key}");
    }
    assert!(num(&m["threshold"], "threshold") > 0.0);
    assert!(num(&m["median_test_distance"], "median") > 0.0);
    assert_eq!(m["closest"].as_array().expect("pairs").len(), 16);
    // The classifier is stored with the data; the pairs and the samples are drawn beside the
    // report.
    assert!(p.join("data/classifiers/mnist-16.safetensors").exists());
    assert!(p.join("q-nearest.png").exists() && p.join("q-samples.png").exists());
    // 16 pairs of 16x16 images, 8 images per row with 2-pixel padding: 8 x 4.
    assert_eq!(
        image::image_dimensions(p.join("q-nearest.png")).expect("png"),
        (8 * 18 + 2, 4 * 18 + 2)
    );

    // A second run reuses the stored classifier, and gets the same numbers with the same seed.
    assert_ok(&quality(&["--quality"]));
    let again = read_json(&p.join("q.json"));
    assert_eq!(again["quality"]["classifier"]["trained_now"], false);
    assert_eq!(again["quality"]["fid"], q["fid"]);
}

#[test]
fn bad_eval_input_gives_one_clear_error_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    assert_one_clean_error(
        &run(ddpm(p).args(["eval", "--checkpoint", "missing-run", "--nll"])),
        "missing-run",
    );
    train_tiny(p, "beta_schedule = { kind = \"scaled_linear\" }\n");
    let eval = |extra: &[&str]| {
        let mut c = ddpm(p);
        c.args(["eval", "--checkpoint", "run", "--quiet"])
            .args(extra);
        run(&mut c)
    };
    assert_one_clean_error(&eval(&["--nll", "--limit", "0"]), "--limit");
    assert_one_clean_error(&eval(&["--nll", "--nll-timesteps", "0"]), "1..=49");
    assert_one_clean_error(&eval(&["--nll", "--nll-timesteps", "50"]), "1..=49");
    assert_one_clean_error(&eval(&["--nll", "--nll-variance", "wide"]), "wide");
    assert_one_clean_error(&eval(&["--nll", "--nll-cdf", "guess"]), "guess");
    assert_one_clean_error(&eval(&["--nll", "--split", "val"]), "val");
    assert_one_clean_error(&eval(&["--nll", "--weights", "best"]), "best");
    assert_one_clean_error(&eval(&["--quality", "--num-samples", "1"]), "--num-samples");
    assert_one_clean_error(&eval(&["--quality", "--sampler", "euler"]), "euler");
    assert_one_clean_error(
        &eval(&["--nll", "--report", "no/such/dir/r.json"]),
        "does not exist",
    );
    // Data of another size than the model.
    assert_one_clean_error(&eval(&["--nll", "--image-size", "20"]), "20x20");
    // Data with other channels: a folder of RGB images (10 per class, so that each class holds
    // one test image).
    for class in ["a", "b"] {
        let d = p.join("rgb").join(class);
        std::fs::create_dir_all(&d).expect("dir");
        for i in 0..10 {
            image::RgbImage::new(16, 16)
                .save(d.join(format!("{i}.png")))
                .expect("png");
        }
    }
    assert_one_clean_error(&eval(&["--nll", "--dataset", "folder:rgb"]), "3-channel");
    // A damaged stored classifier is named, not trusted.
    std::fs::create_dir_all(p.join("data/classifiers")).expect("dir");
    std::fs::write(p.join("data/classifiers/mnist-16.safetensors"), b"junk").expect("junk");
    assert_one_clean_error(
        &eval(&["--quality", "--num-samples", "4", "--steps", "2"]),
        "mnist-16.safetensors",
    );
    // Nothing was written by the failed runs.
    assert!(!p.join("run/eval.json").exists());
}
