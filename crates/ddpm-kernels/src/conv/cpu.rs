//! The convolution on the CPU: 2-D convolution lowered onto GEMM (im2col per image, or
//! Winograd's F(2x2, 3x3) or F(4x4, 3x3) in [`super::winograd`]), with the input, weight and
//! bias gradients also computed as GEMMs plus a col2im scatter. Work is split over the batch.

use gemm::Parallelism;
use rayon::prelude::*;

use super::winograd::{self, Shape as WinogradShape};
use std::mem::MaybeUninit;

use crate::{
    assume_init_mut, assume_init_ref, fill, matmul, matmul_to, sum, threads, write_copy, Float,
    Uninit,
};
use candle_core::Result;

/// Geometry of one convolution (also that of the CUDA kernels' im2col, `super::cuda`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) pad_end: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geom {
    /// The geometry of `x` (b, c, h, w) convolved with a kernel `w` (o, c, kh, kw): checks the
    /// channels and that the padded input holds the kernel.
    pub(super) fn new(
        x: &[usize],
        w: &[usize],
        stride: usize,
        pad: usize,
        pad_end: usize,
    ) -> Result<Self> {
        let (&[b, c, h, wd], &[o, wc, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and kernel, got {x:?} and {w:?}")
        };
        if wc != c {
            candle_core::bail!("conv2d: input has {c} channels, kernel expects {wc}");
        }
        let stride = stride.max(1);
        if h + pad + pad_end < kh || wd + pad + pad_end < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than padded input");
        }
        Ok(Self {
            b,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            pad,
            pad_end,
            ho: (h + pad + pad_end - kh) / stride + 1,
            wo: (wd + pad + pad_end - kw) / stride + 1,
        })
    }
    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Row stride of the patch matrix: `n`, padded by 16 when `n` is a multiple of 256 (a
    /// 32x32 image: 1024 floats, 4 KiB). Rows 4 KiB apart map to the same cache sets, and the
    /// `gemm` crate's product over them ran at about half speed (docs/benchmarks.md, "Kernel
    /// decisions").
    fn ld(&self) -> usize {
        let n = self.n();
        if n >= 256 && n.is_multiple_of(256) {
            n + 16
        } else {
            n
        }
    }
    /// For a stride-1 conv with equal padding on both sides (at most `k - 1`), the input
    /// gradient is itself a convolution: of dY with the kernel flipped in space and transposed
    /// in channels, padded by `k - 1 - pad`. Its geometry, when that holds.
    fn input_gradient_as_conv(&self) -> Option<Geom> {
        let same = self.stride == 1 && self.pad == self.pad_end && self.kh == self.kw;
        if !same || self.pad >= self.kh || self.is_pointwise() {
            return None;
        }
        let pad = self.kh - 1 - self.pad;
        let t = Geom::new(
            &[self.b, self.o, self.ho, self.wo],
            &[self.c, self.o, self.kh, self.kw],
            1,
            pad,
            pad,
        )
        .ok()?;
        (t.ho == self.h && t.wo == self.w).then_some(t)
    }
    fn n(&self) -> usize {
        self.ho * self.wo
    }
    /// A 3x3, stride-1, padding-1 convolution with enough channels for Winograd
    /// ([`winograd::worthwhile`]): its shape there.
    fn winograd(&self) -> Option<WinogradShape> {
        let fits = self.kh == 3
            && self.kw == 3
            && self.stride == 1
            && self.pad == 1
            && self.pad_end == 1
            && self.ho == self.h
            && self.wo == self.w;
        (fits && winograd::worthwhile(self.c, self.o)).then_some(WinogradShape {
            c: self.c,
            o: self.o,
            h: self.h,
            w: self.w,
        })
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0 && self.ho == self.h
    }
    pub(super) fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.o * self.n()
    }
}

/// The output columns `ox` whose input column `ox * stride + kx - pad` lies inside `0..w`.
#[inline]
fn valid_range(out: usize, stride: usize, k: usize, pad: usize, size: usize) -> (usize, usize) {
    // first ox with ox*s + k >= pad; last ox with ox*s + k - pad < size
    let lo = if k >= pad {
        0
    } else {
        (pad - k).div_ceil(stride)
    };
    let hi = if size + pad > k {
        ((size + pad - k - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Whether a patch row is the input plane shifted by one flat offset (stride 1, output as wide
/// as the input, kernel no larger than the image, padding less than the kernel): then
/// `cols[j] = plane[j + off]` except in the padding's columns, which wrap into the neighbouring
/// row and are zeroed after one block copy.
#[inline(always)]
fn is_flat(g: &Geom) -> bool {
    g.stride == 1 && g.wo == g.w && g.kw <= g.w && g.kh <= g.h && g.pad < g.kw && g.pad < g.kh
}

/// One patch row (`ky`, `kx`) of a [`is_flat`] conv: `dst[j] = plane[j + off]` over the valid
/// output rows `ylo..yhi`, zeros elsewhere and in the columns outside `xlo..xhi`. Writes all
/// of `dst`.
#[inline(always)]
fn flat_row<T: Float>(
    g: &Geom,
    plane: &[T],
    dst: &mut [MaybeUninit<T>],
    (ky, kx): (usize, usize),
    (ylo, yhi): (usize, usize),
    (xlo, xhi): (usize, usize),
) {
    let w = g.w as isize;
    let off = (ky as isize - g.pad as isize) * w + (kx as isize - g.pad as isize);
    let (lo, hi) = (ylo * g.wo, yhi * g.wo);
    // The block whose sources lie inside the plane (it may lose one element at either end,
    // which is then a padding column).
    let start = (lo as isize).max(-off).min(hi as isize) as usize;
    let end = ((hi as isize)
        .min(plane.len() as isize - off)
        .max(start as isize)) as usize;
    fill(&mut dst[..start], T::ZERO);
    fill(&mut dst[end..], T::ZERO);
    let src = (start as isize + off) as usize;
    write_copy(&mut dst[start..end], &plane[src..src + (end - start)]);
    // The padding columns, one column at a time: a strided store per line rather than two
    // one-element `fill`s, each a call to memset (a visible share of a training step).
    for j in (0..xlo).chain(xhi..g.wo) {
        for line in dst[lo..hi].chunks_exact_mut(g.wo) {
            line[j] = MaybeUninit::new(T::ZERO);
        }
    }
}

/// See [`im2col`].
#[inline(always)]
fn im2col_impl<T: Float>(g: &Geom, x: &[T], cols: &mut [MaybeUninit<T>]) {
    let (n, ld) = (g.n(), g.ld());
    for ci in 0..g.c {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (ylo, yhi) = valid_range(g.ho, g.stride, ky, g.pad, g.h);
            for kx in 0..g.kw {
                let (xlo, xhi) = valid_range(g.wo, g.stride, kx, g.pad, g.w);
                let row = (ci * g.kh + ky) * g.kw + kx;
                let dst = &mut cols[row * ld..row * ld + n];
                if is_flat(g) {
                    flat_row(g, plane, dst, (ky, kx), (ylo, yhi), (xlo, xhi));
                    continue;
                }
                for oy in 0..g.ho {
                    let line = &mut dst[oy * g.wo..(oy + 1) * g.wo];
                    if oy < ylo || oy >= yhi {
                        fill(line, T::ZERO);
                        continue;
                    }
                    let iy = oy * g.stride + ky - g.pad;
                    let src_row = &plane[iy * g.w..(iy + 1) * g.w];
                    fill(&mut line[..xlo], T::ZERO);
                    fill(&mut line[xhi..], T::ZERO);
                    if g.stride == 1 {
                        let ix0 = xlo + kx - g.pad;
                        write_copy(&mut line[xlo..xhi], &src_row[ix0..ix0 + (xhi - xlo)]);
                    } else {
                        // An index loop: iterator adapters here (`skip`, `take`) were left as
                        // calls outside the AVX2 copy and ran element by element.
                        for ox in xlo..xhi {
                            line[ox].write(src_row[ox * g.stride + kx - g.pad]);
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn col2im_add_impl<T: Float>(g: &Geom, cols: &[T], dx: &mut [T]) {
    let n = g.n();
    for ci in 0..g.c {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (ylo, yhi) = valid_range(g.ho, g.stride, ky, g.pad, g.h);
            for kx in 0..g.kw {
                let (xlo, xhi) = valid_range(g.wo, g.stride, kx, g.pad, g.w);
                let row = (ci * g.kh + ky) * g.kw + kx;
                let s = &cols[row * n..(row + 1) * n];
                for oy in ylo..yhi {
                    let iy = oy * g.stride + ky - g.pad;
                    let line = &s[oy * g.wo..(oy + 1) * g.wo];
                    let dst_row = &mut plane[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let ix0 = xlo + kx - g.pad;
                        let dst = &mut dst_row[ix0..ix0 + (xhi - xlo)];
                        for (d, &v) in dst.iter_mut().zip(&line[xlo..xhi]) {
                            *d += v;
                        }
                    } else {
                        for ox in xlo..xhi {
                            dst_row[ox * g.stride + kx - g.pad] += line[ox];
                        }
                    }
                }
            }
        }
    }
}

avx2_dispatch! {
    /// The patches of one image `x` as a (k x n) matrix `cols` with row stride `g.ld()`: writes
    /// the `n` columns of each of the `k` rows, nothing else ([`Patches`] holds the matrix).
    fn im2col<T>(g: &Geom, x: &[T], cols: &mut [MaybeUninit<T>]) = im2col_impl
}

/// Storage for one image's (k x n) patch matrix, rows `g.ld()` apart, written again for each
/// image by [`im2col`].
struct Patches<T> {
    cols: Uninit<T>,
    /// `(k, n, ld)` of the geometry it was made for.
    shape: (usize, usize, usize),
}

impl<T: Float> Patches<T> {
    fn new(g: &Geom) -> Self {
        let (k, n, ld) = (g.k(), g.n(), g.ld());
        let mut cols = Uninit::new(k * ld);
        // The padding columns of each row (`n..ld`), which im2col never writes and the GEMMs
        // never read, zeroed once: then every element holds a value after each `im2col`.
        if ld > n {
            for row in cols.chunks_exact_mut(ld) {
                fill(&mut row[n..], T::ZERO);
            }
        }
        Self {
            cols,
            shape: (k, n, ld),
        }
    }

    /// The patches of image `x` under `g` (the geometry this was made for).
    fn of(&mut self, g: &Geom, x: &[T]) -> &[T] {
        assert_eq!(
            self.shape,
            (g.k(), g.n(), g.ld()),
            "patch matrix of another shape"
        );
        im2col(g, x, &mut self.cols);
        // SAFETY: `im2col` wrote the n columns of each of the k rows (one per channel and
        // kernel tap), and `new` zeroed the rest of each row.
        unsafe { assume_init_ref(&self.cols) }
    }
}

avx2_dispatch! {
    /// Adds the (k x n) patch gradients `cols` onto one image's `dx`.
    fn col2im_add<T>(g: &Geom, cols: &[T], dx: &mut [T]) = col2im_add_impl
}

/// Splits `0..b` into per-thread chunks; single-image work uses GEMM's own threads instead.
fn plan(b: usize) -> (usize, Parallelism) {
    let t = threads();
    if b >= t {
        (b.div_ceil(t), Parallelism::None)
    } else {
        (
            1,
            if t > 1 {
                Parallelism::Rayon(t)
            } else {
                Parallelism::None
            },
        )
    }
}

/// `conv(x, w) + bias [+ residual]`, the residual shaped like the output; `weight` is `w`'s
/// tensor, for a kept Winograd kernel ([`super::transformed_kernel`]).
pub(super) fn forward<T: Float>(
    g: &Geom,
    x: &[T],
    (w, weight): (&[T], Option<candle_core::TensorId>),
    bias: &[T],
    residual: Option<&[T]>,
) -> Vec<T> {
    let (k, n) = (g.k(), g.n());
    let mut y = Uninit::new(g.b * g.out_len());
    let (chunk, par) = plan(g.b);
    if let Some(s) = g.winograd().filter(|&s| winograd::enough_tiles(s, chunk)) {
        let f43 = winograd::f43_worthwhile(s, chunk);
        let u = super::transformed_kernel(g.o, g.c, w, weight, f43);
        y.par_chunks_mut(chunk * g.out_len())
            .enumerate()
            .for_each(|(ci, ys)| {
                let (first, count) = (ci * chunk, ys.len() / g.out_len());
                let xs = &x[first * g.in_len()..(first + count) * g.in_len()];
                let bias = if bias.len() == g.o {
                    bias
                } else {
                    &bias[first * g.o..(first + count) * g.o]
                };
                let rs = residual.map(|r| &r[first * g.out_len()..(first + count) * g.out_len()]);
                let u = winograd::Kernel::Own(&u[..]);
                winograd::conv_by(f43, s, count, xs, u, (Some(bias), rs), ys, par);
            });
        // SAFETY: the chunks, each a whole number of images, cover `y`, and `winograd::conv`
        // writes all of its images' outputs.
        return unsafe { y.assume_init() };
    }
    y.par_chunks_mut(chunk * g.out_len())
        .enumerate()
        .for_each(|(ci, ys)| {
            let mut cols = (!g.is_pointwise()).then(|| Patches::new(g));
            for (j, yb) in ys.chunks_mut(g.out_len()).enumerate() {
                let bi = ci * chunk + j;
                let xb = &x[bi * g.in_len()..(bi + 1) * g.in_len()];
                let (rhs, ld): (&[T], usize) = match &mut cols {
                    Some(cols) => (cols.of(g, xb), g.ld()),
                    None => (xb, n),
                };
                // The image's (o x n) block, written in full (no accumulation).
                let yb = matmul_to(g.o, n, k, yb, w, (k, 1), rhs, (ld, 1), par);
                // One bias per channel, or one per (image, channel).
                let bias_b = if bias.len() == g.o {
                    bias
                } else {
                    &bias[bi * g.o..(bi + 1) * g.o]
                };
                match residual {
                    // Added here, while the image's output is still in cache: no pass of its own.
                    Some(r) => {
                        let rb = &r[bi * g.out_len()..(bi + 1) * g.out_len()];
                        for ((row, rrow), &bv) in yb.chunks_mut(n).zip(rb.chunks(n)).zip(bias_b) {
                            row.iter_mut().zip(rrow).for_each(|(v, &r)| *v += bv + r);
                        }
                    }
                    None => {
                        for (row, &bv) in yb.chunks_mut(n).zip(bias_b) {
                            row.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                }
            }
        });
    // SAFETY: the chunks, each a whole number of images, cover `y`, and each image's block of
    // `out_len = o * n` values is written by its GEMM.
    unsafe { y.assume_init() }
}

/// From this many pixels on, the weight gradient is computed transposed: `dW^T = cols dY^T` was
/// faster than `dW = dY cols^T` from 784 pixels on (16-64 channels), equal at 256 pixels and
/// slower at 64 (docs/benchmarks.md, "Kernel decisions").
const DW_TRANSPOSED_MIN_PIXELS: usize = 128;

/// `W'[ci, oc, ky, kx] = W[oc, ci, kh-1-ky, kw-1-kx]`: the kernel of the input gradient.
fn flip_kernel<T: Float>(g: &Geom, w: &[T]) -> Vec<T> {
    let (kh, kw) = (g.kh, g.kw);
    let mut f = vec![T::ZERO; w.len()];
    for oc in 0..g.o {
        for ci in 0..g.c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let src = ((oc * g.c + ci) * kh + ky) * kw + kx;
                    let dst = ((ci * g.o + oc) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx);
                    f[dst] = w[src];
                }
            }
        }
    }
    f
}

/// `dst (cols x rows) += src^T` for `src` (rows x cols), both row-major, in 32 x 32 blocks so
/// that the strided side stays in cache.
fn add_transposed<T: Float>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const BLOCK: usize = 32;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for c in c0..(c0 + BLOCK).min(cols) {
                let drow = &mut dst[c * rows..(c + 1) * rows];
                for r in r0..(r0 + BLOCK).min(rows) {
                    drow[r] += src[r * cols + c];
                }
            }
        }
    }
}

/// Gradients `[dx | dw | db per (image, channel)]` packed in one vector.
pub(super) fn backward<T: Float>(g: &Geom, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
    let (k, n) = (g.k(), g.n());
    let (chunk, par) = plan(g.b);
    let wlen = g.o * k;
    let mut out = Uninit::new(g.b * g.in_len() + wlen + g.b * g.o);
    let (dx, rest) = out.split_at_mut(g.b * g.in_len());
    let t = g.input_gradient_as_conv();
    // The input gradient through Winograd: a whole chunk of images at once, before the
    // per-image loop, with the kernel's own transform read as the flipped kernel's; else
    // through im2col with the flipped kernel, when it is a convolution.
    let t_winograd = t
        .and_then(|t| t.winograd())
        .filter(|&s| winograd::enough_tiles(s, chunk));
    let t_f43 = t_winograd.is_some_and(|s| winograd::f43_worthwhile(s, chunk));
    let u = t_winograd.map(|_| {
        if t_f43 {
            winograd::transform_kernel_f43(g.o, g.c, w, true)
        } else {
            winograd::transform_kernel(g.o, g.c, w)
        }
    });
    let w_flipped = t
        .filter(|_| t_winograd.is_none())
        .map(|_| flip_kernel(g, w));
    // The weight gradient through Winograd: a whole chunk of images at once, no patches.
    let dw_winograd = g
        .winograd()
        .filter(|&s| winograd::weight_grad_worthwhile(s));
    let (dwb, db_rows) = rest.split_at_mut(wlen);
    let dwb = fill(dwb, T::ZERO);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk * g.in_len())
        .zip(db_rows.par_chunks_mut(chunk * g.o))
        .enumerate()
        .map(|(ci, (dxs, dbs))| {
            let mut dw = vec![T::ZERO; wlen];
            let (first, count) = (ci * chunk, dxs.len() / g.in_len());
            let dys = &dy[first * g.out_len()..(first + count) * g.out_len()];
            if let (Some(s), Some(u)) = (t_winograd, &u) {
                let u = if t_f43 {
                    winograd::Kernel::Transposed(u)
                } else {
                    winograd::Kernel::Flipped(u)
                };
                winograd::conv_by(t_f43, s, count, dys, u, (None, None), dxs, par);
            }
            if let Some(s) = dw_winograd {
                let xs = &x[first * g.in_len()..(first + count) * g.in_len()];
                winograd::weight_grad(s, count, xs, dys, &mut dw, par);
            }
            // Scratch: patches (im2col), dcols (a GEMM without accumulation), dW^T (the
            // chunk's first image's GEMM, which the others add to).
            let patches = !g.is_pointwise() && dw_winograd.is_none();
            let mut cols = patches.then(|| Patches::new(g));
            let transposed = n >= DW_TRANSPOSED_MIN_PIXELS && dw_winograd.is_none();
            let mut dw_t = Uninit::new(if transposed { k * g.o } else { 0 });
            let scatter = !g.is_pointwise() && t.is_none();
            let mut dcols = Uninit::new(if scatter { k * n } else { 0 });
            let dx_by_im2col = t.filter(|_| t_winograd.is_none());
            let mut dycols = dx_by_im2col.map(|t| Patches::new(&t));
            for (j, dxb) in dxs.chunks_mut(g.in_len()).enumerate() {
                let bi = ci * chunk + j;
                let xb = &x[bi * g.in_len()..(bi + 1) * g.in_len()];
                let dyb = &dy[bi * g.out_len()..(bi + 1) * g.out_len()];
                if dw_winograd.is_none() {
                    let (colsb, ld): (&[T], usize) = match &mut cols {
                        Some(cols) => (cols.of(g, xb), g.ld()),
                        None => (xb, n),
                    };
                    if transposed {
                        // dW^T (k x o) [+]= cols (k x n) * dY^T (n x o), summed over the
                        // chunk's images and transposed into dW once, after them.
                        let (a, b) = ((ld, 1), (1, n));
                        if j == 0 {
                            matmul_to(k, g.o, n, &mut dw_t, colsb, a, dyb, b, par);
                        } else {
                            // SAFETY: image 0's GEMM above wrote all k * o values.
                            let dw_t = unsafe { assume_init_mut(&mut dw_t) };
                            matmul(k, g.o, n, dw_t, true, colsb, a, dyb, b, par);
                        }
                    } else {
                        // dW (o x k) += dY (o x n) * cols^T (n x k)
                        matmul(g.o, k, n, &mut dw, true, dyb, (n, 1), colsb, (1, ld), par);
                    }
                }
                for (db, row) in dbs[j * g.o..(j + 1) * g.o].iter_mut().zip(dyb.chunks(n)) {
                    db.write(T::of(sum(row, |v| v)));
                }
                // The image's dx, written in full: through Winograd above, or by a GEMM without
                // accumulation (c x h*w values), or zeroed before the scatter of its patch
                // gradients.
                if t_winograd.is_some() {
                    continue;
                }
                if let (Some(t), Some(wf), Some(dycols)) = (&dx_by_im2col, &w_flipped, &mut dycols)
                {
                    // dX (c x h*w) = W' (c x o*kh*kw) * im2col(dY)
                    let dyc = dycols.of(t, dyb);
                    let (tk, tn, tld) = (t.k(), t.n(), t.ld());
                    matmul_to(g.c, tn, tk, dxb, wf, (tk, 1), dyc, (tld, 1), par);
                    continue;
                }
                // dcols (k x n) = W^T (k x o) * dY (o x n)
                if g.is_pointwise() {
                    matmul_to(k, n, g.o, dxb, w, (1, k), dyb, (n, 1), par);
                } else {
                    let dcols = matmul_to(k, n, g.o, &mut dcols, w, (1, k), dyb, (n, 1), par);
                    col2im_add(g, dcols, fill(dxb, T::ZERO));
                }
            }
            if transposed {
                // SAFETY: the chunk holds at least one image (rayon's chunks are never empty),
                // and the first image's GEMM wrote all of dW^T.
                let dw_t = unsafe { assume_init_ref(&dw_t) };
                add_transposed(dw_t, k, g.o, &mut dw);
            }
            dw
        })
        .collect();
    for p in partials {
        for (d, s) in dwb.iter_mut().zip(p) {
            *d += s;
        }
    }
    // SAFETY: dx: the chunks, each a whole number of images, cover it, and every image's block
    // is written above (through Winograd, by a GEMM without accumulation or zeroed before its
    // scatter); dW: zeroed, then summed into; db: the chunks of `db_rows` pair with those of dx
    // (`chunk` images each), and each image's `o` values are written.
    unsafe { out.assume_init() }
}
