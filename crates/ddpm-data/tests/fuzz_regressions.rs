//! Replays every input kept under `tests/fuzz_regressions/<target>/` (crashes found by
//! `cargo xtask fuzz`, and hand-made files whose headers lie about their sizes) through the
//! parser its fuzz target drives: each must give `Ok` or `Err`, never a panic, and never a single
//! allocation beyond what the bytes can fill (a 4 GB count in a 1 KB file is an error, not an
//! allocation).

use ddpm_data::{cifar, folder, mnist};

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
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let mut runs = 0;
    let mut problems = Vec::new();
    for (target, parse) in [
        (
            "mnist_idx",
            Box::new(|p: &Path| {
                let bytes = read(p);
                let _ = mnist::parse_images(&bytes, p);
                let _ = mnist::parse_labels(&bytes, p);
            }) as Box<dyn Fn(&Path)>,
        ),
        (
            "cifar_batch",
            Box::new(|p: &Path| {
                let _ = cifar::parse_batch(&read(p), p);
            }),
        ),
        (
            "image_decode",
            Box::new(|p: &Path| {
                let _ = folder::decode_image(read(p), p, 8);
            }),
        ),
    ] {
        let (n, found) = replay(target, parse);
        assert!(n > 0, "no kept inputs for {target}");
        runs += n;
        problems.extend(found);
    }
    report(
        "corrupt data files (fuzz regressions)",
        runs,
        problems.len(),
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn lying_headers_are_named_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let file = dir.join("mnist_idx/lying-count-4g-in-1k");
    let err = mnist::parse_images(&std::fs::read(&file).unwrap_or_default(), &file);
    assert!(
        matches!(err, Err(ddpm_data::DataError::Truncated { .. })),
        "{err:?}"
    );
    let file = dir.join("image_decode/png-claims-65535x65535");
    let err = folder::decode_image(std::fs::read(&file).unwrap_or_default(), &file, 8)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("65535x65535"), "{err}");
}
