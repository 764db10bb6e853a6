//! Replays every input kept under `tests/fuzz_regressions/<target>/` (crashes found by
//! `cargo xtask fuzz`, and hand-made files that lie about their sizes) through the loader its fuzz
//! target drives: checkpoint JSON, weights files and training configs each give `Ok` or `Err`,
//! never a panic, and never a single allocation beyond what the bytes can fill.

use std::path::Path;

use candle_core::Device;
use ddpm_train::checkpoint::{self, WeightsKind};
use ddpm_train::TrainConfig;

// The replay harness, shared with (and kept beside) ddpm-data's `tests/fuzz_regressions.rs`.
#[path = "../../ddpm-data/tests/support/fuzz_replay.rs"]
mod fuzz_replay;

use fuzz_replay::{replay, report, Largest};

// Every allocation of this test binary goes through the counter that `replay` reads.
#[global_allocator]
static GLOBAL: Largest = Largest;

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
