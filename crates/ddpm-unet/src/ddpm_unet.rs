//! The DDPM paper's U-Net (Ho et al. 2020, after PixelCNN++): ResNet blocks with additive time
//! conditioning and dropout, self-attention at chosen resolutions (single-head, or with heads
//! of `attention_head_dim` features), strided-conv downsampling and nearest upsampling. The
//! settings that diffusers' `UNet2DModel` changed from the paper (`norm_eps`, `flip_sin_to_cos`,
//! `freq_shift`, `downsample_padding`, `attention_head_dim`) are fields of its config, so that
//! both the google/ddpm-* models and those diffusers' training examples write load into it.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::AttnBlock;
use crate::embedding::{sinusoidal_embedding_with, ClassEmbedding};
use crate::layers::{Conv2d, GroupNorm, Linear, TrainRng};
use crate::ops::{self, ConvParams};
use crate::resample::{NearestUp, StridedConvDown};
use crate::resnet::DdpmResnetBlock;
use crate::unet::check_halvings;
use crate::UnetError;

/// The most ResNet blocks per level a [`DdpmUnetConfig`] may ask for (`num_res_blocks`; diffusers'
/// `layers_per_block`): far above any published model, low enough that a hand-edited config cannot
/// make building the model's layout exhaust memory.
pub const MAX_RES_BLOCKS: usize = 64;

/// Hyper-parameters of [`DdpmUnet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdpmUnetConfig {
    /// Height and width of the (square) images.
    pub image_size: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Output channels (defaults to `in_channels`).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Base channel count `ch`; level `i` has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// Channel multiplier of each resolution level.
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per level on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Resolutions (feature-map sizes) at which self-attention follows each ResNet block.
    pub attn_resolutions: Vec<usize>,
    /// Dropout probability inside the ResNet blocks (training only).
    pub dropout: f64,
    /// GroupNorm groups.
    pub groups: usize,
    /// Class-conditional with this many classes (see [`crate::UnetConfig::num_classes`]; in
    /// diffusers, `num_class_embeds = num_classes + 1`); `None` for an unconditional model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
    /// Features per attention head: each attention block has `channels / attention_head_dim`
    /// heads (diffusers' `attention_head_dim`, whose own default is 8). `None`: one head over
    /// all channels, the DDPM paper's attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_head_dim: Option<usize>,
    /// Epsilon of every GroupNorm: 1e-6 in the DDPM paper's model (the default here), 1e-5 in
    /// diffusers' default `UNet2DModel` (`norm_eps`).
    #[serde(default = "paper_norm_eps", skip_serializing_if = "is_paper_norm_eps")]
    pub norm_eps: f64,
    /// The time embedding's layout: `false` (the paper's, the default) puts the sines first,
    /// `true` the cosines (diffusers' `flip_sin_to_cos`, whose own default is `true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flip_sin_to_cos: bool,
    /// The time embedding's frequency shift: frequencies `exp(-ln(10000) i / (ch / 2 -
    /// freq_shift))`; 1 in the paper's model (the default), 0 in diffusers' default
    /// `UNet2DModel` (`freq_shift`).
    #[serde(
        default = "paper_freq_shift",
        skip_serializing_if = "is_paper_freq_shift"
    )]
    pub freq_shift: f64,
    /// How the stride-2 downsampling convolution pads: 0 (the paper's, the default) adds one
    /// row and column at the bottom and right, 1 adds one on every side (diffusers'
    /// `downsample_padding`, whose own default is 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub downsample_padding: usize,
}

fn paper_norm_eps() -> f64 {
    PAPER_NORM_EPS
}

fn is_paper_norm_eps(eps: &f64) -> bool {
    *eps == PAPER_NORM_EPS
}

fn paper_freq_shift() -> f64 {
    1.0
}

fn is_paper_freq_shift(shift: &f64) -> bool {
    *shift == 1.0
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The GroupNorm epsilon of the DDPM paper's model.
pub const PAPER_NORM_EPS: f64 = 1e-6;

impl DdpmUnetConfig {
    /// The paper's CIFAR-10 model: 128 channels, mults 1,2,2,2, two blocks per level, attention
    /// at 16x16, dropout 0.1 (35.7M parameters).
    pub fn cifar10() -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            out_channels: None,
            ch: 128,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.1,
            groups: 32,
            num_classes: None,
            attention_head_dim: None,
            norm_eps: PAPER_NORM_EPS,
            flip_sin_to_cos: false,
            freq_shift: 1.0,
            downsample_padding: 0,
        }
    }

    /// A small 32x32 RGB model that trains usefully on a 2-core CPU.
    pub fn cifar_small() -> Self {
        Self {
            ch: 32,
            ch_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![8],
            groups: 8,
            ..Self::cifar10()
        }
    }

    /// The U-Net of LearnOpenCV's "Guide to training DDPMs from scratch" for 32x32 images: 64
    /// channels, mults 1,2,4,4, two blocks per level, attention at the two middle levels (16x16
    /// and 8x8), dropout 0.1, GroupNorm of 8 groups. Its layers and parameter count are the
    /// tutorial's; its attention has one head where the tutorial's has four (the same
    /// projections and parameters), and its dropout drops elements where the tutorial's drops
    /// whole channels.
    pub fn learnopencv() -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            out_channels: None,
            ch: 64,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16, 8],
            dropout: 0.1,
            groups: 8,
            ..Self::cifar10()
        }
    }

    /// The layout of diffusers' google/ddpm-celebahq-256 (and the other 256x256 DDPM pipelines:
    /// ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256): block_out_channels 128, 128, 256, 256,
    /// 512, 512 (ch 128, mults 1,1,2,2,4,4), two layers per block, attention at 16x16 only (the
    /// `AttnDownBlock2D` at index 4), 32 groups, no dropout, 256x256 RGB.
    pub fn celebahq_256() -> Self {
        Self {
            image_size: 256,
            in_channels: 3,
            out_channels: None,
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.0,
            groups: 32,
            ..Self::cifar10()
        }
    }

    /// A lower bound on the values one image's training forward pass keeps for the backward
    /// pass: four feature maps per ResNet block, and for every attention block its queries,
    /// keys and values and its `n x n` matrix (`n` pixels). The true count is a few times
    /// larger; the bound serves to refuse sizes that cannot fit in memory.
    pub fn activation_values_per_image(&self) -> f64 {
        let res = self.resolutions();
        let Some(&r_mid) = res.last() else {
            return 0.0;
        };
        let mut total = 0.0;
        for (i, &r) in res.iter().enumerate() {
            let area = (r as f64).powi(2);
            let width = (self.ch * self.ch_mult[i]) as f64;
            // num_res_blocks blocks down, one more up.
            let blocks = (2 * self.num_res_blocks + 1) as f64;
            total += blocks * 4.0 * width * area;
            if self.attn_resolutions.contains(&r) {
                let heads = self.heads(width as usize) as f64;
                total += blocks * (3.0 * width * area + heads * area * area);
            }
        }
        let width = self.ch * self.ch_mult[res.len() - 1];
        let area = (r_mid as f64).powi(2);
        let heads = self.heads(width) as f64;
        total + 2.0 * 4.0 * width as f64 * area + 3.0 * width as f64 * area + heads * area * area
    }

    /// The attention heads of a block over `channels` channels (one without
    /// `attention_head_dim`).
    pub fn heads(&self, channels: usize) -> usize {
        self.attention_head_dim
            .map_or(1, |d| (channels / d.max(1)).max(1))
    }

    /// Output channels of the model.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Feature-map size at each level.
    fn resolutions(&self) -> Vec<usize> {
        (0..self.ch_mult.len())
            .map(|i| self.image_size >> i)
            .collect()
    }

    /// Checks every field; the error names the field and why it is wrong (the bounds are in
    /// [`MAX_RES_BLOCKS`]).
    pub fn validate(&self) -> std::result::Result<(), UnetError> {
        let bad =
            |field: &'static str, reason: String| Err(UnetError::InvalidConfig { field, reason });
        if self.in_channels == 0 {
            return bad("in_channels", "must be at least 1".into());
        }
        if self.out_channels() == 0 {
            return bad("out_channels", "must be at least 1".into());
        }
        if self.ch == 0 {
            return bad("ch", "must be at least 1".into());
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(
                "ch_mult",
                format!("{:?} must be non-empty and positive", self.ch_mult),
            );
        }
        if !(1..=MAX_RES_BLOCKS).contains(&self.num_res_blocks) {
            return bad(
                "num_res_blocks",
                format!(
                    "{} is outside 1..={MAX_RES_BLOCKS} (published U-Nets use 1 to 4 per level)",
                    self.num_res_blocks
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} must be in [0, 1)", self.dropout));
        }
        let g = self.groups;
        let widths: Vec<usize> = std::iter::once(self.ch)
            .chain(self.ch_mult.iter().map(|m| self.ch * m))
            .collect();
        if g == 0 || widths.iter().any(|w| w % g != 0) {
            return bad(
                "groups",
                format!("{g} must divide every level's channel count {widths:?}"),
            );
        }
        crate::unet::check_num_classes(self.num_classes)?;
        check_halvings(self.image_size, self.ch_mult.len(), "ch_mult")?;
        let res = self.resolutions();
        if let Some(r) = self.attn_resolutions.iter().find(|r| !res.contains(r)) {
            return bad(
                "attn_resolutions",
                format!("{r} is not a feature-map size of this model (sizes: {res:?})"),
            );
        }
        if let Some(d) = self.attention_head_dim {
            // Every attention block's width: its levels' and the middle's.
            let attn_widths: Vec<usize> = (0..res.len())
                .filter(|&i| self.attn_resolutions.contains(&res[i]))
                .map(|i| self.ch * self.ch_mult[i])
                .chain(self.ch_mult.last().map(|m| self.ch * m))
                .collect();
            if d == 0 || attn_widths.iter().any(|w| !w.is_multiple_of(d)) {
                return bad(
                    "attention_head_dim",
                    format!(
                        "{d} must divide the channel count of every attention block \
                         {attn_widths:?}"
                    ),
                );
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad("norm_eps", format!("{} must be in (0, 1)", self.norm_eps));
        }
        let half = (self.ch / 2) as f64;
        if !(self.freq_shift >= 0.0 && self.freq_shift < half - 1.0) {
            return bad(
                "freq_shift",
                format!(
                    "{} must be at least 0 and below ch / 2 - 1 = {}",
                    self.freq_shift,
                    half - 1.0
                ),
            );
        }
        if self.downsample_padding > 1 {
            return bad(
                "downsample_padding",
                format!(
                    "{} must be 0 (one row and column at the bottom and right) or 1 (one on \
                     every side)",
                    self.downsample_padding
                ),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Level<S> {
    blocks: Vec<DdpmResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<S>,
}

/// The DDPM paper's U-Net. Tensor names follow the PyTorch port of the paper's model:
/// `temb.dense.{0,1}`, `conv_in`, `down.{i}.block.{j}`, `down.{i}.attn.{j}`,
/// `down.{i}.downsample.conv`, `mid.block_1`, `mid.attn_1`, `mid.block_2`, `up.{i}.block.{j}`,
/// `up.{i}.attn.{j}`, `up.{i}.upsample.conv`, `norm_out`, `conv_out`.
#[derive(Debug, Clone)]
pub struct DdpmUnet {
    cfg: DdpmUnetConfig,
    temb_dense0: Linear,
    temb_dense1: Linear,
    class_emb: Option<ClassEmbedding>,
    conv_in: Conv2d,
    down: Vec<Level<StridedConvDown>>,
    mid_block_1: DdpmResnetBlock,
    mid_attn_1: AttnBlock,
    mid_block_2: DdpmResnetBlock,
    /// Indexed by level, like `down` (applied in reverse order).
    up: Vec<Level<NearestUp>>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl DdpmUnet {
    /// Builds the model from `cfg` (validated first) with tensors under `vb`.
    pub fn new(cfg: &DdpmUnetConfig, vb: VarBuilder) -> std::result::Result<Self, UnetError> {
        cfg.validate()?;
        Ok(Self::build(cfg, vb)?)
    }

    fn build(cfg: &DdpmUnetConfig, vb: VarBuilder) -> Result<Self> {
        let ch = cfg.ch;
        let temb_ch = ch * 4;
        let g = cfg.groups;
        let p = cfg.dropout;
        let eps = cfg.norm_eps;
        let attn = |c: usize, vb: VarBuilder| AttnBlock::new(c, g, eps, cfg.heads(c), vb);
        let same3 = ConvParams {
            stride: 1,
            padding: 1,
        };
        let n = cfg.ch_mult.len();
        let in_mult: Vec<usize> = std::iter::once(1)
            .chain(cfg.ch_mult.iter().copied())
            .collect();
        let res = cfg.resolutions();
        let with_attn = |level: usize| cfg.attn_resolutions.contains(&res[level]);

        let mut down = Vec::with_capacity(n);
        let mut block_in = ch;
        for i in 0..n {
            let vb = vb.pp(format!("down.{i}"));
            let block_out = ch * cfg.ch_mult[i];
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                blocks.push(DdpmResnetBlock::new(
                    block_in,
                    block_out,
                    temb_ch,
                    (g, eps),
                    p,
                    vb.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if with_attn(i) {
                    attns.push(attn(block_in, vb.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if i + 1 < n {
                Some(StridedConvDown::new(
                    block_in,
                    cfg.downsample_padding,
                    vb.pp("downsample"),
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let mid_block_1 = DdpmResnetBlock::new(
            block_in,
            block_in,
            temb_ch,
            (g, eps),
            p,
            vb.pp("mid.block_1"),
        )?;
        let mid_attn_1 = attn(block_in, vb.pp("mid.attn_1"))?;
        let mid_block_2 = DdpmResnetBlock::new(
            block_in,
            block_in,
            temb_ch,
            (g, eps),
            p,
            vb.pp("mid.block_2"),
        )?;

        let mut up: Vec<Option<Level<NearestUp>>> = (0..n).map(|_| None).collect();
        for i in (0..n).rev() {
            let vb = vb.pp(format!("up.{i}"));
            let block_out = ch * cfg.ch_mult[i];
            let (mut blocks, mut attns) = (Vec::new(), Vec::new());
            for j in 0..=cfg.num_res_blocks {
                let skip_in = if j == cfg.num_res_blocks {
                    ch * in_mult[i]
                } else {
                    ch * cfg.ch_mult[i]
                };
                blocks.push(DdpmResnetBlock::new(
                    block_in + skip_in,
                    block_out,
                    temb_ch,
                    (g, eps),
                    p,
                    vb.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if with_attn(i) {
                    attns.push(attn(block_in, vb.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if i > 0 {
                Some(NearestUp::new(block_in, block_in, vb.pp("upsample.conv"))?)
            } else {
                None
            };
            up[i] = Some(Level {
                blocks,
                attns,
                resample,
            });
        }
        let up = up.into_iter().flatten().collect();
        Ok(Self {
            cfg: cfg.clone(),
            temb_dense0: Linear::new(ch, temb_ch, vb.pp("temb.dense.0"))?,
            temb_dense1: Linear::new(temb_ch, temb_ch, vb.pp("temb.dense.1"))?,
            class_emb: cfg
                .num_classes
                .map(|n| ClassEmbedding::new(n, temb_ch, vb.pp("class_emb")))
                .transpose()?,
            conv_in: Conv2d::new(cfg.in_channels, ch, 3, same3, true, vb.pp("conv_in"))?,
            down,
            mid_block_1,
            mid_attn_1,
            mid_block_2,
            up,
            norm_out: GroupNorm::new(g, block_in, eps, vb.pp("norm_out"))?,
            conv_out: Conv2d::new(
                block_in,
                cfg.out_channels(),
                3,
                same3,
                true,
                vb.pp("conv_out"),
            )?,
        })
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &DdpmUnetConfig {
        &self.cfg
    }

    /// Predicts from `x` (b, in_channels, s, s) at timesteps `t` (b,); `labels` (b,) are used
    /// only by class-conditional models (`None`: the null label, the unconditional model).
    /// Dropout is active only when a training RNG is given.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        mut rng: TrainRng,
    ) -> Result<Tensor> {
        // x: (b, c, s, s), t: (b,)
        let temb = sinusoidal_embedding_with(
            t,
            self.cfg.ch,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
            x.dtype(),
        )?;
        let mut temb = self
            .temb_dense1
            .forward(&ops::silu(&self.temb_dense0.forward(&temb)?)?)?;
        if let Some(emb) = &self.class_emb {
            temb = (temb + emb.forward(labels, x.dim(0)?, x.dtype())?)?;
        }
        let mut hs = vec![self.conv_in.forward(x)?];
        for level in &self.down {
            for (j, block) in level.blocks.iter().enumerate() {
                let last = hs
                    .last()
                    .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
                let mut h = block.forward(last, &temb, rng.as_deref_mut())?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h)?;
                }
                hs.push(h);
            }
            if let Some(down) = &level.resample {
                let last = hs
                    .last()
                    .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
                let h = down.forward(last)?;
                hs.push(h);
            }
        }
        let mut h = hs
            .last()
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
        h = self.mid_block_1.forward(&h, &temb, rng.as_deref_mut())?;
        h = self.mid_attn_1.forward(&h)?;
        h = self.mid_block_2.forward(&h, &temb, rng.as_deref_mut())?;
        for level in self.up.iter().rev() {
            for (j, block) in level.blocks.iter().enumerate() {
                let skip = hs
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("skip".into()))?;
                h = block.forward(&ops::cat_channels(&h, &skip)?, &temb, rng.as_deref_mut())?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h)?;
                }
            }
            if let Some(up) = &level.resample {
                h = up.forward(&h)?;
            }
        }
        let h = self.norm_out.forward_silu(&h, None)?;
        self.conv_out.forward(&h)
    }
}
