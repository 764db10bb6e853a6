//! The harness of the fuzz-regression replay tests of ddpm-data and ddpm-train (each crate's
//! `tests/fuzz_regressions.rs` includes this file with `#[path]`): a counting allocator, the replay
//! of the inputs kept under `tests/fuzz_regressions/<target>/`, and the report line for
//! `cargo xtask reliability`.
//!
//! The allocator only counts once a test binary installs it; each includer does so in its root:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: fuzz_replay::Largest = fuzz_replay::Largest;
//! ```
//!
//! This file sits in a subdirectory of `tests/`, so cargo does not build it as a test of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, remembering the largest single allocation since the last reset.
pub struct Largest;

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

/// The most any input may make the parsers allocate at once: the 64 MiB that a reader may reserve
/// up front, plus slack. A header's claims beyond what the file holds must not count.
const MAX_ALLOCATION: usize = 80 << 20;

/// The kept inputs of one fuzz target, sorted. `CARGO_MANIFEST_DIR` is that of the crate whose
/// test includes this file.
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
pub fn replay(target: &str, parse: impl Fn(&Path)) -> (usize, Vec<String>) {
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
pub fn report(attack: &str, runs: usize, failures: usize) {
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
