//! Concatenation of two (b, c, h, w) tensors along the channels (the U-Net's skip connections),
//! forward and backward, split over the images.
//!
//! candle's `cat` along a middle dimension copies on one thread, and its backward hands each
//! input a strided view of the gradient, which the backward pass then sums into a fresh zero
//! tensor. Here the copy runs on every core and the backward writes both inputs' gradients,
//! contiguous, into one buffer in one pass.
//!
//! The candle custom op is here, the CPU kernels in `cpu`, and candle's `cat` in [`fallback`].

mod cpu;
pub mod fallback;

use candle_core::{Layout, Result, Shape, Tensor};

use crate::custom_op::{unpack, Kernel};
use crate::Float;

/// `(b, c, h * w)` of a 4-D tensor.
fn dims(l: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, c, h, w] => Ok((b, c, h * w)),
        d => candle_core::bail!("{what}: expected (b, c, h, w), got {d:?}"),
    }
}

/// `cat([a, b], 1)` of two (b, c_a, h, w) and (b, c_b, h, w) tensors, as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct ConcatChannels;

/// Its backward pass: the gradient (b, c_a + c_b, h, w) split into `[da | db]`, flat.
struct ConcatChannelsBackward {
    /// Channels of the first input.
    c_a: usize,
}

impl Kernel<2> for ConcatChannels {
    const NAME: &'static str = "ddpm-concat-channels";
    /// The batch.
    type Plan = usize;

    fn plan(&self, [l1, l2]: [&Layout; 2]) -> Result<(usize, Shape)> {
        let (b, ca, hw) = dims(l1, "concat")?;
        let (b2, cb, hw2) = dims(l2, "concat")?;
        if (b, hw) != (b2, hw2) || l1.dims()[2..] != l2.dims()[2..] {
            candle_core::bail!(
                "concat: inputs {:?} and {:?} differ outside the channels",
                l1.dims(),
                l2.dims()
            );
        }
        let (h, w) = (l1.dims()[2], l1.dims()[3]);
        Ok((b, Shape::from((b, ca + cb, h, w))))
    }

    fn cpu<T: Float>(&self, &batch: &usize, [a, b]: [&[T]; 2]) -> Result<Vec<T>> {
        Ok(cpu::forward(a, b, batch))
    }

    fn bwd(&self, [a, b]: [&Tensor; 2], _: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 2]> {
        let c_a = a.dims()[1];
        let packed = grad
            .contiguous()?
            .apply_op1_no_bwd(&ConcatChannelsBackward { c_a })?;
        // Both are contiguous slices of `packed`: the backward pass stores them as they are.
        let [da, db] = unpack(&packed, [a.shape().clone(), b.shape().clone()])?;
        Ok([Some(da), Some(db)])
    }
}
custom_op!(ConcatChannels, 2);

impl Kernel<1> for ConcatChannelsBackward {
    const NAME: &'static str = "ddpm-concat-channels-backward";
    /// The batch and the values of one image of the first input.
    type Plan = (usize, usize);

    fn plan(&self, [l]: [&Layout; 1]) -> Result<((usize, usize), Shape)> {
        let (b, c, hw) = dims(l, "concat backward")?;
        if self.c_a > c {
            candle_core::bail!("concat backward: {} channels of {c}", self.c_a);
        }
        Ok(((b, self.c_a * hw), Shape::from(b * c * hw)))
    }

    fn cpu<T: Float>(&self, &(b, na): &(usize, usize), [g]: [&[T]; 1]) -> Result<Vec<T>> {
        Ok(cpu::backward(g, b, na))
    }
}
custom_op!(ConcatChannelsBackward, 1);

/// `cat([a, b], 1)` of two (b, c, h, w) tensors through our kernel (inputs made contiguous).
pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, ConcatChannels)
}
