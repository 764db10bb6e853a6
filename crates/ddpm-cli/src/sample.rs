//! `ddpm sample`: images (grid, single files, GIF of the reverse process) from a checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use ddpm_data::image_io;
use ddpm_schedule::{DdpmVariance, DpmSpacing, SamplerConfig, Schedule};
use ddpm_train::checkpoint::{load_model, LoadedModel, WeightsKind};
use ddpm_train::sample::grid_columns;
use ddpm_train::{parse_device, sample, Guidance, Precision, SampleOptions, TrainError};

/// Arguments of `ddpm sample`.
#[derive(Args)]
pub struct SampleArgs {
    /// A run directory (newest checkpoint), a checkpoint .json/.safetensors, or a weights file.
    #[arg(long, required_unless_present = "pretrained")]
    checkpoint: Option<PathBuf>,
    /// Instead of --checkpoint: a diffusers DDPM pipeline, a local directory or else a Hub
    /// repository such as google/ddpm-cifar10-32 (docs/pretrained.md).
    #[arg(long, conflicts_with = "checkpoint", value_name = "REPO_OR_DIR")]
    pretrained: Option<String>,
    /// The revision (branch, tag or commit) of a --pretrained Hub repository (default: main).
    #[arg(long, requires = "pretrained")]
    revision: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    num: usize,
    #[command(flatten)]
    sampler: SamplerArgs,
    #[command(flatten)]
    inference: InferenceArgs,
    #[command(flatten)]
    guidance: GuidanceArgs,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The grid of samples, in the format its extension names: .png, .jpg or .jpeg.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write each sample as its own PNG in this directory.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also write an animated GIF of the reverse process.
    #[arg(long)]
    gif: Option<PathBuf>,
    /// Frames of the GIF.
    #[arg(long, default_value_t = 20)]
    frames: usize,
    /// Images denoised at once.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

/// DDIM's steps when `--steps` is not given (all T for a model of fewer timesteps).
const DEFAULT_DDIM_STEPS: usize = 50;

/// The sampler flags of `sample` and `eval`.
#[derive(Args, Debug)]
pub(crate) struct SamplerArgs {
    /// ddim, ddpm or dpm-solver++ (DPM-Solver++ (2M), docs/sampling.md).
    #[arg(long, default_value = "ddim")]
    sampler: String,
    /// Sampling steps (default: 50 for ddim, 20 for dpm-solver++, all T for ddpm).
    #[arg(long)]
    steps: Option<usize>,
    /// DDIM stochasticity (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// DDPM step variance: fixed-small (posterior) or fixed-large (beta_t).
    #[arg(long, default_value = "fixed-small")]
    variance: String,
}

impl SamplerArgs {
    /// The sampler these flags choose for a model of `timesteps` diffusion steps (DDIM defaults
    /// to 50 steps, or all T when T is smaller; DPM-Solver++ to 20, or T - 1; DDPM to all T;
    /// x0 is clipped to [-1, 1] by every sampler, as our models are trained on data in that
    /// range).
    pub(crate) fn config(&self, timesteps: usize) -> Result<SamplerConfig> {
        if let Some(s) = self.steps.filter(|&s| s == 0 || s > timesteps) {
            anyhow::bail!(
                "--steps {s} is outside 1..={timesteps}: the model's schedule has {timesteps} \
                 diffusion timesteps; use --steps {timesteps} or fewer (or leave it out)"
            );
        }
        Ok(match self.sampler.to_ascii_lowercase().as_str() {
            "ddim" => SamplerConfig::Ddim {
                steps: Some(self.steps.unwrap_or(DEFAULT_DDIM_STEPS.min(timesteps))),
                eta: self.eta,
                clip_x0: true,
            },
            "ddpm" => SamplerConfig::Ddpm {
                steps: self.steps,
                variance: crate::parse_word::<DdpmVariance>(
                    &self.variance,
                    "variance",
                    "fixed-small, fixed-large",
                )?,
                clip_x0: true,
            },
            "dpm-solver++" | "dpm-solver" | "dpmsolver++" | "dpm++" => SamplerConfig::DpmSolver {
                steps: self.steps,
                spacing: DpmSpacing::default(),
                clip_x0: true,
            },
            other => {
                anyhow::bail!("unknown --sampler `{other}`: choose ddim, ddpm or dpm-solver++")
            }
        })
    }
}

/// The class-conditioning flags of `sample` and `eval`.
#[derive(Args, Debug, Default)]
pub(crate) struct GuidanceArgs {
    /// Classifier-free guidance scale of a class-conditional model (1: none; larger: samples
    /// closer to their class, less varied; default: the run's `[guidance] scale`).
    #[arg(long, value_name = "S")]
    guidance: Option<f64>,
    /// The class of every sample of a class-conditional model (default: the classes in turn,
    /// one column per class in the grid).
    #[arg(long, value_name = "LABEL")]
    class: Option<u32>,
}

impl GuidanceArgs {
    /// The guidance for `model`: these flags over the run's `[guidance]` (`run`), checked
    /// against the model's classes.
    pub(crate) fn resolve(
        &self,
        model: &ddpm_unet::DiffusionModel,
        run: Option<&ddpm_train::TrainConfig>,
    ) -> Result<Guidance> {
        let mut g = run.map(|c| c.guidance).unwrap_or_default();
        if let Some(s) = self.guidance {
            g.scale = s;
        }
        if self.class.is_some() {
            g.class = self.class;
        }
        let classes = model.config().num_classes();
        if classes.is_none() && self.guidance.is_some_and(|s| s != 1.0) {
            anyhow::bail!(
                "--guidance needs a class-conditional model; this one is unconditional (train \
                 one with --class-conditional)"
            );
        }
        g.validate(classes).map_err(|e| {
            // The flag's own words, not "invalid training config": no config is involved.
            let reason = match e {
                ddpm_train::TrainError::Config(m) => m,
                other => other.to_string(),
            };
            match self.class {
                Some(c) if !reason.starts_with("guidance") => {
                    anyhow::anyhow!("--class {c}: {reason}")
                }
                _ => anyhow::anyhow!("--guidance: {reason}"),
            }
        })?;
        Ok(g)
    }
}

/// Which weights, on which device, in which precision: the model flags of `sample` and `eval`.
#[derive(Args, Debug)]
pub(crate) struct InferenceArgs {
    /// Which weights: ema (default) or raw.
    #[arg(long, default_value = "ema")]
    weights: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Compute precision of the network: f32, or bf16/f16 (CUDA only).
    #[arg(long, default_value = "f32")]
    pub(crate) precision: String,
}

impl InferenceArgs {
    /// Loads `checkpoint` for inference as these flags say: the one loader of `sample` and
    /// `eval`.
    pub(crate) fn load(&self, checkpoint: &Path) -> Result<(candle_core::Device, LoadedModel)> {
        let device = parse_device(&self.device)?;
        let precision = Precision::parse(&self.precision)?;
        precision.check_device(&device)?;
        let weights = parse_weights(&self.weights)?;
        if !checkpoint.exists() {
            anyhow::bail!(
                "--checkpoint {}: no such file or directory: give a run directory, a checkpoint \
                 .json/.safetensors or a weights file",
                checkpoint.display()
            );
        }
        // A training run is one whatever else it holds (a pipeline exported into it by hand).
        let is_run = ddpm_train::checkpoint::list(checkpoint).is_ok_and(|l| !l.is_empty());
        if !is_run
            && (checkpoint.join("model_index.json").is_file()
                || checkpoint.join("unet/config.json").is_file()
                || checkpoint.join("config.json").is_file()
                    && !checkpoint.join("config.toml").exists())
        {
            anyhow::bail!(
                "--checkpoint {}: this is a diffusers pipeline directory, not a training run: \
                 read it with --pretrained {}",
                checkpoint.display(),
                checkpoint.display()
            );
        }
        let mut loaded = load_model(checkpoint, weights, &device)
            .map_err(name_intact)
            .with_context(|| format!("loading {}", checkpoint.display()))?;
        loaded.model = loaded.model.with_compute_dtype(precision.compute_dtype());
        // The run's kernel policy (from its config, or a weights file's metadata; else the
        // default), with the environment's kernel variables applied: the model runs under it.
        let policy = crate::env::install_kernel_policy(loaded.kernels)?;
        loaded.kernels = policy;
        loaded.model = loaded.model.with_kernel_policy(policy);
        Ok((device, loaded))
    }
}

/// A run whose newest checkpoint is damaged: the error says which checkpoint to use instead.
fn name_intact(e: TrainError) -> anyhow::Error {
    match &e {
        TrainError::Damaged(d) => match &d.intact {
            Some((_, json)) => anyhow::anyhow!("{e}: use it with --checkpoint {}", json.display()),
            None => e.into(),
        },
        _ => e.into(),
    }
}

/// Parses `--weights ema|raw`.
pub(crate) fn parse_weights(which: &str) -> Result<WeightsKind> {
    match which {
        "ema" => Ok(WeightsKind::Ema),
        "raw" => Ok(WeightsKind::Raw),
        other => anyhow::bail!("unknown --weights `{other}`: choose ema or raw"),
    }
}

pub fn run(a: SampleArgs) -> Result<()> {
    if a.num == 0 {
        anyhow::bail!("--num must be at least 1");
    }
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1 (images denoised at once)");
    }
    let out_format = grid_format(&a.out)?;
    crate::check_output_file(&a.out, "--out")?;
    if a.pretrained.is_some() {
        crate::pretrained::check_provenance_path(&a.out)?;
    }
    if let Some(g) = &a.gif {
        crate::require_extension(g, "--gif", "gif")?;
        crate::check_output_file(g, "--gif")?;
        if a.frames < 2 {
            anyhow::bail!("--frames must be at least 2 for a GIF");
        }
    }
    let provenance = a.pretrained.as_ref().map(|_| a.out.with_extension("json"));
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &a.out)];
    outputs.extend(a.gif.as_deref().map(|g| ("--gif", g)));
    outputs.extend(
        provenance
            .as_deref()
            .map(|p| ("the provenance record of --out", p)),
    );
    crate::check_distinct_outputs(&outputs)?;
    if let Some(dir) = &a.out_dir {
        check_out_dir(dir, a.num, &outputs)?;
    }
    let mut source = None;
    let mut run_config = None;
    let (model, schedule, objective, sampler) = match (&a.pretrained, &a.checkpoint) {
        (Some(arg), _) => {
            let hub = crate::env::hub_options()?;
            let found = crate::pretrained::resolve(arg, a.revision.as_deref(), &hub)?;
            let p =
                crate::pretrained::load(&found.dir, &a.inference.device, &a.inference.precision)?;
            source = Some(found);
            let sampler = p.sampler(a.sampler.config(p.schedule.timesteps())?);
            (p.model, p.schedule, p.objective, sampler)
        }
        (None, Some(checkpoint)) => {
            let (device, loaded) = a.inference.load(checkpoint)?;
            let sampler = a.sampler.config(loaded.schedule.timesteps)?;
            let schedule = Schedule::new(&loaded.schedule, &device)?;
            run_config = loaded.config;
            (loaded.model, schedule, loaded.objective, sampler)
        }
        (None, None) => anyhow::bail!("give --checkpoint or --pretrained"),
    };
    let states = sampler.build(&schedule)?.timesteps().len() + 1;
    let gif_frames = if a.gif.is_some() {
        a.frames.min(states)
    } else {
        0
    };
    check_memory(a.num, gif_frames, model.config())?;
    let frames = if a.gif.is_some() && a.frames > states {
        tracing::info!(
            "--frames {} is more than the {states} states of a {}-step sampler: the GIF has \
             {states} frames",
            a.frames,
            states - 1
        );
        states
    } else {
        a.frames
    };
    let opts = SampleOptions {
        num: a.num,
        sampler,
        seed: a.seed,
        batch_size: a.batch_size,
        frames: if a.gif.is_some() { frames } else { 0 },
        progress: !a.quiet,
        guidance: a.guidance.resolve(&model, run_config.as_ref())?,
    };
    let samples = sample(&model, &schedule, objective, &opts)?;
    let nrow = grid_columns(a.num, model.config().num_classes(), &opts.guidance);
    save_grid(&samples.images, nrow, &a.out, out_format)
        .with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(path = %a.out.display(), images = a.num, "sample grid written");
    if let Some(source) = &source {
        let settings = serde_json::json!({ "num": a.num, "seed": a.seed, "sampler": opts.sampler });
        let path = crate::pretrained::write_provenance(&a.out, source, settings)?;
        tracing::info!(path = %path.display(), commit = ?source.commit, "provenance written");
    }
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --out-dir {}", dir.display()))?;
        for i in 0..a.num {
            let p = dir.join(sample_name(i));
            // The error names the file.
            image_io::save_image(&samples.images.get(i)?, &p)
                .context("writing the --out-dir images")?;
        }
        tracing::info!(dir = %dir.display(), "individual samples written");
    }
    if let Some(gif) = &a.gif {
        write_gif(&samples.frames, nrow, gif)?;
        tracing::info!(path = %gif.display(), frames = samples.frames.len(), "reverse-process GIF written");
    }
    Ok(())
}

/// Checks `--out-dir` before any work: a directory, or one that can be created; the
/// `sample-NNNNN.png` files of the `num` samples writable there; and none of them one of the
/// command's other `outputs` (which it would silently replace).
fn check_out_dir(dir: &Path, num: usize, outputs: &[(&str, &Path)]) -> Result<()> {
    if dir.is_file() {
        anyhow::bail!(
            "--out-dir {} is a file: name a directory (new or existing) for the samples",
            dir.display()
        );
    }
    ddpm_fs::check_output_dir(dir)
        .map_err(|e| anyhow::anyhow!("--out-dir {}: {e}", dir.display()))?;
    let Ok(dir_id) = std::fs::canonicalize(dir) else {
        // Not there yet: created at the end, empty.
        return Ok(());
    };
    for (flag, path) in outputs {
        let Ok(id) = ddpm_fs::output_identity(path) else {
            continue;
        };
        let index = id.file_name().and_then(sample_index);
        if id.parent() == Some(dir_id.as_path()) && index.is_some_and(|i| i < num) {
            anyhow::bail!(
                "{flag} {} is one of the --out-dir {} images ({}), which would replace it: name \
                 it differently or choose another --out-dir (nothing was written)",
                path.display(),
                dir.display(),
                id.display()
            );
        }
    }
    // What is there already (a FIFO, a directory, a read-only file) of the names to be written;
    // the directory's entries are read, not `num` names tried (`num` may be absurd here).
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading --out-dir {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if sample_index(&name).is_some_and(|i| i < num) {
            crate::check_output_file(&dir.join(name), "--out-dir")?;
        }
    }
    Ok(())
}

/// The sample whose `--out-dir` image is named `name` ([`sample_name`]), if any.
fn sample_index(name: &std::ffi::OsStr) -> Option<usize> {
    let digits = name
        .to_str()?
        .strip_prefix("sample-")?
        .strip_suffix(".png")?;
    let i: usize = digits.parse().ok()?;
    (sample_name(i) == format!("sample-{digits}.png")).then_some(i)
}

/// The file name of sample `i` in `--out-dir`.
fn sample_name(i: usize) -> String {
    format!("sample-{i:05}.png")
}

/// Refuses a `--num` whose samples cannot be held in the available memory (every image is kept
/// in `f32` until the grid is written, and `frames` states of each for a GIF), before the
/// sampling runs for hours and ends in an abort.
fn check_memory(num: usize, frames: usize, config: &ddpm_unet::ModelConfig) -> Result<()> {
    use ddpm_train::memory::human_bytes;
    let Some(available) = crate::train::available_memory() else {
        return Ok(());
    };
    let side = config.image_size() as u64;
    let per_image = (config.channels() as u64)
        .saturating_mul(side.saturating_mul(side))
        .saturating_mul(4);
    // The images, their 8-bit grid, and the GIF's states.
    let copies = 2 + frames as u64;
    let need = per_image.saturating_mul(num as u64).saturating_mul(copies);
    if need <= available {
        return Ok(());
    }
    let fits = available / per_image.saturating_mul(copies).max(1);
    let fix = if frames > 0 {
        format!(
            "lower --num (at most about {fits} fit with {frames} GIF frames) or --frames, or \
             leave out --gif"
        )
    } else {
        format!(
            "lower --num (at most about {fits} fit) and draw more in several runs with \
             different --seed"
        )
    };
    anyhow::bail!(
        "--num {num}: the samples need at least {} of memory{} but {} is available; {fix}",
        human_bytes(need),
        if frames > 0 {
            " with the GIF's frames"
        } else {
            ""
        },
        human_bytes(available),
    )
}

/// The image format `--out` names by its extension: PNG or JPEG; anything else is refused
/// (the bytes written must be what the name says).
fn grid_format(path: &Path) -> Result<image::ImageFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(image::ImageFormat::Jpeg),
        other => anyhow::bail!(
            "--out {}: {} is not an image format this program writes: name the grid .png or \
             .jpg",
            path.display(),
            other.map_or("no extension".to_string(), |e| format!("`.{e}`"))
        ),
    }
}

/// Writes the grid of `images` in `format`, whole or not at all (an earlier file at `path`
/// stays until the new one is complete).
fn save_grid(images: &Tensor, nrow: usize, path: &Path, format: image::ImageFormat) -> Result<()> {
    let grid = image_io::image_grid(images, nrow)?;
    let bytes = image_io::encode(&grid, format, path)?;
    image_io::write_atomic(path, &bytes)?;
    Ok(())
}

/// Writes the frames as an animated GIF, encoded in memory, then written whole or not at all.
fn write_gif(frames: &[Tensor], nrow: usize, path: &Path) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, DynamicImage, Frame};
    let mut bytes = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut bytes, 10);
        enc.set_repeat(Repeat::Infinite)?;
        let n = frames.len();
        for (i, f) in frames.iter().enumerate() {
            let grid = image_io::image_grid(&f.clamp(-1f32, 1f32)?, nrow)?;
            let rgba = DynamicImage::ImageRgb8(grid).to_rgba8();
            // Hold the last frame longer so the result is visible.
            let ms = if i + 1 == n { 2000 } else { 120 };
            enc.encode_frame(Frame::from_parts(
                rgba,
                0,
                0,
                Delay::from_numer_denom_ms(ms, 1),
            ))?;
        }
    }
    image_io::write_atomic(path, &bytes)
        .with_context(|| format!("writing --gif {}", path.display()))?;
    Ok(())
}
