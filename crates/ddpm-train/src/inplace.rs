//! In-place CPU updates for the optimizer and the EMA: one pass over each buffer, nothing
//! allocated.
//!
//! Written with candle's tensor ops, an AdamW step allocates a dozen temporaries per variable
//! (each a pass over memory) and replaces the moments with new tensors; the EMA three more. The
//! ops here overwrite the moments, the variables and the averages where they are, as PyTorch's
//! `foreach`/fused optimizers do. They apply to f32 tensors on the CPU and, in a `cuda` build,
//! on CUDA (our kernels in `ddpm_unet::kernels::optim::cuda`) ([`supported`]); elsewhere the
//! callers keep the tensor-op path.
//!
//! Large buffers are split into chunks processed in parallel (rayon), so the update uses every
//! core the user gave.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use ddpm_unet::kernels::sum;
use ddpm_unet::ops::Kernels;
use rayon::prelude::*;

/// Elements per parallel chunk: large enough that a chunk's work dwarfs rayon's scheduling.
const CHUNK: usize = 1 << 15;

/// Whether the in-place kernels apply to all of `tensors`: contiguous f32 tensors on the CPU,
/// or on CUDA where our CUDA kernels are on ([`ddpm_unet::kernels::cuda_supported`]), unless
/// a [`ddpm_unet::KernelPolicy`] with the candle backend asks for candle's ops everywhere.
pub fn supported(tensors: &[&Tensor]) -> bool {
    ddpm_unet::ops::kernels() == Kernels::Ours
        && tensors.iter().all(|t| {
            t.dtype() == DType::F32
                && t.is_contiguous()
                && (t.device().is_cpu()
                    || (cfg!(feature = "cuda") && ddpm_unet::kernels::cuda_supported(t)))
        })
}

/// `dst = keep * dst + take * f(scale * src)` in place on CUDA (`f` the square when `square`).
#[cfg(feature = "cuda")]
fn cuda_axpby(
    dst: &Tensor,
    src: &Tensor,
    [keep, take, scale]: [f64; 3],
    square: bool,
) -> Result<()> {
    let op = ddpm_unet::kernels::optim::cuda::Axpby {
        keep: keep as f32,
        take: take as f32,
        scale: scale as f32,
        square,
    };
    dst.inplace_op2(src, &op)
}

/// Without the `cuda` feature there are no CUDA tensors to update.
#[cfg(not(feature = "cuda"))]
fn cuda_axpby(dst: &Tensor, _: &Tensor, _: [f64; 3], _: bool) -> Result<()> {
    bail!(
        "in-place update of a {:?} tensor in a build without CUDA",
        dst.device()
    )
}

/// The elements of a contiguous f32 storage.
fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: needs a contiguous f32 tensor on the CPU"),
    }
}

/// The elements of a contiguous f32 storage, writable.
fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("{op}: needs a contiguous f32 tensor on the CPU"),
    }
}

/// Errors unless every operand has as many elements as the destination.
fn check_len(op: &str, dst: usize, srcs: &[usize]) -> Result<()> {
    if let Some(n) = srcs.iter().find(|&&n| n != dst) {
        bail!("{op}: operand of {n} elements for a destination of {dst}");
    }
    Ok(())
}

/// The elements of an in-place op's destination and of its one source, which must have as many.
pub(crate) fn operands<'a>(
    op: &str,
    (dst, dst_l): (&'a mut CpuStorage, &Layout),
    (src, src_l): (&'a CpuStorage, &Layout),
) -> Result<(&'a mut [f32], &'a [f32])> {
    let d = values_mut(dst, dst_l, op)?;
    let s = values(src, src_l, op)?;
    check_len(op, d.len(), &[s.len()])?;
    Ok((d, s))
}

/// `f(dst[i], a[i])` for every i, in parallel chunks.
fn zip1(dst: &mut [f32], a: &[f32], f: impl Fn(&mut f32, f32) + Sync) {
    let body = |(d, a): (&mut [f32], &[f32])| {
        for (d, &a) in d.iter_mut().zip(a) {
            f(d, a);
        }
    };
    if dst.len() >= 2 * CHUNK {
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(body);
    } else {
        body((dst, a));
    }
}

/// `f(dst[i], a[i], b[i])` for every i, in parallel chunks.
fn zip2(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(&mut f32, f32, f32) + Sync) {
    let body = |((d, a), b): ((&mut [f32], &[f32]), &[f32])| {
        for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
            f(d, a, b);
        }
    };
    if dst.len() >= 2 * CHUNK {
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(body);
    } else {
        body(((dst, a), b));
    }
}

/// An in-place op over a destination and one source of f32 elements, given as a function of
/// their slices: the one `InplaceOp2` implementation behind the updates here (and the sampling
/// loop's step).
struct SliceOp<F> {
    name: &'static str,
    // `InplaceOp2::cpu_fwd` takes `&self`; the cell lets `f` be `FnMut` (it is called once).
    f: RefCell<F>,
}

impl<F: FnMut(&mut [f32], &[f32])> InplaceOp2 for SliceOp<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (dst, src) = operands(self.name, (s1, l1), (s2, l2))?;
        (self.f.borrow_mut())(dst, src);
        Ok(())
    }
}

/// Runs `f(dst, src)` over the elements of two contiguous f32 CPU tensors of equal size,
/// writing `dst` in place; errors (naming `name`) for any other operands.
pub fn update_in_place(
    name: &'static str,
    dst: &Tensor,
    src: &Tensor,
    f: impl FnMut(&mut [f32], &[f32]),
) -> Result<()> {
    let f = RefCell::new(f);
    dst.inplace_op2(src, &SliceOp { name, f })
}

/// Updates an exponential moving average of a gradient (or of its square) in place:
/// `m <- decay m + (1 - decay) (scale g)` or, with `square`, `(scale g)^2`.
pub fn moment_update(m: &Tensor, g: &Tensor, decay: f64, scale: f64, square: bool) -> Result<()> {
    if !m.device().is_cpu() {
        return cuda_axpby(m, g, [decay, 1.0 - decay, scale], square);
    }
    let (keep, take, scale) = (decay as f32, (1.0 - decay) as f32, scale as f32);
    update_in_place("adamw-moment", m, g, |m, g| {
        if square {
            zip1(m, g, |m, g| {
                let g = g * scale;
                *m = *m * keep + g * g * take;
            });
        } else {
            zip1(m, g, |m, g| *m = *m * keep + g * scale * take);
        }
    })
}

/// AdamW's update of a variable from its moments, in place:
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

impl InplaceOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m) = operands(self.name(), (s1, l1), (s2, l2))?;
        let v = values(s3, l3, self.name())?;
        check_len(self.name(), p.len(), &[v.len()])?;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let (inv_bc1, inv_bc2) = ((1.0 / self.bc1) as f32, (1.0 / self.bc2) as f32);
        let (lr, eps) = (self.lr as f32, self.eps as f32);
        zip2(p, m, v, |p, m, v| {
            let update = (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps);
            *p = *p * decay - update * lr;
        });
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
        let params = [
            (1.0 - self.lr * self.weight_decay) as f32,
            (1.0 / self.bc1) as f32,
            (1.0 / self.bc2) as f32,
            self.lr as f32,
            self.eps as f32,
        ];
        ddpm_unet::kernels::optim::cuda::adamw_update(s1, l1, s2, l2, s3, l3, params)
    }
}

/// One step of an exponential moving average, in place: `s <- decay s + (1 - decay) p`.
pub fn ema_update(s: &Tensor, p: &Tensor, decay: f64) -> Result<()> {
    if !s.device().is_cpu() {
        return cuda_axpby(s, p, [decay, 1.0 - decay, 1.0], false);
    }
    let (keep, take) = (decay as f32, (1.0 - decay) as f32);
    update_in_place("ema-update", s, p, |s, p| {
        zip1(s, p, |s, p| *s = *s * keep + p * take)
    })
}

/// Whether the multi-tensor CUDA kernels take all of `tensors` (one launch for all variables:
/// [`cuda_sum_of_squares`], [`cuda_adamw`], [`cuda_ema`]): CUDA tensors that [`supported`]
/// takes, with the later CUDA kernels on (`ddpm_unet::kernels::cuda::extended`).
pub fn cuda_multi(tensors: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    {
        ddpm_unet::kernels::cuda::extended()
            && tensors.iter().all(|t| t.device().is_cuda())
            && supported(tensors)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = tensors;
        false
    }
}

/// Fails for CUDA work in a build without CUDA (only empty lists are accepted).
#[cfg(not(feature = "cuda"))]
fn no_cuda(len: usize, what: &str) -> Result<()> {
    if len > 0 {
        bail!("{what} of CUDA tensors in a build without CUDA");
    }
    Ok(())
}

/// The sum of squares of the elements of all of `tensors` (taken by [`cuda_multi`]),
/// accumulated in f64 with one read-back for all of them (our CUDA kernel).
pub fn cuda_sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    return ddpm_unet::kernels::optim::cuda::sum_of_squares(tensors);
    #[cfg(not(feature = "cuda"))]
    no_cuda(tensors.len(), "sum of squares").map(|_| 0.0)
}

/// One AdamW step of every group `[p, m, v, g]` (taken by [`cuda_multi`]) in one CUDA kernel,
/// with the values of [`moment_update`] (twice) and [`AdamWUpdate`]; `grad_scale` multiplies
/// the gradients first. `p`, `m` and `v` are overwritten in place.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn cuda_adamw(
    groups: &[[&Tensor; 4]],
    update: &AdamWUpdate,
    [beta1, beta2]: [f64; 2],
    grad_scale: f64,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let f = ddpm_unet::kernels::optim::cuda::AdamWFactors {
            scale: grad_scale as f32,
            first: [beta1 as f32, (1.0 - beta1) as f32],
            second: [beta2 as f32, (1.0 - beta2) as f32],
            decay: (1.0 - update.lr * update.weight_decay) as f32,
            inv_bc1: (1.0 / update.bc1) as f32,
            inv_bc2: (1.0 / update.bc2) as f32,
            lr: update.lr as f32,
            eps: update.eps as f32,
        };
        ddpm_unet::kernels::optim::cuda::adamw_multi(groups, &f)
    }
    #[cfg(not(feature = "cuda"))]
    no_cuda(groups.len(), "AdamW")
}

/// One EMA step `s <- decay s + (1 - decay) p` of every pair `[s, p]` (taken by
/// [`cuda_multi`]) in one CUDA kernel, as [`ema_update`].
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn cuda_ema(pairs: &[[&Tensor; 2]], decay: f64) -> Result<()> {
    #[cfg(feature = "cuda")]
    return ddpm_unet::kernels::optim::cuda::axpby_multi(pairs, decay as f32, (1.0 - decay) as f32);
    #[cfg(not(feature = "cuda"))]
    no_cuda(pairs.len(), "EMA")
}

/// The sum of squares of a tensor's elements, accumulated in f64; `None` unless [`supported`]
/// (then the caller computes it with tensor ops).
pub fn sum_of_squares(t: &Tensor) -> Option<f64> {
    if !supported(&[t]) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let v = values(cpu, layout, "sum-of-squares").ok()?;
    let partial = |c: &[f32]| sum(c, |x| x * x);
    Some(if v.len() >= 2 * CHUNK {
        v.par_chunks(CHUNK).map(partial).sum()
    } else {
        partial(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(n: usize, a: f32, b: f32) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| a * ((i as f32) * 0.37).sin() + b).collect();
        Tensor::from_vec(v, n, &Device::Cpu).expect("tensor")
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().expect("vec")
    }

    /// Every op against the same formula evaluated in f64, on a buffer large enough to run in
    /// parallel chunks (with a ragged last chunk) and on a small one.
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
            let got_sq = sum_of_squares(&g).expect("supported");
            assert!(
                (got_sq - want_sq).abs() <= 1e-6 * want_sq,
                "{got_sq} vs {want_sq}"
            );
        }
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
        assert!(!supported(&[&strided]));
        assert_eq!(sum_of_squares(&strided), None);
        Ok(())
    }
}
