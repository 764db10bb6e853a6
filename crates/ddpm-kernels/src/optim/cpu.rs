//! The optimizer's updates on the CPU, in place on contiguous f32 buffers: one pass over each
//! buffer, nothing allocated, large buffers split into chunks processed in parallel (rayon).
//!
//! Written with candle's tensor ops ([`super::fallback`]), an AdamW step allocates a dozen
//! temporaries per variable (each a pass over memory) and replaces the moments with new
//! tensors; the EMA three more. These overwrite the moments, the variables and the averages
//! where they are, as PyTorch's `foreach`/fused optimizers do.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk: large enough that a chunk's work dwarfs rayon's scheduling.
pub(crate) const CHUNK: usize = 1 << 15;

/// The elements of a contiguous f32 storage.
pub(crate) fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
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
pub(crate) fn check_len(op: &str, dst: usize, srcs: &[usize]) -> Result<()> {
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
/// writing `dst` in place; errors (naming `name`) for any other operands. The updates here use
/// it, and so does ddpm-train's sampling loop for its in-place step.
pub fn update_in_place(
    name: &'static str,
    dst: &Tensor,
    src: &Tensor,
    f: impl FnMut(&mut [f32], &[f32]),
) -> Result<()> {
    let f = RefCell::new(f);
    dst.inplace_op2(src, &SliceOp { name, f })
}

/// `m <- keep m + take (scale g)` or, with `square`, `(scale g)^2`, in place.
/// `name` names the update in errors.
pub(crate) fn axpby(
    name: &'static str,
    m: &Tensor,
    g: &Tensor,
    [keep, take, scale]: [f64; 3],
    square: bool,
) -> Result<()> {
    let (keep, take, scale) = (keep as f32, take as f32, scale as f32);
    update_in_place(name, m, g, |m, g| {
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

/// AdamW's update of a variable `p` from its moments `m` and `v`, in place, with the factors
/// `[decay, 1 / bc1, 1 / bc2, lr, eps]` (see [`super::AdamWUpdate`]).
pub(crate) fn adamw_update(
    p: &mut [f32],
    m: &[f32],
    v: &[f32],
    [decay, inv_bc1, inv_bc2, lr, eps]: [f32; 5],
) {
    zip2(p, m, v, |p, m, v| {
        let update = (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps);
        *p = *p * decay - update * lr;
    });
}

/// The sum of squares of a contiguous f32 CPU tensor's elements, accumulated in f64; `None` for
/// any other tensor.
pub(crate) fn sum_of_squares(t: &Tensor) -> Option<f64> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let v = values(cpu, layout, "sum-of-squares").ok()?;
    let partial = |c: &[f32]| crate::sum(c, |x| x * x);
    Some(if v.len() >= 2 * CHUNK {
        v.par_chunks(CHUNK).map(partial).sum()
    } else {
        partial(v)
    })
}
