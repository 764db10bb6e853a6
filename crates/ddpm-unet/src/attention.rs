//! Attention layers: the lucidrains `LinearAttention` and `Attention` (multi-head, over all
//! pixels), and the DDPM paper's single-head `AttnBlock`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Conv2d, GroupNorm};
use crate::ops::{self, ConvParams};

const POINTWISE: ConvParams = ConvParams {
    stride: 1,
    padding: 0,
};

/// Linear attention (Shen et al. 2018; lucidrains): softmax over features for queries and over
/// positions for keys, cost linear in the number of pixels. Tensors: `to_qkv.weight`,
/// `to_out.0.{weight,bias}` (1x1 conv), `to_out.1.{weight,bias}` (GroupNorm(1)).
#[derive(Debug, Clone)]
pub struct LinearAttention {
    to_qkv: Conv2d,
    to_out: Conv2d,
    out_norm: GroupNorm,
    heads: usize,
    dim_head: usize,
}

impl LinearAttention {
    /// Linear attention over `dim` channels with `heads` heads of `dim_head` features.
    pub fn new(dim: usize, heads: usize, dim_head: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = heads * dim_head;
        Ok(Self {
            to_qkv: Conv2d::new(dim, hidden * 3, 1, POINTWISE, false, vb.pp("to_qkv"))?,
            to_out: Conv2d::new(hidden, dim, 1, POINTWISE, true, vb.pp("to_out.0"))?,
            out_norm: GroupNorm::new(1, dim, 1e-5, vb.pp("to_out.1"))?,
            heads,
            dim_head,
        })
    }

    /// Applies the layer to `x` (b, c, h, w) (no residual).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = (self.dim_head as f64).powf(-0.5);
        let qkv = self.to_qkv.forward(x)?;
        let out = ops::linear_attention(&qkv, self.heads, self.dim_head, scale)?;
        self.out_norm.forward(&self.to_out.forward(&out)?)
    }
}

/// Multi-head softmax attention over all pixels (lucidrains `Attention`). Tensors:
/// `to_qkv.weight`, `to_out.{weight,bias}`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_qkv: Conv2d,
    to_out: Conv2d,
    heads: usize,
    dim_head: usize,
}

impl Attention {
    /// Attention over `dim` channels with `heads` heads of `dim_head` features.
    pub fn new(dim: usize, heads: usize, dim_head: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = heads * dim_head;
        Ok(Self {
            to_qkv: Conv2d::new(dim, hidden * 3, 1, POINTWISE, false, vb.pp("to_qkv"))?,
            to_out: Conv2d::new(hidden, dim, 1, POINTWISE, true, vb.pp("to_out"))?,
            heads,
            dim_head,
        })
    }

    /// Applies the layer to `x` (b, c, h, w) (no residual).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = (self.dim_head as f64).powf(-0.5);
        let qkv = self.to_qkv.forward(x)?;
        self.to_out
            .forward(&ops::attention(&qkv, self.heads, self.dim_head, scale)?)
    }
}

/// `x + fn(GroupNorm(1)(x))`: the lucidrains `Residual(PreNorm(dim, fn))` wrapper. Tensors:
/// `fn.norm.{weight,bias}` and `fn.fn.*` for the wrapped layer.
#[derive(Debug, Clone)]
pub struct PreNormResidual<L> {
    norm: GroupNorm,
    inner: L,
}

impl<L> PreNormResidual<L> {
    /// Wraps `inner`, built under `vb.pp("fn.fn")`, with a pre-norm of `dim` channels.
    pub fn new(
        dim: usize,
        vb: VarBuilder,
        build: impl FnOnce(VarBuilder) -> Result<L>,
    ) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(1, dim, 1e-5, vb.pp("fn.norm"))?,
            inner: build(vb.pp("fn.fn"))?,
        })
    }
}

/// A layer mapping (b, c, h, w) to the same shape.
pub trait SpatialLayer {
    /// Applies the layer.
    fn apply(&self, x: &Tensor) -> Result<Tensor>;
}

impl SpatialLayer for LinearAttention {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
}

impl SpatialLayer for Attention {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
}

impl<L: SpatialLayer> PreNormResidual<L> {
    /// `x + inner(norm(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x + self.inner.apply(&self.norm.forward(x)?)?
    }
}

/// The DDPM paper's self-attention block: GroupNorm, attention with 1x1 `q`, `k`, `v`,
/// `proj_out` convs, and a residual connection. The paper's has one head; diffusers' default
/// `UNet2DModel` splits the channels into heads of `attention_head_dim` features (the same
/// projections and parameters).
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
    heads: usize,
}

impl AttnBlock {
    /// An attention block over `channels` channels normalized in `groups` groups with epsilon
    /// `eps`, in `heads` heads (which must divide `channels`).
    pub fn new(
        channels: usize,
        groups: usize,
        eps: f64,
        heads: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            candle_core::bail!("{heads} attention heads do not divide {channels} channels");
        }
        let conv = |name: &str| Conv2d::new(channels, channels, 1, POINTWISE, true, vb.pp(name));
        Ok(Self {
            norm: GroupNorm::new(groups, channels, eps, vb.pp("norm"))?,
            q: conv("q")?,
            k: conv("k")?,
            v: conv("v")?,
            proj_out: conv("proj_out")?,
            heads,
        })
    }

    /// `x + proj_out(attention(norm(x)))` for `x` (b, c, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dims4()?.1;
        let dim_head = c / self.heads;
        // q, k and v as one 1x1 conv with the three kernels stacked: one GEMM, and the packed
        // layout the attention op takes.
        let qkv = Conv2d::forward_stacked(&[&self.q, &self.k, &self.v], &self.norm.forward(x)?)?;
        let out = ops::attention(&qkv, self.heads, dim_head, (dim_head as f64).powf(-0.5))?;
        self.proj_out.forward_residual(&out, x)
    }
}
