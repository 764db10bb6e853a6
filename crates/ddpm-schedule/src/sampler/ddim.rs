//! DDIM sampling (Song et al. 2021): a non-Markovian reverse step between any two timesteps.

use candle_core::Tensor;

use super::affine::{x0_coefficients, AffineStep};
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

/// How to build a [`DdimSampler`]: named fields, so that the step count, the stochasticity and
/// the clipping cannot be swapped by position.
///
/// ```
/// use ddpm_schedule::sampler::DdimOptions;
/// let opts = DdimOptions { steps: Some(50), ..DdimOptions::default() };
/// assert_eq!((opts.eta, opts.clip_x0), (0.0, true));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimOptions {
    /// The number of steps; all T when `None` (must be in `1..=T`).
    pub steps: Option<usize>,
    /// The stochasticity eta in [0, 1]: 0 is deterministic, 1 has the DDPM posterior variance
    /// over all T steps.
    pub eta: f64,
    /// Clip the predicted x_0 to [-1, 1].
    pub clip_x0: bool,
}

impl Default for DdimOptions {
    /// All T steps, deterministic (eta 0), clipping x_0: the defaults of a `[sampler]` table.
    fn default() -> Self {
        Self {
            steps: None,
            eta: 0.0,
            clip_x0: true,
        }
    }
}

impl DdimSampler {
    /// A sampler over `schedule` as `options` say (errors unless `1 <= steps <= T` and eta is in
    /// [0, 1]).
    pub fn new(schedule: &Schedule, options: DdimOptions) -> Result<Self> {
        let DdimOptions {
            steps,
            eta,
            clip_x0,
        } = options;
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

    /// A sampler over `schedule` that visits exactly `timesteps` (strictly descending, each below
    /// T), e.g. the timesteps a diffusers scheduler visits
    /// ([`crate::diffusers::DiffusersScheduler::inference_timesteps`]); each step goes to the next
    /// one listed, the last to x_0. `options.eta` and `options.clip_x0` as in
    /// [`DdimSampler::new`]; `options.steps` must be `None` or the number of timesteps.
    pub fn with_timesteps(
        schedule: &Schedule,
        timesteps: &[usize],
        options: DdimOptions,
    ) -> Result<Self> {
        if let Some(steps) = options.steps.filter(|&s| s != timesteps.len()) {
            return Err(ScheduleError::InvalidParameter {
                field: "steps",
                value: steps as f64,
                reason: "must be None or the number of timesteps listed",
            });
        }
        let mut sampler = Self::new(
            schedule,
            DdimOptions {
                steps: Some(1),
                ..options
            },
        )?;
        let t_max = schedule.timesteps();
        if timesteps.is_empty() {
            return Err(ScheduleError::InvalidSteps {
                steps: 0,
                timesteps: t_max,
            });
        }
        if let Some(&t) = timesteps.iter().find(|&&t| t >= t_max) {
            return Err(ScheduleError::InvalidParameter {
                field: "timesteps",
                value: t as f64,
                reason: "every timestep must be below the schedule's T",
            });
        }
        if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
            return Err(ScheduleError::InvalidParameter {
                field: "timesteps",
                value: w[1] as f64,
                reason: "the timesteps must be strictly descending",
            });
        }
        sampler.timesteps = timesteps.to_vec();
        Ok(sampler)
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
            self.schedule
                .predict_eps(objective, model_output, x_t, &t)?
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

    /// Step `i` as scalar coefficients, see [`Sampler::affine_step`]. With
    /// `eps_hat = (a x_t - x0_hat) / b` (`a = 1 / sqrt(abar_t)`, `b = sqrt(1 / abar_t - 1)`), the
    /// step is `(sqrt(abar_prev) - dir / b) x0_hat + (dir a / b) x_t + sigma z`; without clipping
    /// this `eps_hat` is the model's own prediction of eps, so one form serves both.
    pub fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        let (_, abar_prev) = self.alphas_cumprod_pair(i)?;
        let sigma = self.sigma(i)?;
        let t = self.timesteps[i];
        let (x0_from_x, x0_from_out) = x0_coefficients(&self.schedule, objective, t);
        let a = self.schedule.sqrt_recip_alphas_cumprod().values()[t];
        let b = self.schedule.sqrt_recipm1_alphas_cumprod().values()[t];
        let dir = (1.0 - abar_prev - sigma * sigma).max(0.0).sqrt();
        Ok(AffineStep {
            x0_from_x,
            x0_from_out,
            clip_x0: self.clip_x0,
            prev_from_x0: abar_prev.sqrt() - dir / b,
            prev_from_x: dir * a / b,
            prev_from_last_x0: 0.0,
            sigma: (sigma > 0.0).then_some(sigma),
        })
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

    fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        DdimSampler::affine_step(self, i, objective)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        assert_close, conversion_tol, normal_tensor, schedule_f64, ts, values, TOL_F64,
    };
    use crate::ScheduleConfig;

    #[test]
    fn eta_one_over_all_steps_has_the_ddpm_posterior_variance() {
        // sigma^2 = (1 - abar_{t-1})/(1 - abar_t) (1 - abar_t/abar_{t-1}) = beta_tilde_t.
        for cfg in [ScheduleConfig::default(), ScheduleConfig::cosine(1000)] {
            let s = schedule_f64(&cfg);
            let sampler = DdimSampler::new(
                &s,
                DdimOptions {
                    steps: None,
                    eta: 1.0,
                    clip_x0: false,
                },
            )
            .expect("sampler");
            let t_max = s.timesteps();
            assert_eq!(sampler.timesteps(), (0..t_max).rev().collect::<Vec<_>>());
            for i in 0..t_max {
                let t = sampler.timesteps()[i];
                let want = s.posterior_variance().values()[t].sqrt();
                let got = sampler.sigma(i).expect("sigma");
                assert!((got - want).abs() <= TOL_F64 * want.max(1e-3), "t = {t}");
                assert_eq!(sampler.needs_noise(i), t > 0);
            }
            assert_eq!(sampler.prev_timestep(t_max - 1), None);
        }
    }

    #[test]
    fn eta_one_over_all_steps_is_the_ddpm_posterior_step() {
        // With the true eps and zero noise, the DDIM (eta = 1) step lands on the posterior mean.
        let s = schedule_f64(&ScheduleConfig::default());
        let sampler = DdimSampler::new(
            &s,
            DdimOptions {
                steps: None,
                eta: 1.0,
                clip_x0: false,
            },
        )
        .expect("sampler");
        let x0 = normal_tensor(50, &[2, 3, 2, 2]);
        let eps = normal_tensor(51, &[2, 3, 2, 2]);
        for i in [0usize, 500, 998, 999] {
            let step = sampler.timesteps()[i] as u32;
            let t = ts(&[step, step]);
            let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
            let zero = x_t.zeros_like().expect("zeros");
            let out = sampler
                .step(&eps, &x_t, i, Objective::Eps, Some(&zero))
                .expect("step");
            let mean = s.q_posterior_mean(&x0, &x_t, &t).expect("mean");
            let tol = conversion_tol(&s, &[step]);
            assert_close(&values(&out), &values(&mean), tol, "ddim eta=1 mean");
        }
    }

    #[test]
    fn eta_zero_step_lands_on_the_noised_x0_at_the_previous_timestep() {
        // x_t built from known x0 and eps; with the true model output the deterministic step
        // gives sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps (x0 itself after the last step).
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        let x0 = normal_tensor(60, &[3, 4]).tanh().expect("tanh");
        let eps = normal_tensor(61, &[3, 4]);
        for steps in [None, Some(50), Some(1)] {
            let sampler = DdimSampler::new(
                &s,
                DdimOptions {
                    steps,
                    eta: 0.0,
                    clip_x0: false,
                },
            )
            .expect("sampler");
            let n = sampler.timesteps().len();
            for i in [0, n / 2, n - 1] {
                let step = sampler.timesteps()[i] as u32;
                let t = ts(&[step; 3]);
                let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
                let want = match sampler.prev_timestep(i) {
                    Some(p) => s.q_sample(&x0, &ts(&[p as u32; 3]), &eps).expect("q"),
                    None => x0.clone(),
                };
                let tol = conversion_tol(&s, &[step]);
                for objective in [Objective::Eps, Objective::X0, Objective::V] {
                    let out = s.training_target(objective, &x0, &eps, &t).expect("target");
                    assert!(!sampler.needs_noise(i));
                    for clip in [false, true] {
                        let sampler = DdimSampler::new(
                            &s,
                            DdimOptions {
                                steps,
                                eta: 0.0,
                                clip_x0: clip,
                            },
                        )
                        .expect("sampler");
                        let x_prev = sampler
                            .step(&out, &x_t, i, objective, None)
                            .expect("deterministic step needs no noise");
                        assert_close(&values(&x_prev), &values(&want), tol, "ddim eta=0");
                    }
                }
            }
        }
    }

    #[test]
    fn stochastic_steps_add_sigma_times_the_noise() {
        let s = schedule_f64(&ScheduleConfig::default());
        let sampler = DdimSampler::new(
            &s,
            DdimOptions {
                steps: Some(20),
                eta: 0.5,
                clip_x0: false,
            },
        )
        .expect("sampler");
        let x_t = normal_tensor(70, &[2, 5]);
        let out = normal_tensor(71, &[2, 5]);
        let noise = normal_tensor(72, &[2, 5]);
        let zero = noise.zeros_like().expect("zeros");
        let i = 3;
        let with = sampler
            .step(&out, &x_t, i, Objective::Eps, Some(&noise))
            .expect("step");
        let without = sampler
            .step(&out, &x_t, i, Objective::Eps, Some(&zero))
            .expect("step");
        let sigma = sampler.sigma(i).expect("sigma");
        assert!(sigma > 0.0);
        let diff: Vec<f64> = values(&(with - without).expect("sub"));
        let want: Vec<f64> = values(&noise).iter().map(|z| sigma * z).collect();
        assert_close(&diff, &want, TOL_F64, "sigma z");
        assert!(matches!(
            sampler.step(&out, &x_t, i, Objective::Eps, None),
            Err(ScheduleError::MissingNoise { index: 3, .. })
        ));
        let short = normal_tensor(73, &[2, 4]);
        assert!(matches!(
            sampler.step(&out, &x_t, i, Objective::Eps, Some(&short)),
            Err(ScheduleError::Shape { .. })
        ));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let s = schedule_f64(&ScheduleConfig::linear(100));
        for eta in [-0.1, 1.5, f64::NAN] {
            assert!(matches!(
                DdimSampler::new(
                    &s,
                    DdimOptions {
                        steps: None,
                        eta,
                        clip_x0: true
                    }
                ),
                Err(ScheduleError::InvalidParameter { field: "eta", .. })
            ));
        }
        assert!(matches!(
            DdimSampler::new(
                &s,
                DdimOptions {
                    steps: Some(101),
                    eta: 0.0,
                    clip_x0: true
                }
            ),
            Err(ScheduleError::InvalidSteps { .. })
        ));
        assert!(matches!(
            DdimSampler::new(
                &s,
                DdimOptions {
                    steps: Some(0),
                    eta: 0.0,
                    clip_x0: true
                }
            ),
            Err(ScheduleError::InvalidSteps { .. })
        ));
        let sampler = DdimSampler::new(
            &s,
            DdimOptions {
                steps: Some(10),
                eta: 0.0,
                clip_x0: true,
            },
        )
        .expect("sampler");
        let x = normal_tensor(1, &[1, 2]);
        assert!(matches!(
            sampler.step(&x, &x, 10, Objective::Eps, None),
            Err(ScheduleError::StepOutOfRange { index: 10, len: 10 })
        ));
        assert!(sampler.sigma(10).is_err());
        assert!(!sampler.needs_noise(10));
    }
}
