//! 2-D convolution, `conv2d(x, w) + bias [+ residual]`, with padding that may differ at the end
//! and a bias per channel or per image (the time embedding): the candle custom ops and their
//! backward passes here, the CPU kernels in `cpu` (im2col + GEMM) and `winograd` (F(2x2, 3x3)
//! for 3x3 stride-1 convolutions, with its AVX-512 dot products in `winograd/dots.rs`, and the
//! opt-in F(4x4, 3x3) in `winograd/f43.rs`), the CUDA
//! version in `cuda` (our im2col, one cuBLAS GEMM, a bias epilogue), and candle's composition
//! in [`fallback`].

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fallback;
mod winograd;

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Layout, Result, Shape, Tensor, TensorId};

use crate::custom_op::{unpack, Kernel};
use crate::Float;
use cpu::Geom;

/// The convolution `conv2d(x, w) + bias` as a custom op over (x, w, bias).
#[derive(Debug, Clone, Copy)]
pub struct Conv2d {
    /// Stride in both dimensions.
    pub stride: usize,
    /// Zero padding before the first row and column.
    pub padding: usize,
    /// Zero padding after the last row and column (usually `padding`; TensorFlow's "SAME"
    /// padding of a stride-2 conv pads only after).
    pub padding_end: usize,
    /// The weight tensor's id, under which its Winograd transform is kept while weights are
    /// constant ([`with_constant_weights`]); `None`: never kept.
    pub weight: Option<TensorId>,
}

/// Its backward pass over (x, w, grad): `[dx | dw | db per (image, channel)]`, flat.
struct Conv2dBackward(Conv2d);

impl Conv2d {
    /// The geometry of this convolution over an input and a kernel of these dims.
    fn geom(&self, x: &[usize], w: &[usize]) -> Result<Geom> {
        Geom::new(x, w, self.stride, self.padding, self.padding_end)
    }
}

impl Kernel<3> for Conv2d {
    const NAME: &'static str = "ddpm-conv2d";
    type Plan = Geom;

    fn plan(&self, [x, w, bias]: [&Layout; 3]) -> Result<(Geom, Shape)> {
        let g = self.geom(x.dims(), w.dims())?;
        let bias_len = bias.shape().elem_count();
        if bias_len != g.o && bias_len != g.b * g.o {
            candle_core::bail!(
                "conv2d: bias of {bias_len} values for {} output channels and batch {}",
                g.o,
                g.b
            );
        }
        Ok((g, Shape::from((g.b, g.o, g.ho, g.wo))))
    }

    fn cpu<T: Float>(&self, g: &Geom, [x, w, bias]: [&[T]; 3]) -> Result<Vec<T>> {
        Ok(cpu::forward(g, x, (w, self.weight), bias, None))
    }

    fn bwd(
        &self,
        [x, w, bias]: [&Tensor; 3],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let (dx, dw, db) = gradients(*self, x, w, bias.elem_count(), &grad.contiguous()?)?;
        // A per-image bias (b, o) at batch 1 has as many values as a per-channel one (o): the
        // gradient takes the bias's own shape, whichever it is.
        Ok([Some(dx), Some(dw), Some(db.reshape(bias.shape())?)])
    }
}
custom_op!(Conv2d, 3);

impl Kernel<3> for Conv2dBackward {
    const NAME: &'static str = "ddpm-conv2d-backward";
    type Plan = Geom;

    fn plan(&self, [x, w, _]: [&Layout; 3]) -> Result<(Geom, Shape)> {
        let g = self.0.geom(x.dims(), w.dims())?;
        let len = g.b * g.in_len() + g.o * g.k() + g.b * g.o;
        Ok((g, Shape::from(len)))
    }

    fn cpu<T: Float>(&self, g: &Geom, [x, w, dy]: [&[T]; 3]) -> Result<Vec<T>> {
        Ok(cpu::backward(g, x, w, dy))
    }
}
custom_op!(Conv2dBackward, 3);

/// `(dx, dw, db)` of `conv2d(x, w) + bias` from the output's gradient `grad` (contiguous), for a
/// bias of `bias_len` values (one per channel, or one per image and channel).
fn gradients(
    conv: Conv2d,
    x: &Tensor,
    w: &Tensor,
    bias_len: usize,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let packed = x.apply_op3_no_bwd(w, grad, &Conv2dBackward(conv))?;
    let (b, o) = (x.dims()[0], w.dims()[0]);
    let shapes = [x.shape().clone(), w.shape().clone(), Shape::from((b, o))];
    let [dx, dw, db_rows] = unpack(&packed, shapes)?;
    let db = if bias_len == o {
        db_rows.sum(0)?
    } else {
        db_rows
    };
    Ok((dx, dw, db))
}

/// `conv2d(x, w) + bias + residual` as a custom op over (x, [w | bias] flattened, residual): the
/// residual connection of a ResNet block added by the convolution's own output loop, so the sum
/// costs no pass over memory and no graph node. (The weight and bias travel packed because
/// candle's custom ops take at most three inputs; both are small.)
#[derive(Debug, Clone, Copy)]
pub struct Conv2dResidual {
    /// The convolution.
    pub conv: Conv2d,
    /// The weight's shape (c_out, c_in, kh, kw).
    pub w_dims: [usize; 4],
}

impl Conv2dResidual {
    fn w_len(&self) -> usize {
        self.w_dims.iter().product()
    }
}

impl Kernel<3> for Conv2dResidual {
    const NAME: &'static str = "ddpm-conv2d-residual";
    type Plan = Geom;

    fn plan(&self, [x, wb, residual]: [&Layout; 3]) -> Result<(Geom, Shape)> {
        let g = self.conv.geom(x.dims(), &self.w_dims)?;
        if wb.shape().elem_count() != self.w_len() + g.o {
            candle_core::bail!("conv2d-residual: packed weight and bias of the wrong length");
        }
        let out = [g.b, g.o, g.ho, g.wo];
        if residual.dims() != out {
            candle_core::bail!(
                "conv2d-residual: residual {:?} for an output of {out:?}",
                residual.dims()
            );
        }
        Ok((g, Shape::from(&out)))
    }

    fn cpu<T: Float>(&self, g: &Geom, [x, wb, residual]: [&[T]; 3]) -> Result<Vec<T>> {
        let (w, bias) = wb.split_at(self.w_len());
        Ok(cpu::forward(
            g,
            x,
            (w, self.conv.weight),
            bias,
            Some(residual),
        ))
    }

    fn bwd(
        &self,
        [x, wb, _]: [&Tensor; 3],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let grad = grad.contiguous()?;
        let w = wb
            .narrow(0, 0, self.w_len())?
            .reshape(self.w_dims.as_slice())?;
        let (dx, dw, db) = gradients(self.conv, x, &w, self.w_dims[0], &grad)?;
        let dwb = Tensor::cat(&[dw.flatten_all()?, db], 0)?;
        // The residual's gradient is the output's.
        Ok([Some(dx), Some(dwb), Some(grad)])
    }
}
custom_op!(Conv2dResidual, 3);

/// `conv2d(x, w) + bias + residual` through our kernel ([`Conv2dResidual`]): `bias` (c_out) per
/// channel, `residual` shaped like the output; inputs are made contiguous.
pub fn conv2d_residual(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    (padding, padding_end): (usize, usize),
    residual: &Tensor,
) -> Result<Tensor> {
    let w_dims = w.dims4()?;
    let wb = Tensor::cat(&[w.flatten_all()?, bias.flatten_all()?], 0)?;
    x.contiguous()?.apply_op3(
        &wb,
        &residual.contiguous()?,
        Conv2dResidual {
            conv: Conv2d {
                stride,
                padding,
                padding_end,
                weight: Some(w.id()),
            },
            w_dims: [w_dims.0, w_dims.1, w_dims.2, w_dims.3],
        },
    )
}

/// `conv2d(x, w) + bias` through our kernel, the bias (c_out) per channel or (b, c_out) per image,
/// with `padding` zeros before and `padding_end` after the rows and columns; inputs are made
/// contiguous.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    (padding, padding_end): (usize, usize),
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &bias.contiguous()?,
        Conv2d {
            stride,
            padding,
            padding_end,
            weight: Some(w.id()),
        },
    )
}

/// Transformed kernels kept while the weights are constant ([`with_constant_weights`]), on the
/// thread that promised it, by weight tensor and kernel shape.
#[derive(Default)]
struct ConstantKernels {
    /// Each a `Vec<T>` of the weights' element type.
    kernels: HashMap<(TensorId, usize, usize, bool), Arc<dyn Any + Send + Sync>>,
    /// Bytes held.
    bytes: usize,
}

/// The most bytes of transformed kernels kept: more weights than this (16/9 of the Winograd
/// layers' weights are kept) are transformed at every call, as outside the scope.
const CONSTANT_KERNELS_MAX_BYTES: usize = 1 << 30;

thread_local! {
    /// Open while this thread runs inside [`with_constant_weights`].
    static CONSTANT_KERNELS: RefCell<Option<ConstantKernels>> = const { RefCell::new(None) };
}

/// Runs `f` with the promise that no weight tensor changes while it runs (no optimizer step, no
/// `Var::set`, no in-place update): the CPU convolutions on this thread then transform each
/// weight tensor's Winograd kernel once, at its first use, instead of at every call. Sampling
/// opens this around its whole loop (ddpm-train's `sample`): a DDIM-50 sample transforms every
/// kernel 50 times otherwise, writing 16/9 of the weights each time. Up to 1 GiB of transformed
/// kernels are kept, and dropped when the outermost scope ends. Scopes nest; the promise covers
/// this thread's calls only. Breaking it gives convolutions with the old weights.
pub fn with_constant_weights<R>(f: impl FnOnce() -> R) -> R {
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            CONSTANT_KERNELS.with(|c| c.borrow_mut().take());
        }
    }
    let outermost = CONSTANT_KERNELS.with(|c| {
        let mut c = c.borrow_mut();
        let outermost = c.is_none();
        if outermost {
            *c = Some(ConstantKernels::default());
        }
        outermost
    });
    // Made only for the outermost scope: a `Close` made and dropped at once would end it.
    let _close = if outermost { Some(Close) } else { None };
    f()
}

/// The Winograd transform of the kernel `w` (o, c, 3, 3) of weight tensor `id`: kept for the
/// rest of a [`with_constant_weights`] scope when one is open on this thread, else made anew.
pub(crate) fn transformed_kernel<T: Float>(
    o: usize,
    c: usize,
    w: &[T],
    id: Option<TensorId>,
    f43: bool,
) -> Arc<Vec<T>> {
    let make = || {
        Arc::new(if f43 {
            winograd::transform_kernel_f43(o, c, w, false)
        } else {
            winograd::transform_kernel(o, c, w)
        })
    };
    let Some(id) = id else { return make() };
    CONSTANT_KERNELS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(cache) = cell.as_mut() else {
            return make();
        };
        let key = (id, o, c, f43);
        if let Some(kept) = cache.kernels.get(&key) {
            if let Ok(u) = Arc::clone(kept).downcast::<Vec<T>>() {
                return u;
            }
        }
        let u = make();
        let bytes = u.len() * std::mem::size_of::<T>();
        if cache.bytes + bytes <= CONSTANT_KERNELS_MAX_BYTES {
            cache.bytes += bytes;
            cache
                .kernels
                .insert(key, Arc::clone(&u) as Arc<dyn Any + Send + Sync>);
        }
        u
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Inside [`with_constant_weights`] a convolution keeps the Winograd kernel of its first
    /// call (a weight changed in place, against the promise, is not seen), gives the same
    /// values as outside, and the kept kernels go when the scope ends.
    #[test]
    fn constant_weights_keep_the_first_transformed_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 32, 8, 8), &dev)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (32, 32, 3, 3), &dev)? * 0.1)?)?;
        let bias = Tensor::zeros(32, candle_core::DType::F32, &dev)?;
        let conv = |w: &Tensor| {
            conv2d(&x, w, &bias, 1, (1, 1))?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let before = conv(w.as_tensor())?;
        let changed = (w.as_tensor() * 2.0)?;
        let (inside, after_change) = with_constant_weights(|| -> Result<_> {
            let first = conv(w.as_tensor())?;
            let nested = with_constant_weights(|| conv(w.as_tensor()))?;
            assert_eq!(nested, first, "a nested scope keeps the kernels");
            w.set(&changed)?;
            Ok((first, conv(w.as_tensor())?))
        })?;
        assert_eq!(
            inside, before,
            "the kept kernel gives the values of a fresh one"
        );
        assert_eq!(after_change, before, "the first kernel was kept");
        let outside = conv(w.as_tensor())?;
        let doubled: Vec<f32> = before.iter().map(|v| v * 2.0).collect();
        for (a, b) in outside.iter().zip(&doubled) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert!(CONSTANT_KERNELS.with(|c| c.borrow().is_none()));
        Ok(())
    }

    /// The forward pass and all three gradients of a 3x3 convolution of `b` images of `c`
    /// channels and `size` x `size` pixels into `o` channels, under `policy`, against candle's
    /// convolution: within 1e-4 of each output's root mean square (Winograd's rounding is
    /// near 1e-6 of it for F(2x2, 3x3) and 1e-5 for F(4x4, 3x3) over these channel counts).
    fn assert_matches_candle(
        policy: crate::KernelPolicy,
        (b, c, o, size): (usize, usize, usize, usize),
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, size, size), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c, 3, 3), &dev)? * 0.05)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (b, o, size, size), &dev)?;
        // The output and the gradients of sum(y * target), flattened.
        let run = |ours: bool| -> Result<Vec<Vec<f32>>> {
            let y = if ours {
                conv2d(x.as_tensor(), w.as_tensor(), bias.as_tensor(), 1, (1, 1))?
            } else {
                let lowering = fallback::Lowering::Candle;
                let (xs, ws) = (x.as_tensor(), w.as_tensor());
                fallback::conv2d(xs, ws, Some(bias.as_tensor()), 1, (1, 1), lowering)?
            };
            let grads = (&y * &target)?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
            for v in [&x, &w, &bias] {
                let g = grads.get(v.as_tensor()).expect("a gradient per input");
                out.push(g.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        let ours = policy.scoped(|| run(true))?;
        let want = run(false)?;
        for (what, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(ours.iter().zip(&want)) {
            let rms = (b.iter().map(|v| v * v).sum::<f32>() / b.len() as f32).sqrt();
            let worst = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * rms,
                "{policy} {size}x{size}, {what}: worst {worst} against rms {rms}"
            );
        }
        Ok(())
    }

    /// The default policy: Winograd F(2x2, 3x3) forward and for the input gradient, and for the
    /// weight gradient from 8x8 images on (16 tiles), im2col's weight gradient on 4x4 images.
    #[test]
    fn winograd_matches_candles_convolution_forward_and_backward() -> Result<()> {
        let policy = crate::KernelPolicy::default();
        for size in [4, 8, 14, 32] {
            assert_matches_candle(policy, (4, 40, 36, size))?;
        }
        Ok(())
    }

    /// With [`KernelPolicy::winograd_4x4`](crate::KernelPolicy), on 32x32 images (64 4x4 tiles
    /// per image, so F(4x4, 3x3) runs whatever the thread count).
    #[test]
    fn winograd_4x4_matches_candles_convolution_forward_and_backward() -> Result<()> {
        let policy = crate::KernelPolicy {
            winograd_4x4: true,
            ..crate::KernelPolicy::default()
        };
        assert_matches_candle(policy, (3, 48, 40, 32))
    }
}
