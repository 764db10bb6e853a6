//! A reverse step as per-element arithmetic with scalar coefficients, for sampling loops that
//! update x_t in place.
//!
//! Every sampler here takes one timestep per step for the whole batch, and its step is affine in
//! `(x_t, model_output)` up to the optional clipping of the predicted x_0:
//!
//! ```text
//! x0_hat = clip(x0_from_x * x_t + x0_from_out * out)
//! x_prev = prev_from_x0 * x0_hat + prev_from_x * x_t + prev_from_last_x0 * last_x0_hat + sigma * z
//! ```
//!
//! (DDPM: the posterior mean's two coefficients; DDIM: `sqrt(abar_prev) x0_hat + dir eps_hat`
//! with `eps_hat` recomputed from `x0_hat` and `x_t`, which is linear in both; DPM-Solver++ (2M):
//! its multistep update, where `last_x0_hat` is the predicted x_0 of the step before, which
//! single-step samplers do not use: their `prev_from_last_x0` is 0.) [`AffineStep`] holds the
//! seven scalars and applies them to slices in one pass, in f64 per element.

use crate::objective::Objective;
use crate::schedule::Schedule;

/// The scalars of one reverse step; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffineStep {
    /// Coefficient of x_t in the predicted x_0.
    pub x0_from_x: f64,
    /// Coefficient of the model's output in the predicted x_0.
    pub x0_from_out: f64,
    /// Clamp the predicted x_0 to [-1, 1].
    pub clip_x0: bool,
    /// Coefficient of the (clipped) predicted x_0 in x_prev.
    pub prev_from_x0: f64,
    /// Coefficient of x_t in x_prev.
    pub prev_from_x: f64,
    /// Coefficient of the previous step's (clipped) predicted x_0 in x_prev: 0 for single-step
    /// samplers and for the first-order steps of multistep ones.
    pub prev_from_last_x0: f64,
    /// The standard deviation of the noise added, when the step adds noise (the caller draws
    /// one standard normal per element then, in element order); `None` when it adds none.
    pub sigma: Option<f64>,
}

impl AffineStep {
    /// Whether the step reads the previous step's predicted x_0, so that it must be applied with
    /// [`AffineStep::apply_multistep`].
    pub fn uses_last_x0(&self) -> bool {
        self.prev_from_last_x0 != 0.0
    }

    /// x_prev over `x` in place, from the model's output `out` (same length), drawing one noise
    /// value per element from `noise` (in element order) when the step adds noise.
    ///
    /// # Panics
    /// If `out` and `x` differ in length (a caller's bug: both come from one batch), or if the
    /// step reads the previous predicted x_0 ([`AffineStep::uses_last_x0`]: a multistep sampler's
    /// step, which needs [`AffineStep::apply_multistep`]).
    pub fn apply(&self, out: &[f32], x: &mut [f32], noise: impl FnMut() -> f32) {
        assert!(
            !self.uses_last_x0(),
            "a multistep sampler's step reads the previous x_0: use apply_multistep"
        );
        self.apply_inner(out, x, None, noise);
    }

    /// [`AffineStep::apply`] for any sampler, multistep ones included: `last_x0` (same length as
    /// `x`) holds the predicted x_0 of the step before on entry (read only when
    /// [`AffineStep::uses_last_x0`]; its contents do not matter before a run's first step) and
    /// this step's predicted x_0 on return, for the next step.
    ///
    /// # Panics
    /// If `out`, `x` and `last_x0` differ in length (a caller's bug: all come from one batch).
    pub fn apply_multistep(
        &self,
        out: &[f32],
        x: &mut [f32],
        last_x0: &mut [f32],
        noise: impl FnMut() -> f32,
    ) {
        assert_eq!(
            last_x0.len(),
            x.len(),
            "the x_0 buffer and x_t differ in length"
        );
        self.apply_inner(out, x, Some(last_x0), noise);
    }

    fn apply_inner(
        &self,
        out: &[f32],
        x: &mut [f32],
        mut last_x0: Option<&mut [f32]>,
        mut noise: impl FnMut() -> f32,
    ) {
        assert_eq!(out.len(), x.len(), "model output and x_t differ in length");
        for (k, (x, &o)) in x.iter_mut().zip(out).enumerate() {
            let xt = *x as f64;
            let mut x0 = self.x0_from_x * xt + self.x0_from_out * o as f64;
            if self.clip_x0 {
                x0 = x0.clamp(-1.0, 1.0);
            }
            let mut prev = self.prev_from_x0 * x0 + self.prev_from_x * xt;
            if let Some(last) = last_x0.as_deref_mut() {
                if self.prev_from_last_x0 != 0.0 {
                    prev += self.prev_from_last_x0 * last[k] as f64;
                }
                last[k] = x0 as f32;
            }
            if let Some(sigma) = self.sigma {
                prev += sigma * noise() as f64;
            }
            *x = prev as f32;
        }
    }
}

/// `(x0_from_x, x0_from_out)` of the predicted x_0 at timestep `t` of `schedule` for a model
/// predicting `objective` (the scalar form of [`Schedule::predict_x0`]).
pub fn x0_coefficients(schedule: &Schedule, objective: Objective, t: usize) -> (f64, f64) {
    match objective {
        Objective::Eps => (
            schedule.sqrt_recip_alphas_cumprod().values()[t],
            -schedule.sqrt_recipm1_alphas_cumprod().values()[t],
        ),
        Objective::X0 => (0.0, 1.0),
        Objective::V => (
            schedule.sqrt_alphas_cumprod().values()[t],
            -schedule.sqrt_one_minus_alphas_cumprod().values()[t],
        ),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::posterior::DdpmVariance;
    use crate::sampler::SamplerConfig;
    use crate::test_util::{normal_tensor, schedule_f64, values};
    use crate::{Objective, ScheduleConfig};

    /// For every sampler, objective and clipping choice, and steps from the first to the last,
    /// the affine step equals `Sampler::step` (tensor ops in f64) to f32 rounding.
    #[test]
    fn affine_step_equals_the_tensor_step() {
        let s = schedule_f64(&ScheduleConfig::cosine(100));
        let mut configs = Vec::new();
        for clip_x0 in [true, false] {
            configs.push(SamplerConfig::Ddpm {
                steps: None,
                variance: DdpmVariance::FixedSmall,
                clip_x0,
            });
            configs.push(SamplerConfig::Ddpm {
                steps: Some(10),
                variance: DdpmVariance::FixedLarge,
                clip_x0,
            });
            for eta in [0.0, 0.5] {
                configs.push(SamplerConfig::Ddim {
                    steps: Some(7),
                    eta,
                    clip_x0,
                });
            }
        }
        // x_t and outputs rounded to f32 first, so both sides see the same inputs.
        let f32_round = |t: Tensor| t.to_dtype(DType::F32).expect("f32");
        for (c, cfg) in configs.iter().enumerate() {
            let sampler = cfg.build(&s).expect("build");
            let len = sampler.timesteps().len();
            for objective in [Objective::Eps, Objective::X0, Objective::V] {
                for i in [0, 1, len / 2, len - 2, len - 1] {
                    let seed = 1000 * c as u64 + 10 * i as u64;
                    let x = f32_round(normal_tensor(seed, &[2, 3, 4]));
                    let out = f32_round(normal_tensor(seed + 1, &[2, 3, 4]));
                    let z = f32_round(normal_tensor(seed + 2, &[2, 3, 4]));
                    let (xv, outv, zv) = (
                        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    let to64 = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
                    let noise = sampler.needs_noise(i).then(|| to64(&z));
                    let want = values(
                        &sampler
                            .step(&to64(&out), &to64(&x), i, objective, noise.as_ref())
                            .expect("step"),
                    );
                    let step = sampler.affine_step(i, objective).expect("affine");
                    assert_eq!(step.sigma.is_some(), sampler.needs_noise(i), "{cfg:?} {i}");
                    let mut got = xv.clone();
                    let mut zs = zv.iter().copied();
                    step.apply(&outv, &mut got, || zs.next().expect("noise"));
                    // The step's coefficients reach 1/sqrt(abar) ~ 100 here: compare against
                    // the size of the terms, as f32 rounding of the result and of the
                    // cancelling intermediate terms allows.
                    for k in 0..want.len() {
                        let scale = 1.0
                            + (step.x0_from_x * xv[k] as f64).abs()
                            + (step.x0_from_out * outv[k] as f64).abs();
                        let err = (got[k] as f64 - want[k]).abs();
                        assert!(
                            err <= 1e-6 * scale * (1.0 + step.prev_from_x0.abs()),
                            "{cfg:?} {objective:?} step {i} elem {k}: {} vs {}",
                            got[k],
                            want[k]
                        );
                    }
                }
            }
        }
    }
}
