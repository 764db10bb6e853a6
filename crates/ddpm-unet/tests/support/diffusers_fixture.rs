//! The tiny random diffusers pipeline of `crates/ddpm-unet/tests/fixtures/diffusers-tiny` (made by
//! bench/pytorch/diffusers_fixtures.py), as the tests read it.
//!
//! Its safetensors files are committed as `*.st` (so that no file in git looks like a checkpoint
//! or a data set); [`fixture`] gives the expected outputs under that name and, for the pipeline
//! layout, a copy in the build's temporary directory with the weights under diffusers' own name,
//! `unet/diffusion_pytorch_model.safetensors`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The committed fixture folder (from any crate of `crates/`, which include this file).
fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ddpm-unet/tests/fixtures/diffusers-tiny")
}

/// `rel` in the fixture: `expected.safetensors` is the committed `expected.st`; `pipeline/...`
/// is in the assembled pipeline directory; anything else (`flat-bin/...`) is the committed file.
pub fn fixture(rel: &str) -> PathBuf {
    if rel == "expected.safetensors" {
        return committed().join("expected.st");
    }
    match rel.strip_prefix("pipeline") {
        Some(rest) => pipeline().join(rest.trim_start_matches('/')),
        None => committed().join(rel),
    }
}

/// The pipeline directory with diffusers' file names, assembled once per test process.
fn pipeline() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let from = committed().join("pipeline");
        let to = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("diffusers-tiny-pipeline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&to);
        for rel in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
        ] {
            copy(&from.join(rel), &to.join(rel));
        }
        copy(
            &from.join("unet/diffusion_pytorch_model.st"),
            &to.join("unet/diffusion_pytorch_model.safetensors"),
        );
        to
    })
    .clone()
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("a file in a folder")).expect("fixture folder");
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
