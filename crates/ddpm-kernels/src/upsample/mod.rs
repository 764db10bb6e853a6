//! Nearest-neighbour 2x upsampling, forward and backward (the sum over each 2x2 block): the
//! candle custom op here, the CPU kernels in `cpu`, the CUDA version in `cuda` (kernels in
//! `kernels.cu`), and candle's op in [`fallback`], whose backward pass is a grouped convolution
//! with a kernel of ones, through candle's slow CPU convolution.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fallback;

use candle_core::{Layout, Result, Shape, Tensor};

use crate::custom_op::Kernel;
use crate::Float;

/// Plane height and width of the input from its dims.
fn plane(dims: &[usize], what: &str) -> Result<(usize, usize, usize)> {
    match dims {
        &[b, c, h, w] => Ok((b * c, h, w)),
        d => candle_core::bail!("{what}: expected (b, c, h, w), got {d:?}"),
    }
}

/// Nearest 2x upsampling of (b, c, h, w) into (b, c, 2h, 2w), as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct UpsampleNearest2x;

/// Its backward pass: (b, c, 2h, 2w) into (b, c, h, w) by summing each 2x2 block.
struct UpsampleNearest2xBackward;

impl Kernel<1> for UpsampleNearest2x {
    const NAME: &'static str = "ddpm-upsample-nearest-2x";
    /// Planes, and the input's height and width.
    type Plan = (usize, usize, usize);

    fn plan(&self, [l]: [&Layout; 1]) -> Result<(Self::Plan, Shape)> {
        let (planes, h, w) = plane(l.dims(), "upsample")?;
        let shape = Shape::from((l.dims()[0], l.dims()[1], 2 * h, 2 * w));
        Ok(((planes, h, w), shape))
    }

    fn cpu<T: Float>(&self, &(planes, h, w): &Self::Plan, [x]: [&[T]; 1]) -> Result<Vec<T>> {
        Ok(cpu::forward(x, planes, h, w))
    }

    fn bwd(&self, _: [&Tensor; 1], _: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let dx = grad
            .contiguous()?
            .apply_op1_no_bwd(&UpsampleNearest2xBackward)?;
        Ok([Some(dx)])
    }
}
custom_op!(UpsampleNearest2x, 1);

impl Kernel<1> for UpsampleNearest2xBackward {
    const NAME: &'static str = "ddpm-upsample-nearest-2x-backward";
    /// Planes, and the input's (not the gradient's) height and width.
    type Plan = (usize, usize, usize);

    fn plan(&self, [l]: [&Layout; 1]) -> Result<(Self::Plan, Shape)> {
        let (planes, h2, w2) = plane(l.dims(), "upsample backward")?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("upsample backward: odd gradient size {h2}x{w2}");
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let shape = Shape::from((l.dims()[0], l.dims()[1], h, w));
        Ok(((planes, h, w), shape))
    }

    fn cpu<T: Float>(&self, &(planes, h, w): &Self::Plan, [dy]: [&[T]; 1]) -> Result<Vec<T>> {
        Ok(cpu::backward(dy, planes, h, w))
    }
}
custom_op!(UpsampleNearest2xBackward, 1);

/// Nearest 2x upsampling of `x` (b, c, h, w) through our kernel (made contiguous).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(UpsampleNearest2x)
}
