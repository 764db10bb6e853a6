//! `ddpm eval`: the negative variational bound in bits/dim on a data split, and sample quality
//! in the feature space of a classifier the tool trains itself; with `--samples`, the
//! recognisability numbers of any folder or grid of images, without a model; a readable report
//! on stdout and a JSON report (`docs/quality.md` says how every number is computed).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ddpm_data::{DataConfig, Dataset, DatasetSpec, Split};
use ddpm_schedule::{
    BoundConfig, DdpmVariance, NormalCdf, Objective, SamplerConfig, Schedule, ScheduleConfig,
};
use ddpm_train::eval::classifier::{self, ClassifierConfig, ClassifierTraining};
use ddpm_train::eval::fid::{frechet_distance, GaussianStats};
use ddpm_train::eval::inception::{self, weights, InceptionFid, FID_WEIGHTS_URL};
use ddpm_train::eval::memorization::MemorizationOptions;
use ddpm_train::eval::quality::ClassifierSummary;
use ddpm_train::eval::recognisable::{self, DEFAULT_CONFIDENCE};
use ddpm_train::eval::report::{EVAL_FORMAT, SAMPLES_FORMAT};
use ddpm_train::eval::{
    self as ev, EvalReport, ListedBetas, LoadedClassifier, NllOptions, QualityOptions,
    SampleLoadOptions, SamplesReport,
};
use ddpm_train::TrainConfig;
use ddpm_unet::DiffusionModel;

/// Arguments of `ddpm eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A run directory (newest checkpoint), a checkpoint .json/.safetensors, or a weights file.
    #[arg(long, required_unless_present_any = ["samples", "pretrained"])]
    checkpoint: Option<PathBuf>,
    /// Evaluate a diffusers DDPM pipeline instead of a checkpoint: a local directory or a Hub
    /// repository such as google/ddpm-cifar10-32 (docs/pretrained.md); the schedule comes from
    /// its scheduler_config.json (named or listed betas alike); say the data with --dataset.
    #[arg(long, value_name = "REPO_OR_DIR", conflicts_with_all = ["checkpoint", "samples", "weights"])]
    pretrained: Option<String>,
    /// The revision (branch, tag or commit) of a --pretrained Hub repository (default: main).
    #[arg(long, value_name = "REV", requires = "pretrained")]
    revision: Option<String>,
    /// Score these images instead of a model's samples, with no checkpoint: a folder of
    /// .png/.jpg images (sorted by name) or one grid image as `ddpm sample` and training write
    /// them. Prints the recognisable share, class histogram and entropy, and classifier-feature
    /// FID of the images next to real held-out test images of --dataset.
    #[arg(long, value_name = "DIR_OR_GRID", conflicts_with_all = [
        "checkpoint", "nll", "quality", "limit", "nll_timesteps", "num_samples", "split",
        "weights", "device", "precision",
    ])]
    samples: Option<PathBuf>,
    /// Side of a grid cell of --samples (default: the data set's image size).
    #[arg(long, value_name = "H", requires = "samples")]
    grid_cell: Option<usize>,
    /// Padding pixels around the cells of a --samples grid (ours and torchvision's: 2).
    #[arg(long, value_name = "P", default_value_t = 2, requires = "samples")]
    grid_padding: usize,
    /// Take the first N cells of a --samples grid (default: all but empty cells at the end of
    /// its last row).
    #[arg(long, value_name = "N", requires = "samples")]
    grid_count: Option<usize>,
    /// Refuse --samples images of another size than the data set's instead of resizing them.
    #[arg(long, requires = "samples")]
    strict_size: bool,
    /// A sample is "recognisable" when the classifier's largest class probability is at least
    /// this.
    #[arg(long, default_value_t = DEFAULT_CONFIDENCE)]
    confidence: f64,
    /// mnist, fashion-mnist, cifar10, flowers or folder:PATH (default: the run's data set; with
    /// --samples, mnist).
    #[arg(long)]
    dataset: Option<String>,
    /// The split to evaluate: test, train or all.
    #[arg(long, default_value = "test")]
    split: String,
    /// Compute the bound on at most N images of the split (a seeded random subset).
    #[arg(long)]
    limit: Option<usize>,
    /// Data root holding mnist/, cifar10/, flowers/ (default: the run's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Image size of the data (default: the run's; it must match the model).
    #[arg(long)]
    image_size: Option<usize>,
    /// Compute the negative variational bound in bits/dim. With neither --nll nor --quality, both
    /// are computed.
    #[arg(long)]
    nll: bool,
    /// Estimate the middle terms from K stratified timesteps per image instead of all T.
    #[arg(long, value_name = "K")]
    nll_timesteps: Option<usize>,
    /// Reverse variance of the bound: fixed-large (beta_t, the DDPM paper's) or fixed-small
    /// (the posterior variance). Default: fixed-large for a checkpoint; for --pretrained, the
    /// scheduler's variance_type.
    #[arg(long, value_name = "VARIANCE")]
    nll_variance: Option<String>,
    /// Standard normal CDF of the decoder term: exact (erf) or approx (the DDPM code's tanh).
    #[arg(long, default_value = "exact")]
    nll_cdf: String,
    /// Do not clip the predicted x_0 to [-1, 1] in the bound.
    #[arg(long)]
    nll_no_clip: bool,
    /// Compute sample quality (classifier-feature FID, Inception-style score, class histogram,
    /// memorization).
    #[arg(long)]
    quality: bool,
    /// Samples to draw for the quality metrics (and test images to compare with).
    #[arg(long, default_value_t = 1000)]
    num_samples: usize,
    /// The sampler of the quality metrics.
    #[command(flatten)]
    sampler: crate::sample::SamplerArgs,
    #[command(flatten)]
    inference: crate::sample::InferenceArgs,
    #[command(flatten)]
    guidance: crate::sample::GuidanceArgs,
    /// Train the feature classifier even if one is stored (implies --quality).
    #[arg(long)]
    train_classifier: bool,
    /// The classifier file (default: DATA_ROOT/classifiers/<dataset>-<size>.safetensors).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Classifier training steps.
    #[arg(long)]
    classifier_steps: Option<usize>,
    /// Classifier width (channels of its first convolution, a multiple of 4).
    #[arg(long)]
    classifier_width: Option<usize>,
    /// Classifier feature dimension (the penultimate layer the FID uses).
    #[arg(long)]
    classifier_features: Option<usize>,
    /// Classifier training batch size.
    #[arg(long)]
    classifier_batch_size: Option<usize>,
    /// Memorization threshold as a multiple of the median test-to-train nearest-neighbour
    /// distance.
    #[arg(long, default_value_t = 0.5)]
    memorization_ratio: f64,
    /// Closest sample/training pairs to report and draw.
    #[arg(long, default_value_t = 16)]
    nearest_pairs: usize,
    /// PNG of the closest pairs (default: beside the report, `<report>-nearest.png`).
    #[arg(long)]
    nearest_png: Option<PathBuf>,
    /// PNG grid of the samples (default: beside the report, `<report>-samples.png`).
    #[arg(long)]
    samples_png: Option<PathBuf>,
    /// The JSON report (default: RUN/eval.json; with --samples, `<DIR_OR_GRID>-eval.json` beside
    /// it).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed of the bound's noise and of the samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Do not fetch a missing data set; fail instead.
    #[arg(long)]
    no_fetch: bool,
    /// The features of the FIDs: classifier (the offline default: a small classifier trained
    /// on the data set; comparable only between our runs) or inception (pytorch-fid's
    /// Inception-v3 pool3, comparable with published FIDs; needs its weights, fetched once).
    #[arg(long, value_name = "KIND", default_value = "classifier")]
    fid: String,
    /// pytorch-fid's Inception weights for --fid inception: a URL, fetched once into the cache
    /// (DDPM_CACHE_DIR, default DATA_ROOT/cache) and checked against the SHA-256 prefix its name
    /// carries, or a local .pth/.safetensors file (checked the same way when its name carries
    /// a prefix).
    #[arg(long, value_name = "URL_OR_PATH", default_value = FID_WEIGHTS_URL)]
    inception_weights: String,
    /// Hide the progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The Inception network of `--fid inception` on `device` (`None` for `--fid classifier`), its
/// weights found as `--inception-weights` says: a URL through the cache under `data_root`
/// (refused with `--no-fetch` unless cached), a local file as it is.
fn inception_of(
    a: &EvalArgs,
    data_root: &Path,
    device: &candle_core::Device,
) -> Result<Option<InceptionFid>> {
    match a.fid.as_str() {
        "classifier" => return Ok(None),
        "inception" => {}
        other => anyhow::bail!("--fid {other}: use classifier or inception"),
    }
    let source = a.inception_weights.as_str();
    let is_url = ["http://", "https://", "file://"]
        .iter()
        .any(|scheme| source.starts_with(scheme));
    let path = if is_url {
        let cache = crate::env::cache_dir(data_root);
        let name = source.rsplit('/').next().unwrap_or(source);
        if a.no_fetch && !cache.join(name).is_file() {
            anyhow::bail!(
                "--fid inception: the Inception weights {name} are not in the cache {} and \
                 --no-fetch forbids fetching them from {source}: drop --no-fetch, or pass a \
                 local copy with --inception-weights FILE",
                cache.display()
            );
        }
        let opts = ddpm_data::FetchOptions {
            progress: !a.quiet,
            roots: crate::env::trusted_roots(),
            proxy: crate::env::proxy(),
            ..ddpm_data::FetchOptions::new(&cache)
        };
        weights::ensure_weights_with(&cache, source, &opts).context("--inception-weights")?
    } else {
        let path = PathBuf::from(source);
        if !path.is_file() {
            anyhow::bail!(
                "--inception-weights {source}: no such file (pass pytorch-fid's weights file, \
                 {}, or a URL)",
                weights::FID_WEIGHTS_FILE
            );
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match weights::hash_prefix(&name) {
            Some(prefix) => {
                let digest = weights::sha256_file(&path).context("--inception-weights")?;
                if !digest.starts_with(&prefix.to_ascii_lowercase()) {
                    anyhow::bail!(
                        "--inception-weights {source}: its SHA-256 starts with {}, not the {prefix} \
                         its name promises: the file is damaged or not pytorch-fid's, so fetch it \
                         again (or, if the digits after the name's last `-` are not a hash, such \
                         as a step or a date, rename the file without them)",
                        &digest[..prefix.len().min(digest.len())]
                    );
                }
            }
            None => tracing::warn!(
                path = %path.display(),
                "the Inception weights' name carries no SHA-256 prefix: loaded unverified"
            ),
        }
        path
    };
    tracing::info!(weights = %path.display(), "Inception-v3 (pytorch-fid) for the FID");
    let net = InceptionFid::load(&path, device).context("--inception-weights")?;
    Ok(Some(net.with_batch_size(a.batch_size.min(32))))
}

/// The run directory a checkpoint path belongs to: the directory itself, or the folder above
/// `checkpoints/` for a checkpoint file, or the file's folder.
fn run_dir_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.file_name().is_some_and(|n| n == "checkpoints") {
        parent.parent().unwrap_or(parent).to_path_buf()
    } else {
        parent.to_path_buf()
    }
}

/// `dir/stem-suffix` beside `report`.
fn beside(report: &Path, suffix: &str) -> PathBuf {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "eval".into());
    report.with_file_name(format!("{stem}-{suffix}"))
}

/// [`check_output`] for the JSON report, which must be named `.json` and may replace only
/// an earlier report of ours: any other file at that path (a run's `config.toml` given by
/// mistake, a device, a pipe) is refused untouched.
fn check_report_path(path: &Path) -> Result<()> {
    crate::require_extension(path, "--report", "json")?;
    check_output(path, "--report", MAX_REPORT_BYTES, |bytes| {
        crate::output::json_has(bytes, "format", |f| f == EVAL_FORMAT || f == SAMPLES_FORMAT)
    })
}

/// [`check_output`] for a PNG output (`flag` names it), which must be named `.png` and may
/// replace only a PNG.
fn check_png_path(path: &Path, flag: &str) -> Result<()> {
    crate::require_extension(path, flag, "png")?;
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    check_output(path, flag, SIGNATURE.len() as u64, |bytes| {
        bytes == SIGNATURE
    })
}

/// The largest existing report [`check_report_path`] reads to recognise it.
const MAX_REPORT_BYTES: u64 = 1 << 26;

/// Checks an output path: its directory exists, and what is there already is a writable regular
/// file whose first `head` bytes `ours` recognises, or nothing ([`crate::output::existing`]).
fn check_output(path: &Path, flag: &str, head: u64, ours: impl Fn(&[u8]) -> bool) -> Result<()> {
    use crate::output::Existing;
    match crate::output::existing(path, head, ours)
        .with_context(|| format!("{flag} {}", path.display()))?
    {
        Existing::Absent => crate::check_output_file(path, flag),
        Existing::Ours => {
            crate::check_output_file(path, flag)?;
            tracing::info!(path = %path.display(), "replacing an earlier output");
            Ok(())
        }
        Existing::NotRegular => anyhow::bail!(
            "{flag} {} exists and is not a regular file: name a new file",
            path.display()
        ),
        Existing::Foreign => anyhow::bail!(
            "{flag} {} exists and is not an earlier output of this command: name a new file \
             (nothing was written)",
            path.display()
        ),
    }
}

/// The data set and its configuration: the run's unless flags say otherwise.
fn data_of(a: &EvalArgs, checkpoint: &Path, subject: &Subject) -> Result<TrainConfig> {
    let run = subject.config.as_ref();
    let spec: DatasetSpec = match (&a.dataset, run) {
        (Some(d), _) => d.parse().with_context(|| format!("--dataset {d}"))?,
        (None, Some(c)) => c.dataset.clone(),
        (None, None) => anyhow::bail!(
            "{} is a weights file without a run configuration: say which data to evaluate on \
             with --dataset",
            checkpoint.display()
        ),
    };
    let mut data = match run {
        Some(c) if c.dataset == spec => c.data.clone(),
        _ => DataConfig {
            image_size: spec
                .native_size()
                .is_none()
                .then(|| subject.model.config().image_size()),
            ..DataConfig::default()
        },
    };
    if let Some(root) = &a.data_dir {
        data.root = root.clone();
    } else if let Some(c) = run {
        data.root = c.data.root.clone();
    }
    if let Some(s) = a.image_size {
        data.image_size = Some(s);
    }
    Ok(TrainConfig {
        dataset: spec,
        data,
        ..TrainConfig::default()
    })
}

fn open(c: &TrainConfig, split: Split) -> Result<Dataset> {
    Dataset::open(&c.dataset, &c.data, split)
        .with_context(|| format!("opening the {split} split of {}", c.dataset))
}

/// The feature classifier of `data` (stored, or trained on `train` and measured on `test`), as
/// the classifier flags say.
fn load_classifier(
    a: &EvalArgs,
    data: &TrainConfig,
    train: &Dataset,
    test: &Dataset,
    device: &candle_core::Device,
) -> Result<LoadedClassifier> {
    let defaults = ClassifierConfig::for_dataset(train);
    let config = ClassifierConfig {
        width: a.classifier_width.unwrap_or(defaults.width),
        feature_dim: a.classifier_features.unwrap_or(defaults.feature_dim),
        ..defaults
    };
    let base = ClassifierTraining::default();
    let training = ClassifierTraining {
        steps: a.classifier_steps.unwrap_or(base.steps),
        batch_size: a.classifier_batch_size.unwrap_or(base.batch_size),
        ..base
    };
    let path = a.classifier.clone().unwrap_or_else(|| {
        classifier::default_path(&data.data.root, &data.dataset, train.image_size())
    });
    classifier::load_or_train(
        &path,
        a.train_classifier,
        &config,
        &training,
        &data.dataset,
        train,
        test,
        device,
        !a.quiet,
    )
    .map_err(|e| {
        // A stored classifier of other images or classes is an error that names the file
        // already: it is not prefixed with it a second time.
        let named = e.to_string().starts_with("the stored classifier ");
        let e = anyhow::Error::from(e);
        if named {
            e
        } else {
            e.context(format!("feature classifier {}", path.display()))
        }
    })
}

/// The default report of `--samples PATH`: `PATH-eval.json` beside the folder, or beside the
/// grid with its extension replaced.
fn samples_report_path(samples: &Path) -> PathBuf {
    let full = std::fs::canonicalize(samples).unwrap_or_else(|_| samples.to_path_buf());
    let stem = if full.is_dir() {
        full.file_name()
    } else {
        full.file_stem()
    }
    .map(|s| s.to_string_lossy().into_owned())
    .unwrap_or_else(|| "samples".into());
    full.with_file_name(format!("{stem}-eval.json"))
}

/// `ddpm eval --samples`: scores images read from files with the classifier of a data set.
fn run_samples(a: &EvalArgs, samples: &Path) -> Result<()> {
    let started = Instant::now();
    recognisable::check_confidence(a.confidence).context("--confidence")?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if !samples.exists() {
        anyhow::bail!(
            "--samples {}: no such folder or image file",
            samples.display()
        );
    }
    let report_path = a
        .report
        .clone()
        .unwrap_or_else(|| samples_report_path(samples));
    check_report_path(&report_path)?;
    let word = a.dataset.as_deref().unwrap_or("mnist");
    let spec: DatasetSpec = word.parse().with_context(|| format!("--dataset {word}"))?;
    let mut data = DataConfig {
        image_size: a.image_size,
        ..DataConfig::default()
    };
    if let Some(root) = &a.data_dir {
        data.root = root.clone();
    }
    let data = TrainConfig {
        dataset: spec,
        data,
        ..TrainConfig::default()
    };
    crate::train::ensure_data(&data, a.no_fetch)?;
    let test = open(&data, Split::Test)?;
    let opts = SampleLoadOptions {
        grid_cell: a.grid_cell,
        grid_padding: a.grid_padding,
        grid_count: a.grid_count,
        strict_size: a.strict_size,
        ..SampleLoadOptions::new(test.channels(), test.image_size())
    };
    let loaded = ev::load_samples(samples, &opts)
        .with_context(|| format!("--samples {}", samples.display()))?;
    let n = loaded.images.dim(0)?;
    if n < 2 {
        anyhow::bail!(
            "--samples {} holds {n} image: the FID needs at least 2",
            samples.display()
        );
    }
    for note in &loaded.notes {
        tracing::warn!("{note}");
    }
    let device = candle_core::Device::Cpu;
    let inception = inception_of(a, &data.data.root, &device)?;
    let train = open(&data, Split::Train)?;
    let clf = load_classifier(a, &data, &train, &test, &device)?;
    let (reference, floor) = recognisable::reference_and_floor(&test, n, a.seed)?;
    let mut numbers = recognisable::recognisability(
        &clf.classifier,
        &loaded.images,
        &reference,
        &floor,
        &test,
        a.confidence,
        a.batch_size,
    )?;
    if let Some(net) = &inception {
        net.rescore(&mut numbers, &loaded.images, &reference, &floor)?;
    }
    let report = SamplesReport {
        format: SAMPLES_FORMAT.to_string(),
        samples: samples.display().to_string(),
        source: loaded.source,
        dataset: data.dataset.to_string(),
        image_size: test.image_size(),
        channels: test.channels(),
        seed: a.seed,
        classifier: ClassifierSummary::of(&clf),
        notes: loaded.notes,
        recognisable: numbers,
        seconds: started.elapsed().as_secs_f64(),
    };
    report
        .write_json(&report_path)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("{}", report.to_text());
    tracing::info!(path = %report_path.display(), "report written");
    Ok(())
}

/// What `ddpm eval` evaluates: a run's model or a diffusers pipeline's, the schedule of its
/// betas built, and what the report says about them.
struct Subject {
    /// The device the model and the schedule live on.
    device: candle_core::Device,
    /// The network (F32 weights, in the compute precision asked for).
    model: DiffusionModel,
    /// The schedule of the model's betas, on `device`.
    schedule: Schedule,
    /// What the network predicts.
    objective: Objective,
    /// Our named schedule of the betas, when one gives them.
    named: Option<ScheduleConfig>,
    /// The record of the betas when no named schedule gives them.
    listed: Option<ListedBetas>,
    /// The training step of the weights, when known.
    step: Option<usize>,
    /// The run's configuration, when loaded from a checkpoint.
    config: Option<TrainConfig>,
    /// What the report names as evaluated: the checkpoint file or the pipeline's directory.
    source: PathBuf,
    /// `ema`, `raw` or `diffusers`.
    weights: String,
    /// The reverse variance of the bound without `--nll-variance`, and whose it is.
    variance: (DdpmVariance, &'static str),
    /// The sampler of the quality metrics.
    sampler: SamplerConfig,
}

/// The model of `--checkpoint` with its run's named schedule; the bound's variance defaults to
/// the DDPM paper's fixed-large.
fn load_checkpoint(a: &EvalArgs, checkpoint: &Path) -> Result<Subject> {
    let (device, loaded) = a.inference.load(checkpoint)?;
    let schedule = Schedule::new(&loaded.schedule, &device)?;
    let sampler = a.sampler.config(loaded.schedule.timesteps)?;
    Ok(Subject {
        device,
        model: loaded.model,
        schedule,
        objective: loaded.objective,
        named: Some(loaded.schedule),
        listed: None,
        step: loaded.step,
        config: loaded.config,
        source: loaded.source,
        weights: loaded.weights.name().to_string(),
        variance: (DdpmVariance::FixedLarge, "the default, fixed-large"),
        sampler,
    })
}

/// The diffusers pipeline of `--pretrained arg` (a local directory, or a Hub repository at
/// `--revision`) loaded by `ddpm sample --pretrained`'s loader: its scheduler's own betas,
/// recorded as our named schedule when one reproduces them and else as listed betas (count,
/// hash, file); its clipping in the sampler; its `variance_type` as the bound's default
/// variance.
fn load_pretrained(a: &EvalArgs, arg: &str) -> Result<Subject> {
    if a.dataset.is_none() {
        anyhow::bail!(
            "--pretrained {arg}: a diffusers pipeline does not say what it was trained on: name \
             the data to evaluate on with --dataset (e.g. cifar10)"
        );
    }
    let hub = crate::env::hub_options()?;
    let found = crate::pretrained::resolve(arg, a.revision.as_deref(), &hub)?;
    let p = crate::pretrained::load(&found.dir, &a.inference.device, &a.inference.precision)?;
    let sampler = p.sampler(a.sampler.config(p.schedule.timesteps())?);
    let s = &p.scheduler;
    let listed = s
        .named
        .is_none()
        .then(|| ListedBetas::new(&s.beta_schedule, &s.betas, &p.scheduler_file));
    if let Some(b) = &listed {
        tracing::info!(
            beta_schedule = %b.beta_schedule,
            count = b.count,
            sha256 = %b.sha256,
            file = %b.file,
            "no named schedule gives the scheduler's betas: evaluated with them as listed"
        );
    }
    Ok(Subject {
        device: p.schedule.device().clone(),
        named: s.named,
        listed,
        model: p.model,
        schedule: p.schedule,
        objective: p.objective,
        step: None,
        config: None,
        source: found.dir,
        weights: "diffusers".to_string(),
        variance: (p.variance, "the scheduler's variance_type"),
        sampler,
    })
}

/// Replaces the classifier-feature FIDs of `q` by Inception FIDs of the same images: the samples
/// read back from their grid (`samples_png`, written losslessly from the 8-bit samples), the
/// reference and floor test images and the training images that [`ev::sample_quality`] picks
/// (the same seeded subsets).
fn inception_quality(
    q: &mut ev::QualityReport,
    net: &InceptionFid,
    samples_png: &Path,
    train: &Dataset,
    test: &Dataset,
    seed: u64,
) -> Result<()> {
    let size = test.image_size();
    let opts = SampleLoadOptions {
        grid_cell: Some(size),
        grid_padding: ddpm_data::image_io::GRID_PADDING as usize,
        grid_count: Some(q.num_samples),
        strict_size: true,
        ..SampleLoadOptions::new(test.channels(), size)
    };
    let samples = ev::load_samples(samples_png, &opts)
        .with_context(|| format!("reading the samples back from {}", samples_png.display()))?
        .images;
    let (reference, floor) = recognisable::reference_and_floor(test, q.num_samples, seed)?;
    let n_ref = reference.dim(0)?;
    let train_idx = ev::subset(
        train.len(),
        n_ref,
        (seed ^ recognisable::SUBSET_DOMAIN).wrapping_add(1),
    );
    let train_images = ev::nll::image_batch(train, &train_idx, &candle_core::Device::Cpu)?;
    let reference_stats = net.rescore(&mut q.recognisable, &samples, &reference, &floor)?;
    q.fid = q.recognisable.samples.fid;
    let train_stats: GaussianStats = net.stats(&train_images)?;
    q.fid_train_vs_test = frechet_distance(&train_stats, &reference_stats)?;
    tracing::info!(
        fid = q.fid,
        fid_train_vs_test = q.fid_train_vs_test,
        features = inception::FID_FEATURES,
        "Inception FID done"
    );
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(samples) = a.samples.clone() {
        return run_samples(&a, &samples);
    }
    if let (Some(rev), None) = (&a.revision, &a.pretrained) {
        anyhow::bail!("--revision {rev} is for --pretrained REPO (a Hub repository)");
    }
    let checkpoint = match (&a.checkpoint, &a.pretrained) {
        (Some(c), _) => c.clone(),
        // Reports land in the working directory unless --report says otherwise.
        (None, Some(_)) => PathBuf::from("."),
        (None, None) => anyhow::bail!(
            "say what to evaluate: --checkpoint RUN, --pretrained REPO_OR_DIR, or --samples \
             DIR_OR_GRID"
        ),
    };
    let started = Instant::now();
    recognisable::check_confidence(a.confidence).context("--confidence")?;
    if a.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let (do_nll, do_quality) = match (a.nll, a.quality || a.train_classifier) {
        (false, false) => (true, true),
        other => other,
    };
    if do_quality && a.num_samples < 2 {
        anyhow::bail!("--num-samples must be at least 2 (the Fréchet distance needs a covariance)");
    }
    let split: Split = a
        .split
        .parse()
        .with_context(|| format!("--split {}", a.split))?;
    let nll_variance = a
        .nll_variance
        .as_deref()
        .map(|w| crate::parse_word::<DdpmVariance>(w, "--nll-variance", "fixed-large, fixed-small"))
        .transpose()?;
    let nll_cdf = crate::parse_word::<NormalCdf>(&a.nll_cdf, "--nll-cdf", "exact, approx")?;
    let subject = match &a.pretrained {
        Some(arg) => load_pretrained(&a, arg)?,
        None => load_checkpoint(&a, &checkpoint)?,
    };
    let bound = BoundConfig {
        variance: nll_variance.unwrap_or_else(|| {
            let (variance, whose) = subject.variance;
            if do_nll {
                tracing::info!(?variance, "no --nll-variance: the bound uses {whose}");
            }
            variance
        }),
        clip_x0: !a.nll_no_clip,
        cdf: nll_cdf,
    };
    let (device, sampler, schedule) = (&subject.device, subject.sampler, &subject.schedule);
    let report_path = a
        .report
        .clone()
        .unwrap_or_else(|| run_dir_of(&checkpoint).join("eval.json"));
    check_report_path(&report_path)?;
    let nearest_png = a
        .nearest_png
        .clone()
        .unwrap_or_else(|| beside(&report_path, "nearest.png"));
    let samples_png = a
        .samples_png
        .clone()
        .unwrap_or_else(|| beside(&report_path, "samples.png"));
    if do_quality {
        check_png_path(&nearest_png, "--nearest-png")?;
        check_png_path(&samples_png, "--samples-png")?;
        crate::check_distinct_outputs(&[
            ("--report", &report_path),
            ("--nearest-png", &nearest_png),
            ("--samples-png", &samples_png),
        ])?;
    }
    let t_max = schedule.timesteps();
    if let Some(k) = a.nll_timesteps {
        if k == 0 || k >= t_max {
            anyhow::bail!(
                "--nll-timesteps must be in 1..={} (T - 1 for this model's T = {t_max}), got {k}",
                t_max.saturating_sub(1)
            );
        }
    }
    sampler
        .build(schedule)
        .context("the sampler does not fit the model's schedule")?;
    let data = data_of(&a, &checkpoint, &subject)?;
    if !do_quality && a.fid != "classifier" {
        anyhow::bail!(
            "--fid {} applies to sample quality: add --quality (or drop --nll)",
            a.fid
        );
    }
    let inception = if do_quality {
        inception_of(&a, &data.data.root, device)?
    } else {
        None
    };
    crate::train::ensure_data(&data, a.no_fetch)?;
    let eval_set = open(&data, split)?;
    ev::check_compatible(&subject.model, &eval_set)?;
    let model_cfg = subject.model.config();

    let nll = if do_nll {
        let n = a.limit.unwrap_or(eval_set.len()).min(eval_set.len());
        let indices = ev::subset(eval_set.len(), n, a.seed);
        let opts = NllOptions {
            bound,
            timesteps_per_image: a.nll_timesteps,
            batch_size: a.batch_size,
            seed: a.seed,
            ranges: 4,
            progress: !a.quiet,
        };
        Some(ev::variational_bound(
            &subject.model,
            schedule,
            subject.objective,
            &eval_set,
            &indices,
            &opts,
        )?)
    } else {
        None
    };

    let quality = if do_quality {
        let train = open(&data, Split::Train)?;
        let test_owned;
        let test = if split == Split::Test {
            &eval_set
        } else {
            test_owned = open(&data, Split::Test)?;
            &test_owned
        };
        let clf = load_classifier(&a, &data, &train, test, device)?;
        let opts = QualityOptions {
            num_samples: a.num_samples,
            sampler,
            seed: a.seed,
            batch_size: a.batch_size,
            memorization: MemorizationOptions {
                ratio: a.memorization_ratio,
                pairs: a.nearest_pairs,
                png: Some(nearest_png),
            },
            samples_png: Some(samples_png.clone()),
            confidence: a.confidence,
            progress: !a.quiet,
            guidance: a
                .guidance
                .resolve(&subject.model, subject.config.as_ref())?,
        };
        let mut q = ev::sample_quality(
            &subject.model,
            schedule,
            subject.objective,
            &clf,
            &train,
            test,
            &opts,
        )?;
        if let Some(net) = &inception {
            inception_quality(&mut q, net, &samples_png, &train, test, a.seed)?;
        }
        Some(q)
    } else {
        None
    };

    let report = EvalReport {
        format: EVAL_FORMAT.to_string(),
        checkpoint: subject.source.display().to_string(),
        step: subject.step,
        weights: subject.weights.clone(),
        objective: subject.objective,
        schedule: subject.named,
        betas: subject.listed.clone(),
        dataset: data.dataset.to_string(),
        split: split.to_string(),
        split_images: eval_set.len(),
        image_size: model_cfg.image_size(),
        channels: model_cfg.channels(),
        nll,
        quality,
        seconds: started.elapsed().as_secs_f64(),
    };
    report
        .write_json(&report_path)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("{}", report.to_text());
    tracing::info!(path = %report_path.display(), "report written");
    Ok(())
}
