//! The hot operations of the U-Nets, each in exactly one place: the switchboard.
//!
//! Every layer of this crate calls these functions instead of candle's ops directly, so that a
//! faster kernel for one op (a CPU convolution, a fused GroupNorm) is swapped in here and nowhere
//! else. Each function picks, as the [`KernelPolicy`] in force says, between our CPU kernel, our
//! CUDA kernel and candle's composition of the same op (each op's `fallback` module in
//! `ddpm-kernels`), and casts weights to the activations' dtype (mixed precision). Each is
//! differentiable through candle's autograd. The policy in force is the model's own
//! ([`crate::DiffusionModel::with_kernel_policy`] scopes every forward pass), else the one
//! installed for the process.

use candle_core::{Result, Tensor};

use crate::kernels::attention::fallback::attention as attention_candle;
use crate::kernels::attention::Kind as AttentionKind;
use crate::kernels::conv::fallback::Lowering;
use crate::kernels::group_norm::fallback::group_norm as group_norm_candle;
pub use crate::kernels::group_norm::Dropout;

/// Stride and symmetric zero padding of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Stride in both spatial dimensions.
    pub stride: usize,
    /// Zero padding added on every side.
    pub padding: usize,
}

/// Which implementation the hot ops use (the [`KernelPolicy`]'s backend).
pub use crate::policy::Backend as Kernels;
use crate::policy::{CudaConv, KernelPolicy};

/// The backend of the [`KernelPolicy`] in force ([`KernelPolicy::active`]).
pub fn kernels() -> Kernels {
    KernelPolicy::active().backend
}

/// `w` in the dtype of `x`: the one place where f32 master weights meet half-precision
/// activations. The cast is differentiable, so gradients flow back to the f32 weights in f32.
fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        Ok(w.clone())
    } else {
        w.to_dtype(x.dtype())
    }
}

/// 2-D convolution: `x` (b, c_in, h, w), `weight` (c_out, c_in, k, k), optional `bias` (c_out),
/// or (b, c_out) for a bias per image. Weights are cast to the dtype of `x` (mixed precision).
///
/// On the CPU (f32/f64) this is our im2col + GEMM kernel (Winograd for 3x3 stride-1 convs with
/// enough channels); on CUDA our im2col kernel, one cuBLAS GEMM and a bias epilogue
/// (`kernels::conv::cuda::conv2d`); with `cuda_kernels = off` in the [`KernelPolicy`]
/// [`conv2d_unfold`], an im2col built from candle's tensor ops, or candle's `conv2d` with
/// `cuda_conv = candle` (see [`cuda_conv_is_candle`]). A policy with the candle backend uses
/// candle's `conv2d` everywhere (each of these but our kernels is `kernels::conv::fallback`).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Tensor> {
    conv2d_padded_end(x, weight, bias, p, 0)
}

/// [`conv2d`] with `extra_end` more zero rows and columns padded after the input (bottom and
/// right) than before: TensorFlow's "SAME" padding of the DDPM paper's stride-2 downsampling.
/// In our CPU kernel the padding costs nothing (no padded copy of the input).
pub fn conv2d_padded_end(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    extra_end: usize,
) -> Result<Tensor> {
    let pads = (p.padding, p.padding + extra_end);
    if kernels() == Kernels::Ours && crate::kernels::supported(x) {
        let (weight, bias) = kernel_weight_and_bias(x, weight, bias)?;
        return crate::kernels::conv::conv2d(x, &weight, &bias, p.stride, pads);
    }
    let weight = like(weight, x)?;
    let bias = bias.map(|b| like(b, x)).transpose()?;
    #[cfg(feature = "cuda")]
    if kernels() == Kernels::Ours && !cuda_conv_is_candle() && crate::kernels::cuda_supported(x) {
        return crate::kernels::conv::cuda::conv2d(x, &weight, bias.as_ref(), p.stride, pads);
    }
    let lowering = if kernels() == Kernels::Ours && !x.device().is_cpu() && !cuda_conv_is_candle() {
        Lowering::Unfold
    } else {
        Lowering::Candle
    };
    crate::kernels::conv::fallback::conv2d(x, &weight, bias.as_ref(), p.stride, pads, lowering)
}

/// Whether convolutions off the CPU use candle's `conv2d` (cuDNN in a `cudnn` build; its
/// backward pass is forward convolutions too, see `crates/vendor/candle-core`) rather than
/// [`conv2d_unfold`]: only when the policy's `cuda_conv` is [`CudaConv::Candle`].
///
/// Not the default, even with cuDNN: on an H200 (docs/benchmarks.md) a `cifar10` training step
/// in bf16 was slower through candle's cuDNN calls than through [`conv2d_unfold`] (candle builds
/// descriptors, picks an algorithm and zero-fills a workspace on every call), and cuDNN's f32
/// convolutions use TF32, which moved a forward pass 5.6e-4 (relative) away from the CPU's.
pub fn cuda_conv_is_candle() -> bool {
    KernelPolicy::active().cuda_conv == CudaConv::Candle
}

/// The weight and bias our conv kernel takes: in the dtype of `x`, and zeros for a missing bias.
fn kernel_weight_and_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let weight = like(weight, x)?;
    let bias = match bias {
        Some(b) => like(b, x)?,
        None => Tensor::zeros(weight.dims()[0], x.dtype(), x.device())?,
    };
    Ok((weight, bias))
}

/// `conv2d(x, weight) + bias + residual`, the output of a ResNet block (`residual` shaped like
/// the output). On the CPU our kernel adds the residual in the convolution's own output loop
/// (no pass over memory and no graph node of its own); elsewhere a convolution and an add.
pub fn conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    residual: &Tensor,
) -> Result<Tensor> {
    if kernels() == Kernels::Ours && crate::kernels::supported(x) && residual.dtype() == x.dtype() {
        let (weight, bias) = kernel_weight_and_bias(x, weight, bias)?;
        let pads = (p.padding, p.padding);
        return crate::kernels::conv::conv2d_residual(x, &weight, &bias, p.stride, pads, residual);
    }
    conv2d(x, weight, bias, p)? + residual
}

/// Convolution (no bias) as one batched matrix product over an im2col matrix that is built
/// from candle's differentiable ops (pad, strided windows, stack), on any device and dtype
/// (`kernels::conv::fallback::conv2d_unfold`).
pub fn conv2d_unfold(x: &Tensor, weight: &Tensor, p: ConvParams) -> Result<Tensor> {
    crate::kernels::conv::fallback::conv2d_unfold(x, weight, p.stride, p.padding)
}

/// Affine map on the last dimension: `x` (..., in) times `weight` (out, in) transposed plus `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&like(weight, x)?.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(&like(b, x)?),
        None => Ok(y),
    }
}

/// Group normalization of `x` (b, c, ...) over `groups` channel groups, with a per-channel affine
/// `weight` and `bias` (c). Statistics are computed in at least f32.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (weight, bias) = (&like(weight, x)?, &like(bias, x)?);
    if kernels() == Kernels::Ours && crate::kernels::group_norm_supported(x, groups) {
        return crate::kernels::group_norm::group_norm(x, groups, weight, bias, eps);
    }
    group_norm_candle(x, groups, weight, bias, eps)
}

/// GroupNorm of `x` (b, c, h, w) with its per-channel affine, then the time conditioning's
/// `h * (1 + scale) + shift` with `scale`, `shift` (b, c, 1, 1) when given, then SiLU when `silu`:
/// the U-Nets' normalization blocks. On the CPU and on CUDA this is one fused kernel forward
/// (the affine, scale and shift fold into one per-(image, channel) affine, computed on the small
/// (b, c) tensors) and one backward; elsewhere candle's ops, one per step. `dropout` (training)
/// zeroes elements after the activation by a mask hashed from its seed, in the same kernel
/// (elsewhere the same mask, built on the host and multiplied).
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
    let (weight, bias) = (&like(weight, x)?, &like(bias, x)?);
    if kernels() == Kernels::Ours && crate::kernels::group_norm_supported(x, groups) {
        let (a, d) = crate::kernels::group_norm::per_image(x, weight, bias)?;
        let (a, d) = match scale_shift {
            Some((scale, shift)) => {
                let b = x.dims()[0];
                let c = weight.elem_count();
                let scale1 = (like(scale, x)?.reshape((b, c))? + 1.0)?;
                let shift = like(shift, x)?.reshape((b, c))?;
                ((a * &scale1)?, ((d * &scale1)? + shift)?)
            }
            None => (a, d),
        };
        return crate::kernels::group_norm::group_norm_act(x, groups, &a, &d, silu, dropout, eps);
    }
    let scale_shift = match scale_shift {
        Some((scale, shift)) => Some((like(scale, x)?, like(shift, x)?)),
        None => None,
    };
    let scale_shift = scale_shift.as_ref().map(|(scale, shift)| (scale, shift));
    crate::kernels::group_norm::fallback::group_norm_act(
        x,
        groups,
        weight,
        bias,
        scale_shift,
        silu,
        dropout,
        eps,
    )
}

/// Whether [`group_norm_act`] applies dropout inside our kernel for this input normalized in
/// `groups` groups (CPU f32/f64, or CUDA; our kernels on).
pub fn fused_dropout(x: &Tensor, groups: usize) -> bool {
    kernels() == Kernels::Ours && crate::kernels::group_norm_supported(x, groups)
}

/// SiLU (swish): `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// GELU with the exact error function, as PyTorch's `nn.GELU()` default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Softmax along dimension `dim` (differentiable; not candle's fused last-dim kernel).
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    candle_nn::ops::softmax(x, dim)
}

/// Multi-head softmax attention over the pixels of a packed projection `qkv`
/// (b, 3 * heads * dim_head, h, w): per head, `out = v softmax_j(scale * q^T k)^T`, into
/// (b, heads * dim_head, h, w) with channels ordered `(head, feature)`. One fused op on the CPU
/// and on CUDA ([`crate::kernels::attention`]); candle's ops elsewhere.
pub fn attention(qkv: &Tensor, heads: usize, dim_head: usize, scale: f64) -> Result<Tensor> {
    attention_of(AttentionKind::Softmax, qkv, heads, dim_head, scale)
}

/// Linear attention (Shen et al. 2018) over a packed `qkv` as [`attention`]: per head,
/// `out = (softmax_n(k) v^T)^T (scale * softmax_d(q))`, queries normalized over their features
/// and keys over the pixels.
pub fn linear_attention(qkv: &Tensor, heads: usize, dim_head: usize, scale: f64) -> Result<Tensor> {
    attention_of(AttentionKind::Linear, qkv, heads, dim_head, scale)
}

fn attention_of(
    kind: AttentionKind,
    qkv: &Tensor,
    heads: usize,
    dim_head: usize,
    scale: f64,
) -> Result<Tensor> {
    if kernels() == Kernels::Ours && crate::kernels::supported(qkv) {
        let op = crate::kernels::attention::Attention {
            kind,
            heads,
            dim_head,
            scale,
        };
        return crate::kernels::attention::attention(qkv, op);
    }
    // Softmax attention on CUDA: the same op's CUDA passes (cuBLAS GEMMs on the packed qkv and
    // our softmax kernels).
    #[cfg(feature = "cuda")]
    if kind == AttentionKind::Softmax
        && kernels() == Kernels::Ours
        && crate::kernels::cuda_supported(qkv)
        && crate::kernels::cuda::extended()
    {
        let op = crate::kernels::attention::Attention {
            kind,
            heads,
            dim_head,
            scale,
        };
        return crate::kernels::attention::attention(qkv, op);
    }
    attention_candle(kind, qkv, heads, dim_head, scale)
}

/// Batched matrix product over the last two dimensions.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.matmul(&b.contiguous()?)
}

/// Nearest-neighbour 2x upsampling of `x` (b, c, h, w); our kernels on the CPU and on CUDA
/// (forward and backward), candle's `upsample_nearest2d` elsewhere (whose backward pass is a
/// grouped convolution, which candle runs as one convolution per channel).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    if kernels() == Kernels::Ours && crate::kernels::supported(x) {
        return crate::kernels::upsample::upsample_nearest_2x(x);
    }
    #[cfg(feature = "cuda")]
    if kernels() == Kernels::Ours && crate::kernels::cuda_supported(x) {
        x.dims4()?;
        return crate::kernels::upsample::cuda::upsample_nearest_2x(x);
    }
    crate::kernels::upsample::fallback::upsample_nearest_2x(x)
}

/// `cat([a, b], 1)` of two (b, c, h, w) tensors (a U-Net's skip connection): on the CPU our
/// kernel, which copies on every core and hands back contiguous gradients; elsewhere candle's
/// `cat`.
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if kernels() == Kernels::Ours
        && crate::kernels::supported(a)
        && a.dtype() == b.dtype()
        && a.rank() == 4
        && b.rank() == 4
    {
        return crate::kernels::concat::concat_channels(a, b);
    }
    crate::kernels::concat::fallback::concat_channels(a, b)
}

/// Pixel unshuffle by 2: (b, c, h, w) -> (b, 4c, h/2, w/2), channel order `(c, p1, p2)` as
/// einops' `b c (h p1) (w p2) -> b (c p1 p2) h w`.
pub fn pixel_unshuffle_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    fn var(shape: &[usize], dtype: DType) -> Result<candle_core::Var> {
        candle_core::Var::from_tensor(
            &Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)?,
        )
    }

    /// Direct-loop convolution and its three gradients for `sum(conv(x, w) + bias) * r)`,
    /// written from the definition: the independent reference for our kernel.
    #[allow(clippy::type_complexity)]
    fn naive_conv(
        x: &[f64],
        (b, c, h, w): (usize, usize, usize, usize),
        wt: &[f64],
        (o, k): (usize, usize),
        bias: &[f64],
        r: &[f64],
        (s, p): (usize, usize),
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut y = vec![0.0; b * o * ho * wo];
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; o]);
        for n in 0..b {
            for oc in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let yi = ((n * o + oc) * ho + oy) * wo + ox;
                        let mut acc = bias[oc];
                        db[oc] += r[yi];
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s + ky) as isize - p as isize;
                                    let ix = (ox * s + kx) as isize - p as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((n * c + ci) * h + iy as usize) * w + ix as usize;
                                    let wi = ((oc * c + ci) * k + ky) * k + kx;
                                    acc += x[xi] * wt[wi];
                                    dx[xi] += wt[wi] * r[yi];
                                    dw[wi] += x[xi] * r[yi];
                                }
                            }
                        }
                        y[yi] = acc;
                    }
                }
            }
        }
        (y, dx, dw, db)
    }

    /// Our convolution kernel against the direct loops (forward and the three gradients) and
    /// candle's forward, on many shapes: batch 1, odd channels, non-square, strides 1 and 2
    /// with sizes that do not divide, 1x1 and 7x7 kernels, non-contiguous inputs, f64 and f32.
    #[test]
    fn conv_kernel_matches_direct_loops_forward_and_backward() -> Result<()> {
        let cases = [
            // (b, c, h, w, o, k, stride, padding)
            (1, 1, 5, 5, 1, 3, 1, 1),
            (2, 3, 8, 6, 5, 3, 1, 1),
            (3, 4, 7, 7, 2, 3, 2, 0),
            (2, 3, 9, 8, 4, 3, 2, 0),
            (2, 5, 6, 6, 3, 1, 1, 0),
            (2, 2, 6, 5, 3, 7, 1, 3),
            (1, 3, 8, 8, 2, 3, 2, 1),
            (5, 7, 4, 4, 9, 3, 1, 1),
            (2, 2, 6, 7, 3, 3, 1, 0),
            (1, 2, 2, 3, 2, 5, 1, 2),
            // 256 and 128 pixels: the padded patch rows and the transposed weight gradient.
            (2, 3, 16, 16, 4, 3, 1, 1),
            (1, 2, 16, 8, 3, 3, 1, 1),
            (2, 2, 32, 32, 3, 3, 2, 1),
            // Several images per thread's chunk: the transposed weight gradient summed over
            // them before its one transposition.
            (5, 3, 12, 12, 4, 3, 1, 1),
            (7, 2, 16, 9, 3, 3, 1, 1),
            // 32 channels and more: 3x3 stride-1 convolutions and their input gradients go
            // through Winograd (odd sizes, a one-pixel image, several images per chunk).
            (2, 32, 8, 8, 32, 3, 1, 1),
            (3, 33, 7, 9, 36, 3, 1, 1),
            (1, 32, 1, 1, 32, 3, 1, 1),
            (5, 34, 6, 5, 32, 3, 1, 1),
            // At least 128 tiles: the weight gradient through Winograd too (28x28 as MNIST,
            // 144 tiles of an odd size).
            (1, 64, 32, 32, 64, 3, 1, 1),
            (2, 64, 31, 33, 65, 3, 1, 1),
            (2, 32, 28, 28, 32, 3, 1, 1),
            (1, 33, 23, 24, 34, 3, 1, 1),
            // 128 x 128 channel pairs: the Winograd weight gradient summed by GEMMs in f32.
            (1, 128, 24, 24, 128, 3, 1, 1),
            // Chunks of several images, of uneven sizes: im2col weight gradients summed over
            // them, a Winograd input gradient (from the kernel's own transform read flipped)
            // beside an im2col weight gradient on a small map, pointwise convolutions and a
            // stride-2 conv's scatter.
            (11, 3, 16, 16, 4, 3, 1, 1),
            (6, 40, 8, 8, 36, 3, 1, 1),
            (9, 5, 4, 4, 6, 1, 1, 0),
            (13, 3, 6, 5, 4, 1, 1, 0),
            (9, 3, 8, 8, 4, 3, 2, 1),
        ];
        let flat = |t: &Tensor| -> Result<Vec<f64>> {
            t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
        };
        let close = |a: &[f64], b: &[f64], tol: f64, what: &str| {
            let scale = 1.0 + b.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                a.len() == b.len() && err <= tol * scale,
                "{what}: error {err}"
            );
        };
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (i, &(b, c, h, w, o, k, stride, padding)) in cases.iter().enumerate() {
                // Every other case reads a transposed (non-contiguous) input.
                let x = var(&[b, c, w, h], dtype)?;
                let xin = if i % 2 == 0 {
                    x.as_tensor().transpose(2, 3)?
                } else {
                    x.as_tensor().reshape((b, c, h, w))?
                };
                let wt = var(&[o, c, k, k], dtype)?;
                let bias = var(&[o], dtype)?;
                let p = ConvParams { stride, padding };
                let ours = conv2d(&xin, wt.as_tensor(), Some(bias.as_tensor()), p)?;
                let r = Tensor::randn(0f64, 1.0, ours.dims(), &Device::Cpu)?.to_dtype(dtype)?;
                let (y, dx, dw, db) = naive_conv(
                    &flat(&xin)?,
                    (b, c, h, w),
                    &flat(wt.as_tensor())?,
                    (o, k),
                    &flat(bias.as_tensor())?,
                    &flat(&r)?,
                    (stride, padding),
                );
                close(&flat(&ours)?, &y, tol, "forward");
                let candle = xin
                    .conv2d(wt.as_tensor(), padding, stride, 1, 1)?
                    .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?;
                close(&flat(&ours)?, &flat(&candle)?, tol, "forward vs candle");
                let g = (&ours * &r)?.sum_all()?.backward()?;
                let get = |v: &candle_core::Var| -> Result<Vec<f64>> {
                    match g.get(v.as_tensor()) {
                        Some(t) => flat(t),
                        None => candle_core::bail!("missing gradient"),
                    }
                };
                // x was (b, c, w, h) for transposed cases: compare in the (b, c, h, w) view.
                let dx_ours = if i % 2 == 0 {
                    let t = g
                        .get(x.as_tensor())
                        .ok_or_else(|| candle_core::Error::Msg("dx".into()))?;
                    flat(&t.transpose(2, 3)?)?
                } else {
                    get(&x)?
                };
                close(&dx_ours, &dx, tol, &format!("case {i} dx {dtype:?}"));
                close(&get(&wt)?, &dw, tol, &format!("case {i} dw {dtype:?}"));
                close(&get(&bias)?, &db, tol, &format!("case {i} db {dtype:?}"));
            }
        }
        Ok(())
    }

    /// Our GroupNorm kernel against the composition of candle ops, forward and gradients.
    #[test]
    fn group_norm_kernel_matches_candle_forward_and_backward() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (b, c, h, w, groups) in [
                (1, 4, 3, 3, 2),
                (3, 6, 5, 4, 3),
                (2, 7, 2, 2, 1),
                (2, 8, 4, 4, 8),
            ] {
                let x = var(&[b, c, h, w], dtype)?;
                let gamma = var(&[c], dtype)?;
                let beta = var(&[c], dtype)?;
                let ours = group_norm(
                    x.as_tensor(),
                    groups,
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    1e-5,
                )?;
                let theirs = group_norm_candle(
                    x.as_tensor(),
                    groups,
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    1e-5,
                )?;
                assert!(max_diff(&ours, &theirs)? < tol * 10.0);
                let case = format!("{:?} {dtype:?}", (b, c, h, w, groups));
                assert_same_grads(&ours, &theirs, &[&x, &gamma, &beta], tol, &case)?;
            }
        }

        Ok(())
    }

    /// Attention of `qkv = f(v)` (`f`: identity, or doubled and transposed in its last two
    /// dimensions) and the gradient of `sum(out * r)` with respect to `v`, through our kernel or
    /// candle's ops.
    fn attention_loss(
        kind: AttentionKind,
        v: &candle_core::Var,
        transposed: bool,
        heads: usize,
        d: usize,
        r: &Tensor,
        ours: bool,
    ) -> Result<(Tensor, Tensor)> {
        let scale = (d as f64).powf(-0.5) * 1.3;
        let qkv = if transposed {
            (v.as_tensor() * 2.0)?.transpose(2, 3)?
        } else {
            v.as_tensor().clone()
        };
        let qkv = &qkv;
        let out = if ours {
            let op = crate::kernels::attention::Attention {
                kind,
                heads,
                dim_head: d,
                scale,
            };
            crate::kernels::attention::attention(qkv, op)?
        } else {
            attention_candle(kind, qkv, heads, d, scale)?
        };
        let loss = (&out * r)?.sum_all()?;
        let grad = loss.backward()?.get(v).expect("gradient of qkv").clone();
        Ok((out, grad))
    }

    /// Our fused attention and linear attention against candle's composition: forward and the
    /// gradient of `qkv`, on batch 1, one head, odd feature counts, non-square images, a single
    /// pixel, and a non-contiguous input; f64 and f32 (1e-4 relative).
    #[test]
    fn attention_kernels_match_candle_forward_and_backward() -> Result<()> {
        let dev = &Device::Cpu;
        for kind in [AttentionKind::Softmax, AttentionKind::Linear] {
            for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
                // (b, heads, d, h, w, transposed input)
                for (b, heads, d, h, w, transposed) in [
                    (1, 1, 3, 2, 3, false),
                    (2, 2, 4, 5, 3, false),
                    (3, 4, 8, 4, 4, true),
                    (2, 3, 5, 1, 1, false),
                    (1, 2, 16, 7, 6, true),
                ] {
                    let c = 3 * heads * d;
                    // Transposed: the same shape in strided memory, a (b, c, w, h) variable.
                    let v = if transposed {
                        var(&[b, c, w, h], dtype)?
                    } else {
                        var(&[b, c, h, w], dtype)?
                    };
                    let r = Tensor::randn(0f64, 1.0, (b, heads * d, h, w), dev)?.to_dtype(dtype)?;
                    let (o1, g1) = attention_loss(kind, &v, transposed, heads, d, &r, true)?;
                    let (o2, g2) = attention_loss(kind, &v, transposed, heads, d, &r, false)?;
                    let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                        let m = b
                            .abs()?
                            .max_all()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?;
                        Ok(max_diff(a, b)? / m.max(1e-30))
                    };
                    let case = (kind, dtype, b, heads, d, h, w, transposed);
                    assert!(rel(&o1, &o2)? < tol, "forward {case:?}: {}", rel(&o1, &o2)?);
                    assert!(
                        rel(&g1, &g2)? < tol,
                        "gradient {case:?}: {}",
                        rel(&g1, &g2)?
                    );
                }
            }
        }
        Ok(())
    }

    /// The attention kernels' gradients against central finite differences of the loss, in f64:
    /// a check that depends on neither candle's backward nor ours.
    #[test]
    fn attention_kernel_gradients_match_finite_differences() -> Result<()> {
        let dev = &Device::Cpu;
        let (b, heads, d, h, w) = (2, 2, 3, 3, 2);
        let c = 3 * heads * d;
        let base: Vec<f64> = Tensor::randn(0f64, 1.0, b * c * h * w, dev)?.to_vec1()?;
        let r = Tensor::randn(0f64, 1.0, (b, heads * d, h, w), dev)?;
        for kind in [AttentionKind::Softmax, AttentionKind::Linear] {
            let loss_at = |vals: &[f64]| -> Result<f64> {
                let qkv = candle_core::Var::from_vec(vals.to_vec(), (b, c, h, w), dev)?;
                attention_loss(kind, &qkv, false, heads, d, &r, true)?
                    .0
                    .mul(&r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let qkv = candle_core::Var::from_vec(base.clone(), (b, c, h, w), dev)?;
            let (_, grad) = attention_loss(kind, &qkv, false, heads, d, &r, true)?;
            let grad: Vec<f64> = grad.flatten_all()?.to_vec1()?;
            let eps = 1e-6;
            for i in (0..base.len()).step_by(5) {
                let (mut up, mut down) = (base.clone(), base.clone());
                up[i] += eps;
                down[i] -= eps;
                let fd = (loss_at(&up)? - loss_at(&down)?) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{kind:?} element {i}: finite difference {fd}, gradient {}",
                    grad[i]
                );
            }
        }
        Ok(())
    }

    /// A bias per image (b, c_out) through our conv kernel against candle's conv plus a
    /// broadcast add: forward and the gradients of input, kernel and bias.
    #[test]
    fn conv_kernel_with_a_bias_per_image_matches_candle() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (b, c, h, w, o, k, stride, pad) in [
                (3, 2, 5, 4, 3, 3, 1, 1),
                (2, 3, 6, 6, 5, 1, 1, 0),
                (4, 2, 7, 5, 2, 3, 2, 1),
            ] {
                let x = var(&[b, c, h, w], dtype)?;
                let wt = var(&[o, c, k, k], dtype)?;
                let bias = var(&[b, o], dtype)?;
                let p = ConvParams {
                    stride,
                    padding: pad,
                };
                let ours = conv2d(x.as_tensor(), wt.as_tensor(), Some(bias.as_tensor()), p)?;
                let theirs = x
                    .as_tensor()
                    .conv2d(wt.as_tensor(), pad, stride, 1, 1)?
                    .broadcast_add(&bias.as_tensor().reshape((b, o, 1, 1))?)?;
                assert!(max_diff(&ours, &theirs)? < tol * 10.0);
                let case = format!("{:?} {dtype:?}", (b, c, h, w, o, k));
                assert_same_grads(&ours, &theirs, &[&x, &wt, &bias], tol, &case)?;
            }
        }
        Ok(())
    }

    /// The residual added by our conv kernel (a ResNet block's output) against candle's conv
    /// plus an add: forward and the four gradients (input, weight, bias, residual), with batch
    /// 1, odd channel counts, non-square inputs, 1x1 and stride 2, and a strided residual.
    #[test]
    fn conv_kernel_with_a_residual_matches_candle() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (b, c, h, w, o, k, stride, pad) in [
                (1, 3, 5, 4, 3, 3, 1, 1),
                (2, 4, 6, 6, 5, 1, 1, 0),
                (3, 2, 7, 5, 2, 3, 2, 1),
                // Winograd (32 channels and more), odd width.
                (3, 32, 6, 7, 33, 3, 1, 1),
            ] {
                let x = var(&[b, c, h, w], dtype)?;
                let wt = var(&[o, c, k, k], dtype)?;
                let bias = var(&[o], dtype)?;
                let (ho, wo) = (
                    (h + 2 * pad - k) / stride + 1,
                    (w + 2 * pad - k) / stride + 1,
                );
                // Stored transposed, so the op gets a non-contiguous residual.
                let res = var(&[b, o, wo, ho], dtype)?;
                let residual = res.as_tensor().transpose(2, 3)?;
                let p = ConvParams {
                    stride,
                    padding: pad,
                };
                let ours = conv2d_residual(
                    x.as_tensor(),
                    wt.as_tensor(),
                    Some(bias.as_tensor()),
                    p,
                    &residual,
                )?;
                let theirs = (x
                    .as_tensor()
                    .conv2d(wt.as_tensor(), pad, stride, 1, 1)?
                    .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?
                    + &residual)?;
                assert_eq!(ours.dims(), theirs.dims());
                assert!(max_diff(&ours, &theirs)? < tol * 10.0);
                let case = format!("{:?} {dtype:?}", (b, c, h, w, o, k, stride));
                assert_same_grads(&ours, &theirs, &[&x, &wt, &bias, &res], tol, &case)?;
            }
        }
        // A residual of the wrong shape is an error, not a panic.
        let x = var(&[1, 2, 4, 4], DType::F32)?;
        let wt = var(&[3, 2, 3, 3], DType::F32)?;
        let wrong = var(&[1, 3, 4, 5], DType::F32)?;
        let p = ConvParams {
            stride: 1,
            padding: 1,
        };
        assert!(
            conv2d_residual(x.as_tensor(), wt.as_tensor(), None, p, wrong.as_tensor()).is_err()
        );
        Ok(())
    }

    /// The channel concatenation kernel against candle's `cat`: forward and both gradients,
    /// with batch 1, odd channel counts, non-square planes and a non-contiguous input; inputs
    /// that differ outside the channels are an error.
    #[test]
    fn concat_kernel_matches_candle_cat() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            for (b, ca, cb, h, w) in [(1, 1, 2, 3, 3), (3, 5, 3, 4, 7), (2, 2, 6, 1, 5)] {
                let a = var(&[b, ca, h, w], dtype)?;
                // Stored transposed, so the op gets a strided second input.
                let bt = var(&[b, cb, w, h], dtype)?;
                let bv = bt.as_tensor().transpose(2, 3)?;
                let ours = cat_channels(a.as_tensor(), &bv)?;
                let theirs = Tensor::cat(&[a.as_tensor(), &bv], 1)?;
                assert_eq!(ours.dims(), theirs.dims());
                assert_eq!(max_diff(&ours, &theirs)?, 0.0);
                let case = format!("{:?} {dtype:?}", (b, ca, cb, h, w));
                assert_same_grads(&ours, &theirs, &[&a, &bt], 1e-12, &case)?;
            }
        }
        let a = var(&[2, 3, 4, 4], DType::F32)?;
        let other = var(&[2, 3, 4, 5], DType::F32)?;
        assert!(cat_channels(a.as_tensor(), other.as_tensor()).is_err());
        Ok(())
    }

    /// The gradients of `sum(f(v) * r)` with respect to each of `vars`, `r` random of the
    /// output's shape (the same `r` for every `f` given the same seed).
    fn grads_of(out: &Tensor, vars: &[&candle_core::Var], seed: u64) -> Result<Vec<Tensor>> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let r: Vec<f64> = (0..out.elem_count())
            .map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0))
            .collect();
        let r = Tensor::from_vec(r, out.shape(), &Device::Cpu)?.to_dtype(out.dtype())?;
        let g = (out * r)?.sum_all()?.backward()?;
        Ok(vars
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("gradient").clone())
            .collect())
    }

    /// Asserts that `ours` and `theirs` (the same function computed two ways) have the same
    /// gradients of `sum(out * r)` with respect to `vars`: max difference below
    /// `tol * (1 + max |reference|)`.
    fn assert_same_grads(
        ours: &Tensor,
        theirs: &Tensor,
        vars: &[&candle_core::Var],
        tol: f64,
        case: &str,
    ) -> Result<()> {
        let ga = grads_of(ours, vars, 17)?;
        let gb = grads_of(theirs, vars, 17)?;
        for (k, (a, r)) in ga.iter().zip(&gb).enumerate() {
            let scale = 1.0
                + r.abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            assert!(
                max_diff(a, r)? < tol * scale,
                "gradient of input {k}, {case}"
            );
        }
        Ok(())
    }

    /// Relative difference `max |a - b| / max(|b|, 1e-30)`.
    fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
        let m = b
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(max_diff(a, b)? / m.max(1e-30))
    }

    /// Extra padding at the bottom and right in our conv kernel (the DDPM downsampling) against
    /// candle's padded copy then conv: forward and the three gradients.
    #[test]
    fn conv_kernel_with_end_padding_matches_padded_candle_conv() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            // (b, c, h, w, o, k, stride, padding, extra end padding)
            for (b, c, h, w, o, k, stride, pad, extra) in [
                (2, 3, 8, 8, 4, 3, 2, 0, 1),
                (1, 2, 6, 8, 3, 3, 2, 0, 1),
                (2, 2, 5, 5, 2, 3, 1, 1, 2),
            ] {
                let x = var(&[b, c, h, w], dtype)?;
                let wt = var(&[o, c, k, k], dtype)?;
                let bias = var(&[o], dtype)?;
                let p = ConvParams {
                    stride,
                    padding: pad,
                };
                let ours = conv2d_padded_end(
                    x.as_tensor(),
                    wt.as_tensor(),
                    Some(bias.as_tensor()),
                    p,
                    extra,
                )?;
                let theirs = x
                    .as_tensor()
                    .pad_with_zeros(2, pad, pad + extra)?
                    .pad_with_zeros(3, pad, pad + extra)?
                    .conv2d(wt.as_tensor(), 0, stride, 1, 1)?
                    .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1))?)?;
                assert_eq!(ours.dims(), theirs.dims());
                assert!(rel(&ours, &theirs)? < tol);
                let vars = [&x, &wt, &bias];
                for (a, r) in grads_of(&ours, &vars, 3)?
                    .iter()
                    .zip(grads_of(&theirs, &vars, 3)?)
                {
                    assert!(
                        rel(a, &r)? < tol,
                        "{:?} {dtype:?}",
                        (b, c, h, w, stride, extra)
                    );
                }
            }
        }
        Ok(())
    }

    /// Our nearest 2x upsampling against candle's: forward (exactly) and the gradient.
    #[test]
    fn upsample_kernel_matches_candle() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            for (b, c, h, w) in [(1, 1, 1, 1), (2, 3, 4, 5), (3, 2, 7, 3)] {
                let x = var(&[b, c, h, w], dtype)?;
                let ours = upsample_nearest_2x(x.as_tensor())?;
                let theirs = x.as_tensor().upsample_nearest2d(2 * h, 2 * w)?;
                assert_eq!(max_diff(&ours, &theirs)?, 0.0);
                let ga = grads_of(&ours, &[&x], 5)?;
                let gb = grads_of(&theirs, &[&x], 5)?;
                assert!(rel(&ga[0], &gb[0])? < 1e-6, "{:?}", (b, c, h, w));
            }
        }
        Ok(())
    }

    #[test]
    fn unfold_conv_matches_candle_forward_and_backward() -> Result<()> {
        // (b, c_in, h, w, c_out, k, stride, padding): odd channels, non-square, 1x1, stride 2.
        let cases = [
            (2, 3, 8, 6, 5, 3, 1, 1),
            (1, 4, 7, 9, 2, 3, 2, 1),
            (3, 5, 6, 6, 4, 1, 1, 0),
            (2, 2, 8, 8, 3, 3, 2, 0),
            (1, 3, 5, 5, 2, 3, 1, 0),
        ];
        for (b, ci, h, w, co, k, s, pad) in cases {
            let x = var(&[b, ci, h, w], DType::F64)?;
            let wt = var(&[co, ci, k, k], DType::F64)?;
            let p = ConvParams {
                stride: s,
                padding: pad,
            };
            let ours = conv2d_unfold(x.as_tensor(), wt.as_tensor(), p)?;
            let reference = x.as_tensor().conv2d(wt.as_tensor(), pad, s, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_diff(&ours, &reference)? < 1e-10,
                "forward {b} {ci} {h} {w} {k} {s}"
            );
            // Gradients against a fixed random cotangent.
            let cot = Tensor::randn(0f64, 1.0, ours.dims(), &Device::Cpu)?;
            let g_ours = (ours * &cot)?.sum_all()?.backward()?;
            let g_ref = (reference * &cot)?.sum_all()?.backward()?;
            for v in [&x, &wt] {
                let a = g_ours.get(v.as_tensor()).expect("gradient");
                let r = g_ref.get(v.as_tensor()).expect("gradient");
                assert!(max_diff(a, r)? < 1e-9, "gradient {b} {ci} {h} {w} {k} {s}");
            }
        }
        Ok(())
    }

    #[test]
    fn weights_follow_the_activation_dtype() -> Result<()> {
        // f32 master weights with f16 activations: the output is f16 and the weight gradient
        // arrives in f32, close to the all-f32 gradient.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &Device::Cpu)?;
        let w = var(&[4, 3, 3, 3], DType::F32)?;
        let p = ConvParams {
            stride: 1,
            padding: 1,
        };
        let half = conv2d(&x.to_dtype(DType::F16)?, w.as_tensor(), None, p)?;
        assert_eq!(half.dtype(), DType::F16);
        let full = conv2d(&x, w.as_tensor(), None, p)?;
        assert!(max_diff(&half.to_dtype(DType::F32)?, &full)? < 2e-2);
        let g = half.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let gw = g.get(w.as_tensor()).expect("gradient");
        assert_eq!(gw.dtype(), DType::F32);
        let g_full = full.sum_all()?.backward()?;
        let gw_full = g_full.get(w.as_tensor()).expect("gradient");
        let scale = gw_full.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        assert!(max_diff(gw, gw_full)? < 1e-2 * scale);
        Ok(())
    }

    /// The fused GroupNorm + scale-shift + SiLU against candle's ops, step by step, forward and
    /// the gradients of all five inputs (odd channels, batch 1, non-square).
    #[test]
    fn fused_group_norm_scale_shift_silu_dropout_matches_candle() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (b, c, h, w, groups, with_ss, drop) in [
                (1, 4, 3, 5, 2, true, false),
                (3, 6, 5, 4, 3, true, true),
                (2, 7, 2, 2, 1, false, false),
                (2, 8, 4, 4, 8, true, false),
                (2, 6, 7, 3, 2, false, true),
            ] {
                let dropout = drop.then_some(Dropout {
                    p: 0.3,
                    seed: 0x1234_5678_9abc + b as u64,
                });
                let x = var(&[b, c, h, w], dtype)?;
                let gamma = var(&[c], dtype)?;
                let beta = var(&[c], dtype)?;
                let scale = var(&[b, c, 1, 1], dtype)?;
                let shift = var(&[b, c, 1, 1], dtype)?;
                let ss = with_ss.then(|| (scale.as_tensor(), shift.as_tensor()));
                let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
                let ours = group_norm_act(xt, groups, gt, bt, ss, true, dropout, 1e-5)?;
                let mut theirs = group_norm_candle(xt, groups, gt, bt, 1e-5)?;
                if let Some((sc, sh)) = ss {
                    theirs = theirs.broadcast_mul(&(sc + 1.0)?)?.broadcast_add(sh)?;
                }
                let mut theirs = (&theirs * candle_nn::ops::sigmoid(&theirs)?)?;
                if let Some(d) = dropout {
                    let mask = Tensor::from_vec(
                        d.mask(theirs.elem_count()),
                        theirs.shape(),
                        &Device::Cpu,
                    )?;
                    theirs = theirs.mul(&mask.to_dtype(dtype)?)?;
                }
                assert!(max_diff(&ours, &theirs)? < tol * 10.0, "forward {b} {c}");
                let mut vars = vec![&x, &gamma, &beta];
                if with_ss {
                    vars.extend([&scale, &shift]);
                }
                let case = format!("{:?} {dtype:?}", (b, c, h, w, groups));
                assert_same_grads(&ours, &theirs, &vars, tol, &case)?;
            }
        }
        Ok(())
    }

    /// The dropout mask: the dropped fraction is `p` within 4 standard deviations, kept
    /// elements are scaled by exactly `1 / (1 - p)`, the mask is a function of the seed, and
    /// the mask of a fused GroupNorm (by any thread count: it depends on indexes only) is the
    /// one `Dropout::mask` gives.
    #[test]
    fn dropout_mask_has_the_asked_rate_and_follows_its_seed() -> Result<()> {
        let n = 1 << 20;
        for p in [0.1, 0.5, 0.9] {
            let d = Dropout { p, seed: 7 };
            let m = d.mask(n);
            let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((dropped - p).abs() < 4.0 * sd, "p {p}: dropped {dropped}");
            let keep = 1.0 / (1.0 - p);
            assert!(m.iter().all(|&v| v == 0.0 || v == keep));
            assert_eq!(m, d.mask(n));
            assert_ne!(m, Dropout { p, seed: 8 }.mask(n));
        }
        // Through the kernel: zeros exactly where the mask is zero.
        let d = Dropout { p: 0.5, seed: 99 };
        let x = (Tensor::randn(0f32, 1.0, (4, 8, 6, 6), &Device::Cpu)?.abs()? + 0.5)?;
        let ones = Tensor::ones(8, DType::F32, &Device::Cpu)?;
        let zeros = Tensor::zeros(8, DType::F32, &Device::Cpu)?;
        let y = group_norm_act(&x, 2, &ones, &zeros, None, false, Some(d), 1e-5)?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let m = d.mask(y.len());
        let agree = y
            .iter()
            .zip(&m)
            .filter(|(&v, &k)| (v == 0.0) == (k == 0.0))
            .count();
        assert_eq!(agree, y.len());
        Ok(())
    }

    #[test]
    fn group_norm_normalizes_each_group() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f64, 2.0 * 4.0 * 9.0, &dev)?
            .sqr()?
            .reshape((2, 4, 3, 3))?;
        let w = Tensor::ones(4, DType::F64, &dev)?;
        let b = Tensor::zeros(4, DType::F64, &dev)?;
        let y = group_norm(&x, 2, &w, &b, 0.0)?;
        let g = y.reshape((2, 2, 18))?;
        let mean = g.mean_keepdim(2)?.flatten_all()?.to_vec1::<f64>()?;
        let var = g.sqr()?.mean_keepdim(2)?.flatten_all()?.to_vec1::<f64>()?;
        for (m, v) in mean.iter().zip(var.iter()) {
            assert!(m.abs() < 1e-12, "group mean {m}");
            assert!((v - 1.0).abs() < 1e-12, "group variance {v}");
        }
        Ok(())
    }

    #[test]
    fn pixel_unshuffle_matches_index_formula() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w) = (2, 3, 4, 6);
        let x = Tensor::arange(0u32, (b * c * h * w) as u32, &dev)?.reshape((b, c, h, w))?;
        let y = pixel_unshuffle_2x(&x)?;
        assert_eq!(y.dims4()?, (b, 4 * c, h / 2, w / 2));
        let xs = x.flatten_all()?.to_vec1::<u32>()?;
        let ys = y.flatten_all()?.to_vec1::<u32>()?;
        // y[n, ci*4 + p1*2 + p2, i, j] == x[n, ci, 2i + p1, 2j + p2]
        for n in 0..b {
            for ci in 0..c {
                for p1 in 0..2 {
                    for p2 in 0..2 {
                        for i in 0..h / 2 {
                            for j in 0..w / 2 {
                                let oc = ci * 4 + p1 * 2 + p2;
                                let yi = ((n * 4 * c + oc) * (h / 2) + i) * (w / 2) + j;
                                let xi = ((n * c + ci) * h + 2 * i + p1) * w + 2 * j + p2;
                                assert_eq!(ys[yi], xs[xi]);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
