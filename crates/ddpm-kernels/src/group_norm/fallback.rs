//! GroupNorm composed of candle's ops, on any device and dtype: what `ddpm_unet::ops` runs where
//! our kernels do not (another device or dtype, or a policy that says so), and the reference the
//! kernels are tested against.

use candle_core::{DType, Result, Tensor, D};

use super::Dropout;

/// GroupNorm of `x` (b, c, ...) over `groups` channel groups, with a per-channel affine
/// `weight` and `bias` (c) in the dtype of `x`; statistics in at least f32.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
    }
    let in_dtype = x.dtype();
    let work = match in_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let xg = x.to_dtype(work)?.reshape((b, groups, ()))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    normed
        .reshape(dims.as_slice())?
        .to_dtype(in_dtype)?
        .broadcast_mul(&weight.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&bias.reshape(affine_shape.as_slice())?)
}

/// [`group_norm`], then the time conditioning's `h * (1 + scale) + shift` with `scale`, `shift`
/// (b, c, 1, 1) when given, then SiLU when `silu`, then `dropout` by the mask
/// [`Dropout::mask`] builds on the host: one candle op per step. All tensors in the dtype of
/// `x`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    scale_shift: Option<(&Tensor, &Tensor)>,
    silu: bool,
    dropout: Option<Dropout>,
    eps: f64,
) -> Result<Tensor> {
    let mut h = group_norm(x, groups, weight, bias, eps)?;
    if let Some((scale, shift)) = scale_shift {
        h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?;
    }
    if silu {
        h = h.silu()?;
    }
    if let Some(d) = dropout.filter(|d| d.p > 0.0) {
        let mask = Tensor::from_vec(d.mask(h.elem_count()), h.shape(), h.device())?;
        h = h.mul(&mask.to_dtype(h.dtype())?)?;
    }
    Ok(h)
}
