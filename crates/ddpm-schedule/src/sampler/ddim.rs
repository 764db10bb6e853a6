//! DDIM sampling (Song et al. 2021): a non-Markovian reverse step between any two timesteps.

use candle_core::Tensor;

use super::respace::spaced_timesteps;
use super::{check_index, required_noise, Sampler};
use crate::error::{Result, ScheduleError};
use crate::objective::Objective;
use crate::schedule::{timestep_tensor, Schedule};

/// The DDIM step from t to an earlier t_prev:
/// `x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z` with
/// `sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)`.
///
/// The steps visit [`spaced_timesteps`]`(T, S)` in descending order; after the last (t = 0 when
/// S > 1) the step goes "to x_0" with `abar_prev = 1`. With `eta = 0` it is deterministic; with
/// `eta = 1` and all T steps `sigma^2` is the DDPM posterior variance. When clipping, eps_hat is
/// recomputed from the clipped x0_hat.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    schedule: Schedule,
    timesteps: Vec<usize>,
    eta: f64,
    clip_x0: bool,
}

impl DdimSampler {
    /// A sampler over `schedule` with `steps` steps (all T when `None`; errors unless
    /// `1 <= steps <= T`), stochasticity `eta` in [0, 1], clipping the predicted x_0 to [-1, 1]
    /// if `clip_x0`.
    pub fn new(schedule: &Schedule, steps: Option<usize>, eta: f64, clip_x0: bool) -> Result<Self> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(ScheduleError::InvalidParameter {
                field: "eta",
                value: eta,
                reason: "must be in [0, 1]",
            });
        }
        let steps = steps.unwrap_or(schedule.timesteps());
        let mut timesteps = spaced_timesteps(schedule.timesteps(), steps)?;
        timesteps.reverse();
        Ok(Self {
            schedule: schedule.clone(),
            timesteps,
            eta,
            clip_x0,
        })
    }

    /// The original timesteps to feed the model, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep step `i` goes to: `Some(timesteps()[i + 1])`, or `None` ("to x_0") after the
    /// last step.
    pub fn prev_timestep(&self, i: usize) -> Option<usize> {
        self.timesteps.get(i + 1).copied()
    }

    /// `(abar_t, abar_prev)` of step `i`, with `abar_prev = 1` on the step to x_0.
    fn alphas_cumprod_pair(&self, i: usize) -> Result<(f64, f64)> {
        check_index(i, self.timesteps.len())?;
        let abar = self.schedule.alphas_cumprod().values();
        let abar_t = abar[self.timesteps[i]];
        let abar_prev = self.prev_timestep(i).map_or(1.0, |p| abar[p]);
        Ok((abar_t, abar_prev))
    }

    /// The standard deviation sigma of the noise added at step `i`.
    pub fn sigma(&self, i: usize) -> Result<f64> {
        let (abar_t, abar_prev) = self.alphas_cumprod_pair(i)?;
        Ok(self.eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt())
    }

    /// Whether step `i` adds noise (sigma > 0).
    pub fn needs_noise(&self, i: usize) -> bool {
        self.sigma(i).is_ok_and(|s| s > 0.0)
    }

    /// One DDIM step from `x_t` at `timesteps()[i]`, see [`Sampler::step`].
    pub fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        // model_output, x_t: (b, ...)
        let (_, abar_prev) = self.alphas_cumprod_pair(i)?;
        let sigma = self.sigma(i)?;
        let t = timestep_tensor(self.timesteps[i], x_t.dim(0)?, self.schedule.device())?;
        let mut x0 = self.schedule.predict_x0(objective, model_output, x_t, &t)?;
        let eps = if self.clip_x0 {
            x0 = x0.clamp(-1.0, 1.0)?;
            self.schedule.predict_eps_from_x0(x_t, &t, &x0)?
        } else {
            self.schedule.predict_eps(objective, model_output, x_t, &t)?
        };
        let dir = (1.0 - abar_prev - sigma * sigma).max(0.0).sqrt();
        let x_prev = ((x0 * abar_prev.sqrt())? + (eps * dir)?)?;
        if sigma > 0.0 {
            let noise = required_noise(noise, x_t, i, self.timesteps[i])?;
            Ok((x_prev + (noise * sigma)?)?)
        } else {
            Ok(x_prev)
        }
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[usize] {
        DdimSampler::timesteps(self)
    }

    fn needs_noise(&self, i: usize) -> bool {
        DdimSampler::needs_noise(self, i)
    }

    fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        DdimSampler::step(self, model_output, x_t, i, objective, noise)
    }
}
