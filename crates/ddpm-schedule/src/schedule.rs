//! The schedule's buffers: betas and every quantity the forward and reverse processes derive from
//! them, in `f64` and as device tensors, plus the per-sample gather ("extract") that reads them.

use candle_core::{DType, Device, Tensor};

use crate::config::{check_betas, ScheduleConfig};
use crate::error::{Result, ScheduleError};

/// One per-timestep quantity of a [`Schedule`]: its exact `f64` values and the same values as a
/// tensor of shape `(T,)` on the schedule's device, in the schedule's dtype.
#[derive(Debug, Clone)]
pub struct Buffer {
    values: Vec<f64>,
    tensor: Tensor,
}

impl Buffer {
    fn new(values: Vec<f64>, device: &Device, dtype: DType) -> Result<Self> {
        let tensor = Tensor::from_slice(&values, values.len(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok(Self { values, tensor })
    }

    /// The values in `f64`, indexed by timestep.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The values as a `(T,)` tensor on the schedule's device.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The number of timesteps.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the buffer is empty (never true for a buffer of a valid schedule).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Gathers the value at each sample's timestep, shaped `(b, 1, ..., 1)` to broadcast against
    /// `x`, in `x`'s dtype and on `x`'s device.
    ///
    /// `x` has rank >= 1 with the batch first; `t` is a `(b,)` U32 or I64 tensor of timesteps in
    /// `0..T` (candle reports an index error for a timestep out of range).
    pub fn extract(&self, t: &Tensor, x: &Tensor) -> Result<Tensor> {
        // t: (b,), x: (b, ...)
        let rank = x.rank();
        if rank == 0 {
            return Err(ScheduleError::Shape {
                what: "x",
                expected: "rank >= 1 with the batch first".to_string(),
                found: Vec::new(),
            });
        }
        let batch = x.dim(0)?;
        check_timestep_tensor(t, batch)?;
        let coefs = self.gather(t)?.to_device(x.device())?.to_dtype(x.dtype())?;
        let mut shape = vec![1usize; rank];
        shape[0] = batch;
        Ok(coefs.reshape(shape)?)
    }

    /// Gathers the value at each timestep of the `(b,)` U32 or I64 tensor `t`: a `(b,)` tensor on
    /// the schedule's device, in the schedule's dtype.
    pub fn gather(&self, t: &Tensor) -> Result<Tensor> {
        if !matches!(t.dtype(), DType::U32 | DType::I64) {
            return Err(ScheduleError::TimestepDtype(t.dtype()));
        }
        if t.rank() != 1 {
            return Err(ScheduleError::Shape {
                what: "t",
                expected: "(b,), one timestep per sample".to_string(),
                found: t.dims().to_vec(),
            });
        }
        Ok(self
            .tensor
            .index_select(&t.to_device(self.tensor.device())?, 0)?)
    }
}

/// Checks that `t` is a `(batch,)` U32 or I64 tensor.
pub(crate) fn check_timestep_tensor(t: &Tensor, batch: usize) -> Result<()> {
    match t.dtype() {
        DType::U32 | DType::I64 => {}
        other => return Err(ScheduleError::TimestepDtype(other)),
    }
    if t.dims() != [batch] {
        return Err(ScheduleError::Shape {
            what: "t",
            expected: format!("({batch},), one timestep per sample"),
            found: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// A `(batch,)` U32 tensor holding `timestep` for every sample, for steps that share a timestep.
pub fn timestep_tensor(timestep: usize, batch: usize, device: &Device) -> Result<Tensor> {
    let t = u32::try_from(timestep).map_err(|_| ScheduleError::InvalidParameter {
        field: "timestep",
        value: timestep as f64,
        reason: "must fit in a u32",
    })?;
    Ok(Tensor::full(t, batch, device)?)
}

/// A diffusion schedule: the betas and every buffer the DDPM equations use, indexed by timestep
/// `t = 0..T` (the paper's `t = 1..T`, shifted by one).
///
/// Each buffer keeps its `f64` values (computed in `f64` from the betas) and a tensor copy on the
/// chosen device and dtype. Cloning is cheap: tensors are reference counted.
#[derive(Debug, Clone)]
pub struct Schedule {
    device: Device,
    dtype: DType,
    betas: Buffer,
    alphas: Buffer,
    alphas_cumprod: Buffer,
    alphas_cumprod_prev: Buffer,
    sqrt_alphas_cumprod: Buffer,
    sqrt_one_minus_alphas_cumprod: Buffer,
    log_one_minus_alphas_cumprod: Buffer,
    sqrt_recip_alphas_cumprod: Buffer,
    sqrt_recipm1_alphas_cumprod: Buffer,
    posterior_variance: Buffer,
    posterior_log_variance_clipped: Buffer,
    posterior_mean_coef1: Buffer,
    posterior_mean_coef2: Buffer,
    snr: Buffer,
}

impl Schedule {
    /// Builds the schedule of `config` with F32 buffers on `device`.
    pub fn new(config: &ScheduleConfig, device: &Device) -> Result<Self> {
        Self::with_dtype(config, device, DType::F32)
    }

    /// Builds the schedule of `config` with buffers of `dtype` (F16, BF16, F32 or F64) on `device`.
    pub fn with_dtype(config: &ScheduleConfig, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_betas(config.betas()?, device, dtype)
    }

    /// Builds a schedule from explicit betas, each strictly inside (0, 1); used by respacing.
    ///
    /// `alphas_cumprod` is the cumulative product of `1 - beta`, so for a clipped cosine schedule
    /// it is the product of the clipped betas, not the cosine formula.
    pub fn from_betas(betas: Vec<f64>, device: &Device, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            return Err(ScheduleError::BufferDtype(dtype));
        }
        check_betas(&betas)?;
        let n = betas.len();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let last = alphas_cumprod[n - 1];
        if last <= 0.0 {
            return Err(ScheduleError::InvalidParameter {
                field: "alphas_cumprod[T-1]",
                value: last,
                reason: "underflows to 0; the betas remove the signal too fast",
            });
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..n - 1].iter().copied())
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let ac = &alphas_cumprod;
        let acp = &alphas_cumprod_prev;
        let sqrt_alphas_cumprod = map(&|t| ac[t].sqrt());
        let sqrt_one_minus_alphas_cumprod = map(&|t| (1.0 - ac[t]).sqrt());
        let log_one_minus_alphas_cumprod = map(&|t| (1.0 - ac[t]).ln());
        let sqrt_recip_alphas_cumprod = map(&|t| (1.0 / ac[t]).sqrt());
        let sqrt_recipm1_alphas_cumprod = map(&|t| (1.0 / ac[t] - 1.0).sqrt());
        let posterior_variance = map(&|t| betas[t] * (1.0 - acp[t]) / (1.0 - ac[t]));
        // posterior_variance[0] is 0; as in the DDPM code its log takes the t = 1 entry instead.
        // With a single timestep there is no t = 1 entry and beta_0 stands in.
        let first_log_var = if n > 1 {
            posterior_variance[1]
        } else {
            betas[0]
        };
        let posterior_log_variance_clipped = map(&|t| {
            if t == 0 {
                first_log_var.ln()
            } else {
                posterior_variance[t].ln()
            }
        });
        let posterior_mean_coef1 = map(&|t| betas[t] * acp[t].sqrt() / (1.0 - ac[t]));
        let posterior_mean_coef2 = map(&|t| (1.0 - acp[t]) * alphas[t].sqrt() / (1.0 - ac[t]));
        let snr = map(&|t| ac[t] / (1.0 - ac[t]));

        let buf = |values: Vec<f64>| Buffer::new(values, device, dtype);
        Ok(Self {
            device: device.clone(),
            dtype,
            sqrt_alphas_cumprod: buf(sqrt_alphas_cumprod)?,
            sqrt_one_minus_alphas_cumprod: buf(sqrt_one_minus_alphas_cumprod)?,
            log_one_minus_alphas_cumprod: buf(log_one_minus_alphas_cumprod)?,
            sqrt_recip_alphas_cumprod: buf(sqrt_recip_alphas_cumprod)?,
            sqrt_recipm1_alphas_cumprod: buf(sqrt_recipm1_alphas_cumprod)?,
            posterior_variance: buf(posterior_variance)?,
            posterior_log_variance_clipped: buf(posterior_log_variance_clipped)?,
            posterior_mean_coef1: buf(posterior_mean_coef1)?,
            posterior_mean_coef2: buf(posterior_mean_coef2)?,
            snr: buf(snr)?,
            alphas_cumprod_prev: buf(alphas_cumprod_prev)?,
            alphas_cumprod: buf(alphas_cumprod)?,
            alphas: buf(alphas)?,
            betas: buf(betas)?,
        })
    }

    /// The number of timesteps `T`.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The device the buffers live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the buffer tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `beta_t`, the variance of the noise added at step t.
    pub fn betas(&self) -> &Buffer {
        &self.betas
    }

    /// `alpha_t = 1 - beta_t`.
    pub fn alphas(&self) -> &Buffer {
        &self.alphas
    }

    /// `abar_t = prod_{s <= t} alpha_s`.
    pub fn alphas_cumprod(&self) -> &Buffer {
        &self.alphas_cumprod
    }

    /// `abar_{t-1}`, with 1.0 at t = 0.
    pub fn alphas_cumprod_prev(&self) -> &Buffer {
        &self.alphas_cumprod_prev
    }

    /// `sqrt(abar_t)`, the signal scale of x_t.
    pub fn sqrt_alphas_cumprod(&self) -> &Buffer {
        &self.sqrt_alphas_cumprod
    }

    /// `sqrt(1 - abar_t)`, the noise scale of x_t.
    pub fn sqrt_one_minus_alphas_cumprod(&self) -> &Buffer {
        &self.sqrt_one_minus_alphas_cumprod
    }

    /// `ln(1 - abar_t)`, the log variance of q(x_t | x_0).
    pub fn log_one_minus_alphas_cumprod(&self) -> &Buffer {
        &self.log_one_minus_alphas_cumprod
    }

    /// `sqrt(1 / abar_t)`.
    pub fn sqrt_recip_alphas_cumprod(&self) -> &Buffer {
        &self.sqrt_recip_alphas_cumprod
    }

    /// `sqrt(1 / abar_t - 1)`.
    pub fn sqrt_recipm1_alphas_cumprod(&self) -> &Buffer {
        &self.sqrt_recipm1_alphas_cumprod
    }

    /// `beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`, the variance of q(x_{t-1} | x_t, x_0).
    pub fn posterior_variance(&self) -> &Buffer {
        &self.posterior_variance
    }

    /// `ln(beta_tilde_t)` with the t = 0 entry (where beta_tilde is 0) replaced by the t = 1 entry.
    pub fn posterior_log_variance_clipped(&self) -> &Buffer {
        &self.posterior_log_variance_clipped
    }

    /// `beta_t sqrt(abar_{t-1}) / (1 - abar_t)`, the x_0 coefficient of the posterior mean.
    pub fn posterior_mean_coef1(&self) -> &Buffer {
        &self.posterior_mean_coef1
    }

    /// `(1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)`, the x_t coefficient of the posterior mean.
    pub fn posterior_mean_coef2(&self) -> &Buffer {
        &self.posterior_mean_coef2
    }

    /// The signal-to-noise ratio `abar_t / (1 - abar_t)`.
    pub fn snr(&self) -> &Buffer {
        &self.snr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BetaSchedule;
    use crate::test_util::{assert_close, schedule_f64, ts, values, TOL_F64};

    /// abar computed independently of `Schedule`, by its definition.
    fn cumprod(betas: &[f64]) -> Vec<f64> {
        let mut acc = 1.0;
        betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }

    fn all_configs() -> Vec<ScheduleConfig> {
        vec![
            ScheduleConfig::default(),
            ScheduleConfig::scaled_linear(300),
            ScheduleConfig::cosine(1000),
            ScheduleConfig {
                timesteps: 200,
                beta_schedule: BetaSchedule::Sigmoid {
                    start: 1e-4,
                    end: 0.02,
                },
            },
        ]
    }

    #[test]
    fn derived_buffers_match_their_definitions() {
        for cfg in all_configs() {
            let s = schedule_f64(&cfg);
            let betas = cfg.betas().expect("valid");
            let abar = cumprod(&betas);
            let n = betas.len();
            let abar_prev: Vec<f64> = (0..n)
                .map(|t| if t == 0 { 1.0 } else { abar[t - 1] })
                .collect();
            let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<_>>();
            assert_eq!(s.timesteps(), n);
            assert_eq!(s.betas().values(), betas.as_slice());
            assert_close(
                s.alphas().values(),
                &map(&|t| 1.0 - betas[t]),
                TOL_F64,
                "alphas",
            );
            assert_close(s.alphas_cumprod().values(), &abar, TOL_F64, "abar");
            assert_eq!(s.alphas_cumprod_prev().values()[0], 1.0);
            assert_close(
                s.alphas_cumprod_prev().values(),
                &abar_prev,
                TOL_F64,
                "abar_prev",
            );
            assert_close(
                s.sqrt_alphas_cumprod().values(),
                &map(&|t| abar[t].sqrt()),
                TOL_F64,
                "sqrt_abar",
            );
            assert_close(
                s.sqrt_one_minus_alphas_cumprod().values(),
                &map(&|t| (1.0 - abar[t]).sqrt()),
                TOL_F64,
                "sqrt_one_minus_abar",
            );
            assert_close(
                s.log_one_minus_alphas_cumprod().values(),
                &map(&|t| (1.0 - abar[t]).ln()),
                TOL_F64,
                "log_one_minus_abar",
            );
            // sqrt(1/abar) * sqrt(abar) = 1 and sqrt(1/abar - 1)^2 = (1 - abar)/abar.
            assert_close(
                &map(&|t| {
                    s.sqrt_recip_alphas_cumprod().values()[t] * s.sqrt_alphas_cumprod().values()[t]
                }),
                &vec![1.0; n],
                TOL_F64,
                "sqrt_recip_abar",
            );
            assert_close(
                &map(&|t| s.sqrt_recipm1_alphas_cumprod().values()[t].powi(2)),
                &map(&|t| (1.0 - abar[t]) / abar[t]),
                TOL_F64,
                "sqrt_recipm1_abar",
            );
            // Posterior variance (DDPM eq. 7): (1 - abar_{t-1}) / (1 - abar_t) beta_t.
            let post_var = map(&|t| (1.0 - abar_prev[t]) / (1.0 - abar[t]) * betas[t]);
            assert_eq!(s.posterior_variance().values()[0], 0.0);
            assert_close(
                s.posterior_variance().values(),
                &post_var,
                TOL_F64,
                "post_var",
            );
            let clipped = map(&|t| post_var[t.max(1)].ln());
            assert_close(
                s.posterior_log_variance_clipped().values(),
                &clipped,
                TOL_F64,
                "post_log_var_clipped",
            );
            assert_close(
                s.posterior_mean_coef1().values(),
                &map(&|t| betas[t] * abar_prev[t].sqrt() / (1.0 - abar[t])),
                TOL_F64,
                "coef1",
            );
            assert_close(
                s.posterior_mean_coef2().values(),
                &map(&|t| (1.0 - abar_prev[t]) * (1.0 - betas[t]).sqrt() / (1.0 - abar[t])),
                TOL_F64,
                "coef2",
            );
            assert_close(
                s.snr().values(),
                &map(&|t| abar[t] / (1.0 - abar[t])),
                TOL_F64,
                "snr",
            );
        }
    }

    #[test]
    fn tensors_hold_the_f64_values_in_the_chosen_dtype() {
        let cfg = ScheduleConfig::cosine(100);
        let s64 = schedule_f64(&cfg);
        assert_eq!(s64.dtype(), DType::F64);
        assert_eq!(values(s64.snr().tensor()), s64.snr().values());
        let s32 = Schedule::new(&cfg, &Device::Cpu).expect("valid");
        assert_eq!(s32.dtype(), DType::F32);
        let t = s32.posterior_mean_coef2().tensor();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.dims(), &[100]);
        let rounded: Vec<f64> = s32
            .posterior_mean_coef2()
            .values()
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        assert_eq!(values(t), rounded);
    }

    #[test]
    fn extract_gathers_per_sample_and_broadcasts() {
        let s = schedule_f64(&ScheduleConfig::default());
        let x = Tensor::zeros((3, 2, 4, 5), DType::F32, &Device::Cpu).expect("zeros");
        let t = ts(&[0, 999, 17]);
        let c = s.sqrt_alphas_cumprod().extract(&t, &x).expect("extract");
        assert_eq!(c.dims(), &[3, 1, 1, 1]);
        assert_eq!(c.dtype(), DType::F32);
        let v = s.sqrt_alphas_cumprod().values();
        let expected: Vec<f64> = [0, 999, 17].iter().map(|&i| v[i] as f32 as f64).collect();
        assert_eq!(values(&c), expected);

        // Rank 1 x and I64 timesteps.
        let x1 = Tensor::zeros(2, DType::F64, &Device::Cpu).expect("zeros");
        let t64 = Tensor::new(&[5i64, 6], &Device::Cpu).expect("t");
        let c1 = s.snr().extract(&t64, &x1).expect("extract");
        assert_eq!(c1.dims(), &[2]);
        assert_eq!(values(&c1), vec![s.snr().values()[5], s.snr().values()[6]]);
    }

    #[test]
    fn extract_rejects_bad_timesteps() {
        let s = schedule_f64(&ScheduleConfig::linear(10));
        let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).expect("zeros");
        let t_f32 = Tensor::new(&[1f32, 2.], &Device::Cpu).expect("t");
        assert!(matches!(
            s.betas().extract(&t_f32, &x),
            Err(ScheduleError::TimestepDtype(DType::F32))
        ));
        assert!(matches!(
            s.betas().extract(&ts(&[1, 2, 3]), &x),
            Err(ScheduleError::Shape { what: "t", .. })
        ));
        // Out of range: an error from candle, not a panic.
        assert!(matches!(
            s.betas().extract(&ts(&[1, 10]), &x),
            Err(ScheduleError::Candle(_))
        ));
        let scalar = Tensor::new(1f64, &Device::Cpu).expect("scalar");
        assert!(matches!(
            s.betas().extract(&ts(&[1]), &scalar),
            Err(ScheduleError::Shape { what: "x", .. })
        ));
    }

    #[test]
    fn from_betas_validates() {
        let cpu = Device::Cpu;
        assert!(matches!(
            Schedule::from_betas(vec![], &cpu, DType::F32),
            Err(ScheduleError::ZeroTimesteps)
        ));
        assert!(matches!(
            Schedule::from_betas(vec![0.1, 1.0], &cpu, DType::F32),
            Err(ScheduleError::BetaOutOfRange { timestep: 1, .. })
        ));
        assert!(matches!(
            Schedule::from_betas(vec![0.0, 0.1], &cpu, DType::F32),
            Err(ScheduleError::BetaOutOfRange { timestep: 0, .. })
        ));
        assert!(matches!(
            Schedule::from_betas(vec![0.1], &cpu, DType::U32),
            Err(ScheduleError::BufferDtype(DType::U32))
        ));
        // A single step: the clipped log variance falls back to ln(beta_0).
        let one = Schedule::from_betas(vec![0.3], &cpu, DType::F64).expect("valid");
        assert_eq!(
            one.posterior_log_variance_clipped().values(),
            &[0.3f64.ln()]
        );
    }

    #[test]
    fn timestep_tensor_fills_the_batch() {
        let t = timestep_tensor(7, 4, &Device::Cpu).expect("t");
        assert_eq!(t.dtype(), DType::U32);
        assert_eq!(t.to_vec1::<u32>().expect("vec"), vec![7; 4]);
    }
}
