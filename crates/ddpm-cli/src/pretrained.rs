//! `ddpm sample --pretrained DIR`: a diffusers DDPM pipeline directory (the google/ddpm-* layout:
//! `model_index.json`, `unet/`, `scheduler/`; or the flat layout with `config.json`, the weights
//! and `scheduler_config.json` at the top) as a model, a schedule and what the network predicts.
//! The reading lives in `ddpm_unet::diffusers` and `ddpm_schedule::diffusers`; this module finds
//! the files and wires them. Downloading from the Hub is not done here: DIR is a local copy.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use ddpm_schedule::diffusers::DiffusersScheduler;
use ddpm_schedule::{DdpmVariance, Objective, SamplerConfig, Schedule};
use ddpm_train::{parse_device, Precision};
use ddpm_unet::diffusers::load_unet_dir;
use ddpm_unet::DiffusionModel;

/// The pipelines whose model and scheduler this program can run.
const PIPELINES: [&str; 2] = ["DDPMPipeline", "DDIMPipeline"];

/// A diffusers pipeline loaded for sampling.
pub(crate) struct Pretrained {
    /// The UNet as our model, in the compute precision asked for.
    pub model: DiffusionModel,
    /// The scheduler's betas as a schedule on the model's device.
    pub schedule: Schedule,
    /// What the network predicts.
    pub objective: Objective,
    /// Whether the scheduler clips the predicted x_0 (`clip_sample`).
    pub clip_x0: bool,
    /// The scheduler's DDPM variance (`variance_type`).
    pub variance: DdpmVariance,
}

impl Pretrained {
    /// `config` (from the sampler flags) with the scheduler's clipping; a `--variance` that
    /// differs from the scheduler's `variance_type` is used, with a note.
    pub fn sampler(&self, config: SamplerConfig) -> SamplerConfig {
        match config {
            SamplerConfig::Ddim { steps, eta, .. } => SamplerConfig::Ddim {
                steps,
                eta,
                clip_x0: self.clip_x0,
            },
            SamplerConfig::Ddpm {
                steps, variance, ..
            } => {
                if variance != self.variance {
                    tracing::info!(
                        "the scheduler config asks for {:?} variance; --variance {:?} is used",
                        self.variance,
                        variance
                    );
                }
                SamplerConfig::Ddpm {
                    steps,
                    variance,
                    clip_x0: self.clip_x0,
                }
            }
        }
    }
}

/// The scheduler config of pipeline directory `dir`: `scheduler/scheduler_config.json`, or
/// `scheduler_config.json` at the top.
fn scheduler_file(dir: &Path) -> Result<PathBuf> {
    [
        dir.join("scheduler").join("scheduler_config.json"),
        dir.join("scheduler_config.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no scheduler/scheduler_config.json nor scheduler_config.json: not a diffusers \
             DDPM pipeline directory",
            dir.display()
        )
    })
}

/// Checks `model_index.json`, when there is one, names a pipeline of a UNet2DModel and a DDPM
/// or DDIM scheduler.
fn check_model_index(dir: &Path) -> Result<()> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let class = index.get("_class_name").and_then(|c| c.as_str());
    if let Some(class) = class.filter(|c| !PIPELINES.contains(c)) {
        anyhow::bail!(
            "{}: `_class_name` = \"{class}\": only {} directories can be sampled (a UNet2DModel \
             on images, no VAE or conditioning)",
            path.display(),
            PIPELINES.join(" and ")
        );
    }
    if let Some(unet) = index.get("unet") {
        if unet.get(1).and_then(|c| c.as_str()) != Some("UNet2DModel") {
            anyhow::bail!(
                "{}: `unet` = {unet}: only a diffusers UNet2DModel can be loaded",
                path.display()
            );
        }
    }
    Ok(())
}

/// Loads the pipeline directory `dir` on the device and in the precision the flags name.
pub(crate) fn load(dir: &Path, device: &str, precision: &str) -> Result<Pretrained> {
    if !dir.is_dir() {
        anyhow::bail!(
            "--pretrained {}: no such directory (a local diffusers pipeline directory; this \
             program does not download from the Hub)",
            dir.display()
        );
    }
    let device = parse_device(device)?;
    let precision = Precision::parse(precision)?;
    precision.check_device(&device)?;
    check_model_index(dir)?;
    let sched_path = scheduler_file(dir)?;
    let text = std::fs::read_to_string(&sched_path)
        .with_context(|| format!("reading {}", sched_path.display()))?;
    let scheduler = DiffusersScheduler::from_json(&text)
        .with_context(|| format!("reading {}", sched_path.display()))?;
    let unet = load_unet_dir(dir, &device, DType::F32)
        .with_context(|| format!("loading the UNet of {}", dir.display()))?;
    for note in unet.config.notes.iter().chain(&scheduler.notes) {
        tracing::info!("{note}");
    }
    let schedule = scheduler.schedule(&device, DType::F32)?;
    tracing::info!(
        weights = %unet.files.weights.display(),
        parameters = unet.model.num_parameters(),
        schedule = %scheduler.beta_schedule,
        timesteps = scheduler.timesteps(),
        objective = ?scheduler.objective,
        "diffusers pipeline loaded"
    );
    // The default kernel policy, with the environment's kernel variables applied.
    crate::env::install_kernel_policy(Default::default())?;
    Ok(Pretrained {
        model: unet.model.with_compute_dtype(precision.compute_dtype()),
        schedule,
        objective: scheduler.objective,
        clip_x0: scheduler.clip_x0,
        variance: scheduler.variance,
    })
}
