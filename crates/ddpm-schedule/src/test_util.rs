//! Helpers shared by the unit tests.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Schedule, ScheduleConfig};

/// Tolerance for f64 results of a handful of operations: the coefficients reach
/// sqrt(1/abar_{T-1}) ~ 160 and their inverses ~ 1/sqrt(beta_0) ~ 100, so a few ulps (2.2e-16)
/// of inputs of order 1 grow to ~1e-13; 1e-11 leaves a 100x margin.
pub const TOL_F64: f64 = 1e-11;

/// The schedule of `config` with F64 buffers on the CPU.
pub fn schedule_f64(config: &ScheduleConfig) -> Schedule {
    Schedule::with_dtype(config, &Device::Cpu, DType::F64).expect("valid test schedule")
}

/// Standard normal draws from a seeded ChaCha8 generator.
pub fn normal_vec(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// A seeded standard normal F64 tensor of `shape` on the CPU.
pub fn normal_tensor(seed: u64, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(normal_vec(seed, n), shape, &Device::Cpu).expect("shape matches")
}

/// A U32 timestep tensor.
pub fn ts(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).expect("timesteps")
}

/// All elements of `t` as f64, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("readable tensor")
}

/// Asserts `|a_i - b_i| <= tol * max(1, |b_i|)` elementwise.
#[track_caller]
pub fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (x - y).abs();
        assert!(
            err <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y} (error {err:e} > tol {tol:e})"
        );
    }
}

/// Tolerance for the eps / x_0 / v conversions at `steps`: they multiply inputs of order 1 by
/// sqrt(1/abar_t) (up to ~1e5 at the end of the cosine schedule) and divide by sqrt(1/abar_t - 1)
/// (~1e-2 at t = 0), so f64 rounding grows by that condition number; 256 ulps of it.
pub fn conversion_tol(s: &Schedule, steps: &[u32]) -> f64 {
    let cond = steps
        .iter()
        .map(|&t| {
            let t = t as usize;
            let recip = s.sqrt_recip_alphas_cumprod().values()[t];
            let inv_recipm1 = 1.0 / s.sqrt_recipm1_alphas_cumprod().values()[t];
            recip.max(inv_recipm1)
        })
        .fold(1.0, f64::max);
    256.0 * f64::EPSILON * cond
}
