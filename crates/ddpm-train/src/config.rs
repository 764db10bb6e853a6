//! [`TrainConfig`]: everything a run needs, readable from TOML and stored in every checkpoint.

use std::path::Path;

use ddpm_data::{DataConfig, DatasetSpec};
use ddpm_fs::read_regular_text;
use ddpm_schedule::{DiffusionLoss, Objective, SamplerConfig, ScheduleConfig};
use ddpm_unet::{KernelPolicy, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::optim::{AdamWConfig, LrSchedule};
use crate::precision::Precision;
use crate::sample::Guidance;
use crate::{Result, TrainError};

/// The most decode threads `[data] threads` may ask for.
pub const MAX_DATA_THREADS: usize = 256;

/// The full configuration of a training run. Every field has a default (the MNIST preset), so a
/// TOML file only needs the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of the model init, the timesteps, the noise, dropout and the data order.
    pub seed: u64,
    /// Optimizer steps to train for (in total, counting steps before a resume).
    pub steps: usize,
    /// Passes over the training images to train for, instead of `steps`: when set, a new run
    /// sets `steps` to `ceil(epochs * images / batch_size)` once its data set is open, and
    /// records both (left out of the TOML when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Images per optimizer step (split into `grad_accum` micro-batches).
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged per optimizer step.
    pub grad_accum: usize,
    /// AdamW hyper-parameters (keys left out keep this config's defaults).
    #[serde(deserialize_with = "optimizer_over_defaults")]
    pub optimizer: AdamWConfig,
    /// Steps of linear learning-rate warm-up (then `[optimizer] lr_schedule`).
    pub warmup_steps: usize,
    /// Maximum global gradient norm (0 disables clipping).
    pub grad_clip: f64,
    /// EMA decay (warmed up as `min(decay, (1+n)/(10+n))`).
    pub ema_decay: f64,
    /// Offset noise strength `s`: the training noise is `eps + s * z` with `z` one N(0, 1) value
    /// per image and channel, the same over all pixels (Guttenberg, "Diffusion with offset
    /// noise", Crosslabs 2023), so the model learns to change an image's mean brightness; 0
    /// (the default, left out of the TOML) is plain DDPM noise. 0.1 is the usual value.
    #[serde(skip_serializing_if = "is_zero")]
    pub offset_noise: f64,
    /// Class-conditional training (a model with `num_classes`): the probability that an image's
    /// label is replaced by the null label, which trains the unconditional model that
    /// classifier-free guidance contrasts with (0.1 to 0.2 is usual; 0 trains no unconditional
    /// model, so guidance other than 1 is refused). Unused by an unconditional model. Left out
    /// of the TOML at its default, 0.1, like the other keys added after the first release.
    #[serde(skip_serializing_if = "is_default_class_dropout")]
    pub class_dropout: f64,
    /// How a class-conditional model's sample grids are drawn while training, and the default
    /// of `ddpm sample` and `ddpm eval` for the run (`[guidance] scale`, `class`). Left out of
    /// the TOML at its default (scale 1.5, the classes in turn).
    #[serde(
        skip_serializing_if = "is_default_guidance",
        deserialize_with = "guidance_over_defaults"
    )]
    pub guidance: Guidance,
    /// What the network predicts.
    pub objective: Objective,
    /// The training loss (a `[loss]` section without `kind` keeps the default loss's kind).
    #[serde(deserialize_with = "loss_over_defaults")]
    pub loss: DiffusionLoss,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Write a sample grid from the EMA model every this many steps (0: never).
    pub sample_every: usize,
    /// Images in each sample grid.
    pub sample_num: usize,
    /// Seed of the sample grids (fixed, so grids are comparable across steps).
    pub sample_seed: u64,
    /// Sampler of the grids written during training.
    pub sampler: SamplerConfig,
    /// Append a metrics line (and redraw the loss curve) every this many steps.
    pub log_every: usize,
    /// The data set.
    pub dataset: DatasetSpec,
    /// Data loading and transforms.
    pub data: DataConfig,
    /// Loader worker threads.
    pub workers: usize,
    /// The network. A `[model]` section may leave keys out: they come from the preset of its
    /// `arch` (the default model's for `unet` or no `arch`, `cifar-small`'s for `ddpm_unet`;
    /// see [`fill_model_keys`]); the image size and channels follow the data anyway.
    #[serde(deserialize_with = "model_over_defaults")]
    pub model: ModelConfig,
    /// The noise schedule.
    pub schedule: ScheduleConfig,
    /// The dtype of the forward and backward passes (`f32`, or `bf16`/`f16` on CUDA with f32
    /// master weights).
    pub precision: Precision,
    /// Which implementation each hot op uses (`[kernels]`; the default, ours everywhere, is the
    /// fastest measured). Recorded so that a run says what it ran on; results agree across
    /// policies up to float rounding.
    pub kernels: KernelPolicy,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The default label dropout of class-conditional training.
const DEFAULT_CLASS_DROPOUT: f64 = 0.1;

/// The default guidance: scale 1.5 (the main job's recipe, docs/quality.md), classes in turn.
const DEFAULT_GUIDANCE: Guidance = Guidance {
    scale: 1.5,
    class: None,
};

fn is_default_class_dropout(x: &f64) -> bool {
    *x == DEFAULT_CLASS_DROPOUT
}

fn is_default_guidance(g: &Guidance) -> bool {
    *g == DEFAULT_GUIDANCE
}

/// A `[guidance]` table whose missing keys keep [`DEFAULT_GUIDANCE`]'s values (a table with
/// only `class = 3` keeps the scale 1.5).
fn guidance_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Guidance, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        scale: Option<f64>,
        class: Option<u32>,
    }
    let p = Partial::deserialize(d)?;
    Ok(Guidance {
        scale: p.scale.unwrap_or(DEFAULT_GUIDANCE.scale),
        class: p.class.or(DEFAULT_GUIDANCE.class),
    })
}

/// An `[optimizer]` table whose missing keys keep [`TrainConfig::default`]'s values (its
/// learning rate is the MNIST preset's, not [`AdamWConfig::default`]'s).
fn optimizer_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<AdamWConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        lr: Option<f64>,
        beta1: Option<f64>,
        beta2: Option<f64>,
        eps: Option<f64>,
        weight_decay: Option<f64>,
        lr_schedule: Option<LrSchedule>,
        min_lr: Option<f64>,
    }
    let p = Partial::deserialize(d)?;
    let base = TrainConfig::default().optimizer;
    Ok(AdamWConfig {
        lr: p.lr.unwrap_or(base.lr),
        beta1: p.beta1.unwrap_or(base.beta1),
        beta2: p.beta2.unwrap_or(base.beta2),
        eps: p.eps.unwrap_or(base.eps),
        weight_decay: p.weight_decay.unwrap_or(base.weight_decay),
        lr_schedule: p.lr_schedule.unwrap_or(base.lr_schedule),
        min_lr: p.min_lr.unwrap_or(base.min_lr),
    })
}

/// A `[model]` table whose left-out keys come from a preset ([`fill_model_keys`]).
fn model_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<ModelConfig, D::Error> {
    use serde::de::Error;
    let mut value = serde_json::Value::deserialize(d)?;
    if let serde_json::Value::Object(table) = &mut value {
        fill_model_keys(table);
    }
    // The table passes through JSON values, which hold no NaN or infinity: a TOML `nan` or
    // `inf` arrives as null, and the model's own error would name no key.
    let nulls: Vec<String> = match &value {
        serde_json::Value::Object(table) => table
            .iter()
            .filter(|(_, v)| v.is_null())
            .map(|(k, _)| format!("`{k}`"))
            .collect(),
        _ => Vec::new(),
    };
    ModelConfig::deserialize(value).map_err(|e| {
        let e = e.to_string();
        if e.contains("invalid type: null, expected f64") && !nulls.is_empty() {
            D::Error::custom(format!(
                "{} must be a finite number (nan and inf are not)",
                nulls.join(" or ")
            ))
        } else {
            D::Error::custom(e)
        }
    })
}

/// Fills the keys a `[model]` table leaves out that a model config cannot do without, from the
/// preset of its `arch`: the default model's for `unet` or no `arch`, `cifar-small`'s for
/// `ddpm_unet` (the image size and channels follow the data when a run opens it). Keys with a
/// default of their own (`num_classes`, `self_condition`, `init_dim`, ...) keep it, so that a
/// full section written without them reads as before. An unknown `arch` is left for the model's
/// own error, and so are unknown keys.
pub fn fill_model_keys(table: &mut serde_json::Map<String, serde_json::Value>) {
    let base = match table.get("arch") {
        None => TrainConfig::default().model,
        Some(serde_json::Value::String(a)) if a == "unet" => match TrainConfig::default().model {
            m @ ModelConfig::Unet(_) => m,
            ModelConfig::DdpmUnet(_) => ModelConfig::Unet(ddpm_unet::UnetConfig::mnist_small()),
        },
        Some(serde_json::Value::String(a)) if a == "ddpm_unet" => {
            ModelConfig::DdpmUnet(ddpm_unet::DdpmUnetConfig::cifar_small())
        }
        Some(_) => return,
    };
    let Ok(serde_json::Value::Object(full)) = serde_json::to_value(&base) else {
        return;
    };
    for (key, value) in &full {
        if table.contains_key(key) {
            continue;
        }
        // A key the model config can do without keeps its own default.
        let mut without = full.clone();
        without.remove(key);
        if ModelConfig::deserialize(serde_json::Value::Object(without)).is_ok() {
            continue;
        }
        table.insert(key.clone(), value.clone());
    }
}

/// `[loss]` over the default: a section that leaves out `kind` (for example one that only sets
/// `[loss.weighting]`) keeps the default elementwise loss instead of failing with a missing field.
fn loss_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<DiffusionLoss, D::Error> {
    use serde::de::Error;
    let mut table = toml::Table::deserialize(d)?;
    if !table.contains_key("kind") {
        let base =
            toml::Table::try_from(TrainConfig::default().loss.kind).map_err(D::Error::custom)?;
        for (key, value) in base {
            table.entry(key).or_insert(value);
        }
    }
    let loss =
        DiffusionLoss::deserialize(toml::Value::Table(table.clone())).map_err(D::Error::custom)?;
    // serde ignores extra keys beside the tag of a unit variant (`kind = "l2"`), even with
    // `deny_unknown_fields`: every key given must be one the parsed loss writes back.
    let known = toml::Table::try_from(loss).map_err(D::Error::custom)?;
    check_known_keys(&table, &known, "loss").map_err(D::Error::custom)?;
    Ok(loss)
}

/// Errors naming the first key of `given` that `known` (the same table written back from its
/// parsed value) does not have, at any depth; `path` names the table.
fn check_known_keys(
    given: &toml::Table,
    known: &toml::Table,
    path: &str,
) -> std::result::Result<(), String> {
    for (key, value) in given {
        match (known.get(key), value) {
            (None, _) => {
                let mut expected: Vec<&str> = known.keys().map(String::as_str).collect();
                expected.sort_unstable();
                return Err(format!(
                    "unknown field `{key}` in [{path}], expected one of {}",
                    expected.join(", ")
                ));
            }
            (Some(toml::Value::Table(k)), toml::Value::Table(g)) => {
                check_known_keys(g, k, &format!("{path}.{key}"))?;
            }
            _ => {}
        }
    }
    Ok(())
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 1600,
            epochs: None,
            batch_size: 64,
            grad_accum: 1,
            optimizer: AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
            warmup_steps: 100,
            grad_clip: 1.0,
            ema_decay: 0.995,
            offset_noise: 0.0,
            class_dropout: DEFAULT_CLASS_DROPOUT,
            guidance: DEFAULT_GUIDANCE,
            objective: Objective::Eps,
            loss: DiffusionLoss::default(),
            checkpoint_every: 250,
            keep_checkpoints: 3,
            sample_every: 500,
            sample_num: 40,
            sample_seed: 0,
            sampler: SamplerConfig::Ddim {
                steps: Some(50),
                eta: 0.0,
                clip_x0: true,
            },
            log_every: 10,
            dataset: DatasetSpec::Mnist,
            data: DataConfig::default(),
            workers: 1,
            // The main job's recipe (docs/quality.md): class-conditional, sampled with
            // classifier-free guidance 1.5.
            model: ModelConfig::Unet(ddpm_unet::UnetConfig {
                num_classes: Some(10),
                ..ddpm_unet::UnetConfig::mnist_small()
            }),
            schedule: ScheduleConfig::default(),
            precision: Precision::F32,
            kernels: KernelPolicy::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults (a `[model]` section's too,
    /// from the preset of its `arch`: see [`fill_model_keys`]).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            read_regular_text(path).map_err(|e| TrainError::io(path, "reading config", e))?;
        toml::from_str(&text).map_err(|e| TrainError::Config(toml_error(path, &text, &e)))
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainError::Config(format!("cannot write TOML: {e}")))
    }

    /// With `epochs` set, sets `steps` to `ceil(epochs * images / batch_size)` (at least 1):
    /// the steps of `epochs` passes over a training split of `images` images.
    pub fn resolve_epochs(&mut self, images: usize) {
        if let Some(e) = self.epochs {
            let batch = self.batch_size.max(1);
            self.steps = e.saturating_mul(images).div_ceil(batch).max(1);
        }
    }

    /// Checks the thread counts (`workers`, `[data] threads`) before anything starts threads:
    /// too many threads abort the process rather than fail.
    pub fn check_threads(&self) -> Result<()> {
        use ddpm_data::loader::MAX_WORKERS;
        if self.workers > MAX_WORKERS {
            return Err(TrainError::Config(format!(
                "`workers` = {} is outside 0..={MAX_WORKERS}: loader threads that assemble \
                 batches ahead (0: in the training thread); 1 to 4 are plenty",
                self.workers
            )));
        }
        if let Some(t) = self.data.threads {
            if t > MAX_DATA_THREADS {
                return Err(TrainError::Config(format!(
                    "`[data] threads` = {t} is more than {MAX_DATA_THREADS}: threads that decode \
                     images when a data set is opened (leave it out to use every core)"
                )));
            }
        }
        Ok(())
    }

    /// Checks the fields against each other and against the model and schedule.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        self.check_threads()?;
        // The run's config.toml records these paths, and TOML holds only UTF-8 text.
        let folder = match &self.dataset {
            DatasetSpec::Folder(p) => Some(("the image folder of `dataset`", p)),
            _ => None,
        };
        for (what, path) in [("`data.root` (--data-dir)", &self.data.root)]
            .into_iter()
            .chain(folder)
        {
            if path.to_str().is_none() {
                return bad(format!(
                    "{what} {} is not valid UTF-8, which the run's config.toml cannot record: \
                     rename it (or link to it from a UTF-8 path)",
                    path.display()
                ));
            }
        }
        if self.steps == 0 {
            return bad("`steps` must be at least 1".into());
        }
        if self.epochs == Some(0) {
            return bad("`epochs` must be at least 1 (or left out, to train for `steps`)".into());
        }
        if !(self.offset_noise >= 0.0 && self.offset_noise.is_finite()) {
            return bad(format!(
                "`offset_noise` = {} must be finite and >= 0 (0 turns it off; 0.1 is usual)",
                self.offset_noise
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("`batch_size` and `grad_accum` must be at least 1".into());
        }
        if !self.batch_size.is_multiple_of(self.grad_accum) {
            return bad(format!(
                "`batch_size` {} is not divisible by `grad_accum` {}",
                self.batch_size, self.grad_accum
            ));
        }
        self.optimizer.validate()?;
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!(
                "`ema_decay` must be in [0, 1), got {}",
                self.ema_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.class_dropout) {
            return bad(format!(
                "`class_dropout` must be in [0, 1], got {}",
                self.class_dropout
            ));
        }
        self.guidance.validate_scale()?;
        if self.model.num_classes().is_some()
            && self.class_dropout == 0.0
            && self.guidance.scale != 1.0
        {
            return bad(format!(
                "`[guidance] scale` = {} needs the unconditional model, which `class_dropout` = 0 \
                 does not train: set `class_dropout` (0.1 is usual) or a scale of 1",
                self.guidance.scale
            ));
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad("`grad_clip` must be >= 0 (0 disables it)".into());
        }
        if self.checkpoint_every == 0 || self.keep_checkpoints == 0 || self.log_every == 0 {
            return bad(
                "`checkpoint_every`, `keep_checkpoints` and `log_every` must be >= 1".into(),
            );
        }
        if self.sample_every > 0 && self.sample_num == 0 {
            return bad("`sample_num` must be >= 1 when `sample_every` > 0".into());
        }
        self.model.validate()?;
        self.schedule.validate()?;
        self.loss.validate()?;
        let t = self.schedule.timesteps;
        if let Some(s) = self.sampler.steps().filter(|&s| s == 0 || s > t) {
            return bad(format!(
                "`[sampler] steps` = {s} (the sampler of the sample grids written while training) \
                 must be in 1..={t} (`[schedule] timesteps`): lower it, or leave it out to take \
                 all {t}"
            ));
        }
        self.sampler.build(&ddpm_schedule::Schedule::with_dtype(
            &self.schedule,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )?)?;
        Ok(())
    }
}

/// A TOML error on one line: the file, the line, the key at fault (or the text there) with its
/// table, and what is wrong ("tiny.toml line 4, key `lr` in [optimizer]: invalid type ...").
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return format!("{}: {message}", path.display());
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let table = text
        .lines()
        .take(line_no)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last();
    let at = match line.split_once('=') {
        Some((key, _)) if !line.starts_with('[') => format!(", key `{}`", key.trim()),
        _ if line.is_empty() => String::new(),
        _ => format!(" (`{}`)", line.chars().take(60).collect::<String>()),
    };
    let table = match table {
        Some(t) if t != line => format!(" in {t}"),
        _ => String::new(),
    };
    format!("{} line {line_no}{at}{table}: {message}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn paths_the_config_toml_cannot_record_are_refused_by_name() {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b"data-\xff"));
        let mut c = TrainConfig::default();
        c.data.root = odd.clone();
        let e = c.validate().expect_err("non-UTF-8 root").to_string();
        assert!(
            e.contains("--data-dir") && e.contains("not valid UTF-8"),
            "{e}"
        );
        let c = TrainConfig {
            dataset: DatasetSpec::Folder(odd),
            ..TrainConfig::default()
        };
        let e = c.validate().expect_err("non-UTF-8 folder").to_string();
        assert!(
            e.contains("image folder") && e.contains("not valid UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn default_is_valid_and_round_trips_through_toml() -> Result<()> {
        let c = TrainConfig::default();
        c.validate()?;
        let back: TrainConfig =
            toml::from_str(&c.to_toml()?).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(back, c);
        Ok(())
    }

    #[test]
    fn partial_toml_keeps_defaults_and_bad_values_are_named() -> Result<()> {
        let c: TrainConfig = toml::from_str("steps = 7\ndataset = \"flowers\"\n[optimizer]\nlr = 0.5\nbeta1 = 0.9\nbeta2 = 0.99\neps = 1e-8\nweight_decay = 0.0\n")
            .map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(c.steps, 7);
        assert_eq!(c.dataset, DatasetSpec::Flowers);
        assert_eq!(c.batch_size, TrainConfig::default().batch_size);
        let bad = TrainConfig {
            batch_size: 10,
            grad_accum: 3,
            ..TrainConfig::default()
        };
        let e = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("grad_accum"), "{e}");
        assert!(toml::from_str::<TrainConfig>("stepz = 3").is_err());
        Ok(())
    }

    #[test]
    fn the_kernel_policy_is_a_config_section_and_round_trips() -> Result<()> {
        use ddpm_unet::policy::{Backend, CpuIsa};
        let dir = tempfile::tempdir().map_err(|e| TrainError::io(Path::new("tmp"), "tmp", e))?;
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "[kernels]\nbackend = \"candle\"\ncpu_isa = \"avx2\"\n",
        )
        .map_err(|e| TrainError::io(&path, "writing", e))?;
        let c = TrainConfig::from_toml_file(&path)?;
        assert_eq!(c.kernels.backend, Backend::Candle);
        assert_eq!(c.kernels.cpu_isa, CpuIsa::Avx2);
        assert!(c.kernels.winograd, "unset fields keep their defaults");
        // Written into config.toml and read back unchanged; a default config says `ours`.
        let back: TrainConfig = toml::from_str(&c.to_toml()?).expect("round trip");
        assert_eq!(back.kernels, c.kernels);
        assert_eq!(
            TrainConfig::default().kernels,
            ddpm_unet::KernelPolicy::default()
        );
        std::fs::write(&path, "[kernels]\nbackend = \"fastest\"\n")
            .map_err(|e| TrainError::io(&path, "writing", e))?;
        let e = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(e.contains("fastest"), "{e}");
        Ok(())
    }

    #[test]
    fn partial_sections_keep_the_defaults_and_toml_errors_are_one_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::Other(e.to_string()))?;
        let path = dir.path().join("partial.toml");
        let write = |text: &str| std::fs::write(&path, text).expect("config written");
        write("[optimizer]\nbeta1 = 0.8\n\n[schedule]\ntimesteps = 10\n");
        let c = TrainConfig::from_toml_file(&path)?;
        let d = TrainConfig::default();
        assert_eq!(c.optimizer.beta1, 0.8);
        assert_eq!(c.optimizer.lr, d.optimizer.lr);
        assert_eq!(c.schedule.timesteps, 10);
        assert_eq!(c.schedule.beta_schedule, d.schedule.beta_schedule);

        write("steps = 5\n\n[optimizer]\nlr = \"fast\"\n");
        let e = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("partial.toml line 4, key `lr` in [optimizer]: "),
            "{e}"
        );
        write("stepz = 5\n");
        let e = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(e.contains("line 1, key `stepz`: unknown field"), "{e}");
        Ok(())
    }

    /// The keys added after the first runs are left out of the TOML at their defaults, so a
    /// run's config written before them serializes (and hashes) as it did; set, they round-trip.
    #[test]
    fn newer_keys_are_left_out_at_their_defaults_and_round_trip() -> Result<()> {
        let text = TrainConfig::default().to_toml()?;
        for key in [
            "epochs",
            "offset_noise",
            "lr_schedule",
            "min_lr",
            "class_dropout",
            "guidance",
        ] {
            assert!(!text.contains(key), "{key} in\n{text}");
        }
        let old: TrainConfig = toml::from_str(&text).expect("parses");
        assert_eq!(old.to_toml()?, text);
        let mut c = TrainConfig {
            epochs: Some(3),
            offset_noise: 0.1,
            ..TrainConfig::default()
        };
        c.optimizer.lr_schedule = LrSchedule::Cosine;
        c.optimizer.min_lr = 1e-5;
        c.class_dropout = 0.2;
        c.guidance = Guidance {
            scale: 3.0,
            class: Some(4),
        };
        let back: TrainConfig = toml::from_str(&c.to_toml()?).expect("round trip");
        assert_eq!(back, c);
        // A `[guidance]` table with one key keeps the other's default.
        let only_class: TrainConfig = toml::from_str("[guidance]\nclass = 2\n").expect("parses");
        assert_eq!(only_class.guidance.scale, 1.5);
        assert_eq!(only_class.guidance.class, Some(2));
        let only_scale: TrainConfig = toml::from_str("[guidance]\nscale = 2.0\n").expect("parses");
        assert_eq!(only_scale.guidance.class, None);
        assert!(toml::from_str::<TrainConfig>("[guidance]\nscael = 2.0\n").is_err());
        Ok(())
    }

    #[test]
    fn a_loss_section_without_kind_keeps_the_default_kind() {
        let c: TrainConfig =
            toml::from_str("[loss.weighting]\nkind = \"min_snr\"\ngamma = 5.0\n").unwrap();
        assert_eq!(c.loss.kind, TrainConfig::default().loss.kind);
        assert_eq!(
            c.loss.weighting,
            ddpm_schedule::LossWeighting::MinSnr { gamma: 5.0 }
        );
        let c: TrainConfig = toml::from_str("[loss]\nkind = \"huber\"\ndelta = 2\n").unwrap();
        assert_eq!(c.loss.kind, ddpm_schedule::LossKind::Huber { delta: 2.0 });
        let e = toml::from_str::<TrainConfig>("[loss]\nkind = \"l3\"\n").unwrap_err();
        assert!(e.to_string().contains("l3"), "{e}");
    }

    #[test]
    fn epochs_resolve_to_steps_and_bad_values_are_named() {
        let mut c = TrainConfig {
            epochs: Some(3),
            batch_size: 32,
            ..TrainConfig::default()
        };
        c.resolve_epochs(500);
        assert_eq!(c.steps, 47, "ceil(1500 / 32)");
        c.resolve_epochs(64);
        assert_eq!(c.steps, 6);
        c.epochs = None;
        c.resolve_epochs(1);
        assert_eq!(c.steps, 6, "no epochs: steps unchanged");
        for (bad, what) in [
            (
                TrainConfig {
                    epochs: Some(0),
                    ..TrainConfig::default()
                },
                "`epochs`",
            ),
            (
                TrainConfig {
                    offset_noise: -0.1,
                    ..TrainConfig::default()
                },
                "`offset_noise` = -0.1",
            ),
            (
                TrainConfig {
                    offset_noise: f64::NAN,
                    ..TrainConfig::default()
                },
                "`offset_noise` = NaN",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn optimizer_settings_are_validated() {
        for (key, value, shown, range) in [
            ("lr", -1.0, "-1", "> 0"),
            ("lr", f64::INFINITY, "inf", "> 0"),
            ("beta1", 1.0, "1", "in [0, 1)"),
            ("beta2", f64::NAN, "NaN", "in [0, 1)"),
            ("eps", 0.0, "0", "> 0"),
            ("weight_decay", -1e30, "-1e30", ">= 0"),
        ] {
            let mut c = TrainConfig::default();
            let o = &mut c.optimizer;
            *match key {
                "lr" => &mut o.lr,
                "beta1" => &mut o.beta1,
                "beta2" => &mut o.beta2,
                "eps" => &mut o.eps,
                _ => &mut o.weight_decay,
            } = value;
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`[optimizer] {key}` = {shown} ")),
                "{e}"
            );
            assert!(e.contains(range), "{e}");
        }
    }

    /// A `[model]` section that leaves keys out takes them from the preset of its `arch` (the
    /// default model's without one); keys with defaults of their own keep them, so a full section
    /// without `num_classes` stays unconditional; unknown keys stay errors.
    #[test]
    fn a_non_finite_model_number_is_named() {
        for (key, value) in [
            ("norm_eps", "nan"),
            ("dropout", "inf"),
            ("freq_shift", "-inf"),
        ] {
            let text = format!("[model]\narch = \"ddpm_unet\"\n{key} = {value}\n");
            let e = toml::from_str::<TrainConfig>(&text)
                .expect_err(key)
                .to_string();
            assert!(
                e.contains(&format!("`{key}` must be a finite number")),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn a_partial_model_section_is_filled_from_its_preset() -> Result<()> {
        let parse = |text: &str| toml::from_str::<TrainConfig>(text);
        let c = parse("[model]\ndim = 8\n").map_err(|e| TrainError::Config(e.to_string()))?;
        let ModelConfig::Unet(u) = &c.model else {
            panic!("{:?}", c.model);
        };
        let ModelConfig::Unet(base) = TrainConfig::default().model else {
            panic!("the default model is a unet");
        };
        assert_eq!(u.dim, 8);
        assert_eq!(
            ddpm_unet::UnetConfig {
                dim: base.dim,
                num_classes: base.num_classes,
                ..u.clone()
            },
            base
        );
        assert_eq!(u.num_classes, None);
        let c = parse("[model]\narch = \"ddpm_unet\"\nch = 16\n")
            .map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(
            c.model,
            ModelConfig::DdpmUnet(ddpm_unet::DdpmUnetConfig {
                ch: 16,
                ..ddpm_unet::DdpmUnetConfig::cifar_small()
            })
        );
        // A full section reads as it always did.
        let mut full = TrainConfig::default();
        full.model.set_num_classes(None);
        let back = parse(&full.to_toml()?).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(back, full);
        for (text, needle) in [
            ("[model]\ndim = 8\nwidth = 2\n", "unknown field `width`"),
            ("[model]\narch = \"vit\"\n", "unknown variant `vit`"),
            ("[model]\ndim = -1\n", "invalid value"),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        Ok(())
    }
}
