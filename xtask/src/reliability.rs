//! `cargo xtask reliability`: every reliability attack in bounded time, and a table of what it
//! cost.
//!
//! The attacks are Rust tests (docs/reliability.md lists them and the promise each checks): the
//! crash loop, full disk, read-only and missing directories, the run lock, concurrent samplers and
//! the interrupted fetch in `crates/ddpm-cli/tests/reliability.rs`, the checkpoint-integrity
//! attacks of `tests/integrity.rs` and the bad-input attacks of `tests/attacks.rs` (one row per
//! test, through `common::AttackRow`), and the replay of every
//! corrupt input kept from fuzzing in `crates/*/tests/fuzz_regressions.rs`. This command runs
//! them (the release test binaries `cargo test --release --workspace` builds, one at a time),
//! collects the line each writes to a report file and prints `attack, runs, failures, data
//! lost`. It fails when an attack fails, loses data, or does not report at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `reliability`.
#[derive(Args, Debug)]
pub struct ReliabilityArgs {
    /// Short loops (what CI runs): fewer kills, rounds and restarts.
    #[arg(long)]
    quick: bool,
    /// Seed of the kill times and sampling seeds (a failure prints the seed to replay it).
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// Give up (and fail) after this many minutes.
    #[arg(long, default_value_t = 30)]
    timeout_minutes: u64,
    /// The real data sets (a directory with a fetched mnist/) for the attacks that need them
    /// (the interrupted fetch). Default: $DDPM_REAL_DATA, else `data/` when MNIST has been
    /// fetched there (`cargo xtask fetch-data mnist` or `cargo xtask test-real`); without it
    /// those attacks are listed as skipped.
    #[arg(long, value_name = "DIR")]
    real_data: Option<PathBuf>,
}

/// The attacks that need the real data sets (their tests are marked `#[ignore]`).
const REAL_DATA_ATTACKS: [&str; 1] = ["fetch-data killed and rerun"];

/// One test binary to run and the attacks it reports.
struct Suite {
    package: &'static str,
    test: &'static str,
    attacks: &'static [&'static str],
}

const SUITES: [Suite; 6] = [
    Suite {
        package: "ddpm-data",
        test: "fuzz_regressions",
        attacks: &["corrupt data files (fuzz regressions)"],
    },
    Suite {
        package: "ddpm-train",
        test: "fuzz_regressions",
        attacks: &["corrupt checkpoints/configs (fuzz regressions)"],
    },
    Suite {
        package: "ddpm-cli",
        test: "reliability",
        attacks: &[
            "crash loop (SIGKILL + resume)",
            "full disk during a checkpoint write",
            "read-only / missing output dir",
            "two runs in one directory (lock)",
            "two `ddpm sample` on one checkpoint",
            "fetch-data killed and rerun",
        ],
    },
    Suite {
        package: "ddpm-cli",
        test: "integrity",
        attacks: &[
            "NaN/inf step: no update, only finite checkpoints",
            "flipped bytes in a checkpoint",
            "replaced/edited/missing checkpoint files",
            "NaN stop message and its advice (--lr 1e30)",
            "identical states, byte-identical checkpoints",
        ],
    },
    Suite {
        package: "ddpm-cli",
        test: "attacks",
        attacks: &[
            "batch 1 on cifar-small/cifar10",
            "--image-size 4096 (memory estimate)",
            "workers = 100000",
            "--timesteps 2 and the sampler steps",
            "--frames 20000 --steps 2",
            "relative folder, resume elsewhere",
            "--lr -1, weight_decay, eps",
            "partial TOML sections, TOML errors",
            "decode error advice (skip_corrupt)",
            "sample --out x.jpg, --batch-size 0",
            "SIGUSR1 / SIGHUP",
        ],
    },
    Suite {
        package: "ddpm-cli",
        test: "attacks_round5",
        attacks: &[
            "a file name with a newline in an error",
            "null and stray Hub labels, empty class folders",
            "a checkpoint copied in from another run",
            "a new run over a run whose checkpoints were moved",
            "export --out RUN --force",
        ],
    },
];

/// A row of the table.
#[derive(Debug, serde::Deserialize)]
struct Row {
    attack: String,
    runs: usize,
    failures: usize,
    data_lost: usize,
    #[serde(default)]
    note: String,
}

/// Runs `reliability`: all attacks, then the table; fails on any failure or lost data.
pub fn run(args: ReliabilityArgs) -> Result<()> {
    let root = crate::fuzz::workspace_root();
    let report =
        std::env::temp_dir().join(format!("ddpm-reliability-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let real_data = args
        .real_data
        .clone()
        .or_else(|| std::env::var_os(crate::test_real::REAL_DATA_ENV).map(PathBuf::from))
        .or_else(|| {
            let data = root.join("data");
            ddpm_data::fetch::is_fetched(&ddpm_data::DatasetSpec::Mnist, &data).then_some(data)
        })
        .map(|dir| std::fs::canonicalize(&dir).unwrap_or(dir));
    let deadline = Instant::now() + Duration::from_secs(60 * args.timeout_minutes);
    let start = Instant::now();
    let binaries = test_binaries(&root)?;
    let mut broken = Vec::new();
    for suite in &SUITES {
        let binary = binaries
            .iter()
            .find(|b| b.package == suite.package && b.test == suite.test)
            .with_context(|| {
                format!(
                    "cargo built no test binary `{}` of {}: is the suite list out of date?",
                    suite.test, suite.package
                )
            })?;
        eprintln!(
            "reliability: {} --test-threads=1 (the {} tests of {})",
            binary.executable.display(),
            suite.test,
            suite.package
        );
        let ok = run_suite(
            binary,
            suite,
            &args,
            &report,
            real_data.as_deref(),
            deadline,
        )
        .with_context(|| format!("running the {} tests of {}", suite.test, suite.package))?;
        if !ok {
            broken.push(format!("{}/{}", suite.package, suite.test));
        }
    }
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let rows: Vec<Row> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!();
    println!(
        "reliability ({}, seed {}, {:.0} s)",
        if args.quick { "quick" } else { "full" },
        args.seed,
        start.elapsed().as_secs_f64()
    );
    println!(
        "{:<48} {:>5} {:>9} {:>10}  note",
        "attack", "runs", "failures", "data lost"
    );
    let mut failed = 0;
    for attack in SUITES.iter().flat_map(|s| s.attacks.iter()) {
        match rows.iter().find(|r| r.attack == *attack) {
            Some(r) => {
                failed += usize::from(r.failures > 0 || r.data_lost > 0);
                println!(
                    "{:<48} {:>5} {:>9} {:>10}  {}",
                    r.attack, r.runs, r.failures, r.data_lost, r.note
                );
            }
            None if real_data.is_none() && REAL_DATA_ATTACKS.contains(attack) => println!(
                "{:<48} {:>5} {:>9} {:>10}  skipped: needs the real MNIST files (run `cargo xtask \
                 test-real` or `cargo xtask fetch-data mnist` first, or pass --real-data DIR)",
                attack, "-", "-", "-"
            ),
            None => {
                failed += 1;
                println!(
                    "{:<48} {:>5} {:>9} {:>10}  FAILED: no report (the test panicked or did not run)",
                    attack, "-", "-", "-"
                );
            }
        }
    }
    if failed > 0 || !broken.is_empty() {
        bail!(
            "{failed} attack(s) failed or did not report{}; rerun with `--seed {}` to replay",
            if broken.is_empty() {
                String::new()
            } else {
                format!(" (failing test binaries: {})", broken.join(", "))
            },
            args.seed
        );
    }
    Ok(())
}

/// An integration-test binary of the workspace, as cargo built it.
#[derive(Debug)]
struct TestBinary {
    /// Its package.
    package: String,
    /// The test target (the file's name under `tests/`).
    test: String,
    /// The executable.
    executable: PathBuf,
    /// The package's directory, where `cargo test` runs it.
    dir: PathBuf,
}

/// The workspace's integration-test binaries, built as `cargo test --release --workspace` builds
/// them (the README's test command): with the features of the whole workspace, so that after
/// that command nothing is compiled again. (`cargo test -p PACKAGE` unifies features over that
/// package alone and rebuilt every dependency, minutes of CPU and a gigabyte of disk.)
fn test_binaries(root: &Path) -> Result<Vec<TestBinary>> {
    let output = crate::cargo()
        .current_dir(root)
        .args(["test", "--release", "--workspace", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the test binaries (cargo test --release --workspace --no-run) failed");
    }
    #[derive(serde::Deserialize)]
    struct Message {
        reason: String,
        #[serde(default)]
        package_id: String,
        #[serde(default)]
        manifest_path: Option<PathBuf>,
        #[serde(default)]
        target: Option<Target>,
        #[serde(default)]
        executable: Option<PathBuf>,
    }
    #[derive(serde::Deserialize)]
    struct Target {
        name: String,
        kind: Vec<String>,
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(m) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        let (Some(target), Some(executable), Some(manifest)) =
            (m.target, m.executable, m.manifest_path)
        else {
            continue;
        };
        if m.reason != "compiler-artifact" || !target.kind.iter().any(|k| k == "test") {
            continue;
        }
        binaries.push(TestBinary {
            package: package_name(&m.package_id, &manifest),
            test: target.name,
            executable,
            dir: manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
        });
    }
    Ok(binaries)
}

/// The package's name from cargo's package id (`path+file:///.../ddpm-cli#0.1.0` names it by
/// its directory; `path+file:///...#ddpm-cli@0.1.0` and the older `ddpm-cli 0.1.0 (...)` by
/// name).
fn package_name(id: &str, manifest: &Path) -> String {
    if let Some((_, fragment)) = id.rsplit_once('#') {
        if let Some((name, _)) = fragment.split_once('@') {
            return name.to_string();
        }
    } else if let Some((name, _)) = id.split_once(' ') {
        return name.to_string();
    }
    manifest
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs one test binary; returns whether it passed.
fn run_suite(
    binary: &TestBinary,
    suite: &Suite,
    args: &ReliabilityArgs,
    report: &Path,
    real_data: Option<&Path>,
    deadline: Instant,
) -> Result<bool> {
    let mut cmd = Command::new(&binary.executable);
    cmd.current_dir(&binary.dir)
        .arg("--test-threads=1")
        .env("DDPM_RELIABILITY_REPORT", report)
        .env("DDPM_RELIABILITY_SEED", args.seed.to_string())
        .env("DDPM_RELIABILITY_QUICK", if args.quick { "1" } else { "0" })
        .env_remove("DDPM_DATA_MIRROR")
        .stdin(Stdio::null());
    if let Some(dir) = real_data {
        cmd.arg("--include-ignored")
            .env(crate::test_real::REAL_DATA_ENV, dir);
    }
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.executable.display()))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            // The test binary and the commands it started share a process group: stop them all.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "reliability: {}/{} ran past --timeout-minutes {}: stopped",
                suite.package, suite.test, args.timeout_minutes
            );
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
