//! Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced.

use candle_core::Tensor;

use super::affine::{x0_coefficients, AffineStep};
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

/// How to build a [`DdpmSampler`]: named fields, so that the arguments cannot be swapped by
/// position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdpmOptions {
    /// Respace to this many steps (must be in `1..=T`); all T when `None`.
    pub steps: Option<usize>,
    /// The reverse-step variance.
    pub variance: DdpmVariance,
    /// Clip the predicted x_0 to [-1, 1].
    pub clip_x0: bool,
}

impl Default for DdpmOptions {
    /// All T steps, the posterior variance, clipping x_0: the defaults of a `[sampler]` table.
    fn default() -> Self {
        Self {
            steps: None,
            variance: DdpmVariance::default(),
            clip_x0: true,
        }
    }
}

impl DdpmSampler {
    /// A sampler over `schedule` as `options` say (errors unless `1 <= steps <= T`).
    pub fn new(schedule: &Schedule, options: DdpmOptions) -> Result<Self> {
        let DdpmOptions {
            steps,
            variance,
            clip_x0,
        } = options;
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

    /// Step `i` as scalar coefficients, see [`Sampler::affine_step`].
    pub fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        let k = self.respaced_index(i)?;
        let schedule = self.respaced.schedule();
        let (x0_from_x, x0_from_out) = x0_coefficients(schedule, objective, k);
        let log_variance = match self.variance {
            DdpmVariance::FixedSmall => schedule.posterior_log_variance_clipped().values()[k],
            DdpmVariance::FixedLarge => schedule.betas().values()[k].ln(),
        };
        Ok(AffineStep {
            x0_from_x,
            x0_from_out,
            clip_x0: self.clip_x0,
            prev_from_x0: schedule.posterior_mean_coef1().values()[k],
            prev_from_x: schedule.posterior_mean_coef2().values()[k],
            prev_from_last_x0: 0.0,
            sigma: (k > 0).then(|| (0.5 * log_variance).exp()),
        })
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

    fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        DdpmSampler::affine_step(self, i, objective)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ScheduleError;
    use crate::test_util::{
        assert_close, conversion_tol, normal_tensor, schedule_f64, ts, values, TOL_F64,
    };
    use crate::ScheduleConfig;

    #[test]
    fn full_length_step_is_posterior_mean_plus_scaled_noise() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x0 = normal_tensor(80, &[2, 3, 2]).tanh().expect("tanh");
        let eps = normal_tensor(81, &[2, 3, 2]);
        let z = normal_tensor(82, &[2, 3, 2]);
        for variance in [DdpmVariance::FixedSmall, DdpmVariance::FixedLarge] {
            let sampler = DdpmSampler::new(
                &s,
                DdpmOptions {
                    steps: None,
                    variance,
                    clip_x0: true,
                },
            )
            .expect("sampler");
            assert_eq!(sampler.timesteps(), (0..1000).rev().collect::<Vec<_>>());
            for i in [0usize, 400, 998, 999] {
                let step = sampler.timesteps()[i];
                let t = ts(&[step as u32; 2]);
                let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
                let mean = values(&s.q_posterior_mean(&x0, &x_t, &t).expect("mean"));
                let var = match variance {
                    _ if step == 0 => 0.0,
                    DdpmVariance::FixedSmall => s.posterior_variance().values()[step],
                    DdpmVariance::FixedLarge => s.betas().values()[step],
                };
                assert_eq!(sampler.step_variance(i).expect("var"), var);
                assert_eq!(sampler.needs_noise(i), step > 0);
                let want: Vec<f64> = mean
                    .iter()
                    .zip(values(&z))
                    .map(|(m, z)| m + var.sqrt() * z)
                    .collect();
                let got = sampler
                    .step(&eps, &x_t, i, Objective::Eps, Some(&z))
                    .expect("step");
                let tol = conversion_tol(&s, &[step as u32]);
                assert_close(&values(&got), &want, tol, "ddpm step");
            }
        }
    }

    #[test]
    fn respaced_sampler_uses_the_recomputed_betas_and_maps_timesteps() {
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        let sampler = DdpmSampler::new(
            &s,
            DdpmOptions {
                steps: Some(25),
                variance: DdpmVariance::FixedLarge,
                clip_x0: false,
            },
        )
        .expect("sampler");
        let ts_desc = sampler.timesteps().to_vec();
        assert_eq!(ts_desc.len(), 25);
        assert_eq!((ts_desc[0], ts_desc[24]), (999, 0));
        assert!(ts_desc.windows(2).all(|w| w[0] > w[1]));
        let abar = s.alphas_cumprod().values();
        for i in 0..24 {
            // FixedLarge on the respaced schedule: beta = 1 - abar_{t_i} / abar_{t_{i+1}}.
            let want = 1.0 - abar[ts_desc[i]] / abar[ts_desc[i + 1]];
            let got = sampler.step_variance(i).expect("var");
            assert!((got - want).abs() < 1e-15, "i = {i}: {got} vs {want}");
        }
        // With the true x0, the respaced step's mean is the posterior between the kept
        // timesteps: coefficients from abar at t = ts_desc[i] and t_prev = ts_desc[i + 1].
        let x0 = normal_tensor(90, &[1, 6]).tanh().expect("tanh");
        let eps = normal_tensor(91, &[1, 6]);
        let i = 10;
        let (t, t_prev) = (ts_desc[i], ts_desc[i + 1]);
        let x_t = s.q_sample(&x0, &ts(&[t as u32]), &eps).expect("q");
        let zero = x_t.zeros_like().expect("zeros");
        let got = sampler
            .step(&x0, &x_t, i, Objective::X0, Some(&zero))
            .expect("step");
        let (a, ap) = (abar[t], abar[t_prev]);
        let beta = 1.0 - a / ap;
        let c1 = beta * ap.sqrt() / (1.0 - a);
        let c2 = (1.0 - ap) * (1.0 - beta).sqrt() / (1.0 - a);
        let want: Vec<f64> = values(&x0)
            .iter()
            .zip(values(&x_t))
            .map(|(x0, xt)| c1 * x0 + c2 * xt)
            .collect();
        assert_close(&values(&got), &want, TOL_F64, "respaced mean");
    }

    #[test]
    fn missing_noise_and_bad_indices_are_errors() {
        let s = schedule_f64(&ScheduleConfig::linear(100));
        let sampler = DdpmSampler::new(
            &s,
            DdpmOptions {
                steps: Some(10),
                variance: DdpmVariance::FixedSmall,
                clip_x0: true,
            },
        )
        .expect("s");
        let x = normal_tensor(1, &[2, 3]);
        assert!(matches!(
            sampler.step(&x, &x, 0, Objective::Eps, None),
            Err(ScheduleError::MissingNoise {
                index: 0,
                timestep: 99
            })
        ));
        // The last step adds no noise and needs none.
        assert!(sampler.step(&x, &x, 9, Objective::Eps, None).is_ok());
        assert!(matches!(
            sampler.step(&x, &x, 10, Objective::Eps, None),
            Err(ScheduleError::StepOutOfRange { index: 10, len: 10 })
        ));
        assert!(matches!(
            DdpmSampler::new(
                &s,
                DdpmOptions {
                    steps: Some(0),
                    variance: DdpmVariance::FixedSmall,
                    clip_x0: true
                }
            ),
            Err(ScheduleError::InvalidSteps { .. })
        ));
    }
}
