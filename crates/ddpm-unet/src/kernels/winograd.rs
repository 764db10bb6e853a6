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

use super::{matmul, unfilled, Float};

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
/// short for the GEMM to run at speed (im2col's is `9 c`), and not when `DDPM_WINOGRAD=0`.
pub(super) fn worthwhile(c: usize, o: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("DDPM_WINOGRAD").map_or(true, |v| v != "0"));
    on && c >= MIN_CHANNELS && o >= MIN_CHANNELS
}

/// Whether the weight gradient of a convolution [`worthwhile`] takes also goes through
/// Winograd ([`weight_grad`]): its GEMMs are (o x tiles) by (tiles x c) per image, which only ran
/// faster than im2col's with 64 channels and more on 32x32 images (conv forward + backward, b32
/// c64 32x32: 31-43 ms against 39-49 ms); a `cifar-small` step (32 channels at 32x32, 64 at
/// 16x16 and 8x8) was 7% slower with it everywhere.
pub(super) fn weight_grad_worthwhile(s: Shape) -> bool {
    let (th, tw) = s.tiles();
    s.c >= 64 && s.o >= 64 && th * tw >= 256
}

/// The fewest input and output channels [`worthwhile`] takes.
const MIN_CHANNELS: usize = 32;

/// Tiles per GEMM: one 32x32 image. The transformed input and output of a group (16 values
/// per tile and channel each, 1 MiB apiece at 64 channels) then stay in a core's 2 MiB L2;
/// groups of four images were slower on our machines (8 MiB of scratch per group).
const TILES_PER_GROUP: usize = 256;

/// `U_ξ[oc][ci] = (G g G^T)_ξ` for the kernel `w` (o, c, 3, 3): 16 matrices (o x c), computed in
/// f64.
pub(super) fn transform_kernel<T: Float>(o: usize, c: usize, w: &[T]) -> Vec<T> {
    let mut u = vec![T::ZERO; 16 * o * c];
    for oc in 0..o {
        for ci in 0..c {
            let g = &w[(oc * c + ci) * 9..(oc * c + ci + 1) * 9];
            // t = G g (4 x 3), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
            let mut t = [[0f64; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j].f64(), g[3 + j].f64(), g[6 + j].f64());
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            for (i, row) in t.iter().enumerate() {
                let [a, b, d] = *row;
                let ut = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (j, &v) in ut.iter().enumerate() {
                    u[((i * 4 + j) * o + oc) * c + ci] = T::of(v);
                }
            }
        }
    }
    u
}

/// `y = conv3x3(x, w) + bias [+ residual]` for `n` images `x` (n, c, h, w) into `y`
/// (n, o, h, w), with `u` from [`transform_kernel`]. `bias` has `o` values, or `n * o` (one per
/// image and channel); `residual` is shaped like `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv<T: Float>(
    s: Shape,
    n: usize,
    x: &[T],
    u: &[T],
    bias: Option<&[T]>,
    residual: Option<&[T]>,
    y: &mut [T],
    par: Parallelism,
) {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    let group = (TILES_PER_GROUP / per_image).clamp(1, n.max(1));
    // Written in full before being read: V by the input transform (every tile of every
    // channel), M by the GEMMs (no accumulation).
    let mut v = unfilled(16 * s.c * group * per_image);
    let mut m = unfilled(16 * s.o * group * per_image);
    let mut d = unfilled(16 * (tw + 1));
    for first in (0..n).step_by(group) {
        let count = group.min(n - first);
        let p = count * per_image;
        let (vl, ml) = (s.c * group * per_image, s.o * group * per_image);
        for img in 0..count {
            let xb = &x[(first + img) * s.in_len()..(first + img + 1) * s.in_len()];
            input_transform(s, xb, &mut v, (vl, p), img * per_image, &mut d);
        }
        for xi in 0..16 {
            matmul(
                s.o,
                p,
                s.c,
                &mut m[xi * ml..xi * ml + s.o * p],
                false,
                &u[xi * s.o * s.c..(xi + 1) * s.o * s.c],
                (s.c, 1),
                &v[xi * vl..xi * vl + s.c * p],
                (p, 1),
                par,
            );
        }
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
            output_transform(s, (&m, ml, p, img * per_image), (bias_b, rb), yb, &mut d);
        }
    }
}

/// The weight gradient `dW` (o, c, 3, 3) of the convolution over `n` images `x` (n, c, h, w)
/// with output gradient `dy` (n, o, h, w), added to `dw`. With `U = G g G^T` the forward pass is
/// linear in `U`, so `dL/dU_ξ = Σ_tiles (A dY A^T)_ξ V_ξ`: per ξ one GEMM (o x tiles) by
/// (tiles x c), summed over the images, then `dL/dg = G^T (dL/dU) G`. The products do 4/9 of
/// im2col's multiply-adds, with the long inner dimension (the tiles) GEMMs run fastest on.
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
    // Written in full before being read: V and Y' by their transforms, dU by the first image's
    // GEMMs (the others accumulate).
    let mut v = unfilled(16 * s.c * per_image);
    let mut yt = unfilled(16 * s.o * per_image);
    let mut du = unfilled(16 * s.o * s.c);
    let mut d = unfilled(16 * (tw + 1));
    for img in 0..n {
        let xb = &x[img * s.in_len()..(img + 1) * s.in_len()];
        let dyb = &dy[img * s.out_len()..(img + 1) * s.out_len()];
        input_transform(s, xb, &mut v, (s.c * per_image, per_image), 0, &mut d);
        grad_transform(s, dyb, &mut yt, &mut d);
        for xi in 0..16 {
            // dU_ξ (o x c) [+]= Y'_ξ (o x tiles) V_ξ^T (tiles x c)
            matmul(
                s.o,
                s.c,
                per_image,
                &mut du[xi * s.o * s.c..(xi + 1) * s.o * s.c],
                img > 0,
                &yt[xi * s.o * per_image..(xi + 1) * s.o * per_image],
                (per_image, 1),
                &v[xi * s.c * per_image..(xi + 1) * s.c * per_image],
                (1, per_image),
                par,
            );
        }
    }
    if n == 0 {
        return;
    }
    // dW += G^T dU G, per channel pair, in f64.
    let (o, c) = (s.o, s.c);
    for oc in 0..o {
        for ci in 0..c {
            let u = |i: usize, j: usize| du[((i * 4 + j) * o + oc) * c + ci].f64();
            // t = G^T dU (3 x 4): rows u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3.
            let t: [[f64; 4]; 3] = [
                std::array::from_fn(|j| u(0, j) + 0.5 * (u(1, j) + u(2, j))),
                std::array::from_fn(|j| 0.5 * (u(1, j) - u(2, j))),
                std::array::from_fn(|j| 0.5 * (u(1, j) + u(2, j)) + u(3, j)),
            ];
            let g = &mut dw[(oc * c + ci) * 9..(oc * c + ci + 1) * 9];
            for (ky, r) in t.iter().enumerate() {
                let [t0, t1, t2, t3] = *r;
                let row = [t0 + 0.5 * (t1 + t2), 0.5 * (t1 - t2), 0.5 * (t1 + t2) + t3];
                for (kx, &val) in row.iter().enumerate() {
                    g[ky * 3 + kx] += T::of(val);
                }
            }
        }
    }
}

/// `out[k] = f(a[k], b[k])`: one element-wise pass over rows of tiles (vectorized where
/// inlined into the transforms).
#[inline(always)]
fn zip_with<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    out.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(o, (&a, &b))| *o = f(a, b));
}

/// `Y'_ξ[oc][tile] = (A dY A^T)_ξ` for one image's output gradient `dy` (o, h, w): each 2x2
/// tile of the gradient spread to the 4x4 of its input tile, `A = [1 0; 1 1; 1 -1; 0 -1]`. In
/// `yt`, matrix ξ holds `o` rows of `th * tw` tiles. `d` is scratch of `16 * (tw + 1)` values.
#[inline(always)]
fn grad_transform_impl<T: Float>(s: Shape, dy: &[T], yt: &mut [T], d: &mut [T]) {
    let (th, tw) = s.tiles();
    let per_image = th * tw;
    // rows[r] = (even, odd) columns of gradient row 2 ty + r, zero outside the image;
    // t[i] = (A dY)_i, the same split.
    let (rows, t) = d[..12 * tw].split_at_mut(4 * tw);
    for oc in 0..s.o {
        let plane = &dy[oc * s.h * s.w..(oc + 1) * s.h * s.w];
        for ty in 0..th {
            for r in 0..2 {
                let (e, o) = rows[2 * r * tw..(2 * r + 2) * tw].split_at_mut(tw);
                e.fill(T::ZERO);
                o.fill(T::ZERO);
                let y = 2 * ty + r;
                if y >= s.h {
                    continue;
                }
                for (k, pair) in plane[y * s.w..(y + 1) * s.w].chunks(2).enumerate() {
                    e[k] = pair[0];
                    if let Some(&odd) = pair.get(1) {
                        o[k] = odd;
                    }
                }
            }
            // A dY on rows: r0, r0 + r1, r0 - r1, -r1.
            let (r0, r1) = rows.split_at(2 * tw);
            let (t0, rest) = t.split_at_mut(2 * tw);
            let (t1, rest) = rest.split_at_mut(2 * tw);
            let (t2, t3) = rest.split_at_mut(2 * tw);
            zip_with(t0, r0, r1, |a, _| a);
            zip_with(t1, r0, r1, |a, b| a + b);
            zip_with(t2, r0, r1, |a, b| a - b);
            zip_with(t3, r0, r1, |_, b| T::ZERO - b);
            // (A dY) A^T on columns: e, e + o, e - o, -o.
            for i in 0..4 {
                let (e, o) = t[2 * i * tw..(2 * i + 2) * tw].split_at(tw);
                let at = |j: usize| ((i * 4 + j) * s.o + oc) * per_image + ty * tw;
                zip_with(&mut yt[at(0)..at(0) + tw], e, o, |a, _| a);
                zip_with(&mut yt[at(1)..at(1) + tw], e, o, |a, b| a + b);
                zip_with(&mut yt[at(2)..at(2) + tw], e, o, |a, b| a - b);
                zip_with(&mut yt[at(3)..at(3) + tw], e, o, |_, b| T::ZERO - b);
            }
        }
    }
}

/// `V_ξ[ci][p0 + tile]` for one image `x` (c, h, w): `B^T d B` of every 4x4 input tile, the
/// tiles of a row of tiles side by side. In `v`, matrix ξ starts at `ξ * xi_stride` and its
/// rows are `ld` apart. `d` is scratch of `16 * (tw + 1)` values.
///
/// The tile at column `tx` reads input columns `2 tx - 1 ..= 2 tx + 2`: with each input row
/// split into its even columns `e[k] = row[2k]` and odd ones shifted by one,
/// `o[k] = row[2k - 1]` (zero outside the image), those are `o[tx], e[tx], o[tx + 1], e[tx + 1]`:
/// every step below is an element-wise pass over contiguous rows of tiles.
#[inline(always)]
fn input_transform_impl<T: Float>(
    s: Shape,
    x: &[T],
    v: &mut [T],
    (xi_stride, ld): (usize, usize),
    p0: usize,
    d: &mut [T],
) {
    let (th, tw) = s.tiles();
    let n = tw + 1;
    // rows[i] = (e, o) of input row 2 ty + i - 1; t[i] = (B^T d)_i, the same split.
    let (rows, t) = d[..16 * n].split_at_mut(8 * n);
    for ci in 0..s.c {
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ty in 0..th {
            for i in 0..4 {
                let (e, o) = rows[2 * i * n..(2 * i + 2) * n].split_at_mut(n);
                let r = (2 * ty + i).wrapping_sub(1);
                if r >= s.h {
                    e.fill(T::ZERO);
                    o.fill(T::ZERO);
                    continue;
                }
                let row = &plane[r * s.w..(r + 1) * s.w];
                e.fill(T::ZERO);
                o.fill(T::ZERO);
                for (k, pair) in row.chunks(2).enumerate() {
                    e[k] = pair[0];
                    if let Some(&odd) = pair.get(1) {
                        o[k + 1] = odd;
                    }
                }
            }
            let row = |i: usize| &rows[i * n..(i + 1) * n];
            // t = B^T d on rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3 (each for e and o).
            for half in 0..2 {
                let (a, b, c, dd) = (row(half), row(2 + half), row(4 + half), row(6 + half));
                let at = |k: usize| (2 * k + half) * n..(2 * k + half + 1) * n;
                zip_with(&mut t[at(0)], a, c, |l, r| l - r);
                zip_with(&mut t[at(1)], b, c, |l, r| l + r);
                zip_with(&mut t[at(2)], c, b, |l, r| l - r);
                zip_with(&mut t[at(3)], b, dd, |l, r| l - r);
            }
            // V = t B on columns: o[tx] - o[tx+1], e[tx] + o[tx+1], o[tx+1] - e[tx],
            // e[tx] - e[tx+1].
            let base = ci * ld + p0 + ty * tw;
            for i in 0..4 {
                let (e, o) = t[2 * i * n..(2 * i + 2) * n].split_at(n);
                let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
                let at = |j: usize| (i * 4 + j) * xi_stride + base;
                zip_with(&mut v[at(0)..at(0) + tw], o0, o1, |a, b| a - b);
                zip_with(&mut v[at(1)..at(1) + tw], e0, o1, |a, b| a + b);
                zip_with(&mut v[at(2)..at(2) + tw], o1, e0, |a, b| a - b);
                zip_with(&mut v[at(3)..at(3) + tw], e0, e1, |a, b| a - b);
            }
        }
    }
}

/// One image's output from `M_ξ[oc][p0 + tile]` (16 matrices `ld` values apart, rows of `p`
/// columns): `A^T M A` per tile, plus bias and residual, into `y` (o, h, w). `d` is scratch of
/// `16 * (tw + 1)` values.
#[inline(always)]
fn output_transform_impl<T: Float>(
    s: Shape,
    (m, ld, p, p0): (&[T], usize, usize, usize),
    (bias, residual): (Option<&[T]>, Option<&[T]>),
    y: &mut [T],
    d: &mut [T],
) {
    let (th, tw) = s.tiles();
    // r[a][j] = (A^T M)_{a j} for the row of tiles; q[a][b] = the tiles' outputs (a, b).
    let (r, q) = d[..12 * tw].split_at_mut(8 * tw);
    for oc in 0..s.o {
        let bv = bias.map_or(T::ZERO, |b| b[oc]);
        for ty in 0..th {
            let base = oc * p + p0 + ty * tw;
            let mm = |i: usize, j: usize| &m[(i * 4 + j) * ld + base..(i * 4 + j) * ld + base + tw];
            // A^T M: rows m0 + m1 + m2 and m1 - m2 - m3.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mm(0, j), mm(1, j), mm(2, j), mm(3, j));
                let (r0, r1) = r.split_at_mut(4 * tw);
                let r0 = &mut r0[j * tw..(j + 1) * tw];
                let r1 = &mut r1[j * tw..(j + 1) * tw];
                for k in 0..tw {
                    r0[k] = m0[k] + m1[k] + m2[k];
                    r1[k] = m1[k] - m2[k] - m3[k];
                }
            }
            // (A^T M) A on columns, plus the bias.
            for a in 0..2 {
                let rr = |j: usize| &r[(a * 4 + j) * tw..(a * 4 + j + 1) * tw];
                let (c0, c1, c2, c3) = (rr(0), rr(1), rr(2), rr(3));
                let (left, right) = q[2 * a * tw..(2 * a + 2) * tw].split_at_mut(tw);
                for k in 0..tw {
                    left[k] = c0[k] + c1[k] + c2[k] + bv;
                    right[k] = c1[k] - c2[k] - c3[k] + bv;
                }
            }
            let plane = oc * s.h * s.w;
            for a in 0..2 {
                let row = 2 * ty + a;
                if row >= s.h {
                    continue;
                }
                let (left, right) = q[2 * a * tw..(2 * a + 2) * tw].split_at(tw);
                let at = plane + row * s.w;
                let out = &mut y[at..at + s.w];
                let pairs = s.w / 2;
                for (pair, (&l, &r)) in out.chunks_exact_mut(2).zip(left.iter().zip(right)) {
                    pair[0] = l;
                    pair[1] = r;
                }
                if s.w % 2 == 1 {
                    out[2 * pairs] = left[pairs];
                }
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
        v: &mut [T],
        strides: (usize, usize),
        p0: usize,
        d: &mut [T],
    ) = input_transform_impl
}

avx2_dispatch! {
    /// See [`grad_transform_impl`].
    fn grad_transform<T>(s: Shape, dy: &[T], yt: &mut [T], d: &mut [T]) = grad_transform_impl
}

avx2_dispatch! {
    /// See [`output_transform_impl`].
    fn output_transform<T>(
        s: Shape,
        m: (&[T], usize, usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [T],
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

    /// (c, o, h, w, n): odd and non-square sizes, one-pixel images, more images than a group.
    const CASES: [(usize, usize, usize, usize, usize); 6] = [
        (3, 5, 6, 8, 2),
        (4, 3, 7, 5, 3),
        (2, 2, 1, 1, 1),
        (5, 4, 2, 3, 2),
        (8, 6, 32, 32, 3),
        (3, 2, 9, 4, 70),
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
            // Added to what is there.
            let mut dw = vec![1f32; o * c * 9];
            weight_grad(s, n, &x, &dy, &mut dw, Parallelism::None);
            for (i, (&g, &e)) in dw.iter().zip(&want).enumerate() {
                let e = e + 1.0;
                assert!(
                    (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{s:?} n={n} [{i}] {g} vs {e}"
                );
            }
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
            let mut y = vec![f32::NAN; n * s.out_len()];
            conv(s, n, &x, &u, Some(&bias), None, &mut y, Parallelism::None);
            for (i, (&g, &e)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{s:?} n={n} [{i}] {g} vs {e}"
                );
            }
            // Per-image biases and a residual.
            let bias_n = values(n * o, 4);
            let residual = values(n * s.out_len(), 5);
            conv(
                s,
                n,
                &x,
                &u,
                Some(&bias_n),
                Some(&residual),
                &mut y,
                Parallelism::None,
            );
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
}
