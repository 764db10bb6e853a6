//! Nearest 2x upsampling by candle's op, on any device and dtype: what `ddpm_unet::ops` runs
//! where our kernels do not, and the reference they are tested against.

use candle_core::{Result, Tensor};

/// Nearest-neighbour 2x upsampling of `x` (b, c, h, w) by candle's `upsample_nearest2d` (whose
/// backward pass is a grouped convolution, which candle runs as one convolution per channel).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
}
