//! The variational bound of DDPM (paper eq. 5) term by term, in nats:
//!
//! - the prior term `L_T = KL(q(x_T | x_0) || N(0, I))`, which needs no model;
//! - the middle terms `L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1}))` between Gaussians;
//! - the decoder term `L_0 = -ln p(x_0 | x_1)` of a discretized Gaussian on 8-bit data: bins of
//!   width 2/255 centred on the 256 levels of [-1, 1], the two outermost bins extended to
//!   infinity.
//!
//! Timesteps are 0-based as everywhere in this crate (the paper's `t` is ours plus one), so the
//! term at our timestep `t` is exactly the paper's `L_t`: [`Schedule::vb_term`] at `t = 0` is the
//! decoder, at `t >= 1` the KL between the posterior q(x_{t-1} | x_t, x_0) and the model's
//! p(x_{t-1} | x_t) in this crate's indexing. Summing [`Schedule::prior_kl`] and the terms of every
//! `t` in `0..T` gives the negative bound; divided by `D ln 2` for `D` values per image it is in
//! bits/dim.
//!
//! Math only: the model's p(x_{t-1} | x_t) comes in as its raw output (see [`Schedule::vb_term`])
//! or as a [`ModelPrediction`]. Everything is computed in `f64`; results are `(b,)` F64 tensors on
//! the CPU.

use candle_core::cpu::erf::{erf_f64, erfc_f64};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScheduleError};
use crate::forward::check_same_shape;
use crate::objective::Objective;
use crate::posterior::{DdpmVariance, ModelPrediction};
use crate::schedule::{check_timestep_tensor, Buffer, Schedule};

/// Half the width of one 8-bit bin on [-1, 1]: the levels are `k / 127.5 - 1`, `k = 0..=255`.
pub const HALF_BIN: f64 = 1.0 / 255.0;

/// Probabilities below this are clamped by the DDPM code's decoder ([`NormalCdf::DdpmApprox`]).
pub const DDPM_MIN_PROB: f64 = 1e-12;

/// The standard normal CDF used by the discretized decoder. Written `"exact"` or `"approx"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum NormalCdf {
    /// The exact CDF through `erf`/`erfc` in `f64` (libm), with each bin's probability computed
    /// from the tail it lies in, so that nothing cancels: accurate far into both tails. No clamp.
    #[default]
    #[serde(rename = "exact")]
    Exact,
    /// The tanh approximation `0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` of the DDPM code
    /// (`approx_standard_normal_cdf`), with its clamp of every probability at 1e-12, to reproduce
    /// its numbers.
    #[serde(rename = "approx")]
    DdpmApprox,
}

impl NormalCdf {
    /// `"exact"` or `"approx"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::DdpmApprox => "approx",
        }
    }
}

fn default_bound_variance() -> DdpmVariance {
    DdpmVariance::FixedLarge
}

fn default_true() -> bool {
    true
}

/// How the model's p(x_{t-1} | x_t) is formed for the bound, and how the decoder is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundConfig {
    /// The fixed reverse variance. Default `fixed_large` (beta_t), the variance the DDPM paper's
    /// CIFAR-10 model samples and reports its bound with.
    #[serde(default = "default_bound_variance")]
    pub variance: DdpmVariance,
    /// Clip the predicted x_0 to [-1, 1] before forming the mean, as the DDPM code's
    /// `calc_bpd_loop` does (any fixed choice gives a valid bound).
    #[serde(default = "default_true")]
    pub clip_x0: bool,
    /// The CDF of the decoder term.
    #[serde(default)]
    pub cdf: NormalCdf,
}

impl Default for BoundConfig {
    fn default() -> Self {
        Self {
            variance: default_bound_variance(),
            clip_x0: true,
            cdf: NormalCdf::default(),
        }
    }
}

/// `KL(N(mean1, e^log_var1) || N(mean2, e^log_var2))` of two scalar Gaussians, in nats.
pub fn normal_kl(mean1: f64, log_var1: f64, mean2: f64, log_var2: f64) -> f64 {
    0.5 * (-1.0 + log_var2 - log_var1
        + (log_var1 - log_var2).exp()
        + (mean1 - mean2).powi(2) * (-log_var2).exp())
}

/// Elementwise [`normal_kl`] of broadcastable tensors (e.g. means `(b, ...)` and log variances
/// `(b, 1, ..., 1)`), in the inputs' dtype; the result has the broadcast shape.
pub fn normal_kl_tensor(
    mean1: &Tensor,
    log_var1: &Tensor,
    mean2: &Tensor,
    log_var2: &Tensor,
) -> Result<Tensor> {
    let diff = mean1.broadcast_sub(mean2)?;
    let log_ratio = log_var1.broadcast_sub(log_var2)?;
    let mahalanobis = diff.sqr()?.broadcast_mul(&log_var2.neg()?.exp()?)?;
    let t = (log_ratio.exp()? - log_ratio)?.broadcast_add(&mahalanobis)?;
    Ok(((t - 1.0)? * 0.5)?)
}

/// The standard normal CDF at `x`.
pub fn standard_normal_cdf(x: f64, cdf: NormalCdf) -> f64 {
    match cdf {
        NormalCdf::Exact => 0.5 * erfc_f64(-x / std::f64::consts::SQRT_2),
        NormalCdf::DdpmApprox => approx_cdf(x),
    }
}

fn approx_cdf(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
}

/// `ln Q(z)`, the log of the upper tail `Q(z) = P(Z > z)` of a standard normal, accurate for every
/// `z` (an asymptotic series beyond z = 30, where `erfc` underflows).
fn log_upper_tail(z: f64) -> f64 {
    if z == f64::INFINITY {
        return f64::NEG_INFINITY;
    }
    if z < 30.0 {
        return (0.5 * erfc_f64(z / std::f64::consts::SQRT_2)).ln();
    }
    // Q(z) = phi(z) / z (1 - 1/z^2 + 3/z^4 - ...); the omitted terms are below 15/z^6 < 2e-8.
    let z2 = z * z;
    -0.5 * z2 - z.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        + (1.0 - 1.0 / z2 + 3.0 / (z2 * z2)).ln()
}

/// `ln(Q(a) - Q(b))` for `0 <= a < b <= inf`, without cancellation.
fn log_tail_difference(a: f64, b: f64) -> f64 {
    let la = log_upper_tail(a);
    let lb = log_upper_tail(b);
    // ln(Q(a) - Q(b)) = ln Q(a) + ln(1 - e^(ln Q(b) - ln Q(a))).
    la + (-(lb - la).exp_m1()).ln()
}

/// The 8-bit level nearest to `x` in [-1, 1] (`0..=255`).
pub fn level_of(x: f64) -> u8 {
    ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// `ln P(x)` under the discretized Gaussian `N(mean, e^log_var)` on the 8-bit grid: the mass of the
/// bin `[x - 1/255, x + 1/255]` of `x`'s level, with the bins of -1 and +1 extended to -inf and
/// +inf. `x` is snapped to the nearest of the 256 levels first, to absorb the rounding of data
/// stored as `f32`.
pub fn discretized_gaussian_log_likelihood(x: f64, mean: f64, log_var: f64, cdf: NormalCdf) -> f64 {
    let level = level_of(x);
    let centre = f64::from(level) / 127.5 - 1.0;
    let inv_std = (-0.5 * log_var).exp();
    let lo = if level == 0 {
        f64::NEG_INFINITY
    } else {
        (centre - HALF_BIN - mean) * inv_std
    };
    let hi = if level == 255 {
        f64::INFINITY
    } else {
        (centre + HALF_BIN - mean) * inv_std
    };
    match cdf {
        NormalCdf::Exact => {
            if lo >= 0.0 {
                log_tail_difference(lo, hi)
            } else if hi <= 0.0 {
                log_tail_difference(-hi, -lo)
            } else {
                // The bin holds the mean: Phi(hi) - Phi(lo) = (erf(hi/sqrt2) + erf(-lo/sqrt2)) / 2,
                // a sum of two non-negative numbers.
                let s = std::f64::consts::SQRT_2;
                (0.5 * (erf_f64(hi / s) + erf_f64(-lo / s))).ln()
            }
        }
        NormalCdf::DdpmApprox => {
            // As `discretized_gaussian_log_likelihood` of the DDPM code.
            let cdf_plus = approx_cdf(hi);
            let cdf_min = approx_cdf(lo);
            if level == 0 {
                cdf_plus.max(DDPM_MIN_PROB).ln()
            } else if level == 255 {
                (1.0 - cdf_min).max(DDPM_MIN_PROB).ln()
            } else {
                (cdf_plus - cdf_min).max(DDPM_MIN_PROB).ln()
            }
        }
    }
}

/// Elementwise [`discretized_gaussian_log_likelihood`]: `x` and `mean` of one shape `(b, ...)`,
/// `log_var` broadcastable to it (e.g. `(b, 1, ..., 1)`). Returns an F64 tensor of `x`'s shape on
/// the CPU.
pub fn discretized_gaussian_log_likelihood_tensor(
    x: &Tensor,
    mean: &Tensor,
    log_var: &Tensor,
    cdf: NormalCdf,
) -> Result<Tensor> {
    check_same_shape("mean", x, mean)?;
    let log_var = log_var.broadcast_as(x.shape())?;
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (xs, ms, lv) = (flat(x)?, flat(mean)?, flat(&log_var)?);
    let out: Vec<f64> = xs
        .iter()
        .zip(&ms)
        .zip(&lv)
        .map(|((&x, &m), &v)| discretized_gaussian_log_likelihood(x, m, v, cdf))
        .collect();
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

/// Converts a sum of nats over `dims` values into bits per value.
pub fn bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// `(b, 1, ..., 1)` F64 CPU tensor of a buffer's exact `f64` values at the timesteps `ts`.
fn gather_exact(buf: &Buffer, ts: &[usize], rank: usize) -> Result<Tensor> {
    let values: Vec<f64> = ts.iter().map(|&t| buf.values()[t]).collect();
    let mut shape = vec![1usize; rank];
    shape[0] = ts.len();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Sums every dimension but the first: `(b, ...)` to `(b,)`.
fn sum_per_sample(t: &Tensor) -> Result<Tensor> {
    let b = t.dim(0)?;
    Ok(t.reshape((b, ()))?.sum(1)?)
}

fn f64_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}

impl Schedule {
    /// The prior term `L_T = KL(q(x_T | x_0) || N(0, I))` of each sample of `x0` `(b, ...)`, summed
    /// over its values, in nats: a `(b,)` F64 tensor on the CPU.
    pub fn prior_kl(&self, x0: &Tensor) -> Result<Tensor> {
        if x0.rank() == 0 {
            return Err(ScheduleError::Shape {
                what: "x0",
                expected: "rank >= 1 with the batch first".to_string(),
                found: Vec::new(),
            });
        }
        let last = self.timesteps() - 1;
        let abar = self.alphas_cumprod().values()[last];
        let log_var = self.log_one_minus_alphas_cumprod().values()[last];
        let x0 = f64_cpu(x0)?;
        let mean = (&x0 * abar.sqrt())?;
        let lv = Tensor::new(log_var, &Device::Cpu)?;
        let zero = Tensor::new(0f64, &Device::Cpu)?;
        sum_per_sample(&normal_kl_tensor(&mean, &lv, &zero, &zero)?)
    }

    /// The term of the bound at each sample's timestep, in nats, from the model's p(x_{t-1} | x_t)
    /// given as a [`ModelPrediction`] (mean and log variance; see [`Schedule::p_mean_variance`]).
    ///
    /// `x0`, `x_t` and `prediction.mean` are `(b, ...)`, `t` is `(b,)`. Where `t >= 1` the term is
    /// `KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))` with the exact posterior in `f64`; where
    /// `t = 0` it is the decoder's `-ln p(x_0 | x_1)`, a discretized Gaussian with the
    /// prediction's mean and variance. Each is summed over the sample's values: a `(b,)` F64
    /// tensor on the CPU.
    pub fn vb_term_from_prediction(
        &self,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        prediction: &ModelPrediction,
        cdf: NormalCdf,
    ) -> Result<Tensor> {
        // x0, x_t: (b, ...), t: (b,)
        check_same_shape("x0", x_t, x0)?;
        check_same_shape("prediction.mean", x_t, &prediction.mean)?;
        if x_t.rank() == 0 {
            return Err(ScheduleError::Shape {
                what: "x_t",
                expected: "rank >= 1 with the batch first".to_string(),
                found: Vec::new(),
            });
        }
        let b = x_t.dim(0)?;
        check_timestep_tensor(t, b)?;
        let ts: Vec<usize> = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as usize)
            .collect();
        if let Some(&bad) = ts.iter().find(|&&v| v >= self.timesteps()) {
            return Err(ScheduleError::InvalidParameter {
                field: "t",
                value: bad as f64,
                reason: "timestep out of range for this schedule",
            });
        }
        let rank = x_t.rank();
        let (x0, x_t) = (f64_cpu(x0)?, f64_cpu(x_t)?);
        let p_mean = f64_cpu(&prediction.mean)?;
        let p_log_var = f64_cpu(&prediction.log_variance)?;
        let mut out = vec![0f64; b];
        if ts.iter().any(|&v| v > 0) {
            let c1 = gather_exact(self.posterior_mean_coef1(), &ts, rank)?;
            let c2 = gather_exact(self.posterior_mean_coef2(), &ts, rank)?;
            let q_mean = (x0.broadcast_mul(&c1)? + x_t.broadcast_mul(&c2)?)?;
            let q_log_var = gather_exact(self.posterior_log_variance_clipped(), &ts, rank)?;
            let kl = normal_kl_tensor(&q_mean, &q_log_var, &p_mean, &p_log_var)?;
            let kl = sum_per_sample(&kl)?.to_vec1::<f64>()?;
            for (i, &v) in ts.iter().enumerate() {
                if v > 0 {
                    out[i] = kl[i];
                }
            }
        }
        let decoder_rows: Vec<usize> = (0..b).filter(|&i| ts[i] == 0).collect();
        if !decoder_rows.is_empty() {
            let idx = Tensor::from_vec(
                decoder_rows.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
                decoder_rows.len(),
                &Device::Cpu,
            )?;
            let lv = p_log_var.broadcast_as(x_t.shape())?.contiguous()?;
            let ll = discretized_gaussian_log_likelihood_tensor(
                &x0.index_select(&idx, 0)?,
                &p_mean.index_select(&idx, 0)?,
                &lv.index_select(&idx, 0)?,
                cdf,
            )?;
            let ll = sum_per_sample(&ll)?.to_vec1::<f64>()?;
            for (k, &i) in decoder_rows.iter().enumerate() {
                out[i] = -ll[k];
            }
        }
        Ok(Tensor::from_vec(out, b, &Device::Cpu)?)
    }

    /// The term of the bound at each sample's timestep from the model's raw output of kind
    /// `objective` at `(x_t, t)`: p(x_{t-1} | x_t) is formed by [`Schedule::p_mean_variance`] with
    /// `config`'s variance and clipping, then [`Schedule::vb_term_from_prediction`] applies.
    pub fn vb_term(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        objective: Objective,
        config: &BoundConfig,
    ) -> Result<Tensor> {
        let p = self.p_mean_variance(
            model_output,
            x_t,
            t,
            objective,
            config.variance,
            config.clip_x0,
        )?;
        self.vb_term_from_prediction(x0, x_t, t, &p, config.cdf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, normal_tensor, schedule_f64, ts, values, TOL_F64};
    use crate::ScheduleConfig;

    /// Composite Simpson's rule of `f` on [a, b] with `n` (even) intervals.
    fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64, n: usize) -> f64 {
        let h = (b - a) / n as f64;
        let mut s = f(a) + f(b);
        for i in 1..n {
            let w = if i % 2 == 1 { 4.0 } else { 2.0 };
            s += w * f(a + i as f64 * h);
        }
        s * h / 3.0
    }

    fn density(x: f64, mean: f64, var: f64) -> f64 {
        (-(x - mean).powi(2) / (2.0 * var)).exp() / (2.0 * std::f64::consts::PI * var).sqrt()
    }

    #[test]
    fn gaussian_kl_matches_numeric_integration() {
        // KL(p || q) = int p ln(p / q), integrated over mean1 +- 14 sd1 with Simpson's rule; the
        // mass outside is below 1e-44 and Simpson's error with 20k intervals is ~1e-15.
        let cases = [
            (0.0, 0.0, 0.0, 0.0),
            (0.3, -1.0, -0.2, 0.5),
            (-1.2, 0.7, 0.4, -0.3),
            (2.0, -4.0, 1.9, -4.5),
        ];
        for (m1, lv1, m2, lv2) in cases {
            let (v1, v2) = (f64::exp(lv1), f64::exp(lv2));
            let sd1 = v1.sqrt();
            let integrand = |x: f64| {
                let p = density(x, m1, v1);
                let log_p =
                    -(x - m1).powi(2) / (2.0 * v1) - 0.5 * (2.0 * std::f64::consts::PI * v1).ln();
                let log_q =
                    -(x - m2).powi(2) / (2.0 * v2) - 0.5 * (2.0 * std::f64::consts::PI * v2).ln();
                p * (log_p - log_q)
            };
            let want = simpson(integrand, m1 - 14.0 * sd1, m1 + 14.0 * sd1, 20_000);
            let got = normal_kl(m1, lv1, m2, lv2);
            assert!(
                (got - want).abs() < 1e-10,
                "KL{:?}: {got} vs {want}",
                (m1, lv1, m2, lv2)
            );
            // The tensor version agrees with the scalar one.
            let t = |v: f64| Tensor::new(&[v], &Device::Cpu).expect("scalar");
            let kt = normal_kl_tensor(&t(m1), &t(lv1), &t(m2), &t(lv2)).expect("kl");
            assert_close(&values(&kt), &[got], TOL_F64, "tensor KL");
        }
    }

    #[test]
    fn discretized_likelihood_matches_numeric_integration() {
        // Bin masses of N(mean, var) integrated with Simpson's rule; the edge bins from
        // mean -+ 14 sd to their inner edge (or nothing where the Gaussian is elsewhere).
        let cases = [
            (0.0, -8.0),   // sd 0.018: bins of a few sd
            (0.5, -11.0),  // sd 0.004: about one bin
            (-0.99, -6.0), // near the lower edge
            (0.97, -9.0),  // near the upper edge
            (0.2, 0.0),    // sd 1: mass spread over all bins
        ];
        for (mean, log_var) in cases {
            let var = f64::exp(log_var);
            let sd = var.sqrt();
            for level in [0u8, 1, 100, 127, 128, 191, 254, 255] {
                let x = f64::from(level) / 127.5 - 1.0;
                let lo = if level == 0 {
                    (mean - 14.0 * sd).min(x)
                } else {
                    x - HALF_BIN
                };
                let hi = if level == 255 {
                    (mean + 14.0 * sd).max(x)
                } else {
                    x + HALF_BIN
                };
                let mass = simpson(|u| density(u, mean, var), lo, hi, 20_000);
                for cdf in [NormalCdf::Exact, NormalCdf::DdpmApprox] {
                    let got = discretized_gaussian_log_likelihood(x, mean, log_var, cdf).exp();
                    // Exact: f64 rounding of the masses. Approx: the tanh CDF is off by up to
                    // 2e-4 in absolute terms (its documented error), and masses below 1e-12
                    // are clamped.
                    let tol = match cdf {
                        NormalCdf::Exact => 1e-10 * mass + 1e-300,
                        NormalCdf::DdpmApprox => 4e-4 + 1e-12,
                    };
                    if cdf == NormalCdf::Exact || mass > 1e-11 {
                        assert!(
                            (got - mass).abs() <= tol,
                            "{cdf:?} level {level}, N({mean}, {var}): {got} vs {mass}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn discretized_probabilities_sum_to_one_and_stay_finite_in_the_tails() {
        for (mean, log_var) in [(0.1, -9.0), (-1.3, -4.0), (0.0, 2.0)] {
            for cdf in [NormalCdf::Exact, NormalCdf::DdpmApprox] {
                let total: f64 = (0..=255u8)
                    .map(|l| {
                        let x = f64::from(l) / 127.5 - 1.0;
                        discretized_gaussian_log_likelihood(x, mean, log_var, cdf).exp()
                    })
                    .sum();
                // The bins partition the line, so the masses telescope to 1 (up to the clamp
                // of the approximate CDF, at most 256e-12).
                assert!(
                    (total - 1.0).abs() < 1e-9,
                    "{cdf:?} N({mean}, {log_var}): {total}"
                );
            }
        }
        // Far in a tail: the exact log-likelihood is the Gaussian tail, not a clamp. With the
        // bin's upper edge 100 sd below the mean, P = Q(100) - Q(107.8), and Q(z) lies between
        // the Mills-ratio bounds phi(z) z / (z^2 + 1) and phi(z) / z.
        let sd = 0.001f64;
        let x = 100.0 / 127.5 - 1.0;
        let mean = x + HALF_BIN + 100.0 * sd;
        let far = discretized_gaussian_log_likelihood(x, mean, 2.0 * sd.ln(), NormalCdf::Exact);
        let log_phi = -5000.0 - 0.5 * (2.0 * std::f64::consts::PI).ln();
        let (lower, upper) = (log_phi + (100.0f64 / 10_001.0).ln(), log_phi - 100f64.ln());
        assert!(
            far > lower - 1e-9 && far < upper,
            "{lower} < {far} < {upper}"
        );
        let clamped =
            discretized_gaussian_log_likelihood(x, mean, 2.0 * sd.ln(), NormalCdf::DdpmApprox);
        assert_eq!(clamped, DDPM_MIN_PROB.ln());
        // x is snapped to its level: f32 rounding of the data changes nothing.
        let x = f64::from(200f32 / 127.5 - 1.0);
        assert_eq!(
            discretized_gaussian_log_likelihood(x, 0.5, -7.0, NormalCdf::Exact),
            discretized_gaussian_log_likelihood(200.0 / 127.5 - 1.0, 0.5, -7.0, NormalCdf::Exact)
        );
    }

    #[test]
    fn prior_kl_is_the_closed_form() {
        let cfg = ScheduleConfig::linear(100);
        let s = schedule_f64(&cfg);
        let x0 = normal_tensor(3, &[2, 3]).tanh().expect("tanh");
        let got = values(&s.prior_kl(&x0).expect("prior"));
        let abar: f64 = cfg
            .betas()
            .expect("betas")
            .iter()
            .map(|b| 1.0 - b)
            .product();
        let x = values(&x0);
        for i in 0..2 {
            // KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) = (abar x^2 + (1 - abar) - 1 - ln(1 - abar)) / 2.
            let want: f64 = x[3 * i..3 * i + 3]
                .iter()
                .map(|&v| 0.5 * (abar * v * v - abar - (1.0 - abar).ln()))
                .sum();
            assert_close(&[got[i]], &[want], TOL_F64, "prior KL");
        }
    }

    #[test]
    fn vb_term_is_the_posterior_kl_or_the_decoder() {
        let cfg = ScheduleConfig::default();
        let s = schedule_f64(&cfg);
        let levels = [0.0f64, 37.0, 128.0, 255.0, 201.0, 5.0];
        let x0 = Tensor::from_vec(
            levels.iter().map(|l| l / 127.5 - 1.0).collect::<Vec<_>>(),
            (2, 3),
            &Device::Cpu,
        )
        .expect("x0");
        let eps = normal_tensor(8, &[2, 3]);
        let steps = [0u32, 500];
        let t = ts(&steps);
        let x_t = s.q_sample(&x0, &t, &eps).expect("q_sample");
        // A model output that is the true eps plus an error.
        let out = (&eps + normal_tensor(9, &[2, 3]) * 0.1).expect("out");
        for variance in [DdpmVariance::FixedSmall, DdpmVariance::FixedLarge] {
            let config = BoundConfig {
                variance,
                clip_x0: false,
                cdf: NormalCdf::Exact,
            };
            let got = values(
                &s.vb_term(&out, &x0, &x_t, &t, Objective::Eps, &config)
                    .expect("vb"),
            );
            let p = s
                .p_mean_variance(&out, &x_t, &t, Objective::Eps, variance, false)
                .expect("p");
            let (pm, plv) = (values(&p.mean), values(&p.log_variance));
            let (x0v, x_tv) = (values(&x0), values(&x_t));
            // Row 0, t = 0: the decoder at the model's mean and variance.
            let dec: f64 = (0..3)
                .map(|j| {
                    -discretized_gaussian_log_likelihood(x0v[j], pm[j], plv[0], NormalCdf::Exact)
                })
                .sum();
            // Row 1, t = 500: KL of the posterior (DDPM eq. 6-7, from the betas) and p.
            let betas = cfg.betas().expect("betas");
            let abar: f64 = betas[..=500].iter().map(|b| 1.0 - b).product();
            let abar_prev = abar / (1.0 - betas[500]);
            let c1 = abar_prev.sqrt() * betas[500] / (1.0 - abar);
            let c2 = (1.0 - betas[500]).sqrt() * (1.0 - abar_prev) / (1.0 - abar);
            let q_var = (1.0 - abar_prev) / (1.0 - abar) * betas[500];
            let kl: f64 = (3..6)
                .map(|j| normal_kl(c1 * x0v[j] + c2 * x_tv[j], q_var.ln(), pm[j], plv[1]))
                .sum();
            assert_close(&got, &[dec, kl], 1e-9, "vb terms");
        }
        // With the true eps and the posterior variance, the middle terms vanish.
        let t5 = ts(&[500, 500]);
        let x_t5 = s.q_sample(&x0, &t5, &eps).expect("q_sample");
        let config = BoundConfig {
            variance: DdpmVariance::FixedSmall,
            clip_x0: false,
            cdf: NormalCdf::Exact,
        };
        let zero = s
            .vb_term(&eps, &x0, &x_t5, &t5, Objective::Eps, &config)
            .expect("vb");
        assert!(
            values(&zero).iter().all(|v| v.abs() < 1e-12),
            "{:?}",
            values(&zero)
        );
    }

    #[test]
    fn vb_term_rejects_bad_input() {
        let s = schedule_f64(&ScheduleConfig::linear(10));
        let x = normal_tensor(1, &[2, 3]);
        let cfg = BoundConfig::default();
        assert!(matches!(
            s.vb_term(&x, &x, &x, &ts(&[1, 10]), Objective::Eps, &cfg),
            Err(ScheduleError::Candle(_)) | Err(ScheduleError::InvalidParameter { .. })
        ));
        assert!(matches!(
            s.vb_term(
                &x,
                &normal_tensor(1, &[2, 2]),
                &x,
                &ts(&[1, 2]),
                Objective::Eps,
                &cfg
            ),
            Err(ScheduleError::Shape { .. })
        ));
    }

    #[test]
    fn bound_config_serde_names() {
        let c: BoundConfig =
            toml::from_str("variance = \"fixed_small\"\ncdf = \"approx\"").expect("de");
        assert_eq!(c.variance, DdpmVariance::FixedSmall);
        assert_eq!(c.cdf, NormalCdf::DdpmApprox);
        assert!(c.clip_x0);
        let d: BoundConfig = toml::from_str("").expect("de");
        assert_eq!(d, BoundConfig::default());
        assert_eq!(d.variance, DdpmVariance::FixedLarge);
        assert_eq!(bits_per_dim(std::f64::consts::LN_2 * 6.0, 3), 2.0);
    }
}
