//! The optimizer's updates on the CPU, in place on contiguous f32 buffers: one pass over each
//! buffer, nothing allocated, large buffers split into chunks processed in parallel (rayon).
//!
//! Written with candle's tensor ops ([`super::fallback`]), an AdamW step allocates a dozen
//! temporaries per variable (each a pass over memory) and replaces the moments with new
//! tensors; the EMA three more. These overwrite the moments, the variables and the averages
//! where they are, as PyTorch's `foreach`/fused optimizers do.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel chunk: large enough that a chunk's work dwarfs rayon's scheduling.
pub(crate) const CHUNK: usize = 1 << 15;

/// Tensors of at least twice this many elements are updated in parallel chunks of this many
/// (for tests of both paths).
pub const CHUNK_LEN: usize = CHUNK;

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

/// An in-place op over a destination alone, given as a function of its slice (for
/// [`adamw_step`], which writes four tensors: each is taken through one of these, nested).
struct SliceMutOp<F> {
    name: &'static str,
    // `InplaceOp1::cpu_fwd` takes `&self`; the cell lets `f` be `FnMut` (it is called once).
    f: RefCell<F>,
}

impl<F: FnMut(&mut [f32]) -> Result<()>> InplaceOp1 for SliceMutOp<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let dst = values_mut(s, l, self.name)?;
        (self.f.borrow_mut())(dst)
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, writable in place; errors (naming
/// `name`) for any other tensor.
fn with_values_mut(
    name: &'static str,
    t: &Tensor,
    f: impl FnMut(&mut [f32]) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&SliceMutOp {
        name,
        f: RefCell::new(f),
    })
}

/// One AdamW step of a variable `p` with its moments `m` and `v` and its gradient `g`, and with
/// `ema = Some((average, decay))` one EMA step of its average towards the new value, in one
/// parallel pass over the five buffers, in place (contiguous f32 CPU tensors of one size, each
/// with its own storage: a storage passed twice would wait for its own lock forever). The
/// values are bit for bit those of the separate passes ([`axpby`] for each moment, then
/// [`adamw_update`], then [`axpby`] for the average), which read the weights, moments and
/// gradient three times and the new weights once more: a tenth of a `learnopencv` training
/// step on a 2-core CPU (docs/benchmarks.md, "Kernel decisions").
pub(crate) fn adamw_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    ema: Option<(&Tensor, f64)>,
    step: &super::AdamWStep,
) -> Result<()> {
    const NAME: &str = "adamw-step";
    let scale = step.grad_scale as f32;
    let (b1, b1c) = (step.beta1 as f32, (1.0 - step.beta1) as f32);
    let (b2, b2c) = (step.beta2 as f32, (1.0 - step.beta2) as f32);
    let [decay, inv_bc1, inv_bc2, lr, eps] = step.update().factors();
    let (keep, take) = ema.map_or((0.0, 0.0), |(_, d)| (d as f32, (1.0 - d) as f32));
    // One element of every buffer: the moments, the weight, then the average (if any).
    let one = |p: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
        let gs = g * scale;
        *m = *m * b1 + gs * b1c;
        *v = *v * b2 + gs * gs * b2c;
        let update = (*m * inv_bc1) / ((*v * inv_bc2).sqrt() + eps);
        *p = *p * decay - update * lr;
    };
    let mut result = Ok(());
    update_in_place(NAME, m, g, |m, g| {
        result = with_values_mut(NAME, v, |v| {
            with_values_mut(NAME, p, |p| {
                check_len(NAME, p.len(), &[m.len(), v.len()])?;
                let Some((average, _)) = ema else {
                    zip4(p, m, v, g, None, |p, m, v, g, _| one(p, m, v, g));
                    return Ok(());
                };
                with_values_mut(NAME, average, |a| {
                    check_len(NAME, p.len(), &[a.len()])?;
                    zip4(p, m, v, g, Some(a), |p, m, v, g, a| {
                        one(p, m, v, g);
                        if let Some(a) = a {
                            *a = *a * keep + *p * take;
                        }
                    });
                    Ok(())
                })
            })
        });
    })?;
    result
}

/// Matching chunks of [`zip4`]'s buffers: `((p, m), v)`, `g` and `a`.
type Chunks<'a> = (
    ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]),
    &'a [f32],
    Option<&'a mut [f32]>,
);

/// `f(p[i], m[i], v[i], g[i], a[i])` for every i (`a` absent: `None`), in parallel chunks.
fn zip4(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    a: Option<&mut [f32]>,
    f: impl Fn(&mut f32, &mut f32, &mut f32, f32, Option<&mut f32>) + Sync,
) {
    let body = |(((p, m), v), g, a): Chunks<'_>| match a {
        Some(a) => {
            for ((((p, m), v), &g), a) in p.iter_mut().zip(m).zip(v).zip(g).zip(a) {
                f(p, m, v, g, Some(a));
            }
        }
        None => {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                f(p, m, v, g, None);
            }
        }
    };
    let n = p.len();
    if n < 2 * CHUNK {
        body((((p, m), v), g, a));
        return;
    }
    let chunks = p
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK));
    match a {
        Some(a) => chunks
            .zip(g.par_chunks(CHUNK))
            .zip(a.par_chunks_mut(CHUNK))
            .for_each(|((pmv, g), a)| body((pmv, g, Some(a)))),
        None => chunks
            .zip(g.par_chunks(CHUNK))
            .for_each(|(pmv, g)| body((pmv, g, None))),
    }
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
