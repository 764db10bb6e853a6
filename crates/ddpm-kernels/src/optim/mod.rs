//! The optimizer's updates, as the [`KernelPolicy`] given says: AdamW ([`adamw`]), the EMA of
//! the weights ([`ema`]) and the gradient norm's sum of squares ([`sum_of_squares`]) over all
//! variables at once. ddpm-train's optimizer and EMA call these directly.
//!
//! Each picks, per call, the fastest path that takes its tensors: on CUDA one launch for all
//! variables (`cuda`, kernels in `kernels.cu`, with the policy's `cuda_kernels = all`), else
//! one in-place pass per variable ([`cpu`] on the CPU, `cuda::Axpby` and
//! `cuda::adamw_update` on CUDA), else candle's tensor ops ([`fallback`]; also everything under
//! the candle backend). All give the same values up to f32 rounding. The in-place kernels take
//! contiguous f32 tensors ([`supported`]), the master precision of the weights, moments and
//! averages.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fallback;

use candle_core::{DType, InplaceOp3, Layout, Result, Tensor, Var};

pub use cpu::update_in_place;

use crate::policy::CudaKernels;
use crate::KernelPolicy;

/// Whether the in-place kernels take all of `tensors` under `policy`: contiguous f32 tensors on
/// the CPU, or on CUDA where our CUDA kernels are on, unless the policy has candle's backend.
pub fn supported(policy: &KernelPolicy, tensors: &[&Tensor]) -> bool {
    policy.ours()
        && tensors.iter().all(|t| {
            t.dtype() == DType::F32
                && t.is_contiguous()
                && (t.device().is_cpu() || cuda_takes(policy, t))
        })
}

/// Whether our CUDA kernels take `t` under `policy`.
fn cuda_takes(policy: &KernelPolicy, t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        policy.cuda_kernels != CudaKernels::Off && crate::cuda::supported(t)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (policy, t);
        false
    }
}

/// Whether the multi-tensor CUDA kernels (one launch for all variables) take all of `tensors`
/// under `policy`: CUDA tensors that [`supported`] takes, with `cuda_kernels = all`.
pub fn cuda_multi(policy: &KernelPolicy, tensors: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && policy.cuda_kernels == CudaKernels::All
        && tensors.iter().all(|t| t.device().is_cuda())
        && supported(policy, tensors)
}

/// The numbers of one AdamW step (PyTorch's `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// The learning rate of this step.
    pub lr: f64,
    /// Decoupled weight decay (multiplies `lr`).
    pub weight_decay: f64,
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// The step's number, from 1 (the bias corrections `1 - beta^step`).
    pub step: usize,
    /// Multiplies every gradient first (the factor of gradient clipping; 1: none).
    pub grad_scale: f64,
    /// The decay of the EMA that follows the variables, for the groups that carry their average
    /// ([`AdamWGroup::average`]): `average <- decay average + (1 - decay) new value`, in the
    /// same pass on the CPU. `None`: no average moves.
    pub ema_decay: Option<f64>,
}

impl AdamWStep {
    /// The bias corrections `[1 - beta1^step, 1 - beta2^step]`.
    pub fn bias_corrections(&self) -> [f64; 2] {
        let t = self.step as i32;
        [1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t)]
    }

    /// The update of the variables from their moments, as an in-place op.
    pub fn update(&self) -> AdamWUpdate {
        let [bc1, bc2] = self.bias_corrections();
        AdamWUpdate {
            lr: self.lr,
            weight_decay: self.weight_decay,
            bc1,
            bc2,
            eps: self.eps,
        }
    }
}

/// A variable with its moments and its gradient, for [`adamw`].
#[derive(Debug)]
pub struct AdamWGroup<'a> {
    /// The variable (the f32 master weights).
    pub var: &'a Var,
    /// Its first moment (f32), updated in place or replaced.
    pub m: &'a mut Tensor,
    /// Its second moment (f32), updated in place or replaced.
    pub v: &'a mut Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its exponential moving average (f32), if one follows it: moved towards the new value
    /// with [`AdamWStep::ema_decay`] (as [`ema`] does), updated in place or replaced.
    pub average: Option<&'a mut Tensor>,
}

/// One AdamW step of every group, under `policy`, then (with [`AdamWStep::ema_decay`]) one EMA
/// step of the averages the groups carry: on CUDA in one kernel for all of them where
/// [`cuda_multi`] takes every tensor (and one more for the averages), on the CPU in one pass
/// per variable over its weights, moments, gradient and average where [`supported`] takes them
/// (`cpu::adamw_step`), else with tensor ops. `m`, `v`, the variables and the averages are
/// overwritten in place, or replaced. The values are those of [`moment_update`] twice,
/// [`AdamWUpdate`] and [`ema_update`] one after the other, bit for bit.
pub fn adamw(policy: KernelPolicy, groups: &mut [AdamWGroup<'_>], step: &AdamWStep) -> Result<()> {
    policy.scoped(|| {
        // A clone (no copy) where a gradient is contiguous already.
        let grads = groups
            .iter()
            .map(|g| g.grad.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let all_cuda = !groups.is_empty()
            && groups
                .iter()
                .zip(&grads)
                .all(|(g, grad)| cuda_multi(&policy, &[g.var.as_tensor(), &*g.m, &*g.v, grad]));
        let averages_cuda = groups.iter().all(|g| {
            g.average
                .as_deref()
                .is_none_or(|a| cuda_multi(&policy, &[a, g.var.as_tensor()]))
        });
        if all_cuda && averages_cuda {
            let tensors: Vec<[&Tensor; 4]> = groups
                .iter()
                .zip(&grads)
                .map(|(g, grad)| [g.var.as_tensor(), &*g.m, &*g.v, grad])
                .collect();
            cuda_adamw(&tensors, step)?;
            if let Some(decay) = step.ema_decay {
                let pairs: Vec<[&Tensor; 2]> = groups
                    .iter()
                    .filter_map(|g| Some([g.average.as_deref()?, g.var.as_tensor()]))
                    .collect();
                cuda_ema(&pairs, decay)?;
            }
            return Ok(());
        }
        let update = step.update();
        for (g, grad) in groups.iter_mut().zip(&grads) {
            let p = g.var.as_tensor();
            let average = step.ema_decay.zip(g.average.as_deref_mut());
            let mut tensors = vec![p, grad, &*g.m, &*g.v];
            tensors.extend(average.as_ref().map(|(_, a)| &**a));
            if p.device().is_cpu() && supported(&policy, &tensors) {
                let ema = average.map(|(decay, a)| (&*a, decay));
                cpu::adamw_step(p, g.m, g.v, grad, ema, step)?;
                continue;
            }
            if supported(&policy, &[p, grad, g.m, g.v]) {
                moment_update(g.m, grad, step.beta1, step.grad_scale, false)?;
                moment_update(g.v, grad, step.beta2, step.grad_scale, true)?;
                p.inplace_op3(g.m, g.v, &update)?;
            } else {
                fallback::adamw(g.var, g.m, g.v, grad, step)?;
            }
            if let Some((decay, average)) = average {
                let mut pair = [EmaPair { average, value: p }];
                ema(policy, &mut pair, decay)?;
            }
        }
        Ok(())
    })
}

/// A running average and the value it follows, for [`ema`].
#[derive(Debug)]
pub struct EmaPair<'a> {
    /// The average (f32), updated in place or replaced.
    pub average: &'a mut Tensor,
    /// The current value.
    pub value: &'a Tensor,
}

/// One step `average <- decay average + (1 - decay) value` of every pair, under `policy`: on
/// CUDA in one kernel for all of them where [`cuda_multi`] takes every tensor, else per pair in
/// place where [`supported`], else with tensor ops.
pub fn ema(policy: KernelPolicy, pairs: &mut [EmaPair<'_>], decay: f64) -> Result<()> {
    policy.scoped(|| {
        let all_cuda = !pairs.is_empty()
            && pairs
                .iter()
                .all(|p| cuda_multi(&policy, &[&*p.average, p.value]));
        if all_cuda {
            let tensors: Vec<[&Tensor; 2]> = pairs.iter().map(|p| [&*p.average, p.value]).collect();
            return cuda_ema(&tensors, decay);
        }
        for p in pairs.iter_mut() {
            if supported(&policy, &[p.average, p.value]) {
                ema_update(p.average, p.value, decay)?;
            } else {
                fallback::ema(p.average, p.value, decay)?;
            }
        }
        Ok(())
    })
}

/// The sum of the squares of the elements of all of `tensors`, under `policy`: on the CPU and,
/// with our kernels, on CUDA accumulated in f64 (one kernel and one read-back for all CUDA
/// tensors); elsewhere in f32 per tensor, as candle's `sum_all` does.
pub fn sum_of_squares(policy: KernelPolicy, tensors: &[&Tensor]) -> Result<f64> {
    policy.scoped(|| {
        let mut total = 0f64;
        // Sums computed on a device stay there until the end: one read-back (one
        // synchronization) for all of them instead of one per tensor.
        let mut cuda = Vec::new();
        let mut other = Vec::new();
        for &t in tensors {
            if t.device().is_cpu() && supported(&policy, &[t]) {
                if let Some(s) = cpu::sum_of_squares(t) {
                    total += s;
                    continue;
                }
            }
            if cuda_multi(&policy, &[t]) {
                cuda.push(t);
            } else {
                other.push(t);
            }
        }
        total += cuda_sum_of_squares(&cuda)?;
        Ok(total + fallback::sum_of_squares(&other)?)
    })
}

/// Updates an exponential moving average of a gradient (or of its square) in place:
/// `m <- decay m + (1 - decay) (scale g)` or, with `square`, `(scale g)^2` (tensors that
/// [`supported`] takes).
pub fn moment_update(m: &Tensor, g: &Tensor, decay: f64, scale: f64, square: bool) -> Result<()> {
    let factors = [decay, 1.0 - decay, scale];
    if m.device().is_cpu() {
        cpu::axpby("adamw-moment", m, g, factors, square)
    } else {
        cuda_axpby(m, g, factors, square)
    }
}

/// One step of an exponential moving average, in place: `s <- decay s + (1 - decay) p`
/// (tensors that [`supported`] takes).
pub fn ema_update(s: &Tensor, p: &Tensor, decay: f64) -> Result<()> {
    let factors = [decay, 1.0 - decay, 1.0];
    if s.device().is_cpu() {
        cpu::axpby("ema-update", s, p, factors, false)
    } else {
        cuda_axpby(s, p, factors, false)
    }
}

/// AdamW's update of a variable from its moments, in place (`p.inplace_op3(m, v, &update)`):
/// `p <- p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)`, with the bias corrections
/// `bc1 = 1 - beta1^step`, `bc2 = 1 - beta2^step`.
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    /// The learning rate of this step.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// `1 - beta1^step`.
    pub bc1: f64,
    /// `1 - beta2^step`.
    pub bc2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

impl AdamWUpdate {
    /// `[1 - lr wd, 1 / bc1, 1 / bc2, lr, eps]` in f32, as the kernels take them.
    pub(crate) fn factors(&self) -> [f32; 5] {
        [
            (1.0 - self.lr * self.weight_decay) as f32,
            (1.0 / self.bc1) as f32,
            (1.0 / self.bc2) as f32,
            self.lr as f32,
            self.eps as f32,
        ]
    }
}

impl InplaceOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
        s3: &candle_core::CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m) = cpu::operands(self.name(), (s1, l1), (s2, l2))?;
        let v = cpu::values(s3, l3, self.name())?;
        cpu::check_len(self.name(), p.len(), &[v.len()])?;
        cpu::adamw_update(p, m, v, self.factors());
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        cuda::adamw_update(s1, l1, s2, l2, s3, l3, self.factors())
    }
}

/// `dst = keep * dst + take * f(scale * src)` in place on CUDA (`f` the square when `square`).
#[cfg(feature = "cuda")]
fn cuda_axpby(
    dst: &Tensor,
    src: &Tensor,
    [keep, take, scale]: [f64; 3],
    square: bool,
) -> Result<()> {
    let op = cuda::Axpby {
        keep: keep as f32,
        take: take as f32,
        scale: scale as f32,
        square,
    };
    dst.inplace_op2(src, &op)
}

/// One AdamW step of every group `[p, m, v, g]` in one CUDA kernel.
#[cfg(feature = "cuda")]
fn cuda_adamw(groups: &[[&Tensor; 4]], step: &AdamWStep) -> Result<()> {
    let [decay, inv_bc1, inv_bc2, lr, eps] = step.update().factors();
    let f = cuda::AdamWFactors {
        scale: step.grad_scale as f32,
        first: [step.beta1 as f32, (1.0 - step.beta1) as f32],
        second: [step.beta2 as f32, (1.0 - step.beta2) as f32],
        decay,
        inv_bc1,
        inv_bc2,
        lr,
        eps,
    };
    cuda::adamw_multi(groups, &f)
}

/// One EMA step of every pair `[s, p]` in one CUDA kernel.
#[cfg(feature = "cuda")]
fn cuda_ema(pairs: &[[&Tensor; 2]], decay: f64) -> Result<()> {
    cuda::axpby_multi(pairs, decay as f32, (1.0 - decay) as f32)
}

/// The sum of squares of all of `tensors` in one CUDA kernel, in f64.
#[cfg(feature = "cuda")]
fn cuda_sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    cuda::sum_of_squares(tensors)
}

/// Without the `cuda` feature there are no CUDA tensors to update.
#[cfg(not(feature = "cuda"))]
fn cuda_axpby(dst: &Tensor, _: &Tensor, _: [f64; 3], _: bool) -> Result<()> {
    candle_core::bail!(
        "in-place update of a {:?} tensor in a build without CUDA",
        dst.device()
    )
}

/// Fails for CUDA work in a build without CUDA (only empty lists are accepted).
#[cfg(not(feature = "cuda"))]
fn no_cuda(len: usize, what: &str) -> Result<()> {
    if len > 0 {
        candle_core::bail!("{what} of CUDA tensors in a build without CUDA");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_adamw(groups: &[[&Tensor; 4]], _: &AdamWStep) -> Result<()> {
    no_cuda(groups.len(), "AdamW")
}

#[cfg(not(feature = "cuda"))]
fn cuda_ema(pairs: &[[&Tensor; 2]], _: f64) -> Result<()> {
    no_cuda(pairs.len(), "EMA")
}

#[cfg(not(feature = "cuda"))]
fn cuda_sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    no_cuda(tensors.len(), "sum of squares").map(|_| 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Backend;
    use candle_core::Device;

    const CHUNK: usize = cpu::CHUNK;

    fn ramp(n: usize, a: f32, b: f32) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| a * ((i as f32) * 0.37).sin() + b).collect();
        Tensor::from_vec(v, n, &Device::Cpu).expect("tensor")
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().expect("vec")
    }

    fn candle() -> KernelPolicy {
        KernelPolicy {
            backend: Backend::Candle,
            ..KernelPolicy::default()
        }
    }

    /// Every in-place op against the same formula evaluated in f64, on a buffer large enough to
    /// run in parallel chunks (with a ragged last chunk) and on a small one.
    #[test]
    fn updates_match_their_formulas() -> Result<()> {
        for n in [7, 3 * CHUNK + 5] {
            let g = ramp(n, 2.0, 0.1);
            let m = ramp(n, 0.5, 0.0);
            let v = ramp(n, 0.3, 0.5).abs()?;
            let p = ramp(n, 1.0, -0.2);
            let (gv, mv, vv, pv) = (vec(&g), vec(&m), vec(&v), vec(&p));

            let m2 = m.copy()?;
            moment_update(&m2, &g, 0.9, 0.5, false)?;
            let v2 = v.copy()?;
            moment_update(&v2, &g, 0.99, 0.5, true)?;
            let up = AdamWUpdate {
                lr: 0.01,
                weight_decay: 0.1,
                bc1: 0.19,
                bc2: 0.0199,
                eps: 1e-8,
            };
            let p2 = p.copy()?;
            p2.inplace_op3(&m2, &v2, &up)?;
            let s2 = m.copy()?;
            ema_update(&s2, &p, 0.995)?;

            let (m2v, v2v, p2v, s2v) = (vec(&m2), vec(&v2), vec(&p2), vec(&s2));
            for i in 0..n {
                let g = gv[i] as f64 * 0.5;
                let want_m = 0.9 * mv[i] as f64 + 0.1 * g;
                let want_v = 0.99 * vv[i] as f64 + 0.01 * g * g;
                let (mh, vh) = (m2v[i] as f64 / 0.19, v2v[i] as f64 / 0.0199);
                let want_p = pv[i] as f64 * (1.0 - 0.001) - 0.01 * mh / (vh.sqrt() + 1e-8);
                let want_s = 0.995 * mv[i] as f64 + 0.005 * pv[i] as f64;
                for (what, got, want) in [
                    ("m", m2v[i], want_m),
                    ("v", v2v[i], want_v),
                    ("p", p2v[i], want_p),
                    ("ema", s2v[i], want_s),
                ] {
                    // A few f32 roundings of values of order 1.
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{what}[{i}] of {n}: {got} vs {want}"
                    );
                }
            }
            let want_sq: f64 = gv.iter().map(|&x| (x as f64).powi(2)).sum();
            let got_sq = sum_of_squares(KernelPolicy::default(), &[&g])?;
            assert!(
                (got_sq - want_sq).abs() <= 1e-6 * want_sq,
                "{got_sq} vs {want_sq}"
            );
        }
        Ok(())
    }

    /// The one-pass AdamW step with its EMA ([`cpu::adamw_step`], what [`adamw`] runs on the
    /// CPU) gives the separate passes' values bit for bit, with and without an average, on a
    /// buffer split into parallel chunks and on a small one.
    #[test]
    fn one_pass_adamw_and_ema_equal_the_separate_passes() -> Result<()> {
        for n in [7, 3 * CHUNK + 5] {
            let g = ramp(n, 2.0, 0.1);
            let (m, v, p) = (
                ramp(n, 0.5, 0.0),
                ramp(n, 0.3, 0.5).abs()?,
                ramp(n, 1.0, -0.2),
            );
            let avg = ramp(n, 0.7, 0.3);
            let step = AdamWStep {
                lr: 0.01,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: 3,
                grad_scale: 0.7,
                ema_decay: Some(0.995),
            };
            // The separate passes.
            let (m1, v1, p1, a1) = (m.copy()?, v.copy()?, p.copy()?, avg.copy()?);
            moment_update(&m1, &g, step.beta1, step.grad_scale, false)?;
            moment_update(&v1, &g, step.beta2, step.grad_scale, true)?;
            p1.inplace_op3(&m1, &v1, &step.update())?;
            ema_update(&a1, &p1, 0.995)?;
            for with_average in [true, false] {
                let (m2, v2, p2, a2) = (m.copy()?, v.copy()?, p.copy()?, avg.copy()?);
                let ema = with_average.then_some((&a2, 0.995));
                cpu::adamw_step(&p2, &m2, &v2, &g, ema, &step)?;
                for (what, got, want) in [("m", &m2, &m1), ("v", &v2, &v1), ("p", &p2, &p1)] {
                    assert_eq!(vec(got), vec(want), "{what} of {n}");
                }
                let want_a = if with_average { vec(&a1) } else { vec(&avg) };
                assert_eq!(vec(&a2), want_a, "average of {n}");
            }
        }
        // Operands of another length are an error, not a panic.
        let short = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        let long = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let step = AdamWStep {
            lr: 0.01,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
            grad_scale: 1.0,
            ema_decay: None,
        };
        let (m, v) = (short.copy()?, short.copy()?);
        assert!(cpu::adamw_step(&long, &m, &v, &short, None, &step).is_err());
        let p = short.copy()?;
        assert!(cpu::adamw_step(&p, &m, &v, &short, Some((&long, 0.9)), &step).is_err());
        Ok(())
    }

    #[test]
    fn views_offsets_and_bad_operands() -> Result<()> {
        // A contiguous view with an offset updates only its own elements.
        let base = Tensor::zeros(10, DType::F32, &Device::Cpu)?;
        let view = base.narrow(0, 4, 3)?;
        ema_update(&view, &Tensor::ones(3, DType::F32, &Device::Cpu)?, 0.5)?;
        assert_eq!(vec(&base), [0., 0., 0., 0., 0.5, 0.5, 0.5, 0., 0., 0.]);
        // Wrong length, wrong dtype and a strided operand are errors, not panics.
        let short = Tensor::ones(2, DType::F32, &Device::Cpu)?;
        assert!(ema_update(&view, &short, 0.5).is_err());
        let f64s = Tensor::ones(3, DType::F64, &Device::Cpu)?;
        assert!(ema_update(&view, &f64s, 0.5).is_err());
        let strided = Tensor::ones((3, 2), DType::F32, &Device::Cpu)?.t()?;
        let dst = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        assert!(ema_update(&dst, &strided, 0.5).is_err());
        assert!(!supported(&KernelPolicy::default(), &[&strided]));
        assert!(!supported(&candle(), &[&dst]));
        assert!(supported(&KernelPolicy::default(), &[&dst]));
        // The fallback takes the strided tensor: 6 ones.
        assert_eq!(sum_of_squares(KernelPolicy::default(), &[&strided])?, 6.0);
        Ok(())
    }

    /// [`adamw`], [`ema`] and [`sum_of_squares`] under our kernels (in place) and under candle's
    /// backend (the tensor-op fallback) give the same values up to f32 rounding, over a few
    /// steps; the in-place path leaves the moments where they are, the fallback replaces them.
    #[test]
    fn policies_agree_on_adamw_ema_and_the_norm() -> Result<()> {
        /// What a run leaves: the variable, the first moment, the average, the summed squared
        /// norms, and whether the moment stayed the same tensor (updated in place).
        type Run = (Vec<f32>, Vec<f32>, Vec<f32>, f64, bool);
        let n = 2 * CHUNK + 3;
        let run = |policy: KernelPolicy| -> Result<Run> {
            let var = Var::from_tensor(&ramp(n, 1.0, -0.2))?;
            let (mut m, mut v) = (
                Tensor::zeros(n, DType::F32, &Device::Cpu)?,
                Tensor::zeros(n, DType::F32, &Device::Cpu)?,
            );
            let mut avg = var.as_tensor().copy()?;
            let m_before = m.clone();
            let mut norm = 0.0;
            for step in 1..=3 {
                let grad = ramp(n, 2.0, 0.1 * step as f32);
                norm += sum_of_squares(policy, &[&grad])?;
                let s = AdamWStep {
                    lr: 1e-2,
                    weight_decay: 0.1,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    step,
                    grad_scale: 0.5,
                    ema_decay: Some(0.9),
                };
                let mut groups = [AdamWGroup {
                    var: &var,
                    m: &mut m,
                    v: &mut v,
                    grad: &grad,
                    average: Some(&mut avg),
                }];
                adamw(policy, &mut groups, &s)?;
            }
            let in_place = m.id() == m_before.id();
            Ok((vec(var.as_tensor()), vec(&m), vec(&avg), norm, in_place))
        };
        let ours = run(KernelPolicy::default())?;
        let theirs = run(candle())?;
        assert!(
            ours.4 && !theirs.4,
            "in place: ours {}, candle {}",
            ours.4,
            theirs.4
        );
        for (what, a, b) in [
            ("p", &ours.0, &theirs.0),
            ("m", &ours.1, &theirs.1),
            ("ema", &ours.2, &theirs.2),
        ] {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                // The same f32 arithmetic in another order: a few roundings of order-1 values.
                assert!(
                    (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                    "{what}[{i}]: {x} vs {y}"
                );
            }
        }
        // f64 sums against f32 sums of 65k terms each.
        assert!(
            (ours.3 - theirs.3).abs() <= 1e-5 * ours.3,
            "{} vs {}",
            ours.3,
            theirs.3
        );
        Ok(())
    }
}
