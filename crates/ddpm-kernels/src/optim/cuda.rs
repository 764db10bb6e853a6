//! The optimizer's updates on CUDA, in place on f32 (master weights, moments, averages): AdamW
//! ([`adamw_update`], and [`adamw_multi`] for all variables in one launch), the moments' and
//! the EMA's `keep * dst + take * f(src)` ([`Axpby`], [`axpby_multi`]) and the gradient norm's
//! sum of squares ([`sum_of_squares`]), as PyTorch's `foreach`/fused optimizers do. ddpm-train's
//! optimizer and EMA call them directly; the kernels are in `kernels.cu` here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Tensor};

use crate::cuda::{elementwise, MODULE, PTX};

/// The f32 slice of a contiguous CUDA storage, or an error naming `what`.
fn f32_slice<'a>(s: &'a CudaStorage, what: &str) -> Result<&'a CudaSlice<f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: needs an f32 tensor, got {:?}", s.dtype()),
    }
}

/// `(start, len)` of a contiguous layout of `n` elements, or an error naming `what`.
fn span(l: &Layout, n: Option<usize>, what: &str) -> Result<(usize, usize)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: needs a contiguous tensor");
    };
    if n.is_some_and(|n| n != b - a) {
        candle_core::bail!(
            "{what}: operand of {} elements for a destination of {n:?}",
            b - a
        );
    }
    // The kernels' 32-bit grid-stride index must not wrap: n plus one grid (at most 2^24
    // threads, see `elementwise`) stays below 2^32.
    if b - a > (u32::MAX as usize) - (1 << 24) {
        candle_core::bail!("{what}: tensors over 2^32 - 2^24 elements are not supported");
    }
    Ok((a, b - a))
}

/// In place on f32: `dst = keep * dst + take * f(scale * src)`, `f` the square when `square`
/// (AdamW's second moment), else the identity (its first moment, the EMA).
#[derive(Debug, Clone, Copy)]
pub struct Axpby {
    /// Factor of the old value.
    pub keep: f32,
    /// Factor of the new term.
    pub take: f32,
    /// Factor of the source before `f`.
    pub scale: f32,
    /// Square the scaled source.
    pub square: bool,
}

impl candle_core::InplaceOp2 for Axpby {
    fn name(&self) -> &'static str {
        "ddpm-axpby"
    }
    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("ddpm-axpby is a CUDA kernel (the CPU has its own in-place updates)")
    }
    fn cuda_fwd(
        &self,
        d: &mut CudaStorage,
        ld: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<()> {
        let (d0, n) = span(ld, None, self.name())?;
        let (s0, _) = span(ls, Some(n), self.name())?;
        let dev = d.device().clone();
        let func = dev.get_or_load_custom_func("axpby_f32", MODULE, PTX)?;
        let src = f32_slice(s, self.name())?.slice(s0..s0 + n);
        let CudaStorageSlice::F32(dst) = &mut d.slice else {
            candle_core::bail!("{}: needs an f32 destination", self.name());
        };
        let mut dst = dst.slice_mut(d0..d0 + n);
        let (n32, square) = (n as u32, self.square as i32);
        let mut launch = func.builder();
        launch.arg(&mut dst).arg(&src).arg(&n32);
        launch
            .arg(&self.keep)
            .arg(&self.take)
            .arg(&self.scale)
            .arg(&square);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { launch.launch(elementwise(n)) }.w()?;
        Ok(())
    }
}

/// AdamW's in-place update of f32 variables `p` from the moments `m`, `v`:
/// `p = p * decay - lr * (m * inv_bc1) / (sqrt(v * inv_bc2) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    p: &mut CudaStorage,
    lp: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    [decay, inv_bc1, inv_bc2, lr, eps]: [f32; 5],
) -> Result<()> {
    let what = "adamw-update";
    let (p0, n) = span(lp, None, what)?;
    let (m0, _) = span(lm, Some(n), what)?;
    let (v0, _) = span(lv, Some(n), what)?;
    let dev = p.device().clone();
    let func = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
    let mv = f32_slice(m, what)?.slice(m0..m0 + n);
    let vv = f32_slice(v, what)?.slice(v0..v0 + n);
    let CudaStorageSlice::F32(ps) = &mut p.slice else {
        candle_core::bail!("{what}: needs f32 variables");
    };
    let mut pv = ps.slice_mut(p0..p0 + n);
    let n32 = n as u32;
    let mut launch = func.builder();
    launch.arg(&mut pv).arg(&mv).arg(&vv).arg(&n32);
    launch
        .arg(&decay)
        .arg(&inv_bc1)
        .arg(&inv_bc2)
        .arg(&lr)
        .arg(&eps);
    // SAFETY: the arguments match the kernel's signature in kernels.cu.
    unsafe { launch.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// One group of tensors of a multi-tensor kernel (kernels.cu's `Slot`): up to four f32
/// tensors of `n` elements, and the first thread block that works on them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    ptr: [u64; 4],
    n: u32,
    first_block: u32,
}

// SAFETY: plain data laid out as kernels.cu's `Slot` (four u64, two u32; repr(C)).
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Slot {}

/// Elements per thread block of the multi-tensor kernels (kernels.cu's `MULTI_CHUNK`).
const MULTI_CHUNK: usize = 4096;

/// The device address of the first element of a contiguous f32 CUDA tensor, and its length.
fn f32_address(t: &Tensor, what: &str) -> Result<(u64, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("{what}: expected CUDA tensors, got one on {:?}", t.device());
    };
    let (start, n) = span(layout, None, what)?;
    let slice = f32_slice(s, what)?;
    let stream = s.device.cuda_stream();
    let (ptr, _guard) = slice.device_ptr(&stream);
    Ok((ptr + (start * std::mem::size_of::<f32>()) as u64, n))
}

/// The slots of `groups` (each group's tensors of one length; empty groups left out) on the
/// device of the first tensor, and the thread blocks they take.
fn slots<const K: usize>(
    groups: &[[&Tensor; K]],
    what: &str,
) -> Result<Option<(candle_core::CudaDevice, CudaSlice<Slot>, usize)>> {
    let Some(first) = groups.first() else {
        return Ok(None);
    };
    let candle_core::Device::Cuda(dev) = first[0].device() else {
        candle_core::bail!("{what}: expected CUDA tensors");
    };
    let mut out = Vec::with_capacity(groups.len());
    let mut blocks = 0usize;
    for group in groups {
        let mut slot = Slot::default();
        for (i, t) in group.iter().enumerate() {
            if !t.device().same_device(first[0].device()) {
                candle_core::bail!("{what}: tensors on different devices");
            }
            let (ptr, n) = f32_address(t, what)?;
            if i > 0 && n != slot.n as usize {
                candle_core::bail!(
                    "{what}: tensors of {} and {n} elements in one group",
                    slot.n
                );
            }
            slot.ptr[i] = ptr;
            slot.n = n as u32;
        }
        if slot.n == 0 {
            continue;
        }
        slot.first_block = blocks as u32;
        blocks += (slot.n as usize).div_ceil(MULTI_CHUNK);
        out.push(slot);
    }
    if out.is_empty() {
        return Ok(None);
    }
    if blocks > i32::MAX as usize {
        candle_core::bail!("{what}: {blocks} thread blocks is outside CUDA's grid");
    }
    let slots = dev.clone_htod(&out)?;
    Ok(Some((dev.clone(), slots, blocks)))
}

/// A launch of `blocks` blocks of 256 threads (the multi-tensor kernels).
fn multi_config(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The sum of the squares of all elements of `tensors` (contiguous f32 CUDA tensors of one
/// device), in f64: one kernel for all of them writes per-block partial sums, read back once
/// and added on the host in a fixed order (the same result every run), instead of a square, a
/// `sum_all` and a stack per gradient.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    let groups: Vec<[&Tensor; 1]> = tensors.iter().map(|&t| [t]).collect();
    let Some((dev, slots, blocks)) = self::slots(&groups, "sum-of-squares")? else {
        return Ok(0.0);
    };
    let func = dev.get_or_load_custom_func("sumsq_multi_f32", MODULE, PTX)?;
    // SAFETY: every block writes its partial.
    let partials = unsafe { dev.alloc::<f64>(blocks)? };
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&partials);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds, and one partial per block.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(dev.clone_dtoh(&partials)?.iter().sum())
}

/// AdamW's factors for one step of [`adamw_multi`], in f32 as the kernels use them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWFactors {
    /// Multiplies every gradient first (the clipping factor).
    pub scale: f32,
    /// beta1 and 1 - beta1.
    pub first: [f32; 2],
    /// beta2 and 1 - beta2.
    pub second: [f32; 2],
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `1 / (1 - beta1^t)`.
    pub inv_bc1: f32,
    /// `1 / (1 - beta2^t)`.
    pub inv_bc2: f32,
    /// The learning rate.
    pub lr: f32,
    /// Added to the denominator.
    pub eps: f32,
}

/// One AdamW step for every group `[p, m, v, g]` (contiguous f32 CUDA tensors) in one kernel
/// launch: the moments and the variables are overwritten where they are, with the arithmetic
/// of [`Axpby`] (for m, then v) followed by [`adamw_update`].
///
/// `p`, `m` and `v` are written although only read access to them is taken: they must be the
/// caller's own buffers (an optimizer's variables and moments), not shared with other tensors.
pub fn adamw_multi(groups: &[[&Tensor; 4]], f: &AdamWFactors) -> Result<()> {
    let Some((dev, slots, blocks)) = slots(groups, "adamw-multi")? else {
        return Ok(());
    };
    let func = dev.get_or_load_custom_func("adamw_multi_f32", MODULE, PTX)?;
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&f.scale);
    launch.arg(&f.first[0]).arg(&f.first[1]);
    launch.arg(&f.second[0]).arg(&f.second[1]);
    launch.arg(&f.decay).arg(&f.inv_bc1).arg(&f.inv_bc2);
    launch.arg(&f.lr).arg(&f.eps);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(())
}

/// `dst = keep * dst + take * src` for every pair `[dst, src]` (contiguous f32 CUDA tensors) in
/// one kernel launch: an EMA of all variables. `dst` is written although only read access is
/// taken: it must be the caller's own buffer.
pub fn axpby_multi(pairs: &[[&Tensor; 2]], keep: f32, take: f32) -> Result<()> {
    let Some((dev, slots, blocks)) = slots(pairs, "axpby-multi")? else {
        return Ok(());
    };
    let func = dev.get_or_load_custom_func("axpby_multi_f32", MODULE, PTX)?;
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&keep).arg(&take);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::{gpu, randn, rel_err};

    /// [`adamw_update`] as an in-place op, for the test.
    struct AdamW([f32; 5]);

    impl candle_core::InplaceOp3 for AdamW {
        fn name(&self) -> &'static str {
            "test-adamw"
        }
        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            unreachable!("CUDA only")
        }
        fn cuda_fwd(
            &self,
            p: &mut CudaStorage,
            lp: &Layout,
            m: &CudaStorage,
            lm: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<()> {
            adamw_update(p, lp, m, lm, v, lv, self.0)
        }
    }

    /// The moments, the EMA and AdamW's update in place on CUDA against the formulas evaluated
    /// with tensor ops on the CPU (on a narrowed view, so offsets are exercised too).
    #[test]
    fn optimizer_updates_match_the_formulas() {
        let Some(dev) = gpu() else { return };
        let n = 70_001;
        let (pc, gc) = (randn(&[n + 5], 10), randn(&[n], 11));
        let (mc, vc) = (randn(&[n], 12), randn(&[n], 13).abs().unwrap());
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let (p, g, m, v) = (on(&pc), on(&gc), on(&mc), on(&vc));
        let p_view = p.narrow(0, 5, n).unwrap();
        let axpby = |keep: f32, take: f32, scale: f32, square: bool| Axpby {
            keep,
            take,
            scale,
            square,
        };
        m.inplace_op2(&g, &axpby(0.9, 0.1, 0.5, false)).unwrap();
        v.inplace_op2(&g, &axpby(0.99, 0.01, 0.5, true)).unwrap();
        let params = [0.999f32, 1.0 / 0.1, 1.0 / 0.01, 1e-3, 1e-8];
        p_view.inplace_op3(&m, &v, &AdamW(params)).unwrap();
        let g_half = (&gc * 0.5).unwrap();
        let m_ref = ((&mc * 0.9).unwrap() + (&g_half * 0.1).unwrap()).unwrap();
        let v_ref = ((&vc * 0.99).unwrap() + (g_half.sqr().unwrap() * 0.01).unwrap()).unwrap();
        let update = ((&m_ref * 10.0).unwrap()
            / ((&v_ref * 100.0).unwrap().sqrt().unwrap() + 1e-8).unwrap())
        .unwrap();
        let p_ref =
            ((pc.narrow(0, 5, n).unwrap() * 0.999).unwrap() - (update * 1e-3).unwrap()).unwrap();
        assert!(rel_err(&m, &m_ref) < 1e-6, "m {}", rel_err(&m, &m_ref));
        assert!(rel_err(&v, &v_ref) < 1e-6, "v {}", rel_err(&v, &v_ref));
        assert!(
            rel_err(&p_view, &p_ref) < 1e-6,
            "p {}",
            rel_err(&p_view, &p_ref)
        );
        // The 5 elements before the view are untouched.
        assert_eq!(
            rel_err(&p.narrow(0, 0, 5).unwrap(), &pc.narrow(0, 0, 5).unwrap()),
            0.0
        );
    }

    /// The gradient norm's sum of squares against f64 sums on the CPU, over several tensors
    /// (one of them a view with an offset, one of a single element).
    #[test]
    fn sum_of_squares_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let cpu = [randn(&[3, 1000], 20), randn(&[70_001], 21), randn(&[1], 22)];
        let on: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&dev).unwrap()).collect();
        let view = on[1].narrow(0, 7, 60_000).unwrap();
        let sq = |t: &Tensor| -> f64 {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|&x| x as f64 * x as f64).sum()
        };
        let expected = sq(&cpu[0]) + sq(&cpu[1].narrow(0, 7, 60_000).unwrap()) + sq(&cpu[2]);
        let got = sum_of_squares(&[&on[0], &view, &on[2]]).unwrap();
        assert!(
            (got - expected).abs() <= 1e-12 * expected,
            "sum of squares {got} vs {expected}"
        );
        assert_eq!(sum_of_squares(&[]).unwrap(), 0.0);
    }

    /// The multi-tensor AdamW and EMA kernels against the single-tensor kernels, over tensors
    /// of several sizes (one of a single element, one not a whole number of chunks).
    #[test]
    fn multi_tensor_updates_match_the_single_tensor_kernels() {
        let Some(dev) = gpu() else { return };
        let sizes = [70_001usize, 4096, 1, 9000];
        let make = |seed: u64| -> Vec<Tensor> {
            let on = |(i, &n): (usize, &usize)| randn(&[n], seed + i as u64).to_device(&dev);
            sizes.iter().enumerate().map(|x| on(x).unwrap()).collect()
        };
        let copy =
            |ts: &[Tensor]| -> Vec<Tensor> { ts.iter().map(|t| t.copy().unwrap()).collect() };
        let (p1, g, m1) = (make(100), make(200), make(300));
        let v1: Vec<Tensor> = make(400).iter().map(|t| t.abs().unwrap()).collect();
        let (p2, m2, v2) = (copy(&p1), copy(&m1), copy(&v1));
        let axpby = |keep: f32, take: f32, scale: f32, square: bool| Axpby {
            keep,
            take,
            scale,
            square,
        };
        for i in 0..sizes.len() {
            m1[i]
                .inplace_op2(&g[i], &axpby(0.9, 0.1, 0.5, false))
                .unwrap();
            v1[i]
                .inplace_op2(&g[i], &axpby(0.99, 0.01, 0.5, true))
                .unwrap();
            let params = [0.999f32, 10.0, 100.0, 1e-3, 1e-8];
            p1[i].inplace_op3(&m1[i], &v1[i], &AdamW(params)).unwrap();
        }
        let f = AdamWFactors {
            scale: 0.5,
            first: [0.9, 0.1],
            second: [0.99, 0.01],
            decay: 0.999,
            inv_bc1: 10.0,
            inv_bc2: 100.0,
            lr: 1e-3,
            eps: 1e-8,
        };
        let groups: Vec<[&Tensor; 4]> = (0..sizes.len())
            .map(|i| [&p2[i], &m2[i], &v2[i], &g[i]])
            .collect();
        adamw_multi(&groups, &f).unwrap();
        for i in 0..sizes.len() {
            for (name, a, b) in [("p", &p2, &p1), ("m", &m2, &m1), ("v", &v2, &v1)] {
                let e = rel_err(&a[i], &b[i]);
                assert!(e < 1e-6, "adamw-multi {name} of size {}: {e}", sizes[i]);
            }
        }
        let (e1, e2) = (make(500), make(500));
        for i in 0..sizes.len() {
            e1[i]
                .inplace_op2(&p1[i], &axpby(0.95, 0.05, 1.0, false))
                .unwrap();
        }
        let pairs: Vec<[&Tensor; 2]> = (0..sizes.len()).map(|i| [&e2[i], &p1[i]]).collect();
        axpby_multi(&pairs, 0.95, 0.05).unwrap();
        for i in 0..sizes.len() {
            let e = rel_err(&e2[i], &e1[i]);
            assert!(e < 1e-6, "axpby-multi of size {}: {e}", sizes[i]);
        }
    }
}
