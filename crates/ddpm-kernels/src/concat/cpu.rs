//! Concatenation along the channels on the CPU: forward and backward, split over the images,
//! the copies on every core.

use rayon::prelude::*;

use crate::{write_copy, Float, Uninit};

/// Each image's `a` block then its `b` block.
pub(super) fn forward<T: Float>(a: &[T], b: &[T], batch: usize) -> Vec<T> {
    let (na, nb) = (a.len() / batch, b.len() / batch);
    assert!(
        a.len() == batch * na && b.len() == batch * nb,
        "concat: inputs of {} and {} values for {batch} images",
        a.len(),
        b.len()
    );
    let mut y = Uninit::new(a.len() + b.len());
    y.par_chunks_mut(na + nb)
        .zip(a.par_chunks(na).zip(b.par_chunks(nb)))
        .for_each(|(yi, (ai, bi))| {
            write_copy(&mut yi[..na], ai);
            write_copy(&mut yi[na..], bi);
        });
    // SAFETY: `a` and `b` hold `batch` images each, so the chunks of `na + nb` values cover `y`
    // and each is written in full by its two copies (`write_copy` checks the lengths).
    unsafe { y.assume_init() }
}

/// The gradient of each input, packed `[da | db]`, from the output's gradient `g`.
pub(super) fn backward<T: Float>(g: &[T], batch: usize, na: usize) -> Vec<T> {
    let n = g.len() / batch;
    assert!(
        g.len() == batch * n && na <= n,
        "concat backward: {} values for {batch} images of {na} and more",
        g.len()
    );
    let nb = n - na;
    let mut out = Uninit::new(g.len());
    let (da, db) = out.split_at_mut(batch * na);
    da.par_chunks_mut(na)
        .zip(db.par_chunks_mut(nb))
        .zip(g.par_chunks(n))
        .for_each(|((dai, dbi), gi)| {
            write_copy(dai, &gi[..na]);
            write_copy(dbi, &gi[na..]);
        });
    // SAFETY: `g` holds `batch` images of `na + nb` values, so the `batch` chunks of `da` and of
    // `db` cover `out`, and each is written in full by its copy (`write_copy` checks the
    // lengths).
    unsafe { out.assume_init() }
}
