//! Nearest-neighbour 2x upsampling, forward and backward (the sum over each 2x2 block), split
//! over the (image, channel) planes. candle's backward of its upsampling is a grouped
//! convolution with a kernel of ones, through its slow CPU convolution.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{assume_init_ref, slice, write_copy, Float, Uninit};

/// Plane height and width of the input from its dims.
fn plane(dims: &[usize], what: &str) -> Result<(usize, usize, usize)> {
    match dims {
        &[b, c, h, w] => Ok((b * c, h, w)),
        d => candle_core::bail!("{what}: expected (b, c, h, w), got {d:?}"),
    }
}

fn forward<T: Float>(x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
    assert_eq!(x.len(), planes * h * w, "upsample: input length");
    let mut y = Uninit::new(planes * 4 * h * w);
    y.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(yp, xp)| {
            for (i, src) in xp.chunks(w).enumerate() {
                let (top, bottom) = yp[2 * i * 2 * w..(2 * i + 2) * 2 * w].split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
                    pair[0].write(v);
                    pair[1].write(v);
                }
                // SAFETY: the loop above wrote both elements of each of the `w` pairs of `top`
                // (`src` is a row of `w` values: `x` holds `planes * h` of them, checked above).
                let top = unsafe { assume_init_ref(top) };
                write_copy(bottom, top);
            }
        });
    // SAFETY: `x` holds `planes` planes of h rows of w values, and each plane's 2h output rows
    // are written above: the top of each pair pair by pair, the bottom as its copy.
    unsafe { y.assume_init() }
}

fn backward<T: Float>(dy: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
    assert_eq!(
        dy.len(),
        planes * 4 * h * w,
        "upsample backward: gradient length"
    );
    let mut dx = Uninit::new(planes * h * w);
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(4 * h * w))
        .for_each(|(dxp, dyp)| {
            for (i, dst) in dxp.chunks_mut(w).enumerate() {
                let rows = &dyp[2 * i * 2 * w..(2 * i + 2) * 2 * w];
                let (top, bottom) = rows.split_at(2 * w);
                for ((d, t), b) in dst
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    d.write((t[0] + t[1]) + (b[0] + b[1]));
                }
            }
        });
    // SAFETY: `dy` holds `planes` planes of 2h rows of 2w values, so each of the planes' h rows
    // of `w` values is written element by element (from `w` pairs of the rows below it).
    unsafe { dx.assume_init() }
}

/// Nearest 2x upsampling of (b, c, h, w) into (b, c, 2h, 2w), as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct UpsampleNearest2x;

/// Its backward pass: (b, c, 2h, 2w) into (b, c, h, w) by summing each 2x2 block.
struct UpsampleNearest2xBackward;

impl CustomOp1 for UpsampleNearest2x {
    fn name(&self) -> &'static str {
        "ddpm-upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, h, w) = plane(l.dims(), "upsample")?;
        let x = (l.dims()[0], l.dims()[1]);
        let storage = dispatch!(s, "upsample", forward, slice(s, l, "x")?, planes, h, w);
        Ok((storage, Shape::from((x.0, x.1, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&UpsampleNearest2xBackward)?,
        ))
    }
}

impl CustomOp1 for UpsampleNearest2xBackward {
    fn name(&self) -> &'static str {
        "ddpm-upsample-nearest-2x-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (planes, h2, w2) = plane(l.dims(), "upsample backward")?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("upsample backward: odd gradient size {h2}x{w2}");
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let dims = (l.dims()[0], l.dims()[1], h, w);
        let storage = dispatch!(s, "upsample", backward, slice(s, l, "grad")?, planes, h, w);
        Ok((storage, Shape::from(dims)))
    }
}

/// Nearest 2x upsampling of `x` (b, c, h, w) through our kernel (made contiguous).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(UpsampleNearest2x)
}
