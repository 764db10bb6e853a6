//! The convolution on CUDA: our im2col ([`crate::cuda::gather`]), one cuBLAS GEMM over all
//! images, and our [`ConvOut`] kernel (the GEMM's result transposed to (b, c_out, oh, ow), the
//! bias added); backward two GEMMs, col2im and [`ConvOut`]'s transpose with the bias gradient's
//! sums. Instead of candle's chain of pads, strided copies and a stack whose backward zero-fills
//! a full-size gradient per kernel tap. The kernels are in `kernels.cu` here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor};

use crate::cuda::gather::Gather;
use crate::cuda::{elementwise, extended, launch, Arg};
use crate::custom_op::{unpack, Kernel};

/// The geometry of a convolution's im2col: input (b, c, h, w), a kh x kw kernel, `stride`,
/// `pad` zeros before each spatial dimension, and the output size (oh, ow), which fixes the
/// padding after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfold {
    /// Batch.
    pub b: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// Zero rows/columns before the input.
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl Unfold {
    pub(crate) fn input_shape(&self) -> Shape {
        Shape::from((self.b, self.c, self.h, self.w))
    }
    /// (c * kh * kw, b * oh * ow): rows (channel, tap), columns (image, output pixel).
    pub(crate) fn cols_shape(&self) -> Shape {
        Shape::from((self.c * self.kh * self.kw, self.b * self.oh * self.ow))
    }
}

/// The im2col matrix (c * kh * kw, b * oh * ow) of `x` (b, c, h, w) for a convolution with
/// geometry `g` (differentiable: its backward pass is col2im).
pub fn im2col(x: &Tensor, g: Unfold) -> Result<Tensor> {
    let expected = g.input_shape();
    if x.shape() != &expected {
        candle_core::bail!("im2col: expected shape {expected:?}, got {:?}", x.shape());
    }
    x.contiguous()?.apply_op1(Gather::Im2col(g))
}

/// Convolution of `x` (b, c, h, w) with `weight` (c_out, c, kh, kw) plus `bias` (c_out, or
/// (b, c_out) for a bias per image): `pads.0` zeros before and `pads.1` after each spatial
/// dimension. Our im2col, one cuBLAS GEMM `weight (c_out, c kh kw) x cols (c kh kw, b oh ow)`,
/// and our [`ConvOut`] kernel (the GEMM's (c_out, b, oh ow) result transposed to
/// (b, c_out, oh, ow), the bias added). Backward: two GEMMs (the weight gradient one product
/// over all images), col2im, and [`ConvOut`]'s transpose with the bias gradient's sums.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pads: (usize, usize),
) -> Result<Tensor> {
    let geom = super::Geom::new(x.dims(), weight.dims(), stride, pads.0, pads.1)?;
    let (b, c_out, oh, ow) = (geom.b, geom.o, geom.ho, geom.wo);
    let g = Unfold {
        b,
        c: geom.c,
        h: geom.h,
        w: geom.w,
        kh: geom.kh,
        kw: geom.kw,
        stride: geom.stride,
        pad: geom.pad,
        oh,
        ow,
    };
    let yt = weight
        .reshape((c_out, g.c * g.kh * g.kw))?
        .matmul(&im2col(x, g)?)?;
    let bias = match bias {
        Some(v) if v.elem_count() == c_out => v.reshape((1, c_out))?,
        Some(v) if v.elem_count() == b * c_out => v.reshape((b, c_out))?,
        Some(v) => candle_core::bail!(
            "conv2d: bias of shape {:?} for {c_out} output channels and {b} images",
            v.dims()
        ),
        None => Tensor::zeros((1, c_out), x.dtype(), x.device())?,
    };
    yt.apply_op2(&bias.contiguous()?, ConvOut { b, c_out, oh, ow })
}

/// A convolution's output from its GEMM: (c_out, b oh ow) -> (b, c_out, oh, ow), plus a bias
/// (rows, c_out) with one row, or one per image.
#[derive(Debug, Clone, Copy)]
struct ConvOut {
    b: usize,
    c_out: usize,
    oh: usize,
    ow: usize,
}

/// [`ConvOut`]'s backward: the output gradient transposed back, and its per-plane sums.
#[derive(Debug, Clone, Copy)]
struct ConvOutBackward(ConvOut);

impl ConvOut {
    fn len(&self) -> usize {
        self.b * self.c_out * self.oh * self.ow
    }
    /// Elements per thread (forward) or per lane and step (backward): 16 bytes of `dtype`
    /// where planes are whole multiples of it and the later kernels are on, else one.
    fn vec(&self, dtype: DType) -> usize {
        let v = 16 / dtype.size_in_bytes();
        if extended() && (self.oh * self.ow).is_multiple_of(v) {
            v
        } else {
            1
        }
    }
    /// The forward kernel and its launch: a grid-stride loop over vectors of a plane.
    fn forward_launch(&self, dtype: DType) -> (&'static str, LaunchConfig) {
        match self.vec(dtype) {
            1 => ("conv_out", elementwise(self.len())),
            v => ("conv_out_vec", elementwise(self.len() / v)),
        }
    }
    /// The backward kernel and its launch: one warp per plane, 8 per block.
    fn backward_launch(&self, dtype: DType) -> (&'static str, LaunchConfig) {
        let name = match self.vec(dtype) {
            1 => "conv_out_bwd",
            _ => "conv_out_bwd_vec",
        };
        let cfg = LaunchConfig {
            grid_dim: ((self.b * self.c_out).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        (name, cfg)
    }
    fn dims(&self) -> [u32; 3] {
        [self.b, self.c_out, self.oh * self.ow].map(|v| v as u32)
    }
}

impl Kernel<2> for ConvOut {
    const NAME: &'static str = "ddpm-conv-out";
    type Plan = ();

    fn plan(&self, [ly, lb]: [&Layout; 2]) -> Result<((), Shape)> {
        let rows = lb.shape().elem_count() / self.c_out.max(1);
        if ly.shape().elem_count() != self.len() || !(rows == 1 || rows == self.b) {
            candle_core::bail!(
                "{}: shapes {:?}, {:?} for {self:?}",
                Self::NAME,
                ly.shape(),
                lb.shape()
            );
        }
        if self.len() + self.b * self.c_out > (u32::MAX as usize) - (1 << 24) {
            candle_core::bail!(
                "{}: tensors over 2^32 - 2^24 elements are not supported",
                Self::NAME
            );
        }
        Ok(((), Shape::from((self.b, self.c_out, self.oh, self.ow))))
    }

    fn cuda(&self, _: &(), inputs: [(&CudaStorage, &Layout); 2]) -> Result<CudaStorage> {
        let [(yt, _), (_, lb)] = inputs;
        let rows = (lb.shape().elem_count() / self.c_out.max(1)) as u32;
        let (name, cfg) = self.forward_launch(yt.dtype());
        let [b, c_out, hw] = self.dims().map(Arg::U32);
        // SAFETY: kernels.cu's conv_out kernels take (yt, bias, out, b, c_out, hw, bias_rows)
        // and write every element of `out` (b * c_out * hw).
        unsafe {
            launch(
                name,
                &inputs,
                self.len(),
                cfg,
                &[b, c_out, hw, Arg::U32(rows)],
            )
        }
    }

    fn bwd(
        &self,
        [yt, bias]: [&Tensor; 2],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 2]> {
        let packed = grad.contiguous()?.apply_op1(ConvOutBackward(*self))?;
        let shapes = [yt.shape().clone(), Shape::from((self.b, self.c_out))];
        let [dyt, per_image] = unpack(&packed, shapes)?;
        let dbias = if bias.elem_count() == self.c_out {
            per_image.sum_keepdim(0)?
        } else {
            per_image
        };
        Ok([Some(dyt), Some(dbias.reshape(bias.shape())?)])
    }
}
custom_op!(ConvOut, 2);

impl Kernel<1> for ConvOutBackward {
    const NAME: &'static str = "ddpm-conv-out-backward";
    type Plan = ();

    fn plan(&self, [lg]: [&Layout; 1]) -> Result<((), Shape)> {
        let op = self.0;
        if lg.shape().elem_count() != op.len() {
            candle_core::bail!(
                "{}: gradient of shape {:?} for {op:?}",
                Self::NAME,
                lg.shape()
            );
        }
        Ok(((), Shape::from(op.len() + op.b * op.c_out)))
    }

    fn cuda(&self, _: &(), inputs: [(&CudaStorage, &Layout); 1]) -> Result<CudaStorage> {
        let op = self.0;
        let (name, cfg) = op.backward_launch(inputs[0].0.dtype());
        let out_len = op.len() + op.b * op.c_out;
        let args = op.dims().map(Arg::U32);
        // SAFETY: kernels.cu's conv_out_bwd kernels take (dout, packed, b, c_out, hw) and write
        // every element of `packed` (the transposed gradient, then one sum per plane).
        unsafe { launch(name, &inputs, out_len, cfg, &args) }
    }
}
custom_op!(ConvOutBackward, 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::{gpu, randn, rel_err};
    use candle_core::{Device, Var};

    /// Forward, input, weight and bias gradients of our CUDA convolution against candle's CPU
    /// conv2d (the end padding as an explicitly padded input) plus a broadcast bias, with a
    /// weighted sum as the loss. `bias_rows`: 0 (no bias), 1 (per channel) or the batch.
    fn check_conv(
        dev: &Device,
        x: &[usize],
        c_out: usize,
        k: usize,
        stride: usize,
        pads: (usize, usize),
        bias_rows: usize,
    ) {
        let xc = randn(x, 1);
        let wc = randn(&[c_out, x[1], k, k], 2);
        let bc = randn(&[bias_rows.max(1), c_out], 4);
        let var = |t: &Tensor, dev: &Device| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap();
        let (xv, wv, bv) = (
            var(&xc, &Device::Cpu),
            var(&wc, &Device::Cpu),
            var(&bc, &Device::Cpu),
        );
        let xp = xv
            .pad_with_zeros(2, pads.0, pads.1)
            .unwrap()
            .pad_with_zeros(3, pads.0, pads.1)
            .unwrap();
        let mut yc = xp.conv2d(&wv, 0, stride, 1, 1).unwrap();
        if bias_rows > 0 {
            let b4 = bv.reshape((bias_rows, c_out, 1, 1)).unwrap();
            yc = yc.broadcast_add(&b4).unwrap();
        }
        let probe = randn(yc.dims(), 3);
        let gc = (&yc * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let (xg, wg, bg) = (var(&xc, dev), var(&wc, dev), var(&bc, dev));
        let bias = (bias_rows > 0).then_some(bg.as_tensor());
        let yg = conv2d(&xg, &wg, bias, stride, pads).unwrap();
        let pg = probe.to_device(dev).unwrap();
        let gg = (&yg * &pg).unwrap().sum_all().unwrap().backward().unwrap();
        let what = format!(
            "conv x {x:?} c_out {c_out} k {k} stride {stride} pads {pads:?} bias rows {bias_rows}"
        );
        assert!(
            rel_err(&yg, &yc) < 1e-5,
            "{what}: forward {}",
            rel_err(&yg, &yc)
        );
        let (dxg, dxc) = (gg.get(&xg).unwrap(), gc.get(&xv).unwrap());
        assert!(rel_err(dxg, dxc) < 1e-5, "{what}: dx {}", rel_err(dxg, dxc));
        let (dwg, dwc) = (gg.get(&wg).unwrap(), gc.get(&wv).unwrap());
        assert!(rel_err(dwg, dwc) < 1e-5, "{what}: dw {}", rel_err(dwg, dwc));
        if bias_rows > 0 {
            let (dbg, dbc) = (gg.get(&bg).unwrap(), gc.get(&bv).unwrap());
            assert!(rel_err(dbg, dbc) < 1e-5, "{what}: db {}", rel_err(dbg, dbc));
        }
    }

    #[test]
    fn conv_matches_candle_on_the_cpu() {
        let Some(dev) = gpu() else { return };
        check_conv(&dev, &[2, 3, 5, 7], 4, 3, 1, (1, 1), 0);
        check_conv(&dev, &[1, 4, 8, 8], 5, 3, 2, (1, 1), 1);
        check_conv(&dev, &[3, 5, 8, 6], 2, 3, 2, (0, 1), 0); // the paper's "SAME" downsampling
        check_conv(&dev, &[2, 6, 4, 4], 3, 1, 1, (0, 0), 1);
        check_conv(&dev, &[2, 6, 5, 5], 3, 1, 2, (0, 0), 2);
        check_conv(&dev, &[2, 3, 6, 6], 4, 5, 1, (2, 2), 2);
        check_conv(&dev, &[4, 64, 16, 16], 32, 3, 1, (1, 1), 4);
    }

    /// A convolution in bf16 on CUDA against f32 on the CPU, within bf16's precision.
    #[test]
    fn conv_in_bf16_is_within_its_precision() {
        let Some(dev) = gpu() else { return };
        let (xc, wc, bc) = (
            randn(&[2, 32, 8, 8], 5),
            randn(&[16, 32, 3, 3], 6),
            randn(&[2, 16], 7),
        );
        let yc = xc
            .conv2d(&wc, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bc.reshape((2, 16, 1, 1)).unwrap())
            .unwrap();
        let h = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
        let yg = conv2d(&h(&xc), &h(&wc), Some(&h(&bc)), 1, (1, 1)).unwrap();
        assert!(
            rel_err(&yg, &yc) < 2e-2,
            "bf16 forward {}",
            rel_err(&yg, &yc)
        );
    }
}
