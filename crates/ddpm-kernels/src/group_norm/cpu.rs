//! GroupNorm on the CPU, with a per-(image, channel) affine, SiLU and dropout: forward and
//! backward in one pass each over the data, split over (image, group) pairs.

use candle_core::Result;
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{Dropout, GroupNorm};
use crate::{assume_init_mut, sum, sum2, write_copy, Float, Uninit};

/// The shape of one call: `c` channels of `hw` values per image, in `groups` groups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    c: usize,
    hw: usize,
    groups: usize,
}

impl Geom {
    pub(super) fn new(dims: &[usize], groups: usize) -> Result<Self> {
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

/// Mean and reciprocal standard deviation of one group (two passes, sums in f64).
#[inline(always)]
fn stats<T: Float>(x: &[T], eps: f64) -> (T, T) {
    let n = x.len() as f64;
    let mean = sum(x, |v| v) / n;
    let m = T::of(mean);
    let var = sum(x, |v| (v - m) * (v - m)) / n;
    (m, T::of(1.0 / (var + eps).sqrt()))
}

/// SiLU and its derivative at `h`, in the element type's precision.
#[inline(always)]
fn silu_and_grad<T: Float>(h: T) -> (T, T) {
    let s = T::ONE / (T::ONE + (T::ZERO - h).exp());
    (h * s, s * (T::ONE + h * (T::ONE - s)))
}

/// [`Dropout`] prepared for the inner loops.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mask<T> {
    threshold: u32,
    s1: u32,
    s2: u32,
    keep: T,
}

/// A 32-bit integer hash with good avalanche (Wellons' "lowbias32"); 32-bit multiplies keep it
/// vectorizable.
#[inline(always)]
pub(super) fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl<T: Float> Mask<T> {
    pub(super) fn new(d: Dropout) -> Self {
        let (threshold, s1, s2) = d.hash_params();
        Self {
            threshold,
            s1,
            s2,
            keep: T::of(1.0 / (1.0 - d.p)),
        }
    }

    /// 0 or `1 / (1 - p)` for element `i`.
    #[inline(always)]
    pub(super) fn factor(&self, i: usize) -> T {
        let h = hash32(hash32((i as u32).wrapping_add(self.s1)) ^ self.s2);
        if h >= self.threshold {
            self.keep
        } else {
            T::ZERO
        }
    }
}

/// What follows the normalization and affine: SiLU or nothing, then dropout or nothing.
#[derive(Debug, Clone, Copy)]
struct Post<T> {
    silu: bool,
    mask: Option<Mask<T>>,
}

/// One (image, group): `ys = post((xs - mean) * rstd * a[c] + d[c])`, `a`, `d` the group's
/// channels, `start` the index of `xs[0]` in the whole tensor (for the dropout mask). Writes
/// all of `ys` (as long as `xs`, `a.len()` channels of `hw` values).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group_impl<T: Float>(
    hw: usize,
    xs: &[T],
    ys: &mut [MaybeUninit<T>],
    a: &[T],
    d: &[T],
    eps: f64,
    post: Post<T>,
    start: usize,
) {
    assert!(
        ys.len() == xs.len() && xs.len() == a.len() * hw && d.len() == a.len(),
        "group_norm: group lengths"
    );
    let (mean, rstd) = stats(xs, eps);
    for (cl, ((yc, xc), (&ac, &dc))) in ys
        .chunks_mut(hw)
        .zip(xs.chunks(hw))
        .zip(a.iter().zip(d))
        .enumerate()
    {
        let scale = ac * rstd;
        if post.silu {
            for (yv, &xv) in yc.iter_mut().zip(xc) {
                yv.write(silu_and_grad((xv - mean) * scale + dc).0);
            }
        } else {
            for (yv, &xv) in yc.iter_mut().zip(xc) {
                yv.write((xv - mean) * scale + dc);
            }
        }
        // SAFETY: `yc` and `xc` are the same channel's `hw` values (the lengths are checked
        // above), so the loop above wrote every element of `yc`.
        let yc = unsafe { assume_init_mut(yc) };
        if let Some(m) = post.mask {
            let base = start + cl * hw;
            for (j, yv) in yc.iter_mut().enumerate() {
                *yv *= m.factor(base + j);
            }
        }
    }
}

/// One (image, group) of the backward pass: all of `dxs` from `xs` and `dys` (all three `a.len()`
/// channels of `hw` values); returns per channel `(sum(dh * xhat), sum(dh))`, `dh` the gradient
/// before the activation.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group_impl<T: Float>(
    hw: usize,
    xs: &[T],
    dys: &[T],
    dxs: &mut [MaybeUninit<T>],
    a: &[T],
    d: &[T],
    eps: f64,
    post: Post<T>,
    start: usize,
) -> Vec<(f64, f64)> {
    assert!(
        dxs.len() == xs.len()
            && dys.len() == xs.len()
            && xs.len() == a.len() * hw
            && d.len() == a.len(),
        "group_norm backward: group lengths"
    );
    let (mean, rstd) = stats(xs, eps);
    let n = xs.len() as f64;
    let mut chan = Vec::with_capacity(a.len());
    // Pass 1: dh, parked in dx, and its per-channel sums.
    for (cl, (((dxc, xc), dyc), (&ac, &dc))) in dxs
        .chunks_mut(hw)
        .zip(xs.chunks(hw))
        .zip(dys.chunks(hw))
        .zip(a.iter().zip(d))
        .enumerate()
    {
        let dxc = write_copy(dxc, dyc);
        if let Some(m) = post.mask {
            let base = start + cl * hw;
            for (j, dv) in dxc.iter_mut().enumerate() {
                *dv *= m.factor(base + j);
            }
        }
        if post.silu {
            for (dxv, &xv) in dxc.iter_mut().zip(xc) {
                *dxv *= silu_and_grad((xv - mean) * rstd * ac + dc).1;
            }
        }
        let sdh = sum(dxc, |v| v);
        let sdhx = sum2(dxc, xc, |dh, xv| dh * (xv - mean)) * rstd.f64();
        chan.push((sdhx, sdh));
    }
    // Pass 2: dx = rstd / n * (n * dh * a - s1 - xhat * s2), s1, s2 the group's sums of
    // dh * a and dh * xhat * a.
    let s1: f64 = chan.iter().zip(a).map(|(c, &ac)| c.1 * ac.f64()).sum();
    let s2: f64 = chan.iter().zip(a).map(|(c, &ac)| c.0 * ac.f64()).sum();
    let r = rstd.f64();
    let (c0, c2) = (T::of(-s1 * r / n), T::of(-s2 * r / n * r));
    // SAFETY: pass 1 copied `dys` into each of the `a.len()` channels of `dxs`, which is that
    // long (checked above).
    let dxs = unsafe { assume_init_mut(dxs) };
    for ((dxc, xc), &ac) in dxs.chunks_mut(hw).zip(xs.chunks(hw)).zip(a) {
        let c1 = ac * rstd;
        for (dxv, &xv) in dxc.iter_mut().zip(xc) {
            *dxv = *dxv * c1 + c0 + (xv - mean) * c2;
        }
    }
    chan
}

avx2_dispatch! {
    /// [`forward_group_impl`], AVX2 build when the CPU has it.
    fn forward_group<T>(
        hw: usize,
        xs: &[T],
        ys: &mut [MaybeUninit<T>],
        a: &[T],
        d: &[T],
        eps: f64,
        post: Post<T>,
        start: usize,
    ) = forward_group_impl
}

avx2_dispatch! {
    /// [`backward_group_impl`], AVX2 build when the CPU has it.
    fn backward_group<T>(
        hw: usize,
        xs: &[T],
        dys: &[T],
        dxs: &mut [MaybeUninit<T>],
        a: &[T],
        d: &[T],
        eps: f64,
        post: Post<T>,
        start: usize,
    ) -> Vec<(f64, f64)> = backward_group_impl
}

/// `y = act((x - mean) * rstd * a[i, c] + d[i, c])` per image `i` and channel `c`.
pub(super) fn forward<T: Float>(g: &Geom, x: &[T], a: &[T], d: &[T], op: &GroupNorm) -> Vec<T> {
    assert!(
        x.len().is_multiple_of(g.group_len()),
        "group_norm: input length"
    );
    let mut y = Uninit::new(x.len());
    let (eps, post) = (op.eps, post(op));
    y.par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .enumerate()
        .for_each(|(i, (ys, xs))| {
            let (img, grp) = (i / g.groups, i % g.groups);
            let ch = img * g.c + grp * g.cg()..img * g.c + (grp + 1) * g.cg();
            let (a, d) = (&a[ch.clone()], &d[ch]);
            forward_group(g.hw, xs, ys, a, d, eps, post, i * g.group_len())
        });
    // SAFETY: `x` is a whole number of groups, so the chunks of `group_len` values cover `y`,
    // and `forward_group` writes all of its chunk.
    unsafe { y.assume_init() }
}

/// `[dx | da | dd]` packed, `da` and `dd` per (image, channel).
pub(super) fn backward<T: Float>(
    g: &Geom,
    x: &[T],
    a: &[T],
    d: &[T],
    dy: &[T],
    op: &GroupNorm,
) -> Vec<T> {
    let (eps, post) = (op.eps, post(op));
    let bc = x.len() / g.hw;
    assert!(
        x.len().is_multiple_of(g.group_len()) && dy.len() == x.len(),
        "group_norm backward: input lengths"
    );
    let mut out = Uninit::new(x.len() + 2 * bc);
    let (dx, rest) = out.split_at_mut(x.len());
    let per_group: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(g.group_len())
        .zip(x.par_chunks(g.group_len()))
        .zip(dy.par_chunks(g.group_len()))
        .enumerate()
        .map(|(i, ((dxs, xs), dys))| {
            let (img, grp) = (i / g.groups, i % g.groups);
            let ch = img * g.c + grp * g.cg()..img * g.c + (grp + 1) * g.cg();
            let (a, d) = (&a[ch.clone()], &d[ch]);
            backward_group(g.hw, xs, dys, dxs, a, d, eps, post, i * g.group_len())
        })
        .collect();
    let (da, dd) = rest.split_at_mut(bc);
    for (i, chan) in per_group.iter().enumerate() {
        let (img, grp) = (i / g.groups, i % g.groups);
        for (cl, &(sdhx, sdh)) in chan.iter().enumerate() {
            let ic = img * g.c + grp * g.cg() + cl;
            da[ic].write(T::of(sdhx));
            dd[ic].write(T::of(sdh));
        }
    }
    // SAFETY: `x` is a whole number of groups, so the chunks of `group_len` values cover dx and
    // `backward_group` writes all of each; `per_group` holds the `cg` channels of each of the
    // `bc / cg` (image, group) pairs, so the loop above wrote each of the `bc` values of da
    // and dd.
    unsafe { out.assume_init() }
}

/// The activation and dropout of `op`, for the inner loops.
fn post<T: Float>(op: &GroupNorm) -> Post<T> {
    Post {
        silu: op.silu,
        mask: op.dropout.filter(|d| d.p > 0.0).map(Mask::new),
    }
}
