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

fn forward<T: Float>(g: &Geom, x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .enumerate()
        .for_each(|(i, (ys, xs))| {
            let grp = i % g.groups;
            let (mean, rstd) = stats(xs, eps);
            let (mean, rstd) = (T::of(mean), T::of(rstd));
            for cl in 0..g.cg() {
                let ch = grp * g.cg() + cl;
                let (a, bb) = (gamma[ch] * rstd, beta[ch]);
                let r = cl * g.hw..(cl + 1) * g.hw;
                for (yv, &xv) in ys[r.clone()].iter_mut().zip(&xs[r]) {
                    *yv = (xv - mean) * a + bb;
                }
            }
        });
    y
}

/// `[dx | dgamma | dbeta]` packed.
fn backward<T: Float>(g: &Geom, x: &[T], gamma: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len() + 2 * g.c];
    let (dx, rest) = out.split_at_mut(x.len());
    // Per (image, channel): sum(dy * xhat) and sum(dy), reduced over images afterwards.
    let per_group: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .zip(dy.par_chunks(g.group_len()))
        .enumerate()
        .map(|(i, ((dxs, xs), dys))| {
            let grp = i % g.groups;
            let (mean, rstd) = stats(xs, eps);
            let n = xs.len() as f64;
            let mut chan = Vec::with_capacity(g.cg());
            // sums over the group of dxhat and dxhat * xhat, dxhat = dy * gamma
            let (mut s1, mut s2) = (0f64, 0f64);
            for cl in 0..g.cg() {
                let ch = grp * g.cg() + cl;
                let gm = gamma[ch].f64();
                let (mut sdyx, mut sdy) = (0f64, 0f64);
                let r = cl * g.hw..(cl + 1) * g.hw;
                for (&xv, &dv) in xs[r.clone()].iter().zip(&dys[r]) {
                    let xhat = (xv.f64() - mean) * rstd;
                    let d = dv.f64();
                    sdyx += d * xhat;
                    sdy += d;
                }
                s1 += sdy * gm;
                s2 += sdyx * gm;
                chan.push((sdyx, sdy));
            }
            for cl in 0..g.cg() {
                let ch = grp * g.cg() + cl;
                let gm = gamma[ch].f64();
                let r = cl * g.hw..(cl + 1) * g.hw;
                for ((dxv, &xv), &dv) in dxs[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&dys[r])
                {
                    let xhat = (xv.f64() - mean) * rstd;
                    let dxhat = dv.f64() * gm;
                    *dxv = T::of(rstd / n * (n * dxhat - s1 - xhat * s2));
                }
            }
            chan
        })
        .collect();
    let (dgamma, dbeta) = rest.split_at_mut(g.c);
    for (i, chan) in per_group.iter().enumerate() {
        let grp = i % g.groups;
        for (cl, &(sdyx, sdy)) in chan.iter().enumerate() {
            let ch = grp * g.cg() + cl;
            dgamma[ch] += T::of(sdyx);
            dbeta[ch] += T::of(sdy);
        }
    }
    out
}

/// GroupNorm over (x, gamma, beta) as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

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
            slice(s2, l2, "gamma")?,
            slice(s3, l3, "beta")?,
            self.eps
        );
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(gamma, &grad, &GroupNormBackward(*self))?;
        let (n, c) = (x.elem_count(), gamma.elem_count());
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
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
        let (x, gm, dy) = (l1, l2, l3);
        let eps = self.0.eps;
        let storage = dispatch!(
            s1,
            "group_norm",
            backward,
            &g,
            slice(s1, x, "x")?,
            slice(s2, gm, "gamma")?,
            slice(s3, dy, "grad")?,
            eps
        );
        Ok((storage, Shape::from(l1.shape().elem_count() + 2 * g.c)))
    }
}

/// GroupNorm of `x` (b, c, ...) with `gamma`, `beta` (c) through our kernel.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNorm { groups, eps },
    )
}
