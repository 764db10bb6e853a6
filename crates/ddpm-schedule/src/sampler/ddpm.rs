//! Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced.

use candle_core::Tensor;

use super::respace::RespacedSchedule;
use super::{check_index, required_noise, Sampler};
use crate::error::Result;
use crate::objective::Objective;
use crate::posterior::DdpmVariance;
use crate::schedule::{timestep_tensor, Schedule};

/// The DDPM reverse process: `x_{t-1} = mu_theta(x_t, t) + sigma_t z`, with no noise on the last
/// step. With `steps = Some(S)`, S < T, it runs on a [`RespacedSchedule`] whose betas are
/// recomputed from the kept `alphas_cumprod`.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    respaced: RespacedSchedule,
    timesteps: Vec<usize>,
    variance: DdpmVariance,
    clip_x0: bool,
}

impl DdpmSampler {
    /// A sampler over `schedule`, respaced to `steps` if given (errors unless `1 <= steps <= T`),
    /// with the reverse variance `variance`, clipping the predicted x_0 to [-1, 1] if `clip_x0`.
    pub fn new(
        schedule: &Schedule,
        steps: Option<usize>,
        variance: DdpmVariance,
        clip_x0: bool,
    ) -> Result<Self> {
        let respaced = match steps {
            None => RespacedSchedule::identity(schedule),
            Some(steps) => RespacedSchedule::new(schedule, steps)?,
        };
        let timesteps = respaced.timestep_map().iter().rev().copied().collect();
        Ok(Self {
            respaced,
            timesteps,
            variance,
            clip_x0,
        })
    }

    /// The (possibly respaced) schedule the steps use, indexed by respaced index.
    pub fn respaced(&self) -> &RespacedSchedule {
        &self.respaced
    }

    /// The respaced index of step `i` (steps run from S - 1 down to 0).
    fn respaced_index(&self, i: usize) -> Result<usize> {
        check_index(i, self.timesteps.len())?;
        Ok(self.timesteps.len() - 1 - i)
    }

    /// The original timesteps to feed the model, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Whether step `i` adds noise: every step but the last.
    pub fn needs_noise(&self, i: usize) -> bool {
        i + 1 < self.timesteps.len()
    }

    /// The variance of the noise added at step `i` (0 on the last step).
    pub fn step_variance(&self, i: usize) -> Result<f64> {
        let k = self.respaced_index(i)?;
        if k == 0 {
            return Ok(0.0);
        }
        let schedule = self.respaced.schedule();
        Ok(match self.variance {
            DdpmVariance::FixedSmall => schedule.posterior_variance().values()[k],
            DdpmVariance::FixedLarge => schedule.betas().values()[k],
        })
    }

    /// One ancestral step from `x_t` at `timesteps()[i]`, see [`Sampler::step`].
    pub fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        // model_output, x_t: (b, ...)
        let k = self.respaced_index(i)?;
        let schedule = self.respaced.schedule();
        let t = timestep_tensor(k, x_t.dim(0)?, schedule.device())?;
        let pred = schedule.p_mean_variance(
            model_output,
            x_t,
            &t,
            objective,
            self.variance,
            self.clip_x0,
        )?;
        if k == 0 {
            return Ok(pred.mean);
        }
        let noise = required_noise(noise, x_t, i, self.timesteps[i])?;
        let std = (pred.log_variance * 0.5)?.exp()?;
        Ok((pred.mean + noise.broadcast_mul(&std)?)?)
    }
}

impl Sampler for DdpmSampler {
    fn timesteps(&self) -> &[usize] {
        DdpmSampler::timesteps(self)
    }

    fn needs_noise(&self, i: usize) -> bool {
        DdpmSampler::needs_noise(self, i)
    }

    fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        DdpmSampler::step(self, model_output, x_t, i, objective, noise)
    }
}
