//! Reliability attacks on the real `ddpm` binary and real MNIST images (the committed fixture;
//! the interrupted fetch needs the real files and runs in `cargo xtask test-real`), the
//! way machines fail: `kill -9` at random moments (many times, during checkpoint writes too), a
//! disk that fills up, read-only and missing directories, two runs in one directory, two samplers
//! on one checkpoint, and a data fetch killed half-way.
//!
//! Every attack is seeded (`DDPM_RELIABILITY_SEED`, printed on failure) so a failure replays.
//! `DDPM_RELIABILITY_QUICK=1` makes the loops short (CI); `DDPM_RELIABILITY_REPORT=FILE` appends
//! one JSON line per attack (`attack`, `runs`, `failures`, `data_lost`, `note`), which
//! `cargo xtask reliability` prints as a table. docs/reliability.md lists the promises these
//! tests check.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use ddpm_train::checkpoint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::{
    clean_error, ddpm, ddpm_bare, real_data, run, stderr, tensors, train_new, wait_for,
    write_config,
};

// ---------------------------------------------------------------------------------------------
// Harness

fn quick() -> bool {
    std::env::var("DDPM_RELIABILITY_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The seed of an attack: `DDPM_RELIABILITY_SEED` (default 2024) mixed with the attack's name.
fn rng(attack: &str) -> (ChaCha8Rng, u64) {
    let base: u64 = std::env::var("DDPM_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2024);
    let mix = attack
        .bytes()
        .fold(base, |h, b| h.rotate_left(5) ^ u64::from(b));
    (ChaCha8Rng::seed_from_u64(mix), base)
}

/// Counts what an attack did and what went wrong, then reports and asserts.
struct Tally {
    attack: &'static str,
    seed: u64,
    runs: usize,
    failures: Vec<String>,
    data_lost: usize,
    notes: Vec<String>,
}

impl Tally {
    fn new(attack: &'static str, seed: u64) -> Self {
        Tally {
            attack,
            seed,
            runs: 0,
            failures: Vec::new(),
            data_lost: 0,
            notes: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("[{}] FAILURE: {w}", self.attack);
            self.failures.push(w);
        }
    }

    fn lost(&mut self, what: String) {
        eprintln!("[{}] DATA LOST: {what}", self.attack);
        self.data_lost += 1;
        self.failures.push(what);
    }

    fn skip(attack: &'static str, why: &str) {
        eprintln!("[{attack}] skipped: {why}");
        report(attack, 0, 0, 0, &format!("skipped: {why}"));
    }

    /// Appends the report line, then fails the test if anything went wrong.
    fn finish(self) {
        let note = self.notes.join("; ");
        report(
            self.attack,
            self.runs,
            self.failures.len(),
            self.data_lost,
            &note,
        );
        assert!(
            self.failures.is_empty() && self.data_lost == 0,
            "{} (seed {}): {} failures, {} data lost: {:#?}",
            self.attack,
            self.seed,
            self.failures.len(),
            self.data_lost,
            self.failures
        );
    }
}

fn report(attack: &str, runs: usize, failures: usize, data_lost: usize, note: &str) {
    let Ok(path) = std::env::var("DDPM_RELIABILITY_REPORT") else {
        return;
    };
    let line = serde_json::json!({
        "attack": attack,
        "runs": runs,
        "failures": failures,
        "data_lost": data_lost,
        "note": note,
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted for the duration of a test (root only), unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "ddpm-reliability"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir: dir.into() })
    }

    fn remount(&self, options: &str) -> bool {
        Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn train_resume(dir: &Path, run_dir: &str) -> Command {
    let mut c = ddpm(dir);
    c.args(["train", "--quiet", "--resume", run_dir]);
    c
}

fn sample(dir: &Path, checkpoint: &str, seed: u64, out: &str) -> Command {
    let mut c = ddpm(dir);
    c.args([
        "sample",
        "--quiet",
        "--checkpoint",
        checkpoint,
        "--num",
        "4",
    ])
    .args(["--sampler", "ddpm", "--steps", "6", "--seed"])
    .arg(seed.to_string())
    .args(["--out", out]);
    c
}

/// Steps of the complete checkpoints (those with a JSON) of a run, sorted.
fn checkpoints(run: &Path) -> Vec<usize> {
    checkpoint::list(run)
        .unwrap_or_default()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

/// Loads every complete checkpoint of a run; returns the steps that do not load, with why.
fn unloadable(run: &Path) -> Vec<String> {
    checkpoint::list(run)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(step, json)| {
            checkpoint::load(&json, &Device::Cpu)
                .err()
                .map(|e| format!("checkpoint {step}: {e}"))
        })
        .collect()
}

fn tensors_of(run: &Path, step: usize) -> Vec<(String, Vec<u8>)> {
    tensors(&run.join(format!("checkpoints/ckpt-{step:08}.safetensors")))
}

fn kill9(child: &mut Child) {
    // SAFETY: sending a signal to our own (not yet reaped) child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
}

/// Temporary files (`.ddpm-PID-N.tmp`, `ddpm_fs::temporary_name`) in a directory.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".ddpm-") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Crash loop

/// A run killed while pruning after its last checkpoint (the older checkpoint's JSON removed,
/// its tensors not yet) is never pruned again, since resuming it saves nothing: the resume
/// itself removes the orphan tensors, and leaves the complete checkpoints as they were. (The
/// crash loop below found this at random, one run in six.)
#[test]
fn resuming_a_finished_run_removes_orphan_tensors() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, 6, 2, 2);
    let o = run(&mut train_new(p, "run", &cfg));
    assert!(o.status.success(), "training: {}", stderr(&o));
    let run_dir = p.join("run");
    let ckpts = run_dir.join("checkpoints");
    assert_eq!(checkpoints(&run_dir), [4, 6]);
    let before = tensors_of(&run_dir, 6);
    let orphan = ckpts.join("ckpt-00000002.safetensors");
    std::fs::copy(ckpts.join("ckpt-00000004.safetensors"), &orphan).expect("copy");
    let o = run(&mut train_resume(p, "run"));
    assert!(o.status.success(), "resume: {}", stderr(&o));
    assert!(!orphan.exists(), "the orphan tensors outlived the resume");
    assert_eq!(checkpoints(&run_dir), [4, 6]);
    assert_eq!(std::fs::read_dir(&ckpts).expect("list").count(), 4);
    assert!(
        tensors_of(&run_dir, 6) == before,
        "the newest checkpoint changed"
    );
}

#[test]
fn crash_loop_kill_9_at_random_moments_then_resume_to_the_same_weights() {
    let attack = "crash loop (SIGKILL + resume)";
    let (mut rng, seed) = rng(attack);
    let mut tally = Tally::new(attack, seed);
    let (steps, kills) = if quick() { (16, 8) } else { (60, 30) };
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, steps, 2, 3);

    // The uninterrupted reference run (it also fetches the data from the mirror).
    let start = Instant::now();
    let o = run(&mut train_new(p, "straight", &cfg));
    assert!(o.status.success(), "reference run: {}", stderr(&o));
    let run_ms = start.elapsed().as_millis().max(200) as u64;
    let reference = tensors_of(&p.join("straight"), steps);

    let run_dir = p.join("run");
    let ckpt_dir = run_dir.join("checkpoints");
    let (mut newest, mut during_write, mut completed) = (0usize, 0usize, false);
    for i in 0..kills {
        let mut cmd = if checkpoints(&run_dir).is_empty() {
            train_new(p, "run", &cfg)
        } else {
            train_resume(p, "run")
        };
        let mut child = cmd.stderr(Stdio::null()).spawn().expect("spawn ddpm train");
        let pid = child.id();
        let aim_at_write = i % 2 == 1;
        let deadline = Instant::now()
            + if aim_at_write {
                Duration::from_millis(3 * run_ms)
            } else {
                Duration::from_millis(rng.random_range(0..run_ms / 4))
            };
        // Odd rounds: kill as soon as this process has a checkpoint file half-written.
        let tmp_prefix = format!(".ddpm-{pid}-");
        let mut exited = None;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            if aim_at_write
                && temp_files(&ckpt_dir)
                    .iter()
                    .any(|n| n.starts_with(&tmp_prefix))
            {
                if rng.random_bool(0.5) {
                    std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
                }
                break;
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        if exited.is_none() {
            kill9(&mut child);
        }
        let status = child.wait().expect("wait");
        tally.runs += 1;
        if exited.is_some() || status.success() {
            tally.check(status.success(), || format!("round {i}: exit {status}"));
            completed = status.success();
            break;
        }
        if temp_files(&ckpt_dir)
            .iter()
            .any(|n| n.starts_with(&tmp_prefix))
        {
            during_write += 1;
        }
        for e in unloadable(&run_dir) {
            tally.lost(format!("after kill {i}: {e}"));
        }
        let now = checkpoints(&run_dir).last().copied().unwrap_or(0);
        if now < newest {
            tally.lost(format!(
                "after kill {i}: newest checkpoint went back from step {newest} to {now}"
            ));
        }
        newest = newest.max(now);
    }
    if !completed {
        // Every kill may have landed before the first checkpoint: then the run starts afresh.
        let mut cmd = if checkpoints(&run_dir).is_empty() {
            train_new(p, "run", &cfg)
        } else {
            train_resume(p, "run")
        };
        let o = run(&mut cmd);
        tally.check(o.status.success(), || {
            format!("final resume: {}", stderr(&o))
        });
    }
    tally.check(checkpoints(&run_dir).last() == Some(&steps), || {
        format!(
            "run did not reach step {steps}: {:?}",
            checkpoints(&run_dir)
        )
    });
    for e in unloadable(&run_dir) {
        tally.lost(e);
    }
    if checkpoints(&run_dir).last() == Some(&steps) {
        let got = tensors_of(&run_dir, steps);
        let same = got.len() == reference.len() && got.iter().zip(&reference).all(|(a, b)| a == b);
        tally.check(same, || {
            "final weights, EMA and optimizer state differ from the uninterrupted run's".into()
        });
    }
    // Nothing is left behind: no lock, no half-written files, no orphan tensors.
    tally.check(!run_dir.join(".lock").exists(), || {
        "the lock file outlived the run".into()
    });
    let mut stray = temp_files(&run_dir);
    stray.extend(temp_files(&ckpt_dir));
    tally.check(stray.is_empty(), || format!("leftover files: {stray:?}"));
    let mut names: Vec<String> = std::fs::read_dir(&ckpt_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    tally.check(names.len() == 2 * checkpoints(&run_dir).len(), || {
        format!(
            "{} files for {:?}: {names:?}",
            names.len(),
            checkpoints(&run_dir)
        )
    });
    tally.notes.push(format!(
        "{} kills, {during_write} during a checkpoint write; final weights bit-equal",
        tally.runs - usize::from(completed)
    ));
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Full disk

#[test]
fn a_full_disk_stops_the_run_cleanly_and_keeps_the_previous_checkpoint() {
    let attack = "full disk during a checkpoint write";
    let (_, seed) = rng(attack);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // Measure one checkpoint of the tiny model on the ordinary disk.
    let cfg = write_config(p, 1, 1, 100);
    let o = run(&mut train_new(p, "probe", &cfg));
    assert!(o.status.success(), "probe run: {}", stderr(&o));
    let ckpt_bytes: u64 = std::fs::read_dir(p.join("probe/checkpoints"))
        .expect("checkpoints")
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum();
    // Room for the run's small files and two and a half checkpoints: the third write fills it.
    let size_kb = (ckpt_bytes * 5 / 2 + 96 * 1024) / 1024;
    let disk = p.join("disk");
    let mount = match Tmpfs::mount(&disk, &format!("size={size_kb}k")) {
        Ok(m) => m,
        Err(why) => return Tally::skip(attack, &why),
    };
    let mut tally = Tally::new(attack, seed);
    let cfg = write_config(p, 40, 1, 100);
    let o = run(&mut train_new(p, "disk/run", &cfg));
    tally.runs += 1;
    match clean_error(&o) {
        Ok(line) => tally.check(line.contains("No space left"), || {
            format!("the error does not say the disk is full: {line}")
        }),
        Err(e) => tally.check(false, || e),
    }
    let run_dir = disk.join("run");
    let kept = checkpoints(&run_dir);
    tally.check(!kept.is_empty(), || "no checkpoint survived".into());
    for e in unloadable(&run_dir) {
        tally.lost(e);
    }
    let stray = temp_files(&run_dir.join("checkpoints"));
    tally.check(stray.is_empty(), || {
        format!("half-written files fill the disk: {stray:?}")
    });
    // The newest checkpoint samples, and with room again the run resumes and finishes.
    let o = run(&mut sample(p, "disk/run", 1, "s.png"));
    tally.check(o.status.success(), || {
        format!("sampling the kept checkpoint: {}", stderr(&o))
    });
    if mount.remount("size=64m") {
        let o = run(&mut train_resume(p, "disk/run"));
        tally.runs += 1;
        tally.check(o.status.success(), || {
            format!("resuming with room: {}", stderr(&o))
        });
        tally.check(checkpoints(&run_dir).last() == Some(&40), || {
            format!("resumed run stopped at {:?}", checkpoints(&run_dir))
        });
    }
    tally.notes.push(format!(
        "{size_kb} KiB tmpfs, checkpoints {kept:?} kept and loadable"
    ));
    drop(mount);
    tally.finish();
}

/// `ddpm sample` onto a full disk: the error is one line saying so, a grid written before at the
/// same path is kept byte for byte, and no empty or partial image (nor a temporary file) is left.
#[test]
fn a_full_disk_while_sampling_keeps_the_earlier_images_and_leaves_no_empty_ones() {
    let attack = "full disk while sampling";
    let (_, seed) = rng(attack);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, 2, 2, 100);
    let o = run(&mut train_new(p, "run", &cfg));
    assert!(o.status.success(), "training: {}", stderr(&o));
    let disk = p.join("disk");
    let mount = match Tmpfs::mount(&disk, "size=64k") {
        Ok(m) => m,
        Err(why) => return Tally::skip(attack, &why),
    };
    let mut tally = Tally::new(attack, seed);
    let o = run(&mut sample(p, "run", seed, "disk/s.png"));
    tally.runs += 1;
    tally.check(o.status.success(), || format!("first grid: {}", stderr(&o)));
    let before = std::fs::read(disk.join("s.png")).unwrap_or_default();
    // Fill what is left of the disk.
    let mut fill = std::fs::File::create(disk.join("fill")).expect("fill");
    let _ = std::io::Write::write_all(&mut fill, &vec![0u8; 1 << 20]);
    drop(fill);
    let full = |args: &[&str]| {
        let mut c = ddpm(p);
        c.args(["sample", "--quiet", "--checkpoint", "run", "--num", "16"])
            .args(["--sampler", "ddpm", "--steps", "6", "--seed", "9"])
            .args(args);
        run(&mut c)
    };
    for args in [
        &["--out", "disk/s.png"][..],
        &["--out", "disk/s.jpg"],
        &["--out", "t.png", "--out-dir", "disk/each"],
        &["--out", "g.png", "--gif", "disk/r.gif"],
    ] {
        let o = full(args);
        tally.runs += 1;
        match clean_error(&o) {
            Ok(line) => {
                tally.check(line.contains("No space left"), || {
                    format!("{args:?}: the error does not say the disk is full: {line}")
                });
                tally.check(line.matches("disk/").count() == 1, || {
                    format!("{args:?}: the error should name the file once: {line}")
                });
            }
            Err(e) => tally.check(false, || format!("{args:?}: {e}")),
        }
    }
    let after = std::fs::read(disk.join("s.png")).unwrap_or_default();
    if after != before {
        tally.lost(format!(
            "the earlier grid changed ({} bytes, then {})",
            before.len(),
            after.len()
        ));
    }
    let mut left: Vec<String> = Vec::new();
    for d in [disk.clone(), disk.join("each")] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "s.png" && name != "fill" && name != "each" {
                left.push(name);
            }
        }
    }
    tally.check(left.is_empty(), || {
        format!("files left behind on the full disk: {left:?}")
    });
    drop(mount);
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Read-only and missing directories

#[test]
fn read_only_and_missing_directories_give_clear_errors() {
    let attack = "read-only / missing output dir";
    let (_, seed) = rng(attack);
    let mut tally = Tally::new(attack, seed);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, 2, 2, 3);

    // A missing output directory (several levels) is created.
    let o = run(&mut train_new(p, "missing/deeper/run", &cfg));
    tally.runs += 1;
    tally.check(o.status.success(), || {
        format!("training into a missing dir: {}", stderr(&o))
    });
    // A missing directory for a sample grid is a clear error.
    let o = run(&mut sample(
        p,
        "missing/deeper/run",
        1,
        "no/such/dir/grid.png",
    ));
    tally.runs += 1;
    if let Err(e) = clean_error(&o).and_then(|l| {
        l.contains("no/such/dir")
            .then_some(())
            .ok_or(format!("path not named: {l}"))
    }) {
        tally.check(false, || e);
    }

    // A read-only directory holding a finished run: a read-only tmpfs as root, else chmod.
    let ro = p.join("ro");
    let mount = Tmpfs::mount(&ro, "size=16m").ok();
    let o = run(&mut train_new(p, "ro/run", &cfg));
    assert!(o.status.success(), "{}", stderr(&o));
    let read_only = match &mount {
        Some(m) => m.remount("ro"),
        None => {
            use std::os::unix::fs::PermissionsExt;
            for d in [ro.join("run/checkpoints"), ro.join("run"), ro.clone()] {
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555));
            }
            // Root ignores permission bits: then there is nothing to test without a mount.
            std::fs::write(ro.join("probe"), b"x").is_err()
        }
    };
    if !read_only {
        tally
            .notes
            .push("read-only part skipped (cannot make a read-only dir)".into());
    } else {
        tally.notes.push(
            if mount.is_some() {
                "read-only tmpfs"
            } else {
                "chmod 555"
            }
            .into(),
        );
        // Reading works: sampling from the read-only run.
        let o = run(&mut sample(p, "ro/run", 1, "grid.png"));
        tally.runs += 1;
        tally.check(o.status.success(), || {
            format!("sampling from a read-only run: {}", stderr(&o))
        });
        // Writing is refused with a clear error naming the directory.
        for (what, mut cmd) in [
            ("new run", train_new(p, "ro/new", &cfg)),
            ("resume", {
                let mut c = train_resume(p, "ro/run");
                c.args(["--steps", "4"]);
                c
            }),
            ("sample grid", sample(p, "ro/run", 1, "ro/grid.png")),
        ] {
            let o = run(&mut cmd);
            tally.runs += 1;
            match clean_error(&o) {
                Ok(line) => tally.check(
                    line.contains("ro/")
                        && (line.contains("Read-only") || line.contains("ermission")),
                    || format!("{what}: unclear error: {line}"),
                ),
                Err(e) => tally.check(false, || format!("{what}: {e}")),
            }
        }
        for e in unloadable(&ro.join("run")) {
            tally.lost(e);
        }
    }
    if mount.is_none() {
        use std::os::unix::fs::PermissionsExt;
        for d in [ro.clone(), ro.join("run"), ro.join("run/checkpoints")] {
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
        }
    }
    drop(mount);
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Run-directory lock

#[test]
fn a_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over() {
    let attack = "two runs in one directory (lock)";
    let (_, seed) = rng(attack);
    let mut tally = Tally::new(attack, seed);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let run_dir = p.join("run");
    // A long run that writes no checkpoint for a while.
    let long = write_config(p, 100_000, 100_000, 3);
    let mut first = train_new(p, "run", &long)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    wait_for("the first run to train", Duration::from_secs(120), || {
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 2)
    });
    let config_before = std::fs::read(run_dir.join("config.toml")).expect("config.toml");
    let short = p.join("short.toml");
    std::fs::copy(write_config(p, 2, 1, 3), &short).expect("copy");
    let o = run(&mut train_new(p, "run", &short));
    tally.runs += 1;
    match clean_error(&o) {
        Ok(line) => tally.check(
            line.contains(&format!("pid {}", first.id())) && line.contains("in use"),
            || format!("the error does not name the owner: {line}"),
        ),
        Err(e) => tally.check(false, || e),
    }
    tally.check(
        std::fs::read(run_dir.join("config.toml")).ok() == Some(config_before),
        || "the refused run overwrote the live run's config.toml".into(),
    );
    // The owner dies without cleaning up: its lock is stale and is taken over with a warning.
    kill9(&mut first);
    let _ = first.wait();
    tally.check(run_dir.join(".lock").exists(), || {
        "expected a stale lock after kill -9".into()
    });
    let o = run(&mut train_new(p, "run", &short));
    tally.runs += 1;
    tally.check(o.status.success(), || {
        format!("taking over a stale lock: {}", stderr(&o))
    });
    tally.check(stderr(&o).contains("stale lock"), || {
        format!("no warning about the stale lock: {}", stderr(&o))
    });
    tally.check(checkpoints(&run_dir) == vec![1, 2], || {
        format!("checkpoints {:?}", checkpoints(&run_dir))
    });
    tally.check(!run_dir.join(".lock").exists(), || {
        "the lock outlived its run".into()
    });
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Concurrent readers

#[test]
fn two_samplers_on_one_checkpoint_agree() {
    let attack = "two `ddpm sample` on one checkpoint";
    let (mut rng, seed) = rng(attack);
    let mut tally = Tally::new(attack, seed);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = write_config(p, 4, 4, 3);
    let o = run(&mut train_new(p, "run", &cfg));
    assert!(o.status.success(), "{}", stderr(&o));
    let rounds = if quick() { 2 } else { 5 };
    for r in 0..rounds {
        let s: u64 = rng.random_range(0..1_000_000);
        let a = sample(p, "run", s, &format!("a{r}.png"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let b = sample(p, "run", s, &format!("b{r}.png"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (oa, ob) = (
            a.wait_with_output().expect("wait"),
            b.wait_with_output().expect("wait"),
        );
        tally.runs += 2;
        tally.check(oa.status.success() && ob.status.success(), || {
            format!("seed {s}: {} / {}", stderr(&oa), stderr(&ob))
        });
        let (fa, fb) = (
            std::fs::read(p.join(format!("a{r}.png"))).ok(),
            std::fs::read(p.join(format!("b{r}.png"))).ok(),
        );
        tally.check(fa.is_some() && fa == fb, || {
            format!("seed {s}: the two processes wrote different images")
        });
    }
    for e in unloadable(&p.join("run")) {
        tally.lost(e);
    }
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// Interrupted data fetch

/// Serves the files under `root` over HTTP on 127.0.0.1, slowly (so a kill lands mid-transfer),
/// honouring `Range: bytes=N-`.
fn slow_server(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &root);
            });
        }
    });
    base
}

fn serve(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value
                    .trim()
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-')
                    .parse::<usize>()
                    .ok();
            }
        }
    }
    let Ok(body) = std::fs::read(root.join(path.trim_start_matches('/'))) else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let start = range.unwrap_or(0).min(body.len());
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        },
        body.len() - start
    );
    if range.is_some() {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            body.len().saturating_sub(1),
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    for chunk in body[start..].chunks(32 * 1024) {
        stream.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(4));
    }
    stream.flush()
}

#[test]
#[ignore = "real data (MNIST's checksum-pinned files): run with cargo xtask test-real"]
fn an_interrupted_fetch_never_leaves_a_verified_but_incomplete_data_set() {
    let attack = "fetch-data killed and rerun";
    let (mut rng, seed) = rng(attack);
    let mut tally = Tally::new(attack, seed);
    let mirror = real_data;
    let base = slow_server(mirror());
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let data = p.join("data");
    let files: Vec<&str> = ddpm_data::fetch::MNIST_FILES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| mirror().join("mnist").join(n).exists())
        .collect();
    // `ddpm forward` fetches MNIST when it is missing (the same library path as
    // `cargo xtask fetch-data`), then draws one image.
    let fetch = || {
        let mut c = ddpm_bare(p);
        c.env("DDPM_DATA_MIRROR", &base).args([
            "forward",
            "--num",
            "1",
            "--timesteps",
            "0",
            "--out",
            "f.png",
        ]);
        c
    };
    // Time one whole fetch, to aim the kills inside it.
    let start = Instant::now();
    let o = run(&mut fetch());
    assert!(o.status.success(), "{}", stderr(&o));
    let full_ms = start.elapsed().as_millis().max(50) as u64;
    let verify = |tally: &mut Tally, when: &str| {
        if !ddpm_data::fetch::is_fetched(&ddpm_data::DatasetSpec::Mnist, &data) {
            return false;
        }
        for f in &files {
            let got = std::fs::read(data.join("mnist").join(f)).ok();
            let want = std::fs::read(mirror().join("mnist").join(f)).ok();
            if got != want {
                tally.lost(format!(
                    "{when}: {f} passes the marker check but differs from the mirror"
                ));
            }
        }
        if let Err(e) = ddpm_data::mnist::load(&data.join("mnist"), ddpm_data::Split::All) {
            tally.lost(format!("{when}: the fetched set does not load: {e}"));
        }
        true
    };
    let rounds = if quick() { 4 } else { 12 };
    for r in 0..rounds {
        let _ = std::fs::remove_dir_all(&data);
        // Kill once or twice per round, then rerun to completion.
        for k in 0..rng.random_range(1..=2) {
            let mut child = fetch().stderr(Stdio::null()).spawn().expect("spawn");
            std::thread::sleep(Duration::from_millis(rng.random_range(0..full_ms)));
            kill9(&mut child);
            let _ = child.wait();
            tally.runs += 1;
            verify(&mut tally, &format!("round {r}, after kill {k}"));
        }
        let o = run(&mut fetch());
        tally.runs += 1;
        tally.check(o.status.success(), || {
            format!("round {r}: rerun after kills: {}", stderr(&o))
        });
        let verified = verify(&mut tally, &format!("round {r}, rerun"));
        tally.check(verified, || {
            format!("round {r}: the rerun left no verified data set")
        });
    }
    tally
        .notes
        .push(format!("one clean fetch takes {full_ms} ms"));
    tally.finish();
}
