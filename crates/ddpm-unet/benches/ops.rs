//! Criterion benchmarks of the hot operations of the U-Nets, through the public `ops` functions
//! and layers: 3x3 convolution (forward, forward + backward) and GroupNorm at batch 32, 64
//! channels, 32x32; linear and full attention; one forward pass of the `mnist-small` U-Net.
//!
//! `cargo bench -p ddpm-unet` takes a few minutes. Our kernels are used unless
//! `DDPM_KERNELS=candle` is set (this benchmark applies the kernel variables of
//! `ddpm_unet::policy::OVERRIDES` to the [`ddpm_unet::KernelPolicy`] it installs, as the `ddpm`
//! binary does), so comparing the two is
//! `cargo bench -p ddpm-unet -- --save-baseline ours` then
//! `DDPM_KERNELS=candle cargo bench -p ddpm-unet -- --baseline ours`.
//! Side-by-side numbers against PyTorch come from `cargo xtask bench` (docs/benchmarks.md).

use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use ddpm_unet::attention::{Attention, LinearAttention};
use ddpm_unet::ops::{self, ConvParams};
use ddpm_unet::{DiffusionModel, ModelConfig};

// As the `ddpm` binary: candle allocates a buffer per op, mimalloc makes that cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Batch, channels and size of the activations of the conv and GroupNorm benchmarks.
const CONV_SHAPE: (usize, usize, usize, usize) = (32, 64, 32, 32);
/// Activations of the attention benchmarks: batch 32, 64 channels, 16x16 pixels.
const ATTN_SHAPE: (usize, usize, usize, usize) = (32, 64, 16, 16);

fn randn_var(shape: (usize, usize, usize, usize), std: f64) -> Result<Var> {
    Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * std)?)
}

/// Sums `y` weighted by a fixed random tensor and back-propagates (so no gradient is trivial).
fn backward(y: &Tensor, r: &Tensor) -> Result<()> {
    let _grads = (y * r)?.sum_all()?.backward()?;
    Ok(())
}

fn conv2d(c: &mut Criterion) -> Result<()> {
    let (b, ch, h, w) = CONV_SHAPE;
    let x = randn_var((b, ch, h, w), 1.0)?;
    let weight = randn_var((ch, ch, 3, 3), (1.0 / (ch * 9) as f64).sqrt())?;
    let bias = Var::from_tensor(&Tensor::zeros(ch, DType::F32, &Device::Cpu)?)?;
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    let r = Tensor::randn(0f32, 1.0, (b, ch, h, w), &Device::Cpu)?;
    let conv = || ops::conv2d(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor()), p);
    let mut g = c.benchmark_group("conv2d 3x3 b32 c64 32x32");
    g.bench_function("forward", |bench| {
        bench.iter(|| conv().expect("conv2d forward"))
    });
    g.bench_function("forward+backward", |bench| {
        bench.iter(|| {
            conv()
                .and_then(|y| backward(&y, &r))
                .expect("conv2d backward")
        })
    });
    g.finish();
    Ok(())
}

fn group_norm(c: &mut Criterion) -> Result<()> {
    let (b, ch, h, w) = CONV_SHAPE;
    let x = randn_var((b, ch, h, w), 1.0)?;
    let gamma = Var::from_tensor(&Tensor::ones(ch, DType::F32, &Device::Cpu)?)?;
    let beta = Var::from_tensor(&Tensor::zeros(ch, DType::F32, &Device::Cpu)?)?;
    let r = Tensor::randn(0f32, 1.0, (b, ch, h, w), &Device::Cpu)?;
    let norm = || ops::group_norm(x.as_tensor(), 8, gamma.as_tensor(), beta.as_tensor(), 1e-5);
    let mut g = c.benchmark_group("group_norm(8) b32 c64 32x32");
    g.bench_function("forward", |bench| {
        bench.iter(|| norm().expect("group_norm forward"))
    });
    g.bench_function("forward+backward", |bench| {
        bench.iter(|| {
            norm()
                .and_then(|y| backward(&y, &r))
                .expect("group_norm backward")
        })
    });
    g.finish();
    Ok(())
}

fn attention(c: &mut Criterion) -> Result<()> {
    let (b, ch, h, w) = ATTN_SHAPE;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let linear = LinearAttention::new(ch, 4, 32, vb.pp("linear"))?;
    let full = Attention::new(ch, 4, 32, vb.pp("full"))?;
    let x = randn_var((b, ch, h, w), 1.0)?;
    let r = Tensor::randn(0f32, 1.0, (b, ch, h, w), &dev)?;

    let mut g = c.benchmark_group("linear attention 4x32 b32 c64 16x16");
    g.bench_function("forward", |bench| {
        bench.iter(|| linear.forward(x.as_tensor()).expect("linear attention"))
    });
    g.bench_function("forward+backward", |bench| {
        bench.iter(|| {
            linear
                .forward(x.as_tensor())
                .and_then(|y| backward(&y, &r))
                .expect("backward")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("attention 4x32 b32 c64 16x16");
    g.bench_function("forward", |bench| {
        bench.iter(|| full.forward(x.as_tensor()).expect("attention"))
    });
    g.bench_function("forward+backward", |bench| {
        bench.iter(|| {
            full.forward(x.as_tensor())
                .and_then(|y| backward(&y, &r))
                .expect("backward")
        })
    });
    g.finish();
    Ok(())
}

fn unet(c: &mut Criterion) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let config = ModelConfig::preset("mnist-small")?;
    let dev = Device::Cpu;
    let model = DiffusionModel::new(&config, 0, &dev, DType::F32)?;
    let (ch, s) = (config.channels(), config.image_size());
    let x = Tensor::randn(0f32, 1.0, (32, ch, s, s), &dev)?;
    let t = Tensor::from_vec((0..32u32).map(|i| i * 31).collect::<Vec<_>>(), 32, &dev)?;
    let mut g = c.benchmark_group("unet mnist-small b32");
    g.bench_function("forward", |bench| {
        bench.iter(|| model.forward(&x, &t).expect("forward").detach())
    });
    g.finish();
    Ok(())
}

fn all(c: &mut Criterion) {
    conv2d(c).expect("conv2d benchmark setup");
    group_norm(c).expect("group_norm benchmark setup");
    attention(c).expect("attention benchmark setup");
    unet(c).expect("U-Net benchmark setup");
}

/// Short measurements so that the whole suite runs in a few minutes on 2 cores.
fn config() -> Criterion {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let policy = ddpm_unet::KernelPolicy::default()
        .with_overrides(var)
        .unwrap_or_else(|e| panic!("{e}"));
    policy.install();
    eprintln!("kernel policy: {policy}");
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = all
}
criterion_main!(benches);
