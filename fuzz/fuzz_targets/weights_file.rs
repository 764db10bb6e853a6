//! Weights files and checkpoint tensors (safetensors with our JSON metadata): any bytes load as a
//! model or give an error, through the same path as `ddpm sample --checkpoint FILE`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ddpm_train::checkpoint::{load_model, WeightsKind};
use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process, rewritten for every input (the loader reads from a path).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("ddpm-fuzz-{}.safetensors", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let _ = load_model(path, WeightsKind::Ema, &candle_core::Device::Cpu);
});
