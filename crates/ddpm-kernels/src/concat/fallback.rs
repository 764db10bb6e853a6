//! Concatenation along the channels by candle's `cat`, on any device and dtype: what
//! `ddpm_unet::ops` runs where our kernel does not, and the reference it is tested against.

use candle_core::{Result, Tensor};

/// `cat([a, b], 1)` by candle's `cat`.
pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[a, b], 1)
}
