//! Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) for 3x3, stride-1, padding-1 convolutions, which are most of the
//! U-Nets' work, and for their input gradients (the same convolution with the kernel flipped).
//!
//! Every 2x2 output tile comes from a 4x4 input tile: with `U = G g G^T` (the kernel, 4x4),
//! `V = B^T d B` (the input tile) and `Y = A^T [U ⊙ V] A`, summed over input channels. The sum
//! over channels is, for each of the 16 positions ξ of the 4x4 tile, one matrix product
//! `M_ξ (o x tiles) = U_ξ (o x c) V_ξ (c x tiles)`: 16 products per channel pair and tile of
//! four outputs instead of 36, so the GEMM does 4/9 of im2col's multiply-adds, and the input is
//! copied 4 times instead of 9. The transforms are additions only (and halves in `G`), exact up
//! to rounding; the tiles run along image rows so that every loop over them is a stream of
//! contiguous loads and stores that the compiler vectorizes.

use gemm::Parallelism;
use rayon::prelude::*;

use std::mem::MaybeUninit;

use crate::{
    as_f32, assume_init_mut, assume_init_ref, fill, matmul, matmul_rows_to, matmul_to, Float,
    Uninit,
};

mod dots;

/// Runs the block function `$f::<_, L>(args.., k)` over `k` in `0..$p`: blocks of 16 lanes
/// (one AVX-512 vector of f32, two AVX2 ones), then of eight and four, then single lanes.
macro_rules! over_blocks {
    ($p:expr, $f:ident($($arg:expr),*)) => {{
        let p = $p;
        let mut k = 0;
        while k + 16 <= p {
            $f::<_, 16>($($arg,)* k);
            k += 16;
        }
        if k + 8 <= p {
            $f::<_, 8>($($arg,)* k);
            k += 8;
        }
        if k + 4 <= p {
            $f::<_, 4>($($arg,)* k);
            k += 4;
        }
        while k < p {
            $f::<_, 1>($($arg,)* k);
            k += 1;
        }
    }};
}

mod f43;

pub(super) use f43::{transform_kernel as transform_kernel_f43, F43};

/// One Winograd algorithm F(m x m, 3x3) as [`conv`] runs it, with `XI = (m + 2)^2` matrices ξ:
/// [`F23`] or [`F43`].
pub(super) trait Tiling<const XI: usize> {
    /// Tile rows and columns of an image (sizes not a multiple of m get a last tile partly
    /// outside the image).
    fn tiles(s: Shape) -> (usize, usize);
    /// The scratch the transforms of one image need.
    fn scratch_len(s: Shape) -> usize;
    /// `V_ξ[ci][p0 + tile]` for one image `x` (c, h, w): in `v`, matrix ξ starts at
    /// `ξ * strides.0` and its rows are `strides.1` apart; the image's tiles' columns from `p0`
    /// of each of its c rows are written, nothing else.
    fn input_transform<T: Float>(
        s: Shape,
        x: &[T],
        v: &mut [MaybeUninit<T>],
        strides: (usize, usize),
        p0: usize,
        d: &mut [T],
    );
    /// One image's output (o, h, w), all of `y` written, from the products `M_ξ[oc][p0 + tile]`
    /// (rows of `p` columns), plus bias and residual.
    fn output_transform<T: Float>(
        s: Shape,
        m: (&[&[T]; XI], usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [MaybeUninit<T>],
        d: &mut [T],
    );
}

/// F(2x2, 3x3), this module's own transforms: 16 matrices ξ (row * 4 + column of the 4x4).
#[derive(Debug, Clone, Copy)]
pub(super) struct F23;

impl Tiling<16> for F23 {
    fn tiles(s: Shape) -> (usize, usize) {
        s.tiles()
    }
    fn scratch_len(s: Shape) -> usize {
        scratch_len(s)
    }
    fn input_transform<T: Float>(
        s: Shape,
        x: &[T],
        v: &mut [MaybeUninit<T>],
        strides: (usize, usize),
        p0: usize,
        d: &mut [T],
    ) {
        input_transform(s, x, v, strides, p0, d);
    }
    fn output_transform<T: Float>(
        s: Shape,
        m: (&[&[T]; 16], usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [MaybeUninit<T>],
        d: &mut [T],
    ) {
        output_transform(s, m, extra, y, d);
    }
}

/// A convolution's shape as this module sees it: `c` input and `o` output channels of
/// `h` x `w` images, the output the same size (stride 1, padding 1).
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub c: usize,
    pub o: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    /// Tile rows and columns (odd sizes get a last tile half outside the image).
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.o * self.h * self.w
    }
}

/// Whether Winograd is used for a 3x3, stride-1, padding-1 convolution with `c` input and `o`
/// output channels: not with few channels, where the 16 products' inner dimension `c` is too
/// short for the GEMM to run at speed (im2col's is `9 c`), and not when the [`KernelPolicy`]
/// turns Winograd off.
///
/// [`KernelPolicy`]: crate::KernelPolicy
pub(super) fn worthwhile(c: usize, o: usize) -> bool {
    crate::KernelPolicy::active().winograd && c >= MIN_CHANNELS && o >= MIN_CHANNELS
}

/// Whether the weight gradient of a convolution [`worthwhile`] takes also goes through
/// Winograd ([`weight_grad`]): on images of at least [`WEIGHT_GRAD_MIN_TILES`] tiles (8x8 and
/// up). On 4x4 images (4 tiles) im2col stays faster (docs/benchmarks.md, "Kernel decisions").
pub(super) fn weight_grad_worthwhile(s: Shape) -> bool {
    let (th, tw) = s.tiles();
    th * tw >= WEIGHT_GRAD_MIN_TILES
}

/// The fewest tiles per image [`weight_grad_worthwhile`] takes.
const WEIGHT_GRAD_MIN_TILES: usize = 16;

/// Whether a convolution [`worthwhile`] takes runs F(4x4, 3x3) ([`F43`]) rather than F(2x2,
/// 3x3) on a thread's chunk of `images` images of shape `s`: when the [`KernelPolicy`] asks for
/// it and the chunk holds at least [`MIN_CHUNK_TILES_4X4`] of its 4x4 tiles. Its kernel transform
/// writes 4 times the weights (F(2x2, 3x3)'s 16/9), at every call in training; on fewer tiles
/// that cost more than the GEMMs saved (`learnopencv` training steps at batch 8 were slower with
/// F(4x4, 3x3) on its 8x8 images, 16 tiles per thread; docs/benchmarks.md, "Kernel decisions").
///
/// [`KernelPolicy`]: crate::KernelPolicy
pub(super) fn f43_worthwhile(s: Shape, images: usize) -> bool {
    let (th, tw) = F43::tiles(s);
    crate::KernelPolicy::active().winograd_4x4 && images * th * tw >= MIN_CHUNK_TILES_4X4
}

/// The fewest 4x4 tiles per thread's chunk [`f43_worthwhile`] takes.
const MIN_CHUNK_TILES_4X4: usize = 64;

/// Whether a thread's chunk of `images` images of shape `s` has enough tiles for Winograd to
/// pay for its kernel transform ([`transform_kernel`], 16/9 of the weights written at every
/// call), which the GEMMs of a few tiles do not earn back: at least [`MIN_CHUNK_TILES`]
/// (docs/benchmarks.md, "Kernel decisions").
pub(super) fn enough_tiles(s: Shape, images: usize) -> bool {
    let (th, tw) = s.tiles();
    images * th * tw >= MIN_CHUNK_TILES
}

/// The fewest tiles per thread's chunk [`enough_tiles`] takes.
const MIN_CHUNK_TILES: usize = 16;

/// From this many (output, input) channel pairs on, [`weight_grad`] sums its products by GEMMs
/// rather than by the lane-wise dot products of [`dots`]: `cifar10`'s 128- and 256-channel
/// layers on 32x32 images made its training step 6% faster by GEMMs, while `learnopencv`'s
/// 64-channel ones (up to 192 x 64 pairs) were faster by the dot products (docs/benchmarks.md,
/// "Kernel decisions").
const DOTS_MAX_CHANNEL_PAIRS: usize = 128 * 128;

/// The fewest input and output channels [`worthwhile`] takes.
const MIN_CHANNELS: usize = 32;

/// Tiles per GEMM: one 32x32 image. The transformed input and output of a group (16 values
/// per tile and channel each, 1 MiB apiece at 64 channels) then stay near a core's L2 (1 MiB
/// on our machines); groups of four images were slower (8 MiB of scratch per group), groups of
/// 128 tiles no faster.
const TILES_PER_GROUP: usize = 256;

/// The distance between the 16 matrices ξ of a transformed buffer whose matrices hold `len`
/// values each: `len` and one cache line. The transforms read or write all 16 at once, and
/// matrices a multiple of 4 KiB apart (64 channels of 256 tiles are 64 KiB) fall into the same
/// set of the L1 cache, which holds 12 lines per set: the input transform ran at half speed.
fn xi_stride(len: usize) -> usize {
    len + 16
}

/// `U_ξ[oc][ci] = (G g G^T)_ξ` for the kernel `w` (o, c, 3, 3), stored as `u[(oc * 16 + ξ) * c +
/// ci]`: each output channel's 16 rows together, so that output channels are computed in
/// parallel into contiguous blocks, and matrix ξ is read with a row stride of `16 c`.
/// Vectorized over input channels; `G` has entries 0, ±1/2 and 1, so each value is a sum of a
/// few halved weights in `T`'s precision. (Computed in f64 one pair at a time on one thread,
/// this was a large share of a `cifar10` sampling step at batch 4: U is 16/9 of the weights,
/// 250 MB per forward pass of that model; docs/benchmarks.md, "Kernel decisions".)
pub(super) fn transform_kernel<T: Float>(o: usize, c: usize, w: &[T]) -> Vec<T> {
    assert_eq!(w.len(), 9 * o * c, "winograd: kernel length");
    let mut u = Uninit::new(16 * o * c);
    if c > 0 {
        u.par_chunks_mut(16 * c)
            .zip(w.par_chunks(9 * c))
            .for_each(|(uo, wo)| kernel_rows(wo, uo, c));
    }
    // SAFETY: `w` holds the (c, 3, 3) weights of o channels, so the chunks of 16 c values
    // (none when c == 0) cover `u`, and `kernel_rows` writes all of each.
    unsafe { u.assume_init() }
}

/// [`transform_kernel`] for one output channel: `w` its (c, 3, 3) weights, `u` its 16 rows of
/// `c` values, all written.
#[inline(always)]
fn kernel_rows_impl<T: Float>(w: &[T], u: &mut [MaybeUninit<T>], c: usize) {
    over_blocks!(c, kernel_block(w, u, c));
}

/// [`kernel_rows_impl`] for input channels `k..k + L`.
#[inline(always)]
fn kernel_block<T: Float, const L: usize>(w: &[T], u: &mut [MaybeUninit<T>], c: usize, k: usize) {
    let w = &w[k * 9..(k + L) * 9];
    let g: [[T; L]; 9] = std::array::from_fn(|i| std::array::from_fn(|l| w[l * 9 + i]));
    let h = T::of(0.5);
    // t = G g (4 x 3), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
    let mut t = [[[T::ZERO; L]; 3]; 4];
    for j in 0..3 {
        for l in 0..L {
            let (g0, g1, g2) = (g[j][l], g[3 + j][l], g[6 + j][l]);
            t[0][j][l] = g0;
            t[1][j][l] = h * (g0 + g2 + g1);
            t[2][j][l] = h * (g0 + g2 - g1);
            t[3][j][l] = g2;
        }
    }
    // U = t G^T (4 x 4), row by row.
    for (i, ti) in t.iter().enumerate() {
        let mut r = [[T::ZERO; L]; 4];
        for l in 0..L {
            let (a, b, d) = (ti[0][l], ti[1][l], ti[2][l]);
            r[0][l] = a;
            r[1][l] = h * (a + d + b);
            r[2][l] = h * (a + d - b);
            r[3][l] = d;
        }
        for (j, v) in r.into_iter().enumerate() {
            put(u, (i * 4 + j) * c + k, v);
        }
    }
}

avx2_dispatch! {
    /// See [`kernel_rows_impl`].
    fn kernel_rows<T>(w: &[T], u: &mut [MaybeUninit<T>], c: usize) = kernel_rows_impl
}

/// A transformed kernel as [`conv`] reads it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kernel<'a, T> {
    /// `transform_kernel(o, c, w)` of the convolution's own kernel `w` (o, c, 3, 3).
    Own(&'a [T]),
    /// `transform_kernel(c, o, w)` of the kernel `w` (c, o, 3, 3) of the convolution whose input
    /// gradient this is: read as the transform of the flipped and transposed kernel
    /// `w'[oc, ci, ky, kx] = w[ci, oc, 2 - ky, 2 - kx]`, which is never built. Reversing a kernel
    /// row reverses `G g` except in its two middle entries (`G rev(g) = [g2, s, d, g0]` where
    /// `G g = [g0, s, d, g2]`), so each matrix ξ of `U'` is a matrix of `U` (rows and columns
    /// 0 and 3 of the 4x4 index swapped) transposed, which the GEMM takes as strides. (Building
    /// `w'` or `U'` cost a scattered copy per backward pass: most of the setup of a
    /// 256-channel layer's.)
    Flipped(&'a [T]),
    /// A kernel transformed as the convolution's own (`U_ξ` with `o` rows of `c`) whose
    /// matrices are read transposed: [`transform_kernel_f43`]`(c, o, w, true)` of the kernel
    /// `w` (c, o, 3, 3) of the convolution whose input gradient this is.
    Transposed(&'a [T]),
}

impl<T> Kernel<'_, T> {
    /// Matrix ξ of `XI` as the GEMM's left operand (o x c) of a convolution of shape `s`: the
    /// slice it starts at and its (row, column) strides.
    fn matrix<const XI: usize>(&self, s: Shape, xi: usize) -> (&[T], (usize, usize)) {
        /// Entry i of `G rev(g)` is entry `SWAP[i]` of `G g`.
        const SWAP: [usize; 4] = [3, 1, 2, 0];
        match *self {
            Kernel::Own(u) => (&u[xi * s.c..], (XI * s.c, 1)),
            Kernel::Transposed(u) => (&u[xi * s.o..], (1, XI * s.o)),
            Kernel::Flipped(u) => {
                assert_eq!(
                    XI, 16,
                    "winograd: a flipped kernel is read by F(2x2, 3x3) only"
                );
                let from = SWAP[xi / 4] * 4 + SWAP[xi % 4];
                (&u[from * s.o..], (1, 16 * s.o))
            }
        }
    }
}

/// `y = conv3x3(x, w) + bias [+ residual]` for `n` images `x` (n, c, h, w) into `y`
/// (n, o, h, w), all of which is written, by the Winograd algorithm `Z` with `u` from its
/// kernel transform ([`transform_kernel`] for [`F23`], [`transform_kernel_f43`] for [`F43`]).
/// `bias` has `o` values, or `n * o` (one per image and channel); `residual` is shaped like `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv<T: Float, const XI: usize, Z: Tiling<XI>>(
    s: Shape,
    n: usize,
    x: &[T],
    u: Kernel<'_, T>,
    (bias, residual): (Option<&[T]>, Option<&[T]>),
    y: &mut [MaybeUninit<T>],
    par: Parallelism,
) {
    assert_eq!(y.len(), n * s.out_len(), "winograd: output length");
    let (th, tw) = Z::tiles(s);
    let per_image = th * tw;
    let group = (TILES_PER_GROUP / per_image).clamp(1, n.max(1));
    // V, written by the input transform, and M, by the GEMMs (no accumulation): a group's
    // (c or o) x XI x p values, each channel's XI rows (one per matrix ξ) together, so that the
    // transforms of a channel read or write one block rather than XI places megabytes apart
    // (F(4x4, 3x3)'s input transform, 36 streams, spent half its time on those stores). The
    // GEMMs read and write matrix ξ with a row stride of XI p. The transforms' scratch `d` is
    // small (a few rows of one image) and zeroed.
    let mut v = Uninit::new(s.c * XI * group * per_image);
    let mut m = Uninit::new(s.o * XI * group * per_image);
    let mut d = vec![T::ZERO; Z::scratch_len(s)];
    for first in (0..n).step_by(group) {
        let count = group.min(n - first);
        let p = count * per_image;
        let ld = XI * p;
        for img in 0..count {
            let xb = &x[(first + img) * s.in_len()..(first + img + 1) * s.in_len()];
            Z::input_transform(s, xb, &mut v, (p, ld), img * per_image, &mut d);
        }
        // SAFETY: the input transforms above wrote, for each of the group's `count` images,
        // its `per_image` columns of each of the c * XI rows (`p` apart): all c * ld values.
        let vs = unsafe { assume_init_ref(&v[..s.c * ld]) };
        for xi in 0..XI {
            let (us, strides) = u.matrix::<XI>(s, xi);
            let dst = &mut m[xi * p..];
            matmul_rows_to(
                s.o,
                p,
                s.c,
                (dst, ld),
                us,
                strides,
                &vs[xi * p..],
                (ld, 1),
                par,
            );
        }
        // SAFETY: GEMM ξ wrote rows oc * XI + ξ (p values each, `p` apart) of every output
        // channel oc: together all o * ld values.
        let ms = unsafe { assume_init_ref(&m[..s.o * ld]) };
        let mats: [&[T]; XI] = std::array::from_fn(|xi| &ms[xi * p..]);
        for img in 0..count {
            let bi = first + img;
            let yb = &mut y[bi * s.out_len()..(bi + 1) * s.out_len()];
            let bias_b = bias.map(|b| {
                if b.len() == s.o {
                    b
                } else {
                    &b[bi * s.o..(bi + 1) * s.o]
                }
            });
            let rb = residual.map(|r| &r[bi * s.out_len()..(bi + 1) * s.out_len()]);
            Z::output_transform(s, (&mats, ld, img * per_image), (bias_b, rb), yb, &mut d);
        }
    }
}

/// [`conv`] by F(4x4, 3x3) when `f43` (see [`f43_worthwhile`]; `u` from
/// [`transform_kernel_f43`]), else by F(2x2, 3x3).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_by<T: Float>(
    f43: bool,
    s: Shape,
    n: usize,
    x: &[T],
    u: Kernel<'_, T>,
    extra: (Option<&[T]>, Option<&[T]>),
    y: &mut [MaybeUninit<T>],
    par: Parallelism,
) {
    if f43 {
        conv::<T, 36, F43>(s, n, x, u, extra, y, par);
    } else {
        conv::<T, 16, F23>(s, n, x, u, extra, y, par);
    }
}

/// The weight gradient `dW` (o, c, 3, 3) of the convolution over `n` images `x` (n, c, h, w)
/// with output gradient `dy` (n, o, h, w), added to `dw`. With `U = G g G^T` the forward pass is
/// linear in `U`, so `dL/dU_ξ = Σ_tiles (A dY A^T)_ξ V_ξ`: per ξ a product (o x tiles) by
/// (tiles x c), summed over the images (lane-wise dot products in f32 on AVX2, [`dots`]; a GEMM
/// otherwise), then `dL/dg = G^T (dL/dU) G`. The products do 4/9 of im2col's multiply-adds.
pub(super) fn weight_grad<T: Float>(
    s: Shape,
    n: usize,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    par: Parallelism,
) {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let (o, c) = (s.o, s.c);
    // In f32 on an AVX2 CPU with fewer than DOTS_MAX_CHANNEL_PAIRS channel pairs, dU by
    // lane-wise dot products ([`dots`]), the tiles padded to a multiple of 16 (the AVX-512
    // build's vectors) with zeros; otherwise by GEMMs.
    let lanes = as_f32(x).is_some() && crate::avx2() && o * c < DOTS_MAX_CHANNEL_PAIRS;
    if n == 0 {
        return;
    }
    // Images in groups of about TILES_PER_GROUP tiles side by side, as in `conv`: long rows for
    // the dot products (and GEMMs) on small images.
    let group = (TILES_PER_GROUP / per_image).clamp(1, n.max(1));
    let ld = if lanes {
        (group * per_image).next_multiple_of(16)
    } else {
        group * per_image
    };
    // V and Y' are written by their transforms where a group's images are; the rest (padding
    // columns, a short last group's columns) stays zero: both are zero-filled. (V is storage
    // the input transform writes, shared with `conv`, so it is zeroed through `fill`.) dU is
    // written by the first group's GEMMs (the others accumulate), or from `du_lanes`, summed
    // from zero. The transforms' scratch `d` is small and zeroed.
    let (v_step, y_step) = (xi_stride(c * ld), xi_stride(o * ld));
    let mut v = Uninit::new(16 * v_step);
    fill(&mut v, T::ZERO);
    let mut yt = vec![T::ZERO; 16 * y_step];
    let mut du = Uninit::new(16 * o * c);
    let mut du_lanes = vec![0f32; if lanes { 16 * o * c * 8 } else { 0 }];
    let mut d = vec![T::ZERO; scratch_len(s)];
    for first in (0..n).step_by(group) {
        let count = group.min(n - first);
        if count < group {
            // The last, short group: the columns of the missing images must not count.
            fill(&mut v, T::ZERO);
            yt.fill(T::ZERO);
        }
        for img in 0..count {
            let b = first + img;
            let xb = &x[b * s.in_len()..(b + 1) * s.in_len()];
            let dyb = &dy[b * s.out_len()..(b + 1) * s.out_len()];
            let p0 = img * per_image;
            input_transform(s, xb, &mut v, (v_step, ld), p0, &mut d);
            grad_transform(s, dyb, &mut yt, (y_step, ld), p0, &mut d);
        }
        for xi in 0..16 {
            // SAFETY: `v` was zero-filled when made and has been written only with values since.
            let vs = unsafe { assume_init_ref(&v[xi * v_step..xi * v_step + c * ld]) };
            let ys = &yt[xi * y_step..xi * y_step + o * ld];
            if let (true, Some(ys), Some(vs)) = (lanes, as_f32(ys), as_f32(vs)) {
                let acc = &mut du_lanes[xi * o * c * 8..(xi + 1) * o * c * 8];
                dots::accumulate((o, c, ld), ys, ld, vs, ld, acc);
                continue;
            }
            // dU_ξ (o x c) [+]= Y'_ξ (o x tiles) V_ξ^T (tiles x c)
            let du_xi = &mut du[xi * o * c..(xi + 1) * o * c];
            if first == 0 {
                matmul_to(o, c, ld, du_xi, ys, (ld, 1), vs, (1, ld), par);
            } else {
                // SAFETY: the first group's GEMM for this ξ wrote all o * c values.
                let du_xi = unsafe { assume_init_mut(du_xi) };
                matmul(o, c, ld, du_xi, true, ys, (ld, 1), vs, (1, ld), par);
            }
        }
    }
    if lanes {
        for (u, l) in du.iter_mut().zip(du_lanes.chunks_exact(8)) {
            u.write(T::of(l.iter().map(|&v| v as f64).sum()));
        }
    }
    // SAFETY: with `lanes`, the loop above wrote every value from its 8 lanes in `du_lanes`
    // (`as_f32` is `Some` for f32, so no GEMM ran); otherwise the first group (there is one:
    // n > 0) wrote each of the 16 blocks of o * c values by its GEMM.
    let du = unsafe { du.assume_init() };
    weight_epilogue(&du, (o, c), dw);
}

/// `dW += G^T dU G` for every channel pair: `du` holds the 16 matrices dU_ξ (o x c), `dw` the
/// (o, c, 3, 3) weight gradient. Vectorized over input channels (a channel pair at a time in
/// f64, this was several milliseconds per 256-channel layer, on one thread).
#[inline(always)]
fn weight_epilogue_impl<T: Float>(du: &[T], (o, c): (usize, usize), dw: &mut [T]) {
    for oc in 0..o {
        over_blocks!(c, epilogue_block(du, (o, c, oc), dw));
    }
}

/// [`weight_epilogue_impl`] for output channel `oc` and input channels `k..k + L`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j, ky and tap index several arrays at once
fn epilogue_block<T: Float, const L: usize>(
    du: &[T],
    (o, c, oc): (usize, usize, usize),
    dw: &mut [T],
    k: usize,
) {
    let h = T::of(0.5);
    // t = G^T dU (3 x 4): rows u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3.
    let mut t = [[[T::ZERO; L]; 4]; 3];
    for j in 0..4 {
        let u = |i: usize| load::<T, L>(du, ((i * 4 + j) * o + oc) * c + k);
        let (u0, u1, u2, u3) = (u(0), u(1), u(2), u(3));
        let s = mul(h, add(u1, u2));
        t[0][j] = add(u0, s);
        t[1][j] = mul(h, sub(u1, u2));
        t[2][j] = add(s, u3);
    }
    // g = t G (3 x 3), the same combinations along each row.
    let mut g = [[T::ZERO; L]; 9];
    for ky in 0..3 {
        let [t0, t1, t2, t3] = t[ky];
        let s = mul(h, add(t1, t2));
        g[ky * 3] = add(t0, s);
        g[ky * 3 + 1] = mul(h, sub(t1, t2));
        g[ky * 3 + 2] = add(s, t3);
    }
    let at = (oc * c + k) * 9;
    let out = &mut dw[at..at + 9 * L];
    for l in 0..L {
        for tap in 0..9 {
            out[l * 9 + tap] += g[tap][l];
        }
    }
}

avx2_dispatch! {
    /// See [`weight_epilogue_impl`].
    fn weight_epilogue<T>(du: &[T], shape: (usize, usize), dw: &mut [T]) = weight_epilogue_impl
}

/// `L` consecutive values of `s` from `k`.
#[inline(always)]
fn load<T: Float, const L: usize>(s: &[T], k: usize) -> [T; L] {
    let mut v = [T::ZERO; L];
    v.copy_from_slice(&s[k..k + L]);
    v
}

/// Writes `v` to `d[k..k + L]`.
#[inline(always)]
fn store<T: Float, const L: usize>(d: &mut [T], k: usize, v: [T; L]) {
    d[k..k + L].copy_from_slice(&v);
}

/// Writes `v` to `d[k..k + L]`, storage not yet written ([`store`]'s stores).
#[inline(always)]
fn put<T: Float, const L: usize>(d: &mut [MaybeUninit<T>], k: usize, v: [T; L]) {
    crate::write_copy(&mut d[k..k + L], &v);
}

/// `a + b`, lane-wise (one or two vector instructions once inlined).
#[inline(always)]
fn add<T: Float, const L: usize>(mut a: [T; L], b: [T; L]) -> [T; L] {
    for l in 0..L {
        a[l] += b[l];
    }
    a
}

/// `k a`, lane-wise.
#[inline(always)]
fn mul<T: Float, const L: usize>(k: T, mut a: [T; L]) -> [T; L] {
    for v in &mut a {
        *v *= k;
    }
    a
}

/// `a - b`, lane-wise.
#[inline(always)]
fn sub<T: Float, const L: usize>(mut a: [T; L], b: [T; L]) -> [T; L] {
    for l in 0..L {
        a[l] -= b[l];
    }
    a
}

/// Row `start` of each of the `XI` matrices ξ of a transformed buffer, matrix ξ's row at
/// `start + ξ * step`, `len` values each (`len <= step`).
fn rows_at<T, const XI: usize>(
    v: &mut [T],
    start: usize,
    step: usize,
    len: usize,
) -> [&mut [T]; XI] {
    assert!(len <= step, "winograd: the rows of a buffer overlap");
    let mut rest = &mut v[start..];
    std::array::from_fn(|xi| {
        let cut = if xi + 1 < XI { step } else { len };
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(cut);
        rest = tail;
        &mut row[..len]
    })
}

/// Scratch the transforms need for a shape: the input transform's even and odd halves
/// (`tw + 1` values each) of the `2 th + 2` input rows its tiles read, which is at least the
/// output transforms' four arrays of `th * tw` tiles.
fn scratch_len(s: Shape) -> usize {
    let (th, tw) = s.tiles();
    (2 * th + 2) * 2 * (tw + 1)
}

/// Splits an image row into its even and odd columns, `even[k] = row[2k]`,
/// `odd[k] = row[2k + 1]`, zero past the row's end.
#[inline(always)]
fn deinterleave<T: Float>(row: &[T], even: &mut [T], odd: &mut [T]) {
    let pairs = row.len() / 2;
    over_blocks!(pairs, deinterleave_block(row, even, odd));
    if row.len() % 2 == 1 {
        even[pairs] = row[row.len() - 1];
        odd[pairs] = T::ZERO;
    }
}

/// [`deinterleave`] for the `L` pairs from pair `k` on, as two loads of `L` values and two
/// stores (a loop over pairs stayed scalar: a quarter of the input transform's time).
#[inline(always)]
fn deinterleave_block<T: Float, const L: usize>(
    row: &[T],
    even: &mut [T],
    odd: &mut [T],
    k: usize,
) {
    let (a, b) = (load::<T, L>(row, 2 * k), load::<T, L>(row, 2 * k + L));
    let pick = |i: usize| if i < L { a[i] } else { b[i - L] };
    store::<T, L>(even, k, std::array::from_fn(|l| pick(2 * l)));
    store::<T, L>(odd, k, std::array::from_fn(|l| pick(2 * l + 1)));
}

/// `B^T d B` for `L` tiles of a tile row from `k` on. `rows` holds the four input rows the
/// tile row reads, `rs` values apart, each as its even columns and a zero (`tw + 1` values)
/// followed by a zero and its odd columns: tile `tx` reads columns `2 tx - 1 ..= 2 tx + 2`,
/// which are odd `tx - 1`, even `tx`, odd `tx`, even `tx + 1`, at offsets `tw + 1 + tx`, `tx`,
/// `tw + 2 + tx` and `tx + 1` of the row. The result goes to `v[ξ][at + k..]`, ξ = row * 4 +
/// column of the 4x4.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j indexes the columns of d and of t
fn input_block<T: Float, const L: usize>(
    (rows, rs, tw): (&[T], usize, usize),
    v: &mut [&mut [MaybeUninit<T>]; 16],
    at: usize,
    k: usize,
) {
    let cols = [tw + 1, 0, tw + 2, 1];
    let d = |i: usize, j: usize| load::<T, L>(rows, i * rs + cols[j] + k);
    let mut t = [[[T::ZERO; L]; 4]; 4];
    // B^T d on the rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    for j in 0..4 {
        let (d0, d1, d2, d3) = (d(0, j), d(1, j), d(2, j), d(3, j));
        t[0][j] = sub(d0, d2);
        t[1][j] = add(d1, d2);
        t[2][j] = sub(d2, d1);
        t[3][j] = sub(d1, d3);
    }
    // Times B on the columns, the same combinations.
    let k = at + k;
    for (i, [t0, t1, t2, t3]) in t.into_iter().enumerate() {
        put(v[i * 4], k, sub(t0, t2));
        put(v[i * 4 + 1], k, add(t1, t2));
        put(v[i * 4 + 2], k, sub(t2, t1));
        put(v[i * 4 + 3], k, sub(t1, t3));
    }
}

/// `A^T m A + bias` for `L` tiles from `k` on: the tiles' 2x2 outputs to `q[a * 2 + b]`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j indexes the columns of m and of r
fn output_block<T: Float, const L: usize>(
    m: &[&[T]; 16],
    bias: T,
    q: &mut [&mut [T]; 4],
    k: usize,
) {
    let m = |i: usize, j: usize| load::<T, L>(m[i * 4 + j], k);
    let mut r = [[[T::ZERO; L]; 4]; 2];
    // A^T m on the rows: m0 + m1 + m2, m1 - m2 - m3.
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m(0, j), m(1, j), m(2, j), m(3, j));
        r[0][j] = add(add(m0, m1), m2);
        r[1][j] = sub(sub(m1, m2), m3);
    }
    // Times A on the columns, plus the bias.
    let bias = [bias; L];
    for (a, [r0, r1, r2, r3]) in r.into_iter().enumerate() {
        store(q[a * 2], k, add(add(add(r0, r1), r2), bias));
        store(q[a * 2 + 1], k, add(sub(sub(r1, r2), r3), bias));
    }
}

/// `A dY A^T` for `L` tiles from `k` on: `q[a * 2 + b]` holds the tiles' output gradient at
/// (a, b) of their 2x2; the 4x4 result goes to `yt[ξ]`.
#[inline(always)]
fn grad_block<T: Float, const L: usize>(q: &[&[T]; 4], yt: &mut [&mut [T]; 16], k: usize) {
    let zero = [T::ZERO; L];
    let (q00, q01, q10, q11) = (load(q[0], k), load(q[1], k), load(q[2], k), load(q[3], k));
    // A dY on the rows: y0, y0 + y1, y0 - y1, -y1 (each an (even, odd) column pair).
    let rows = [
        (q00, q01),
        (add(q00, q10), add(q01, q11)),
        (sub(q00, q10), sub(q01, q11)),
        (sub(zero, q10), sub(zero, q11)),
    ];
    // Times A^T on the columns, the same combinations.
    for (i, (e, o)) in rows.into_iter().enumerate() {
        store(yt[i * 4], k, e);
        store(yt[i * 4 + 1], k, add(e, o));
        store(yt[i * 4 + 2], k, sub(e, o));
        store(yt[i * 4 + 3], k, sub(zero, o));
    }
}

/// `Y'_ξ[oc][tile] = (A dY A^T)_ξ` for one image's output gradient `dy` (o, h, w): each 2x2
/// tile of the gradient spread to the 4x4 of its input tile, `A = [1 0; 1 1; 1 -1; 0 -1]`. In
/// `yt`, matrix ξ starts at `ξ * xi_stride`, its rows are `ld` apart and the image's tiles start
/// at column `p0`. `d` is scratch of [`scratch_len`] values.
#[inline(always)]
fn grad_transform_impl<T: Float>(
    s: Shape,
    dy: &[T],
    yt: &mut [T],
    (xi_stride, ld): (usize, usize),
    p0: usize,
    d: &mut [T],
) {
    let (th, tw) = s.tiles();
    let p = th * tw;
    // q[a * 2 + b][ty * tw + tx]: the gradient at row 2 ty + a, column 2 tx + b (zero outside).
    let mut it = d.chunks_mut(p);
    let mut q: [&mut [T]; 4] = std::array::from_fn(|_| it.next().expect("scratch"));
    for oc in 0..s.o {
        let plane = &dy[oc * s.h * s.w..(oc + 1) * s.h * s.w];
        for ty in 0..th {
            let [q00, q01, q10, q11] = &mut q;
            for (a, (even, odd)) in [(q00, q01), (q10, q11)].into_iter().enumerate() {
                let (even, odd) = (
                    &mut even[ty * tw..(ty + 1) * tw],
                    &mut odd[ty * tw..(ty + 1) * tw],
                );
                let y = 2 * ty + a;
                if y < s.h {
                    deinterleave(&plane[y * s.w..(y + 1) * s.w], even, odd);
                } else {
                    even.fill(T::ZERO);
                    odd.fill(T::ZERO);
                }
            }
        }
        let q: [&[T]; 4] = std::array::from_fn(|i| &*q[i]);
        let mut out = rows_at::<_, 16>(yt, oc * ld + p0, xi_stride, p);
        over_blocks!(p, grad_block(&q, &mut out));
    }
}

/// `V_ξ[ci][p0 + tile]` for one image `x` (c, h, w): `B^T d B` of every 4x4 input tile,
/// `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`. In `v`, matrix ξ starts at `ξ * xi_stride`
/// and its rows are `ld` apart; the image's `th * tw` columns from `p0` of each of its c rows
/// are written, nothing else. `d` is scratch of [`scratch_len`] values.
///
/// Each input row is first split once into its even and odd columns ([`deinterleave`], one
/// vectorized pass), padded with a zero on the side where the tiles reach outside the image;
/// the four columns a tile reads are then runs of those halves at fixed offsets, so every
/// tile row is one vectorized pass ([`input_block`]). Tile row `ty` reads input rows
/// `2 ty - 1 ..= 2 ty + 2`, rows `2 ty ..= 2 ty + 3` of the split (whose row 0 is the zero row
/// above the image).
#[inline(always)]
fn input_transform_impl<T: Float>(
    s: Shape,
    x: &[T],
    v: &mut [MaybeUninit<T>],
    (xi_stride, ld): (usize, usize),
    p0: usize,
    d: &mut [T],
) {
    let (th, tw) = s.tiles();
    let p = th * tw;
    let rs = 2 * (tw + 1);
    let split = &mut d[..(2 * th + 2) * rs];
    // Rows outside the image (the one above it, and one or two below) stay zero.
    split[..rs].fill(T::ZERO);
    split[(s.h + 1) * rs..].fill(T::ZERO);
    for ci in 0..s.c {
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for (row, part) in plane
            .chunks_exact(s.w)
            .zip(split[rs..].chunks_exact_mut(rs))
        {
            let (even, odd) = part.split_at_mut(tw + 1);
            even[tw] = T::ZERO;
            odd[0] = T::ZERO;
            deinterleave(row, &mut even[..tw], &mut odd[1..]);
        }
        let mut out = rows_at::<_, 16>(v, ci * ld + p0, xi_stride, p);
        for ty in 0..th {
            let rows = &split[2 * ty * rs..(2 * ty + 4) * rs];
            over_blocks!(tw, input_block((rows, rs, tw), &mut out, ty * tw));
        }
    }
}

/// One image's output from `M_ξ[oc][p0 + tile]` (the 16 matrices, rows of `p` columns):
/// `A^T M A` per tile, plus bias and residual, into all of `y` (o, h, w). `d` is scratch of
/// [`scratch_len`] values.
#[inline(always)]
fn output_transform_impl<T: Float>(
    s: Shape,
    (m, p, p0): (&[&[T]; 16], usize, usize),
    (bias, residual): (Option<&[T]>, Option<&[T]>),
    y: &mut [MaybeUninit<T>],
    d: &mut [T],
) {
    assert_eq!(y.len(), s.out_len(), "winograd: image output length");
    let (th, tw) = s.tiles();
    let tiles = th * tw;
    let mut it = d.chunks_mut(tiles);
    let mut q: [&mut [T]; 4] = std::array::from_fn(|_| it.next().expect("scratch"));
    for oc in 0..s.o {
        let bv = bias.map_or(T::ZERO, |b| b[oc]);
        let base = oc * p + p0;
        let src: [&[T]; 16] = std::array::from_fn(|xi| &m[xi][base..base + tiles]);
        over_blocks!(tiles, output_block(&src, bv, &mut q));
        // Interleave the tiles' columns into the image's rows.
        let plane = oc * s.h * s.w;
        for ty in 0..th {
            for a in 0..2 {
                let row = 2 * ty + a;
                if row >= s.h {
                    continue;
                }
                let left = &q[a * 2][ty * tw..(ty + 1) * tw];
                let right = &q[a * 2 + 1][ty * tw..(ty + 1) * tw];
                let at = plane + row * s.w;
                let out = &mut y[at..at + s.w];
                let pairs = s.w / 2;
                for (pair, (&l, &r)) in out.chunks_exact_mut(2).zip(left.iter().zip(right)) {
                    pair[0].write(l);
                    pair[1].write(r);
                }
                if s.w % 2 == 1 {
                    out[2 * pairs].write(left[pairs]);
                }
                // SAFETY: `left` and `right` hold `tw = ceil(w / 2)` values, so the loop above
                // wrote both elements of each of the w / 2 pairs, and the line after it the
                // last element of an odd row.
                let out = unsafe { assume_init_mut(out) };
                if let Some(res) = residual {
                    for (o, &rv) in out.iter_mut().zip(&res[at..at + s.w]) {
                        *o += rv;
                    }
                }
            }
        }
    }
}

avx2_dispatch! {
    /// See [`input_transform_impl`].
    fn input_transform<T>(
        s: Shape,
        x: &[T],
        v: &mut [MaybeUninit<T>],
        strides: (usize, usize),
        p0: usize,
        d: &mut [T],
    ) = input_transform_impl
}

avx2_dispatch! {
    /// See [`grad_transform_impl`].
    fn grad_transform<T>(
        s: Shape,
        dy: &[T],
        yt: &mut [T],
        strides: (usize, usize),
        p0: usize,
        d: &mut [T],
    ) = grad_transform_impl
}

avx2_dispatch! {
    /// See [`output_transform_impl`].
    fn output_transform<T>(
        s: Shape,
        m: (&[&[T]; 16], usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [MaybeUninit<T>],
        d: &mut [T],
    ) = output_transform_impl
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `f(x index, w index, y index)` for every product of a direct 3x3, stride-1,
    /// padding-1 convolution of `n` images.
    fn taps(s: Shape, n: usize, mut f: impl FnMut(usize, usize, usize)) {
        for b in 0..n {
            for oc in 0..s.o {
                for oy in 0..s.h {
                    for ox in 0..s.w {
                        for ci in 0..s.c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    // Input row oy + ky - 1, column ox + kx - 1, if inside.
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > s.h || ix > s.w {
                                        continue;
                                    }
                                    f(
                                        ((b * s.c + ci) * s.h + iy - 1) * s.w + ix - 1,
                                        ((oc * s.c + ci) * 3 + ky) * 3 + kx,
                                        ((b * s.o + oc) * s.h + oy) * s.w + ox,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Direct 3x3, stride-1, padding-1 convolution in f64.
    fn direct(s: Shape, n: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f64> {
        let mut y: Vec<f64> = (0..n * s.out_len())
            .map(|i| bias[(i / (s.h * s.w)) % s.o] as f64)
            .collect();
        taps(s, n, |xi, wi, yi| y[yi] += x[xi] as f64 * w[wi] as f64);
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let k = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                (k >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// (c, o, h, w, n): odd and non-square sizes, one-pixel images, more images than a group,
    /// input channels in blocks of 16, 8, 4 and single lanes (the kernel transform).
    const CASES: [(usize, usize, usize, usize, usize); 7] = [
        (3, 5, 6, 8, 2),
        (4, 3, 7, 5, 3),
        (2, 2, 1, 1, 1),
        (5, 4, 2, 3, 2),
        (8, 6, 32, 32, 3),
        (3, 2, 9, 4, 70),
        (29, 3, 5, 6, 2),
    ];

    #[test]
    fn weight_gradient_matches_direct_sums() {
        for (c, o, h, w, n) in CASES {
            let s = Shape { c, o, h, w };
            let x = values(n * s.in_len(), 6);
            let dy = values(n * s.out_len(), 7);
            // dW[oc][ci][ky][kx] = sum over images and outputs of dy * x at the shifted input.
            let mut want = vec![0f64; o * c * 9];
            taps(s, n, |xi, wi, yi| want[wi] += x[xi] as f64 * dy[yi] as f64);
            // Added to what is there. f32 takes the lane-wise dot products (on an AVX2 CPU),
            // f64 the GEMMs.
            let mut dw = vec![1f32; o * c * 9];
            weight_grad(s, n, &x, &dy, &mut dw, Parallelism::None);
            let (x64, dy64): (Vec<f64>, Vec<f64>) = (
                x.iter().map(|&v| v as f64).collect(),
                dy.iter().map(|&v| v as f64).collect(),
            );
            let mut dw64 = vec![1f64; o * c * 9];
            weight_grad(s, n, &x64, &dy64, &mut dw64, Parallelism::None);
            for (i, ((&g, &g64), &e)) in dw.iter().zip(&dw64).zip(&want).enumerate() {
                let e = e + 1.0;
                assert!(
                    (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{s:?} n={n} [{i}] {g} vs {e}"
                );
                assert!(
                    (g64 - e).abs() <= 1e-10 * (1.0 + e.abs()),
                    "f64 {s:?} [{i}]"
                );
            }
        }
    }

    /// The root mean square of `v`.
    fn rms(v: &[f64]) -> f64 {
        (v.iter().map(|e| e * e).sum::<f64>() / v.len().max(1) as f64).sqrt()
    }

    /// `conv` by `Z` of `n` images `x` with kernel `u` and no residual, checked against `want`
    /// (f64): each value within `tol` of its own size plus the outputs' root mean square (at
    /// least 1). Winograd's rounding scales with the size of the sums' terms, not of the sum.
    fn assert_conv<const XI: usize, Z: Tiling<XI>>(
        s: Shape,
        (n, x): (usize, &[f32]),
        u: Kernel<'_, f32>,
        bias: Option<&[f32]>,
        want: &[f64],
        tol: f64,
    ) {
        let mut y = Uninit::new(n * s.out_len());
        conv::<_, XI, Z>(s, n, x, u, (bias, None), &mut y, Parallelism::None);
        // SAFETY: `conv` writes all of `y` (in tests `Uninit` starts as NaN, so a value it
        // missed fails the comparison below).
        let y = unsafe { y.assume_init() };
        let scale = rms(want).max(1.0);

        for (i, (&g, &e)) in y.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - e).abs() <= tol * (scale + e.abs()),
                "{s:?} n={n} [{i}] {g} vs {e}"
            );
        }
    }

    #[test]
    fn matches_a_direct_convolution_on_even_odd_and_tiny_images() {
        for (c, o, h, w, n) in CASES {
            let s = Shape { c, o, h, w };
            let x = values(n * s.in_len(), 1);
            let wt = values(o * c * 9, 2);
            let bias = values(o, 3);
            let want = direct(s, n, &x, &wt, &bias);
            let u = transform_kernel(o, c, &wt);
            assert_conv::<16, F23>(s, (n, &x), Kernel::Own(&u), Some(&bias), &want, 1e-5);
            // Per-image biases and a residual.
            let bias_n = values(n * o, 4);
            let residual = values(n * s.out_len(), 5);
            let mut y = Uninit::new(n * s.out_len());
            conv::<_, 16, F23>(
                s,
                n,
                &x,
                Kernel::Own(&u),
                (Some(&bias_n), Some(&residual)),
                &mut y,
                Parallelism::None,
            );
            // SAFETY: as above.
            let y = unsafe { y.assume_init() };
            for b in 0..n {
                let want_b = direct(
                    s,
                    1,
                    &x[b * s.in_len()..(b + 1) * s.in_len()],
                    &wt,
                    &bias_n[b * o..(b + 1) * o],
                );
                for (i, &e) in want_b.iter().enumerate() {
                    let at = b * s.out_len() + i;
                    let e = e + residual[at] as f64;
                    assert!(
                        (y[at] as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{s:?} image {b} [{i}]"
                    );
                }
            }
        }
    }

    /// F(4x4, 3x3) on the same shapes (sizes 1 to 9 and 32, none, some or all a multiple of 4;
    /// partial tiles on every side), and on 256 channels of unit-size values, where its
    /// rounding is largest: within 1e-5 of a value's size on the small cases (the sums there
    /// are short) and 5e-5 on 256 channels (F(2x2, 3x3) is within 1e-5 on both).
    #[test]
    fn f43_matches_a_direct_convolution() {
        let wide = (256, 3, 12, 10, 2);
        for (c, o, h, w, n) in CASES
            .into_iter()
            .chain([(6, 4, 4, 4, 2), (7, 2, 13, 17, 1), wide])
        {
            let s = Shape { c, o, h, w };
            let x = values(n * s.in_len(), 1);
            let scale = if c > 64 { 4.0 } else { 1.0 };
            let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
            let wt = values(o * c * 9, 2);
            let bias = values(o, 3);
            let want = direct(s, n, &x, &wt, &bias);
            let u = transform_kernel_f43(o, c, &wt, false);
            let tol = if c > 64 { 5e-5 } else { 1e-5 };
            let u2 = transform_kernel(o, c, &wt);
            assert_conv::<16, F23>(s, (n, &x), Kernel::Own(&u2), Some(&bias), &want, tol);
            assert_conv::<36, F43>(s, (n, &x), Kernel::Own(&u), Some(&bias), &want, tol);
            // Per-image biases and a residual.
            let bias_n = values(n * o, 4);
            let residual = values(n * s.out_len(), 5);
            let mut y = Uninit::new(n * s.out_len());
            let extra = (Some(&bias_n[..]), Some(&residual[..]));
            conv::<_, 36, F43>(s, n, &x, Kernel::Own(&u), extra, &mut y, Parallelism::None);
            // SAFETY: as in `assert_conv`.
            let y = unsafe { y.assume_init() };
            let scale = rms(&want).max(1.0);
            for b in 0..n {
                let xb = &x[b * s.in_len()..(b + 1) * s.in_len()];
                let want_b = direct(s, 1, xb, &wt, &bias_n[b * o..(b + 1) * o]);
                for (i, &e) in want_b.iter().enumerate() {
                    let at = b * s.out_len() + i;
                    let e = e + residual[at] as f64;
                    assert!(
                        (y[at] as f64 - e).abs() <= tol * (scale + e.abs()),
                        "{s:?} image {b} [{i}]"
                    );
                }
            }
        }
    }

    /// A kernel read as [`Kernel::Flipped`] convolves as the flipped and transposed kernel
    /// itself does.
    #[test]
    fn a_flipped_kernel_convolves_as_the_flipped_kernel() {
        for (c, o, h, w, n) in CASES {
            let s = Shape { c, o, h, w };
            let x = values(n * s.in_len(), 1);
            // The kernel (c, o, 3, 3) of the convolution whose input gradient this is.
            let wt = values(c * o * 9, 2);
            let mut flipped = vec![0f32; wt.len()];
            for oc in 0..o {
                for ci in 0..c {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            flipped[((oc * c + ci) * 3 + ky) * 3 + kx] =
                                wt[((ci * o + oc) * 3 + 2 - ky) * 3 + 2 - kx];
                        }
                    }
                }
            }
            let want = direct(s, n, &x, &flipped, &vec![0f32; o]);
            let u = transform_kernel(c, o, &wt);
            assert_conv::<16, F23>(s, (n, &x), Kernel::Flipped(&u), None, &want, 1e-5);
            // F(4x4, 3x3) of the kernel turned by 180 degrees, read transposed.
            let u = transform_kernel_f43(c, o, &wt, true);
            assert_conv::<36, F43>(s, (n, &x), Kernel::Transposed(&u), None, &want, 1e-5);
        }
    }
}
