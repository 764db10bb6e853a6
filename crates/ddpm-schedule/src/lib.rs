//! The diffusion math of DDPM, exact and tested: beta schedules and their derived buffers, the
//! forward process q(x_t | x_0), the eps / x_0 / v objectives and their conversions, the posterior
//! q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), the training losses with optional
//! min-SNR weighting, and the DDPM and DDIM sampler steps with respacing.
//!
//! This crate owns the equations only: it knows no network and no dataset. A training loop calls
//! [`Schedule::q_sample`], [`Schedule::training_target`] and [`DiffusionLoss::compute`]; a
//! sampling loop feeds [`Sampler::timesteps`] to its model and calls [`Sampler::step`]. Buffers
//! are computed in `f64` and stored as tensors (F32 by default) on the chosen device; noise is
//! always passed in by the caller, who owns the random number generator.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_schedule::{DdimOptions, DdimSampler, Objective, Schedule, ScheduleConfig};
//!
//! # fn main() -> ddpm_schedule::Result<()> {
//! let device = Device::Cpu;
//! let schedule = Schedule::new(&ScheduleConfig::default(), &device)?;
//!
//! // Forward process: noise a batch of two images, each at its own timestep.
//! let x0 = Tensor::zeros((2, 1, 4, 4), DType::F32, &device)?;
//! let eps = Tensor::randn(0f32, 1.0, (2, 1, 4, 4), &device)?;
//! let t = Tensor::new(&[10u32, 900], &device)?;
//! let x_t = schedule.q_sample(&x0, &t, &eps)?;
//! let target = schedule.training_target(Objective::Eps, &x0, &eps, &t)?;
//! assert_eq!(target.dims(), x_t.dims());
//!
//! // Reverse process: a deterministic 50-step DDIM sampler.
//! let opts = DdimOptions { steps: Some(50), ..DdimOptions::default() };
//! let sampler = DdimSampler::new(&schedule, opts)?;
//! assert_eq!(sampler.timesteps()[0], 999);
//! let mut x = Tensor::randn(0f32, 1.0, (2, 1, 4, 4), &device)?;
//! for i in 0..sampler.timesteps().len() {
//!     let model_output = x.zeros_like()?; // a network would predict eps here
//!     x = sampler.step(&model_output, &x, i, Objective::Eps, None)?;
//! }
//! assert_eq!(x.dims(), &[2, 1, 4, 4]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod diffusers;
pub mod error;
pub mod forward;
pub mod likelihood;
pub mod loss;
pub mod objective;
pub mod posterior;
pub mod sampler;
pub mod schedule;

/// The candle-core this crate is built on: use it for the tensors and devices passed in and out,
/// so that no version has to be matched by hand.
pub use candle_core;
pub use config::{BetaSchedule, ScheduleConfig};
pub use error::{Result, ScheduleError};
pub use forward::Gaussian;
pub use likelihood::{
    bits_per_dim, discretized_gaussian_log_likelihood, normal_kl, BoundConfig, NormalCdf,
};
pub use loss::{weighted_mean, DiffusionLoss, LossKind, LossWeighting};
pub use objective::Objective;
pub use posterior::{DdpmVariance, ModelPrediction};
pub use sampler::{
    spaced_timesteps, AffineStep, DdimOptions, DdimSampler, DdpmOptions, DdpmSampler,
    DpmSolverOptions, DpmSolverSampler, DpmSpacing, RespacedSchedule, Sampler, SamplerConfig,
    StepHistory,
};
pub use schedule::{timestep_tensor, Buffer, Schedule};

#[cfg(test)]
pub(crate) mod test_util;
