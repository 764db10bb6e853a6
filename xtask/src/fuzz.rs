//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` for a bounded time.
//!
//! Each target starts from a small seed corpus written here (real MNIST and Flowers bytes from the
//! committed fixtures in `crates/ddpm-data/fixtures`, a tiny weights file, a checkpoint's JSON, the default config) plus
//! whatever earlier runs kept in `fuzz/corpus/<target>/`. A crash is copied into the owning
//! crate's `tests/fuzz_regressions/<target>/`, where a test replays it on every `cargo test`.
//! Without cargo-fuzz, or when the fuzz build fails (libFuzzer needs a nightly-capable
//! compiler; `RUSTC_BOOTSTRAP=1` is set for a stable one), the command says so and skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand_chacha::rand_core::SeedableRng;

/// Arguments of `fuzz`.
#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Only these targets (default: all of `cargo fuzz list`).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Fail (instead of skipping) when cargo-fuzz is missing or the fuzz build fails.
    #[arg(long)]
    require: bool,
}

/// Which crate's regression inputs a target's crashes belong to.
fn regression_dir(root: &Path, target: &str) -> PathBuf {
    let krate = match target {
        "mnist_idx" | "cifar_batch" | "image_decode" => "ddpm-data",
        _ => "ddpm-train",
    };
    root.join("crates")
        .join(krate)
        .join("tests/fuzz_regressions")
        .join(target)
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut c = crate::cargo();
    c.arg("fuzz").current_dir(fuzz_dir);
    // libFuzzer's instrumentation flags are nightly-only; let a stable compiler accept them.
    c.env("RUSTC_BOOTSTRAP", "1");
    c
}

/// One target's outcome.
struct Outcome {
    target: String,
    execs: Option<u64>,
    crash: Option<PathBuf>,
    secs: f64,
}

/// Runs `fuzz`: every target for `--seconds`; fails if any target crashed.
pub fn run(args: FuzzArgs) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let skip = |why: String| -> Result<()> {
        if args.require {
            bail!("{why}");
        }
        println!("fuzz: skipped: {why}");
        Ok(())
    };
    let has_fuzz = cargo_fuzz(&fuzz_dir)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_fuzz {
        return skip(
            "cargo-fuzz is not installed (install it with `cargo install cargo-fuzz`)".into(),
        );
    }
    eprintln!("fuzz: building the targets (cargo fuzz build)...");
    let build = cargo_fuzz(&fuzz_dir)
        .arg("build")
        .status()
        .context("running cargo fuzz build")?;
    if !build.success() {
        return skip(format!(
            "`cargo fuzz build` failed ({build}); libFuzzer needs a nightly-capable rustc and a C++ \
             compiler"
        ));
    }
    let listed = cargo_fuzz(&fuzz_dir)
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    let mut targets: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if !args.targets.is_empty() {
        if let Some(unknown) = args.targets.iter().find(|t| !targets.contains(t)) {
            bail!(
                "no fuzz target `{unknown}` (targets: {})",
                targets.join(", ")
            );
        }
        targets.retain(|t| args.targets.contains(t));
    }
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        write_seeds(target, &corpus)
            .with_context(|| format!("writing the seed corpus of {target}"))?;
        let artifacts = fuzz_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("creating {}", artifacts.display()))?;
        let before = list_dir(&artifacts);
        eprintln!("fuzz: {target} for {} s", args.seconds);
        let start = Instant::now();
        let out = cargo_fuzz(&fuzz_dir)
            .args(["run", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={}", args.seconds),
                "-rss_limit_mb=2048",
                "-malloc_limit_mb=1024",
                "-timeout=20",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok());
        let crash = if out.status.success() {
            None
        } else {
            let new: Vec<PathBuf> = list_dir(&artifacts)
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "fuzz: {target} FAILED:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let kept = match new.first() {
                Some(artifact) => {
                    let dir = regression_dir(&root, target);
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let dest = dir.join(artifact.file_name().unwrap_or_default());
                    std::fs::copy(artifact, &dest)
                        .with_context(|| format!("copying {}", artifact.display()))?;
                    dest
                }
                None => PathBuf::from("(no artifact written)"),
            };
            Some(kept)
        };
        outcomes.push(Outcome {
            target: target.clone(),
            execs,
            crash,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    println!();
    println!(
        "{:<16} {:>8} {:>12}  result",
        "target", "seconds", "executions"
    );
    for o in &outcomes {
        let result = match &o.crash {
            None => "ok: no crash".to_string(),
            Some(p) => format!("CRASH, input kept as {}", p.display()),
        };
        let execs = o.execs.map_or("?".to_string(), |e| e.to_string());
        println!("{:<16} {:>8.0} {:>12}  {result}", o.target, o.secs, execs);
    }
    let crashed = outcomes.iter().filter(|o| o.crash.is_some()).count();
    if crashed > 0 {
        bail!(
            "{crashed} fuzz target(s) crashed; the inputs are kept under crates/*/tests/fuzz_regressions/ \
             (replayed by `cargo test`): fix the parser, then rerun"
        );
    }
    Ok(())
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Writes the seed inputs of `target` into its corpus directory.
fn write_seeds(target: &str, corpus: &Path) -> Result<()> {
    let fixtures = workspace_root().join("crates/ddpm-data/fixtures");
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    match target {
        "mnist_idx" => {
            // Two 28x28 images and two labels, and the gzipped real labels file.
            let mut images = 0x0803u32.to_be_bytes().to_vec();
            for d in [2u32, 28, 28] {
                images.extend_from_slice(&d.to_be_bytes());
            }
            images.extend((0..2 * 784).map(|i| (i % 251) as u8));
            let mut labels = 0x0801u32.to_be_bytes().to_vec();
            labels.extend_from_slice(&2u32.to_be_bytes());
            labels.extend_from_slice(&[7, 2]);
            seeds.push(("images", images));
            seeds.push(("labels", labels));
            if let Ok(gz) = std::fs::read(fixtures.join("mnist/labels.idx1.gz")) {
                seeds.push(("gz-labels", gz));
            }
        }
        "cifar_batch" => {
            let mut record = vec![3u8];
            record.extend((0..3072).map(|i| (i * 7 % 256) as u8));
            seeds.push(("one-record", record));
        }
        "image_decode" => {
            // A 3x4x6 PNG written by our own image code, a 1x1 GIF, and a real Flowers JPEG.
            let values: Vec<f32> = (0..3 * 4 * 6).map(|i| (i as f32 / 36.0) - 1.0).collect();
            let t = candle_core::Tensor::from_vec(values, (3, 4, 6), &candle_core::Device::Cpu)?;
            let png = corpus.join("seed-png");
            ddpm_data::save_image(&t, &png)?;
            seeds.push(("gif", GIF_1X1.to_vec()));
            if let Some(jpg) = std::fs::read_dir(fixtures.join("flowers/daisy"))
                .ok()
                .and_then(|mut rd| rd.next())
                .and_then(|e| e.ok())
                .and_then(|e| std::fs::read(e.path()).ok())
                .filter(|b| b.len() <= 65536)
            {
                seeds.push(("flower-jpeg", jpg));
            }
        }
        "checkpoint_meta" => {
            let meta = ddpm_train::CheckpointMeta {
                format: ddpm_train::checkpoint::CHECKPOINT_FORMAT.to_string(),
                step: 12,
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(0),
                loader: ddpm_data::LoaderPosition::default(),
                config: ddpm_train::TrainConfig::default(),
                tensors_file: "ckpt-00000012.safetensors".into(),
                tensors_bytes: 1234,
                loss_scaler: Default::default(),
                rank_word_pos: vec![96, 1 << 40, u64::MAX as u128 + 3],
            };
            seeds.push(("meta", serde_json::to_vec_pretty(&meta)?));
        }
        "weights_file" => {
            let config: ddpm_unet::ModelConfig = serde_json::from_value(serde_json::json!({
                "arch": "ddpm_unet", "image_size": 8, "in_channels": 1, "ch": 4,
                "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0, "groups": 2
            }))?;
            let model = ddpm_unet::DiffusionModel::new(
                &config,
                0,
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )?;
            let path = corpus.join("tiny-weights");
            model.save(&path)?;
        }
        "train_config" => {
            seeds.push((
                "default",
                ddpm_train::TrainConfig::default().to_toml()?.into_bytes(),
            ));
        }
        _ => {}
    }
    for (name, bytes) in seeds {
        std::fs::write(corpus.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}

/// The smallest GIF: one transparent pixel.
const GIF_1X1: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
