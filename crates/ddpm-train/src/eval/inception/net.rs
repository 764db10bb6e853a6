//! pytorch-fid's FID Inception-v3 up to its pool3 features: torchvision's `Inception3` trunk
//! with pytorch-fid's blocks (`FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1` average-pool
//! their branch without counting the zero padding; `FIDInceptionE_2` max-pools it), tensor names
//! as in pytorch-fid's weights file (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`).
//!
//! Every convolution is torchvision's `BasicConv2d`: a bias-free convolution, BatchNorm in
//! inference mode (eps 0.001) and ReLU. At load time the BatchNorm is folded into the
//! convolution (`w' = w g / sqrt(v + eps)`, `b' = beta - m g / sqrt(v + eps)`), which equals
//! BatchNorm after the convolution up to float rounding.

use candle_core::{DType, Tensor, D};
use ddpm_unet::candle_nn::VarBuilder;
use ddpm_unet::ops::{self, ConvParams};

use crate::Result;

/// torchvision's BatchNorm epsilon in Inception-v3 (`BasicConv2d`).
pub const BN_EPS: f64 = 1e-3;

/// The dimension of the pool3 features.
pub const FEATURES: usize = 2048;

/// Convolution + BatchNorm (folded) + ReLU, torchvision's `BasicConv2d`.
#[derive(Debug, Clone)]
struct BasicConv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl BasicConv {
    /// Reads `{conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var}` under `vb`.
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let w = vb.get((c_out, c_in, kernel.0, kernel.1), "conv.weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(c_out, "weight")?;
        let beta = bn.get(c_out, "bias")?;
        let mean = bn.get(c_out, "running_mean")?;
        let var = bn.get(c_out, "running_var")?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let weight = w
            .broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?
            .contiguous()?;
        let bias = (beta - (mean * &scale)?)?;
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
        })
    }

    /// A square kernel with the same padding on all sides.
    fn square(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::new(vb, c_in, c_out, (k, k), stride, (pad, pad))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // x: (b, c_in, h, w)
        let (ph, pw) = self.pad;
        let (x, padding) = if ph == pw {
            (x.clone(), ph)
        } else {
            (x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?, 0)
        };
        let p = ConvParams {
            stride: self.stride,
            padding,
        };
        Ok(ops::conv2d(&x, &self.weight, Some(&self.bias), p)?.relu()?)
    }
}

/// 3x3 max pooling with stride 2 and no padding (torch's `max_pool2d(x, 3, 2)`).
fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// 3x3 max pooling with stride 1 and padding 1 (padding never wins a max): replicating the
/// border is the same, as every padded value copies a pixel of its own window.
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let x = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    Ok(x.max_pool2d_with_stride(3, 1)?)
}

/// 3x3 average pooling with stride 1 and padding 1 that does not count the padding
/// (`count_include_pad=False`, TensorFlow's): the zero-padded window sums divided by the number
/// of real pixels in each window (`9 / count` is 1 inside, 1.5 on edges, 2.25 at corners).
fn avg_pool_3x3_exclusive(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mean9 = padded.avg_pool2d_with_stride(3, 1)?;
    let valid = |i: usize, n: usize| 3 - usize::from(i == 0) - usize::from(i + 1 == n);
    let factor: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| 9.0 / (valid(i, h) * valid(j, w)) as f32))
        .collect();
    let factor = Tensor::from_vec(factor, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    Ok(mean9.broadcast_mul(&factor)?)
}

/// How the pool branch of a block pools.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// Average without the padding (FIDInceptionA, C and E_1).
    Average,
    /// Maximum (FIDInceptionE_2).
    Max,
}

impl Pool {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Pool::Average => avg_pool_3x3_exclusive(x),
            Pool::Max => max_pool_3x3_same(x),
        }
    }
}

/// pytorch-fid's `FIDInceptionA` (torchvision's `InceptionA`, exclusive average pool).
#[derive(Debug, Clone)]
struct BlockA {
    b1x1: BasicConv,
    b5x5: [BasicConv; 2],
    b3x3dbl: [BasicConv; 3],
    pool: BasicConv,
}

impl BlockA {
    fn new(vb: VarBuilder, c_in: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            b1x1: BasicConv::square(vb.pp("branch1x1"), c_in, 64, 1, 1, 0)?,
            b5x5: [
                BasicConv::square(vb.pp("branch5x5_1"), c_in, 48, 1, 1, 0)?,
                BasicConv::square(vb.pp("branch5x5_2"), 48, 64, 5, 1, 2)?,
            ],
            b3x3dbl: [
                BasicConv::square(vb.pp("branch3x3dbl_1"), c_in, 64, 1, 1, 0)?,
                BasicConv::square(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                BasicConv::square(vb.pp("branch3x3dbl_3"), 96, 96, 3, 1, 1)?,
            ],
            pool: BasicConv::square(vb.pp("branch_pool"), c_in, pool_features, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b5x5, x)?;
        let c = chain(&self.b3x3dbl, x)?;
        let d = self.pool.forward(&Pool::Average.apply(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

/// torchvision's `InceptionB` (`Mixed_6a`): a grid reduction, unchanged in pytorch-fid.
#[derive(Debug, Clone)]
struct BlockB {
    b3x3: BasicConv,
    b3x3dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(vb: VarBuilder, c_in: usize) -> Result<Self> {
        Ok(Self {
            b3x3: BasicConv::square(vb.pp("branch3x3"), c_in, 384, 3, 2, 0)?,
            b3x3dbl: [
                BasicConv::square(vb.pp("branch3x3dbl_1"), c_in, 64, 1, 1, 0)?,
                BasicConv::square(vb.pp("branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                BasicConv::square(vb.pp("branch3x3dbl_3"), 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3.forward(x)?;
        let b = chain(&self.b3x3dbl, x)?;
        let c = max_pool_3x3_s2(x)?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

/// pytorch-fid's `FIDInceptionC` (torchvision's `InceptionC`, exclusive average pool).
#[derive(Debug, Clone)]
struct BlockC {
    b1x1: BasicConv,
    b7x7: [BasicConv; 3],
    b7x7dbl: [BasicConv; 5],
    pool: BasicConv,
}

impl BlockC {
    fn new(vb: VarBuilder, c_in: usize, c7: usize) -> Result<Self> {
        let row = |vb: VarBuilder, i, o| BasicConv::new(vb, i, o, (1, 7), 1, (0, 3));
        let col = |vb: VarBuilder, i, o| BasicConv::new(vb, i, o, (7, 1), 1, (3, 0));
        Ok(Self {
            b1x1: BasicConv::square(vb.pp("branch1x1"), c_in, 192, 1, 1, 0)?,
            b7x7: [
                BasicConv::square(vb.pp("branch7x7_1"), c_in, c7, 1, 1, 0)?,
                row(vb.pp("branch7x7_2"), c7, c7)?,
                col(vb.pp("branch7x7_3"), c7, 192)?,
            ],
            b7x7dbl: [
                BasicConv::square(vb.pp("branch7x7dbl_1"), c_in, c7, 1, 1, 0)?,
                col(vb.pp("branch7x7dbl_2"), c7, c7)?,
                row(vb.pp("branch7x7dbl_3"), c7, c7)?,
                col(vb.pp("branch7x7dbl_4"), c7, c7)?,
                row(vb.pp("branch7x7dbl_5"), c7, 192)?,
            ],
            pool: BasicConv::square(vb.pp("branch_pool"), c_in, 192, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b7x7, x)?;
        let c = chain(&self.b7x7dbl, x)?;
        let d = self.pool.forward(&Pool::Average.apply(x)?)?;
        Ok(Tensor::cat(&[a, b, c, d], 1)?)
    }
}

/// torchvision's `InceptionD` (`Mixed_7a`): a grid reduction, unchanged in pytorch-fid.
#[derive(Debug, Clone)]
struct BlockD {
    b3x3: [BasicConv; 2],
    b7x7x3: [BasicConv; 4],
}

impl BlockD {
    fn new(vb: VarBuilder, c_in: usize) -> Result<Self> {
        Ok(Self {
            b3x3: [
                BasicConv::square(vb.pp("branch3x3_1"), c_in, 192, 1, 1, 0)?,
                BasicConv::square(vb.pp("branch3x3_2"), 192, 320, 3, 2, 0)?,
            ],
            b7x7x3: [
                BasicConv::square(vb.pp("branch7x7x3_1"), c_in, 192, 1, 1, 0)?,
                BasicConv::new(vb.pp("branch7x7x3_2"), 192, 192, (1, 7), 1, (0, 3))?,
                BasicConv::new(vb.pp("branch7x7x3_3"), 192, 192, (7, 1), 1, (3, 0))?,
                BasicConv::square(vb.pp("branch7x7x3_4"), 192, 192, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = chain(&self.b3x3, x)?;
        let b = chain(&self.b7x7x3, x)?;
        let c = max_pool_3x3_s2(x)?;
        Ok(Tensor::cat(&[a, b, c], 1)?)
    }
}

/// pytorch-fid's `FIDInceptionE_1` (average pool) and `FIDInceptionE_2` (max pool).
#[derive(Debug, Clone)]
struct BlockE {
    b1x1: BasicConv,
    b3x3_1: BasicConv,
    b3x3_2: [BasicConv; 2],
    b3x3dbl_1: [BasicConv; 2],
    b3x3dbl_3: [BasicConv; 2],
    pool_conv: BasicConv,
    pool: Pool,
}

impl BlockE {
    fn new(vb: VarBuilder, c_in: usize, pool: Pool) -> Result<Self> {
        let row = |vb: VarBuilder| BasicConv::new(vb, 384, 384, (1, 3), 1, (0, 1));
        let col = |vb: VarBuilder| BasicConv::new(vb, 384, 384, (3, 1), 1, (1, 0));
        Ok(Self {
            b1x1: BasicConv::square(vb.pp("branch1x1"), c_in, 320, 1, 1, 0)?,
            b3x3_1: BasicConv::square(vb.pp("branch3x3_1"), c_in, 384, 1, 1, 0)?,
            b3x3_2: [row(vb.pp("branch3x3_2a"))?, col(vb.pp("branch3x3_2b"))?],
            b3x3dbl_1: [
                BasicConv::square(vb.pp("branch3x3dbl_1"), c_in, 448, 1, 1, 0)?,
                BasicConv::square(vb.pp("branch3x3dbl_2"), 448, 384, 3, 1, 1)?,
            ],
            b3x3dbl_3: [
                row(vb.pp("branch3x3dbl_3a"))?,
                col(vb.pp("branch3x3dbl_3b"))?,
            ],
            pool_conv: BasicConv::square(vb.pp("branch_pool"), c_in, 192, 1, 1, 0)?,
            pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = self.b3x3_1.forward(x)?;
        let b2 = self.b3x3_2[0].forward(&b)?;
        let b3 = self.b3x3_2[1].forward(&b)?;
        let c = chain(&self.b3x3dbl_1, x)?;
        let c2 = self.b3x3dbl_3[0].forward(&c)?;
        let c3 = self.b3x3dbl_3[1].forward(&c)?;
        let d = self.pool_conv.forward(&self.pool.apply(x)?)?;
        Ok(Tensor::cat(&[a, b2, b3, c2, c3, d], 1)?)
    }
}

/// Runs `x` through `convs` in order.
fn chain(convs: &[BasicConv], x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    for conv in convs {
        x = conv.forward(&x)?;
    }
    Ok(x)
}

/// pytorch-fid's FID Inception-v3 up to the final average pool (`InceptionV3([3])` without its
/// input resizing and scaling: see [`super::InceptionFid`] for those).
#[derive(Debug, Clone)]
pub struct FidInceptionV3 {
    stem: [BasicConv; 5],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
}

impl FidInceptionV3 {
    /// Builds the network from the tensors of pytorch-fid's state dict under `vb` (names as
    /// `Conv2d_1a_3x3.conv.weight`; the `fc` classifier and `num_batches_tracked` are not read).
    /// `vb`'s dtype should be `f32`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            stem: [
                BasicConv::square(vb.pp("Conv2d_1a_3x3"), 3, 32, 3, 2, 0)?,
                BasicConv::square(vb.pp("Conv2d_2a_3x3"), 32, 32, 3, 1, 0)?,
                BasicConv::square(vb.pp("Conv2d_2b_3x3"), 32, 64, 3, 1, 1)?,
                BasicConv::square(vb.pp("Conv2d_3b_1x1"), 64, 80, 1, 1, 0)?,
                BasicConv::square(vb.pp("Conv2d_4a_3x3"), 80, 192, 3, 1, 0)?,
            ],
            mixed_5: [
                BlockA::new(vb.pp("Mixed_5b"), 192, 32)?,
                BlockA::new(vb.pp("Mixed_5c"), 256, 64)?,
                BlockA::new(vb.pp("Mixed_5d"), 288, 64)?,
            ],
            mixed_6a: BlockB::new(vb.pp("Mixed_6a"), 288)?,
            mixed_6: [
                BlockC::new(vb.pp("Mixed_6b"), 768, 128)?,
                BlockC::new(vb.pp("Mixed_6c"), 768, 160)?,
                BlockC::new(vb.pp("Mixed_6d"), 768, 160)?,
                BlockC::new(vb.pp("Mixed_6e"), 768, 192)?,
            ],
            mixed_7a: BlockD::new(vb.pp("Mixed_7a"), 768)?,
            mixed_7: [
                BlockE::new(vb.pp("Mixed_7b"), 1280, Pool::Average)?,
                BlockE::new(vb.pp("Mixed_7c"), 2048, Pool::Max)?,
            ],
        })
    }

    /// The pool3 features (b, 2048) of `x` (b, 3, h, w), already resized and scaled to
    /// [-1, 1] (pytorch-fid feeds 299x299).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // x: (b, 3, 299, 299) -> (b, 64, 147, 147) -> (b, 192, 71, 71) -> ... -> (b, 2048, 8, 8)
        let x = x.to_dtype(DType::F32)?;
        let x = chain(&self.stem[..3], &x)?;
        let x = max_pool_3x3_s2(&x)?;
        let x = chain(&self.stem[3..], &x)?;
        let mut x = max_pool_3x3_s2(&x)?;
        for block in &self.mixed_5 {
            x = block.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        for block in &self.mixed_6 {
            x = block.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?;
        for block in &self.mixed_7 {
            x = block.forward(&x)?;
        }
        Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}
