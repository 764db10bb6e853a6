//! Training and sampling for DDPM: Algorithm 1 of the paper with AdamW, warm-up, clipping,
//! accumulation and EMA; atomic, resumable checkpoints; sample grids, GIFs of the reverse
//! process, metrics and a loss curve.
//!
//! This crate wires a schedule ([`ddpm_schedule`]), a network ([`ddpm_unet`]) and a data set
//! ([`ddpm_data`]) together. It knows nothing about command-line flags: the `ddpm` binary fills a
//! [`TrainConfig`] and calls [`Trainer`].
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use ddpm_train::{Trainer, TrainConfig, RunOptions};
//!
//! let mut config = TrainConfig::default(); // the MNIST preset
//! config.steps = 100;
//! let mut trainer = Trainer::create(config, "runs/mnist".as_ref(), &candle_core::Device::Cpu)?;
//! trainer.run(&AtomicBool::new(false), &RunOptions::default())?;
//! # Ok::<(), ddpm_train::TrainError>(())
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod distributed;
pub mod ema;
pub mod eval;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod precision;
pub mod resume;
pub mod sample;
pub mod trainer;

use std::path::{Path, PathBuf};

/// The candle-core this crate is built on: use it for the tensors and devices passed in and out,
/// so that no version has to be matched by hand.
pub use candle_core;
pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use config::TrainConfig;
pub use device::parse_device;
pub use distributed::{Collective, DistError, World};
pub use precision::{LossScaler, Precision};
pub use resume::{ResumeOptions, SafeChanges};
pub use sample::{sample, Guidance, SampleOptions, Samples};
pub use trainer::{NonFiniteStop, RunOptions, RunSummary, StepStats, Trainer};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The training configuration cannot be used.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint is missing, incomplete, corrupt or from another configuration.
    #[error("checkpoint{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Checkpoint {
        /// The file at fault, when known.
        path: Option<PathBuf>,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The newest checkpoint of a run fails verification; says which one verifies.
    #[error("{0}")]
    Damaged(Box<checkpoint::DamagedCheckpoint>),
    /// Training stopped on a NaN or infinite loss, gradient norm or state.
    #[error("{0}")]
    NonFinite(Box<trainer::NonFiniteStop>),
    /// A checkpoint about to be written holds NaN or infinite values (nothing was written).
    #[error("refusing to write the checkpoint of step {step}: {found}")]
    NonFiniteCheckpoint {
        /// The step of the checkpoint.
        step: usize,
        /// The tensors at fault.
        found: checkpoint::NonFiniteTensors,
    },
    /// The run directory is locked by another live run, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// An error from the schedule crate.
    #[error(transparent)]
    Schedule(#[from] ddpm_schedule::ScheduleError),
    /// An error from the model crate.
    #[error(transparent)]
    Model(Box<ddpm_unet::UnetError>),
    /// An error from the data crate.
    #[error(transparent)]
    Data(Box<ddpm_data::DataError>),
    /// A data-parallel launch or reduction failed.
    #[error(transparent)]
    Distributed(#[from] distributed::DistError),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

// The model and data errors carry paths and numbers; boxed, they keep every `Result` of this
// crate small.
impl From<ddpm_unet::UnetError> for TrainError {
    fn from(e: ddpm_unet::UnetError) -> Self {
        TrainError::Model(Box::new(e))
    }
}

impl From<ddpm_data::DataError> for TrainError {
    fn from(e: ddpm_data::DataError) -> Self {
        TrainError::Data(Box::new(e))
    }
}

impl TrainError {
    /// An I/O error while doing `what` on `path`.
    pub fn io(path: &Path, what: &str, source: std::io::Error) -> Self {
        Self::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
