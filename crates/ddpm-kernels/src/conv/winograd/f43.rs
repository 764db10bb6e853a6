//! Winograd F(4x4, 3x3) (Lavin & Gray 2016, interpolation points 0, ±1, ±2 and ∞): every 4x4
//! output tile from a 6x6 input tile, `Y = A^T [U ⊙ V] A` with `U = G g G^T` and `V = B^T d B`
//! (6x6 each). Per channel pair and tile of sixteen outputs the 36 products of matrices ξ do
//! 36 multiply-adds where F(2x2, 3x3) does 64 and im2col 144: a quarter of im2col's, against
//! F(2x2, 3x3)'s 4/9. The price is rounding: `G` has entries 1/4, 1/6, 1/12 and 1/24 and `A`
//! and `B` entries up to 8, so a sum over 256 channels of unit-size values is off by about
//! 1e-5 of its size in f32, ten times F(2x2, 3x3)'s (still far below what f32 training and
//! sampling notice, and checked against direct sums in the tests).
//!
//! The layout follows [`super`]'s: the tiles of an image run along its rows, so every loop over
//! them is a stream of contiguous loads and stores. An input row is split once into its four
//! phases (columns `4k`, `4k + 1`, `4k + 2` and `4k + 3`); the six columns a tile reads are then
//! runs of those phases at fixed offsets.

// The transforms index their small fixed arrays in loops rather than through iterator adapters
// or `std::array::from_fn`, which were not all inlined into the AVX2 copies (`kernel_block`).
#![allow(clippy::needless_range_loop)]

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{add, load, mul, put, rows_at, store, sub, Shape, Tiling};
use crate::{write_copy, Float, Uninit};

/// F(4x4, 3x3) as [`super::conv`] runs it: 36 matrices ξ (row * 6 + column of the 6x6).
#[derive(Debug, Clone, Copy)]
pub(in crate::conv) struct F43;

impl Tiling<36> for F43 {
    fn tiles(s: Shape) -> (usize, usize) {
        (s.h.div_ceil(4), s.w.div_ceil(4))
    }

    /// The four phases (`tw + 1` values each) of the `4 th + 2` input rows the tiles read, which
    /// is more than the output transform's 16 arrays of `th * tw` tiles.
    fn scratch_len(s: Shape) -> usize {
        let (th, tw) = Self::tiles(s);
        ((4 * th + 2) * 4 * (tw + 1)).max(16 * th * tw)
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
        m: (&[&[T]; 36], usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [MaybeUninit<T>],
        d: &mut [T],
    ) {
        output_transform(s, m, extra, y, d);
    }
}

/// `U_ξ[oc][ci] = (G g G^T)_ξ` for the kernel `w` (o, c, 3, 3), stored as
/// `u[(oc * 36 + ξ) * c + ci]` (as [`super::transform_kernel`] stores its 16). With `flip`, `g`
/// is each 3x3 kernel turned by 180 degrees: read with rows and columns swapped
/// ([`super::Kernel::Transposed`]), that is the kernel of the input gradient.
pub(in crate::conv) fn transform_kernel<T: Float>(
    o: usize,
    c: usize,
    w: &[T],
    flip: bool,
) -> Vec<T> {
    assert_eq!(w.len(), 9 * o * c, "winograd: kernel length");
    let mut u = Uninit::new(36 * o * c);
    if c > 0 {
        u.par_chunks_mut(36 * c)
            .zip(w.par_chunks(9 * c))
            .for_each(|(uo, wo)| kernel_rows(wo, uo, (c, flip)));
    }
    // SAFETY: `w` holds the (c, 3, 3) weights of o channels, so the chunks of 36 c values
    // (none when c == 0) cover `u`, and `kernel_rows` writes all of each.
    unsafe { u.assume_init() }
}

/// [`transform_kernel`] for one output channel: `w` its (c, 3, 3) weights, `u` its 36 rows of
/// `c` values, all written.
#[inline(always)]
fn kernel_rows_impl<T: Float>(w: &[T], u: &mut [MaybeUninit<T>], (c, flip): (usize, bool)) {
    over_blocks!(c, kernel_block(w, u, c, flip));
}

/// `G g` for `L` kernel columns (or, applied to rows of `G g`, `(G g) G^T`):
/// `G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]`.
#[inline(always)]
fn g_rows<T: Float, const L: usize>([g0, g1, g2]: [[T; L]; 3]) -> [[T; L]; 6] {
    let (quarter, half, sixth) = (T::of(0.25), T::of(0.5), T::of(1.0 / 6.0));
    let (s, q, h) = (add(g0, g2), add(mul(quarter, g0), g2), mul(half, g1));
    [
        mul(quarter, g0),
        mul(T::ZERO - sixth, add(s, g1)),
        mul(sixth, sub(g1, s)),
        mul(sixth, add(q, h)),
        mul(sixth, sub(q, h)),
        g2,
    ]
}

/// [`kernel_rows_impl`] for input channels `k..k + L`.
#[inline(always)]
fn kernel_block<T: Float, const L: usize>(
    w: &[T],
    u: &mut [MaybeUninit<T>],
    c: usize,
    flip: bool,
    k: usize,
) {
    let w = &w[k * 9..(k + L) * 9];
    let mut g = [[T::ZERO; L]; 9];
    for (i, gi) in g.iter_mut().enumerate() {
        let tap = if flip { 8 - i } else { i };
        for (l, v) in gi.iter_mut().enumerate() {
            *v = w[l * 9 + tap];
        }
    }
    // t = G g (6 x 3), column by column (t[j][i]: row i of column j); then U = t G^T, row by
    // row. (Loops rather than `std::array::from_fn`, whose closures were not inlined into the
    // AVX2 copies: they ran as baseline x86-64 calls.)
    let mut t = [[[T::ZERO; L]; 6]; 3];
    for j in 0..3 {
        t[j] = g_rows([g[j], g[3 + j], g[6 + j]]);
    }
    for i in 0..6 {
        let r = g_rows([t[0][i], t[1][i], t[2][i]]);
        for j in 0..6 {
            put(u, (i * 6 + j) * c + k, r[j]);
        }
    }
}

avx2_dispatch! {
    /// See [`kernel_rows_impl`].
    fn kernel_rows<T>(w: &[T], u: &mut [MaybeUninit<T>], shape: (usize, bool)) = kernel_rows_impl
}

/// `B^T d` for `L` columns of six rows `d`:
/// `B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
/// 0 4 0 -5 0 1]`.
#[inline(always)]
fn bt_rows<T: Float, const L: usize>([d0, d1, d2, d3, d4, d5]: [[T; L]; 6]) -> [[T; L]; 6] {
    let (two, four, five) = (T::of(2.0), T::of(4.0), T::of(5.0));
    let (a, b) = (sub(d4, mul(four, d2)), sub(d3, mul(four, d1)));
    let (e, f) = (sub(d4, d2), mul(two, sub(d3, d1)));
    [
        add(sub(mul(four, d0), mul(five, d2)), d4),
        add(a, b),
        sub(a, b),
        add(e, f),
        sub(e, f),
        add(sub(mul(four, d1), mul(five, d3)), d5),
    ]
}

/// `A^T m` for `L` columns of six rows `m`: `A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0;
/// 0 1 -1 8 -8 1]`.
#[inline(always)]
fn at_rows<T: Float, const L: usize>([m0, m1, m2, m3, m4, m5]: [[T; L]; 6]) -> [[T; L]; 4] {
    let (two, four, eight) = (T::of(2.0), T::of(4.0), T::of(8.0));
    let (a, b, c, e) = (add(m1, m2), sub(m1, m2), add(m3, m4), sub(m3, m4));
    [
        add(add(m0, a), c),
        add(b, mul(two, e)),
        add(a, mul(four, c)),
        add(add(b, mul(eight, e)), m5),
    ]
}

/// Splits an image row into its four phases in `part`, four runs of `tw + 1` values:
/// `P0[k] = row[4k]`, `P1[k] = row[4k + 1]`, `P2[k] = row[4k + 2]` and `P3[k + 1] = row[4k + 3]`
/// (`P3[0]`, the column left of the image, is zero), zero past the row's end.
#[inline(always)]
fn split_phases<T: Float>(row: &[T], part: &mut [T], tw: usize) {
    let (p0, rest) = part.split_at_mut(tw + 1);
    let (p1, rest) = rest.split_at_mut(tw + 1);
    let (p2, p3) = rest.split_at_mut(tw + 1);
    let quads = row.len() / 4;
    for p in [&mut *p0, &mut *p1, &mut *p2] {
        p[quads..].fill(T::ZERO);
    }
    p3[quads + 1..].fill(T::ZERO);
    p3[0] = T::ZERO;
    over_blocks!(quads, phase_block(row, p0, p1, p2, &mut p3[1..]));
    for (i, &v) in row[4 * quads..].iter().enumerate() {
        [&mut *p0, &mut *p1, &mut *p2][i][quads] = v;
    }
}

/// [`split_phases`] for the `L` column quads from quad `k` on: four loads of `L` values and
/// four stores.
#[inline(always)]
fn phase_block<T: Float, const L: usize>(
    row: &[T],
    p0: &mut [T],
    p1: &mut [T],
    p2: &mut [T],
    p3: &mut [T],
    k: usize,
) {
    let mut q = [T::ZERO; 64];
    for (i, v) in q[..4 * L].chunks_exact_mut(L).enumerate() {
        v.copy_from_slice(&row[4 * k + i * L..4 * k + (i + 1) * L]);
    }
    for (r, p) in [p0, p1, p2, p3].into_iter().enumerate() {
        let mut v = [T::ZERO; L];
        for (l, x) in v.iter_mut().enumerate() {
            *x = q[4 * l + r];
        }
        store::<T, L>(p, k, v);
    }
}

/// `B^T d B` for `L` tiles of a tile row from `k` on. `rows` holds the six input rows the tile
/// row reads, `rs` values apart, each as its four phases ([`split_phases`]): tile `tx` reads
/// columns `4 tx - 1 ..= 4 tx + 4`, which are `P3[tx]`, `P0[tx]`, `P1[tx]`, `P2[tx]`,
/// `P3[tx + 1]` and `P0[tx + 1]`. The result goes to `v[ξ][at + k..]`, ξ = row * 6 + column.
#[inline(always)]
fn input_block<T: Float, const L: usize>(
    (rows, rs, tw): (&[T], usize, usize),
    v: &mut [&mut [MaybeUninit<T>]; 36],
    at: usize,
    k: usize,
) {
    let t1 = tw + 1;
    let cols = [3 * t1, 0, t1, 2 * t1, 3 * t1 + 1, 1];
    // B^T d, column by column (t[j][i]: row i of column j), then times B, row by row (loops:
    // see `kernel_block`).
    let mut t = [[[T::ZERO; L]; 6]; 6];
    for j in 0..6 {
        let mut d = [[T::ZERO; L]; 6];
        for i in 0..6 {
            d[i] = load::<T, L>(rows, i * rs + cols[j] + k);
        }
        t[j] = bt_rows(d);
    }
    let k = at + k;
    for i in 0..6 {
        let r = bt_rows([t[0][i], t[1][i], t[2][i], t[3][i], t[4][i], t[5][i]]);
        for j in 0..6 {
            put(v[i * 6 + j], k, r[j]);
        }
    }
}

/// `A^T m A + bias` for `L` tiles from `k` on: the tiles' 4x4 outputs to `q[a * 4 + b]`.
#[inline(always)]
fn output_block<T: Float, const L: usize>(
    m: &[&[T]; 36],
    bias: T,
    q: &mut [&mut [T]; 16],
    k: usize,
) {
    // A^T m, column by column (r[j][a]: row a of column j), then times A, row by row.
    let mut r = [[[T::ZERO; L]; 4]; 6];
    for j in 0..6 {
        let mut col = [[T::ZERO; L]; 6];
        for i in 0..6 {
            col[i] = load::<T, L>(m[i * 6 + j], k);
        }
        r[j] = at_rows(col);
    }
    let bias = [bias; L];
    for a in 0..4 {
        let s = at_rows([r[0][a], r[1][a], r[2][a], r[3][a], r[4][a], r[5][a]]);
        for b in 0..4 {
            store(q[a * 4 + b], k, add(s[b], bias));
        }
    }
}

/// Interleaves four phases back into an output row: `out[4k + b] = q[b][k]`, all of `out`
/// written (a last, partial quad from the phases' last values).
#[inline(always)]
fn interleave<T: Float>(q: [&[T]; 4], out: &mut [MaybeUninit<T>]) {
    let quads = out.len() / 4;
    over_blocks!(quads, interleave_block(q, out));
    for (b, o) in out[4 * quads..].iter_mut().enumerate() {
        o.write(q[b][quads]);
    }
}

/// [`interleave`] for the `L` quads from quad `k` on.
#[inline(always)]
fn interleave_block<T: Float, const L: usize>(q: [&[T]; 4], out: &mut [MaybeUninit<T>], k: usize) {
    let mut vals = [T::ZERO; 64];
    for (b, p) in q.into_iter().enumerate() {
        for l in 0..L {
            vals[4 * l + b] = p[k + l];
        }
    }
    write_copy(&mut out[4 * k..4 * (k + L)], &vals[..4 * L]);
}

/// `V_ξ[ci][p0 + tile]` for one image `x` (c, h, w): `B^T d B` of every 6x6 input tile. In `v`,
/// matrix ξ starts at `ξ * xi_stride` and its rows are `ld` apart; the image's `th * tw`
/// columns from `p0` of each of its c rows are written, nothing else. `d` is scratch of
/// [`Tiling::scratch_len`] values. Tile row `ty` reads input rows `4 ty - 1 ..= 4 ty + 4`,
/// rows `4 ty ..= 4 ty + 5` of the split (whose row 0 is the zero row above the image).
#[inline(always)]
fn input_transform_impl<T: Float>(
    s: Shape,
    x: &[T],
    v: &mut [MaybeUninit<T>],
    (xi_stride, ld): (usize, usize),
    p0: usize,
    d: &mut [T],
) {
    let (th, tw) = F43::tiles(s);
    let p = th * tw;
    let rs = 4 * (tw + 1);
    let split = &mut d[..(4 * th + 2) * rs];
    // Rows outside the image (the one above it, and those below) stay zero.
    split[..rs].fill(T::ZERO);
    split[(s.h + 1) * rs..].fill(T::ZERO);
    for ci in 0..s.c {
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for (row, part) in plane
            .chunks_exact(s.w)
            .zip(split[rs..].chunks_exact_mut(rs))
        {
            split_phases(row, part, tw);
        }
        let mut out = rows_at::<_, 36>(v, ci * ld + p0, xi_stride, p);
        for ty in 0..th {
            let rows = &split[4 * ty * rs..(4 * ty + 6) * rs];
            over_blocks!(tw, input_block((rows, rs, tw), &mut out, ty * tw));
        }
    }
}

/// One image's output from `M_ξ[oc][p0 + tile]` (the 36 matrices, rows of `p` columns):
/// `A^T M A` per tile, plus bias and residual, into all of `y` (o, h, w). `d` is scratch of
/// [`Tiling::scratch_len`] values.
#[inline(always)]
fn output_transform_impl<T: Float>(
    s: Shape,
    (m, p, p0): (&[&[T]; 36], usize, usize),
    (bias, residual): (Option<&[T]>, Option<&[T]>),
    y: &mut [MaybeUninit<T>],
    d: &mut [T],
) {
    assert_eq!(y.len(), s.out_len(), "winograd: image output length");
    let (th, tw) = F43::tiles(s);
    let tiles = th * tw;
    let mut it = d.chunks_mut(tiles);
    let mut q: [&mut [T]; 16] = std::array::from_fn(|_| it.next().expect("scratch"));
    for oc in 0..s.o {
        let bv = bias.map_or(T::ZERO, |b| b[oc]);
        let base = oc * p + p0;
        let src: [&[T]; 36] = std::array::from_fn(|xi| &m[xi][base..base + tiles]);
        over_blocks!(tiles, output_block(&src, bv, &mut q));
        let plane = oc * s.h * s.w;
        for ty in 0..th {
            for a in 0..4 {
                let row = 4 * ty + a;
                if row >= s.h {
                    break;
                }
                let at = plane + row * s.w;
                let phases = std::array::from_fn(|b| &q[a * 4 + b][ty * tw..(ty + 1) * tw]);
                let out = &mut y[at..at + s.w];
                interleave(phases, out);
                if let Some(res) = residual {
                    // SAFETY: `interleave` wrote all of `out`.
                    let out = unsafe { crate::assume_init_mut(out) };
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
    /// See [`output_transform_impl`].
    fn output_transform<T>(
        s: Shape,
        m: (&[&[T]; 36], usize, usize),
        extra: (Option<&[T]>, Option<&[T]>),
        y: &mut [MaybeUninit<T>],
        d: &mut [T],
    ) = output_transform_impl
}
