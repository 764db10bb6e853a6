//! AdamW with state we own (candle's keeps its moments private, so it cannot be checkpointed),
//! global gradient-norm clipping, and the learning rate of each step: a linear warm-up, then
//! constant or a cosine or linear decay to a floor ([`LrSchedule`], [`scheduled_lr`]).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var};
use ddpm_kernels::optim::{self as kernels, AdamWGroup, AdamWStep, EmaPair};
use ddpm_kernels::KernelPolicy;
use serde::{Deserialize, Serialize};

use crate::ema::Ema;
use crate::{Result, TrainError};

/// Hyper-parameters of [`AdamW`], as in PyTorch's `torch.optim.AdamW`. Fields left out of a
/// serialized config take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Decoupled weight decay (multiplies `lr`).
    pub weight_decay: f64,
    /// How the learning rate changes after the warm-up (left out of the TOML when constant, so
    /// configs written before it keep their text and hash).
    #[serde(skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
    /// The learning rate a decaying [`LrSchedule`] reaches at the final step (left out of the
    /// TOML when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub min_lr: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The shape of the learning rate after the warm-up ([`scheduled_lr`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The peak learning rate until the end.
    #[default]
    Constant,
    /// Half a cosine from the peak down to `min_lr` at the final step.
    Cosine,
    /// A straight line from the peak down to `min_lr` at the final step.
    Linear,
}

impl LrSchedule {
    /// The names a config or flag may give.
    pub const NAMES: &'static str = "constant, cosine, linear";

    /// Whether this is [`LrSchedule::Constant`] (the default).
    pub fn is_constant(&self) -> bool {
        *self == Self::Constant
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lr_schedule: LrSchedule::Constant,
            min_lr: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Checks every field (all finite; `lr` > 0, betas in [0, 1), `eps` > 0, `weight_decay`
    /// >= 0); the error names the field, its value and the allowed range.
    pub fn validate(&self) -> Result<()> {
        let checks: [(&str, f64, bool, &str); 6] = [
            ("lr", self.lr, self.lr > 0.0, "> 0"),
            (
                "beta1",
                self.beta1,
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
            ),
            (
                "beta2",
                self.beta2,
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
            ),
            ("eps", self.eps, self.eps > 0.0, "> 0"),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                ">= 0",
            ),
            (
                "min_lr",
                self.min_lr,
                self.min_lr >= 0.0 && self.min_lr <= self.lr,
                "in [0, lr]",
            ),
        ];
        for (name, value, ok, range) in checks {
            if !(ok && value.is_finite()) {
                // Huge and tiny values in scientific notation (`-1e30`, not 31 digits).
                let shown = if value != 0.0 && !(1e-4..1e6).contains(&value.abs()) {
                    format!("{value:e}")
                } else {
                    format!("{value}")
                };
                return Err(TrainError::Config(format!(
                    "`[optimizer] {name}` = {shown} must be finite and {range}"
                )));
            }
        }
        Ok(())
    }
}

/// The learning rate at optimizer step `step` (1-based): linear warm-up from `lr / warmup` to
/// `lr` over `warmup` steps, then constant.
pub fn warmup_lr(lr: f64, warmup: usize, step: usize) -> f64 {
    if warmup == 0 || step >= warmup {
        lr
    } else {
        lr * step as f64 / warmup as f64
    }
}

/// The learning rate at optimizer step `step` (1-based) of a run of `total` steps: the linear
/// warm-up of [`warmup_lr`] over `warmup` steps, then `config.lr_schedule` from `config.lr` at
/// step `warmup` down to `config.min_lr` at step `total` (constant: `config.lr` throughout).
/// With `p = (step - warmup) / (total - warmup)`, cosine is
/// `min_lr + (lr - min_lr) (1 + cos(pi p)) / 2` and linear `lr - (lr - min_lr) p`; steps past
/// `total` keep `min_lr`. A pure function of the step, so a resumed run takes the same rates.
pub fn scheduled_lr(config: &AdamWConfig, warmup: usize, total: usize, step: usize) -> f64 {
    let (lr, min) = (config.lr, config.min_lr);
    if config.lr_schedule == LrSchedule::Constant || step < warmup {
        return warmup_lr(lr, warmup, step);
    }
    if total <= warmup {
        return lr;
    }
    let p = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
    match config.lr_schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        LrSchedule::Linear => lr - (lr - min) * p,
    }
}

/// AdamW over named variables. Moments are kept in f32 (the master precision) by name, so the
/// whole state saves to and loads from a checkpoint exactly. Its updates run as its
/// [`KernelPolicy`] says (`ddpm_kernels::optim`).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    kernels: KernelPolicy,
    vars: BTreeMap<String, Var>,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    step: usize,
}

impl AdamW {
    /// An optimizer of `vars` with zero moments, updating them as `kernels` says (the run's
    /// policy: that of the model whose variables these are).
    pub fn new(
        vars: BTreeMap<String, Var>,
        config: AdamWConfig,
        kernels: KernelPolicy,
    ) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in &vars {
            // Two buffers, never one shared: the moments are updated in place.
            let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
            m.insert(name.clone(), zeros()?);
            v.insert(name.clone(), zeros()?);
        }
        Ok(Self {
            config,
            kernels,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The kernel policy of its updates.
    pub fn kernel_policy(&self) -> KernelPolicy {
        self.kernels
    }

    /// One AdamW update with learning rate `lr` from the gradients in `grads` (by name). Variables
    /// without a gradient are left unchanged (their moments too).
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0, None)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (the factor of
    /// gradient clipping, see [`clip_factor`]), without materializing the scaled gradients.
    ///
    /// With `ema = Some((ema, n))`, the EMA then takes its update number `n` ([`Ema::update`]
    /// with the new weights), in the same pass where the kernels allow.
    ///
    /// With our kernels (f32 variables) the moments, the variables and the averages are updated
    /// in place: on CUDA all of them in one kernel (and one for the averages), on the CPU in one
    /// pass per variable over its weights, moments, gradient and average; elsewhere with tensor
    /// ops, to the same values ([`ddpm_kernels::optim::adamw`]).
    pub fn step_scaled(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
        ema: Option<(&mut Ema, usize)>,
    ) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let (ema_decay, mut averages) = match ema {
            Some((ema, n)) => {
                let (decay, averages) = ema.for_update(n);
                let by_name: HashMap<&str, &mut Tensor> = averages
                    .iter_mut()
                    .map(|(name, t)| (name.as_str(), t))
                    .collect();
                (Some(decay), by_name)
            }
            None => (None, HashMap::new()),
        };
        let step = AdamWStep {
            lr,
            weight_decay: c.weight_decay,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            step: self.step,
            grad_scale,
            ema_decay,
        };
        // Every variable with a gradient and moments, in name order, with its average.
        let mut groups: Vec<AdamWGroup<'_>> = self
            .m
            .iter_mut()
            .zip(self.v.iter_mut())
            .filter_map(|((name, m), (_, v))| {
                Some(AdamWGroup {
                    var: self.vars.get(name)?,
                    m,
                    v,
                    grad: grads.get(name)?,
                    average: averages.remove(name.as_str()),
                })
            })
            .collect();
        kernels::adamw(self.kernels, &mut groups, &step)?;
        drop(groups);
        // The averages of variables without a gradient follow their unchanged values, as in
        // `Ema::update`.
        if let Some(decay) = ema_decay {
            let mut pairs: Vec<EmaPair<'_>> = averages
                .into_iter()
                .filter_map(|(name, average)| {
                    Some(EmaPair {
                        average,
                        value: self.vars.get(name)?.as_tensor(),
                    })
                })
                .collect();
            kernels::ema(self.kernels, &mut pairs, decay)?;
        }
        Ok(())
    }

    /// The state as named tensors (`m.<var>`, `v.<var>`) plus the step count. The tensors share
    /// memory with the optimizer's moments, which the next step updates in place: write them out
    /// (or copy them) before stepping again.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, usize) {
        let mut out = BTreeMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        (out, self.step)
    }

    /// Restores a state written by [`AdamW::state`]; every moment must be present with its
    /// variable's shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in &self.vars {
            for (prefix, dst) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| TrainError::Checkpoint {
                    path: None,
                    reason: format!("optimizer state lacks `{key}`"),
                })?;
                if t.dims() != var.dims() {
                    return Err(TrainError::Checkpoint {
                        path: None,
                        reason: format!(
                            "optimizer state `{key}` has shape {:?}, variable has {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    });
                }
                // A copy of its own: the moments are updated in place.
                dst.insert(
                    name.clone(),
                    t.to_dtype(DType::F32)?.to_device(var.device())?.copy()?,
                );
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients, as `kernels` says (with our kernels the squares are
/// summed in f64 on the CPU and on CUDA; elsewhere in f32 per tensor, as candle's `sum_all`
/// does).
pub fn grad_norm(grads: &BTreeMap<String, Tensor>, kernels: KernelPolicy) -> Result<f64> {
    let all: Vec<&Tensor> = grads.values().collect();
    Ok(kernels::sum_of_squares(kernels, &all)?.sqrt())
}

/// The factor gradient clipping multiplies every gradient by, given their global `norm`:
/// `max_norm / (norm + 1e-6)` when `norm > max_norm > 0`, else 1 (PyTorch's
/// `clip_grad_norm_`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales all gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping. (The trainer instead passes
/// [`clip_factor`] to [`AdamW::step_scaled`], which scales without a copy of the gradients.)
pub fn clip_grad_norm(
    grads: &mut BTreeMap<String, Tensor>,
    max_norm: f64,
    kernels: KernelPolicy,
) -> Result<f64> {
    let norm = grad_norm(grads, kernels)?;
    let scale = clip_factor(norm, max_norm);
    if scale != 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn candle() -> KernelPolicy {
        KernelPolicy {
            backend: ddpm_kernels::policy::Backend::Candle,
            ..KernelPolicy::default()
        }
    }

    /// An EMA moved in AdamW's pass (`step_scaled` with `Some(ema)`) holds, bit for bit, what
    /// the step followed by [`Ema::update`] gives, with our kernels (one pass on the CPU) and
    /// with candle's ops; a variable without a gradient keeps its weights and its average.
    #[test]
    fn an_ema_moved_in_the_adamw_pass_equals_a_separate_update() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * ddpm_kernels::optim::cpu::CHUNK_LEN + 7;
        let wave = |k: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect();
            Ok(Tensor::from_vec(v, n, &dev)?)
        };
        for kernels in [KernelPolicy::default(), candle()] {
            let run = |fused: bool| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                let w = Var::from_tensor(&wave(0.0)?)?;
                let frozen = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev)?)?;
                let vars = BTreeMap::from([
                    ("w".to_string(), w.clone()),
                    ("z".to_string(), frozen.clone()),
                ]);
                let mut opt = AdamW::new(vars.clone(), AdamWConfig::default(), kernels)?;
                let mut ema = Ema::new(&vars, 0.99, kernels)?;
                // A variable without a gradient whose average has yet to catch up with it.
                frozen.set(&Tensor::new(&[3f32, 4.0], &dev)?)?;
                for step in 1..=3 {
                    let g = wave(step as f32)?;
                    let grads = BTreeMap::from([("w".to_string(), g)]);
                    if fused {
                        opt.step_scaled(&grads, 1e-2, 0.5, Some((&mut ema, step)))?;
                    } else {
                        opt.step_scaled(&grads, 1e-2, 0.5, None)?;
                        ema.update(&vars, step)?;
                    }
                }
                let avg = |k: &str| ema.tensors()[k].to_vec1::<f32>();
                let mut z = avg("z")?;
                z.extend(frozen.as_tensor().to_vec1::<f32>()?);
                Ok((w.as_tensor().to_vec1()?, avg("w")?, z))
            };
            let separate = run(false)?;
            let fused = run(true)?;
            assert_eq!(fused, separate, "{kernels:?}");
            // Its average moved towards it, the variable stayed.
            let z = &fused.2;
            assert!(
                z[0] > 1.0 && z[0] < 3.0 && z[1] > 2.0 && z[1] < 4.0,
                "{z:?}"
            );
            assert_eq!(z[2..], [3.0, 4.0]);
        }
        Ok(())
    }

    /// AdamW against a scalar re-implementation of PyTorch's update equations in f64, through
    /// every path: the in-place CPU kernels (f32 variable, our kernels) and tensor ops (an f64
    /// variable, which the kernels do not take, or the candle backend), with a clipping factor
    /// folded in.
    #[test]
    fn matches_reference_update() -> Result<()> {
        let dev = Device::Cpu;
        let paths = [DType::F32, DType::F64].map(|d| (d, KernelPolicy::default()));
        for (dtype, kernels) in paths.into_iter().chain([(DType::F32, candle())]) {
            let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev)?.to_dtype(dtype)?)?;
            let cfg = AdamWConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.01,
                ..AdamWConfig::default()
            };
            let mut opt = AdamW::new(
                BTreeMap::from([("w".to_string(), var.clone())]),
                cfg,
                kernels,
            )?;
            let (mut p, mut m, mut v) = ([1.0f64, -2.0, 0.5], [0f64; 3], [0f64; 3]);
            let grad_scale = 0.75;
            for step in 1..=5 {
                let g = [0.3 * step as f64, -1.0, 2.0 / step as f64];
                let gt = Tensor::new(&[g[0] as f32, g[1] as f32, g[2] as f32], &dev)?;
                opt.step_scaled(
                    &BTreeMap::from([("w".to_string(), gt)]),
                    cfg.lr,
                    grad_scale,
                    None,
                )?;
                for i in 0..3 {
                    let g = g[i] * grad_scale;
                    p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
                    m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
                    v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
                    let mh = m[i] / (1.0 - cfg.beta1.powi(step));
                    let vh = v[i] / (1.0 - cfg.beta2.powi(step));
                    p[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
                }
            }
            let got = var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for i in 0..3 {
                // f32 arithmetic over 5 steps: a few ulps of values of order 1.
                assert!(
                    (got[i] - p[i]).abs() < 1e-5,
                    "{dtype:?} {kernels}: {} vs {}",
                    got[i],
                    p[i]
                );
            }
        }
        Ok(())
    }

    /// The moments are updated in place, so a checkpointed state must be a snapshot: taking
    /// `state()`, stepping, and loading it back must restore the old moments exactly.
    #[test]
    fn moments_are_separate_buffers_and_state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, 2.0], &dev)?;
        let mut opt = AdamW::new(
            BTreeMap::from([("w".to_string(), var.clone())]),
            AdamWConfig::default(),
            KernelPolicy::default(),
        )?;
        let g = BTreeMap::from([("w".to_string(), Tensor::new(&[1.0f32, -1.0], &dev)?)]);
        opt.step(&g, 1e-3)?;
        let (state, step) = opt.state();
        let snapshot: HashMap<String, Tensor> = state
            .iter()
            .map(|(k, t)| (k.clone(), t.copy().expect("copy")))
            .collect();
        // m and v differ after a step (m = 0.1 g, v = 0.001 g^2): no shared zero buffer.
        assert_ne!(
            state["m.w"].to_vec1::<f32>()?,
            state["v.w"].to_vec1::<f32>()?
        );
        opt.step(&g, 1e-3)?;
        opt.load_state(&snapshot, step)?;
        let (back, _) = opt.state();
        for (k, t) in &snapshot {
            assert_eq!(back[k].to_vec1::<f32>()?, t.to_vec1::<f32>()?, "{k}");
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32, 0.0], &dev)?),
            ("b".to_string(), Tensor::new(&[4.0f32], &dev)?),
        ]);
        let ours = KernelPolicy::default();
        let before = clip_grad_norm(&mut g, 1.0, ours)?;
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g, ours)? - 1.0).abs() < 1e-5);
        assert!((grad_norm(&g, candle())? - 1.0).abs() < 1e-5);
        let mut small = BTreeMap::from([("a".to_string(), Tensor::new(&[0.3f32], &dev)?)]);
        clip_grad_norm(&mut small, 1.0, ours)?;
        assert_eq!(small["a"].to_vec1::<f32>()?, vec![0.3]);
        Ok(())
    }

    /// Gradients the in-place sums do not take (f64, a strided view) are summed on their device
    /// and read back once; mixed with ones they take, the norm is still the global one.
    #[test]
    fn grad_norm_mixes_in_place_and_device_sums() -> Result<()> {
        let dev = Device::Cpu;
        let strided = Tensor::new(&[[1.0f32, 2.0], [2.0, 0.0]], &dev)?.t()?;
        let g = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32, 0.0], &dev)?),
            ("b".to_string(), Tensor::new(&[4.0f64, 2.0], &dev)?),
            ("c".to_string(), strided),
        ]);
        // 9 + (16 + 4) + (1 + 4 + 4 + 0) = 38
        let ours = KernelPolicy::default();
        assert!((grad_norm(&g, ours)? - 38f64.sqrt()).abs() < 1e-9);
        let only_device = BTreeMap::from([("b".to_string(), Tensor::new(&[4.0f64, 2.0], &dev)?)]);
        assert!((grad_norm(&only_device, ours)? - 20f64.sqrt()).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn warmup_is_linear_then_constant() {
        assert_eq!(warmup_lr(1.0, 4, 1), 0.25);
        assert_eq!(warmup_lr(1.0, 4, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 4, 100), 1.0);
        assert_eq!(warmup_lr(1.0, 0, 1), 1.0);
    }

    /// The schedules against their closed forms: the warm-up is the same for all; at the end
    /// of the warm-up the peak, halfway through the decay `(lr + min_lr) / 2` for both, a
    /// quarter of the way `min + (lr - min) (1 + cos(pi/4)) / 2` (cosine) and
    /// `lr - (lr - min) / 4` (linear), `min_lr` at the final step and after it; constant
    /// ignores `min_lr`.
    #[test]
    fn lr_schedules_match_their_closed_forms() {
        let (lr, min, warmup, total) = (1e-3, 1e-4, 10, 110);
        let cfg = |lr_schedule| AdamWConfig {
            lr,
            min_lr: min,
            lr_schedule,
            ..AdamWConfig::default()
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-15, "{a} != {b}");
        for s in [LrSchedule::Constant, LrSchedule::Cosine, LrSchedule::Linear] {
            let c = cfg(s);
            close(scheduled_lr(&c, warmup, total, 1), lr / 10.0);
            close(scheduled_lr(&c, warmup, total, 5), lr / 2.0);
            close(scheduled_lr(&c, warmup, total, warmup), lr);
            let last = if s == LrSchedule::Constant { lr } else { min };
            close(scheduled_lr(&c, warmup, total, total), last);
            close(scheduled_lr(&c, warmup, total, total + 7), last);
        }
        let (cos, lin) = (cfg(LrSchedule::Cosine), cfg(LrSchedule::Linear));
        close(scheduled_lr(&cos, warmup, total, 60), (lr + min) / 2.0);
        close(scheduled_lr(&lin, warmup, total, 60), (lr + min) / 2.0);
        let quarter = (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        close(
            scheduled_lr(&cos, warmup, total, 35),
            min + (lr - min) * quarter,
        );
        close(
            scheduled_lr(&lin, warmup, total, 35),
            lr - (lr - min) * 0.25,
        );
        close(
            scheduled_lr(&lin, warmup, total, 85),
            lr - (lr - min) * 0.75,
        );
        // No warm-up: the decay starts at step 0, so step 1 is already below the peak.
        let no_min = AdamWConfig { min_lr: 0.0, ..lin };
        close(scheduled_lr(&no_min, 0, 4, 1), lr * 0.75);
        close(scheduled_lr(&no_min, 0, 4, 4), 0.0);
        // A run that ends inside its warm-up never decays.
        close(scheduled_lr(&cos, 10, 5, 5), lr / 2.0);
        close(scheduled_lr(&cos, 10, 10, 10), lr);
        // Monotone non-increasing after the warm-up.
        for c in [cos, lin] {
            let lrs: Vec<f64> = (warmup..=total)
                .map(|s| scheduled_lr(&c, warmup, total, s))
                .collect();
            assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");
        }
    }

    #[test]
    fn min_lr_must_be_between_zero_and_lr() {
        for bad in [-1e-5, 2e-3, f64::NAN] {
            let c = AdamWConfig {
                lr: 1e-3,
                min_lr: bad,
                ..AdamWConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("`[optimizer] min_lr`") && e.contains("[0, lr]"),
                "{e}"
            );
        }
    }
}
