//! Sampler step math: one reverse step x_t -> x_{t_prev} given the network's output.
//!
//! A sampling loop draws x_T ~ N(0, I), then for `i in 0..sampler.timesteps().len()` feeds
//! `timesteps()[i]` (an original timestep) to the model and calls `step(output, x, i, ...)`,
//! passing fresh Gaussian noise when [`Sampler::needs_noise`] says so. Every sample of the batch
//! shares the step's timestep. A multistep sampler (DPM-Solver++ (2M), [`Sampler::is_multistep`])
//! also uses the predicted x_0 of the step before: a loop that serves every sampler calls
//! [`Sampler::step_with_history`] with one [`StepHistory`] per run (per batch) instead.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScheduleError};
use crate::forward::check_same_shape;
use crate::objective::Objective;
use crate::posterior::DdpmVariance;
use crate::schedule::Schedule;

pub mod affine;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod respace;

pub use affine::AffineStep;
pub use ddim::{DdimOptions, DdimSampler};
pub use ddpm::{DdpmOptions, DdpmSampler};
pub use dpm_solver::{dpm_timesteps, DpmSolverOptions, DpmSolverSampler, DpmSpacing};
pub use respace::{spaced_timesteps, RespacedSchedule};

/// What a sampling loop needs from a sampler.
pub trait Sampler {
    /// The original timesteps to feed the model, in the order of the steps (descending).
    fn timesteps(&self) -> &[usize];

    /// Whether step `i` adds noise, so that the caller must pass a noise tensor.
    fn needs_noise(&self, i: usize) -> bool;

    /// One reverse step: from `x_t` at `timesteps()[i]` to the next, earlier timestep (or to x_0
    /// after the last step). `model_output` is the network's output of kind `objective` for
    /// `(x_t, timesteps()[i])`; `noise` is standard Gaussian noise shaped like `x_t`, required
    /// when [`Sampler::needs_noise`] is true and ignored otherwise.
    fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Step `i` as scalar coefficients ([`AffineStep`]), for loops that update x_t in place: the
    /// same step as [`Sampler::step`], whose noise is drawn when `sigma` is `Some` (exactly
    /// when [`Sampler::needs_noise`] is true).
    fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep>;

    /// Whether steps use the predicted x_0 of the step before (DPM-Solver++ (2M)): then a loop
    /// calls [`Sampler::step_with_history`] (tensor steps) or [`AffineStep::apply_multistep`]
    /// (in-place steps) rather than [`Sampler::step`] / [`AffineStep::apply`]. False for the
    /// single-step samplers (DDPM, DDIM).
    fn is_multistep(&self) -> bool {
        false
    }

    /// [`Sampler::step`] for every sampler, multistep ones included: `history` carries the
    /// predicted x_0 from one step to the next. Start each run (each batch) with a new
    /// [`StepHistory`] and pass it to every step in order. Single-step samplers ignore it.
    fn step_with_history(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
        history: &mut StepHistory,
    ) -> Result<Tensor> {
        let _ = history;
        self.step(model_output, x_t, i, objective, noise)
    }

    /// The step index of timestep `t` (its position in [`Sampler::timesteps`]), or an error
    /// when the sampler does not step from `t` (a respaced sampler visits only some).
    fn index_of(&self, t: usize) -> Result<usize> {
        let ts = self.timesteps();
        ts.iter()
            .position(|&s| s == t)
            .ok_or(ScheduleError::NotASamplerTimestep {
                timestep: t,
                len: ts.len(),
            })
    }

    /// [`Sampler::step`] addressed by the timestep `t` the model was evaluated at (as diffusers'
    /// schedulers are) rather than by the step index.
    fn step_at(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.index_of(t)?;
        self.step(model_output, x_t, i, objective, noise)
    }
}

/// What a multistep sampler carries from one step to the next of a run: the predicted x_0 of
/// the latest step, with its index (so that a step never uses another run's or a skipped step's
/// prediction).
#[derive(Debug, Clone, Default)]
pub struct StepHistory {
    last_x0: Option<(usize, Tensor)>,
}

impl StepHistory {
    /// An empty history, for the start of a run.
    pub fn new() -> Self {
        Self::default()
    }

    /// The predicted x_0 of step `i`, when it is the latest recorded.
    pub fn x0_of(&self, i: usize) -> Option<&Tensor> {
        self.last_x0
            .as_ref()
            .filter(|(j, _)| *j == i)
            .map(|(_, x0)| x0)
    }

    /// Records `x0` as the predicted x_0 of step `i`.
    pub fn record(&mut self, i: usize, x0: Tensor) {
        self.last_x0 = Some((i, x0));
    }
}

fn default_clip() -> bool {
    true
}

/// A sampler choice as written in a config file, e.g. `{ kind = "ddim", steps = 50, eta = 0.0 }`,
/// `{ kind = "ddpm", variance = "fixed_large" }` or `{ kind = "dpm-solver++", steps = 20 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SamplerConfig {
    /// Ancestral DDPM sampling, see [`DdpmSampler`].
    Ddpm {
        /// Respace to this many steps; all T when absent.
        #[serde(default)]
        steps: Option<usize>,
        /// The reverse-step variance.
        #[serde(default)]
        variance: DdpmVariance,
        /// Clip the predicted x_0 to [-1, 1].
        #[serde(default = "default_clip")]
        clip_x0: bool,
    },
    /// DDIM sampling, see [`DdimSampler`].
    Ddim {
        /// The number of steps; all T when absent.
        #[serde(default)]
        steps: Option<usize>,
        /// The stochasticity, 0 (deterministic) to 1.
        #[serde(default)]
        eta: f64,
        /// Clip the predicted x_0 to [-1, 1].
        #[serde(default = "default_clip")]
        clip_x0: bool,
    },
    /// DPM-Solver++ (2M), see [`DpmSolverSampler`].
    #[serde(rename = "dpm-solver++", alias = "dpm_solver++", alias = "dpmsolver++")]
    DpmSolver {
        /// The number of steps; [`dpm_solver::DEFAULT_DPM_STEPS`] (at most T - 1) when absent.
        #[serde(default)]
        steps: Option<usize>,
        /// How the steps spread over the timesteps (diffusers' `timestep_spacing`).
        #[serde(default)]
        spacing: DpmSpacing,
        /// Clip the predicted x_0 to [-1, 1] (off by default, as diffusers).
        #[serde(default)]
        clip_x0: bool,
    },
}

impl Default for SamplerConfig {
    /// Full-length ancestral DDPM sampling with the posterior variance and clipping.
    fn default() -> Self {
        Self::Ddpm {
            steps: None,
            variance: DdpmVariance::default(),
            clip_x0: true,
        }
    }
}

impl SamplerConfig {
    /// Builds the configured sampler over `schedule`.
    pub fn build(&self, schedule: &Schedule) -> Result<Box<dyn Sampler + Send + Sync>> {
        Ok(match *self {
            Self::Ddpm {
                steps,
                variance,
                clip_x0,
            } => Box::new(DdpmSampler::new(
                schedule,
                DdpmOptions {
                    steps,
                    variance,
                    clip_x0,
                },
            )?),
            Self::Ddim {
                steps,
                eta,
                clip_x0,
            } => Box::new(DdimSampler::new(
                schedule,
                DdimOptions {
                    steps,
                    eta,
                    clip_x0,
                },
            )?),
            Self::DpmSolver {
                steps,
                spacing,
                clip_x0,
            } => Box::new(DpmSolverSampler::new(
                schedule,
                DpmSolverOptions {
                    steps,
                    spacing,
                    clip_x0,
                },
            )?),
        })
    }

    /// The configured number of steps (`None`: the sampler's default).
    pub fn steps(&self) -> Option<usize> {
        match *self {
            Self::Ddpm { steps, .. } | Self::Ddim { steps, .. } | Self::DpmSolver { steps, .. } => {
                steps
            }
        }
    }
}

/// Errors unless `i` indexes one of `len` steps.
pub(crate) fn check_index(i: usize, len: usize) -> Result<()> {
    if i < len {
        Ok(())
    } else {
        Err(ScheduleError::StepOutOfRange { index: i, len })
    }
}

/// The noise for a stochastic step: present and shaped like `x_t`.
pub(crate) fn required_noise<'a>(
    noise: Option<&'a Tensor>,
    x_t: &Tensor,
    index: usize,
    timestep: usize,
) -> Result<&'a Tensor> {
    let noise = noise.ok_or(ScheduleError::MissingNoise { index, timestep })?;
    check_same_shape("noise", x_t, noise)?;
    Ok(noise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, normal_tensor, schedule_f64, values};
    use crate::ScheduleConfig;

    #[test]
    fn stepping_by_timestep_is_stepping_by_its_index() {
        let schedule = schedule_f64(&ScheduleConfig::default());
        let sampler = SamplerConfig::Ddim {
            steps: Some(10),
            eta: 0.0,
            clip_x0: true,
        }
        .build(&schedule)
        .unwrap();
        let ts = sampler.timesteps().to_vec();
        assert_eq!(ts.len(), 10);
        let x = normal_tensor(1, &[2, 1, 4, 4]);
        let eps = normal_tensor(2, &[2, 1, 4, 4]);
        for (i, &t) in ts.iter().enumerate() {
            assert_eq!(sampler.index_of(t).unwrap(), i);
            let by_t = sampler.step_at(&eps, &x, t, Objective::Eps, None).unwrap();
            let by_i = sampler.step(&eps, &x, i, Objective::Eps, None).unwrap();
            assert_eq!(values(&by_t), values(&by_i), "timestep {t}");
        }
        assert!(!sampler.is_multistep());
        // A timestep the respaced sampler skips is an error that names it.
        let skipped = (0..1000).find(|t| !ts.contains(t)).unwrap();
        let e = sampler
            .step_at(&eps, &x, skipped, Objective::Eps, None)
            .unwrap_err();
        assert!(
            matches!(e, ScheduleError::NotASamplerTimestep { timestep, len: 10 } if timestep == skipped),
            "{e}"
        );
    }

    #[test]
    fn sampler_config_reads_and_round_trips_toml() {
        let cases = [
            ("kind = \"ddpm\"", SamplerConfig::default()),
            (
                "kind = \"ddpm\"\nsteps = 250\nvariance = \"fixed_large\"\nclip_x0 = false",
                SamplerConfig::Ddpm {
                    steps: Some(250),
                    variance: DdpmVariance::FixedLarge,
                    clip_x0: false,
                },
            ),
            (
                "kind = \"ddim\"\nsteps = 50",
                SamplerConfig::Ddim {
                    steps: Some(50),
                    eta: 0.0,
                    clip_x0: true,
                },
            ),
            (
                "kind = \"dpm-solver++\"",
                SamplerConfig::DpmSolver {
                    steps: None,
                    spacing: DpmSpacing::Linspace,
                    clip_x0: false,
                },
            ),
            (
                "kind = \"dpm-solver++\"\nsteps = 10\nspacing = \"trailing\"\nclip_x0 = true",
                SamplerConfig::DpmSolver {
                    steps: Some(10),
                    spacing: DpmSpacing::Trailing,
                    clip_x0: true,
                },
            ),
        ];
        for (text, want) in cases {
            let got: SamplerConfig = toml::from_str(text).expect(text);
            assert_eq!(got, want);
            let back: SamplerConfig =
                toml::from_str(&toml::to_string(&got).expect("ser")).expect("de");
            assert_eq!(back, want);
        }
    }

    #[test]
    fn samplers_with_an_oracle_model_land_on_the_single_data_point() {
        // For data that is a single point x*, the ideal eps-predictor is
        // eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t). Every sampler driven by it
        // through the `Sampler` trait must end exactly at x* (up to f64 rounding amplified by
        // 1/sqrt(1 - abar) ~ 100 at the last step).
        let s = schedule_f64(&ScheduleConfig::scaled_linear(200));
        let x_star = normal_tensor(100, &[2, 3]).tanh().expect("tanh");
        let configs = [
            SamplerConfig::default(),
            SamplerConfig::Ddpm {
                steps: Some(20),
                variance: DdpmVariance::FixedLarge,
                clip_x0: false,
            },
            SamplerConfig::Ddim {
                steps: Some(10),
                eta: 0.0,
                clip_x0: true,
            },
            SamplerConfig::Ddim {
                steps: None,
                eta: 1.0,
                clip_x0: false,
            },
            SamplerConfig::DpmSolver {
                steps: Some(10),
                spacing: DpmSpacing::Linspace,
                clip_x0: false,
            },
            SamplerConfig::DpmSolver {
                steps: Some(7),
                spacing: DpmSpacing::Leading,
                clip_x0: true,
            },
        ];
        for (k, cfg) in configs.iter().enumerate() {
            let sampler = cfg.build(&s).expect("build");
            let mut x = normal_tensor(200 + k as u64, &[2, 3]);
            let mut history = StepHistory::new();
            for (i, &t) in sampler.timesteps().iter().enumerate() {
                let abar = s.alphas_cumprod().values()[t];
                let eps = ((&x - (&x_star * abar.sqrt()).expect("mul")).expect("sub")
                    / (1.0 - abar).sqrt())
                .expect("div");
                let noise = sampler
                    .needs_noise(i)
                    .then(|| normal_tensor(1000 * k as u64 + i as u64, &[2, 3]));
                x = sampler
                    .step_with_history(&eps, &x, i, Objective::Eps, noise.as_ref(), &mut history)
                    .expect("step");
            }
            assert_close(&values(&x), &values(&x_star), 1e-12, "sample");
        }
    }
}
