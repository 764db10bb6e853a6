//! Attacks on the release binary (issue 21): inputs that used to crash, abort, hang or mislead,
//! each run as a user would and checked for the fixed behaviour, on the committed MNIST fixture.

mod common;

use std::path::{Path, PathBuf};

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
    let _row = common::AttackRow("batch 1 on cifar-small/cifar10");
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
// The memory checks read MemAvailable from /proc/meminfo (Linux); elsewhere they are skipped.
#[cfg(target_os = "linux")]
#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_decoding() {
    let _row = common::AttackRow("--image-size 4096 (memory estimate)");
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
    let _row = common::AttackRow("workers = 100000");
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

/// A one-step run of the MNIST preset at 8x8 with a 2-step schedule in `dir/runs/t2`: a model to
/// sample from in milliseconds.
fn two_step_run(dir: &Path) -> std::process::Output {
    train(
        dir,
        "runs/t2",
        &[
            "--timesteps",
            "2",
            "--image-size",
            "8",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--sample-every",
            "0",
        ],
    )
}

/// `ddpm sample --quiet --checkpoint runs/t2` with these flags, in `dir`.
fn sample_t2(dir: &Path, flags: &[&str]) -> std::process::Output {
    let mut c = ddpm(dir);
    c.args(["sample", "--quiet", "--checkpoint", "runs/t2", "--num", "4"])
        .args(flags);
    run(&mut c)
}

/// Item 8: `--timesteps 2` failed with "cannot respace a 2-step schedule to 50 steps", naming
/// no setting. Left at its default, the grids' sampler now takes all T steps (with a warning);
/// set explicitly, the error names `[sampler] steps` and the schedule's `timesteps`; `ddpm
/// sample`'s default DDIM steps fit T and a larger `--steps` is named.
#[test]
fn sampler_steps_fit_a_short_schedule_or_are_named() {
    let _row = common::AttackRow("--timesteps 2 and the sampler steps");
    let dir = tempfile::tempdir().unwrap();
    let o = two_step_run(dir.path());
    assert_ok(&o);
    assert!(
        stderr(&o).contains("it takes 2 (set `[sampler] steps`"),
        "{}",
        stderr(&o)
    );
    let cfg = dir.path().join("sampler.toml");
    std::fs::write(&cfg, "[sampler]\nkind = \"ddim\"\nsteps = 5\n").unwrap();
    let o = train(
        dir.path(),
        "runs/explicit",
        &["--config", cfg.to_str().unwrap(), "--timesteps", "2"],
    );
    assert_one_clean_error(
        &o,
        "`[sampler] steps` = 5 (the sampler of the sample grids written while training) must be \
         in 1..=2 (`[schedule] timesteps`)",
    );
    assert_ok(&sample_t2(dir.path(), &["--out", "default.png"]));
    assert_one_clean_error(
        &sample_t2(dir.path(), &["--steps", "5"]),
        "--steps 5 is outside 1..=2",
    );
}

/// Item 10: `--frames 20000 --steps 2` wrote a 232 MB GIF of 20,000 frames (repeats of 3
/// states). The frames are capped at the sampler's steps + 1, with a note.
#[test]
fn gif_frames_are_capped_at_the_sampler_states() {
    let _row = common::AttackRow("--frames 20000 --steps 2");
    use image::AnimationDecoder;
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&two_step_run(dir.path()));
    let o = sample_t2(
        dir.path(),
        &["--gif", "g.gif", "--frames", "20000", "--steps", "2"],
    );
    assert_ok(&o);
    assert!(
        stderr(&o).contains("--frames 20000 is more than the 3 states of a 2-step sampler"),
        "{}",
        stderr(&o)
    );
    let file = std::fs::File::open(dir.path().join("g.gif")).unwrap();
    let gif = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file)).unwrap();
    assert_eq!(gif.into_frames().count(), 3);
}

/// Item 11: a run on `--dataset folder:RELATIVE` (and the default data root `data`) stored the
/// relative paths, so `--resume` or `eval` from another directory failed, and `--dataset` could
/// not be given with `--resume`. The run's config now holds absolute paths, and a resume may
/// point the run at its image folder's new path.
#[test]
fn a_run_on_a_relative_folder_resumes_and_evaluates_from_another_directory() {
    let _row = common::AttackRow("relative folder, resume elsewhere");
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("imgs/daisy");
    std::fs::create_dir_all(&class).unwrap();
    let daisy = common::fixtures().join("flowers/daisy");
    for entry in std::fs::read_dir(daisy).unwrap().take(10) {
        let path = entry.unwrap().path();
        std::fs::copy(&path, class.join(path.file_name().unwrap())).unwrap();
    }
    let o = train(
        dir.path(),
        "run",
        &[
            "--dataset",
            "folder:imgs",
            "--test-fraction",
            "0.2",
            "--image-size",
            "8",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--sample-every",
            "0",
        ],
    );
    assert_ok(&o);
    let config = std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
    let root = dir.path().canonicalize().unwrap();
    for want in [
        format!("dataset = \"folder:{}\"", root.join("imgs").display()),
        format!("root = \"{}\"", root.join("data").display()),
    ] {
        assert!(config.contains(&want), "`{want}` not in {config}");
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let mut c = common::ddpm_bare(&elsewhere);
    c.args(["train", "--quiet", "--resume", "../run", "--steps", "2"]);
    assert_ok(&run(&mut c));
    let mut c = common::ddpm_bare(&elsewhere);
    c.args([
        "eval",
        "--quiet",
        "--checkpoint",
        "../run",
        "--nll",
        "--limit",
        "2",
    ]);
    assert_ok(&run(&mut c));

    // The images moved: `--resume` takes the folder's new path (and records the change); it
    // refuses another kind of data set by name.
    std::fs::rename(dir.path().join("imgs"), dir.path().join("moved")).unwrap();
    let mut c = common::ddpm_bare(&elsewhere);
    c.args(["train", "--quiet", "--resume", "../run", "--steps", "3"]);
    assert_one_clean_error(&run(&mut c), "does not exist");
    let mut c = common::ddpm_bare(&elsewhere);
    c.args(["train", "--quiet", "--resume", "../run", "--steps", "3"])
        .args(["--dataset", "folder:../moved"]);
    assert_ok(&run(&mut c));
    let history = std::fs::read_to_string(dir.path().join("run/history.jsonl")).unwrap();
    assert!(
        history.contains(r#""key":"dataset""#) && history.contains("moved"),
        "{history}"
    );
    let mut c = common::ddpm_bare(&elsewhere);
    c.args(["train", "--quiet", "--resume", "../run", "--steps", "4"])
        .args(["--dataset", "mnist"]);
    assert_one_clean_error(&run(&mut c), "cannot switch it to mnist");
}

/// Smaller points: `--lr -1` was read as an unknown flag (it needed `--lr=-1`); now the value
/// reaches the optimizer's check, which also refuses a negative `weight_decay` and a zero `eps`.
#[test]
fn negative_numbers_are_values_and_optimizer_settings_are_checked() {
    let _row = common::AttackRow("--lr -1, weight_decay, eps");
    let dir = tempfile::tempdir().unwrap();
    let o = train(dir.path(), "runs/lr", &["--lr", "-1"]);
    assert_one_clean_error(&o, "`[optimizer] lr` = -1 must be finite and > 0");
    for (toml, needle) in [
        (
            "weight_decay = -1e30",
            "`[optimizer] weight_decay` = -1e30 must be finite and >= 0",
        ),
        ("eps = 0", "`[optimizer] eps` = 0 must be finite and > 0"),
        (
            "beta2 = 1.0",
            "`[optimizer] beta2` = 1 must be finite and in [0, 1)",
        ),
    ] {
        let cfg = dir.path().join("opt.toml");
        std::fs::write(&cfg, format!("[optimizer]\n{toml}\n")).unwrap();
        let o = train(dir.path(), "runs/opt", &["--config", cfg.to_str().unwrap()]);
        assert_one_clean_error(&o, needle);
    }
}

/// Smaller points: a section with one key (`[optimizer] beta1 = 0.8`) failed with "missing field
/// `lr`" and a multi-line caret message. Partial sections keep the defaults, and a TOML error is
/// one line naming the file, the line, the key and its table.
#[test]
fn partial_sections_work_and_toml_errors_are_one_line() {
    let _row = common::AttackRow("partial TOML sections, TOML errors");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("partial.toml");
    std::fs::write(
        &cfg,
        "steps = 1\nsample_every = 0\n\n[optimizer]\nbeta1 = 0.8\n\n[data]\nimage_size = 8\n",
    )
    .unwrap();
    let o = train(
        dir.path(),
        "runs/partial",
        &["--config", cfg.to_str().unwrap()],
    );
    assert_ok(&o);
    let saved = std::fs::read_to_string(dir.path().join("runs/partial/config.toml")).unwrap();
    assert!(
        saved.contains("beta1 = 0.8") && saved.contains("lr = 0.001"),
        "{saved}"
    );
    std::fs::write(&cfg, "steps = 1\n\n[optimizer]\nlr = \"fast\"\n").unwrap();
    let o = train(dir.path(), "runs/bad", &["--config", cfg.to_str().unwrap()]);
    assert_one_clean_error(
        &o,
        "partial.toml line 4, key `lr` in [optimizer]: invalid type",
    );
    let err = stderr(&o);
    assert!(!err.contains('^') && !err.contains(" | "), "{err}");
}

/// Smaller points: a corrupt image's error said "pass skip_corrupt", a config key and no flag.
/// It now says where the key goes.
#[test]
fn a_decode_error_says_where_skip_corrupt_goes() {
    let _row = common::AttackRow("decode error advice (skip_corrupt)");
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("imgs/a");
    std::fs::create_dir_all(&class).unwrap();
    let daisy = common::fixtures().join("flowers/daisy");
    for entry in std::fs::read_dir(daisy).unwrap().take(4) {
        let path = entry.unwrap().path();
        std::fs::copy(&path, class.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(class.join("broken.png"), b"not a png at all").unwrap();
    let o = train(
        dir.path(),
        "runs/corrupt",
        &[
            "--dataset",
            "folder:imgs",
            "--image-size",
            "8",
            "--test-fraction",
            "0",
        ],
    );
    assert_one_clean_error(&o, "set `skip_corrupt = true` under `[data]` in the config");
}

/// Smaller points: `sample --out x.jpg` wrote PNG bytes and `--batch-size 0` was accepted. The
/// grid is written in the format its extension names (others are refused) and a zero batch is
/// refused.
#[test]
fn sample_writes_the_format_its_name_says_and_refuses_a_zero_batch() {
    let _row = common::AttackRow("sample --out x.jpg, --batch-size 0");
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&two_step_run(dir.path()));
    assert_ok(&sample_t2(dir.path(), &["--out", "grid.jpg"]));
    let bytes = std::fs::read(dir.path().join("grid.jpg")).unwrap();
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "not a JPEG");
    assert_ok(&sample_t2(dir.path(), &["--out", "grid.png"]));
    let bytes = std::fs::read(dir.path().join("grid.png")).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    assert_one_clean_error(
        &sample_t2(dir.path(), &["--out", "grid.bmp"]),
        "`.bmp` is not an image format this program writes",
    );
    assert!(!dir.path().join("grid.bmp").exists());
    assert_one_clean_error(
        &sample_t2(dir.path(), &["--batch-size", "0"]),
        "--batch-size must be at least 1",
    );
}

/// Smaller points: SIGUSR1 ends a run at once (its default action), leaving its lock file. The
/// next `--resume` sees that the lock's process is gone and takes the lock over; SIGHUP, like
/// SIGTERM, finishes the step, writes a checkpoint and releases the lock.
#[cfg(unix)]
#[test]
fn a_run_killed_by_sigusr1_resumes_and_sighup_stops_cleanly() {
    let _row = common::AttackRow("SIGUSR1 / SIGHUP");
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("long.toml");
    std::fs::write(
        &cfg,
        "steps = 100000\ncheckpoint_every = 1\nsample_every = 0\nbatch_size = 4\n\n[data]\nimage_size = 8\n",
    )
    .unwrap();
    for (signal, run_dir) in [(libc::SIGUSR1, "runs/usr1"), (libc::SIGHUP, "runs/hup")] {
        let mut c = ddpm(dir.path());
        c.args(["train", "--quiet", "--out", run_dir, "--config"])
            .arg(&cfg)
            .stderr(Stdio::null());
        // Killed if the test fails before the signal ends it.
        struct Guard(std::process::Child);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Guard(c.spawn().unwrap());
        let run_path = dir.path().join(run_dir);
        common::wait_for(
            "a first checkpoint",
            std::time::Duration::from_secs(120),
            || ddpm_train::checkpoint::list(&run_path).is_ok_and(|l| !l.is_empty()),
        );
        // SAFETY: signalling the child this test started and has not reaped.
        unsafe { libc::kill(child.0.id() as libc::pid_t, signal) };
        child.0.wait().unwrap();
        let lock = dir.path().join(run_dir).join(".lock");
        assert_eq!(lock.exists(), signal == libc::SIGUSR1, "{run_dir}");
        // Resumed to one step more than it reached: it trains that step and ends.
        let reached = ddpm_train::checkpoint::list(&run_path)
            .unwrap()
            .last()
            .map_or(0, |(step, _)| *step);
        let mut c = ddpm(dir.path());
        c.args(["train", "--quiet", "--resume", run_dir, "--steps"])
            .arg((reached + 1).to_string());
        let o = run(&mut c);
        assert_ok(&o);
        if signal == libc::SIGUSR1 {
            assert!(
                stderr(&o).contains("taking over the stale lock"),
                "{}",
                stderr(&o)
            );
        }
    }
}

/// A new run into a directory that holds another run's files but no checkpoint (a user's own
/// `config.toml` placed there, or a run stopped before its first checkpoint) replaced them. It is
/// refused with the files named, and every byte of them is kept.
#[test]
fn a_new_run_never_replaces_files_in_its_directory() {
    let _row = common::AttackRow("train --config exp/config.toml --out exp");
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp");
    std::fs::create_dir_all(&exp).unwrap();
    let config =
        "# my experiment: keep this comment\nsteps = 1\nbatch_size = 2\nsample_every = 0\n";
    std::fs::write(exp.join("config.toml"), config).unwrap();
    std::fs::write(exp.join("metrics.jsonl"), "{\"mine\": 1}\n").unwrap();
    let mut c = ddpm(dir.path());
    c.args([
        "train",
        "--quiet",
        "--config",
        "exp/config.toml",
        "--out",
        "exp",
    ]);
    let o = run(&mut c);
    assert_one_clean_error(&o, "config.toml, metrics.jsonl");
    assert!(stderr(&o).contains("choose another output directory"));
    assert_eq!(
        std::fs::read_to_string(exp.join("config.toml")).unwrap(),
        config
    );
    assert_eq!(
        std::fs::read_to_string(exp.join("metrics.jsonl")).unwrap(),
        "{\"mine\": 1}\n"
    );
    // The same config from outside the directory, into a new one, trains.
    std::fs::rename(exp.join("config.toml"), dir.path().join("mine.toml")).unwrap();
    let mut c = ddpm(dir.path());
    c.args([
        "train",
        "--quiet",
        "--config",
        "mine.toml",
        "--out",
        "fresh",
    ]);
    assert_ok(&run(&mut c));
}

/// `[model] dim = 100000` passed the memory estimate (which counted data and activations only)
/// and aborted on a 320 GB allocation. The parameters' training state is counted now, and the
/// error names the model as what to shrink.
// The memory checks read MemAvailable from /proc/meminfo (Linux); elsewhere they are skipped.
#[cfg(target_os = "linux")]
#[test]
fn a_model_too_wide_for_memory_is_refused() {
    let _row = common::AttackRow("[model] dim = 100000");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wide.toml");
    std::fs::write(
        &cfg,
        "steps = 1\nbatch_size = 2\nsample_every = 0\n\n[model]\narch = \"unet\"\n\
         image_size = 28\nchannels = 1\ndim = 100000\ndim_mults = [1, 2, 4]\n\
         self_condition = false\nresnet_block_groups = 4\ninit_conv_kernel = 1\n\
         attn_heads = 4\nattn_dim_head = 32\n",
    )
    .unwrap();
    let mut c = ddpm(dir.path());
    c.args(["train", "--quiet", "--out", "runs/wide", "--config"])
        .arg(&cfg);
    let o = run(&mut c);
    assert_one_clean_error(&o, "choose a smaller model");
    assert!(stderr(&o).contains("parameters"), "{}", stderr(&o));
    assert!(!dir.path().join("runs/wide/config.toml").exists());
}

/// `ddpm forward --image-size 4096` decoded the whole split (MNIST's 8,000 images) at that size
/// until the allocator aborted. It now decodes only the `--num` images it draws, and a figure
/// that cannot fit is refused at once, naming the flag (at 65536 pixels the tiles of two images
/// in one column take about 400 GB, more than any test machine has).
// The memory checks read MemAvailable from /proc/meminfo (Linux); elsewhere they are skipped.
#[cfg(target_os = "linux")]
#[test]
fn a_forward_figure_that_cannot_fit_is_refused() {
    let _row = common::AttackRow("forward --image-size 65536");
    let dir = tempfile::tempdir().unwrap();
    let mut c = ddpm(dir.path());
    c.args([
        "forward",
        "--num",
        "2",
        "--image-size",
        "65536",
        "--timesteps",
        "0",
        "--out",
        "f.png",
    ]);
    let o = run(&mut c);
    assert_one_clean_error(&o, "lower --image-size (now 65536)");
    assert!(!dir.path().join("f.png").exists());
}

/// `ddpm sample --num 18446744073709551615` ran silently for as long as it was let, holding ever
/// more memory; an `--out-dir` that is a file failed only after sampling, naming no flag.
// The memory checks read MemAvailable from /proc/meminfo (Linux); elsewhere they are skipped.
#[cfg(target_os = "linux")]
#[test]
fn sample_refuses_a_num_that_cannot_fit_and_an_out_dir_that_is_a_file() {
    let _row = common::AttackRow("sample --num u64::MAX, --out-dir FILE");
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&two_step_run(dir.path()));
    let sample = |num: &str, extra: &[&str]| {
        let mut c = ddpm(dir.path());
        c.args(["sample", "--quiet", "--checkpoint", "runs/t2", "--num", num])
            .args(extra);
        run(&mut c)
    };
    for num in ["18446744073709551615", "100000000000"] {
        let o = sample(num, &["--out", "big.png"]);
        assert_one_clean_error(&o, &format!("--num {num}"));
        assert!(stderr(&o).contains("lower --num"), "{}", stderr(&o));
    }
    std::fs::write(dir.path().join("afile"), "mine").unwrap();
    let o = sample("2", &["--out", "s.png", "--out-dir", "afile"]);
    assert_one_clean_error(&o, "--out-dir afile is a file");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("afile")).unwrap(),
        "mine"
    );
    assert!(!dir.path().join("s.png").exists());
}

/// Outputs are what their names say, and nothing that is not ours is replaced: `forward --out
/// f.gif` wrote PNG bytes and `sample --gif a.png` GIF bytes; `train --out FILE` failed on
/// "listing FILE/checkpoints"; `eval --report` overwrote any file it was given (a run's
/// config.toml). Each is refused up front, the file untouched.
#[test]
fn outputs_are_what_their_names_say_and_foreign_files_are_kept() {
    let _row = common::AttackRow("--out f.gif, --gif a.png, --out FILE, --report config.toml");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let mut c = ddpm(p);
    c.args([
        "forward",
        "--num",
        "1",
        "--timesteps",
        "0",
        "--out",
        "f.gif",
    ]);
    assert_one_clean_error(&run(&mut c), "--out f.gif: this writes a PNG file");
    assert!(!p.join("f.gif").exists());

    assert_ok(&two_step_run(p));
    let o = sample_t2(p, &["--out", "s.png", "--gif", "a.png"]);
    assert_one_clean_error(&o, "--gif a.png: this writes a GIF file");
    assert!(!p.join("a.png").exists() && !p.join("s.png").exists());

    std::fs::write(p.join("afile"), "mine").unwrap();
    let o = train(p, "afile", &["--steps", "1"]);
    assert_one_clean_error(&o, "--out afile is a file");
    assert_eq!(std::fs::read_to_string(p.join("afile")).unwrap(), "mine");

    // `eval`'s outputs: the report must be named .json and may replace only an earlier report,
    // the PNGs only PNGs (they overwrote a checkpoint's files); a device is never read.
    let config = p.join("runs/t2/config.toml");
    let before = std::fs::read(&config).unwrap();
    std::fs::write(p.join("mine.json"), "{\"mine\": 1}").unwrap();
    std::fs::create_dir(p.join("dir.json")).unwrap();
    let ckpt_json = checkpoint_file(p, "json");
    let ckpt_before = std::fs::read(&ckpt_json).unwrap();
    let eval = |extra: &[&str]| {
        let mut c = ddpm(p);
        c.args(["eval", "--checkpoint", "runs/t2", "--limit", "2"])
            .args(extra);
        run(&mut c)
    };
    for (extra, needle) in [
        (
            &["--nll", "--report", "runs/t2/config.toml"][..],
            "--report runs/t2/config.toml: this writes a JSON file",
        ),
        (
            &["--nll", "--report", "mine.json"][..],
            "--report mine.json exists and is not an earlier output",
        ),
        (
            &["--nll", "--report", "dir.json"][..],
            "--report dir.json exists and is not a regular file",
        ),
        (
            &["--quality", "--report", "q.json", "--samples-png", "s.gif"][..],
            "--samples-png s.gif: this writes a PNG file",
        ),
    ] {
        assert_one_clean_error(&eval(extra), needle);
    }
    let ckpt = ckpt_json.display().to_string();
    let o = eval(&["--quality", "--report", "q.json", "--nearest-png", &ckpt]);
    assert_one_clean_error(&o, "this writes a PNG file");
    assert_eq!(std::fs::read(&config).unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(p.join("mine.json")).unwrap(),
        "{\"mine\": 1}"
    );
    assert_eq!(std::fs::read(&ckpt_json).unwrap(), ckpt_before);
}

/// `train --resume RUN --steps 1` on a run at step 2 exited 0 having trained nothing, and wrote
/// `steps = 1` into its config.toml. A total below the trained steps is refused, the config kept.
#[test]
fn a_resume_never_goes_back() {
    let _row = common::AttackRow("train --resume --steps below the run's step");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    assert_ok(&two_step_run(p));
    let config = p.join("runs/t2/config.toml");
    let before = std::fs::read(&config).unwrap();
    let mut c = ddpm(p);
    c.args(["train", "--quiet", "--resume", "runs/t2", "--steps", "0"]);
    assert_one_clean_error(&run(&mut c), "--steps 0 is fewer than the 1 steps");
    assert_eq!(std::fs::read(&config).unwrap(), before);
}

/// A weights file whose header gives a tensor another shape of the same size: with
/// `RUST_BACKTRACE=1` in the shell, candle's error carried a 20-line backtrace. The error is one
/// line whatever the environment says.
#[test]
fn errors_stay_one_line_under_rust_backtrace() {
    let _row = common::AttackRow("RUST_BACKTRACE=1 and a reshaped tensor");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    assert_ok(&two_step_run(p));
    let ckpt = checkpoint_file(p, "safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, len) = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("ema."))
        .find_map(|(k, v)| match v["shape"].as_array()?.as_slice() {
            [len] if len.as_u64()? % 2 == 0 => Some((k.clone(), len.as_u64()?)),
            _ => None,
        })
        .expect("a 1-D EMA tensor of even length");
    header[&name]["shape"] = serde_json::json!([2, len / 2]);
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(p.join("reshaped.safetensors"), out).unwrap();
    let mut c = ddpm(p);
    c.args([
        "sample",
        "--quiet",
        "--checkpoint",
        "reshaped.safetensors",
        "--num",
        "1",
        "--out",
        "s.png",
    ])
    .env("RUST_BACKTRACE", "1")
    .env_remove("RUST_LIB_BACKTRACE");
    let o = run(&mut c);
    assert_one_clean_error(&o, "shape");
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert!(
        lines.len() <= 2 && !err.contains("backtrace"),
        "more than the error line: {err}"
    );
}

/// A misspelled key in `[data]`, `[sampler]`, `[schedule]`, its `beta_schedule` or `[loss]` was
/// ignored without a word (`[data] flipp = true` trained without flips); the top level and
/// `[optimizer]` already refused them. Every section now names the key and what it expected.
#[test]
fn misspelled_keys_are_refused_in_every_section() {
    let _row = common::AttackRow("misspelled keys in config sections");
    let dir = tempfile::tempdir().unwrap();
    for (section, needle) in [
        ("[data]\nflipp = true\n", "`flipp`"),
        ("[sampler]\nkind = \"ddim\"\nstepz = 5\n", "`stepz`"),
        ("[schedule]\ntimestepz = 10\n", "`timestepz`"),
        (
            "[schedule.beta_schedule]\nkind = \"linear\"\nstrat = 0.1\n",
            "`strat`",
        ),
        ("[loss]\nkind = \"huber\"\ndelat = 0.5\n", "`delat`"),
        ("[loss]\nkind = \"l2\"\ndelat = 0.5\n", "`delat`"),
        ("[loss]\nweigting = { kind = \"min_snr\" }\n", "`weigting`"),
        (
            "[loss]\nkind = \"l2\"\nweighting = { kind = \"min_snr\", gama = 5.0 }\n",
            "`gama`",
        ),
    ] {
        let cfg = dir.path().join("typo.toml");
        std::fs::write(
            &cfg,
            format!("steps = 1\nbatch_size = 2\nsample_every = 0\n{section}"),
        )
        .unwrap();
        let mut c = ddpm(dir.path());
        c.args(["train", "--quiet", "--out", "runs/typo", "--config"])
            .arg(&cfg);
        assert_one_clean_error(&run(&mut c), needle);
        assert!(!dir.path().join("runs/typo/config.toml").exists());
    }
}

/// A file of `runs/t2`'s checkpoints (made by [`two_step_run`]) with the extension `ext`.
fn checkpoint_file(p: &Path, ext: &str) -> PathBuf {
    std::fs::read_dir(p.join("runs/t2/checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| f.extension().is_some_and(|e| e == ext))
        .unwrap_or_else(|| panic!("no .{ext} file among runs/t2's checkpoints"))
}
