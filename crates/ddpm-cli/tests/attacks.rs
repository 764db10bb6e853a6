//! Attacks on the release binary (issue 21): inputs that used to crash, abort, hang or mislead,
//! each run as a user would and checked for the fixed behaviour, on the committed MNIST fixture.

mod common;

use std::path::Path;

use common::{assert_ok, assert_one_clean_error, ddpm, run, stderr};

/// `ddpm train --quiet --out RUN` with these flags, in `dir`.
fn train(dir: &Path, run_dir: &str, flags: &[&str]) -> std::process::Output {
    let mut c = ddpm(dir);
    c.args(["train", "--quiet", "--out", run_dir]).args(flags);
    run(&mut c)
}

/// Item 5: the DDPM U-Net presets crashed in the backward pass at batch 1 ("shape mismatch in
/// matmul, lhs: [32], rhs: [32, 128]"): directly, and as micro-batches of 1 through
/// `grad_accum`.
#[test]
fn cifar_presets_train_at_batch_one() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(
        dir.path(),
        "runs/b1",
        &[
            "--model",
            "cifar-small",
            "--image-size",
            "8",
            "--batch-size",
            "1",
            "--steps",
            "1",
            "--sample-every",
            "0",
        ],
    );
    assert_ok(&o);
    let cfg = dir.path().join("accum.toml");
    std::fs::write(
        &cfg,
        "steps = 1\nbatch_size = 2\ngrad_accum = 2\nsample_every = 0\n\n[data]\nimage_size = 8\n",
    )
    .unwrap();
    let mut c = ddpm(dir.path());
    c.args([
        "train",
        "--quiet",
        "--out",
        "runs/accum",
        "--model",
        "cifar-small",
    ])
    .arg("--config")
    .arg(&cfg);
    assert_ok(&run(&mut c));
}

/// Item 6: `--image-size 4096` decoded for minutes and then aborted on a failed allocation. The
/// run is refused at once with the memory it needs, what is available and the flag to lower.
#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let o = train(dir.path(), "runs/huge", &["--image-size", "4096"]);
    assert_one_clean_error(&o, "--image-size");
    let err = stderr(&o);
    for needle in [
        "needs at least",
        "is available",
        "400 images of 1x4096x4096",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    // Nothing was decoded: the refusal comes before the data set is opened.
    assert!(!err.contains("opened data set"), "{err}");
}

/// Item 7: `workers = 100000` aborted the process (a loader thread could not set up its stack).
/// It is refused with the allowed range, and so is an absurd `[data] threads`.
#[test]
fn absurd_thread_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, needle) in [
        ("workers = 100000\n", "`workers` = 100000 is outside 0..=64"),
        (
            "[data]\nthreads = 100000\n",
            "`[data] threads` = 100000 is more than 256",
        ),
    ] {
        let cfg = dir.path().join("threads.toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut c = ddpm(dir.path());
        c.args(["train", "--quiet", "--out", "runs/threads", "--config"])
            .arg(&cfg);
        assert_one_clean_error(&run(&mut c), needle);
    }
}
