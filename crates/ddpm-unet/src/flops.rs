//! Floating-point operations of the networks, counted from the config: what a forward pass
//! costs, for the fraction of the machine's peak a measured step reaches.
//!
//! What is counted, per image, as 2 FLOPs per multiply-add:
//! - every convolution: `2 * c_in * c_out * k * k * h_out * w_out` (1x1 projections of attention
//!   included, the padded input of a strided downsampling counted at its output size);
//! - every linear layer (time embedding MLP, per-block time projections): `2 * in * out`;
//! - the matrix products inside attention: for full attention `q^T k` and `v attn^T`, `2 * 2 *
//!   n^2 * d` per head (`n` pixels, `d` features per head); for linear attention `k v^T` and
//!   `context^T q`, `2 * 2 * d^2 * n` per head.
//!
//! Not counted: normalizations, activations, softmax, dropout, weight standardization, the
//! additions of residuals and embeddings, concatenation and resampling (each linear in the
//! activations, together a few percent of the total for these models). This is what PyTorch's
//! `torch.utils.flop_counter.FlopCounterMode` counts too (convolutions and matrix products).
//!
//! A training step costs about three forward passes ([`TRAIN_STEP_FORWARDS`]): the forward, and
//! a backward that computes both the input and the weight gradient of every product, each as
//! large as the forward product.

use crate::ddpm_unet::DdpmUnetConfig;
use crate::model::ModelConfig;
use crate::unet::UnetConfig;

/// A training step counted as this many forward passes (forward + backward for inputs + backward
/// for weights).
pub const TRAIN_STEP_FORWARDS: f64 = 3.0;

/// The FLOPs of one image's forward pass, by kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardFlops {
    /// Convolutions (attention's 1x1 projections included).
    pub conv: u64,
    /// Linear layers (the time embedding and its per-block projections).
    pub linear: u64,
    /// Matrix products inside attention (full and linear).
    pub attention: u64,
    /// The weights and biases of the counted convolutions and linear layers: a lower bound on
    /// the model's parameter count (normalizations, embedding tables and class embeddings are
    /// not counted), for estimating memory before a model is built.
    pub weights: u64,
}

impl ForwardFlops {
    /// All counted FLOPs of one image's forward pass.
    pub fn total(&self) -> u64 {
        self.conv
            .saturating_add(self.linear)
            .saturating_add(self.attention)
    }

    /// FLOPs of a forward pass over `batch` images.
    pub fn batch(&self, batch: usize) -> f64 {
        self.total() as f64 * batch as f64
    }

    /// FLOPs of a training step over `batch` images ([`TRAIN_STEP_FORWARDS`] forward passes).
    pub fn training_step(&self, batch: usize) -> f64 {
        TRAIN_STEP_FORWARDS * self.batch(batch)
    }

    fn conv(&mut self, c_in: usize, c_out: usize, k: usize, side_out: usize) {
        // Saturating: an absurd config (refused later) must not overflow here.
        let taps = product(&[c_in, c_out, k, k]);
        let pixels = product(&[side_out, side_out]);
        self.conv = self
            .conv
            .saturating_add(taps.saturating_mul(pixels).saturating_mul(2));
        self.weights = self
            .weights
            .saturating_add(taps.saturating_add(c_out as u64));
    }

    fn linear(&mut self, d_in: usize, d_out: usize) {
        let w = product(&[d_in, d_out]);
        self.linear = self.linear.saturating_add(w.saturating_mul(2));
        self.weights = self.weights.saturating_add(w.saturating_add(d_out as u64));
    }
}

/// The product of `factors` in `u64`, saturating.
fn product(factors: &[usize]) -> u64 {
    factors
        .iter()
        .fold(1u64, |p, &f| p.saturating_mul(f as u64))
}

/// The FLOPs of one image's forward pass through the network of `config` (see the module docs
/// for what is counted).
pub fn forward_flops(config: &ModelConfig) -> ForwardFlops {
    match config {
        ModelConfig::Unet(c) => unet_flops(c),
        ModelConfig::DdpmUnet(c) => ddpm_unet_flops(c),
    }
}

fn unet_flops(cfg: &UnetConfig) -> ForwardFlops {
    let mut f = ForwardFlops::default();
    let s = cfg.image_size;
    let init_dim = cfg.init_dim.unwrap_or(cfg.dim);
    let time_dim = cfg.dim * 4;
    let (heads, dh) = (cfg.attn_heads, cfg.attn_dim_head);
    let hidden = heads * dh;
    // A ResnetBlock at side r: time projection to scale and shift, two 3x3 convs, 1x1 shortcut.
    let resnet = |f: &mut ForwardFlops, c_in: usize, c_out: usize, r: usize| {
        f.linear(time_dim, 2 * c_out);
        f.conv(c_in, c_out, 3, r);
        f.conv(c_out, c_out, 3, r);
        if c_in != c_out {
            f.conv(c_in, c_out, 1, r);
        }
    };
    // Attention's 1x1 projections in and out, and its products (linear or full).
    let attention = |f: &mut ForwardFlops, c: usize, r: usize, full: bool| {
        let n = product(&[r, r]);
        f.conv(c, 3 * hidden, 1, r);
        f.conv(hidden, c, 1, r);
        let d = dh as u64;
        let per_head = if full {
            n.saturating_mul(n).saturating_mul(d)
        } else {
            d.saturating_mul(d).saturating_mul(n)
        };
        f.attention = f
            .attention
            .saturating_add(per_head.saturating_mul(4 * heads as u64));
    };
    f.conv(cfg.input_channels(), init_dim, cfg.init_conv_kernel, s);
    f.linear(cfg.dim, time_dim);
    f.linear(time_dim, time_dim);
    let mut dims = vec![init_dim];
    dims.extend(cfg.dim_mults.iter().map(|m| cfg.dim * m));
    let n = dims.len() - 1;
    for i in 0..n {
        let (d_in, d_out, r) = (dims[i], dims[i + 1], s >> i);
        resnet(&mut f, d_in, d_in, r);
        resnet(&mut f, d_in, d_in, r);
        attention(&mut f, d_in, r, false);
        if i + 1 < n {
            // Pixel unshuffle, then a 1x1 conv at half the side.
            f.conv(4 * d_in, d_out, 1, r / 2);
        } else {
            f.conv(d_in, d_out, 3, r);
        }
    }
    let (mid, r_mid) = (dims[n], s >> (n - 1));
    resnet(&mut f, mid, mid, r_mid);
    attention(&mut f, mid, r_mid, true);
    resnet(&mut f, mid, mid, r_mid);
    for i in (0..n).rev() {
        let (d_in, d_out, r) = (dims[i], dims[i + 1], s >> i);
        resnet(&mut f, d_out + d_in, d_out, r);
        resnet(&mut f, d_out + d_in, d_out, r);
        attention(&mut f, d_out, r, false);
        if i > 0 {
            // Nearest 2x upsampling, then a 3x3 conv at twice the side.
            f.conv(d_out, d_in, 3, 2 * r);
        } else {
            f.conv(d_out, d_in, 3, r);
        }
    }
    resnet(&mut f, 2 * init_dim, init_dim, s);
    f.conv(init_dim, cfg.out_channels(), 1, s);
    f
}

fn ddpm_unet_flops(cfg: &DdpmUnetConfig) -> ForwardFlops {
    let mut f = ForwardFlops::default();
    let s = cfg.image_size;
    let ch = cfg.ch;
    let temb_ch = 4 * ch;
    let levels = cfg.ch_mult.len();
    let resnet = |f: &mut ForwardFlops, c_in: usize, c_out: usize, r: usize| {
        f.conv(c_in, c_out, 3, r);
        f.linear(temb_ch, c_out);
        f.conv(c_out, c_out, 3, r);
        if c_in != c_out {
            f.conv(c_in, c_out, 1, r);
        }
    };
    // Single-head attention over the r*r pixels: q, k, v and the output projection (1x1), and
    // the two products.
    let attention = |f: &mut ForwardFlops, c: usize, r: usize| {
        for _ in 0..4 {
            f.conv(c, c, 1, r);
        }
        let n = product(&[r, r]);
        f.attention = f
            .attention
            .saturating_add(n.saturating_mul(n).saturating_mul(4 * c as u64));
    };
    let with_attn = |r: usize| cfg.attn_resolutions.contains(&r);
    f.linear(ch, temb_ch);
    f.linear(temb_ch, temb_ch);
    f.conv(cfg.in_channels, ch, 3, s);
    let mut block_in = ch;
    let mut skips = vec![ch];
    for i in 0..levels {
        let (r, block_out) = (s >> i, ch * cfg.ch_mult[i]);
        for _ in 0..cfg.num_res_blocks {
            resnet(&mut f, block_in, block_out, r);
            block_in = block_out;
            if with_attn(r) {
                attention(&mut f, block_in, r);
            }
            skips.push(block_in);
        }
        if i + 1 < levels {
            // Stride-2 3x3 conv: its output is half the side.
            f.conv(block_in, block_in, 3, r / 2);
            skips.push(block_in);
        }
    }
    let r_mid = s >> (levels - 1);
    resnet(&mut f, block_in, block_in, r_mid);
    attention(&mut f, block_in, r_mid);
    resnet(&mut f, block_in, block_in, r_mid);
    for i in (0..levels).rev() {
        let (r, block_out) = (s >> i, ch * cfg.ch_mult[i]);
        for _ in 0..=cfg.num_res_blocks {
            let skip = skips.pop().unwrap_or(0);
            resnet(&mut f, block_in + skip, block_out, r);
            block_in = block_out;
            if with_attn(r) {
                attention(&mut f, block_in, r);
            }
        }
        if i > 0 {
            f.conv(block_in, block_in, 3, 2 * r);
        }
    }
    f.conv(block_in, cfg.out_channels(), 3, s);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-level DdpmUnet on 4x4 grey images (ch 2, mults 1,2, one block per level, attention
    /// at 2x2), counted by hand layer by layer.
    #[test]
    fn tiny_ddpm_unet_by_hand() {
        let cfg = DdpmUnetConfig {
            image_size: 4,
            in_channels: 1,
            out_channels: None,
            ch: 2,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_resolutions: vec![2],
            dropout: 0.0,
            groups: 1,
            num_classes: None,
            ..DdpmUnetConfig::cifar10()
        };
        // 3x3 conv c_in -> c_out at side r: 2 * c_in * c_out * 9 * r^2.
        let c3 = |i: u64, o: u64, r: u64| 2 * i * o * 9 * r * r;
        let c1 = |i: u64, o: u64, r: u64| 2 * i * o * r * r;
        let temb = 2 * 2 * 8 + 2 * 8 * 8; // Linear 2 -> 8, 8 -> 8.
        let conv_in = c3(1, 2, 4);
        // Level 0 (side 4): block 2 -> 2; then the stride-2 conv 2 -> 2 to side 2.
        let down0 = c3(2, 2, 4) + c3(2, 2, 4) + c3(2, 2, 2);
        // Level 1 (side 2): block 2 -> 4 with its 1x1 shortcut, then attention over 4 pixels of
        // 4 channels: four 1x1 projections and two 4x4x4 products.
        let attn = |c: u64, r: u64| 4 * c1(c, c, r) + 2 * 2 * (r * r) * (r * r) * c;
        let down1 = c3(2, 4, 2) + c3(4, 4, 2) + c1(2, 4, 2) + attn(4, 2);
        // Middle (side 2): two 4 -> 4 blocks around attention.
        let mid = 2 * (c3(4, 4, 2) + c3(4, 4, 2)) + attn(4, 2);
        // Up level 1 (side 2): blocks on cat(h 4, skip 4) and cat(h 4, skip 2), each followed by
        // attention, then the upsampling conv 4 -> 4 at side 4.
        let up1 = (c3(8, 4, 2) + c3(4, 4, 2) + c1(8, 4, 2))
            + (c3(6, 4, 2) + c3(4, 4, 2) + c1(6, 4, 2))
            + 2 * attn(4, 2)
            + c3(4, 4, 4);
        // Up level 0 (side 4): blocks on cat(4, skip 2) and cat(2, skip 2).
        let up0 =
            (c3(6, 2, 4) + c3(2, 2, 4) + c1(6, 2, 4)) + (c3(4, 2, 4) + c3(2, 2, 4) + c1(4, 2, 4));
        let conv_out = c3(2, 1, 4);
        // Every ResNet block projects the embedding (8) to its output channels.
        let temb_proj = 2 * 8 * (2 + 4 + 4 + 4 + 4 + 4 + 2 + 2);
        let f = forward_flops(&ModelConfig::DdpmUnet(cfg));
        assert_eq!(f.linear, temb + temb_proj);
        assert_eq!(f.attention, 4 * 2 * 2 * 16 * 4);
        assert_eq!(
            f.total(),
            temb + temb_proj + conv_in + down0 + down1 + mid + up1 + up0 + conv_out
        );
        assert_eq!(f.training_step(2), 3.0 * 2.0 * f.total() as f64);
    }

    /// The weight count is a lower bound on each preset's parameters, and a close one: only
    /// normalizations and embedding tables are left out.
    #[test]
    fn weights_bound_the_presets_parameters() -> Result<(), Box<dyn std::error::Error>> {
        for name in ["mnist-small", "fashion", "cifar-small", "learnopencv"] {
            let config = ModelConfig::preset(name)?;
            let model = crate::DiffusionModel::new(
                &config,
                0,
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )?;
            let (counted, actual) = (forward_flops(&config).weights, model.num_parameters());
            assert!(
                counted as usize <= actual && counted as f64 >= 0.98 * actual as f64,
                "{name}: {counted} counted, {actual} parameters"
            );
        }
        Ok(())
    }

    /// Absurd sizes saturate instead of overflowing.
    #[test]
    fn absurd_sizes_saturate() -> Result<(), Box<dyn std::error::Error>> {
        let mut config = ModelConfig::preset("mnist-small")?;
        config.set_image_size(1 << 40);
        let f = forward_flops(&config);
        assert_eq!(f.conv, u64::MAX);
        Ok(())
    }

    /// A two-level lucidrains Unet on 4x4 grey images (dim 2, mults 1,2, one head of 2), counted
    /// by hand.
    #[test]
    fn tiny_unet_by_hand() {
        let cfg = UnetConfig {
            image_size: 4,
            channels: 1,
            dim: 2,
            init_dim: None,
            out_dim: None,
            dim_mults: vec![1, 2],
            self_condition: false,
            resnet_block_groups: 1,
            init_conv_kernel: 1,
            attn_heads: 1,
            attn_dim_head: 2,
            num_classes: None,
        };
        let c3 = |i: u64, o: u64, r: u64| 2 * i * o * 9 * r * r;
        let c1 = |i: u64, o: u64, r: u64| 2 * i * o * r * r;
        // Time MLP 2 -> 8 -> 8; each ResNet block maps the 8-dim embedding to 2 * c_out.
        let time = 2 * 2 * 8 + 2 * 8 * 8;
        let block = |i: u64, o: u64, r: u64| {
            c3(i, o, r) + c3(o, o, r) + if i != o { c1(i, o, r) } else { 0 }
        };
        let proj = |o: u64| 2 * 8 * 2 * o;
        // Attention with hidden 2: to_qkv c -> 6, to_out 2 -> c; products per pixel count n.
        let lin_attn = |c: u64, r: u64| c1(c, 6, r) + c1(2, c, r) + 4 * 2 * 2 * r * r;
        let full_attn = |c: u64, r: u64| c1(c, 6, r) + c1(2, c, r) + 4 * (r * r) * (r * r) * 2;
        let init = c1(1, 2, 4);
        // Down 0 (side 4, 2 channels): two blocks, attention, unshuffle + 1x1 conv 8 -> 2.
        let down0 = 2 * block(2, 2, 4) + lin_attn(2, 4) + c1(8, 2, 2);
        // Down 1 (side 2, 2 channels): two blocks, attention, 3x3 conv 2 -> 4.
        let down1 = 2 * block(2, 2, 2) + lin_attn(2, 2) + c3(2, 4, 2);
        let mid = 2 * block(4, 4, 2) + full_attn(4, 2);
        // Up (level 1, side 2): blocks on 4 + 2 channels, attention, upsample conv 4 -> 2 at 4.
        let up1 = 2 * block(6, 4, 2) + lin_attn(4, 2) + c3(4, 2, 4);
        // Up (level 0, side 4): blocks on 2 + 2 channels, attention, 3x3 conv 2 -> 2.
        let up0 = 2 * block(4, 2, 4) + lin_attn(2, 4) + c3(2, 2, 4);
        let fin = block(4, 2, 4) + c1(2, 1, 4);
        let projs = 4 * proj(2) + 2 * proj(4) + 2 * proj(4) + 2 * proj(2) + proj(2);
        let f = forward_flops(&ModelConfig::Unet(cfg));
        assert_eq!(
            f.total(),
            time + projs + init + down0 + down1 + mid + up1 + up0 + fin
        );
        assert_eq!(f.linear, time + projs);
    }

    /// The DDPM paper's CIFAR-10 model: about 6.1 G multiply-adds per image, the figure usually
    /// quoted for it.
    #[test]
    fn cifar10_is_about_six_gmacs() -> Result<(), crate::UnetError> {
        let f = forward_flops(&ModelConfig::preset("cifar10")?);
        let gmacs = f.total() as f64 / 2e9;
        assert!((6.0..6.3).contains(&gmacs), "{gmacs} GMACs");
        Ok(())
    }
}
