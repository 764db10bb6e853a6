//! Replays every input kept under `tests/fuzz_regressions/<target>/` (crashes found by
//! `cargo xtask fuzz`, and hand-made files whose headers lie about their sizes) through the
//! parser its fuzz target drives: each must give `Ok` or `Err`, never a panic, and never a single
//! allocation beyond what the bytes can fill (a 4 GB count in a 1 KB file is an error, not an
//! allocation).

use std::path::Path;

use ddpm_data::{cifar, folder, mnist};

// The replay harness, shared with ddpm-train's `tests/fuzz_regressions.rs`.
#[path = "support/fuzz_replay.rs"]
mod fuzz_replay;

use fuzz_replay::{replay, report, Largest};

// Every allocation of this test binary goes through the counter that `replay` reads.
#[global_allocator]
static GLOBAL: Largest = Largest;

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
