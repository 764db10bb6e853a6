//! Helpers shared by the end-to-end tests of the `ddpm` binary (`cli.rs`, `eval.rs`,
//! `reliability.rs`): the command builder, output checks, the tiny training config and checkpoint
//! readers. Each test binary includes this module with `mod common;`; as a `mod.rs` in a
//! subdirectory of `tests/`, cargo does not build it as a test of its own.

// Each test binary uses a different subset of these helpers, so in any one of them the others
// are unused.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The committed fixtures (crates/ddpm-data/fixtures: 500 real MNIST test images, 50 Flowers
/// JPEGs; see its README).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ddpm-data/fixtures")
}

/// Places the MNIST fixture in `dir/data/mnist` under MNIST's own t10k file names, as a user who
/// copied the files there by hand would (the binary then uses them without fetching; the loader
/// holds out the last fifth, 100 images, as the test split).
pub fn place_fixture_mnist(dir: &Path) {
    let mnist = dir.join("data/mnist");
    std::fs::create_dir_all(&mnist).expect("data/mnist created");
    for (fixture, name) in [
        ("images.idx3.gz", "t10k-images-idx3-ubyte.gz"),
        ("labels.idx1.gz", "t10k-labels-idx1-ubyte.gz"),
    ] {
        let to = mnist.join(name);
        if !to.exists() {
            std::fs::copy(fixtures().join("mnist").join(fixture), &to).expect("fixture copied");
        }
    }
}

/// The images of the fixture's test split: the last fifth of its 500 (MNIST's hold-out when
/// only t10k files are present).
pub const FIXTURE_TEST_IMAGES: usize = 100;

/// Copies the real MNIST files (of [`real_data`]) into `dir/data/mnist`; returns the size of the
/// test split they give: 10,000 with the training files, else the 2,000 held out of t10k.
pub fn place_real_mnist(dir: &Path) -> usize {
    let from = real_data().join("mnist");
    let to = dir.join("data/mnist");
    std::fs::create_dir_all(&to).expect("data/mnist created");
    let mut train = false;
    for (name, _) in ddpm_data::fetch::MNIST_FILES {
        if from.join(name).is_file() {
            std::fs::copy(from.join(name), to.join(name)).expect("MNIST copied");
            train |= name.starts_with("train");
        }
    }
    if train {
        10_000
    } else {
        2_000
    }
}

/// The real data sets for the tests marked `#[ignore = "real data ..."]`: the directory that
/// `cargo xtask test-real` fetched MNIST and Flowers into (through the verified fetch path) and
/// names in `DDPM_REAL_DATA`. Without it the test fails with one line saying how to run it.
pub fn real_data() -> PathBuf {
    match std::env::var_os("DDPM_REAL_DATA") {
        Some(dir) if Path::new(&dir).join("mnist").is_dir() => PathBuf::from(dir),
        _ => panic!(
            "this test reads the real data sets: run it with `cargo xtask test-real` (fetches \
             MNIST and Flowers into data/; offline: set DDPM_DATA_MIRROR=DIR to a mirror)"
        ),
    }
}

/// The `ddpm` binary, run in `dir` on the MNIST fixture (placed in `dir/data/mnist`), with no
/// mirror (nothing is fetched), no input and no fault injected.
pub fn ddpm(dir: &Path) -> Command {
    place_fixture_mnist(dir);
    ddpm_bare(dir)
}

/// The `ddpm` binary run in `dir` with no data placed and no mirror.
pub fn ddpm_bare(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddpm"));
    c.current_dir(dir)
        .env_remove("DDPM_DATA_MIRROR")
        .env("DDPM_LOG", "info")
        .env_remove("DDPM_FAULT_NAN_AT_STEP")
        .stdin(Stdio::null());
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the ddpm binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "ddpm failed: {}", stderr(o));
}

/// The `error:` line of a failed command that did not panic (one message, without runs of
/// spaces), or a description of what is wrong.
pub fn clean_error(o: &Output) -> Result<String, String> {
    let err = stderr(o);
    if o.status.success() {
        return Err(format!("expected a failure, got success: {err}"));
    }
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        return Err(format!("panic: {err}"));
    }
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .map(str::to_string)
        .ok_or_else(|| format!("no error line in: {err}"))?;
    // A run of spaces is a message whose source line lost its `\` continuation.
    if line.contains("   ") {
        return Err(format!("a run of spaces in the error line: {line}"));
    }
    Ok(line)
}

/// A failure is an `error:` line naming `needle`, a non-zero exit and never a panic.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let line = clean_error(o).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        line.contains(needle),
        "`{needle}` not in error line: {line}"
    );
}

/// [`assert_clean_error`], and the `error:` line is the only one.
pub fn assert_one_clean_error(o: &Output, needle: &str) {
    assert_clean_error(o, needle);
    let err = stderr(o);
    let lines = err.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(lines, 1, "not one error line: {err}");
}

/// The optimizer, data and model sections of every test config: a tiny model on MNIST (the
/// fixture) resized to 16x16, so that a step takes milliseconds.
const TINY_MODEL: &str = r#"[optimizer]
lr = 0.002
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
weight_decay = 0.0

[data]
root = "data"
image_size = 16

[model]
arch = "ddpm_unet"
image_size = 16
in_channels = 1
ch = 8
ch_mult = [1, 2]
num_res_blocks = 1
attn_resolutions = [8]
dropout = 0.1
groups = 4
"#;

/// Writes `dir/tiny.toml`: the top-level `settings`, the tiny model's sections, then `tables`
/// (further sections, such as `[sampler]` or `[schedule]`).
pub fn write_tiny_config(dir: &Path, settings: &str, tables: &str) -> PathBuf {
    let text = format!("\n{settings}\n{TINY_MODEL}\n{tables}");
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

/// The tiny model trained `steps` steps, a checkpoint every `checkpoint_every` (the newest `keep`
/// kept), 4 samples at the end and a 5-step DDIM sampler, written to `dir/tiny.toml`.
pub fn write_config(dir: &Path, steps: usize, checkpoint_every: usize, keep: usize) -> PathBuf {
    write_tiny_config(
        dir,
        &format!(
            "steps = {steps}
batch_size = 8
warmup_steps = 2
checkpoint_every = {checkpoint_every}
keep_checkpoints = {keep}
sample_every = {steps}
sample_num = 4
log_every = 1
workers = 1
"
        ),
        r#"[sampler]
kind = "ddim"
steps = 5
"#,
    )
}

/// `ddpm train` of a new run into `out` with the config `cfg`.
pub fn train_new(dir: &Path, out: &str, cfg: &Path) -> Command {
    let mut c = ddpm(dir);
    c.args(["train", "--quiet", "--config"])
        .arg(cfg)
        .args(["--out", out]);
    c
}

/// The tensors of a safetensors file, sorted by name, as raw bytes.
pub fn tensors(file: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(file).expect("checkpoint readable");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Polls `cond` until it holds; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reports one attack of `cargo xtask reliability` when dropped at the end of its test: a row
/// with one run and no failure, or, when the test is panicking, one failure (the test's own
/// assertions say which). Outside `cargo xtask reliability` (no `DDPM_RELIABILITY_REPORT`) it
/// does nothing. Data lost is counted by the assertions: a test that passed lost none.
pub struct AttackRow(pub &'static str);

impl Drop for AttackRow {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("DDPM_RELIABILITY_REPORT") else {
            return;
        };
        let failed = std::thread::panicking();
        let line = format!(
            "{{\"attack\":{},\"runs\":1,\"failures\":{},\"data_lost\":0,\"note\":\"\"}}\n",
            serde_json::Value::String(self.0.to_string()),
            u8::from(failed)
        );
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// The JSON document in `path` (a report), or a panic naming the file.
pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

/// `v` as a finite number, or a panic naming `what`.
pub fn num(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("`{what}` is not a number: {v}"));
    assert!(x.is_finite(), "`{what}` is not finite: {x}");
    x
}

/// Trains a tiny model (the MNIST fixture at 16x16, T = 50, 30 steps of batch 8) into `dir/run`;
/// `schedule` is more lines of its `[schedule]` table (e.g. a `beta_schedule`).
pub fn train_tiny(dir: &Path, schedule: &str) {
    write_tiny_config(
        dir,
        "steps = 30
batch_size = 8
warmup_steps = 2
checkpoint_every = 30
sample_every = 0
log_every = 10
workers = 1
",
        &format!("[schedule]\ntimesteps = 50\n{schedule}"),
    );
    assert_ok(&run(ddpm(dir).args([
        "train",
        "--quiet",
        "--config",
        "tiny.toml",
        "--out",
        "run",
    ])));
}
