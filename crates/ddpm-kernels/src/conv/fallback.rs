//! The convolution composed of candle's ops, on any device and dtype: what `ddpm_unet::ops` runs
//! where our kernels do not (another device or dtype, or a policy that says so), and the
//! reference the kernels are tested against.

use candle_core::{Result, Tensor};

/// How [`conv2d`] computes the convolution from candle's ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowering {
    /// candle's `conv2d` (cuDNN in a `cudnn` build).
    Candle,
    /// [`conv2d_unfold`]: an im2col built from candle's tensor ops and one batched GEMM.
    Unfold,
}

/// `conv2d(x, w) + bias` from candle's ops: `x` (b, c_in, h, w) padded by `padding` zeros before
/// and `padding_end` after the rows and columns (the extra end padding as an explicit padded
/// copy), convolved as `lowering` says, plus `bias` per channel (c_out) or per image
/// (b, c_out). `w` and `bias` in the dtype of `x`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    (padding, padding_end): (usize, usize),
    lowering: Lowering,
) -> Result<Tensor> {
    let Some(extra_end) = padding_end.checked_sub(padding) else {
        candle_core::bail!("conv2d: end padding {padding_end} below the padding {padding}");
    };
    let x = if extra_end > 0 {
        &x.pad_with_zeros(2, 0, extra_end)?
            .pad_with_zeros(3, 0, extra_end)?
    } else {
        x
    };
    let y = match lowering {
        Lowering::Unfold => conv2d_unfold(x, w, stride, padding)?,
        Lowering::Candle => x.conv2d(w, padding, stride, 1, 1)?,
    };
    add_bias(y, bias, x.dims()[0])
}

/// `y` (batch, c_out, h, w) plus a bias per channel (c_out) or per image (batch, c_out).
fn add_bias(y: Tensor, bias: Option<&Tensor>, batch: usize) -> Result<Tensor> {
    match bias {
        Some(b) => {
            let c_out = y.dims()[1];
            let rows = if b.elem_count() == c_out { 1 } else { batch };
            y.broadcast_add(&b.reshape((rows, c_out, 1, 1))?)
        }
        None => Ok(y),
    }
}

/// Convolution (no bias) as one batched matrix product over an im2col matrix that is built
/// from candle's differentiable ops (pad, strided windows, stack), on any device and dtype:
/// `stride` and `padding` zeros on every side. Forward and both gradients are GEMMs plus memory
/// copies.
pub fn conv2d_unfold(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if c_in != c {
        candle_core::bail!("conv2d: input has {c} channels, weight expects {c_in}");
    }
    let (s, pad) = (stride.max(1), padding);
    if h + 2 * pad < kh || w + 2 * pad < kw {
        candle_core::bail!(
            "conv2d: {h}x{w} input (padding {pad}) is smaller than the {kh}x{kw} kernel"
        );
    }
    let oh = (h + 2 * pad - kh) / s + 1;
    let ow = (w + 2 * pad - kw) / s + 1;
    let w2 = weight.reshape((c_out, c_in * kh * kw))?;
    let cols = if kh == 1 && kw == 1 && s == 1 && pad == 0 {
        x.reshape((b, c, h * w))?
    } else {
        // Extra zeros at the bottom/right so every strided window can take `o * s` rows.
        let xp = x
            .pad_with_zeros(2, pad, pad + s - 1)?
            .pad_with_zeros(3, pad, pad + s - 1)?;
        let wp = w + 2 * pad + s - 1;
        let mut patches = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            let rows = xp.narrow(2, ky, oh * s)?;
            let rows = if s > 1 {
                rows.reshape((b, c, oh, s * wp))?.narrow(3, 0, wp)?
            } else {
                rows
            };
            for kx in 0..kw {
                let win = rows.narrow(3, kx, ow * s)?;
                let win = if s > 1 {
                    win.reshape((b, c, oh, ow, s))?
                        .narrow(4, 0, 1)?
                        .squeeze(4)?
                } else {
                    win
                };
                patches.push(win);
            }
        }
        Tensor::stack(&patches, 2)?.reshape((b, c * kh * kw, oh * ow))?
    };
    w2.broadcast_matmul(&cols)?.reshape((b, c_out, oh, ow))
}
