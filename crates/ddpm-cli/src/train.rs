//! `ddpm train`: build a [`TrainConfig`] from a file and flags, fetch missing data, train.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ddpm_data::{fetch, DatasetSpec, FetchOptions};
use ddpm_schedule::{DiffusionLoss, LossKind, LossWeighting, Objective, SamplerConfig};
use ddpm_train::checkpoint::ResumeFrom;
use ddpm_train::optim::LrSchedule;
use ddpm_train::{
    parse_device, Precision, ResumeOptions, RunOptions, SafeChanges, TrainConfig, TrainError,
    Trainer,
};
use ddpm_unet::ModelConfig;

/// Arguments of `ddpm train`.
#[derive(Args, Default)]
pub struct TrainArgs {
    /// A TOML training config; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// mnist, fashion-mnist, cifar10, flowers, folder:PATH or hf:OWNER/NAME[@REVISION][:SPLIT]
    /// (parquet images on the Hugging Face Hub; the run records the commit) (with --resume: only
    /// a run's image folder moved elsewhere, folder:NEW_PATH).
    #[arg(long)]
    dataset: Option<String>,
    /// Run directory (default: a new runs/<dataset>[-N]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint (exactly). It may change
    /// --steps, --lr, --lr-schedule, --min-lr, --warmup-steps, --grad-clip, --checkpoint-every, --sample-every,
    /// --log-every and --data-dir (and the same keys edited in RUN/config.toml), and a moved
    /// image folder (--dataset folder:NEW_PATH).
    #[arg(long, conflicts_with_all = ["config", "out", "model", "image_size", "schedule", "timesteps", "objective", "loss", "seed", "batch_size", "precision", "test_fraction", "epochs", "offset_noise", "self_condition", "min_snr_gamma", "grad_accum", "ema_decay", "flip", "no_flip", "class_conditional", "unconditional", "class_dropout", "guidance"])]
    resume: Option<PathBuf>,
    /// With --resume: continue from the checkpoint of this step (newer ones are moved to
    /// RUN/checkpoints/set-aside/).
    #[arg(long, requires = "resume", conflicts_with = "resume_intact")]
    from_step: Option<usize>,
    /// With --resume: continue from the newest checkpoint that verifies (newer, damaged ones
    /// are moved to RUN/checkpoints/set-aside/).
    #[arg(long, requires = "resume")]
    resume_intact: bool,
    /// Total optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Train for N passes over the training images instead of --steps: steps = ceil(N * images
    /// / batch size), worked out once the data set is open (`epochs`; both are recorded).
    #[arg(long, value_name = "N", conflicts_with = "steps")]
    epochs: Option<usize>,
    /// Images per optimizer step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step whose gradients are averaged (`grad_accum`; divides
    /// the batch size).
    #[arg(long, value_name = "N")]
    grad_accum: Option<usize>,
    /// EMA decay of the weights, in [0, 1) (`ema_decay`).
    #[arg(long, value_name = "D")]
    ema_decay: Option<f64>,
    /// Offset noise strength S: noise + S * one N(0, 1) value per image and channel
    /// (`offset_noise`; 0.1 is usual, 0 turns it off).
    #[arg(long, value_name = "S")]
    offset_noise: Option<f64>,
    /// Weight the loss by min-SNR-gamma with this gamma (`[loss] weighting = { kind = "min_snr",
    /// gamma = G }`; 5 is usual).
    #[arg(long, value_name = "G")]
    min_snr_gamma: Option<f64>,
    /// Self-conditioning: the model also sees its own x0 estimate half of the time (`[model]
    /// self_condition = true`; `unet` models only).
    #[arg(long)]
    self_condition: bool,
    /// Class-conditional: the model also takes the image's class (`[model] num_classes`, set
    /// to the data set's class count), trained with classifier-free guidance's label dropout.
    #[arg(long, conflicts_with = "unconditional")]
    class_conditional: bool,
    /// An unconditional model (no `num_classes`), whatever the config or preset says.
    #[arg(long)]
    unconditional: bool,
    /// Class-conditional training: the probability of training on the null label instead of
    /// the image's class, which trains the unconditional model guidance needs (`class_dropout`;
    /// default 0.1).
    #[arg(long, value_name = "P")]
    class_dropout: Option<f64>,
    /// Classifier-free guidance scale of the sample grids written while training, and the
    /// default of `ddpm sample` and `ddpm eval` for the run (`[guidance] scale`; 1: none).
    #[arg(long, value_name = "S")]
    guidance: Option<f64>,
    /// Random horizontal flips of the training images (`[data] flip = true`; the default for
    /// CIFAR-10, Flowers and image folders).
    #[arg(long, conflicts_with = "no_flip")]
    flip: bool,
    /// No random horizontal flips (`[data] flip = false`; the default for MNIST and
    /// Fashion-MNIST).
    #[arg(long)]
    no_flip: bool,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Learning rate after the warm-up: constant, cosine or linear (the decaying ones reach
    /// --min-lr at the final step).
    #[arg(long, value_name = "SCHEDULE")]
    lr_schedule: Option<String>,
    /// The learning rate a cosine or linear --lr-schedule reaches at the final step (default 0).
    #[arg(long, value_name = "LR")]
    min_lr: Option<f64>,
    /// Maximum global gradient norm (0 disables clipping).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Model preset: mnist-small, fashion, cifar-small, cifar10, learnopencv.
    #[arg(long)]
    model: Option<String>,
    /// Image size (the model follows the data).
    #[arg(long)]
    image_size: Option<usize>,
    /// Beta schedule (ddpm_schedule::BetaSchedule::NAMES): linear, scaled-linear, cosine,
    /// quadratic, sigmoid.
    #[arg(long)]
    schedule: Option<String>,
    /// Diffusion steps T.
    #[arg(long)]
    timesteps: Option<usize>,
    /// What the network predicts: eps, x0 or v.
    #[arg(long)]
    objective: Option<String>,
    /// Training loss: l1, l2 or huber.
    #[arg(long)]
    loss: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute precision: f32, or bf16/f16 (CUDA only) with f32 master weights.
    #[arg(long)]
    precision: Option<String>,
    /// Seed of init, noise and data order.
    #[arg(long)]
    seed: Option<u64>,
    /// Data root holding mnist/, fashion-mnist/, cifar10/, flowers/.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Share of each class of an image folder (flowers, folder:PATH) held out for the test split,
    /// in [0, 1) (default 0.1: every 10th image; 0: train on every image, no test split).
    #[arg(long, value_name = "F")]
    test_fraction: Option<f64>,
    /// Write a sample grid every N steps (0: never).
    #[arg(long)]
    sample_every: Option<usize>,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Append metrics every N steps.
    #[arg(long)]
    log_every: Option<usize>,
    /// Do not fetch a missing data set; fail instead.
    #[arg(long)]
    no_fetch: bool,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(p) => TrainConfig::from_toml_file(p)?,
        None => TrainConfig::default(),
    };
    if let Some(d) = &a.dataset {
        c.dataset = d.parse().with_context(|| format!("--dataset {d}"))?;
        let grey_28 = matches!(c.dataset, DatasetSpec::Mnist | DatasetSpec::FashionMnist);
        if a.model.is_none() && a.config.is_none() && !grey_28 {
            c.model = ModelConfig::preset("cifar-small")?;
        }
    }
    if let Some(m) = &a.model {
        c.model = ModelConfig::preset(m)?;
    }
    if let Some(v) = a.steps {
        c.steps = v;
        c.epochs = None;
    }
    if let Some(v) = a.epochs {
        c.epochs = Some(v);
    }
    if let Some(p) = &a.precision {
        c.precision = Precision::parse(p)?;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = a.lr {
        c.optimizer.lr = v;
    }
    if let Some(s) = &a.lr_schedule {
        c.optimizer.lr_schedule = lr_schedule(s)?;
    }
    if let Some(v) = a.min_lr {
        c.optimizer.min_lr = v;
    }
    if let Some(v) = a.grad_accum {
        c.grad_accum = v;
    }
    if let Some(v) = a.ema_decay {
        c.ema_decay = v;
    }
    if let Some(v) = a.offset_noise {
        c.offset_noise = v;
    }
    if a.self_condition {
        match &mut c.model {
            ModelConfig::Unet(u) => u.self_condition = true,
            _ => anyhow::bail!(
                "--self-condition needs a `unet` model (mnist-small, fashion); the `ddpm_unet` \
                 presets (cifar-small, cifar10, learnopencv, celebahq-256) do not take it"
            ),
        }
    }
    if a.class_conditional {
        // The class count follows the data set when the run opens it.
        c.model
            .set_num_classes(Some(c.model.num_classes().unwrap_or(1)));
    }
    if a.unconditional {
        c.model.set_num_classes(None);
    }
    if let Some(v) = a.class_dropout {
        c.class_dropout = v;
    }
    if let Some(v) = a.guidance {
        c.guidance.scale = v;
    }
    if a.flip || a.no_flip {
        c.data.flip = Some(a.flip);
    }
    if let Some(v) = a.warmup_steps {
        c.warmup_steps = v;
    }
    if let Some(v) = a.grad_clip {
        c.grad_clip = v;
    }
    if let Some(v) = a.image_size {
        c.data.image_size = Some(v);
    }
    if let Some(s) = &a.schedule {
        c.schedule.beta_schedule = crate::beta_schedule(s)?;
    }
    if let Some(v) = a.timesteps {
        c.schedule.timesteps = v;
        fit_default_sampler(&mut c);
    }
    if let Some(o) = &a.objective {
        c.objective = crate::parse_word::<Objective>(o, "objective", "eps, x0, v")?;
    }
    if let Some(l) = &a.loss {
        c.loss = DiffusionLoss {
            kind: crate::parse_word::<LossKind>(l, "loss", "l1, l2, huber")?,
            ..c.loss
        };
    }
    if let Some(gamma) = a.min_snr_gamma {
        c.loss.weighting = LossWeighting::MinSnr { gamma };
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = &a.data_dir {
        c.data.root = v.clone();
    }
    if let Some(v) = a.test_fraction {
        ddpm_data::folder::check_test_fraction(v).context("--test-fraction")?;
        c.data.test_fraction = v;
    }
    if let Some(v) = a.sample_every {
        c.sample_every = v;
    }
    if let Some(v) = a.checkpoint_every {
        c.checkpoint_every = v;
    }
    if let Some(v) = a.log_every {
        c.log_every = v;
    }
    absolute_data_paths(&mut c)?;
    Ok(c)
}

/// The `--lr-schedule` word.
fn lr_schedule(word: &str) -> Result<LrSchedule> {
    crate::parse_word::<LrSchedule>(word, "--lr-schedule", LrSchedule::NAMES)
}

/// Resolves an `hf:` data set's revision to its commit (with the Hub options `main` installed),
/// so that the run's config (and so every `--resume`) names the files it trains on even after
/// the branch moves.
fn pin_hub_dataset(c: &mut TrainConfig) -> Result<()> {
    if let DatasetSpec::Hub(spec) = &c.dataset {
        let pinned = ddpm_data::hub_dataset::pin(spec, &ddpm_data::hub::installed())
            .with_context(|| format!("--dataset hf:{spec}"))?;
        c.dataset = DatasetSpec::Hub(pinned);
    }
    Ok(())
}

/// Makes the data root and an image folder's path absolute (canonical where they exist), so the
/// run's config names the same data from any working directory (`--resume`, `eval`).
fn absolute_data_paths(c: &mut TrainConfig) -> Result<()> {
    let absolute = |p: &Path| -> Result<PathBuf> {
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .with_context(|| format!("resolving the data path {}", p.display()))
    };
    c.data.root = absolute(&c.data.root)?;
    if let DatasetSpec::Folder(p) = &c.dataset {
        c.dataset = DatasetSpec::Folder(absolute(p)?);
    }
    Ok(())
}

/// With fewer timesteps than the default sampler's 50 DDIM steps, and the sampler left at its
/// default, the sample grids take all T steps (said in a warning) instead of failing.
fn fit_default_sampler(c: &mut TrainConfig) {
    let t = c.schedule.timesteps;
    let is_default = c.sampler == TrainConfig::default().sampler;
    if let SamplerConfig::Ddim {
        steps: Some(ref mut s),
        ..
    } = c.sampler
    {
        if is_default && *s > t && t > 0 {
            tracing::warn!(
                "the sample grids' DDIM sampler takes {s} steps by default, more than the \
                 schedule's {t} timesteps: it takes {t} (set `[sampler] steps` in a --config file \
                 to choose)"
            );
            *s = t;
        }
    }
}

/// The first of runs/NAME, runs/NAME-1, ... that holds no checkpoint.
fn fresh_run_dir(name: &str) -> Result<PathBuf> {
    for i in 0.. {
        let p = if i == 0 {
            PathBuf::from("runs").join(name)
        } else {
            PathBuf::from("runs").join(format!("{name}-{i}"))
        };
        if ddpm_train::checkpoint::list(&p)?.is_empty() {
            return Ok(p);
        }
    }
    unreachable!("an unbounded range always yields a directory")
}

/// Fetches the data set when it is missing (from `DDPM_DATA_MIRROR` when set).
pub(crate) fn ensure_data(c: &TrainConfig, no_fetch: bool) -> Result<()> {
    // Before anything is fetched into it: a root the run's config cannot record is refused.
    if c.data.root.to_str().is_none() {
        anyhow::bail!(
            "--data-dir {} is not valid UTF-8, which the run's config.toml cannot record: rename \
             it (or link to it from a UTF-8 path)",
            c.data.root.display()
        );
    }
    if ddpm_data::fetch::is_fetched(&c.dataset, &c.data.root) {
        return Ok(());
    }
    let how = format!(
        "fetch it with `cargo xtask fetch-data {} --data-dir {}` (offline: add `--from DIR`, or set DDPM_DATA_MIRROR=DIR, where DIR is a mirror holding {}/)",
        c.dataset.name(),
        c.data.root.display(),
        c.dataset.name()
    );
    if let DatasetSpec::Folder(p) = &c.dataset {
        if p.is_relative() {
            let cwd = std::env::current_dir().unwrap_or_default();
            anyhow::bail!(
                "image folder {} does not exist in the working directory {}: the run recorded \
                 this relative path (runs started before paths were stored absolute), so run \
                 this command from the directory the run was started in",
                p.display(),
                cwd.display()
            );
        }
        anyhow::bail!("image folder {} does not exist", p.display());
    }
    if no_fetch {
        anyhow::bail!(
            "data set {} is not in {}: {how}",
            c.dataset,
            c.data.root.display()
        );
    }
    tracing::info!(dataset = %c.dataset, dir = %c.data.root.display(), "data set missing: fetching it");
    let report = fetch(
        &c.dataset,
        &FetchOptions {
            roots: crate::env::trusted_roots(),
            proxy: crate::env::proxy(),
            ..FetchOptions::with_mirror(&c.data.root, crate::env::data_mirror())
        },
    )
    .with_context(|| {
        format!(
            "data set {} is missing and fetching it failed; {how}",
            c.dataset
        )
    })?;
    tracing::info!("{report}");
    Ok(())
}

/// The memory the kernel says is available without swapping (`MemAvailable` of /proc/meminfo),
/// in bytes; `None` where it cannot be read.
pub(crate) fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a run whose data cache and activations cannot fit in the available memory, before
/// minutes of decoding end in an abort.
fn check_memory(c: &TrainConfig, device: &candle_core::Device) -> Result<()> {
    use ddpm_train::memory::{estimate, human_bytes};
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let e = estimate(c);
    let need = e.host_bytes(device.is_cpu());
    if need <= available {
        return Ok(());
    }
    let data = match e.images {
        Some(n) => format!(
            "the decoded data cache ({n} images of {}x{}x{} bytes) takes {}",
            e.channels,
            e.image_size,
            e.image_size,
            human_bytes(e.data_cache_bytes)
        ),
        None => "the data cache was not counted".into(),
    };
    let mut what = data;
    let mut fix = format!("lower --image-size (now {})", e.image_size);
    let one_image = e.activation_bytes / e.micro_batch.max(1) as u64;
    let model_floor = e
        .state_bytes
        .saturating_add(e.data_cache_bytes)
        .saturating_add(one_image);
    if device.is_cpu()
        && model_floor > available
        && e.state_bytes >= e.data_cache_bytes.max(one_image)
    {
        // Not even a batch of one fits, and the model is the largest part: a smaller batch or
        // image does not help.
        anyhow::bail!(
            "this run needs at least {} of memory but {} is available: the model's {} \
             parameters (at least) with their gradients, EMA and AdamW moments take {}; choose \
             a smaller model (its width, [model] dim or ch in the config, or another --model)",
            human_bytes(need),
            human_bytes(available),
            e.parameters,
            human_bytes(e.state_bytes),
        );
    }
    if device.is_cpu() {
        let per_image = e.activation_bytes / e.micro_batch.max(1) as u64;
        what += &format!(
            " and a batch of {} images keeps at least {} of activations ({} per image)",
            e.micro_batch,
            human_bytes(e.activation_bytes),
            human_bytes(per_image)
        );
        let room = available
            .saturating_sub(e.data_cache_bytes)
            .saturating_sub(e.state_bytes);
        let fits = room.checked_div(per_image).unwrap_or(0);
        if fits >= 1 {
            fix = format!(
                "lower --batch-size (now {}; at most {} images per micro-batch fit) or --image-size",
                c.batch_size, fits
            );
        }
    }
    anyhow::bail!(
        "this run needs at least {} of memory but {} is available: {what}; {fix}",
        human_bytes(need),
        human_bytes(available),
    )
}

/// Refuses a `sample_num` whose sample grids cannot fit in the available memory (their images are
/// held on the host whatever the device), like `sample --num`.
fn check_sample_grid(c: &TrainConfig) -> Result<()> {
    match available_memory() {
        Some(available) => Ok(ddpm_train::memory::check_sample_grid(c, available)?),
        None => Ok(()),
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    // One process per GPU under a launcher (RANK, WORLD_SIZE, LOCAL_RANK; docs/distributed.md).
    let world = crate::env::world().context("reading the data-parallel launch")?;
    if world.launched {
        tracing::info!(
            rank = world.rank,
            size = world.size,
            local_rank = world.local_rank,
            "data-parallel rank"
        );
    }
    let device = parse_device(&world.device_spec(&a.device))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let first = std::sync::OnceLock::new();
        ctrlc::set_handler(move || {
            // One signal can arrive twice (e.g. `timeout` signals the child and its process
            // group): only a second request at least a second after the first forces an exit.
            let since = first.get_or_init(std::time::Instant::now).elapsed();
            if !stop.swap(true, Ordering::SeqCst) {
                eprintln!("interrupt: finishing the current step and writing a checkpoint");
            } else if since >= std::time::Duration::from_secs(1) {
                eprintln!("second interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
        })
        .context("installing the SIGINT/SIGTERM handler")?;
    }
    let (mut trainer, run_dir) = match &a.resume {
        Some(dir) => {
            let mut plan = Trainer::plan_resume(dir, &device, &resume_options(&a)?, &world)
                .map_err(|e| explain_damaged(e, dir))
                .with_context(|| format!("resuming {}", dir.display()))?;
            // Only rank 0 may fetch a missing data set: concurrent fetches would collide.
            ensure_data(plan.config(), a.no_fetch || !world.is_lead())?;
            // The run's policy with the environment's kernel variables applied: a change of
            // the run's `[kernels]` when they change it.
            plan.set_kernels(crate::env::install_kernel_policy(plan.config().kernels)?)?;
            check_sample_grid(plan.config())
                .with_context(|| format!("resuming {}", dir.display()))?;
            let trainer = Trainer::resume_planned(plan, &device, world)
                .with_context(|| format!("resuming {}", dir.display()))?;
            (trainer, dir.clone())
        }
        None => {
            let mut config = build_config(&a)?;
            pin_hub_dataset(&mut config)?;
            config.check_threads()?;
            config.kernels = crate::env::install_kernel_policy(config.kernels)?;
            config.precision.check_device(&device)?;
            ensure_data(&config, a.no_fetch || !world.is_lead())?;
            check_memory(&config, &device)?;
            check_sample_grid(&config)?;
            let out = match &a.out {
                Some(o) => o.clone(),
                None if world.size > 1 => anyhow::bail!(
                    "data-parallel training needs --out DIR, the same on every rank, so that \
                     all ranks join one run"
                ),
                None => fresh_run_dir(config.dataset.name())?,
            };
            if out.exists() && !out.is_dir() {
                anyhow::bail!(
                    "--out {} is a file: name a directory (new, or empty) for the run",
                    out.display()
                );
            }
            tracing::info!(run_dir = %out.display(), "starting a new run");
            let trainer = Trainer::create_with_world(config, &out, &device, world)
                .with_context(|| format!("starting run {}", out.display()))?;
            (trainer, out)
        }
    };
    let opts = RunOptions {
        progress: !a.quiet,
        fault_nan_at_step: std::env::var("DDPM_FAULT_NAN_AT_STEP")
            .ok()
            .and_then(|s| s.parse().ok()),
        fault_inf_grad_at_step: None,
        f16_initial_scale: std::env::var("DDPM_F16_INITIAL_SCALE")
            .ok()
            .and_then(|s| s.parse().ok()),
    };
    let summary = trainer
        .run(&stop, &opts)
        .map_err(|e| explain_stop(e, &run_dir))?;
    let ckpt = summary
        .checkpoint
        .as_deref()
        .map(Path::display)
        .map(|d| d.to_string())
        .unwrap_or_else(|| "none".into());
    if summary.interrupted {
        tracing::info!(step = summary.step, checkpoint = %ckpt, "interrupted: checkpoint written, resume with --resume");
    } else {
        tracing::info!(step = summary.step, loss = summary.last_loss, checkpoint = %ckpt, "training finished");
    }
    Ok(())
}

/// Which checkpoint `--resume` continues from and the settings it changes.
fn resume_options(a: &TrainArgs) -> Result<ResumeOptions> {
    // Paths are stored absolute, as a new run's are.
    let mut data = TrainConfig::default();
    if let Some(d) = &a.dataset {
        data.dataset = d.parse().with_context(|| format!("--dataset {d}"))?;
    }
    if let Some(root) = &a.data_dir {
        data.data.root = root.clone();
    }
    absolute_data_paths(&mut data)?;
    Ok(ResumeOptions {
        from: match (a.from_step, a.resume_intact) {
            (Some(step), _) => ResumeFrom::Step(step),
            (None, true) => ResumeFrom::NewestIntact,
            (None, false) => ResumeFrom::Newest,
        },
        changes: SafeChanges {
            steps: a.steps,
            lr: a.lr,
            lr_schedule: a.lr_schedule.as_deref().map(lr_schedule).transpose()?,
            min_lr: a.min_lr,
            warmup_steps: a.warmup_steps,
            grad_clip: a.grad_clip,
            checkpoint_every: a.checkpoint_every,
            sample_every: a.sample_every,
            log_every: a.log_every,
            data_root: a.data_dir.as_ref().map(|_| data.data.root.clone()),
            dataset: a.dataset.as_ref().map(|_| data.dataset.clone()),
        },
    })
}

/// A damaged newest checkpoint, with the command that continues from the newest intact one.
fn explain_damaged(e: TrainError, dir: &Path) -> anyhow::Error {
    match &e {
        TrainError::Damaged(d) => match &d.intact {
            Some((step, _)) => anyhow::anyhow!(
                "{e}: resume from it with `ddpm train --resume {} --from-step {step}` (or \
                 --resume-intact), which moves the newer checkpoints to {}",
                dir.display(),
                dir.join("checkpoints/set-aside").display()
            ),
            None => anyhow::anyhow!(
                "{e}: start a new run (the damaged files are kept in {})",
                dir.display()
            ),
        },
        _ => e.into(),
    }
}

/// A stop on a NaN or an infinity, with a command that follows its advice.
fn explain_stop(e: TrainError, run_dir: &Path) -> anyhow::Error {
    let TrainError::NonFinite(stop) = &e else {
        return e.into();
    };
    if stop.injected {
        return e.into();
    }
    // A tenth of the learning rate, to three significant digits.
    let lower: f64 = format!("{:.2e}", stop.lr / 10.0)
        .parse()
        .unwrap_or(stop.lr / 10.0);
    let lower = ddpm_train::trainer::short_number(lower);
    let run = run_dir.display();
    let again = match stop.last_checkpoint {
        Some(_) => "start a new run (another --out) with a lower learning rate",
        None => "start the run again with a lower learning rate",
    };
    let again = format!("{again} (e.g. `--lr {lower}`)");
    match (
        stop.last_checkpoint,
        stop.replays(),
        stop.earlier_checkpoint,
    ) {
        (Some(_), true, Some(j)) => anyhow::anyhow!(
            "{e}: resume from an earlier checkpoint with a lower learning rate, e.g. `ddpm train \
             --resume {run} --from-step {j} --lr {lower}`, or {again}"
        ),
        (Some(k), false, _) => anyhow::anyhow!(
            "{e}: continue from step {k} with, e.g., `ddpm train --resume {run} --lr {lower}`, \
             or {again}"
        ),
        _ => anyhow::anyhow!("{e}: {again}"),
    }
}
