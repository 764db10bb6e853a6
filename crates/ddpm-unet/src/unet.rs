//! The lucidrains-style `Unet` of "How Diffusion Works" (annotated diffusion): weight-standardized
//! ResNet blocks with scale-shift time conditioning, linear attention at every level, full
//! attention in the middle, pixel-unshuffle downsampling and nearest upsampling.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, LinearAttention, PreNormResidual};
use crate::embedding::{sinusoidal_embedding, ClassEmbedding};
use crate::layers::{Conv2d, Linear};
use crate::ops::{self, ConvParams};
use crate::resample::{NearestUp, PixelUnshuffleDown};
use crate::resnet::ResnetBlock;
use crate::UnetError;

/// Hyper-parameters of [`Unet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetConfig {
    /// Height and width of the (square) images.
    pub image_size: usize,
    /// Image channels (1 for MNIST, 3 for RGB).
    pub channels: usize,
    /// Base channel count; level `i` has `dim * dim_mults[i]` channels.
    pub dim: usize,
    /// Channels after the first conv (defaults to `dim`).
    #[serde(default)]
    pub init_dim: Option<usize>,
    /// Output channels (defaults to `channels`).
    #[serde(default)]
    pub out_dim: Option<usize>,
    /// Channel multiplier of each resolution level; one halving between consecutive levels.
    pub dim_mults: Vec<usize>,
    /// Self-conditioning (Chen et al. 2022): the previous x0 estimate is concatenated to the input.
    #[serde(default)]
    pub self_condition: bool,
    /// GroupNorm groups in the ResNet blocks.
    pub resnet_block_groups: usize,
    /// Kernel size of the first conv (7 in lucidrains, 1 in the annotated diffusion post).
    pub init_conv_kernel: usize,
    /// Attention heads.
    pub attn_heads: usize,
    /// Features per attention head.
    pub attn_dim_head: usize,
    /// Class-conditional with this many classes (a learned class embedding added to the time
    /// embedding, with one more, null label for the unconditional model of classifier-free
    /// guidance); `None` for an unconditional model. A training run sets it to its data set's
    /// class count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            channels: 3,
            dim: 64,
            init_dim: None,
            out_dim: None,
            dim_mults: vec![1, 2, 4, 8],
            self_condition: false,
            resnet_block_groups: 8,
            init_conv_kernel: 7,
            attn_heads: 4,
            attn_dim_head: 32,
            num_classes: None,
        }
    }
}

impl UnetConfig {
    /// A small model for 28x28 MNIST that trains usefully on a 2-core CPU.
    pub fn mnist_small() -> Self {
        Self {
            image_size: 28,
            channels: 1,
            dim: 16,
            dim_mults: vec![1, 2, 4],
            resnet_block_groups: 4,
            init_conv_kernel: 1,
            ..Self::default()
        }
    }

    /// The annotated-diffusion Fashion-MNIST model (dim 28, mults 1,2,4, groups 4, 1x1 init conv).
    pub fn annotated_fashion() -> Self {
        Self {
            image_size: 28,
            channels: 1,
            dim: 28,
            dim_mults: vec![1, 2, 4],
            resnet_block_groups: 4,
            init_conv_kernel: 1,
            ..Self::default()
        }
    }

    fn init_dim(&self) -> usize {
        self.init_dim.unwrap_or(self.dim)
    }

    /// A lower bound on the values one image's training forward pass keeps for the backward
    /// pass: four feature maps per ResNet block, the queries, keys and values of every
    /// attention and the middle attention's `heads x n x n` matrix (`n` pixels). The true count
    /// is a few times larger; the bound serves to refuse sizes that cannot fit in memory.
    pub fn activation_values_per_image(&self) -> f64 {
        let n = self.dim_mults.len();
        if n == 0 {
            return 0.0;
        }
        let area = |level: usize| ((self.image_size >> level) as f64).powi(2);
        let qkv = 3.0 * (self.attn_heads * self.attn_dim_head) as f64;
        let mut dims = vec![self.init_dim()];
        dims.extend(self.dim_mults.iter().map(|m| self.dim * m));
        let mut total = 0.0;
        for i in 0..n {
            // Down level i (width dims[i]) and up level i (width dims[i + 1]), two blocks each.
            let widths = (dims[i] + dims[i + 1]) as f64;
            total += area(i) * (2.0 * 4.0 * widths + 2.0 * qkv);
        }
        let mid = area(n - 1);
        total + mid * (2.0 * 4.0 * dims[n] as f64 + qkv) + self.attn_heads as f64 * mid * mid
    }

    /// Output channels of the model.
    pub fn out_channels(&self) -> usize {
        self.out_dim.unwrap_or(self.channels)
    }

    /// Input channels of the first conv (doubled with self-conditioning).
    pub fn input_channels(&self) -> usize {
        self.channels * if self.self_condition { 2 } else { 1 }
    }

    /// Checks every field; the error names the field and why it is wrong.
    pub fn validate(&self) -> std::result::Result<(), UnetError> {
        let bad =
            |field: &'static str, reason: String| Err(UnetError::InvalidConfig { field, reason });
        if self.channels == 0 {
            return bad("channels", "must be at least 1".into());
        }
        if self.dim == 0 || self.init_dim() == 0 {
            return bad("dim", "must be at least 1".into());
        }
        if self.dim_mults.is_empty() || self.dim_mults.contains(&0) {
            return bad(
                "dim_mults",
                format!("{:?} must be non-empty and positive", self.dim_mults),
            );
        }
        if self.init_conv_kernel.is_multiple_of(2) {
            return bad(
                "init_conv_kernel",
                format!("{} must be odd", self.init_conv_kernel),
            );
        }
        if self.attn_heads == 0 || self.attn_dim_head == 0 {
            return bad("attn_heads", "heads and dim_head must be at least 1".into());
        }
        let g = self.resnet_block_groups;
        let mut widths = vec![self.init_dim()];
        widths.extend(self.dim_mults.iter().map(|m| self.dim * m));
        if g == 0 || widths.iter().any(|w| w % g != 0) {
            return bad(
                "resnet_block_groups",
                format!("{g} must divide every level's channel count {widths:?}"),
            );
        }
        check_num_classes(self.num_classes)?;
        check_halvings(self.image_size, self.dim_mults.len(), "dim_mults")
    }
}

/// The most classes a class-conditional model may have (a table row per class).
pub const MAX_CLASSES: usize = 1 << 20;

/// Checks a class count: at least 1 and at most [`MAX_CLASSES`].
pub(crate) fn check_num_classes(n: Option<usize>) -> std::result::Result<(), UnetError> {
    match n {
        Some(n) if n == 0 || n > MAX_CLASSES => Err(UnetError::InvalidConfig {
            field: "num_classes",
            reason: format!("{n} must be in 1..={MAX_CLASSES} (or unset for no classes)"),
        }),
        _ => Ok(()),
    }
}

/// Checks that `image_size` can be halved `levels - 1` times exactly.
pub(crate) fn check_halvings(
    image_size: usize,
    levels: usize,
    field: &'static str,
) -> std::result::Result<(), UnetError> {
    let halvings = levels.saturating_sub(1) as u32;
    let factor = 1usize << halvings;
    if image_size == 0 || !image_size.is_multiple_of(factor) {
        return Err(UnetError::InvalidConfig {
            field: "image_size",
            reason: format!(
                "{image_size} cannot be halved {halvings} times by the {levels} levels of \
                 `{field}`: use a size divisible by {factor} or fewer levels"
            ),
        });
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Down {
    Unshuffle(PixelUnshuffleDown),
    Conv(Conv2d),
}

#[derive(Debug, Clone)]
enum Up {
    Nearest(NearestUp),
    Conv(Conv2d),
}

#[derive(Debug, Clone)]
struct Level<S> {
    block1: ResnetBlock,
    block2: ResnetBlock,
    attn: PreNormResidual<LinearAttention>,
    resample: S,
}

/// The lucidrains/annotated-diffusion U-Net. Tensor names follow the PyTorch module tree:
/// `init_conv`, `time_mlp.{1,3}`, `downs.{i}.{0,1,2,3}`, `mid_block1`, `mid_attn`, `mid_block2`,
/// `ups.{i}.{0,1,2,3}`, `final_res_block`, `final_conv`.
#[derive(Debug, Clone)]
pub struct Unet {
    cfg: UnetConfig,
    init_conv: Conv2d,
    time_mlp1: Linear,
    time_mlp2: Linear,
    class_emb: Option<ClassEmbedding>,
    downs: Vec<Level<Down>>,
    mid_block1: ResnetBlock,
    mid_attn: PreNormResidual<Attention>,
    mid_block2: ResnetBlock,
    ups: Vec<Level<Up>>,
    final_res_block: ResnetBlock,
    final_conv: Conv2d,
}

impl Unet {
    /// Builds the model from `cfg` (validated first) with tensors under `vb`.
    pub fn new(cfg: &UnetConfig, vb: VarBuilder) -> std::result::Result<Self, UnetError> {
        cfg.validate()?;
        Ok(Self::build(cfg, vb)?)
    }

    fn build(cfg: &UnetConfig, vb: VarBuilder) -> Result<Self> {
        let init_dim = cfg.init_dim();
        let k = cfg.init_conv_kernel;
        let same = |k: usize| ConvParams {
            stride: 1,
            padding: k / 2,
        };
        let init_conv = Conv2d::new(
            cfg.input_channels(),
            init_dim,
            k,
            same(k),
            true,
            vb.pp("init_conv"),
        )?;
        let time_dim = cfg.dim * 4;
        let time_mlp1 = Linear::new(cfg.dim, time_dim, vb.pp("time_mlp.1"))?;
        let time_mlp2 = Linear::new(time_dim, time_dim, vb.pp("time_mlp.3"))?;
        let class_emb = cfg
            .num_classes
            .map(|n| ClassEmbedding::new(n, time_dim, vb.pp("class_emb")))
            .transpose()?;
        let mut dims = vec![init_dim];
        dims.extend(cfg.dim_mults.iter().map(|m| cfg.dim * m));
        let in_out: Vec<(usize, usize)> = dims.windows(2).map(|w| (w[0], w[1])).collect();
        let g = cfg.resnet_block_groups;
        let (heads, dh) = (cfg.attn_heads, cfg.attn_dim_head);
        let n = in_out.len();

        let mut downs = Vec::with_capacity(n);
        for (i, &(d_in, d_out)) in in_out.iter().enumerate() {
            let vb = vb.pp(format!("downs.{i}"));
            let resample = if i + 1 < n {
                Down::Unshuffle(PixelUnshuffleDown::new(d_in, d_out, vb.pp("3"))?)
            } else {
                Down::Conv(Conv2d::new(d_in, d_out, 3, same(3), true, vb.pp("3"))?)
            };
            downs.push(Level {
                block1: ResnetBlock::new(d_in, d_in, time_dim, g, vb.pp("0"))?,
                block2: ResnetBlock::new(d_in, d_in, time_dim, g, vb.pp("1"))?,
                attn: PreNormResidual::new(d_in, vb.pp("2"), |vb| {
                    LinearAttention::new(d_in, heads, dh, vb)
                })?,
                resample,
            });
        }
        let mid = dims[dims.len() - 1];
        let mid_block1 = ResnetBlock::new(mid, mid, time_dim, g, vb.pp("mid_block1"))?;
        let mid_attn = PreNormResidual::new(mid, vb.pp("mid_attn"), |vb| {
            Attention::new(mid, heads, dh, vb)
        })?;
        let mid_block2 = ResnetBlock::new(mid, mid, time_dim, g, vb.pp("mid_block2"))?;

        let mut ups = Vec::with_capacity(n);
        for (i, &(d_in, d_out)) in in_out.iter().rev().enumerate() {
            let vb = vb.pp(format!("ups.{i}"));
            let resample = if i + 1 < n {
                Up::Nearest(NearestUp::new(d_out, d_in, vb.pp("3.1"))?)
            } else {
                Up::Conv(Conv2d::new(d_out, d_in, 3, same(3), true, vb.pp("3"))?)
            };
            ups.push(Level {
                block1: ResnetBlock::new(d_out + d_in, d_out, time_dim, g, vb.pp("0"))?,
                block2: ResnetBlock::new(d_out + d_in, d_out, time_dim, g, vb.pp("1"))?,
                attn: PreNormResidual::new(d_out, vb.pp("2"), |vb| {
                    LinearAttention::new(d_out, heads, dh, vb)
                })?,
                resample,
            });
        }
        let final_res_block = ResnetBlock::new(
            init_dim * 2,
            init_dim,
            time_dim,
            g,
            vb.pp("final_res_block"),
        )?;
        let final_conv = Conv2d::new(
            init_dim,
            cfg.out_channels(),
            1,
            same(1),
            true,
            vb.pp("final_conv"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            init_conv,
            time_mlp1,
            time_mlp2,
            class_emb,
            downs,
            mid_block1,
            mid_attn,
            mid_block2,
            ups,
            final_res_block,
            final_conv,
        })
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// Predicts from `x` (b, channels, s, s) at timesteps `t` (b,); `x_self_cond` (same shape as
    /// `x`, zeros when `None`) is used only by self-conditioned models, `labels` (b,) only by
    /// class-conditional ones (`None`: the null label, the unconditional model).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        x_self_cond: Option<&Tensor>,
        labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        // x: (b, c, s, s), t: (b,)
        let x = if self.cfg.self_condition {
            let cond = match x_self_cond {
                Some(c) => c.clone(),
                None => x.zeros_like()?,
            };
            ops::cat_channels(&cond, x)?
        } else {
            x.clone()
        };
        let mut x = self.init_conv.forward(&x)?;
        let r = x.clone();
        let t = sinusoidal_embedding(t, self.cfg.dim, x.dtype())?;
        let mut t = self
            .time_mlp2
            .forward(&ops::gelu(&self.time_mlp1.forward(&t)?)?)?;
        if let Some(emb) = &self.class_emb {
            t = (t + emb.forward(labels, x.dim(0)?, x.dtype())?)?;
        }
        let mut skips = Vec::with_capacity(2 * self.downs.len());
        for level in &self.downs {
            x = level.block1.forward(&x, &t)?;
            skips.push(x.clone());
            x = level.block2.forward(&x, &t)?;
            x = level.attn.forward(&x)?;
            skips.push(x.clone());
            x = match &level.resample {
                Down::Unshuffle(d) => d.forward(&x)?,
                Down::Conv(c) => c.forward(&x)?,
            };
        }
        x = self.mid_block1.forward(&x, &t)?;
        x = self.mid_attn.forward(&x)?;
        x = self.mid_block2.forward(&x, &t)?;
        for level in &self.ups {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
            x = level.block1.forward(&ops::cat_channels(&x, &skip)?, &t)?;
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
            x = level.block2.forward(&ops::cat_channels(&x, &skip)?, &t)?;
            x = level.attn.forward(&x)?;
            x = match &level.resample {
                Up::Nearest(u) => u.forward(&x)?,
                Up::Conv(c) => c.forward(&x)?,
            };
        }
        let x = self
            .final_res_block
            .forward(&ops::cat_channels(&x, &r)?, &t)?;
        self.final_conv.forward(&x)
    }
}
