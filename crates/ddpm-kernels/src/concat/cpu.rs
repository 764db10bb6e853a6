//! Concatenation of two (b, c, h, w) tensors along the channels (the U-Net's skip connections),
//! forward and backward, split over the images.
//!
//! candle's `cat` along a middle dimension copies on one thread, and its backward hands each
//! input a strided view of the gradient, which the backward pass then sums into a fresh zero
//! tensor. Here the copy runs on every core and the backward writes both inputs' gradients,
//! contiguous, into one buffer in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, write_copy, Float, Uninit};

/// `(b, c, h * w)` of a 4-D tensor.
fn dims(l: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, c, h, w] => Ok((b, c, h * w)),
        d => candle_core::bail!("{what}: expected (b, c, h, w), got {d:?}"),
    }
}

/// Each image's `a` block then its `b` block.
fn forward<T: Float>(a: &[T], b: &[T], batch: usize) -> Vec<T> {
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
fn backward<T: Float>(g: &[T], batch: usize, na: usize) -> Vec<T> {
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

/// `cat([a, b], 1)` of two (b, c_a, h, w) and (b, c_b, h, w) tensors, as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct ConcatChannels;

/// Its backward pass: the gradient (b, c_a + c_b, h, w) split into `[da | db]`, flat.
struct ConcatChannelsBackward {
    /// Channels of the first input.
    c_a: usize,
}

impl CustomOp2 for ConcatChannels {
    fn name(&self) -> &'static str {
        "ddpm-concat-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, ca, hw) = dims(l1, "concat")?;
        let (b2, cb, hw2) = dims(l2, "concat")?;
        if (b, hw) != (b2, hw2) || l1.dims()[2..] != l2.dims()[2..] {
            candle_core::bail!(
                "concat: inputs {:?} and {:?} differ outside the channels",
                l1.dims(),
                l2.dims()
            );
        }
        if s1.dtype() != s2.dtype() {
            candle_core::bail!("concat: inputs of {:?} and {:?}", s1.dtype(), s2.dtype());
        }
        let storage = dispatch!(
            s1,
            "concat",
            forward,
            slice(s1, l1, "concat a")?,
            slice(s2, l2, "concat b")?,
            b
        );
        let (h, w) = (l1.dims()[2], l1.dims()[3]);
        Ok((storage, Shape::from((b, ca + cb, h, w))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c_a = a.dims()[1];
        let packed = grad
            .contiguous()?
            .apply_op1_no_bwd(&ConcatChannelsBackward { c_a })?;
        // Both are contiguous slices of `packed`: the backward pass stores them as they are.
        let da = packed.narrow(0, 0, a.elem_count())?.reshape(a.shape())?;
        let db = packed
            .narrow(0, a.elem_count(), b.elem_count())?
            .reshape(b.shape())?;
        Ok((Some(da), Some(db)))
    }
}

impl CustomOp1 for ConcatChannelsBackward {
    fn name(&self) -> &'static str {
        "ddpm-concat-channels-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(l, "concat backward")?;
        if self.c_a > c {
            candle_core::bail!("concat backward: {} channels of {c}", self.c_a);
        }
        let na = self.c_a * hw;
        let storage = dispatch!(s, "concat", backward, slice(s, l, "grad")?, b, na);
        Ok((storage, Shape::from(b * c * hw)))
    }
}

/// `cat([a, b], 1)` of two (b, c, h, w) tensors through our kernel (inputs made contiguous).
pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, ConcatChannels)
}
