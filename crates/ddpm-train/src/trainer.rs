//! The training loop (Algorithm 1 of the DDPM paper) with checkpoints, sample grids, metrics,
//! clean stops and exact resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_data::{image_io, Dataset, Loader, Split};
use ddpm_schedule::Schedule;
use ddpm_unet::{DiffusionModel, KernelPolicy};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{
    self, CheckpointMeta, NonFiniteTensors, Selected, EMA_PREFIX, MODEL_PREFIX, OPTIM_PREFIX,
};
use crate::config::TrainConfig;
use crate::distributed::{Collective, DistError, World};
use crate::ema::Ema;
use crate::lock::RunLock;
use crate::metrics::{self, MetricsLine};
use crate::optim::{clip_factor, grad_norm, scheduled_lr, AdamW};
use crate::precision::{LossScaler, Precision};
use crate::resume::{self, Change, HistoryEvent, ResumeOptions, SafeChanges};
use crate::sample::{gaussian, grid_columns, sample_until, SampleOptions};
use crate::{Result, TrainError};

/// Domain separator of the training RNG's seed (the model init uses the plain seed).
const TRAIN_RNG_DOMAIN: u64 = 0x7472_6169_6e5f_726e; // "train_rn"

/// How to run (not part of the stored config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show a progress bar.
    pub progress: bool,
    /// Testing aid: make the loss NaN at this step, to exercise the non-finite-loss stop.
    pub fault_nan_at_step: Option<usize>,
    /// Testing aid: make one gradient infinite at this step (the loss stays finite), to
    /// exercise the non-finite-gradient stop.
    pub fault_inf_grad_at_step: Option<usize>,
    /// Testing aid: the f16 loss scale a new run starts from (instead of 2^16), to exercise
    /// the scaler under a real overflow. Ignored by resumed runs and other precisions.
    pub f16_initial_scale: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimizer steps completed.
    pub step: usize,
    /// The last checkpoint written (its JSON file).
    pub checkpoint: Option<PathBuf>,
    /// Whether the run stopped early on request (SIGINT/SIGTERM).
    pub interrupted: bool,
    /// Mean loss of the last logged window.
    pub last_loss: Option<f64>,
}

/// What one optimizer step did ([`Trainer::train_step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The mean loss of the step's micro-batches (and ranks).
    pub loss: f64,
    /// The global gradient norm, before clipping.
    pub grad_norm: f64,
    /// The learning rate of the step (warm-up and `[optimizer] lr_schedule` applied).
    pub lr: f64,
    /// Seconds spent in each phase of the step, in order (`batch`, `inputs`, `forward`,
    /// `backward`, `all-reduce` with several ranks, `clip`, `adamw`, `ema`; a phase repeated per
    /// micro-batch is summed), when [`Trainer::time_phases`] is on; empty otherwise.
    pub phases: Vec<(&'static str, f64)>,
}

/// The wall-clock time of each phase of a step ([`Trainer::time_phases`]): every phase ends
/// with a device synchronization, so that the split is exact on asynchronous devices.
struct PhaseClock {
    on: bool,
    last: Instant,
    spent: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    fn new(on: bool) -> Self {
        Self {
            on,
            last: Instant::now(),
            spent: Vec::new(),
        }
    }

    /// Ends `phase` (when on): waits for the device, then adds the time since the last mark.
    fn mark(&mut self, device: &Device, phase: &'static str) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        device.synchronize()?;
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.spent.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, s)) => *s += secs,
            None => self.spent.push((phase, secs)),
        }
        Ok(())
    }
}

/// What became NaN or infinite.
#[derive(Debug, Clone, PartialEq)]
pub enum NonFiniteValue {
    /// The loss (the value).
    Loss(f64),
    /// The global gradient norm, with a finite loss (the value).
    GradNorm(f64),
    /// The weights, EMA or moments after an update with finite gradients.
    State(NonFiniteTensors),
}

/// Why a run stopped on a NaN or an infinity, and what it kept (the error
/// [`crate::TrainError::NonFinite`]). A step whose loss or gradient norm is not finite changes
/// nothing; a state that is not finite is never checkpointed.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteStop {
    /// The step (1-based) at which it happened.
    pub step: usize,
    /// What became non-finite.
    pub what: NonFiniteValue,
    /// The newest checkpoint on disk (all its values are finite), if any.
    pub last_checkpoint: Option<usize>,
    /// The newest checkpoint on disk before `last_checkpoint`, if any.
    pub earlier_checkpoint: Option<usize>,
    /// The run's peak learning rate.
    pub lr: f64,
    /// The run's warm-up steps.
    pub warmup_steps: usize,
    /// The run's gradient clipping (0: off).
    pub grad_clip: f64,
    /// Whether the fault was injected ([`RunOptions::fault_nan_at_step`],
    /// [`RunOptions::fault_inf_grad_at_step`]).
    pub injected: bool,
}

impl NonFiniteStop {
    /// Whether resuming from the kept checkpoint would replay this stop: it is the state right
    /// before the step whose loss or gradient norm was not finite (the step's batch, noise and
    /// weights come back as they were, and the learning rate does not enter them).
    pub fn replays(&self) -> bool {
        !matches!(self.what, NonFiniteValue::State(_))
            && self.last_checkpoint.is_some_and(|k| k + 1 == self.step)
    }
}

impl std::fmt::Display for NonFiniteStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let step = self.step;
        let unchanged = "training stopped before the step changed any weight, moment or EMA";
        match &self.what {
            NonFiniteValue::Loss(v) => {
                write!(f, "the loss became {v} at step {step}: {unchanged}")?
            }
            NonFiniteValue::GradNorm(v) => write!(
                f,
                "the gradient norm became {v} at step {step} (with a finite loss): {unchanged}"
            )?,
            NonFiniteValue::State(found) => write!(
                f,
                "the state after step {step} is not finite ({found}): training stopped without \
                 writing its checkpoint"
            )?,
        }
        match self.last_checkpoint {
            Some(k) => write!(
                f,
                "; the newest checkpoint, step {k}, is kept (all its values are finite)"
            )?,
            None => write!(
                f,
                "; no checkpoint had been written yet, so there is nothing to resume"
            )?,
        }
        if self.injected {
            return write!(f, " (the fault was injected for testing)");
        }
        if self.replays() {
            // Resuming restores the weights, the batch and the noise of this step: the same
            // non-finite value comes back whatever the learning rate.
            write!(
                f,
                "; it holds the weights that gave this value, so resuming from it meets the same \
                 batch and stops again whatever the learning rate"
            )?;
            if let Some(j) = self.earlier_checkpoint {
                write!(f, " (the checkpoint before it is step {j})")?;
            }
        }
        write!(
            f,
            ". Lower the learning rate (now {})",
            short_number(self.lr)
        )?;
        if self.warmup_steps == 0 {
            write!(f, ", or add a warm-up (warmup_steps = 0)")?;
        }
        if self.grad_clip == 0.0 {
            write!(f, ", or enable gradient clipping (grad_clip = 0)")?;
        }
        Ok(())
    }
}

/// `x` as a person writes it: `0.3`, `1e30`, `2.5e-7`.
pub fn short_number(x: f64) -> String {
    if x == 0.0 || (1e-4..1e6).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// A resume, checked and ready to run ([`Trainer::plan_resume`], then
/// [`Trainer::resume_planned`]): the verified checkpoint, the configuration the run continues
/// with, and what changed. It holds the run's lock (on rank 0).
#[derive(Debug)]
pub struct ResumePlan {
    run_dir: PathBuf,
    selected: Selected,
    config: TrainConfig,
    changes: Vec<Change>,
    /// `config.toml` is missing or differs from `config` (rewritten when the run resumes).
    config_file_stale: bool,
    lock: Option<RunLock>,
}

impl ResumePlan {
    /// The configuration the run continues with.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The step of the checkpoint it continues from.
    pub fn step(&self) -> usize {
        self.selected.checkpoint.meta.step
    }

    /// The settings it changes.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Resumes under the kernel policy `kernels` rather than the configuration's (a binary's
    /// kernel overrides): a change of the safe key `kernels` like the others, listed in
    /// [`ResumePlan::changes`] and the run's history, and written into `config.toml` and the
    /// later checkpoints. Results agree across policies up to float rounding.
    pub fn set_kernels(&mut self, kernels: KernelPolicy) -> Result<()> {
        if kernels == self.config.kernels {
            return Ok(());
        }
        let mut asked = self.config.clone();
        asked.kernels = kernels;
        self.changes
            .extend(resume::changes_between(&self.config, &asked)?);
        self.config = asked;
        self.config_file_stale = true;
        Ok(())
    }
}

/// A progress bar with rate and ETA in the project's style.
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{pos}}/{{len}} [{{bar:30}}] {{msg}} {{per_sec}} ETA {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// A training run in a run directory.
pub struct Trainer {
    config: TrainConfig,
    run_dir: PathBuf,
    device: Device,
    model: DiffusionModel,
    ema_model: DiffusionModel,
    opt: AdamW,
    ema: Ema,
    schedule: Schedule,
    loader: Loader,
    rng: ChaCha8Rng,
    step: usize,
    last_checkpoint: Option<(usize, PathBuf)>,
    scaler: LossScaler,
    /// The run id every checkpoint records ([`checkpoint::run_id_for`]).
    run_id: String,
    /// The other data-parallel ranks (none for a single process).
    collective: Collective,
    /// One live run per directory: held as long as the trainer lives (by rank 0 only).
    _lock: Option<RunLock>,
    /// Whether [`Trainer::train_step`] times its phases ([`Trainer::time_phases`]).
    time_phases: bool,
}

/// The files a run writes into its directory besides `checkpoints/` (which
/// [`Trainer::create_with_world`] checks first).
const RUN_FILES: [&str; 5] = [
    "config.toml",
    "metrics.jsonl",
    resume::HISTORY_FILE,
    "loss.png",
    "samples",
];

/// Clears the way for a new run in `run_dir`. A run of this program that stopped before its first
/// checkpoint (its `history.jsonl` says so) left nothing to resume: its metrics and history are
/// replaced. Any other file a run would write there (a user's own `config.toml` placed there,
/// metrics from elsewhere) is refused by name: nothing saved is replaced without being asked.
fn prepare_new_run_dir(run_dir: &Path) -> Result<()> {
    let found: Vec<&str> = RUN_FILES
        .into_iter()
        .filter(|name| {
            let path = run_dir.join(name);
            match std::fs::read_dir(&path) {
                Ok(mut entries) => entries.next().is_some(),
                Err(_) => path.exists(),
            }
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    if run_dir.join(resume::HISTORY_FILE).is_file() {
        if let Some(evidence) = checkpoints_were_written(run_dir) {
            return Err(TrainError::Config(format!(
                "{} holds an earlier run ({}) that wrote checkpoints ({evidence}), though none \
                 is left in its checkpoints/: a new run would replace its files; if its \
                 checkpoints were moved, put them back and continue with `--resume {}`, \
                 otherwise choose another output directory",
                run_dir.display(),
                found.join(", "),
                run_dir.display(),
            )));
        }
        tracing::warn!(
            run_dir = %run_dir.display(),
            files = found.join(", "),
            "an earlier run here stopped before its first checkpoint: starting over"
        );
        for name in ["metrics.jsonl", resume::HISTORY_FILE, "loss.png"] {
            let _ = std::fs::remove_file(run_dir.join(name));
        }
        return Ok(());
    }
    let it = if found.len() == 1 { "it" } else { "them" };
    Err(TrainError::Config(format!(
        "{} already holds {} but no run history: a new run would replace {it}; choose another \
         output directory (a config file of your own belongs outside it), or move {it} away",
        run_dir.display(),
        found.join(", "),
    )))
}

/// What shows that the earlier run of `run_dir` wrote checkpoints, though none is listed now
/// (moved away, into a sub-folder, or renamed): a resume in its `history.jsonl`, or an entry of
/// `checkpoints/` other than what a run killed during its first checkpoint leaves (hidden
/// temporary files, a tensors file without its JSON).
fn checkpoints_were_written(run_dir: &Path) -> Option<String> {
    let history = ddpm_fs::read_regular_text(&run_dir.join(resume::HISTORY_FILE)).ok()?;
    if history
        .lines()
        .filter_map(|l| serde_json::from_str::<HistoryEvent>(l).ok())
        .any(|e| e.event != "start")
    {
        return Some(format!("its {} records a resume", resume::HISTORY_FILE));
    }
    let entries = std::fs::read_dir(checkpoint::checkpoint_dir(run_dir)).ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan_tensors = name.starts_with("ckpt-") && name.ends_with(".safetensors");
        (!name.starts_with('.') && !orphan_tensors).then(|| format!("checkpoints/ holds {name}"))
    })
}

impl Trainer {
    /// Starts a new run in `run_dir` (which must not hold checkpoints yet). The model's image
    /// size and channels follow the data set.
    pub fn create(config: TrainConfig, run_dir: &Path, device: &Device) -> Result<Self> {
        Self::create_with_world(config, run_dir, device, World::single())
    }

    /// Starts a new run as one rank of a data-parallel `world` (docs/distributed.md): each rank
    /// trains on its share of every batch, and only rank 0 writes to `run_dir`. Blocks until
    /// every rank has joined.
    pub fn create_with_world(
        config: TrainConfig,
        run_dir: &Path,
        device: &Device,
        world: World,
    ) -> Result<Self> {
        if !checkpoint::list(run_dir)?.is_empty() {
            return Err(TrainError::Config(format!(
                "{} already holds checkpoints of a run: continue it with `--resume {}` or \
                 choose another output directory",
                run_dir.display(),
                run_dir.display()
            )));
        }
        let dataset = Dataset::open(&config.dataset, &config.data, Split::Train)?;
        Self::start(config, dataset, run_dir, device, world, true)
    }

    /// A new run on the images of `dataset`, held in memory (the model's image size and
    /// channels follow it), in one process: for benchmarks and tests, which drive it with
    /// [`Trainer::train_step`]. Unlike [`Trainer::create`], it neither reads nor locks nor
    /// writes `run_dir` (no `config.toml`, no history): only what the caller asks for
    /// ([`Trainer::run`], [`Trainer::save_checkpoint`], [`Trainer::write_sample_grid`]) writes
    /// there ([`Trainer::run`] needs it to exist, for `metrics.jsonl`). `config.dataset` and
    /// `config.data` are recorded in checkpoints as given, not read.
    pub fn with_dataset(
        config: TrainConfig,
        dataset: Dataset,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        Self::start(config, dataset, run_dir, device, World::single(), false)
    }

    /// A new run on `dataset` as one rank of `world`. With `record`, rank 0 locks `run_dir`,
    /// writes `config.toml` and starts `history.jsonl` (the run directory of
    /// [`Trainer::create_with_world`]).
    fn start(
        mut config: TrainConfig,
        dataset: Dataset,
        run_dir: &Path,
        device: &Device,
        world: World,
        record: bool,
    ) -> Result<Self> {
        fit_model_to(&mut config, &dataset);
        if config.model.num_classes().is_some() && world.is_lead() {
            warn_unlearnable_classes(&dataset, &config.dataset.to_string());
        }
        if let Some(epochs) = config.epochs {
            config.resolve_epochs(dataset.len());
            tracing::info!(
                epochs,
                images = dataset.len(),
                steps = config.steps,
                "steps from --epochs"
            );
        }
        config.validate()?;
        world.check_batch(config.batch_size, config.grad_accum)?;
        let lead = record && world.is_lead();
        let lock = if lead {
            std::fs::create_dir_all(run_dir)
                .map_err(|e| TrainError::io(run_dir, "creating run directory", e))?;
            let lock = RunLock::acquire(run_dir)?;
            prepare_new_run_dir(run_dir)?;
            Some(lock)
        } else {
            None
        };
        let toml = config.to_toml()?;
        let trainer = Self::build(config, run_dir, device, dataset, lock, world)?;
        if lead {
            // Written once the model and data are ready, history first: a start that fails
            // before (out of memory, a rank that never joins) leaves nothing that would stop the
            // same command from being run again ([`prepare_new_run_dir`]).
            resume::append_history(
                run_dir,
                &HistoryEvent {
                    event: "start".into(),
                    step: 0,
                    run_id: trainer.run_id.clone(),
                    checkpoint: None,
                    changes: Vec::new(),
                    set_aside: Vec::new(),
                },
            )?;
            let config_path = run_dir.join("config.toml");
            ddpm_fs::write_atomic(&config_path, toml.as_bytes())
                .map_err(|e| TrainError::io(&config_path, "writing", e))?;
        }
        Ok(trainer)
    }

    /// Continues the run in `run_dir` from its newest checkpoint, exactly: weights, EMA,
    /// optimizer moments, RNG and data order are restored. `steps` (if given) replaces the total
    /// number of steps to train for.
    pub fn resume(run_dir: &Path, device: &Device, steps: Option<usize>) -> Result<Self> {
        Self::resume_with_world(run_dir, device, steps, World::single())
    }

    /// [`Trainer::resume`] as one rank of a data-parallel `world` (see
    /// [`Trainer::resume_planned`]).
    pub fn resume_with_world(
        run_dir: &Path,
        device: &Device,
        steps: Option<usize>,
        world: World,
    ) -> Result<Self> {
        let opts = ResumeOptions {
            changes: SafeChanges {
                steps,
                ..SafeChanges::default()
            },
            ..ResumeOptions::default()
        };
        let plan = Self::plan_resume(run_dir, device, &opts, &world)?;
        Self::resume_planned(plan, device, world)
    }

    /// Prepares to continue the run in `run_dir`: locks it (rank 0), chooses and verifies the
    /// checkpoint `opts.from` names, and works out the configuration: the checkpoint's, with the
    /// safe keys `RUN_DIR/config.toml` changes (an edit of another key is an error naming it),
    /// then `opts.changes`. Nothing is written until [`Trainer::resume_planned`].
    pub fn plan_resume(
        run_dir: &Path,
        device: &Device,
        opts: &ResumeOptions,
        world: &World,
    ) -> Result<ResumePlan> {
        // Lock before reading checkpoints, so that a live run's are never read mid-prune (a
        // directory without checkpoints gets the "no checkpoint" error, not a lock file).
        let lock = if world.is_lead() && !checkpoint::list(run_dir)?.is_empty() {
            Some(RunLock::acquire(run_dir)?)
        } else {
            None
        };
        let selected = checkpoint::select(run_dir, opts.from, device)?;
        let ckpt = &selected.checkpoint;
        let config_path = run_dir.join("config.toml");
        let file = resume::read_config_file(&config_path)?;
        let (config, changes) = resume::resumed_config(
            &ckpt.meta.config,
            ckpt.meta.step,
            file.as_ref().map(|f| (config_path.as_path(), f)),
            &opts.changes,
        )?;
        Ok(ResumePlan {
            run_dir: run_dir.to_path_buf(),
            config_file_stale: file.as_ref() != Some(&config),
            selected,
            config,
            changes,
            lock,
        })
    }

    /// Continues a run as [`Trainer::plan_resume`] planned it, as one rank of a data-parallel
    /// `world`: every rank loads the checkpoint; only rank 0 writes the directory. Weights, EMA,
    /// optimizer moments, RNG and data order are restored exactly; the changed settings apply
    /// from the next step. Rank 0 then moves the checkpoints newer than the chosen one to
    /// `checkpoints/set-aside/`, rewrites `config.toml` when it differs, and appends the
    /// resume to `history.jsonl`.
    ///
    /// Rank 0's random state is the checkpoint's; every other rank continues its own ChaCha
    /// stream from the word position the checkpoint recorded for it
    /// ([`CheckpointMeta::rank_rng`]), so a resumed run of the same world size draws what an
    /// uninterrupted one would. With another world size the other ranks start from rank 0's
    /// position on their streams (logged as a warning).
    pub fn resume_planned(plan: ResumePlan, device: &Device, world: World) -> Result<Self> {
        let ResumePlan {
            run_dir,
            selected,
            mut config,
            changes,
            config_file_stale,
            lock,
        } = plan;
        let Selected {
            checkpoint: ckpt,
            newer,
        } = selected;
        let run_dir = run_dir.as_path();
        let dataset = open_dataset(&mut config)?;
        if config.model != ckpt.meta.config.model {
            let reason = match (
                ckpt.meta.config.model.num_classes(),
                config.model.num_classes(),
            ) {
                (Some(model), Some(data)) if model != data => format!(
                    "the model of this run is class-conditional with {model} classes, but the \
                     data set {} has {data}: resume it on a data set of {model} classes, or \
                     train a new run (another --out) on this one",
                    config.dataset
                ),
                _ => "the data set no longer matches the model of this run (image size or \
                      channels changed)"
                    .into(),
            };
            return Err(TrainError::Checkpoint {
                path: Some(ckpt.path.clone()),
                reason,
            });
        }
        config.validate()?;
        world.check_batch(config.batch_size, config.grad_accum)?;
        // The checkpoint's tensors must make its config's model before that model is built, so
        // a checkpoint claiming a far larger model fails without allocating it.
        ddpm_unet::model::check_tensors(&config.model, &ckpt.section(MODEL_PREFIX), &ckpt.path)
            .map_err(|e| TrainError::Checkpoint {
                path: Some(ckpt.path.clone()),
                reason: format!("does not fit this run: {e}"),
            })?;
        let (rank, size) = (world.rank, world.size);
        let mut trainer = Self::build(config, run_dir, device, dataset, lock, world)?;
        let bad = |e: TrainError| TrainError::Checkpoint {
            path: Some(ckpt.path.clone()),
            reason: format!("does not fit this run: {e}"),
        };
        trainer
            .model
            .set_tensors(&ckpt.section(MODEL_PREFIX), &ckpt.path)
            .map_err(|e| bad(e.into()))?;
        let ema = ckpt.section(EMA_PREFIX);
        trainer
            .ema_model
            .set_tensors(&ema, &ckpt.path)
            .map_err(|e| bad(e.into()))?;
        trainer.ema.set_tensors(ema.into_iter().collect())?;
        trainer
            .opt
            .load_state(&ckpt.section(OPTIM_PREFIX), ckpt.meta.step)
            .map_err(bad)?;
        let (rng, _) = ckpt.meta.rank_rng(rank, size);
        trainer.rng = rng;
        // Said on every rank (rank 0 included, whose own state is exact), so the lead's log
        // shows it too.
        if size > 1 && ckpt.meta.rank_word_pos.len() != size {
            tracing::warn!(
                rank,
                size,
                saved_for = ckpt.meta.rank_word_pos.len().max(1),
                "the checkpoint holds no random state for this rank in a world of this size \
                 (written by another number of ranks, or before ranks' states were saved): \
                 this rank's stream continues from rank 0's position, so the run is not \
                 bit-exact with an uninterrupted one"
            );
        }
        trainer.scaler = ckpt.meta.loss_scaler;
        trainer.loader.seek(ckpt.meta.loader)?;
        trainer.step = ckpt.meta.step;
        trainer.last_checkpoint = Some((ckpt.meta.step, ckpt.path.clone()));
        // The run keeps its id; a checkpoint older than run ids gets the one its config gives.
        trainer.run_id = match &ckpt.integrity.run_id {
            Some(id) => id.clone(),
            None => checkpoint::run_id_for(&ckpt.meta.config)?,
        };
        if rank == 0 {
            checkpoint::remove_orphan_tensors(run_dir)?;
            for passed in &newer {
                let to = checkpoint::set_aside(run_dir, passed.step)?;
                tracing::warn!(
                    "checkpoint step {} set aside to {} ({}); the run continues from step {}",
                    passed.step,
                    to.display(),
                    passed.reason,
                    ckpt.meta.step
                );
            }
            for c in &changes {
                tracing::warn!(
                    "resumed with `{}` = {} (was {}; set by {})",
                    c.key,
                    c.to,
                    c.from,
                    c.by
                );
            }
            if config_file_stale {
                let path = run_dir.join("config.toml");
                ddpm_fs::write_atomic(&path, trainer.config.to_toml()?.as_bytes())
                    .map_err(|e| TrainError::io(&path, "writing", e))?;
            }
            resume::append_history(
                run_dir,
                &HistoryEvent {
                    event: "resume".into(),
                    step: ckpt.meta.step,
                    run_id: trainer.run_id.clone(),
                    checkpoint: ckpt
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned()),
                    changes,
                    set_aside: newer,
                },
            )?;
            metrics::truncate_after(&run_dir.join("metrics.jsonl"), ckpt.meta.step)?;
        }
        tracing::info!(step = ckpt.meta.step, checkpoint = %ckpt.path.display(), "resumed");
        Ok(trainer)
    }

    fn build(
        config: TrainConfig,
        run_dir: &Path,
        device: &Device,
        dataset: Dataset,
        lock: Option<RunLock>,
        world: World,
    ) -> Result<Self> {
        config.precision.check_device(device)?;
        let compute = config.precision.compute_dtype();
        // The run's kernel policy, given to everything that runs kernels: the models (their
        // forward passes), the optimizer and the EMA, and the sampler (through the models).
        let kernels = config.kernels;
        let model = DiffusionModel::new(&config.model, config.seed, device, DType::F32)?
            .with_compute_dtype(compute)
            .with_kernel_policy(kernels);
        let ema_model = DiffusionModel::new(&config.model, config.seed, device, DType::F32)?
            .with_compute_dtype(compute)
            .with_kernel_policy(kernels);
        let vars = model.vars();
        let opt = AdamW::new(vars.clone(), config.optimizer, kernels)?;
        let ema = Ema::new(&vars, config.ema_decay, kernels)?;
        let schedule = Schedule::new(&config.schedule, device)?;
        for w in config.schedule.warnings() {
            tracing::warn!("{w}");
        }
        let micro = config.batch_size / config.grad_accum;
        // Each rank takes its share of every global micro-batch.
        let loader = world.shard(Loader::new(
            dataset,
            micro,
            config.seed,
            true,
            config.workers,
        )?)?;
        // Each rank's training RNG is the run's seed on the rank's own ChaCha stream (rank 0's is
        // the single-process one).
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ TRAIN_RNG_DOMAIN);
        if world.rank > 0 {
            rng.set_stream(world.rank as u64);
        }
        let collective = Collective::connect(world, device, run_dir)?;
        tracing::info!(
            parameters = model.num_parameters(),
            images = loader.dataset().len(),
            "model and data ready"
        );
        let run_id = checkpoint::run_id_for(&config)?;
        Ok(Self {
            rng,
            run_id,
            config,
            run_dir: run_dir.to_path_buf(),
            device: device.clone(),
            model,
            ema_model,
            opt,
            ema,
            schedule,
            loader,
            step: 0,
            last_checkpoint: None,
            scaler: LossScaler::default(),
            collective,
            _lock: lock,
            time_phases: false,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The trained (raw) model.
    pub fn model(&self) -> &DiffusionModel {
        &self.model
    }

    /// Times the phases of every following [`Trainer::train_step`] into
    /// [`StepStats::phases`] (`on`), or stops timing them. Each phase then ends with a device
    /// synchronization: the split is exact on CUDA, and the step a little slower there.
    pub fn time_phases(&mut self, on: bool) {
        self.time_phases = on;
    }

    /// The labels a class-conditional model trains on for a batch's `labels`: each replaced by
    /// the null label `n` with probability `class_dropout`, drawn from the run's RNG (so a
    /// resumed run draws what an uninterrupted one would), on the run's device.
    fn training_labels(&mut self, labels: &Tensor, n: usize) -> Result<Tensor> {
        let p = self.config.class_dropout;
        let v: Vec<u32> = labels
            .to_vec1::<u32>()?
            .into_iter()
            .map(|l| {
                if self.rng.random::<f64>() < p {
                    n as u32
                } else {
                    l
                }
            })
            .collect();
        let b = v.len();
        Ok(Tensor::from_vec(v, b, &self.device)?)
    }

    /// One optimizer step, exactly as [`Trainer::run`] takes it, without the logging,
    /// checkpoints and sample grids around it: `grad_accum` micro-batches from the loader
    /// (random timesteps and noise, `q_sample`, the model in training mode, the configured
    /// objective and loss, backward), the gradients averaged over ranks, the global gradient
    /// norm, clipping folded into the AdamW update at the step's learning rate (warm-up, then
    /// `[optimizer] lr_schedule`), then the EMA
    /// update. With f16, a step whose scaled gradients overflow is skipped (no update, no EMA)
    /// and halves the loss scale. Returns the step's loss, gradient norm and learning rate.
    ///
    /// A non-finite loss or gradient norm is [`TrainError::NonFinite`], with nothing changed;
    /// the faults of `opts` are injected as in [`Trainer::run`] (its other fields are unused).
    /// The step's work may still be running on an asynchronous device when this returns (the
    /// loss has been read back): synchronize the device before reading a clock.
    ///
    /// The whole step (forward, backward, optimizer and EMA) runs under the run's kernel policy
    /// (`[kernels]` of its config).
    pub fn train_step(&mut self, opts: &RunOptions) -> Result<StepStats> {
        let kernels = self.config.kernels;
        let device = self.device.clone();
        kernels.scoped(|| ddpm_kernels::on_pool(&device, || self.step_under_policy(opts)))
    }

    /// [`Trainer::train_step`], under the policy in force.
    fn step_under_policy(&mut self, opts: &RunOptions) -> Result<StepStats> {
        let mut clock = PhaseClock::new(self.time_phases);
        let accum = self.config.grad_accum;
        let lr = scheduled_lr(
            &self.config.optimizer,
            self.config.warmup_steps,
            self.config.steps,
            self.step + 1,
        );
        let vars = self.model.vars();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let t_max = self.schedule.timesteps() as u32;
        if !self.device.is_cpu() {
            // Device-side randomness (dropout masks) follows the run's seed and step, so a
            // resumed run draws what an uninterrupted one would.
            // Ranks other than 0 mix their rank in: (seed, rank, step).
            let rank = self.collective.world().rank as u64;
            self.device.set_seed(
                self.config.seed ^ TRAIN_RNG_DOMAIN ^ (self.step as u64 + 1) ^ (rank << 40),
            )?;
        }
        let f16 = self.config.precision == Precision::F16;
        let loss_scale = if f16 { self.scaler.scale } else { 1.0 };
        for _ in 0..accum {
            let batch = self.loader.next_batch()?;
            let x0 = batch.images.to_device(&self.device)?;
            clock.mark(&self.device, "batch")?;
            let dims = x0.dims().to_vec();
            let b = dims[0];
            let ts: Vec<u32> = (0..b).map(|_| self.rng.random_range(0..t_max)).collect();
            let t = Tensor::from_vec(ts, b, &self.device)?;
            let mut noise = gaussian(&mut self.rng, &dims, &self.device)?;
            if self.config.offset_noise > 0.0 {
                noise = add_offset_noise(&noise, self.config.offset_noise, &mut self.rng)?;
            }
            let x_t = self.schedule.q_sample(&x0, &t, &noise)?;
            let labels = match self.config.model.num_classes() {
                Some(n) => Some(self.training_labels(&batch.labels, n)?),
                None => None,
            };
            let self_cond = if self.config.model.self_condition() && self.rng.random::<bool>() {
                let out = self
                    .model
                    .forward_full(&x_t, &t, labels.as_ref(), None, None)?;
                let x0_hat = self
                    .schedule
                    .predict_x0(self.config.objective, &out, &x_t, &t)?
                    .clamp(-1f32, 1f32)?
                    .detach();
                Some(x0_hat)
            } else {
                None
            };
            clock.mark(&self.device, "inputs")?;
            let pred = self.model.forward_full(
                &x_t,
                &t,
                labels.as_ref(),
                self_cond.as_ref(),
                Some(&mut self.rng),
            )?;
            let target = self
                .schedule
                .training_target(self.config.objective, &x0, &noise, &t)?;
            let mut loss = self.config.loss.compute(
                &self.schedule,
                self.config.objective,
                &pred,
                &target,
                &t,
            )?;
            if opts.fault_nan_at_step == Some(self.step + 1) {
                loss = (loss * f64::NAN)?;
            }
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            // With other ranks, a non-finite loss stops every rank after the loss is reduced
            // below: a rank leaving alone would leave the others waiting.
            if !value.is_finite() && !self.collective.has_comm() {
                return Err(self.non_finite(NonFiniteValue::Loss(value), opts));
            }
            loss_sum += value;
            clock.mark(&self.device, "forward")?;
            let g = (loss * (loss_scale / accum as f64))?.backward()?;
            for (name, var) in &vars {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let gv = if f16 {
                        (gv.detach() / loss_scale)?
                    } else {
                        gv.detach()
                    };
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv,
                    };
                    grads.insert(name.clone(), acc);
                }
            }
            clock.mark(&self.device, "backward")?;
        }
        let mut loss = loss_sum / accum as f64;
        if self.collective.has_comm() {
            loss = self.collective.mean(loss)?;
            if !loss.is_finite() {
                return Err(self.non_finite(NonFiniteValue::Loss(loss), opts));
            }
            // Every rank now holds the same gradients, so clipping, the scaler, AdamW and the
            // EMA keep the weights equal on all ranks.
            self.collective.all_reduce_mean(&mut grads)?;
            clock.mark(&self.device, "all-reduce")?;
        }
        if opts.fault_inf_grad_at_step == Some(self.step + 1) {
            if let Some(g) = grads.values_mut().next() {
                *g = g.affine(0.0, f64::INFINITY)?;
            }
        }
        let norm = grad_norm(&grads, self.config.kernels)?;
        clock.mark(&self.device, "clip")?;
        // An infinite or NaN gradient would turn every weight, moment and EMA it reaches into
        // NaN (clipping scales by max/inf = 0, and 0 * inf is NaN): stop before the update. In
        // f16 the loss scaler skips the step instead (an overflow of the scaled gradients).
        if !f16 && !norm.is_finite() {
            return Err(self.non_finite(NonFiniteValue::GradNorm(norm), opts));
        }
        if f16 && !self.scaler.update(norm) {
            // Overflow in f16: skip the update (the scale is now halved), as GradScaler does.
            tracing::debug!(
                step = self.step + 1,
                scale = self.scaler.scale,
                "f16 overflow"
            );
            self.step += 1;
            return Ok(StepStats {
                loss,
                grad_norm: norm,
                lr,
                phases: clock.spent,
            });
        }
        let clip = clip_factor(norm, self.config.grad_clip);
        // The EMA takes this step's number, and moves in AdamW's pass where the kernels allow
        // (then the `ema` phase is empty and its time is in `adamw`'s).
        self.opt
            .step_scaled(&grads, lr, clip, Some((&mut self.ema, self.step + 1)))?;
        clock.mark(&self.device, "adamw")?;
        self.step += 1;
        clock.mark(&self.device, "ema")?;
        Ok(StepStats {
            loss,
            grad_norm: norm,
            lr,
            phases: clock.spent,
        })
    }

    /// The stop on a non-finite `what` at the coming step.
    fn non_finite(&self, what: NonFiniteValue, opts: &RunOptions) -> TrainError {
        let step = self.step + 1;
        let injected = [opts.fault_nan_at_step, opts.fault_inf_grad_at_step].contains(&Some(step));
        self.stop_at(step, what, injected)
    }

    fn stop_at(&self, step: usize, what: NonFiniteValue, injected: bool) -> TrainError {
        let last = self.last_checkpoint.as_ref().map(|c| c.0);
        let earlier_checkpoint = checkpoint::list(&self.run_dir)
            .unwrap_or_default()
            .into_iter()
            .map(|(s, _)| s)
            .rfind(|s| last.is_some_and(|k| *s < k));
        TrainError::NonFinite(Box::new(NonFiniteStop {
            step,
            what,
            last_checkpoint: last,
            earlier_checkpoint,
            lr: self.config.optimizer.lr,
            warmup_steps: self.config.warmup_steps,
            grad_clip: self.config.grad_clip,
            injected,
        }))
    }

    /// Runs `f` (which writes to the run directory) on rank 0 only. With other ranks, all then
    /// learn whether it failed, so that they stop together; `None` on the other ranks.
    fn on_lead<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<Option<T>> {
        if !self.collective.has_comm() {
            return f(self).map(Some);
        }
        let out = if self.collective.is_lead() {
            Some(f(self))
        } else {
            None
        };
        let failed = self.collective.any(matches!(out, Some(Err(_))))?;
        match out {
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) => Err(e),
            None if failed => Err(DistError::LeadFailed { what }.into()),
            None => Ok(None),
        }
    }

    /// Writes a checkpoint and the loss curve on rank 0; the checkpoint's JSON path on every
    /// rank.
    fn checkpoint_on_lead(&mut self) -> Result<PathBuf> {
        // Every rank takes part; rank 0 writes where each rank's random stream stands.
        let positions = self.collective.word_positions(self.rng.get_word_pos())?;
        let written = self.on_lead("writing a checkpoint", |t| {
            let path = t.write_checkpoint(positions)?;
            t.write_loss_curve()?;
            Ok(path)
        })?;
        Ok(match written {
            Some(path) => path,
            None => {
                // The file rank 0 has just written.
                let path = checkpoint::json_path(&self.run_dir, self.step);
                self.last_checkpoint = Some((self.step, path.clone()));
                path
            }
        })
    }

    /// Writes a checkpoint of the current step and prunes old ones.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.write_checkpoint(Vec::new())
    }

    /// [`Trainer::save_checkpoint`] with every rank's RNG word position (several ranks; empty
    /// for one, whose RNG is the checkpoint's own).
    fn write_checkpoint(&mut self, rank_word_pos: Vec<u128>) -> Result<PathBuf> {
        let rank_word_pos = if rank_word_pos.len() > 1 {
            rank_word_pos
        } else {
            Vec::new()
        };
        let meta = CheckpointMeta {
            format: checkpoint::CHECKPOINT_FORMAT.to_string(),
            step: self.step,
            rng: self.rng.clone(),
            loader: self.loader.position(),
            config: self.config.clone(),
            tensors_file: String::new(),
            tensors_bytes: 0,
            loss_scaler: self.scaler,
            rank_word_pos,
        };
        let (optim, _) = self.opt.state();
        let model = self.model.tensors();
        let saved = checkpoint::save(
            &self.run_dir,
            &meta,
            &self.run_id,
            &[
                (MODEL_PREFIX, &model),
                (EMA_PREFIX, self.ema.tensors()),
                (OPTIM_PREFIX, &optim),
            ],
            &self.config.model,
        );
        let path = match saved {
            Ok(path) => path,
            Err(TrainError::NonFiniteCheckpoint { step, found }) => {
                return Err(self.stop_at(step, NonFiniteValue::State(found), false));
            }
            Err(e) => return Err(e),
        };
        checkpoint::prune(&self.run_dir, self.config.keep_checkpoints)?;
        tracing::info!(step = self.step, path = %path.display(), "checkpoint written");
        self.last_checkpoint = Some((self.step, path.clone()));
        Ok(path)
    }

    /// Writes `samples/step-NNNNNNNN.png`: a grid sampled from the EMA weights with the fixed
    /// sample seed.
    pub fn write_sample_grid(&mut self) -> Result<PathBuf> {
        let never = AtomicBool::new(false);
        self.write_sample_grid_until(&never)?
            .ok_or_else(|| TrainError::Other("the sample grid was stopped".into()))
    }

    /// [`Trainer::write_sample_grid`], given up (`None`, nothing written) as soon as `stop` is
    /// set, so that a run asked to stop does not finish a grid that may take minutes first.
    pub fn write_sample_grid_until(&mut self, stop: &AtomicBool) -> Result<Option<PathBuf>> {
        let ema: std::collections::HashMap<String, Tensor> = self
            .ema
            .tensors()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.ema_model.set_tensors(&ema, Path::new("<ema>"))?;
        let opts = SampleOptions {
            num: self.config.sample_num,
            sampler: self.config.sampler,
            seed: self.config.sample_seed,
            batch_size: 64,
            frames: 0,
            progress: false,
            guidance: self.config.guidance,
        };
        let Some(samples) = sample_until(
            &self.ema_model,
            &self.schedule,
            self.config.objective,
            &opts,
            stop,
        )?
        else {
            tracing::info!(
                step = self.step,
                "stop requested: the sample grid of this step is skipped"
            );
            return Ok(None);
        };
        let dir = self.run_dir.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, "creating", e))?;
        let path = dir.join(format!("step-{:08}.png", self.step));
        let nrow = grid_columns(
            self.config.sample_num,
            self.config.model.num_classes(),
            &self.config.guidance,
        );
        let grid = image_io::image_grid(&samples.images, nrow)?;
        checkpoint::write_png_atomic(&grid, &path)
            .map_err(|e| TrainError::io(&path, "writing", e))?;
        tracing::info!(step = self.step, path = %path.display(), "sample grid written");
        Ok(Some(path))
    }

    /// Trains until `config.steps` or until `stop` is set (then the current step finishes and a
    /// checkpoint is written). A non-finite loss or gradient norm stops with
    /// [`TrainError::NonFinite`] before the step changes anything, and so does a non-finite
    /// state when it is due for a checkpoint (which is then not written).
    pub fn run(&mut self, stop: &AtomicBool, opts: &RunOptions) -> Result<RunSummary> {
        let total = self.config.steps;
        if let Some(scale) = opts.f16_initial_scale {
            if self.step == 0 && self.config.precision == Precision::F16 {
                tracing::info!(scale, "f16 loss scale set by DDPM_F16_INITIAL_SCALE");
                self.scaler.scale = scale;
            }
        }
        let bar = if opts.progress && self.collective.is_lead() {
            progress_bar(total as u64, "step")
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(self.step as u64);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let (mut window_loss, mut window_n) = (0f64, 0usize);
        let mut window_start = Instant::now();
        let mut last_loss = None;
        let mut interrupted = false;
        let mut checkpoint_path = self.last_checkpoint.as_ref().map(|c| c.1.clone());
        while self.step < total {
            // A stop asked of any rank stops them all after the same step.
            if self.collective.any(stop.load(Ordering::SeqCst))? {
                interrupted = true;
                break;
            }
            let StepStats {
                loss,
                grad_norm: norm,
                lr,
                ..
            } = self.train_step(opts)?;
            window_loss += loss;
            window_n += 1;
            bar.inc(1);
            if self.step.is_multiple_of(self.config.log_every) || self.step == total {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                let line = MetricsLine {
                    step: self.step,
                    loss: window_loss / window_n as f64,
                    lr,
                    grad_norm: norm,
                    images_per_sec: (window_n * self.config.batch_size) as f64 / secs,
                };
                bar.set_message(format!(
                    "loss {:.4} {:.1} img/s",
                    line.loss, line.images_per_sec
                ));
                tracing::debug!(
                    step = line.step,
                    loss = line.loss,
                    lr,
                    grad_norm = norm,
                    "train"
                );
                self.on_lead("appending to metrics.jsonl", |_| {
                    metrics::append(&metrics_path, &line)
                })?;
                last_loss = Some(line.loss);
                (window_loss, window_n) = (0.0, 0);
                window_start = Instant::now();
            }
            if self.step.is_multiple_of(self.config.checkpoint_every) || self.step == total {
                checkpoint_path = Some(self.checkpoint_on_lead()?);
            }
            if self.config.sample_every > 0
                && (self.step.is_multiple_of(self.config.sample_every) || self.step == total)
            {
                self.on_lead("writing a sample grid", |t| {
                    t.write_sample_grid_until(stop).map(drop)
                })?;
            }
        }
        if interrupted && self.last_checkpoint.as_ref().map(|c| c.0) != Some(self.step) {
            checkpoint_path = Some(self.checkpoint_on_lead()?);
        }
        bar.finish_and_clear();
        Ok(RunSummary {
            step: self.step,
            checkpoint: checkpoint_path,
            interrupted,
            last_loss,
        })
    }

    fn write_loss_curve(&self) -> Result<()> {
        let lines = metrics::read(&self.run_dir.join("metrics.jsonl"))?;
        let points: Vec<(usize, f64)> = lines.iter().map(|l| (l.step, l.loss)).collect();
        crate::plot::write_loss_curve(&points, &self.run_dir.join("loss.png"))
    }
}

/// Offset noise: `noise + strength * z`, with `z` of shape `(b, c, 1, 1)` drawn from `rng`
/// (one N(0, 1) value per image and channel) and broadcast over the pixels of `noise`
/// (`(b, c, h, w)`). Each image-channel's mean then varies with variance `strength^2` beyond
/// that of the white noise, which is what lets a model learn to shift whole images' brightness.
pub fn add_offset_noise(noise: &Tensor, strength: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let (b, c, _, _) = noise.dims4()?;
    let z = gaussian(rng, &[b, c, 1, 1], noise.device())?.to_dtype(noise.dtype())?;
    Ok(noise.broadcast_add(&z.affine(strength, 0.0)?)?)
}

/// Opens the training split and makes the model's image size and channels follow it.
fn open_dataset(config: &mut TrainConfig) -> Result<Dataset> {
    let dataset = Dataset::open(&config.dataset, &config.data, Split::Train)?;
    fit_model_to(config, &dataset);
    Ok(dataset)
}

/// Makes the model's image size and channels those of `dataset`.
fn fit_model_to(config: &mut TrainConfig, dataset: &Dataset) {
    config.model.set_channels(dataset.channels());
    config.model.set_image_size(dataset.image_size());
    if config.model.num_classes().is_some() {
        config
            .model
            .set_num_classes(Some(dataset.num_classes().max(1)));
    }
}

/// The classes of a class-conditional run's training split that no image has, in label order.
fn classes_without_images(dataset: &Dataset) -> Vec<usize> {
    let mut counts = vec![0usize; dataset.num_classes()];
    for &label in dataset.labels() {
        if let Some(c) = counts.get_mut(label as usize) {
            *c += 1;
        }
    }
    (0..counts.len()).filter(|&c| counts[c] == 0).collect()
}

/// Warns when a class-conditional run cannot learn what its classes look like: its data set
/// (`name`) has one class (the class input then carries nothing), or classes without a training
/// image (an empty class folder, a stray large label), whose samples would be noise.
fn warn_unlearnable_classes(dataset: &Dataset, name: &str) {
    let n = dataset.num_classes();
    if n <= 1 {
        tracing::warn!(
            dataset = name,
            "class-conditional training on a data set of one class: the model learns nothing \
             from its class input (train without --class-conditional, or check why the data \
             set's labels were not read)"
        );
        return;
    }
    let empty = classes_without_images(dataset);
    if let Some(&first) = empty.first() {
        tracing::warn!(
            dataset = name,
            classes = n,
            without_images = empty.len(),
            first = %format!("{first} ({})", dataset.class_names()[first]),
            "{} of the {n} classes {} no training image: the model learns nothing for them, \
             and its samples of them are noise (remove empty class folders, or check the \
             data set's labels)",
            empty.len(),
            if empty.len() == 1 { "has" } else { "have" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// A tiny run on the committed MNIST fixture (copied into `dir/data/mnist` under MNIST's
    /// t10k names), 16x16, a checkpoint every step, no warm-up, no sample grids.
    fn tiny_config(dir: &Path) -> Result<TrainConfig> {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ddpm-data/fixtures/mnist");
        let mnist = dir.join("data/mnist");
        std::fs::create_dir_all(&mnist)?;
        for (from, to) in [
            ("images.idx3.gz", "t10k-images-idx3-ubyte.gz"),
            ("labels.idx1.gz", "t10k-labels-idx1-ubyte.gz"),
        ] {
            std::fs::copy(fixtures.join(from), mnist.join(to))?;
        }
        let model: ddpm_unet::ModelConfig = serde_json::from_value(serde_json::json!({
            "arch": "ddpm_unet", "image_size": 16, "in_channels": 1, "ch": 8,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0, "groups": 4
        }))?;
        let mut config = TrainConfig {
            steps: 10,
            batch_size: 4,
            warmup_steps: 0,
            checkpoint_every: 1,
            keep_checkpoints: 10,
            sample_every: 0,
            log_every: 1,
            model,
            ..TrainConfig::default()
        };
        config.data.root = dir.join("data");
        config.data.image_size = Some(16);
        Ok(config)
    }

    /// The trainer's weights, EMA and AdamW moments equal the checkpoint's, bit for bit.
    fn assert_state_is_checkpoint(t: &Trainer, json: &Path) -> Result<()> {
        let ckpt = checkpoint::load(json, &Device::Cpu)?;
        let (optim, _) = t.opt.state();
        for (prefix, live) in [
            (MODEL_PREFIX, t.model.tensors()),
            (EMA_PREFIX, t.ema.tensors().clone()),
            (OPTIM_PREFIX, optim),
        ] {
            let saved = ckpt.section(prefix);
            assert_eq!(saved.len(), live.len(), "{prefix}");
            for (name, tensor) in live {
                let a = tensor.flatten_all()?.to_vec1::<f32>()?;
                let b = saved[&name].flatten_all()?.to_vec1::<f32>()?;
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{prefix}{name} changed after the stop");
            }
        }
        Ok(())
    }

    /// Offset noise against its closed-form statistics: on zero noise it is `strength * z`,
    /// constant over each image-channel's pixels, with mean 0 and standard deviation
    /// `strength` over image-channels; added to white noise of `h * w` pixels, the
    /// image-channel means have variance `strength^2 + 1 / (h w)` and the whole variance
    /// `1 + strength^2`, while the deviations from each image-channel's mean keep variance
    /// `1 - 1 / (h w)`. Tolerances are 5 standard errors of each estimate.
    #[test]
    fn offset_noise_has_its_closed_form_statistics() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (b, c, h, w) = (512usize, 4usize, 8usize, 8usize);
        let (n, hw) = ((b * c) as f64, (h * w) as f64);
        let s = 0.5;
        let zeros = Tensor::zeros((b, c, h, w), DType::F32, &Device::Cpu)?;
        let off = add_offset_noise(&zeros, s, &mut rng)?;
        let rows = off.reshape((b * c, h * w))?.to_vec2::<f32>()?;
        assert!(rows.iter().all(|r| r.iter().all(|v| *v == r[0])));
        let z: Vec<f64> = rows.iter().map(|r| r[0] as f64).collect();
        let mean = z.iter().sum::<f64>() / n;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 5.0 * s / n.sqrt(), "mean {mean}");
        assert!(
            (var - s * s).abs() < 5.0 * s * s * (2.0 / n).sqrt(),
            "var {var}"
        );

        let white = gaussian(&mut rng, &[b, c, h, w], &Device::Cpu)?;
        let noisy = add_offset_noise(&white, s, &mut rng)?;
        let rows = noisy.reshape((b * c, h * w))?.to_vec2::<f32>()?;
        let means: Vec<f64> = rows
            .iter()
            .map(|r| r.iter().map(|v| *v as f64).sum::<f64>() / hw)
            .collect();
        let var_means = means.iter().map(|m| m * m).sum::<f64>() / n;
        let want = s * s + 1.0 / hw;
        assert!(
            (var_means - want).abs() < 5.0 * want * (2.0 / n).sqrt(),
            "{var_means} vs {want}"
        );
        let all = n * hw;
        let total = rows
            .iter()
            .flatten()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            / all;
        let want = 1.0 + s * s;
        // The per-channel offsets dominate the error of the total: n draws of variance s^2.
        assert!(
            (total - want).abs() < 5.0 * s * s * (2.0 / n).sqrt() + 0.01,
            "{total}"
        );
        let within = rows
            .iter()
            .zip(&means)
            .flat_map(|(r, m)| r.iter().map(move |v| (*v as f64 - m).powi(2)))
            .sum::<f64>()
            / all;
        let want = 1.0 - 1.0 / hw;
        assert!((within - want).abs() < 5.0 * (2.0 / all).sqrt(), "{within}");
        Ok(())
    }

    /// [`Trainer::with_dataset`] and [`Trainer::train_step`] are the steps of
    /// [`Trainer::run`]: on the same images they give the same weights and EMA, bit for bit;
    /// the run directory is left alone; phases are timed only when asked.
    #[test]
    fn in_memory_trainer_takes_the_steps_of_run() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = TrainConfig {
            steps: 3,
            checkpoint_every: 3,
            ..tiny_config(dir.path())?
        };
        let mut ran = Trainer::create(config.clone(), &dir.path().join("run"), &Device::Cpu)?;
        ran.run(&AtomicBool::new(false), &RunOptions::default())?;
        let dataset = Dataset::open(&config.dataset, &config.data, Split::Train)?;
        let run_dir = dir.path().join("in-memory");
        let mut t = Trainer::with_dataset(config, dataset, &run_dir, &Device::Cpu)?;
        let opts = RunOptions::default();
        let first = t.train_step(&opts)?;
        assert!(first.loss.is_finite() && first.grad_norm > 0.0, "{first:?}");
        assert!(first.phases.is_empty());
        t.train_step(&opts)?;
        t.time_phases(true);
        let timed = t.train_step(&opts)?;
        let names: Vec<&str> = timed.phases.iter().map(|p| p.0).collect();
        assert_eq!(
            names,
            ["batch", "inputs", "forward", "backward", "clip", "adamw", "ema"]
        );
        assert_eq!(t.step(), 3);
        assert!(!run_dir.exists());
        for (a, b) in [
            (ran.model.tensors(), t.model.tensors()),
            (ran.ema.tensors().clone(), t.ema.tensors().clone()),
        ] {
            assert_eq!(a.len(), b.len());
            for (name, x) in a {
                let x = x.flatten_all()?.to_vec1::<f32>()?;
                let y = b[&name].flatten_all()?.to_vec1::<f32>()?;
                let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{name} differs from the run's");
            }
        }
        Ok(())
    }

    /// A class-conditional run: the class count follows the data set (10 for MNIST, whatever
    /// the config said), label dropout 0 keeps every label and 1 replaces every one by the null
    /// label, the run trains the class embedding and its checkpoint resumes bit-exactly.
    #[test]
    fn classes_without_a_training_image_are_found() -> Result<()> {
        let names = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        let ds = Dataset::from_u8(1, 1, vec![0; 4], vec![0, 3, 0, 3], names(5))?;
        assert_eq!(classes_without_images(&ds), vec![1, 2, 4]);
        let ds = Dataset::from_u8(1, 1, vec![0; 2], vec![1, 0], names(2))?;
        assert!(classes_without_images(&ds).is_empty());
        Ok(())
    }

    #[test]
    fn a_class_conditional_run_trains_on_its_labels() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut config = TrainConfig {
            steps: 4,
            checkpoint_every: 2,
            ..tiny_config(dir.path())?
        };
        config.model.set_num_classes(Some(1));
        let run_dir = dir.path().join("run");
        let mut t = Trainer::create(config.clone(), &run_dir, &Device::Cpu)?;
        assert_eq!(t.config().model.num_classes(), Some(10));
        let labels = Tensor::new(&[3u32, 0, 9, 4, 4, 1, 7, 2], &Device::Cpu)?;
        t.config.class_dropout = 0.0;
        assert_eq!(
            t.training_labels(&labels, 10)?.to_vec1::<u32>()?,
            labels.to_vec1::<u32>()?
        );
        t.config.class_dropout = 1.0;
        assert_eq!(
            t.training_labels(&labels, 10)?.to_vec1::<u32>()?,
            vec![10; 8]
        );
        t.config.class_dropout = 0.5;
        let mixed = t.training_labels(&labels, 10)?.to_vec1::<u32>()?;
        let original = labels.to_vec1::<u32>()?;
        assert!(mixed.iter().zip(&original).all(|(m, o)| m == o || *m == 10));

        let mut t = Trainer::create(config, &dir.path().join("run2"), &Device::Cpu)?;
        let before = t.model.tensors()["class_emb.weight"].to_vec2::<f32>()?;
        t.run(&AtomicBool::new(false), &RunOptions::default())?;
        let after = t.model.tensors()["class_emb.weight"].to_vec2::<f32>()?;
        assert_ne!(before, after, "the class embedding did not train");
        let (_, json) = checkpoint::list(&dir.path().join("run2"))?
            .pop()
            .ok_or("no checkpoint")?;
        assert_state_is_checkpoint(&t, &json)?;
        let mut resumed = Trainer::resume(&dir.path().join("run2"), &Device::Cpu, Some(6))?;
        assert_eq!(resumed.config().model.num_classes(), Some(10));
        resumed.run(&AtomicBool::new(false), &RunOptions::default())?;
        assert_eq!(resumed.step(), 6);
        Ok(())
    }

    /// A NaN loss and an infinite gradient (with a finite loss) each stop the run before the
    /// step changes anything: the weights, EMA and moments are still the last checkpoint's, and
    /// the error says which checkpoint is kept and gives no advice that does not apply.
    #[test]
    fn a_non_finite_step_changes_nothing_and_names_what_is_kept() -> Result<()> {
        for (opts, what) in [
            (
                RunOptions {
                    fault_nan_at_step: Some(4),
                    ..RunOptions::default()
                },
                "the loss became NaN at step 4",
            ),
            (
                RunOptions {
                    fault_inf_grad_at_step: Some(4),
                    ..RunOptions::default()
                },
                "the gradient norm became inf at step 4",
            ),
        ] {
            let dir = tempfile::tempdir()?;
            let config = tiny_config(dir.path())?;
            let run = dir.path().join("run");
            let mut t = Trainer::create(config, &run, &Device::Cpu)?;
            let e = t.run(&AtomicBool::new(false), &opts).err();
            let Some(TrainError::NonFinite(stop)) = e else {
                panic!("expected a non-finite stop, got {e:?}");
            };
            assert_eq!((stop.step, stop.last_checkpoint), (4, Some(3)));
            assert_eq!(stop.earlier_checkpoint, Some(2));
            assert!(stop.replays(), "{stop}");
            let msg = stop.to_string();
            assert!(msg.starts_with(what), "{msg}");
            assert!(
                msg.contains("the newest checkpoint, step 3, is kept"),
                "{msg}"
            );
            assert_eq!(t.step(), 3);
            assert_state_is_checkpoint(&t, &checkpoint::json_path(&run, 3))?;
            assert_eq!(checkpoint::list(&run)?.last().map(|c| c.0), Some(3));
        }
        // No checkpoint yet: the message says so; clipping is on, so it is not advised.
        let stop = NonFiniteStop {
            step: 2,
            what: NonFiniteValue::Loss(f64::INFINITY),
            last_checkpoint: None,
            earlier_checkpoint: None,
            lr: 1e30,
            warmup_steps: 0,
            grad_clip: 1.0,
            injected: false,
        };
        let msg = stop.to_string();
        assert!(msg.contains("no checkpoint had been written yet"), "{msg}");
        assert!(
            msg.contains("(now 1e30)") && msg.contains("warm-up"),
            "{msg}"
        );
        assert!(
            !msg.contains("clipping") && !msg.contains("step 0"),
            "{msg}"
        );
        Ok(())
    }
}
