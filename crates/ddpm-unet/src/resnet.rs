//! Residual blocks with timestep conditioning: the lucidrains `ResnetBlock` (weight-standardized
//! convs, scale-shift conditioning) and the DDPM paper's `ResnetBlock` (additive conditioning,
//! dropout).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Conv2d, GroupNorm, Linear, TrainRng};
use crate::ops::{self, ConvParams};

const SAME_3X3: ConvParams = ConvParams {
    stride: 1,
    padding: 1,
};
const POINTWISE: ConvParams = ConvParams {
    stride: 1,
    padding: 0,
};

/// Weight-standardized 3x3 conv, GroupNorm, optional scale-shift, SiLU (lucidrains `Block`).
/// Tensors: `proj.{weight,bias}`, `norm.{weight,bias}`.
#[derive(Debug, Clone)]
struct WsBlock {
    proj: Conv2d,
    norm: GroupNorm,
}

impl WsBlock {
    fn new(dim: usize, dim_out: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: Conv2d::new(dim, dim_out, 3, SAME_3X3, true, vb.pp("proj"))?
                .weight_standardized(),
            norm: GroupNorm::new(groups, dim_out, 1e-5, vb.pp("norm"))?,
        })
    }

    fn forward(&self, x: &Tensor, scale_shift: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        self.norm.forward_silu(&self.proj.forward(x)?, scale_shift)
    }
}

/// The lucidrains ResNet block: `block2(block1(x, scale_shift(t))) + res_conv(x)`, where the
/// time embedding sets a per-channel scale and shift after the first GroupNorm. Tensors:
/// `mlp.1.*` (time projection), `block1.*`, `block2.*`, `res_conv.*` (1x1, when `dim != dim_out`).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    mlp: Linear,
    block1: WsBlock,
    block2: WsBlock,
    res_conv: Option<Conv2d>,
}

impl ResnetBlock {
    /// A block `dim -> dim_out` conditioned on a `time_dim` embedding, GroupNorm in `groups`.
    pub fn new(
        dim: usize,
        dim_out: usize,
        time_dim: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            mlp: Linear::new(time_dim, dim_out * 2, vb.pp("mlp.1"))?,
            block1: WsBlock::new(dim, dim_out, groups, vb.pp("block1"))?,
            block2: WsBlock::new(dim_out, dim_out, groups, vb.pp("block2"))?,
            res_conv: if dim != dim_out {
                Some(Conv2d::new(
                    dim,
                    dim_out,
                    1,
                    POINTWISE,
                    true,
                    vb.pp("res_conv"),
                )?)
            } else {
                None
            },
        })
    }

    /// `x` (b, dim, h, w), `t_emb` (b, time_dim) -> (b, dim_out, h, w).
    pub fn forward(&self, x: &Tensor, t_emb: &Tensor) -> Result<Tensor> {
        let ss = self.mlp.forward(&ops::silu(t_emb)?)?;
        let (b, c2) = ss.dims2()?;
        let ss = ss.reshape((b, c2, 1, 1))?;
        let parts = ss.chunk(2, 1)?;
        let h = self.block1.forward(x, Some((&parts[0], &parts[1])))?;
        let h = self.block2.forward(&h, None)?;
        match &self.res_conv {
            Some(conv) => h + conv.forward(x)?,
            None => h + x,
        }
    }
}

/// The DDPM paper's ResNet block: `x' + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) +
/// temb_proj(silu(t))))))` with `x'` the input, through a 1x1 `nin_shortcut` when the channel
/// count changes. Tensors: `norm1`, `conv1`, `temb_proj`, `norm2`, `conv2`, `nin_shortcut`.
#[derive(Debug, Clone)]
pub struct DdpmResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    temb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
    dropout: f64,
}

impl DdpmResnetBlock {
    /// A block `c_in -> c_out` conditioned on a `temb_dim` embedding, its GroupNorms of
    /// `norm = (groups, eps)`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb_dim: usize,
        (groups, eps): (usize, f64),
        dropout: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, c_in, eps, vb.pp("norm1"))?,
            conv1: Conv2d::new(c_in, c_out, 3, SAME_3X3, true, vb.pp("conv1"))?,
            temb_proj: Linear::new(temb_dim, c_out, vb.pp("temb_proj"))?,
            norm2: GroupNorm::new(groups, c_out, eps, vb.pp("norm2"))?,
            conv2: Conv2d::new(c_out, c_out, 3, SAME_3X3, true, vb.pp("conv2"))?,
            nin_shortcut: if c_in != c_out {
                Some(Conv2d::new(
                    c_in,
                    c_out,
                    1,
                    POINTWISE,
                    true,
                    vb.pp("nin_shortcut"),
                )?)
            } else {
                None
            },
            dropout,
        })
    }

    /// `x` (b, c_in, h, w), `temb` (b, temb_dim) -> (b, c_out, h, w); dropout only with `rng`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, rng: TrainRng) -> Result<Tensor> {
        // The time embedding's projection (b, c_out) joins conv1's bias, per image.
        let t = self.temb_proj.forward(&ops::silu(temb)?)?;
        let h = self
            .conv1
            .forward_plus_image_bias(&self.norm1.forward_silu(x, None)?, &t)?;
        let h = self.norm2.forward_silu_dropout(&h, self.dropout, rng)?;
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_residual(&h, &shortcut)
    }
}
