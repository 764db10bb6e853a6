//! Nearest 2x upsampling on the CPU, forward and backward (the sum over each 2x2 block), split
//! over the (image, channel) planes.

use rayon::prelude::*;

use crate::{assume_init_ref, write_copy, Float, Uninit};

/// `planes` planes of h x w into 2h x 2w, each value copied to its 2x2 block.
pub(super) fn forward<T: Float>(x: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
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

/// The gradient of [`forward`]: each 2x2 block of `dy` (planes of 2h x 2w) summed into h x w.
pub(super) fn backward<T: Float>(dy: &[T], planes: usize, h: usize, w: usize) -> Vec<T> {
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
