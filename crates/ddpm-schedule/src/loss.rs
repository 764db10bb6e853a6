//! Training losses between the network's prediction and the objective's target: L1, L2 or Huber
//! per element, averaged over each sample, then a weighted mean over the batch.
//!
//! Built only from candle ops with a backward pass (sub, abs, sqr, minimum, mul, mean), so the
//! loss is differentiable with respect to the prediction.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScheduleError};
use crate::forward::check_same_shape;
use crate::objective::Objective;
use crate::schedule::{check_timestep_tensor, Schedule};

/// Default `delta` of the Huber loss (PyTorch's `smooth_l1_loss` default `beta`).
pub const DEFAULT_HUBER_DELTA: f64 = 1.0;
/// Default `gamma` of min-SNR weighting (Hang et al. 2023).
pub const DEFAULT_MIN_SNR_GAMMA: f64 = 5.0;

fn default_delta() -> f64 {
    DEFAULT_HUBER_DELTA
}
fn default_gamma() -> f64 {
    DEFAULT_MIN_SNR_GAMMA
}

/// The elementwise loss. Written `{ kind = "l2" }`, `{ kind = "l1" }` or
/// `{ kind = "huber", delta = 1.0 }` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossKind {
    /// `|d|` with d = prediction - target.
    L1,
    /// `d^2` (the DDPM paper's L_simple for the eps objective).
    #[default]
    L2,
    /// PyTorch's `smooth_l1_loss` with `beta = delta`: `0.5 d^2 / delta` where `|d| < delta`,
    /// else `|d| - 0.5 delta`.
    Huber {
        /// Where the loss switches from quadratic to linear; must be > 0.
        #[serde(default = "default_delta")]
        delta: f64,
    },
}

impl LossKind {
    /// Checks the parameters (Huber's delta must be finite and > 0).
    pub fn validate(&self) -> Result<()> {
        if let Self::Huber { delta } = *self {
            if !(delta.is_finite() && delta > 0.0) {
                return Err(ScheduleError::InvalidParameter {
                    field: "loss.delta",
                    value: delta,
                    reason: "must be a finite number > 0",
                });
            }
        }
        Ok(())
    }

    /// The loss of each sample, averaged over all non-batch dims: a `(b,)` tensor.
    ///
    /// `prediction` and `target` share a shape of rank >= 1 with the batch first.
    pub fn per_sample(&self, prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
        // prediction, target: (b, ...)
        self.validate()?;
        check_same_shape("target", prediction, target)?;
        let batch = match prediction.dims().first() {
            Some(&b) if b > 0 => b,
            _ => {
                return Err(ScheduleError::Shape {
                    what: "prediction",
                    expected: "rank >= 1 with a non-empty batch first".to_string(),
                    found: prediction.dims().to_vec(),
                })
            }
        };
        let per_sample_len = prediction.elem_count() / batch;
        let diff = (prediction - target)?;
        let elementwise = match *self {
            Self::L1 => diff.abs()?,
            Self::L2 => diff.sqr()?,
            Self::Huber { delta } => {
                // With d = |diff| and m = min(d, delta): m (d - m/2) / delta is 0.5 d^2 / delta
                // below delta and d - delta/2 above it, with one expression for both sides.
                let d = diff.abs()?;
                let m = d.minimum(delta)?;
                ((&m * (&d - (&m * 0.5)?)?)? / delta)?
            }
        };
        Ok(elementwise.reshape((batch, per_sample_len))?.mean(1)?)
    }
}

/// How the per-sample losses are weighted. Written `{ kind = "uniform" }` or
/// `{ kind = "min_snr", gamma = 5.0 }` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossWeighting {
    /// Weight 1 for every sample.
    #[default]
    Uniform,
    /// Min-SNR-gamma (Hang et al. 2023): the weight of a sample at t is min(snr_t, gamma)
    /// expressed for the objective: eps: `min(snr, gamma) / snr`; x0: `min(snr, gamma)`;
    /// v: `min(snr, gamma) / (snr + 1)`.
    MinSnr {
        /// The SNR cap; must be > 0.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

impl LossWeighting {
    /// Checks the parameters (min-SNR's gamma must be finite and > 0).
    pub fn validate(&self) -> Result<()> {
        if let Self::MinSnr { gamma } = *self {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(ScheduleError::InvalidParameter {
                    field: "loss.weighting.gamma",
                    value: gamma,
                    reason: "must be a finite number > 0",
                });
            }
        }
        Ok(())
    }

    /// The weight of each sample at its timestep: a `(b,)` tensor in the schedule's dtype, on its
    /// device. `t` is a `(b,)` U32 or I64 tensor.
    pub fn weights(&self, schedule: &Schedule, objective: Objective, t: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let snr = schedule.snr().gather(t)?;
        match *self {
            Self::Uniform => Ok(snr.ones_like()?),
            Self::MinSnr { gamma } => {
                let clipped = snr.minimum(gamma)?;
                Ok(match objective {
                    Objective::Eps => (clipped / snr)?,
                    Objective::X0 => clipped,
                    Objective::V => (clipped / (snr + 1.0)?)?,
                })
            }
        }
    }
}

/// The mean over the batch of `weights[i] * per_sample[i]` (a scalar tensor); with no weights,
/// the plain mean. The weights are not normalised, as in Hang et al. and lucidrains' code.
pub fn weighted_mean(per_sample: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => Ok(per_sample.mean_all()?),
        Some(w) => {
            check_same_shape("weights", per_sample, w)?;
            let w = w
                .to_device(per_sample.device())?
                .to_dtype(per_sample.dtype())?;
            Ok((per_sample * w)?.mean_all()?)
        }
    }
}

/// A complete training loss: the elementwise kind and the per-sample weighting.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DiffusionLoss {
    /// The elementwise loss.
    #[serde(default)]
    pub kind: LossKind,
    /// The per-sample weighting.
    #[serde(default)]
    pub weighting: LossWeighting,
}

impl DiffusionLoss {
    /// Checks the parameters of both parts.
    pub fn validate(&self) -> Result<()> {
        self.kind.validate()?;
        self.weighting.validate()
    }

    /// The scalar loss between `prediction` and `target` (shape `(b, ...)`) for samples at
    /// timesteps `t` (shape `(b,)`), trained on `objective`. Differentiable in `prediction`.
    pub fn compute(
        &self,
        schedule: &Schedule,
        objective: Objective,
        prediction: &Tensor,
        target: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        self.validate()?;
        let per_sample = self.kind.per_sample(prediction, target)?;
        check_timestep_tensor(t, per_sample.dim(0)?)?;
        match self.weighting {
            LossWeighting::Uniform => weighted_mean(&per_sample, None),
            weighting => {
                let w = weighting.weights(schedule, objective, t)?;
                weighted_mean(&per_sample, Some(&w))
            }
        }
    }
}
