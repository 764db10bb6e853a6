//! End-to-end tests of the training settings `ddpm train` takes as flags (on the MNIST
//! fixture, with the tiny model of `common`): the learning-rate schedule (`--lr-schedule`,
//! `--min-lr`), what each records in the run's `config.toml`, `metrics.jsonl` and
//! `history.jsonl`, and which of them a resume may change.

mod common;

use std::path::Path;

use common::{assert_ok, assert_one_clean_error, ddpm, run, tensors, write_config};
use ddpm_train::optim::LrSchedule;
use ddpm_train::TrainConfig;

/// The run's `metrics.jsonl` as (step, lr) pairs.
fn lrs(run: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["step"].as_u64().expect("step") as usize,
                v["lr"].as_f64().expect("lr"),
            )
        })
        .collect()
}

/// The lr that `metrics.jsonl` logged at `step`.
fn lr_at(run: &Path, step: usize) -> f64 {
    lrs(run)
        .into_iter()
        .find(|p| p.0 == step)
        .unwrap_or_else(|| panic!("no metrics line for step {step}"))
        .1
}

/// The run's `config.toml`, parsed.
fn config(run: &Path) -> TrainConfig {
    TrainConfig::from_toml_file(&run.join("config.toml")).expect("config.toml parses")
}

/// The changes (key, to, by) of the run's last `history.jsonl` event.
fn last_changes(run: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(run.join("history.jsonl")).expect("history.jsonl");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("an event")).expect("JSON");
    last["changes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("key"), s("to"), s("by"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12),
        "{what}: {a} != {b}"
    );
}

/// `ddpm train` of the tiny model (`steps` steps, warm-up 2, lr 0.002, a checkpoint every
/// `checkpoint_every`) into `out`, with `flags`.
fn train(dir: &Path, out: &str, steps: usize, checkpoint_every: usize, flags: &[&str]) {
    let cfg = write_config(dir, steps, checkpoint_every, 100);
    let o = run(ddpm(dir)
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .args(["--out", out])
        .args(flags));
    assert_ok(&o);
}

/// A cosine and a linear run log the closed-form rates: the peak at the end of the 2-step
/// warm-up, `(lr + min_lr) / 2` halfway through the decay (step 7 of 12), `min_lr` at the final
/// step; both are recorded in `config.toml`. Resumed from the middle, the cosine run ends with
/// the same weights, moments and EMA, bit for bit.
#[test]
fn cosine_and_linear_schedules_log_their_closed_form_rates_and_resume_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let (lr, min) = (0.002, 0.0002);
    for schedule in ["cosine", "linear"] {
        let out = format!("run-{schedule}");
        let flags = ["--lr-schedule", schedule, "--min-lr", "0.0002"];
        train(dir.path(), &out, 12, 6, &flags);
        let run_dir = dir.path().join(&out);
        close(lr_at(&run_dir, 1), lr / 2.0, "warm-up");
        close(lr_at(&run_dir, 2), lr, "end of warm-up");
        close(lr_at(&run_dir, 7), (lr + min) / 2.0, "halfway");
        close(lr_at(&run_dir, 12), min, "final step");
        let quarter = match schedule {
            "cosine" => min + (lr - min) * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0,
            _ => lr - (lr - min) * 0.25,
        };
        // Step 4.5 is a quarter of the way: between steps 4 and 5, the rates bracket it.
        let (l4, l5) = (lr_at(&run_dir, 4), lr_at(&run_dir, 5));
        assert!(l4 > quarter && quarter > l5, "{l4} {quarter} {l5}");
        let opt = config(&run_dir).optimizer;
        let want = match schedule {
            "cosine" => LrSchedule::Cosine,
            _ => LrSchedule::Linear,
        };
        assert_eq!((opt.lr_schedule, opt.min_lr), (want, min));
    }
    // Continue a copy of the cosine run from step 6: the same rates, the same final state.
    let flags = ["--lr-schedule", "cosine", "--min-lr", "0.0002"];
    train(dir.path(), "split", 12, 6, &flags);
    assert_ok(&run(ddpm(dir.path()).args([
        "train",
        "--quiet",
        "--resume",
        "split",
        "--from-step",
        "6",
    ])));
    assert_eq!(
        lrs(&dir.path().join("split")),
        lrs(&dir.path().join("run-cosine"))
    );
    let a = tensors(
        &dir.path()
            .join("run-cosine/checkpoints/ckpt-00000012.safetensors"),
    );
    let b = tensors(
        &dir.path()
            .join("split/checkpoints/ckpt-00000012.safetensors"),
    );
    assert_eq!(a.len(), b.len());
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(da == db, "tensor {na} differs after the resume");
    }
}

/// A run at the default settings writes none of the newer keys into `config.toml` (so its text
/// and hash are those of a run written before them), resumes as it is, and may switch to a
/// decaying schedule on resume: the change is recorded in `history.jsonl` and the rates of the
/// resumed steps follow it.
#[test]
fn a_run_without_the_new_keys_resumes_and_may_take_a_schedule() {
    let dir = tempfile::tempdir().expect("tmp");
    train(dir.path(), "run", 4, 2, &[]);
    let run_dir = dir.path().join("run");
    let text = std::fs::read_to_string(run_dir.join("config.toml")).expect("config.toml");
    for key in ["lr_schedule", "min_lr"] {
        assert!(
            !text.contains(key),
            "{key} in a default config.toml:\n{text}"
        );
    }
    close(lr_at(&run_dir, 4), 0.002, "constant");
    assert_ok(&run(
        ddpm(dir.path()).args(["train", "--quiet", "--resume", "run", "--steps", "6"])
    ));
    assert!(last_changes(&run_dir).iter().all(|c| c.0 == "steps"));
    assert_ok(&run(ddpm(dir.path()).args([
        "train",
        "--quiet",
        "--resume",
        "run",
        "--steps",
        "10",
        "--lr-schedule",
        "linear",
    ])));
    let changes = last_changes(&run_dir);
    assert!(
        changes.contains(&(
            "optimizer.lr_schedule".into(),
            "\"linear\"".into(),
            "option".into()
        )),
        "{changes:?}"
    );
    // Linear from 0.002 at step 2 to 0 at step 10.
    close(lr_at(&run_dir, 6), 0.002, "before the resume");
    close(lr_at(&run_dir, 7), 0.002 * 3.0 / 8.0, "step 7");
    close(lr_at(&run_dir, 10), 0.0, "final step");
    assert_eq!(config(&run_dir).optimizer.lr_schedule, LrSchedule::Linear);
}

/// `--epochs N` trains `ceil(N * images / batch size)` steps (the fixture's 400 training images
/// in batches of 40: 10 steps per epoch) and records both; with `--steps`, or on `--resume`, it
/// is one clean error.
#[test]
fn epochs_resolve_to_steps_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    train(
        dir.path(),
        "run",
        10,
        10,
        &["--epochs", "1", "--batch-size", "40"],
    );
    let run_dir = dir.path().join("run");
    let c = config(&run_dir);
    assert_eq!((c.epochs, c.steps), (Some(1), 10));
    assert_eq!(lrs(&run_dir).len(), 10);
    let cfg = write_config(dir.path(), 10, 10, 100);
    let o = run(ddpm(dir.path())
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .args(["--out", "both", "--epochs", "1", "--steps", "5"]));
    assert_one_clean_error(&o, "--epochs");
    let o = run(ddpm(dir.path()).args(["train", "--quiet", "--resume", "run", "--epochs", "2"]));
    assert_one_clean_error(&o, "--epochs");
}

/// Each flag sets its one config key, over the config file's value, and a short run trains
/// with them; refused on `--resume` and when out of range, with one clean error.
#[test]
fn each_training_flag_sets_its_key_and_trains() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = [
        "--offset-noise",
        "0.1",
        "--min-snr-gamma",
        "5",
        "--grad-accum",
        "2",
        "--ema-decay",
        "0.9",
        "--no-flip",
    ];
    train(dir.path(), "run", 4, 4, &flags);
    let run_dir = dir.path().join("run");
    let c = config(&run_dir);
    assert_eq!(c.offset_noise, 0.1);
    assert_eq!(
        c.loss.weighting,
        ddpm_schedule::LossWeighting::MinSnr { gamma: 5.0 }
    );
    assert_eq!(
        (c.grad_accum, c.ema_decay, c.data.flip),
        (2, 0.9, Some(false))
    );
    assert!(!c.model.self_condition());
    assert_eq!(lrs(&run_dir).len(), 4);
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics");
    assert!(!text.contains("NaN") && !text.contains("null"), "{text}");

    // Self-conditioning needs the lucidrains-style U-Net.
    let flags = ["--model", "mnist-small", "--self-condition", "--flip"];
    train(dir.path(), "self-cond", 2, 2, &flags);
    let c = config(&dir.path().join("self-cond"));
    assert!(c.model.self_condition());
    assert_eq!(c.data.flip, Some(true));

    let cfg = write_config(dir.path(), 2, 2, 100);
    for (flags, needle) in [
        (&["--self-condition"][..], "--self-condition"),
        (&["--offset-noise", "-1"][..], "offset_noise"),
        (&["--ema-decay", "1.5"][..], "ema_decay"),
        (&["--grad-accum", "3"][..], "grad_accum"),
        (&["--flip", "--no-flip"][..], "--flip"),
    ] {
        let o = run(ddpm(dir.path())
            .args(["train", "--quiet", "--config"])
            .arg(&cfg)
            .args(["--out", "bad"])
            .args(flags));
        assert_one_clean_error(&o, needle);
    }
    for flags in [
        &["--offset-noise", "0.2"][..],
        &["--min-snr-gamma", "1"][..],
        &["--grad-accum", "4"][..],
        &["--ema-decay", "0.5"][..],
        &["--self-condition"][..],
        &["--flip"][..],
    ] {
        let o = run(ddpm(dir.path())
            .args(["train", "--quiet", "--resume", "run"])
            .args(flags));
        assert_one_clean_error(&o, flags[0]);
    }
}
