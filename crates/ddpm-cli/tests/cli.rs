//! End-to-end tests of the `ddpm` binary on MNIST (the committed fixture of 500 real images,
//! placed in each test's `data/mnist`; one test in the real-data suite fetches the whole set):
//! training, sampling, exact resume, SIGKILL and SIGINT, corrupt checkpoints, NaN losses and bad
//! input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_clean_error, assert_ok, assert_one_clean_error, clean_error, ddpm, run, stderr, tensors,
    train_new, wait_for, write_config,
};

/// `ddpm train` of a new run of the tiny model into `out`, keeping every checkpoint.
fn train(dir: &Path, out: &str, steps: usize, checkpoint_every: usize) -> Command {
    let cfg = write_config(dir, steps, checkpoint_every, 100);
    train_new(dir, out, &cfg)
}

fn metrics(run: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()? as usize, v["loss"].as_f64()?))
        })
        .collect()
}

fn checkpoints(run: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| {
                let n = e.ok()?.file_name().to_string_lossy().into_owned();
                n.strip_prefix("ckpt-")?.strip_suffix(".json")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn png_dims(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn short_run_learns_and_writes_checkpoints_grid_and_curve() {
    let dir = tempfile::tempdir().expect("tmp");
    short_run_learns(dir.path());
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn short_run_on_the_real_mnist_fetched_by_the_binary_learns() {
    let dir = tempfile::tempdir().expect("tmp");
    // The binary fetches MNIST itself, verified, from the fetched copy (a mirror in the layout of
    // the data directory).
    let mut cmd = train(dir.path(), "run", 40, 10);
    cmd.env("DDPM_DATA_MIRROR", common::real_data());
    std::fs::remove_dir_all(dir.path().join("data")).expect("fixture removed");
    let o = run(&mut cmd);
    assert_ok(&o);
    assert!(ddpm_data::fetch::is_fetched(
        &ddpm_data::DatasetSpec::Mnist,
        &dir.path().join("data")
    ));
    check_short_run(&dir.path().join("run"));
}

/// Trains 40 steps of the tiny model in `dir` (on the MNIST fixture), then checks the run.
fn short_run_learns(dir: &Path) {
    let o = run(&mut train(dir, "run", 40, 10));
    assert_ok(&o);
    assert!(dir.join("data/mnist/t10k-images-idx3-ubyte.gz").exists());
    check_short_run(&dir.join("run"));
}

/// A 40-step run with checkpoints every 10 steps: its loss fell, and it wrote its checkpoints, a
/// 2x2 grid, the loss curve and its config.
fn check_short_run(run_dir: &Path) {
    let m = metrics(run_dir);
    assert_eq!(m.len(), 40);
    let head: f64 = m[..5].iter().map(|p| p.1).sum::<f64>() / 5.0;
    let tail: f64 = m[35..].iter().map(|p| p.1).sum::<f64>() / 5.0;
    assert!(tail < 0.7 * head, "loss did not fall: {head} -> {tail}");
    assert_eq!(checkpoints(run_dir), vec![10, 20, 30, 40]);
    // 4 samples of 16x16 in a 2x2 grid with 2-pixel padding.
    assert_eq!(
        png_dims(&run_dir.join("samples/step-00000040.png")),
        (38, 38)
    );
    assert_eq!(png_dims(&run_dir.join("loss.png")), (720, 420));
    assert!(run_dir.join("config.toml").exists());
}

#[test]
fn gradient_accumulation_and_other_objectives_train() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = write_config(dir.path(), 30, 30, 100);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("grad_accum = 2\n{text}")).expect("config");
    for (objective, loss) in [("eps", "l2"), ("v", "huber"), ("x0", "l1")] {
        let out = format!("run-{objective}");
        let o = run(ddpm(dir.path())
            .args(["train", "--quiet", "--config"])
            .arg(&cfg)
            .args([
                "--out",
                &out,
                "--objective",
                objective,
                "--loss",
                loss,
                "--schedule",
                "cosine",
            ]));
        assert_ok(&o);
        let m = metrics(&dir.path().join(&out));
        assert_eq!(m.len(), 30, "{objective}");
        let head = m[..5].iter().map(|p| p.1).sum::<f64>();
        let tail = m[25..].iter().map(|p| p.1).sum::<f64>();
        assert!(
            tail < head,
            "{objective}/{loss}: loss did not fall ({head} -> {tail})"
        );
        let saved =
            std::fs::read_to_string(dir.path().join(&out).join("config.toml")).expect("config");
        assert!(
            saved.contains(&format!("objective = \"{objective}\"")),
            "{saved}"
        );
        assert!(saved.contains("grad_accum = 2"));
    }
}

#[test]
fn sample_writes_grid_single_images_and_gif_of_requested_sizes() {
    let dir = tempfile::tempdir().expect("tmp");
    assert_ok(&run(&mut train(dir.path(), "run", 4, 4)));
    let o = run(ddpm(dir.path()).args([
        "sample",
        "--checkpoint",
        "run",
        "--num",
        "6",
        "--sampler",
        "ddpm",
        "--steps",
        "8",
        "--seed",
        "3",
        "--out",
        "grid.png",
        "--gif",
        "rev.gif",
        "--frames",
        "5",
        "--out-dir",
        "each",
        "--quiet",
    ]));
    assert_ok(&o);
    // 6 images in rows of 3: 2 rows.
    assert_eq!(
        png_dims(&dir.path().join("grid.png")),
        (3 * 18 + 2, 2 * 18 + 2)
    );
    let each: Vec<_> = std::fs::read_dir(dir.path().join("each"))
        .expect("dir")
        .collect();
    assert_eq!(each.len(), 6);
    assert_eq!(
        png_dims(&dir.path().join("each/sample-00000.png")),
        (16, 16)
    );
    let gif = std::fs::File::open(dir.path().join("rev.gif")).expect("gif");
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif)).expect("gif");
    use image::AnimationDecoder;
    let frames = decoder.into_frames().collect_frames().expect("frames");
    assert_eq!(frames.len(), 5);
    assert_eq!(frames[0].buffer().dimensions(), (56, 38));
    // Same seed, same images; another seed, other images.
    let again = |seed: &str, out: &str| {
        assert_ok(&run(ddpm(dir.path()).args([
            "sample",
            "--checkpoint",
            "run",
            "--num",
            "6",
            "--sampler",
            "ddpm",
            "--steps",
            "8",
            "--seed",
            seed,
            "--out",
            out,
            "--quiet",
        ])));
        std::fs::read(dir.path().join(out)).expect("png")
    };
    assert_eq!(
        again("3", "a.png"),
        std::fs::read(dir.path().join("grid.png")).expect("png")
    );
    assert_ne!(again("4", "b.png"), again("3", "c.png"));
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().expect("tmp");
    assert_ok(&run(&mut train(dir.path(), "straight", 12, 6)));
    let cfg = write_config(dir.path(), 12, 6, 100);
    assert_ok(&run(ddpm(dir.path())
        .args(["train", "--quiet", "--config"])
        .arg(&cfg)
        .args(["--out", "split", "--steps", "6"])));
    assert_eq!(checkpoints(&dir.path().join("split")), vec![6]);
    assert_ok(&run(
        ddpm(dir.path()).args(["train", "--quiet", "--resume", "split", "--steps", "12"])
    ));
    let a = tensors(
        &dir.path()
            .join("straight/checkpoints/ckpt-00000012.safetensors"),
    );
    let b = tensors(
        &dir.path()
            .join("split/checkpoints/ckpt-00000012.safetensors"),
    );
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(n, _)| n.starts_with("optim.m.")));
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(da == db, "tensor {na} differs after resume");
    }
    // The metrics of the resumed run continue where the checkpoint left off.
    let m = metrics(&dir.path().join("split"));
    assert_eq!(
        m.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
}

#[test]
fn launched_worlds_one_rank_trains_as_one_process_and_bad_worlds_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    assert_ok(&run(&mut train(p, "plain", 4, 4)));
    // RANK=0 WORLD_SIZE=1 on the CPU: the same run, bit for bit (on CUDA with NCCL this is the
    // test-matrix row `nccl world size 1 = plain`).
    assert_ok(&run(train(p, "world1", 4, 4)
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_RANK", "0")));
    let a = tensors(&p.join("plain/checkpoints/ckpt-00000004.safetensors"));
    let b = tensors(&p.join("world1/checkpoints/ckpt-00000004.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(da == db, "tensor {na} differs with RANK=0 WORLD_SIZE=1");
    }
    assert_eq!(metrics(&p.join("plain")), metrics(&p.join("world1")));
    // Two ranks need NCCL and CUDA; a rank out of range is named.
    let two = run(train(p, "two", 4, 4)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0"));
    if cfg!(feature = "nccl") {
        assert_clean_error(&two, "one CUDA device per rank");
    } else {
        assert_clean_error(&two, "cargo xtask build-cuda --nccl");
    }
    assert_clean_error(
        &run(train(p, "bad", 4, 4)
            .env("RANK", "2")
            .env("WORLD_SIZE", "2")),
        "RANK=2",
    );
    assert!(!p.join("two/checkpoints").exists() && !p.join("bad/checkpoints").exists());
}

/// `ddpm launch`: one rank trains bit for bit like a plain run; two ranks in a build without
/// NCCL fail, and the launcher names the failed rank and stops the other; bad launches are
/// refused before any rank starts.
#[test]
fn launch_starts_ranks_and_reports_a_failed_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, 4, 4, 100);
    let launch = |nproc: &str, out: &str| {
        let mut c = ddpm(p);
        c.args([
            "launch", "--nproc", nproc, "--", "train", "--quiet", "--config",
        ])
        .arg(&cfg)
        .args(["--out", out]);
        c
    };
    assert_ok(&run(&mut train_new(p, "plain", &cfg)));
    assert_ok(&run(&mut launch("1", "one")));
    let a = tensors(&p.join("plain/checkpoints/ckpt-00000004.safetensors"));
    let b = tensors(&p.join("one/checkpoints/ckpt-00000004.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, da), (nb, db)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "tensor {na} differs under `ddpm launch --nproc 1`"
        );
    }
    assert_eq!(metrics(&p.join("plain")), metrics(&p.join("one")));

    let two = run(&mut launch("2", "two"));
    assert!(clean_error(&two).is_ok(), "{:?}", clean_error(&two));
    let err = stderr(&two);
    if !cfg!(feature = "nccl") {
        // Refused before any rank starts: one error, not one per rank.
        assert_one_clean_error(&two, "cargo xtask build-cuda --nccl");
    } else if err.contains("CUDA device") && !err.contains("of 2 failed") {
        // An NCCL build on a machine with fewer than two GPUs: refused up front too.
        assert_one_clean_error(&two, "--nproc 2");
    } else {
        // Started on a CPU device: the ranks' own errors come first (they share the launcher's
        // stderr), the launcher's last.
        let last = err
            .lines()
            .rfind(|l| l.starts_with("error: "))
            .unwrap_or_default();
        assert!(
            last.contains("of 2 failed"),
            "the launcher names the failed rank: {err}"
        );
        assert!(
            err.contains("one CUDA device per rank"),
            "the rank's own error is shown: {err}"
        );
    }
    assert!(!p.join("two/checkpoints").exists());

    // The only rank's own error is the one line: the launcher adds none and exits with its code.
    let mut missing = ddpm(p);
    missing.args([
        "launch",
        "--nproc",
        "1",
        "--",
        "train",
        "--config",
        "no-such.toml",
    ]);
    let missing = run(&mut missing);
    assert_one_clean_error(&missing, "no-such.toml");
    assert_eq!(missing.status.code(), Some(1));

    assert_clean_error(&run(&mut launch("0", "zero")), "--nproc must be at least 1");
    let mut sample = ddpm(p);
    sample.args([
        "launch",
        "--nproc",
        "1",
        "--",
        "sample",
        "--checkpoint",
        "one",
    ]);
    assert_clean_error(&run(&mut sample), "runs `ddpm train`");
    assert_clean_error(
        &run(launch("1", "nested").env("RANK", "0")),
        "RANK is already set",
    );
}

#[test]
fn sigkill_mid_training_resumes_from_the_last_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let run_dir = dir.path().join("run");
    let mut child = train(dir.path(), "run", 100_000, 3)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for("two checkpoints", Duration::from_secs(120), || {
        checkpoints(&run_dir).len() >= 2
    });
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let last = *checkpoints(&run_dir).last().expect("a checkpoint");
    let target = last + 4;
    let o = run(ddpm(dir.path()).args([
        "train",
        "--quiet",
        "--resume",
        "run",
        "--steps",
        &target.to_string(),
    ]));
    assert_ok(&o);
    assert!(stderr(&o).contains(&format!("step={last}")) || stderr(&o).contains("resumed"));
    assert_eq!(*checkpoints(&run_dir).last().expect("checkpoint"), target);
    // Every checkpoint left on disk loads.
    for step in checkpoints(&run_dir) {
        let json = format!("run/checkpoints/ckpt-{step:08}.json");
        assert_ok(&run(ddpm(dir.path()).args([
            "sample",
            "--checkpoint",
            &json,
            "--num",
            "1",
            "--steps",
            "2",
            "--out",
            "s.png",
            "--quiet",
        ])));
    }
}

#[test]
fn sigint_finishes_the_step_and_leaves_a_fresh_checkpoint() {
    stop_signal_leaves_a_fresh_checkpoint(libc::SIGINT);
}

#[test]
fn sigterm_finishes_the_step_and_leaves_a_fresh_checkpoint() {
    stop_signal_leaves_a_fresh_checkpoint(libc::SIGTERM);
}

fn stop_signal_leaves_a_fresh_checkpoint(signal: i32) {
    let dir = tempfile::tempdir().expect("tmp");
    let out = stopped_after_steps(
        train(dir.path(), "run", 100_000, 100_000),
        dir.path(),
        signal,
    );
    assert!(stderr(&out).contains("interrupted"));
}

/// Starts `cmd` (training into `dir/run`), sends `signal` to it after a few steps, and checks
/// that it exits cleanly with one checkpoint, of the last logged step.
fn stopped_after_steps(mut cmd: Command, dir: &Path, signal: i32) -> std::process::Output {
    let run_dir = dir.join("run");
    let child = cmd.stderr(Stdio::piped()).spawn().expect("spawn");
    wait_for("a few steps", Duration::from_secs(120), || {
        metrics(&run_dir).len() >= 3
    });
    // SAFETY: sending a signal to our own child process (not to its process group).
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", stderr(&out));
    let reached = metrics(&run_dir).last().map(|p| p.0).expect("metrics");
    assert!(reached >= 3);
    assert_eq!(checkpoints(&run_dir), vec![reached]);
    out
}

/// SIGTERM to `ddpm launch` (a job scheduler's stop) reaches the ranks: they finish the step and
/// rank 0 writes a checkpoint of it, and the launcher exits cleanly.
#[test]
fn sigterm_to_launch_reaches_the_ranks() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = write_config(dir.path(), 100_000, 100_000, 100);
    let mut launch = ddpm(dir.path());
    launch
        .args([
            "launch", "--nproc", "1", "--", "train", "--quiet", "--config",
        ])
        .arg(&cfg)
        .args(["--out", "run"]);
    let err = stderr(&stopped_after_steps(launch, dir.path(), libc::SIGTERM));
    assert!(
        err.contains("passing the interrupt on") && err.contains("interrupted"),
        "{err}"
    );
}

/// A rank whose launcher is killed (SIGKILL, out of memory) does not train on without it: it
/// gets SIGTERM, finishes the step and writes a checkpoint (Linux).
#[cfg(target_os = "linux")]
#[test]
fn ranks_stop_when_their_launcher_is_killed() {
    let dir = tempfile::tempdir().expect("tmp");
    let run_dir = dir.path().join("run");
    let cfg = write_config(dir.path(), 100_000, 100_000, 100);
    let mut launcher = ddpm(dir.path())
        .args([
            "launch", "--nproc", "1", "--", "train", "--quiet", "--config",
        ])
        .arg(&cfg)
        .args(["--out", "run"])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for("a few steps", Duration::from_secs(120), || {
        metrics(&run_dir).len() >= 3
    });
    launcher.kill().expect("kill the launcher");
    launcher.wait().expect("reap the launcher");
    wait_for(
        "the orphaned rank's checkpoint",
        Duration::from_secs(120),
        || !checkpoints(&run_dir).is_empty(),
    );
    // Its last step is checkpointed, and it trains no further.
    std::thread::sleep(Duration::from_millis(500));
    let reached = metrics(&run_dir).last().map(|p| p.0).expect("metrics");
    assert_eq!(checkpoints(&run_dir), vec![reached]);
}

#[test]
fn truncated_checkpoint_is_rejected_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    assert_ok(&run(&mut train(dir.path(), "run", 4, 2)));
    let file = dir.path().join("run/checkpoints/ckpt-00000004.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 3]).expect("truncate");
    let o =
        run(ddpm(dir.path()).args(["sample", "--checkpoint", "run", "--out", "s.png", "--quiet"]));
    assert_clean_error(&o, "ckpt-00000004.safetensors");
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    let o = run(ddpm(dir.path()).args(["train", "--quiet", "--resume", "run"]));
    assert_clean_error(&o, "truncated");
    // The previous checkpoint is still intact.
    assert_ok(&run(ddpm(dir.path()).args([
        "sample",
        "--checkpoint",
        "run/checkpoints/ckpt-00000002.json",
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        "s.png",
        "--quiet",
    ])));
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = run(train(dir.path(), "run", 20, 4).env("DDPM_FAULT_NAN_AT_STEP", "7"));
    assert_clean_error(&o, "step 7");
    assert!(stderr(&o).contains("NaN"), "{}", stderr(&o));
    assert_eq!(checkpoints(&dir.path().join("run")), vec![4]);
    assert_ok(&run(ddpm(dir.path()).args([
        "sample",
        "--checkpoint",
        "run",
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        "s.png",
        "--quiet",
    ])));
}

#[test]
fn bad_input_gives_one_clear_error_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    assert_clean_error(
        &run(ddpm(p).args(["train", "--dataset", "imagenet"])),
        "imagenet",
    );
    assert_clean_error(&run(ddpm(p).args(["train", "--model", "huge"])), "huge");
    assert_clean_error(
        &run(ddpm(p).args(["train", "--objective", "score"])),
        "score",
    );
    assert_clean_error(&run(ddpm(p).args(["train", "--device", "cuda:0"])), "CUDA");
    assert_clean_error(
        &run(ddpm(p).args(["train", "--no-fetch", "--data-dir", "nowhere"])),
        "cargo xtask fetch-data mnist",
    );
    assert_clean_error(
        &run(ddpm(p).args(["sample", "--checkpoint", "missing-run"])),
        "missing-run",
    );
    assert_ok(&run(&mut train(p, "run", 2, 2)));
    // An output directory that cannot be created.
    std::fs::write(p.join("a-file"), b"x").expect("write");
    assert_clean_error(&run(&mut train(p, "a-file/run", 2, 2)), "a-file/run");
    assert_clean_error(
        &run(ddpm(p).args([
            "sample",
            "--checkpoint",
            "run",
            "--out",
            "no/such/dir/x.png",
        ])),
        "does not exist",
    );
    // Outputs that could not be written at the end are refused before the model is even
    // loaded (the checkpoint named here does not exist): a directory named like the GIF, a
    // read-only grid left as it was, a FIFO.
    std::fs::create_dir(p.join("reverse.gif")).expect("mkdir");
    let o = run(ddpm(p).args([
        "sample",
        "--checkpoint",
        "none",
        "--out",
        "s.png",
        "--gif",
        "reverse.gif",
    ]));
    assert_clean_error(
        &o,
        "--gif reverse.gif: it is a directory, not a regular file",
    );
    std::fs::write(p.join("kept.png"), b"mine").expect("write");
    let mut ro = std::fs::metadata(p.join("kept.png"))
        .expect("meta")
        .permissions();
    ro.set_readonly(true);
    std::fs::set_permissions(p.join("kept.png"), ro).expect("chmod");
    for args in [
        &["sample", "--checkpoint", "none", "--out", "kept.png"][..],
        &["forward", "--out", "kept.png"][..],
    ] {
        assert_clean_error(
            &run(ddpm(p).args(args)),
            "--out kept.png: the file is read-only",
        );
    }
    assert_eq!(std::fs::read(p.join("kept.png")).expect("read"), b"mine");
    // A checkpoint of another model config cannot be loaded into this run's model.
    let o = run(ddpm(p).args(["train", "--config", "tiny.toml", "--out", "run"]));
    assert_clean_error(&o, "--resume");
    // A weights file that is not safetensors.
    std::fs::write(p.join("junk.safetensors"), b"junk").expect("write");
    assert_clean_error(
        &run(ddpm(p).args(["sample", "--checkpoint", "junk.safetensors"])),
        "junk.safetensors",
    );
}

#[test]
fn schedule_and_forward_commands() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = run(ddpm(dir.path()).args([
        "schedule",
        "--kind",
        "cosine",
        "--timesteps",
        "10",
        "--format",
        "csv",
    ]));
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11);
    assert!(lines[0].starts_with("t,beta,alpha,alphas_cumprod"));
    // alphas_cumprod is the running product of 1 - beta.
    let mut prod = 1.0;
    for l in &lines[1..] {
        let f: Vec<f64> = l.split(',').map(|x| x.parse().expect("number")).collect();
        prod *= 1.0 - f[1];
        assert!((f[3] - prod).abs() < 1e-12 * prod.max(1e-300) + 1e-15);
    }
    assert_ok(&run(ddpm(dir.path()).args([
        "schedule",
        "--kind",
        "sigmoid",
        "--timesteps",
        "5",
    ])));
    assert_clean_error(
        &run(ddpm(dir.path()).args(["schedule", "--kind", "zigzag"])),
        "zigzag",
    );
    let o = run(ddpm(dir.path()).args([
        "forward",
        "--timesteps",
        "0,100,999",
        "--num",
        "2",
        "--out",
        "fwd.png",
    ]));
    assert_ok(&o);
    // The MNIST data was fetched on demand; rows of images, columns of timesteps.
    assert_eq!(
        png_dims(&dir.path().join("fwd.png")),
        (3 * 30 + 2, 2 * 30 + 2)
    );
}

/// A log filter or an environment value we cannot honour is one line naming it, never ignored:
/// a bare word that is not a level would hide every line, a malformed directive would fall back
/// to `info`, and `DDPM_CUDA_POOL=yes` would do nothing.
#[test]
fn bad_log_filters_and_environment_values_are_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let schedule = |log: Option<&str>, env: Option<(&str, &str)>| {
        let mut c = ddpm(dir.path());
        c.args(["schedule", "--timesteps", "10"])
            .env_remove("DDPM_LOG");
        if let Some(log) = log {
            c.args(["--log", log]);
        }
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        run(&mut c)
    };
    assert_one_clean_error(
        &schedule(Some("errr"), None),
        "--log errr: `errr` names no module",
    );
    assert_one_clean_error(
        &schedule(Some("nonsense=["), None),
        "does not end in a level",
    );
    assert_one_clean_error(
        &schedule(None, Some(("DDPM_LOG", "infoo"))),
        "DDPM_LOG=infoo",
    );
    for good in [
        "warn",
        "DEBUG",
        "info,ddpm_train=debug",
        "ddpm_train",
        "off",
    ] {
        assert_ok(&schedule(Some(good), None));
    }
    assert_one_clean_error(
        &schedule(None, Some(("DDPM_CUDA_POOL", "yes"))),
        "DDPM_CUDA_POOL=yes",
    );
    assert_ok(&schedule(None, Some(("DDPM_CUDA_POOL", "keep"))));
}
