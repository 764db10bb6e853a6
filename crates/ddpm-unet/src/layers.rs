//! Basic layers (convolution, linear, group norm, dropout) built from a `VarBuilder` with
//! PyTorch's default initialization, so the tensor names and init match the PyTorch models.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::Rng;

use crate::ops::{self, ConvParams};

/// PyTorch's default init for weights and biases of conv/linear layers: U(-1/sqrt(fan_in), +).
fn default_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A 2-D convolution with square kernel, optionally weight-standardized (Qiao et al. 2019).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: ConvParams,
    weight_standardized: bool,
}

impl Conv2d {
    /// A conv `c_in -> c_out` with a `k`x`k` kernel, tensors `weight` (and `bias`) under `vb`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        params: ConvParams,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = default_uniform(c_in * k * k);
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(c_out, "bias", init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            params,
            weight_standardized: false,
        })
    }

    /// The same conv with its kernel standardized to zero mean and unit variance per output
    /// channel at every forward (eps 1e-5 in f32 and wider, 1e-3 in half precision).
    pub fn weight_standardized(mut self) -> Self {
        self.weight_standardized = true;
        self
    }

    /// Applies the convolution to `x` (b, c_in, h, w).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_bias(x, self.bias.as_ref(), 0)
    }

    /// Applies the convolution to `x` zero-padded by `extra_end` more rows and columns at the
    /// bottom and right than at the top and left (see [`ops::conv2d_padded_end`]).
    pub fn forward_padded_end(&self, x: &Tensor, extra_end: usize) -> Result<Tensor> {
        self.forward_with_bias(x, self.bias.as_ref(), extra_end)
    }

    /// Applies the convolution to `x` (b, c_in, h, w) with `extra` (b, c_out) added to each
    /// image's bias: `conv(x) + bias + extra[:, :, None, None]` as one op on the CPU (no pass
    /// over the output and no graph node for the broadcast add).
    pub fn forward_plus_image_bias(&self, x: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let bias = match &self.bias {
            Some(b) => extra
                .to_dtype(b.dtype())?
                .broadcast_add(&b.reshape((1, b.elem_count()))?)?,
            None => extra.clone(),
        };
        self.forward_with_bias(x, Some(&bias), 0)
    }

    /// Applies the convolution to `x` and adds `residual` (shaped like the output): a ResNet
    /// block's `residual + conv(h)` as one op on the CPU ([`ops::conv2d_residual`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        ops::conv2d_residual(
            x,
            &self.kernel()?,
            self.bias.as_ref(),
            self.params,
            residual,
        )
    }

    fn forward_with_bias(&self, x: &Tensor, bias: Option<&Tensor>, end: usize) -> Result<Tensor> {
        ops::conv2d_padded_end(x, &self.kernel()?, bias, self.params, end)
    }

    /// The kernel the convolution applies: the weight, standardized if asked.
    fn kernel(&self) -> Result<Tensor> {
        if !self.weight_standardized {
            return Ok(self.weight.clone());
        }
        // Standardized in at least f32 (half-precision weights of a frozen bf16/f16 copy are
        // upcast), so that a half-precision copy standardizes as its f32 master does.
        let dtype = self.weight.dtype();
        let w = match dtype {
            DType::F16 | DType::BF16 => self.weight.to_dtype(DType::F32)?,
            _ => self.weight.clone(),
        };
        let mean = w.mean_keepdim((1, 2, 3))?;
        let centered = w.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((1, 2, 3))?;
        centered
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .to_dtype(dtype)
    }
}

impl Conv2d {
    /// The convs in `convs` applied to `x` as one conv whose output channels are theirs in
    /// order (their kernels and biases concatenated): one GEMM instead of several. The convs must
    /// share kernel size, stride and padding, and all have biases or none; none may be
    /// weight-standardized.
    pub fn forward_stacked(convs: &[&Conv2d], x: &Tensor) -> Result<Tensor> {
        let Some(first) = convs.first() else {
            candle_core::bail!("forward_stacked: no convs given")
        };
        if convs.iter().any(|c| {
            c.params != first.params
                || c.weight_standardized
                || c.bias.is_some() != first.bias.is_some()
        }) {
            candle_core::bail!(
                "forward_stacked: the convs differ in params, bias or standardization"
            );
        }
        let weights: Vec<&Tensor> = convs.iter().map(|c| &c.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = match first.bias {
            Some(_) => {
                let biases: Vec<&Tensor> = convs.iter().filter_map(|c| c.bias.as_ref()).collect();
                Some(Tensor::cat(&biases, 0)?)
            }
            None => None,
        };
        ops::conv2d(x, &weight, bias.as_ref(), first.params)
    }
}

/// A fully connected layer with bias, tensors `weight` (out, in) and `bias` (out).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// A linear map `d_in -> d_out` under `vb`.
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        let init = default_uniform(d_in);
        Ok(Self {
            weight: vb.get_with_hints((d_out, d_in), "weight", init)?,
            bias: vb.get_with_hints(d_out, "bias", init)?,
        })
    }

    /// Applies the layer to `x` (..., d_in).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, Some(&self.bias))
    }
}

/// Group normalization with a learned per-channel affine (`weight` = 1, `bias` = 0 at init).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// GroupNorm of `channels` channels in `groups` groups.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm: {channels} channels are not divisible into {groups} groups"
            );
        }
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
            eps,
        })
    }

    /// Normalizes `x` (b, c, ...).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
    }

    /// Normalizes `x` (b, c, h, w), applies the time conditioning `h * (1 + scale) + shift`
    /// (`scale`, `shift` (b, c, 1, 1)) when given, then SiLU: one fused op on the CPU.
    pub fn forward_silu(
        &self,
        x: &Tensor,
        scale_shift: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        self.norm_silu(x, scale_shift, None)
    }

    /// Our fused GroupNorm + optional scale-shift + SiLU + optional dropout.
    fn norm_silu(
        &self,
        x: &Tensor,
        scale_shift: Option<(&Tensor, &Tensor)>,
        dropout: Option<ops::Dropout>,
    ) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        ops::group_norm_act(x, self.groups, w, b, scale_shift, true, dropout, self.eps)
    }

    /// `dropout(silu(norm(x)), p)` for `x` (b, c, h, w); dropout only with `rng`. On the CPU
    /// the dropout runs inside the fused GroupNorm kernel, its mask hashed from one seed drawn
    /// from `rng`; elsewhere it is [`dropout`] after [`GroupNorm::forward_silu`].
    pub fn forward_silu_dropout(&self, x: &Tensor, p: f64, rng: TrainRng) -> Result<Tensor> {
        match rng {
            Some(rng) if p > 0.0 && ops::fused_dropout(x, self.groups) => {
                let seed = rng.next_u64();
                self.norm_silu(x, None, Some(ops::Dropout { p, seed }))
            }
            rng => dropout(&self.forward_silu(x, None)?, p, rng),
        }
    }
}

/// Source of randomness for training-mode layers (dropout). `None` means evaluation mode.
pub type TrainRng<'a> = Option<&'a mut (dyn rand::RngCore + 'static)>;

/// Inverted dropout with probability `p`, drawn from the caller's seeded RNG so that training is
/// reproducible (candle's CPU RNG cannot be seeded). Identity when `rng` is `None` or `p == 0`.
pub fn dropout(x: &Tensor, p: f64, rng: TrainRng) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p);
    if !x.device().is_cpu() {
        // On an accelerator the mask is drawn there (seeded through `Device::set_seed`, which
        // the trainer sets from the run's seed and step): drawing it on the host would cost
        // more than the whole forward pass.
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let mask = (u.ge(p)?.to_dtype(DType::F32)? * keep)?.to_dtype(x.dtype())?;
        return x.mul(&mask);
    }
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
