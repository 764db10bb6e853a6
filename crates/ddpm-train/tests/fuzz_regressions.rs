//! Replays every input kept under `tests/fuzz_regressions/<target>/` (crashes found by
//! `cargo xtask fuzz`, and hand-made files that lie about their sizes) through the loader its fuzz
//! target drives: checkpoint JSON, weights files and training configs each give `Ok` or `Err`,
//! never a panic, and never a single allocation beyond what the bytes can fill.

use candle_core::Device;
use ddpm_train::checkpoint::{self, WeightsKind};
use ddpm_train::TrainConfig;

// ---------------------------------------------------------------------------------------------
// Harness shared by both crates' replay tests: a counting allocator and the replay loop.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, remembering the largest single allocation since the last reset.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

/// The most any input may make the parsers allocate at once: the 64 MiB that a reader may reserve
/// up front, plus slack. A header's claims beyond what the file holds must not count.
const MAX_ALLOCATION: usize = 80 << 20;

/// The kept inputs of one fuzz target, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Feeds every kept input of `target` to `parse`; returns the problems (panics, huge allocations).
fn replay(target: &str, parse: impl Fn(&Path)) -> (usize, Vec<String>) {
    let files = inputs(target);
    let mut problems = Vec::new();
    for file in &files {
        LARGEST.store(0, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(file)));
        let largest = LARGEST.load(Ordering::Relaxed);
        if outcome.is_err() {
            problems.push(format!("{}: panicked", file.display()));
        }
        if largest > MAX_ALLOCATION {
            problems.push(format!(
                "{}: allocated {} MiB at once",
                file.display(),
                largest >> 20
            ));
        }
    }
    (files.len(), problems)
}

/// Appends this suite's line to the `cargo xtask reliability` report, when one is being written.
fn report(attack: &str, runs: usize, failures: usize) {
    if let Ok(path) = std::env::var("DDPM_RELIABILITY_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                r#"{{"attack":"{attack}","runs":{runs},"failures":{failures},"data_lost":0,"note":"inputs kept from fuzzing and hand-made lying headers"}}"#
            );
        }
    }
}

#[test]
fn kept_inputs_give_errors_not_panics_or_huge_allocations() {
    let mut runs = 0;
    let mut problems = Vec::new();
    for (target, parse) in [
        (
            "checkpoint_meta",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap_or_default();
                if let Ok(meta) = checkpoint::parse_meta(&bytes, p) {
                    let _ = meta.config.validate();
                }
                let _ = checkpoint::load(p, &Device::Cpu);
            }) as Box<dyn Fn(&Path)>,
        ),
        (
            "weights_file",
            Box::new(|p: &Path| {
                let _ = checkpoint::load_model(p, WeightsKind::Ema, &Device::Cpu);
            }),
        ),
        (
            "train_config",
            Box::new(|p: &Path| {
                if let Ok(config) = TrainConfig::from_toml_file(p) {
                    let _ = config.validate();
                }
            }),
        ),
    ] {
        let (n, found) = replay(target, parse);
        assert!(n > 0, "no kept inputs for {target}");
        runs += n;
        problems.extend(found);
    }
    report(
        "corrupt checkpoints/configs (fuzz regressions)",
        runs,
        problems.len(),
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn lying_sizes_are_named_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let file = dir.join("train_config/timesteps-4-billion.toml");
    let err = TrainConfig::from_toml_file(&file)
        .and_then(|c| c.validate())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("4000000000"), "{err}");
    let file = dir.join("checkpoint_meta/tensors-file-escapes.json");
    let err = checkpoint::load(&file, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("tensors_file"), "{err}");
    // A 372-byte weights file whose config claims a model of 10^12+ parameters: an error naming
    // the mismatch, found before the model is built (the replay above bounds its allocations).
    let file = dir.join("weights_file/config-claims-huge-model");
    let err = checkpoint::load_model(&file, WeightsKind::Ema, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("do not make the model"), "{err}");
}
