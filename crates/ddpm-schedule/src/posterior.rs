//! The forward-process posterior q(x_{t-1} | x_t, x_0) and the model's reverse step
//! p(x_{t-1} | x_t), which plugs the network's predicted x_0 into that posterior.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::forward::{check_same_shape, Gaussian};
use crate::objective::Objective;
use crate::schedule::Schedule;

/// The fixed variance of the reverse step p(x_{t-1} | x_t) (DDPM paper section 3.2).
/// Written `"fixed_small"` or `"fixed_large"` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DdpmVariance {
    /// The posterior variance `beta_tilde_t` (log taken with the t = 0 entry clipped).
    #[default]
    FixedSmall,
    /// `beta_t`.
    FixedLarge,
}

/// The model's reverse step p(x_{t-1} | x_t) and the x_0 it was built from.
#[derive(Debug, Clone)]
pub struct ModelPrediction {
    /// The mean of p(x_{t-1} | x_t), shaped like x_t.
    pub mean: Tensor,
    /// The variance, shaped `(b, 1, ..., 1)`.
    pub variance: Tensor,
    /// The log variance, shaped `(b, 1, ..., 1)`.
    pub log_variance: Tensor,
    /// The predicted x_0 (clipped to [-1, 1] when asked), shaped like x_t.
    pub pred_x0: Tensor,
}

impl Schedule {
    /// The posterior mean `coef1_t x0 + coef2_t x_t` of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior_mean(&self, x0: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_same_shape("x0", x_t, x0)?;
        let c1 = self.posterior_mean_coef1().extract(t, x_t)?;
        let c2 = self.posterior_mean_coef2().extract(t, x_t)?;
        Ok((x0.broadcast_mul(&c1)? + x_t.broadcast_mul(&c2)?)?)
    }

    /// Mean, variance `beta_tilde_t` and clipped log variance of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior(&self, x0: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<Gaussian> {
        Ok(Gaussian {
            mean: self.q_posterior_mean(x0, x_t, t)?,
            variance: self.posterior_variance().extract(t, x_t)?,
            log_variance: self.posterior_log_variance_clipped().extract(t, x_t)?,
        })
    }

    /// The model's p(x_{t-1} | x_t) from its output of kind `objective`.
    ///
    /// The predicted x_0 is derived from the output, clipped to [-1, 1] if `clip_x0`, and the mean
    /// is the posterior mean computed from that (possibly clipped) x_0. The variance is fixed by
    /// `variance`.
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        objective: Objective,
        variance: DdpmVariance,
        clip_x0: bool,
    ) -> Result<ModelPrediction> {
        // model_output, x_t: (b, ...), t: (b,)
        let mut pred_x0 = self.predict_x0(objective, model_output, x_t, t)?;
        if clip_x0 {
            pred_x0 = pred_x0.clamp(-1.0, 1.0)?;
        }
        let mean = self.q_posterior_mean(&pred_x0, x_t, t)?;
        let (variance, log_variance) = match variance {
            DdpmVariance::FixedSmall => (
                self.posterior_variance().extract(t, x_t)?,
                self.posterior_log_variance_clipped().extract(t, x_t)?,
            ),
            DdpmVariance::FixedLarge => {
                let beta = self.betas().extract(t, x_t)?;
                let log_beta = beta.log()?;
                (beta, log_beta)
            }
        };
        Ok(ModelPrediction {
            mean,
            variance,
            log_variance,
            pred_x0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        assert_close, conversion_tol, normal_tensor, schedule_f64, ts, values, TOL_F64,
    };
    use crate::ScheduleConfig;

    const STEPS: [u32; 4] = [0, 1, 400, 999];

    #[test]
    fn posterior_mean_with_x0_equals_the_form_with_the_true_noise() {
        // mu_tilde = coef1 x0 + coef2 x_t must equal
        // 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) (DDPM eq. 11), computed here
        // from the betas alone.
        for cfg in [ScheduleConfig::default(), ScheduleConfig::cosine(1000)] {
            let s = schedule_f64(&cfg);
            let betas = cfg.betas().expect("valid");
            let x0 = normal_tensor(30, &[4, 2, 3]);
            let eps = normal_tensor(31, &[4, 2, 3]);
            let t = ts(&STEPS);
            let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
            let mean = s.q_posterior_mean(&x0, &x_t, &t).expect("mean");
            let (x_tv, epsv) = (values(&x_t), values(&eps));
            let want: Vec<f64> = (0..24)
                .map(|i| {
                    let step = STEPS[i / 6] as usize;
                    let abar: f64 = betas[..=step].iter().map(|b| 1.0 - b).product();
                    let alpha = 1.0 - betas[step];
                    (x_tv[i] - betas[step] / (1.0 - abar).sqrt() * epsv[i]) / alpha.sqrt()
                })
                .collect();
            assert_close(&values(&mean), &want, TOL_F64, "posterior mean");
        }
    }

    #[test]
    fn q_posterior_variance_is_beta_tilde() {
        let cfg = ScheduleConfig::default();
        let s = schedule_f64(&cfg);
        let betas = cfg.betas().expect("valid");
        let x = normal_tensor(1, &[4, 3]);
        let g = s.q_posterior(&x, &x, &ts(&STEPS)).expect("posterior");
        assert_eq!(g.variance.dims(), &[4, 1]);
        let want: Vec<f64> = STEPS
            .iter()
            .map(|&t| {
                let t = t as usize;
                let abar: f64 = betas[..=t].iter().map(|b| 1.0 - b).product();
                let abar_prev: f64 = betas[..t].iter().map(|b| 1.0 - b).product();
                (1.0 - abar_prev) / (1.0 - abar) * betas[t]
            })
            .collect();
        assert_close(&values(&g.variance), &want, TOL_F64, "variance");
        // The log variance at t = 0 is clipped to the t = 1 entry.
        let logs = values(&g.log_variance);
        assert_eq!(logs[0], logs[1]);
        assert_close(
            &logs[1..],
            &[want[1].ln(), want[2].ln(), want[3].ln()],
            TOL_F64,
            "log",
        );
    }

    #[test]
    fn model_with_the_true_output_gives_the_true_posterior_for_each_objective() {
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        // x0 inside [-1, 1], so clipping changes nothing.
        let x0 = normal_tensor(40, &[4, 5]).tanh().expect("tanh");
        let eps = normal_tensor(41, &[4, 5]);
        let t = ts(&STEPS);
        let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
        let truth = s.q_posterior(&x0, &x_t, &t).expect("posterior");
        let tol = conversion_tol(&s, &STEPS);
        for objective in [Objective::Eps, Objective::X0, Objective::V] {
            let output = s.training_target(objective, &x0, &eps, &t).expect("target");
            for clip in [false, true] {
                let p = s
                    .p_mean_variance(&output, &x_t, &t, objective, DdpmVariance::FixedSmall, clip)
                    .expect("p");
                assert_close(&values(&p.mean), &values(&truth.mean), tol, "mean");
                assert_close(&values(&p.pred_x0), &values(&x0), tol, "pred_x0");
                assert_eq!(values(&p.variance), values(&truth.variance));
                assert_eq!(values(&p.log_variance), values(&truth.log_variance));
            }
        }
    }

    #[test]
    fn fixed_large_uses_beta() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x = normal_tensor(1, &[4, 2]);
        let t = ts(&STEPS);
        let p = s
            .p_mean_variance(&x, &x, &t, Objective::Eps, DdpmVariance::FixedLarge, false)
            .expect("p");
        let b = s.betas().values();
        let want: Vec<f64> = STEPS.iter().map(|&t| b[t as usize]).collect();
        assert_eq!(values(&p.variance), want);
        let logs: Vec<f64> = want.iter().map(|v| v.ln()).collect();
        assert_close(&values(&p.log_variance), &logs, TOL_F64, "log beta");
    }

    #[test]
    fn clipping_recomputes_the_mean_from_the_clipped_x0() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x0_out =
            Tensor::new(&[[3.0f64, -0.5], [-2.0, 0.25]], &candle_core::Device::Cpu).expect("x0");
        let x_t = normal_tensor(5, &[2, 2]);
        let t = ts(&[10, 600]);
        let p = s
            .p_mean_variance(
                &x0_out,
                &x_t,
                &t,
                Objective::X0,
                DdpmVariance::FixedSmall,
                true,
            )
            .expect("p");
        let clipped = [1.0, -0.5, -1.0, 0.25];
        assert_eq!(values(&p.pred_x0), clipped);
        let (c1, c2) = (
            s.posterior_mean_coef1().values(),
            s.posterior_mean_coef2().values(),
        );
        let x_tv = values(&x_t);
        let want: Vec<f64> = (0..4)
            .map(|i| {
                let step = if i < 2 { 10 } else { 600 };
                c1[step] * clipped[i] + c2[step] * x_tv[i]
            })
            .collect();
        assert_close(&values(&p.mean), &want, TOL_F64, "clipped mean");
    }

    #[test]
    fn variance_serde_names() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct W {
            variance: DdpmVariance,
        }
        let w: W = toml::from_str("variance = \"fixed_large\"").expect("de");
        assert_eq!(w.variance, DdpmVariance::FixedLarge);
        let w: W = toml::from_str("variance = \"fixed_small\"").expect("de");
        assert_eq!(w.variance, DdpmVariance::FixedSmall);
        let text = toml::to_string(&W {
            variance: DdpmVariance::FixedLarge,
        })
        .expect("ser");
        assert_eq!(text.trim(), "variance = \"fixed_large\"");
    }
}
