//! The forward (noising) process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

use candle_core::Tensor;

use crate::error::{Result, ScheduleError};
use crate::schedule::Schedule;

/// Mean, variance and log variance of a Gaussian, each broadcastable to the batch's shape.
#[derive(Debug, Clone)]
pub struct Gaussian {
    /// The mean, shaped like x.
    pub mean: Tensor,
    /// The variance, shaped `(b, 1, ..., 1)`.
    pub variance: Tensor,
    /// The log variance, shaped `(b, 1, ..., 1)`.
    pub log_variance: Tensor,
}

impl Schedule {
    /// Samples x_t ~ q(x_t | x_0): `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, with a different
    /// timestep per sample.
    ///
    /// `x0` and `noise` have the same shape, rank >= 1 with the batch first (e.g. `(b, c, h, w)`);
    /// `t` is a `(b,)` U32 or I64 tensor. The result has `x0`'s shape and dtype.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        // x0, noise: (b, ...), t: (b,)
        check_same_shape("noise", x0, noise)?;
        let signal = self.sqrt_alphas_cumprod().extract(t, x0)?;
        let sigma = self.sqrt_one_minus_alphas_cumprod().extract(t, x0)?;
        Ok((x0.broadcast_mul(&signal)? + noise.broadcast_mul(&sigma)?)?)
    }

    /// The mean `sqrt(abar_t) x0`, variance `1 - abar_t` and log variance of q(x_t | x_0).
    pub fn q_mean_variance(&self, x0: &Tensor, t: &Tensor) -> Result<Gaussian> {
        let mean = x0.broadcast_mul(&self.sqrt_alphas_cumprod().extract(t, x0)?)?;
        let variance = self.sqrt_one_minus_alphas_cumprod().extract(t, x0)?.sqr()?;
        let log_variance = self.log_one_minus_alphas_cumprod().extract(t, x0)?;
        Ok(Gaussian {
            mean,
            variance,
            log_variance,
        })
    }
}

/// Errors unless `b` has the same shape as `a`.
pub(crate) fn check_same_shape(what: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() == b.dims() {
        Ok(())
    } else {
        Err(ScheduleError::Shape {
            what,
            expected: format!("{:?}, the shape of x", a.dims()),
            found: b.dims().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::test_util::{assert_close, normal_tensor, normal_vec, schedule_f64, ts, values};
    use crate::ScheduleConfig;

    #[test]
    fn q_sample_is_the_closed_form_per_sample() {
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        let x0 = normal_tensor(1, &[3, 2, 2, 2]);
        let eps = normal_tensor(2, &[3, 2, 2, 2]);
        let steps = [0usize, 500, 999];
        let t = ts(&[0, 500, 999]);
        let x_t = values(&s.q_sample(&x0, &t, &eps).expect("q_sample"));
        let (x0v, epsv) = (values(&x0), values(&eps));
        let abar = s.alphas_cumprod().values();
        let expected: Vec<f64> = (0..24)
            .map(|i| {
                let a = abar[steps[i / 8]];
                a.sqrt() * x0v[i] + (1.0 - a).sqrt() * epsv[i]
            })
            .collect();
        assert_close(&x_t, &expected, 1e-14, "x_t");
    }

    #[test]
    fn q_sample_matches_its_mean_and_variance_over_many_draws() {
        // F32 buffers and data, as in training; the check is statistical: for each t the
        // empirical mean of x_t over n draws is within 5 standard errors sqrt((1 - abar)/n) of
        // sqrt(abar) x0, and the empirical variance within 5 standard errors
        // (1 - abar) sqrt(2/(n - 1)) of 1 - abar (Gaussian noise).
        let device = Device::Cpu;
        let s = Schedule::new(&ScheduleConfig::default(), &device).expect("valid");
        let n = 20_000;
        let x0_elem = [0.8f32, -0.3, 0.0, 1.0];
        for step in [0usize, 250, 999] {
            let x0 = Tensor::new(&x0_elem, &device)
                .and_then(|x| x.reshape((1, 4)))
                .and_then(|x| x.broadcast_as((n, 4)))
                .and_then(|x| x.contiguous())
                .expect("x0");
            let noise: Vec<f32> = normal_vec(42 + step as u64, n * 4)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let noise = Tensor::from_vec(noise, (n, 4), &device).expect("noise");
            let t = Tensor::full(step as u32, n, &device).expect("t");
            let x_t = s.q_sample(&x0, &t, &noise).expect("q_sample");
            let x_t = x_t.to_dtype(DType::F64).expect("f64");
            let mean = values(&x_t.mean(0).expect("mean"));
            let centered = x_t
                .broadcast_sub(&x_t.mean_keepdim(0).expect("mean"))
                .expect("c");
            let var: Vec<f64> = values(&centered.sqr().and_then(|c| c.sum(0)).expect("var"))
                .into_iter()
                .map(|v| v / (n - 1) as f64)
                .collect();
            let abar = s.alphas_cumprod().values()[step];
            let se_mean = ((1.0 - abar) / n as f64).sqrt();
            let se_var = (1.0 - abar) * (2.0 / (n - 1) as f64).sqrt();
            for j in 0..4 {
                let want = abar.sqrt() * x0_elem[j] as f64;
                assert!(
                    (mean[j] - want).abs() < 5.0 * se_mean,
                    "t = {step}, mean[{j}] = {} vs {want}",
                    mean[j]
                );
                assert!(
                    (var[j] - (1.0 - abar)).abs() < 5.0 * se_var,
                    "t = {step}, var[{j}] = {} vs {}",
                    var[j],
                    1.0 - abar
                );
            }
        }
    }

    #[test]
    fn q_mean_variance_is_the_forward_marginal() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x0 = normal_tensor(3, &[2, 3]);
        let g = s.q_mean_variance(&x0, &ts(&[10, 700])).expect("q");
        let abar = s.alphas_cumprod().values();
        assert_close(
            &values(&g.variance),
            &[1.0 - abar[10], 1.0 - abar[700]],
            1e-14,
            "variance",
        );
        assert_close(
            &values(&g.log_variance),
            &[(1.0 - abar[10]).ln(), (1.0 - abar[700]).ln()],
            1e-14,
            "log_variance",
        );
        let x0v = values(&x0);
        let want: Vec<f64> = (0..6)
            .map(|i| abar[if i < 3 { 10 } else { 700 }].sqrt() * x0v[i])
            .collect();
        assert_close(&values(&g.mean), &want, 1e-14, "mean");
    }

    #[test]
    fn q_sample_rejects_mismatched_noise() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x0 = normal_tensor(1, &[2, 3]);
        let eps = normal_tensor(2, &[2, 4]);
        assert!(matches!(
            s.q_sample(&x0, &ts(&[1, 2]), &eps),
            Err(ScheduleError::Shape { what: "noise", .. })
        ));
    }
}
