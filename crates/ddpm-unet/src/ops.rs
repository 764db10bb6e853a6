//! The hot operations of the U-Nets, each in exactly one place.
//!
//! Every layer of this crate calls these functions instead of candle's ops directly, so that a
//! faster kernel for one op (a CPU convolution, a fused GroupNorm) is swapped in here and nowhere
//! else. Each function is differentiable through candle's autograd.

use candle_core::{DType, Result, Tensor, D};

/// Stride and symmetric zero padding of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Stride in both spatial dimensions.
    pub stride: usize,
    /// Zero padding added on every side.
    pub padding: usize,
}

/// Which implementation the hot ops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Ours: convolution lowered onto GEMM (im2col), forward and backward.
    Ours,
    /// candle's own ops (`DDPM_KERNELS=candle`), to compare against.
    Candle,
}

/// The kernels in use: [`Kernels::Candle`] when the environment variable `DDPM_KERNELS` is
/// `candle`, otherwise [`Kernels::Ours`]. Read once per process.
pub fn kernels() -> Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(|| match std::env::var("DDPM_KERNELS") {
        Ok(v) if v.eq_ignore_ascii_case("candle") => Kernels::Candle,
        _ => Kernels::Ours,
    })
}

/// 2-D convolution: `x` (b, c_in, h, w), `weight` (c_out, c_in, k, k), optional `bias` (c_out).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Tensor> {
    let y = match kernels() {
        Kernels::Ours => conv2d_gemm(x, weight, p)?,
        Kernels::Candle => x.conv2d(weight, p.padding, p.stride, 1, 1)?,
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// Convolution as one GEMM over an im2col matrix built from strided views, so that the forward
/// pass and both gradients run on candle's matmul instead of its direct convolution loops.
fn conv2d_gemm(x: &Tensor, weight: &Tensor, p: ConvParams) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {wc}");
    }
    let s = p.stride.max(1);
    let (hp, wp) = (h + 2 * p.padding, w + 2 * p.padding);
    if hp < kh || wp < kw {
        candle_core::bail!("conv2d: kernel {kh}x{kw} larger than padded input {hp}x{wp}");
    }
    let (ho, wo) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
    if kh == 1 && kw == 1 && s == 1 && p.padding == 0 {
        // Pointwise: (o, c) x (b, c, h*w).
        let y = weight
            .reshape((o, c))?
            .broadcast_matmul(&x.reshape((b, c, h * w))?)?;
        return y.reshape((b, o, ho, wo));
    }
    let mut xp = x.clone();
    if p.padding > 0 {
        xp = xp
            .pad_with_zeros(2, p.padding, p.padding)?
            .pad_with_zeros(3, p.padding, p.padding)?;
    }
    if s > 1 {
        // Room for the strided reshape below: (ho - 1) * s + kh <= rows, rounded up to s.
        let need_h = (ho - 1) * s + kh + s;
        let need_w = (wo - 1) * s + kw + s;
        xp = xp
            .pad_with_zeros(2, 0, need_h.saturating_sub(hp))?
            .pad_with_zeros(3, 0, need_w.saturating_sub(wp))?;
    }
    let mut cols = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            let v = if s == 1 {
                xp.narrow(2, ky, ho)?.narrow(3, kx, wo)?
            } else {
                xp.narrow(2, ky, ho * s)?
                    .narrow(3, kx, wo * s)?
                    .reshape((b, c, ho, s, wo * s))?
                    .narrow(3, 0, 1)?
                    .reshape((b, c, ho, wo, s))?
                    .narrow(4, 0, 1)?
                    .reshape((b, c, ho, wo))?
            };
            cols.push(v);
        }
    }
    // (b, c, k*k, ho, wo) -> (b, c*k*k, ho*wo), matching the weight layout (o, c, kh, kw).
    let cols = Tensor::stack(&cols, 2)?.reshape((b, c * kh * kw, ho * wo))?;
    let y = weight.reshape((o, c * kh * kw))?.broadcast_matmul(&cols)?;
    y.reshape((b, o, ho, wo))
}

/// Affine map on the last dimension: `x` (..., in) times `weight` (out, in) transposed plus `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
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

/// Batched matrix product over the last two dimensions.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.matmul(&b.contiguous()?)
}

/// Nearest-neighbour 2x upsampling of `x` (b, c, h, w).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
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
    use candle_core::Device;

    /// Our GEMM convolution against candle's direct one, forward and both gradients, in f64.
    #[test]
    fn gemm_conv_matches_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (b, c, h, w, o, k, stride, padding)
            (1, 1, 5, 5, 1, 3, 1, 1),
            (2, 3, 8, 6, 5, 3, 1, 1),
            (3, 4, 7, 7, 2, 3, 2, 0),
            (2, 3, 9, 8, 4, 3, 2, 0),
            (2, 5, 6, 6, 3, 1, 1, 0),
            (2, 2, 6, 5, 3, 7, 1, 3),
            (1, 3, 8, 8, 2, 3, 2, 1),
        ];
        for (b, c, h, w, o, k, stride, padding) in cases {
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, c, h, w), &dev)?)?;
            let wt = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (o, c, k, k), &dev)?)?;
            let p = ConvParams { stride, padding };
            let ours = conv2d_gemm(x.as_tensor(), wt.as_tensor(), p)?;
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), padding, stride, 1, 1)?;
            assert_eq!(
                ours.dims(),
                theirs.dims(),
                "{:?}",
                (b, c, h, w, o, k, stride, padding)
            );
            let r = Tensor::randn(0f64, 1.0, ours.dims(), &dev)?;
            let g1 = (&ours * &r)?.sum_all()?.backward()?;
            let g2 = (&theirs * &r)?.sum_all()?.backward()?;
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
            };
            assert!(max_diff(&ours, &theirs)? < 1e-10);
            for v in [&x, &wt] {
                let (a, bb) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                match (a, bb) {
                    (Some(a), Some(bb)) => assert!(max_diff(a, bb)? < 1e-10),
                    _ => panic!("missing gradient"),
                }
            }
        }
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
