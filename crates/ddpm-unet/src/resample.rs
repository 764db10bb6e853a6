//! Down- and upsampling layers of both U-Nets.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::Conv2d;
use crate::ops::{self, ConvParams};

/// lucidrains `Downsample`: pixel unshuffle by 2 then a 1x1 conv `4 * dim -> dim_out`.
/// Tensors: `1.{weight,bias}` (index 1 of the PyTorch `Sequential`).
#[derive(Debug, Clone)]
pub struct PixelUnshuffleDown {
    conv: Conv2d,
}

impl PixelUnshuffleDown {
    /// Halves the resolution of `dim` channels into `dim_out` channels.
    pub fn new(dim: usize, dim_out: usize, vb: VarBuilder) -> Result<Self> {
        let p = ConvParams {
            stride: 1,
            padding: 0,
        };
        Ok(Self {
            conv: Conv2d::new(dim * 4, dim_out, 1, p, true, vb.pp("1"))?,
        })
    }

    /// (b, dim, h, w) -> (b, dim_out, h/2, w/2).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&ops::pixel_unshuffle_2x(x)?)
    }
}

/// Nearest 2x upsampling then a 3x3 conv `dim -> dim_out`. Tensors: `<prefix>.{weight,bias}`
/// (`1.*` in the lucidrains `Sequential`, `conv.*` in the DDPM model).
#[derive(Debug, Clone)]
pub struct NearestUp {
    conv: Conv2d,
}

impl NearestUp {
    /// Doubles the resolution of `dim` channels into `dim_out` channels.
    pub fn new(dim: usize, dim_out: usize, vb: VarBuilder) -> Result<Self> {
        let p = ConvParams {
            stride: 1,
            padding: 1,
        };
        Ok(Self {
            conv: Conv2d::new(dim, dim_out, 3, p, true, vb)?,
        })
    }

    /// (b, dim, h, w) -> (b, dim_out, 2h, 2w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&ops::upsample_nearest_2x(x)?)
    }
}

/// The DDPM paper's downsampling: a 3x3 conv with stride 2 after padding one zero row and column
/// at the bottom and right (TensorFlow's "SAME" padding). Tensors: `conv.{weight,bias}`.
#[derive(Debug, Clone)]
pub struct StridedConvDown {
    conv: Conv2d,
    /// Padding 0: one row and column added at the bottom and right.
    pad_end: bool,
}

impl StridedConvDown {
    /// Halves the resolution of `channels` channels, padding as `padding` says: 0 adds one row
    /// and column at the bottom and right (the DDPM paper's), 1 one on every side (diffusers'
    /// default).
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let p = ConvParams { stride: 2, padding };
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, p, true, vb.pp("conv"))?,
            pad_end: padding == 0,
        })
    }

    /// (b, c, h, w) -> (b, c, h/2, w/2) for even h, w.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_end {
            self.conv.forward_padded_end(x, 1)
        } else {
            self.conv.forward(x)
        }
    }
}
