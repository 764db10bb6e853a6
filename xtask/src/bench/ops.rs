//! `bench-worker ops`: single hot ops of the U-Nets (convolution variants, GroupNorm, GEMMs,
//! attention, per-op overhead) timed on one device, one line per op.

use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::time::Instant;

use super::Stats;

#[derive(Args, Debug)]
pub(super) struct OpsArgs {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    precision: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    channels: usize,
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

/// Median seconds of `iters` runs of `f` after two warm-up runs, each ended by a device sync.
fn time_op(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        dev.synchronize()?;
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(Stats::of(&times).map_or(f64::NAN, |s| s.median))
}

/// `bench-worker ops`: where a device spends its time on the U-Nets' hot ops.
pub(super) fn worker_ops(a: &OpsArgs) -> anyhow::Result<()> {
    use ddpm_unet::ops::{self, ConvParams};
    let dev = ddpm_train::parse_device(&a.device)?;
    let dtype = ddpm_train::Precision::parse(&a.precision)?.compute_dtype();
    let (b, c, s) = (a.batch, a.channels, a.size);
    let x = candle_core::Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (b, c, s, s), &dev)?.to_dtype(dtype)?,
    )?;
    let w = candle_core::Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (c, c, 3, 3), &dev)? * 0.05)?.to_dtype(dtype)?,
    )?;
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    let flops = 2.0 * (b * c * c * 9 * s * s) as f64;
    let line = |name: &str, secs: f64, work: f64| {
        println!(
            "ops {}: {name}: {:.3} ms{}",
            a.device,
            secs * 1e3,
            if work > 0.0 {
                format!(", {:.0} GFLOP/s", work / secs / 1e9)
            } else {
                String::new()
            }
        );
    };
    // ops::conv2d: our CPU kernel, or on CUDA our im2col kernel and a cuBLAS GEMM (the same
    // as the tensor-op im2col below with DDPM_CUDA_KERNELS=off).
    let t = time_op(&dev, a.iters, || {
        ops::conv2d(x.as_tensor(), w.as_tensor(), None, p).map(|_| ())
    })?;
    line("conv3x3 forward, ops::conv2d (our kernels)", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = ops::conv2d(x.as_tensor(), w.as_tensor(), None, p)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line(
        "conv3x3 forward+backward, ops::conv2d (our kernels)",
        t,
        3.0 * flops,
    );
    let t = time_op(&dev, a.iters, || {
        ops::conv2d_unfold(x.as_tensor(), w.as_tensor(), p).map(|_| ())
    })?;
    line("conv3x3 forward, im2col from tensor ops", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = ops::conv2d_unfold(x.as_tensor(), w.as_tensor(), p)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line(
        "conv3x3 forward+backward, im2col from tensor ops",
        t,
        3.0 * flops,
    );
    let t = time_op(&dev, a.iters, || {
        x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).map(|_| ())
    })?;
    line("conv3x3 forward, candle conv2d", t, flops);
    let t = time_op(&dev, a.iters, || {
        let y = x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("conv3x3 forward+backward, candle conv2d", t, 3.0 * flops);
    let lhs = Tensor::randn(0f32, 1.0, (b * s * s, 9 * c), &dev)?.to_dtype(dtype)?;
    let rhs = Tensor::randn(0f32, 1.0, (9 * c, c), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || lhs.matmul(&rhs).map(|_| ()))?;
    line("GEMM of the conv's size", t, flops);
    let big = Tensor::randn(0f32, 1.0, (2048, 2048), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || big.matmul(&big).map(|_| ()))?;
    line(
        "GEMM 2048x2048x2048 (the machine's matmul)",
        t,
        2.0 * 2048f64.powi(3),
    );
    let gw = Tensor::ones(c, DType::F32, &dev)?;
    let gb = Tensor::zeros(c, DType::F32, &dev)?;
    let t = time_op(&dev, a.iters, || {
        let y = ops::group_norm(x.as_tensor(), 32.min(c), &gw, &gb, 1e-5)?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("GroupNorm forward+backward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        ops::group_norm(x.as_tensor(), 32.min(c), &gw, &gb, 1e-5).map(|_| ())
    })?;
    line("GroupNorm forward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        let y = ops::upsample_nearest_2x(x.as_tensor())?;
        y.sum_all()?.backward().map(|_| ())
    })?;
    line("nearest 2x upsampling forward+backward", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        ops::cat_channels(x.as_tensor(), x.as_tensor()).map(|_| ())
    })?;
    line("skip concatenation (channels)", t, 0.0);
    let t = time_op(&dev, a.iters, || {
        x.as_tensor().sum_all()?.backward().map(|_| ())
    })?;
    line(
        "sum_all + backward (the loss the timings above add)",
        t,
        0.0,
    );
    #[cfg(feature = "cuda")]
    if ddpm_unet::kernels::cuda_supported(x.as_tensor()) {
        use ddpm_unet::kernels::conv::cuda::{im2col, Unfold};
        let g = Unfold {
            b,
            c,
            h: s,
            w: s,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
            oh: s,
            ow: s,
        };
        let t = time_op(&dev, a.iters, || im2col(x.as_tensor(), g).map(|_| ()))?;
        line("our im2col kernel alone", t, 0.0);
        let cols = im2col(x.as_tensor(), g)?;
        let w2 = w.as_tensor().reshape((c, 9 * c))?;
        let t = time_op(&dev, a.iters, || w2.broadcast_matmul(&cols).map(|_| ()))?;
        line(
            "the conv's batched GEMM alone (weight broadcast over images)",
            t,
            flops,
        );
    }
    // The element-wise and small ops a U-Net forward is made of besides convolutions.
    let xt = x.as_tensor();
    let bias = Tensor::ones((1, c, 1, 1), dtype, &dev)?;
    let t = time_op(&dev, a.iters, || xt.broadcast_add(&bias).map(|_| ()))?;
    line("bias add, (1, c, 1, 1) broadcast", t, 0.0);
    let image_bias = Tensor::ones((b, c, 1, 1), dtype, &dev)?;
    let t = time_op(&dev, a.iters, || xt.broadcast_add(&image_bias).map(|_| ()))?;
    line("per-image bias add, (b, c, 1, 1) broadcast", t, 0.0);
    let t = time_op(&dev, a.iters, || (xt + xt).map(|_| ()))?;
    line("residual add, same shapes", t, 0.0);
    let t = time_op(&dev, a.iters, || xt.to_dtype(DType::F32).map(|_| ()))?;
    line("cast to f32", t, 0.0);
    let t = time_op(&dev, a.iters, || ops::silu(xt).map(|_| ()))?;
    line("SiLU", t, 0.0);
    let qkv = Tensor::randn(0f32, 1.0, (b, 3 * 2 * c, s / 2, s / 2), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || {
        ops::attention(&qkv, 1, 2 * c, 0.05).map(|_| ())
    })?;
    line("attention forward, 2c channels at half the size", t, 0.0);
    let scores = Tensor::randn(0f32, 1.0, (b, 1, s * s / 4, s * s / 4), &dev)?.to_dtype(dtype)?;
    let t = time_op(&dev, a.iters, || ops::softmax(&scores, 3).map(|_| ()))?;
    line("softmax over the attention scores alone", t, 0.0);
    let t = time_op(&dev, a.iters, || xt.sum_keepdim(0).map(|_| ()))?;
    line(
        "sum over the batch dimension (a broadcast's backward)",
        t,
        0.0,
    );
    let small = Tensor::ones(1024, DType::F32, &dev)?;
    let t = time_op(&dev, a.iters, || {
        let mut acc = small.clone();
        for _ in 0..1000 {
            acc = (acc + &small)?;
        }
        Ok(())
    })?;
    line("1000 dependent tiny adds (per-op overhead x 1000)", t, 0.0);
    let strided = Tensor::ones((32, 32), DType::F32, &dev)?.t()?;
    let t = time_op(&dev, a.iters, || {
        for _ in 0..1000 {
            let _ = strided.contiguous()?;
        }
        Ok(())
    })?;
    line("1000 tiny strided copies (layout upload x 1000)", t, 0.0);
    Ok(())
}
