//! What the network predicts (eps, x_0 or v) and the exact conversions between the three,
//! given x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
//! (Salimans & Ho 2022).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::forward::check_same_shape;
use crate::schedule::Schedule;

/// The quantity the network is trained to predict. Written `"eps"`, `"x0"` or `"v"` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The noise eps that was added (DDPM paper's L_simple).
    #[default]
    Eps,
    /// The clean sample x_0.
    X0,
    /// The velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
    V,
}

impl Schedule {
    /// x_0 from x_t and eps: `sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps`.
    pub fn predict_x0_from_eps(&self, x_t: &Tensor, t: &Tensor, eps: &Tensor) -> Result<Tensor> {
        check_same_shape("eps", x_t, eps)?;
        let a = self.sqrt_recip_alphas_cumprod().extract(t, x_t)?;
        let b = self.sqrt_recipm1_alphas_cumprod().extract(t, x_t)?;
        Ok((x_t.broadcast_mul(&a)? - eps.broadcast_mul(&b)?)?)
    }

    /// eps from x_t and x_0: `(sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)`.
    pub fn predict_eps_from_x0(&self, x_t: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Tensor> {
        check_same_shape("x0", x_t, x0)?;
        let a = self.sqrt_recip_alphas_cumprod().extract(t, x_t)?;
        let b = self.sqrt_recipm1_alphas_cumprod().extract(t, x_t)?;
        Ok((x_t.broadcast_mul(&a)? - x0)?.broadcast_div(&b)?)
    }

    /// v from x_0 and eps: `sqrt(abar_t) eps - sqrt(1 - abar_t) x0`.
    pub fn v_from_x0_eps(&self, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_same_shape("eps", x0, eps)?;
        let a = self.sqrt_alphas_cumprod().extract(t, x0)?;
        let s = self.sqrt_one_minus_alphas_cumprod().extract(t, x0)?;
        Ok((eps.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// x_0 from x_t and v: `sqrt(abar_t) x_t - sqrt(1 - abar_t) v`.
    pub fn predict_x0_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_same_shape("v", x_t, v)?;
        let a = self.sqrt_alphas_cumprod().extract(t, x_t)?;
        let s = self.sqrt_one_minus_alphas_cumprod().extract(t, x_t)?;
        Ok((x_t.broadcast_mul(&a)? - v.broadcast_mul(&s)?)?)
    }

    /// eps from x_t and v: `sqrt(1 - abar_t) x_t + sqrt(abar_t) v`.
    pub fn predict_eps_from_v(&self, x_t: &Tensor, t: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_same_shape("v", x_t, v)?;
        let a = self.sqrt_alphas_cumprod().extract(t, x_t)?;
        let s = self.sqrt_one_minus_alphas_cumprod().extract(t, x_t)?;
        Ok((x_t.broadcast_mul(&s)? + v.broadcast_mul(&a)?)?)
    }

    /// The training target for `objective`: eps, x_0, or v built from (x_0, eps) at t.
    pub fn training_target(
        &self,
        objective: Objective,
        x0: &Tensor,
        eps: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        check_same_shape("eps", x0, eps)?;
        match objective {
            Objective::Eps => Ok(eps.clone()),
            Objective::X0 => Ok(x0.clone()),
            Objective::V => self.v_from_x0_eps(x0, eps, t),
        }
    }

    /// The x_0 implied by a model output of kind `objective` at (x_t, t).
    pub fn predict_x0(
        &self,
        objective: Objective,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        match objective {
            Objective::Eps => self.predict_x0_from_eps(x_t, t, model_output),
            Objective::X0 => {
                check_same_shape("model_output", x_t, model_output)?;
                Ok(model_output.clone())
            }
            Objective::V => self.predict_x0_from_v(x_t, t, model_output),
        }
    }

    /// The eps implied by a model output of kind `objective` at (x_t, t).
    pub fn predict_eps(
        &self,
        objective: Objective,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        match objective {
            Objective::Eps => {
                check_same_shape("model_output", x_t, model_output)?;
                Ok(model_output.clone())
            }
            Objective::X0 => self.predict_eps_from_x0(x_t, t, model_output),
            Objective::V => self.predict_eps_from_v(x_t, t, model_output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, conversion_tol, normal_tensor, schedule_f64, ts, values};
    use crate::{BetaSchedule, ScheduleConfig};

    const STEPS: [u32; 5] = [0, 1, 250, 500, 999];

    fn setup() -> (Schedule, Tensor, Tensor, Tensor, Tensor) {
        let s = schedule_f64(&ScheduleConfig::default());
        let x0 = normal_tensor(10, &[5, 3, 4]);
        let eps = normal_tensor(11, &[5, 3, 4]);
        let t = ts(&STEPS);
        let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
        (s, x0, eps, t, x_t)
    }

    #[test]
    fn eps_and_x0_convert_back_and_forth_exactly() {
        let (s, x0, eps, t, x_t) = setup();
        let tol = conversion_tol(&s, &STEPS);
        let x0_hat = s.predict_x0_from_eps(&x_t, &t, &eps).expect("x0");
        assert_close(&values(&x0_hat), &values(&x0), tol, "x0 from eps");
        let eps_hat = s.predict_eps_from_x0(&x_t, &t, &x0_hat).expect("eps");
        assert_close(&values(&eps_hat), &values(&eps), tol, "eps -> x0 -> eps");
    }

    #[test]
    fn v_round_trips_to_x0_and_eps() {
        for cfg in [ScheduleConfig::default(), ScheduleConfig::cosine(1000)] {
            let s = schedule_f64(&cfg);
            let x0 = normal_tensor(20, &[5, 6]);
            let eps = normal_tensor(21, &[5, 6]);
            let t = ts(&STEPS);
            let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
            let tol = conversion_tol(&s, &STEPS);
            let v = s.v_from_x0_eps(&x0, &eps, &t).expect("v");
            // v = sqrt(abar) eps - sqrt(1 - abar) x0, computed here by hand.
            let (x0v, epsv) = (values(&x0), values(&eps));
            let abar = s.alphas_cumprod().values();
            let want: Vec<f64> = (0..30)
                .map(|i| {
                    let a = abar[STEPS[i / 6] as usize];
                    a.sqrt() * epsv[i] - (1.0 - a).sqrt() * x0v[i]
                })
                .collect();
            assert_close(&values(&v), &want, tol, "v");
            let x0_hat = s.predict_x0_from_v(&x_t, &t, &v).expect("x0");
            assert_close(&values(&x0_hat), &x0v, tol, "x0 from v");
            let eps_hat = s.predict_eps_from_v(&x_t, &t, &v).expect("eps");
            assert_close(&values(&eps_hat), &epsv, tol, "eps from v");
        }
    }

    #[test]
    fn every_objective_recovers_x0_and_eps_from_its_own_target() {
        let (s, x0, eps, t, x_t) = setup();
        let tol = conversion_tol(&s, &STEPS);
        for objective in [Objective::Eps, Objective::X0, Objective::V] {
            let target = s.training_target(objective, &x0, &eps, &t).expect("target");
            let x0_hat = s.predict_x0(objective, &target, &x_t, &t).expect("x0");
            let eps_hat = s.predict_eps(objective, &target, &x_t, &t).expect("eps");
            assert_close(&values(&x0_hat), &values(&x0), tol, "x0");
            assert_close(&values(&eps_hat), &values(&eps), tol, "eps");
        }
        let target = s.training_target(Objective::Eps, &x0, &eps, &t).expect("t");
        assert_eq!(values(&target), values(&eps));
        let target = s.training_target(Objective::X0, &x0, &eps, &t).expect("t");
        assert_eq!(values(&target), values(&x0));
    }

    #[test]
    fn conversions_work_on_f32_data_with_f64_buffers() {
        let s = schedule_f64(&ScheduleConfig {
            timesteps: 100,
            beta_schedule: BetaSchedule::default(),
        });
        let x = normal_tensor(1, &[2, 3])
            .to_dtype(candle_core::DType::F32)
            .expect("f32");
        let out = s.predict_x0_from_eps(&x, &ts(&[1, 2]), &x).expect("x0");
        assert_eq!(out.dtype(), candle_core::DType::F32);
    }

    #[test]
    fn objective_serde_names() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct W {
            objective: Objective,
        }
        for (o, name) in [
            (Objective::Eps, "eps"),
            (Objective::X0, "x0"),
            (Objective::V, "v"),
        ] {
            let text = toml::to_string(&W { objective: o }).expect("ser");
            assert_eq!(text.trim(), format!("objective = \"{name}\""));
            let back: W = toml::from_str(&text).expect("de");
            assert_eq!(back.objective, o);
        }
        assert_eq!(Objective::default(), Objective::Eps);
    }
}
