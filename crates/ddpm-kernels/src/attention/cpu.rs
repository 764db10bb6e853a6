//! Attention on the CPU, one (image, head) pair at a time: the forward pass keeps nothing but its
//! input, and the backward pass recomputes the softmaxes (cheap next to the matrix products) and
//! writes the gradient of `qkv` in place.

use gemm::Parallelism;
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{Attention, Geom, Kind};
use crate::{matmul_new, matmul_to, sum, sum2, Float, Uninit};

/// Softmax over each row of a (rows x cols) row-major matrix, in place. Written as separate
/// loops (max, exponentials, sum, scaling), each of which vectorizes.
#[inline(always)]
fn softmax_rows<T: Float>(m: &mut [T], cols: usize) {
    for row in m.chunks_mut(cols) {
        let max = max_of(row);
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let inv = T::of(1.0 / sum(row, |v| v));
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// The largest element of a non-empty slice, over independent lanes so that it vectorizes.
#[inline(always)]
fn max_of<T: Float>(xs: &[T]) -> T {
    const LANES: usize = 16;
    let mut acc = [xs[0]; LANES];
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = xs[0];
    for &v in acc.iter().chain(it.remainder()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// `dst = src` with a softmax over each column of the (rows x cols) row-major matrix, then
/// times `scale`; `dst` (as long as `src`) is returned as values.
#[inline(always)]
fn softmax_cols<'d, T: Float>(
    src: &[T],
    dst: &'d mut [MaybeUninit<T>],
    cols: usize,
    scale: T,
) -> &'d mut [T] {
    assert_eq!(src.len(), dst.len(), "softmax_cols: lengths differ");
    let mut max = src[..cols].to_vec();
    for row in src.chunks(cols).skip(1) {
        max.iter_mut().zip(row).for_each(|(m, &v)| {
            if v > *m {
                *m = v
            }
        });
    }
    let mut sum = vec![T::ZERO; cols];
    for (drow, srow) in dst.chunks_mut(cols).zip(src.chunks(cols)) {
        for (((dv, &sv), &m), s) in drow.iter_mut().zip(srow).zip(&max).zip(sum.iter_mut()) {
            *s += *dv.write((sv - m).exp());
        }
    }
    // SAFETY: `dst` is as long as `src`, and the loop above wrote each of its rows in full
    // (`max` and `sum` hold `cols` values, as long as any row).
    let dst = unsafe { crate::assume_init_mut(dst) };
    sum.iter_mut().for_each(|s| *s = scale / *s);
    for drow in dst.chunks_mut(cols) {
        drow.iter_mut().zip(&sum).for_each(|(v, &f)| *v *= f);
    }
    dst
}

/// The q, k and v of one head of one image's `qkv`.
fn head<'a, T>(g: &Geom, qkv_img: &'a [T], head: usize) -> [&'a [T]; 3] {
    let at = |part: usize| {
        let start = part * g.part_len() + head * g.head_len();
        &qkv_img[start..start + g.head_len()]
    };
    [at(0), at(1), at(2)]
}

const SERIAL: Parallelism = Parallelism::None;

/// One head's forward pass, writing all of `out` (d x n).
#[inline(always)]
fn forward_head_impl<T: Float>(
    op: &Attention,
    g: &Geom,
    [q, k, v]: [&[T]; 3],
    out: &mut [MaybeUninit<T>],
) {
    let (d, n) = (g.d, g.n);
    let scale = T::of(op.scale);
    match op.kind {
        Kind::Linear => {
            let mut sq = Uninit::new(d * n);
            let sq = softmax_cols(q, &mut sq, n, scale);
            let mut sk = k.to_vec();
            softmax_rows(&mut sk, n);
            // context (d x d) = sk (d x n) v^T (n x d); out (d x n) = context^T sq
            let ctx = matmul_new(d, d, n, &sk, (n, 1), v, (1, n), SERIAL);
            matmul_to(d, n, d, out, &ctx, (1, d), sq, (n, 1), SERIAL);
        }
        Kind::Softmax => {
            let attn = attention_weights(q, k, n, d, scale);
            // out (d x n) = v (d x n) attn^T (n x n)
            matmul_to(d, n, n, out, v, (n, 1), &attn, (1, n), SERIAL);
        }
    }
}

/// `softmax_j(scale * q^T k)` (n x n) for q, k (d x n).
#[inline(always)]
fn attention_weights<T: Float>(q: &[T], k: &[T], n: usize, d: usize, scale: T) -> Vec<T> {
    let mut sim = matmul_new(n, n, d, q, (1, n), k, (n, 1), SERIAL);
    sim.iter_mut().for_each(|v| *v *= scale);
    softmax_rows(&mut sim, n);
    sim
}

pub(super) fn forward<T: Float>(op: &Attention, g: &Geom, qkv: &[T]) -> Vec<T> {
    assert_eq!(qkv.len(), g.b * 3 * g.part_len(), "attention: qkv length");
    let mut out = Uninit::new(g.b * g.part_len());
    out.par_chunks_mut(g.head_len())
        .enumerate()
        .for_each(|(i, out)| {
            let (img, h) = (i / g.heads, i % g.heads);
            let qkv_img = &qkv[img * 3 * g.part_len()..(img + 1) * 3 * g.part_len()];
            forward_head(op, g, head(g, qkv_img, h), out);
        });
    // SAFETY: the chunks of `head_len` values cover `out` (b images of `heads` heads each), and
    // `forward_head` writes all of its chunk (a GEMM of d x n outputs).
    unsafe { out.assume_init() }
}

/// `dst[i, j] = s[i, j] * (ds[i, j] - sum_j s[i, j] ds[i, j])` per row: the gradient through a
/// row softmax with output `s` and output gradient `ds`. `dst` (as long as `s` and `ds`) is
/// returned as values.
#[inline(always)]
fn softmax_rows_backward<'d, T: Float>(
    s: &[T],
    ds: &[T],
    dst: &'d mut [MaybeUninit<T>],
    cols: usize,
) -> &'d mut [T] {
    assert!(
        s.len() == dst.len() && ds.len() == dst.len(),
        "softmax_rows_backward: lengths differ"
    );
    for ((srow, dsrow), drow) in s
        .chunks(cols)
        .zip(ds.chunks(cols))
        .zip(dst.chunks_mut(cols))
    {
        let dot = T::of(sum2(srow, dsrow, |a, b| a * b));
        for ((dv, &a), &b) in drow.iter_mut().zip(srow).zip(dsrow) {
            dv.write(a * (b - dot));
        }
    }
    // SAFETY: `s`, `ds` and `dst` have the same length, so the loop above wrote every row of
    // `dst` in full.
    unsafe { crate::assume_init_mut(dst) }
}

/// One head's backward pass: the gradients of q, k and v (each d x n) from `dout` (d x n),
/// writing all of `dq`, `dk` and `dv`.
#[inline(always)]
fn backward_head_impl<T: Float>(
    op: &Attention,
    g: &Geom,
    [q, k, v]: [&[T]; 3],
    dout: &[T],
    [dq, dk, dv]: [&mut [MaybeUninit<T>]; 3],
) {
    let (d, n) = (g.d, g.n);
    let scale = T::of(op.scale);
    match op.kind {
        Kind::Linear => {
            // Recompute the forward's softmaxes (unscaled for queries) and context.
            let mut s = Uninit::new(d * n);
            let s = softmax_cols(q, &mut s, n, T::ONE);
            let sq: Vec<T> = s.iter().map(|&v| v * scale).collect();
            let mut sk = k.to_vec();
            softmax_rows(&mut sk, n);
            let ctx = matmul_new(d, d, n, &sk, (n, 1), v, (1, n), SERIAL);
            // dctx (d x d) = sq dout^T; dsq (d x n) = ctx dout
            let dctx = matmul_new(d, d, n, &sq, (n, 1), dout, (1, n), SERIAL);
            let dsq = matmul_new(d, n, d, &ctx, (d, 1), dout, (n, 1), SERIAL);
            // dsk (d x n) = dctx v; dv (d x n) = dctx^T sk
            let dsk = matmul_new(d, n, d, &dctx, (d, 1), v, (n, 1), SERIAL);
            matmul_to(d, n, d, dv, &dctx, (1, d), &sk, (n, 1), SERIAL);
            softmax_rows_backward(&sk, &dsk, dk, n);
            // Queries: softmax over each column, then the scale.
            let mut dot = vec![T::ZERO; n];
            for (srow, dsrow) in s.chunks(n).zip(dsq.chunks(n)) {
                for ((acc, &a), &b) in dot.iter_mut().zip(srow).zip(dsrow) {
                    *acc += a * b * scale;
                }
            }
            // Every element of dq: it is as long as s and dsq, and each row as long as `dot`.
            assert_eq!(dq.len(), s.len(), "attention: dq and s differ in length");
            for ((dqrow, srow), dsrow) in dq.chunks_mut(n).zip(s.chunks(n)).zip(dsq.chunks(n)) {
                for (((dv, &a), &b), &t) in dqrow.iter_mut().zip(srow).zip(dsrow).zip(&dot) {
                    dv.write(a * (b * scale - t));
                }
            }
        }
        Kind::Softmax => {
            let attn = attention_weights(q, k, n, d, scale);
            // dattn (n x n) = dout^T v; dv (d x n) = dout attn
            let dattn = matmul_new(n, n, d, dout, (1, n), v, (n, 1), SERIAL);
            matmul_to(d, n, n, dv, dout, (n, 1), &attn, (n, 1), SERIAL);
            let mut dsim = Uninit::new(n * n);
            let dsim = softmax_rows_backward(&attn, &dattn, &mut dsim, n);
            dsim.iter_mut().for_each(|v| *v *= scale);
            // dq (d x n) = k dsim^T; dk (d x n) = q dsim
            matmul_to(d, n, n, dq, k, (n, 1), dsim, (1, n), SERIAL);
            matmul_to(d, n, n, dk, q, (n, 1), dsim, (n, 1), SERIAL);
        }
    }
}

pub(super) fn backward<T: Float>(op: &Attention, g: &Geom, qkv: &[T], dout: &[T]) -> Vec<T> {
    assert_eq!(
        qkv.len(),
        g.b * 3 * g.part_len(),
        "attention backward: qkv length"
    );
    let mut dqkv = Uninit::new(qkv.len());
    let img_len = 3 * g.part_len();
    dqkv.par_chunks_mut(img_len)
        .enumerate()
        .for_each(|(img, dimg)| {
            let qkv_img = &qkv[img * img_len..(img + 1) * img_len];
            let (dq_all, rest) = dimg.split_at_mut(g.part_len());
            let (dk_all, dv_all) = rest.split_at_mut(g.part_len());
            let heads = dq_all
                .chunks_mut(g.head_len())
                .zip(dk_all.chunks_mut(g.head_len()))
                .zip(dv_all.chunks_mut(g.head_len()));
            for (h, ((dq, dk), dv)) in heads.enumerate() {
                let start = (img * g.heads + h) * g.head_len();
                let dout_h = &dout[start..start + g.head_len()];
                backward_head(op, g, head(g, qkv_img, h), dout_h, [dq, dk, dv]);
            }
        });
    // SAFETY: `qkv` holds b images of `img_len` values, so the chunks cover `dqkv`; each is
    // split into q, k and v parts of `heads` heads, and `backward_head` writes all of each
    // head's dq, dk and dv (GEMMs without accumulation, the softmaxes' backward passes).
    unsafe { dqkv.assume_init() }
}

avx2_dispatch! {
    /// [`forward_head_impl`], AVX2 build when the CPU has it.
    fn forward_head<T>(
        op: &Attention,
        g: &Geom,
        qkv: [&[T]; 3],
        out: &mut [MaybeUninit<T>],
    ) = forward_head_impl
}

avx2_dispatch! {
    /// [`backward_head_impl`], AVX2 build when the CPU has it.
    fn backward_head<T>(
        op: &Attention,
        g: &Geom,
        qkv: [&[T]; 3],
        dout: &[T],
        grads: [&mut [MaybeUninit<T>]; 3],
    ) = backward_head_impl
}
