//! End-to-end tests of class-conditional runs (classifier-free guidance) on the MNIST fixture
//! with the tiny model of `common`: `ddpm train --class-conditional`, what the run records,
//! `ddpm sample --guidance/--class`, `ddpm eval --quality` of a conditional model, and the
//! errors of flags that do not fit.

mod common;

use std::path::Path;

use common::{assert_ok, assert_one_clean_error, ddpm, num, read_json, run, write_config};
use ddpm_train::TrainConfig;

/// Trains the tiny config for 3 steps into `p/out`, with `flags`.
fn train(p: &Path, out: &str, flags: &[&str]) {
    let cfg = write_config(p, 3, 3, 1);
    let mut c = ddpm(p);
    c.args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .args(["--out", out])
        .args(flags);
    assert_ok(&run(&mut c));
}

#[test]
fn a_class_conditional_run_samples_and_evaluates_by_class() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    train(
        p,
        "cond",
        &[
            "--class-conditional",
            "--class-dropout",
            "0.2",
            "--guidance",
            "2.5",
        ],
    );
    let config = TrainConfig::from_toml_file(&p.join("cond/config.toml")).expect("config");
    // The class count is the data set's, whatever the flag started from.
    assert_eq!(config.model.num_classes(), Some(10));
    assert_eq!(config.class_dropout, 0.2);
    assert_eq!(config.guidance.scale, 2.5);
    let text = std::fs::read_to_string(p.join("cond/config.toml")).expect("toml");
    assert!(text.contains("num_classes = 10"), "{text}");
    // The grid written while training: 4 samples, one column per class present (4 of 10).
    let grid = p.join("cond/samples/step-00000003.png");
    assert!(grid.exists());

    // `ddpm sample`: 20 images of the classes in turn are 10 columns (16x16, 2-pixel padding),
    // two rows; a fixed class with more guidance is another picture.
    let sample = |extra: &[&str], out: &str| {
        let mut c = ddpm(p);
        c.args([
            "sample",
            "--checkpoint",
            "cond",
            "--num",
            "20",
            "--steps",
            "4",
            "--quiet",
            "--out",
            out,
        ])
        .args(extra);
        run(&mut c)
    };
    assert_ok(&sample(&[], "all.png"));
    assert_eq!(
        image::image_dimensions(p.join("all.png")).expect("png"),
        (10 * 18 + 2, 2 * 18 + 2)
    );
    assert_ok(&sample(&["--class", "3", "--guidance", "4"], "three.png"));
    assert_ne!(
        std::fs::read(p.join("all.png")).expect("all"),
        std::fs::read(p.join("three.png")).expect("three")
    );
    // --guidance 0 (the unconditional model) works too.
    assert_ok(&sample(&["--guidance", "0"], "uncond.png"));

    // Flags that do not fit: one error line each, nothing written.
    assert_one_clean_error(
        &sample(&["--class", "10"], "bad.png"),
        "--class 10: class 10",
    );
    assert_one_clean_error(
        &sample(&["--guidance", "-1"], "bad.png"),
        "--guidance: guidance",
    );
    // The flag at fault is named, with its own words (no "training config" is involved).
    let both = sample(&["--class", "3", "--guidance", "nan"], "bad.png");
    assert_one_clean_error(&both, "--guidance: guidance scale NaN");
    assert!(!String::from_utf8_lossy(&both.stderr).contains("training config"));
    assert!(!p.join("bad.png").exists());

    // `ddpm eval --quality`: the share of samples classified as their class, and the guidance.
    let mut c = ddpm(p);
    c.args([
        "eval",
        "--checkpoint",
        "cond",
        "--quality",
        "--num-samples",
        "20",
        "--steps",
        "3",
        "--classifier-steps",
        "20",
        "--classifier-width",
        "4",
        "--classifier-features",
        "8",
        "--guidance",
        "3",
        "--report",
        "q.json",
        "--quiet",
    ]);
    assert_ok(&run(&mut c));
    let q = read_json(&p.join("q.json"))["quality"].clone();
    let acc = num(&q["label_accuracy"], "label_accuracy");
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    // 20 samples of 10 classes: the accuracy is a multiple of 1/20.
    assert!(((acc * 20.0) - (acc * 20.0).round()).abs() < 1e-9, "{acc}");
    assert_eq!(q["guidance"]["scale"], 3.0);
    assert!(q["guidance"]["class"].is_null());
}

#[test]
fn conditioning_flags_that_do_not_fit_are_one_error_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    train(p, "plain", &[]);
    let text = std::fs::read_to_string(p.join("plain/config.toml")).expect("toml");
    assert!(!text.contains("num_classes"), "{text}");
    for (flags, needle) in [
        (&["--guidance", "3"][..], "unconditional"),
        (&["--class", "2"][..], "unconditional"),
    ] {
        let mut c = ddpm(p);
        c.args([
            "sample",
            "--checkpoint",
            "plain",
            "--num",
            "2",
            "--steps",
            "2",
        ])
        .args(flags);
        assert_one_clean_error(&run(&mut c), needle);
    }
    let cfg = write_config(p, 3, 3, 1);
    for (flags, needle) in [
        (
            &["--class-conditional", "--class-dropout", "1.5"][..],
            "class_dropout",
        ),
        (
            &[
                "--class-conditional",
                "--class-dropout",
                "0",
                "--guidance",
                "3",
            ][..],
            "class_dropout",
        ),
        (&["--class-conditional", "--guidance", "-2"][..], "guidance"),
        (
            &["--class-conditional", "--unconditional"][..],
            "--unconditional",
        ),
    ] {
        let mut c = ddpm(p);
        c.args(["train", "--quiet", "--config"])
            .arg(&cfg)
            .args(["--out", "bad"])
            .args(flags);
        assert_one_clean_error(&run(&mut c), needle);
    }
    assert!(!p.join("bad/checkpoints").exists());
}
