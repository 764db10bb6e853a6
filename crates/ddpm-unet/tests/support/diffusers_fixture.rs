//! The tiny random diffusers pipelines of `crates/ddpm-unet/tests/fixtures/` (made by
//! bench/pytorch/diffusers_fixtures.py), as the tests read them: [`TINY`], the DDPM paper's
//! settings as the google/ddpm-* models have them, and [`MODERN`], diffusers' own defaults.
//!
//! Its safetensors files are committed as `*.st` (so that no file in git looks like a checkpoint
//! or a data set); [`fixture`] gives the expected outputs under that name and, for the pipeline
//! layout, a copy in the build's temporary directory with the weights under diffusers' own name,
//! `unet/diffusion_pytorch_model.safetensors`.

#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The fixture with the DDPM paper's settings (single-head attention, `[sin, cos]` time
/// embedding with freq_shift 1, bottom-right downsampling padding, GroupNorm eps 1e-6).
pub const TINY: &str = "diffusers-tiny";
/// The fixture with diffusers' own `UNet2DModel` defaults (4-feature attention heads,
/// flip_sin_to_cos, freq_shift 0, downsample_padding 1, norm_eps 1e-5).
pub const MODERN: &str = "diffusers-tiny-modern";

/// The committed fixture folder `name` (from any crate of `crates/`, which include this file).
fn committed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ddpm-unet/tests/fixtures")
        .join(name)
}

/// [`fixture_of`] the [`TINY`] fixture.
pub fn fixture(rel: &str) -> PathBuf {
    fixture_of(TINY, rel)
}

/// `rel` in the fixture `name`: `expected.safetensors` is the committed `expected.st`;
/// `pipeline/...` is in the assembled pipeline directory; anything else (`flat-bin/...`) is the
/// committed file.
pub fn fixture_of(name: &'static str, rel: &str) -> PathBuf {
    if rel == "expected.safetensors" {
        return committed(name).join("expected.st");
    }
    match rel.strip_prefix("pipeline") {
        Some(rest) => pipeline(name).join(rest.trim_start_matches('/')),
        None => committed(name).join(rel),
    }
}

/// The pipeline directory of fixture `name` with diffusers' file names, assembled once per test
/// process.
fn pipeline(name: &'static str) -> PathBuf {
    static DIRS: Mutex<BTreeMap<&'static str, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.entry(name)
        .or_insert_with(|| {
            let from = committed(name).join("pipeline");
            let to = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("{name}-pipeline-{}", std::process::id()));
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
