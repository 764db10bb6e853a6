//! `ddpm sample --pretrained REPO_OR_DIR`: a diffusers DDPM pipeline (the google/ddpm-* layout:
//! `model_index.json`, `unet/`, `scheduler/`; or the flat layout with `config.json`, the weights
//! and `scheduler_config.json` at the top) as a model, a schedule and what the network predicts.
//! REPO_OR_DIR is a local directory when one exists, else a Hub model repository such as
//! google/ddpm-cifar10-32, whose needed files are downloaded into the Hugging Face cache through
//! `ddpm_data::hub` (hf-hub, with size and checksum checks) at `--revision`. The reading lives in
//! `ddpm_unet::diffusers` and `ddpm_schedule::diffusers`; this module finds the files and wires
//! them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use ddpm_data::hub::{Hub, HubOptions, Repo, Snapshot};
use ddpm_schedule::diffusers::DiffusersScheduler;
use ddpm_schedule::{DdpmVariance, Objective, SamplerConfig, Schedule};
use ddpm_train::{parse_device, Precision};
use ddpm_unet::diffusers::{
    find_unet_files, is_fp16_variant, load_unet_dir, CONFIG_FILE, FP16_VARIANT_FILES,
    UNET_SUBFOLDER, WEIGHTS_FILES,
};
use ddpm_unet::DiffusionModel;
use serde::Serialize;

/// Where a `--pretrained` pipeline was found: the local directory read, and for a Hub
/// repository the revision asked for and the commit it resolved to.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PipelineSource {
    /// What `--pretrained` said.
    pub pretrained: String,
    /// The directory the pipeline was read from (a snapshot folder of the cache for the Hub).
    pub dir: PathBuf,
    /// The Hub repository, when it came from the Hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The revision asked for (`--revision`, default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The commit the revision resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The Hub endpoint asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Whether the files came from the cache in offline mode.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
    /// The files of the pipeline this program reads, relative to `dir`.
    pub files: Vec<String>,
}

/// The files of a pipeline to fetch from a repository listing `listed` (the files of the commit
/// online, the cached ones offline): the pipeline layout when `unet/config.json` is listed, else
/// the flat one; the weights as safetensors when listed, else `.bin`. `None` when neither
/// layout's config is listed.
fn needed_files(listed: &[&str]) -> Option<Vec<String>> {
    let has = |p: &str| listed.contains(&p);
    let unet_config = format!("{UNET_SUBFOLDER}/{CONFIG_FILE}");
    let (prefix, scheduler) = if has(&unet_config) {
        (
            format!("{UNET_SUBFOLDER}/"),
            "scheduler/scheduler_config.json",
        )
    } else if has(CONFIG_FILE) {
        (String::new(), "scheduler_config.json")
    } else {
        return None;
    };
    let mut files = Vec::new();
    if has("model_index.json") {
        files.push("model_index.json".to_string());
    }
    files.push(format!("{prefix}{CONFIG_FILE}"));
    // Safetensors when listed, else the pickle, else an fp16 variant; with none, the first name,
    // so that the download names what is missing.
    let weights = WEIGHTS_FILES
        .iter()
        .chain(&FP16_VARIANT_FILES)
        .map(|w| format!("{prefix}{w}"))
        .find(|w| has(w))
        .unwrap_or_else(|| format!("{prefix}{}", WEIGHTS_FILES[0]));
    files.push(weights);
    files.push(scheduler.to_string());
    Some(files)
}

/// Whether `arg` reads as a path rather than a Hub repository id.
fn looks_like_path(arg: &str) -> bool {
    arg.starts_with(['.', '/', '~'])
        || arg.contains('\\')
        || arg.split('/').count() > 2
        || Path::new(arg).exists()
}

/// Finds the pipeline `--pretrained` names: the local directory `arg` when it exists, else the
/// Hub model repository `arg` at `revision` (default `main`), its needed files brought into the
/// cache (verified) through `options`.
pub(crate) fn resolve(
    arg: &str,
    revision: Option<&str>,
    options: &HubOptions,
) -> Result<PipelineSource> {
    if arg.trim().is_empty() {
        anyhow::bail!(
            "--pretrained is empty: give a pipeline directory or a Hub repository such as \
             google/ddpm-cifar10-32"
        );
    }
    let local = Path::new(arg);
    if local.is_dir() {
        if let Some(rev) = revision {
            anyhow::bail!(
                "--revision {rev}: --pretrained {arg} is a local directory, which has no \
                 revisions (--revision is for a Hub repository such as google/ddpm-cifar10-32)"
            );
        }
        return Ok(PipelineSource {
            pretrained: arg.to_string(),
            dir: local.to_path_buf(),
            repo: None,
            revision: None,
            commit: None,
            endpoint: None,
            offline: false,
            files: local_files(local)?,
        });
    }
    if looks_like_path(arg) {
        anyhow::bail!(
            "--pretrained {arg}: no such directory (give a local diffusers pipeline directory or \
             a Hub repository such as google/ddpm-cifar10-32)"
        );
    }
    let repo = Repo::model(arg).with_context(|| format!("--pretrained {arg}"))?;
    let revision = revision.unwrap_or("main");
    let hub = Hub::new(options)?;
    let snapshot = hub.snapshot(&repo, revision).with_context(|| {
        format!("--pretrained {arg} (no such local directory, so a Hub repository)")
    })?;
    let files = pipeline_files(&snapshot)?;
    let mut dir: Option<PathBuf> = None;
    for rel in &files {
        let local = hub.get(&snapshot, rel)?;
        // The snapshot folder: the file's path less its path in the repository.
        let root = rel
            .split('/')
            .try_fold(local.as_path(), |p, _| p.parent())
            .map(Path::to_path_buf);
        dir = dir.or(root);
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("{}: no files fetched", snapshot.label()))?;
    tracing::info!(
        repo = %repo,
        revision,
        commit = %snapshot.commit,
        offline = snapshot.offline,
        dir = %dir.display(),
        "Hub pipeline ready"
    );
    Ok(PipelineSource {
        pretrained: arg.to_string(),
        dir,
        repo: Some(repo.id.clone()),
        revision: Some(revision.to_string()),
        commit: Some(snapshot.commit.clone()),
        endpoint: (!snapshot.offline).then(|| options.endpoint()),
        offline: snapshot.offline,
        files,
    })
}

/// The files [`load`] reads from the local pipeline directory `dir`, relative to it and with `/`
/// separators (as a Hub repository lists them): `model_index.json` when there is one, the UNet's
/// config and weights, the scheduler config. Found by the same functions `load` uses, so a
/// directory `load` cannot read is the same error here.
fn local_files(dir: &Path) -> Result<Vec<String>> {
    let scheduler = scheduler_file(dir)?;
    let unet =
        find_unet_files(dir).with_context(|| format!("loading the UNet of {}", dir.display()))?;
    let index = dir.join("model_index.json");
    let read =
        index
            .is_file()
            .then_some(index)
            .into_iter()
            .chain([unet.config, unet.weights, scheduler]);
    Ok(read.map(|path| relative(dir, &path)).collect())
}

/// `path` relative to `dir`, its components joined by `/`.
fn relative(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// [`needed_files`] of a snapshot, or an error naming the repository and what it holds.
fn pipeline_files(snapshot: &Snapshot) -> Result<Vec<String>> {
    let listed: Vec<&str> = snapshot.files.iter().map(|f| f.path.as_str()).collect();
    needed_files(&listed).ok_or_else(|| {
        if snapshot.offline {
            anyhow::anyhow!(
                "{}: the Hub cache holds no unet/config.json nor config.json of it and offline \
                 mode is on (HF_HUB_OFFLINE): run once online to download it, or point HF_HOME \
                 at a cache that holds it",
                snapshot.label()
            )
        } else {
            anyhow::anyhow!(
                "{}: not a diffusers DDPM pipeline (no unet/config.json nor config.json among its \
                 {} files)",
                snapshot.label(),
                listed.len()
            )
        }
    })
}

/// Refuses, before any work, a grid name whose provenance file ([`write_provenance`]: the
/// grid's name with `.json`) would replace a file that is not an earlier provenance record
/// (a checkpoint's JSON, an eval report, anything of the user's).
pub(crate) fn check_provenance_path(out: &Path) -> Result<()> {
    use crate::output::Existing;
    let path = out.with_extension("json");
    let found = crate::output::existing(&path, 1 << 20, |bytes| {
        crate::output::json_has(bytes, "pretrained", |_| true)
    })?;
    if matches!(found, Existing::NotRegular | Existing::Foreign) {
        anyhow::bail!(
            "--out {}: its provenance record would replace {}, which is not one: name the grid \
             differently (nothing was written)",
            out.display(),
            path.display()
        );
    }
    Ok(())
}

/// Writes `source` and `extra` (the sampling settings) as JSON beside the output `out`
/// (`samples.png` -> `samples.json`), so that the images say which pipeline and commit made
/// them.
pub(crate) fn write_provenance(
    out: &Path,
    source: &PipelineSource,
    extra: serde_json::Value,
) -> Result<PathBuf> {
    let path = out.with_extension("json");
    let mut value = serde_json::json!({ "pretrained": source });
    if let (Some(map), serde_json::Value::Object(more)) = (value.as_object_mut(), extra) {
        map.extend(more);
    }
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    ddpm_fs::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The file `ddpm export` keeps in its output directory while it writes (removed last): a
/// directory holding it is an unfinished export, refused by `--pretrained`.
pub(crate) const INCOMPLETE_EXPORT: &str = ".ddpm-export-incomplete";

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
    /// The scheduler config as read: its betas, their diffusers name and our named schedule
    /// that reproduces them, if any.
    pub scheduler: DiffusersScheduler,
    /// The scheduler config file read.
    pub scheduler_file: PathBuf,
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
            // Other samplers keep their own clipping setting.
            #[allow(unreachable_patterns)]
            other => other,
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
    if dir.join(INCOMPLETE_EXPORT).exists() {
        anyhow::bail!(
            "{} holds a `ddpm export` that did not finish ({INCOMPLETE_EXPORT} is there): its \
             files may come from two different runs; run the export again (with --force)",
            dir.display()
        );
    }
    let path = dir.join("model_index.json");
    if path.exists() && !path.is_file() {
        anyhow::bail!("{} is not a file", path.display());
    }
    if !path.is_file() {
        return Ok(());
    }
    let text =
        ddpm_fs::read_regular_text(&path).with_context(|| format!("reading {}", path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if !index.is_object() || index.get("_class_name").is_none() {
        anyhow::bail!(
            "{}: no `_class_name`, so not a diffusers pipeline index (a DDPMPipeline's names its \
             class, scheduler and unet)",
            path.display()
        );
    }
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
        anyhow::bail!("--pretrained {}: no such directory", dir.display());
    }
    let device = parse_device(device)?;
    let precision = Precision::parse(precision)?;
    precision.check_device(&device)?;
    check_model_index(dir)?;
    let sched_path = scheduler_file(dir)?;
    let text = ddpm_fs::read_regular_text(&sched_path)
        .with_context(|| format!("reading {}", sched_path.display()))?;
    let scheduler = DiffusersScheduler::from_json(&text)
        .with_context(|| format!("reading {}", sched_path.display()))?;
    let unet = load_unet_dir(dir, &device, DType::F32)
        .with_context(|| format!("loading the UNet of {}", dir.display()))?;
    for note in unet.config.notes.iter().chain(&scheduler.notes) {
        tracing::info!("{note}");
    }
    if is_fp16_variant(&unet.files.weights) {
        tracing::warn!(
            weights = %unet.files.weights.display(),
            "the pipeline has only half-precision (fp16 variant) UNet weights: they are read into \
             f32, so the samples differ slightly from those of full-precision weights"
        );
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
        scheduler,
        scheduler_file: sched_path,
    })
}
