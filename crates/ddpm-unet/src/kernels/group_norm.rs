//! GroupNorm with a per-channel affine, forward and backward in one pass each over the data,
//! split over (image, group) pairs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, Float};

#[derive(Debug, Clone, Copy)]
struct Geom {
    c: usize,
    hw: usize,
    groups: usize,
}

impl Geom {
    fn new(dims: &[usize], groups: usize) -> Result<Self> {
        if dims.len() < 2 {
            candle_core::bail!("group_norm: expected (b, c, ...), got {dims:?}");
        }
        let c = dims[1];
        if groups == 0 || !c.is_multiple_of(groups) {
            candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
        }
        Ok(Self {
            c,
            hw: dims[2..].iter().product(),
            groups,
        })
    }
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn group_len(&self) -> usize {
        self.cg() * self.hw
    }
}

/// Mean and reciprocal standard deviation of one group, accumulated in f64.
fn stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| v.f64()).sum::<f64>() / n;
    let var = x.iter().map(|v| (v.f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// SiLU and its derivative at `h`, in the element type's precision (an f64 exponential per
/// element would cost more than the rest of the pass).
fn silu_and_grad<T: Float>(h: T) -> (T, T) {
    let s = T::ONE / (T::ONE + (T::ZERO - h).exp());
    (h * s, s * (T::ONE + h * (T::ONE - s)))
}

/// `y = act((x - mean) * rstd * a[i, c] + d[i, c])` per image `i` and channel `c`.
fn forward<T: Float>(g: &Geom, x: &[T], a: &[T], d: &[T], eps: f64, silu: bool) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .enumerate()
        .for_each(|(i, (ys, xs))| {
            let (img, grp) = (i / g.groups, i % g.groups);
            let (mean, rstd) = stats(xs, eps);
            let (mean, rstd) = (T::of(mean), T::of(rstd));
            for cl in 0..g.cg() {
                let ic = img * g.c + grp * g.cg() + cl;
                let (scale, shift) = (a[ic] * rstd, d[ic]);
                let r = cl * g.hw..(cl + 1) * g.hw;
                for (yv, &xv) in ys[r.clone()].iter_mut().zip(&xs[r]) {
                    let h = (xv - mean) * scale + shift;
                    *yv = if silu { silu_and_grad(h).0 } else { h };
                }
            }
        });
    y
}

/// `[dx | da | dd]` packed, `da` and `dd` per (image, channel).
fn backward<T: Float>(
    g: &Geom,
    x: &[T],
    a: &[T],
    d: &[T],
    dy: &[T],
    eps: f64,
    silu: bool,
) -> Vec<T> {
    let bc = x.len() / g.hw;
    let mut out = vec![T::ZERO; x.len() + 2 * bc];
    let (dx, rest) = out.split_at_mut(x.len());
    // Per (image, channel): sum(dh * xhat) and sum(dh), dh the gradient before the activation.
    let per_group: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .zip(dy.par_chunks(g.group_len()))
        .enumerate()
        .map(|(i, ((dxs, xs), dys))| {
            let (img, grp) = (i / g.groups, i % g.groups);
            let (mean, rstd) = stats(xs, eps);
            let n = xs.len() as f64;
            let mut chan = Vec::with_capacity(g.cg());
            // Sums over the group of dxhat and dxhat * xhat, dxhat = dh * a.
            let (mut s1, mut s2) = (0f64, 0f64);
            for cl in 0..g.cg() {
                let ic = img * g.c + grp * g.cg() + cl;
                let (am, dm) = (a[ic].f64(), d[ic].f64());
                let (mut sdhx, mut sdh) = (0f64, 0f64);
                let r = cl * g.hw..(cl + 1) * g.hw;
                // dh is parked in dx until the group sums are known.
                for ((dxv, &xv), &dv) in dxs[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&dys[r])
                {
                    let xhat = (xv.f64() - mean) * rstd;
                    let dh = if silu {
                        dv.f64() * silu_and_grad(T::of(xhat * am + dm)).1.f64()
                    } else {
                        dv.f64()
                    };
                    *dxv = T::of(dh);
                    sdhx += dh * xhat;
                    sdh += dh;
                }
                s1 += sdh * am;
                s2 += sdhx * am;
                chan.push((sdhx, sdh));
            }
            for cl in 0..g.cg() {
                let am = a[img * g.c + grp * g.cg() + cl].f64();
                let r = cl * g.hw..(cl + 1) * g.hw;
                for (dxv, &xv) in dxs[r.clone()].iter_mut().zip(&xs[r]) {
                    let xhat = (xv.f64() - mean) * rstd;
                    let dxhat = dxv.f64() * am;
                    *dxv = T::of(rstd / n * (n * dxhat - s1 - xhat * s2));
                }
            }
            chan
        })
        .collect();
    let (da, dd) = rest.split_at_mut(bc);
    for (i, chan) in per_group.iter().enumerate() {
        let (img, grp) = (i / g.groups, i % g.groups);
        for (cl, &(sdhx, sdh)) in chan.iter().enumerate() {
            let ic = img * g.c + grp * g.cg() + cl;
            da[ic] = T::of(sdhx);
            dd[ic] = T::of(sdh);
        }
    }
    out
}

/// GroupNorm with a per-(image, channel) affine `a`, `d` (b, c) and an optional SiLU, over
/// (x, a, d), as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Apply SiLU after the affine.
    pub silu: bool,
}

/// The backward pass; its third input packs `[d | grad]`.
struct GroupNormBackward(GroupNorm);

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "ddpm-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.groups)?;
        let storage = dispatch!(
            s1,
            "group_norm",
            forward,
            &g,
            slice(s1, l1, "x")?,
            slice(s2, l2, "a")?,
            slice(s3, l3, "d")?,
            self.eps,
            self.silu
        );
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        d: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, bc) = (x.elem_count(), a.elem_count());
        let d_and_grad = Tensor::cat(&[&d.flatten_all()?, &grad.flatten_all()?], 0)?;
        let packed = x.apply_op3_no_bwd(a, &d_and_grad, &GroupNormBackward(*self))?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, bc)?.reshape(a.shape())?),
            Some(packed.narrow(0, n + bc, bc)?.reshape(d.shape())?),
        ))
    }
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "ddpm-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.0.groups)?;
        let bc = l2.shape().elem_count();
        let (op, storage) = (self.0, s1);
        let storage = match storage.dtype() {
            DType::F32 => CpuStorage::F32(run_backward::<f32>(&g, op, s1, l1, s2, l2, s3, l3, bc)?),
            DType::F64 => CpuStorage::F64(run_backward::<f64>(&g, op, s1, l1, s2, l2, s3, l3, bc)?),
            dt => candle_core::bail!("group_norm kernel: unsupported dtype {dt:?}"),
        };
        Ok((storage, Shape::from(l1.shape().elem_count() + 2 * bc)))
    }
}

/// Unpacks the backward pass's inputs for one float type.
#[allow(clippy::too_many_arguments)]
fn run_backward<T: Float>(
    g: &Geom,
    op: GroupNorm,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    bc: usize,
) -> Result<Vec<T>> {
    let x = slice::<T>(s1, l1, "x")?;
    let a = slice::<T>(s2, l2, "a")?;
    let packed = slice::<T>(s3, l3, "grad")?;
    let (d, dy) = packed.split_at(bc);
    Ok(backward(g, x, a, d, dy, op.eps, op.silu))
}

/// GroupNorm of `x` (b, c, ...) with a per-(image, channel) affine `a`, `d` (b, c), then SiLU
/// when `silu`, through our kernel: `act((x - mean) / std * a + d)`.
pub fn group_norm_act(
    x: &Tensor,
    groups: usize,
    a: &Tensor,
    d: &Tensor,
    silu: bool,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &d.contiguous()?,
        GroupNorm { groups, eps, silu },
    )
}

/// GroupNorm of `x` (b, c, ...) with `gamma`, `beta` (c) through our kernel.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (a, d) = per_image(x, gamma, beta)?;
    group_norm_act(x, groups, &a, &d, false, eps)
}

/// `gamma`, `beta` (c) broadcast to (b, c): the per-image affine of a plain GroupNorm.
pub fn per_image(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c) = (x.dims()[0], gamma.elem_count());
    Ok((
        gamma.reshape((1, c))?.broadcast_as((b, c))?,
        beta.reshape((1, c))?.broadcast_as((b, c))?,
    ))
}
