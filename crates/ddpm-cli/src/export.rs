//! `ddpm export --checkpoint RUN --format diffusers --out DIR`: a trained `ddpm_unet` model as a
//! diffusers `DDPMPipeline` directory (`model_index.json`, `unet/config.json`,
//! `unet/diffusion_pytorch_model.safetensors`, `scheduler/scheduler_config.json`) that
//! `DDPMPipeline.from_pretrained(DIR)` loads and `ddpm sample --pretrained DIR` reads back. The
//! renaming is `ddpm_unet::diffusers` (the inverse of the loading rules), the scheduler
//! `ddpm_schedule::diffusers::scheduler_config_json`; docs/pretrained.md describes both.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use ddpm_schedule::diffusers::scheduler_config_json;
use ddpm_schedule::DdpmVariance;
use ddpm_train::checkpoint::load_model;
use ddpm_unet::diffusers::{save_unet_dir, UNET_SUBFOLDER};
use ddpm_unet::ModelConfig;

/// The export formats.
const FORMATS: [&str; 1] = ["diffusers"];

/// Arguments of `ddpm export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A run directory (newest checkpoint), a checkpoint .json/.safetensors, or a weights file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The format to write: diffusers (a DDPMPipeline directory).
    #[arg(long, default_value = "diffusers")]
    format: String,
    /// The directory to write (created; must be empty or absent unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Which weights: ema (default) or raw.
    #[arg(long, default_value = "ema")]
    weights: String,
    /// Write into a non-empty --out, replacing the pipeline's files there.
    #[arg(long)]
    force: bool,
}

/// Refuses an `out` that is a file, a training run's directory or its `checkpoints/` (even
/// with `force`: a pipeline there makes `--checkpoint RUN` read as a pipeline), or a non-empty
/// directory without `force`.
fn check_out(out: &Path, force: bool) -> Result<()> {
    if out.is_file() {
        anyhow::bail!(
            "--out {} is a file: name a directory to write the pipeline into",
            out.display()
        );
    }
    let is_run = out.join("checkpoints").is_dir() || out.join("history.jsonl").is_file();
    let run_dir = out.parent().unwrap_or(Path::new("."));
    let is_checkpoints = out.file_name().is_some_and(|n| n == "checkpoints")
        && ddpm_train::checkpoint::list(run_dir).is_ok_and(|l| !l.is_empty());
    if is_run || is_checkpoints {
        anyhow::bail!(
            "--out {} is {}: a pipeline written there would be mistaken for the run (and the \
             run for a pipeline); name a directory of its own, such as {}",
            out.display(),
            if is_run {
                "a training run's directory"
            } else {
                "a training run's checkpoints folder"
            },
            if is_run { out } else { run_dir }
                .join("diffusers")
                .display()
        );
    }
    if out.is_dir() && !force {
        let mut entries = std::fs::read_dir(out)
            .with_context(|| format!("reading --out directory {}", out.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "--out {} is not empty: choose an empty or new directory, or add --force to \
                 replace the pipeline's files there",
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path`, atomically.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    ddpm_fs::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: ExportArgs) -> Result<()> {
    if !FORMATS.contains(&a.format.as_str()) {
        anyhow::bail!(
            "unknown --format `{}`: choose {}",
            a.format,
            FORMATS.join(", ")
        );
    }
    let weights = crate::sample::parse_weights(&a.weights)?;
    check_out(&a.out, a.force)?;
    let loaded = load_model(&a.checkpoint, weights, &Device::Cpu)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    if let ModelConfig::Unet(_) = loaded.model.config() {
        anyhow::bail!(
            "{}: its model is the lucidrains-style `unet` (arch = \"unet\"), which diffusers has \
             no class for: only `ddpm_unet` models (diffusers' UNet2DModel) can be exported",
            a.checkpoint.display()
        );
    }
    let scheduler = scheduler_config_json(
        &loaded.schedule,
        loaded.objective,
        DdpmVariance::FixedSmall,
        true,
    )
    .context("the run's schedule")?;
    let index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": ddpm_unet::diffusers::EXPORT_DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    });
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // Each file below is replaced atomically, but not the set: until the marker is removed at
    // the end, the directory is an unfinished export that `--pretrained` refuses (a `--force`
    // export killed midway would otherwise pair one run's UNet with another's scheduler).
    let marker = a.out.join(crate::pretrained::INCOMPLETE_EXPORT);
    ddpm_fs::write_atomic(
        &marker,
        b"a `ddpm export` into this directory did not finish: run it again\n",
    )
    .with_context(|| format!("writing {}", marker.display()))?;
    let unet = save_unet_dir(&loaded.model, &a.out.join(UNET_SUBFOLDER))
        .with_context(|| format!("writing the UNet into {}", a.out.display()))?;
    write_json(
        &a.out.join("scheduler").join("scheduler_config.json"),
        &scheduler,
    )?;
    write_json(&a.out.join("model_index.json"), &index)?;
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    if let Some(n) = loaded.model.config().num_classes() {
        tracing::warn!(
            classes = n,
            null_label = n,
            "the model is class-conditional: its UNet2DModel has num_class_embeds = {} and needs \
             `class_labels` (0..{n}, {n} = unconditional), which DDPMPipeline does not pass; call \
             the UNet with class_labels yourself (docs/sampling.md)",
            n + 1
        );
    }
    tracing::info!(
        out = %a.out.display(),
        weights = %unet.weights.display(),
        which = loaded.weights.name(),
        step = ?loaded.step,
        beta_schedule = %scheduler["beta_schedule"],
        trained_betas = !scheduler["trained_betas"].is_null(),
        "diffusers pipeline written"
    );
    Ok(())
}
