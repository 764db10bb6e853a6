//! Tests of both U-Nets through the public API: shapes, parameter counts against independent
//! formulas, seeded init, training progress, finite-difference gradients, safetensors
//! persistence and error reporting.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ddpm_unet::{DdpmUnetConfig, DiffusionModel, ModelConfig, UnetConfig, UnetError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn tiny_unet() -> UnetConfig {
    UnetConfig {
        image_size: 8,
        channels: 2,
        dim: 8,
        dim_mults: vec![1, 2],
        resnet_block_groups: 2,
        init_conv_kernel: 3,
        attn_heads: 2,
        attn_dim_head: 4,
        ..UnetConfig::default()
    }
}

fn tiny_ddpm() -> DdpmUnetConfig {
    DdpmUnetConfig {
        image_size: 8,
        in_channels: 2,
        out_channels: None,
        ch: 8,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions: vec![4],
        dropout: 0.0,
        groups: 2,
        num_classes: None,
        ..DdpmUnetConfig::cifar10()
    }
}

fn randn(shape: &[usize], seed: u64, dtype: DType) -> R<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rand_distr::Distribution::<f64>::sample(&rand_distr::StandardNormal, &mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

// ---------------------------------------------------------------------------------------------
// Independent parameter counts, written from the architectures' descriptions.

fn conv(cin: usize, cout: usize, k: usize, bias: bool) -> usize {
    cin * cout * k * k + if bias { cout } else { 0 }
}
fn lin(i: usize, o: usize) -> usize {
    i * o + o
}
fn gn(c: usize) -> usize {
    2 * c
}

fn count_unet(c: &UnetConfig) -> usize {
    let init = c.init_dim.unwrap_or(c.dim);
    let td = 4 * c.dim;
    let hidden = c.attn_heads * c.attn_dim_head;
    let resnet = |i: usize, o: usize| {
        lin(td, 2 * o)
            + conv(i, o, 3, true)
            + gn(o)
            + conv(o, o, 3, true)
            + gn(o)
            + if i != o { conv(i, o, 1, true) } else { 0 }
    };
    let lin_attn =
        |d: usize| gn(d) + conv(d, 3 * hidden, 1, false) + conv(hidden, d, 1, true) + gn(d);
    let full_attn = |d: usize| gn(d) + conv(d, 3 * hidden, 1, false) + conv(hidden, d, 1, true);
    let inc = c.channels * if c.self_condition { 2 } else { 1 };
    let mut n = conv(inc, init, c.init_conv_kernel, true) + lin(c.dim, td) + lin(td, td);
    let mut dims = vec![init];
    dims.extend(c.dim_mults.iter().map(|m| m * c.dim));
    let levels = dims.len() - 1;
    for (i, w) in dims.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        n += 2 * resnet(a, a) + lin_attn(a);
        n += if i + 1 < levels {
            conv(4 * a, b, 1, true)
        } else {
            conv(a, b, 3, true)
        };
    }
    let mid = dims[levels];
    n += 2 * resnet(mid, mid) + full_attn(mid);
    for (i, w) in dims.windows(2).rev().enumerate() {
        let (a, b) = (w[0], w[1]);
        n += 2 * resnet(a + b, b) + lin_attn(b) + conv(b, a, 3, true);
        let _ = i;
    }
    n + resnet(2 * init, init) + conv(init, c.out_dim.unwrap_or(c.channels), 1, true)
}

fn count_ddpm(c: &DdpmUnetConfig) -> usize {
    let ch = c.ch;
    let td = 4 * ch;
    let res = |i: usize, o: usize| {
        gn(i)
            + conv(i, o, 3, true)
            + lin(td, o)
            + gn(o)
            + conv(o, o, 3, true)
            + if i != o { conv(i, o, 1, true) } else { 0 }
    };
    let attn = |d: usize| gn(d) + 4 * conv(d, d, 1, true);
    let levels = c.ch_mult.len();
    let mut n = lin(ch, td) + lin(td, td) + conv(c.in_channels, ch, 3, true);
    let mut chans = vec![ch];
    let mut cur = ch;
    for i in 0..levels {
        let size = c.image_size >> i;
        let out = ch * c.ch_mult[i];
        for _ in 0..c.num_res_blocks {
            n += res(cur, out);
            cur = out;
            if c.attn_resolutions.contains(&size) {
                n += attn(cur);
            }
            chans.push(cur);
        }
        if i + 1 < levels {
            n += conv(cur, cur, 3, true);
            chans.push(cur);
        }
    }
    n += 2 * res(cur, cur) + attn(cur);
    for i in (0..levels).rev() {
        let size = c.image_size >> i;
        let out = ch * c.ch_mult[i];
        for _ in 0..=c.num_res_blocks {
            let skip = chans.pop().unwrap_or(0);
            n += res(cur + skip, out);
            cur = out;
            if c.attn_resolutions.contains(&size) {
                n += attn(cur);
            }
        }
        if i > 0 {
            n += conv(cur, cur, 3, true);
        }
    }
    n + gn(cur) + conv(cur, c.in_channels, 3, true)
}

#[test]
fn paper_cifar10_model_has_35_7m_parameters() -> R<()> {
    let cfg = ModelConfig::preset("cifar10")?;
    let model = DiffusionModel::new(&cfg, 0, &Device::Cpu, DType::F32)?;
    let n = model.num_parameters();
    let rel = (n as f64 - 35.7e6).abs() / 35.7e6;
    assert!(
        rel < 0.01,
        "cifar10 preset has {n} parameters, {rel:.4} away from 35.7M"
    );
    let ModelConfig::DdpmUnet(c) = &cfg else {
        panic!("cifar10 preset is a DdpmUnet")
    };
    assert_eq!(n, count_ddpm(c));
    Ok(())
}

/// The LearnOpenCV tutorial's U-Net (`BASE_CH = 64`, `BASE_CH_MULT = (1, 2, 4, 4)`,
/// `APPLY_ATTENTION = (False, True, True, False)`, two ResNet blocks per level) counted layer by
/// layer from the tutorial's module list for `c` image channels, not from the config: a ResNet
/// block is GroupNorm, 3x3 conv, a Linear from the 256-wide time embedding, GroupNorm, 3x3 conv
/// and a 1x1 shortcut conv when the width changes; an attention block is GroupNorm and
/// `nn.MultiheadAttention` (in-projection `3d x d` + `3d`, out-projection `d x d` + `d`).
fn count_learnopencv(c: usize) -> usize {
    let temb = 256;
    let res = |i: usize, o: usize| {
        gn(i)
            + conv(i, o, 3, true)
            + lin(temb, o)
            + gn(o)
            + conv(o, o, 3, true)
            + if i != o { conv(i, o, 1, true) } else { 0 }
    };
    let mhsa = |d: usize| gn(d) + (3 * d * d + 3 * d) + (d * d + d);
    // Time embedding (Linear 64 -> 256, SiLU, Linear 256 -> 256) and the first 3x3 conv.
    let stem = lin(64, temb) + lin(temb, temb) + conv(c, 64, 3, true);
    // Encoder; the skip widths it pushes are 64 (stem), 64, 64, 64 (down) | 128, 128, 128 (down)
    // | 256, 256, 256 (down) | 256, 256.
    let down_32 = res(64, 64) + res(64, 64) + conv(64, 64, 3, true);
    let down_16 = res(64, 128) + mhsa(128) + res(128, 128) + mhsa(128) + conv(128, 128, 3, true);
    let down_8 = res(128, 256) + mhsa(256) + res(256, 256) + mhsa(256) + conv(256, 256, 3, true);
    let down_4 = res(256, 256) + res(256, 256);
    // Bottleneck: a block with attention, a block without.
    let mid = res(256, 256) + mhsa(256) + res(256, 256);
    // Decoder: three blocks per level, each taking the concatenated skip, then an upsampling
    // conv (none after the last level); the final GroupNorm and 3x3 conv.
    let up_4 = 3 * res(256 + 256, 256) + conv(256, 256, 3, true);
    let up_8 = 2 * (res(256 + 256, 256) + mhsa(256))
        + res(256 + 128, 256)
        + mhsa(256)
        + conv(256, 256, 3, true);
    let up_16 = res(256 + 128, 128)
        + mhsa(128)
        + res(128 + 128, 128)
        + mhsa(128)
        + res(128 + 64, 128)
        + mhsa(128)
        + conv(128, 128, 3, true);
    let up_32 = res(128 + 64, 64) + 2 * res(64 + 64, 64);
    let out = gn(64) + conv(64, c, 3, true);
    stem + down_32 + down_16 + down_8 + down_4 + mid + up_4 + up_8 + up_16 + up_32 + out
}

#[test]
fn learnopencv_preset_has_the_tutorials_parameter_count() -> R<()> {
    let cfg = ModelConfig::preset("learnopencv")?;
    let ModelConfig::DdpmUnet(c) = &cfg else {
        panic!("the learnopencv preset is a DdpmUnet")
    };
    assert_eq!(
        (c.image_size, c.ch, &c.ch_mult[..], &c.attn_resolutions[..]),
        (32, 64, &[1, 2, 4, 4][..], &[16, 8][..])
    );
    assert_eq!((c.num_res_blocks, c.dropout, c.groups), (2, 0.1, 8));
    // Their total for RGB images: 25.6M parameters.
    assert_eq!(count_learnopencv(3), 25_636_483);
    // RGB (Flowers, CIFAR-10) and grey (MNIST): the channels follow the data set.
    for channels in [3, 1] {
        let mut grey_or_rgb = cfg.clone();
        grey_or_rgb.set_channels(channels);
        let model = DiffusionModel::new(&grey_or_rgb, 0, &Device::Cpu, DType::F32)?;
        let n = model.num_parameters();
        assert_eq!(n, count_learnopencv(channels), "{channels} channels");
        let d = DdpmUnetConfig {
            in_channels: channels,
            ..c.clone()
        };
        assert_eq!(n, count_ddpm(&d), "{channels} channels");
    }
    Ok(())
}

#[test]
fn parameter_counts_match_independent_formulas() -> R<()> {
    let mut self_cond = tiny_unet();
    self_cond.self_condition = true;
    self_cond.init_dim = Some(6);
    let unets = [
        tiny_unet(),
        self_cond,
        UnetConfig::mnist_small(),
        UnetConfig::annotated_fashion(),
        UnetConfig::default(),
    ];
    for c in unets {
        let m = DiffusionModel::new(&ModelConfig::Unet(c.clone()), 0, &Device::Cpu, DType::F32)?;
        assert_eq!(m.num_parameters(), count_unet(&c), "{c:?}");
    }
    for c in [tiny_ddpm(), DdpmUnetConfig::cifar_small()] {
        let m = DiffusionModel::new(
            &ModelConfig::DdpmUnet(c.clone()),
            0,
            &Device::Cpu,
            DType::F32,
        )?;
        assert_eq!(m.num_parameters(), count_ddpm(&c), "{c:?}");
    }
    Ok(())
}

#[test]
fn output_shapes_for_several_configs_and_batches() -> R<()> {
    let dev = Device::Cpu;
    let mut self_cond = tiny_unet();
    self_cond.self_condition = true;
    let mut ddpm28 = tiny_ddpm();
    ddpm28.image_size = 28;
    ddpm28.attn_resolutions = vec![14];
    let mut out3 = tiny_ddpm();
    out3.out_channels = Some(4);
    let configs = [
        ModelConfig::preset("mnist-small")?,
        ModelConfig::Unet(tiny_unet()),
        ModelConfig::Unet(self_cond),
        ModelConfig::DdpmUnet(tiny_ddpm()),
        ModelConfig::DdpmUnet(ddpm28),
        ModelConfig::DdpmUnet(out3),
    ];
    for cfg in configs {
        let model = DiffusionModel::new(&cfg, 1, &dev, DType::F32)?;
        for b in [1usize, 3] {
            let (c, s) = (cfg.channels(), cfg.image_size());
            let x = randn(&[b, c, s, s], 2, DType::F32)?;
            let t = Tensor::from_vec((0..b as u32).map(|i| i * 100).collect(), b, &dev)?;
            let y = model.forward(&x, &t)?;
            assert_eq!(y.dims(), &[b, cfg.out_channels(), s, s], "{cfg:?}");
            let v = y.flatten_all()?.to_vec1::<f32>()?;
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }
    Ok(())
}

#[test]
fn self_conditioning_input_changes_the_output() -> R<()> {
    let mut c = tiny_unet();
    c.self_condition = true;
    let model = DiffusionModel::new(&ModelConfig::Unet(c), 3, &Device::Cpu, DType::F32)?;
    let x = randn(&[2, 2, 8, 8], 4, DType::F32)?;
    let t = Tensor::new(&[5u32, 7], &Device::Cpu)?;
    let zeros = model.forward_t(&x, &t, Some(&x.zeros_like()?), None)?;
    let none = model.forward(&x, &t)?;
    let cond = model.forward_t(&x, &t, Some(&x), None)?;
    let diff =
        |a: &Tensor, b: &Tensor| -> R<f32> { Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?) };
    assert_eq!(diff(&zeros, &none)?, 0.0);
    assert!(diff(&cond, &none)? > 1e-4);
    Ok(())
}

#[test]
fn init_is_deterministic_from_the_seed() -> R<()> {
    for cfg in [
        ModelConfig::Unet(tiny_unet()),
        ModelConfig::DdpmUnet(tiny_ddpm()),
    ] {
        let a = DiffusionModel::new(&cfg, 42, &Device::Cpu, DType::F32)?.tensors();
        let b = DiffusionModel::new(&cfg, 42, &Device::Cpu, DType::F32)?.tensors();
        let c = DiffusionModel::new(&cfg, 43, &Device::Cpu, DType::F32)?.tensors();
        assert_eq!(a.len(), b.len());
        let mut differs = false;
        for (name, ta) in &a {
            let va = ta.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(va, b[name].flatten_all()?.to_vec1::<f32>()?, "{name}");
            differs |= va != c[name].flatten_all()?.to_vec1::<f32>()?;
        }
        assert!(differs, "another seed must give other weights");
        // PyTorch defaults: GroupNorm weight 1 and bias 0, conv weights within 1/sqrt(fan_in).
        for (name, t) in &a {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if name.contains("norm") && name.ends_with(".weight") && t.rank() == 1 {
                assert!(v.iter().all(|&x| x == 1.0), "{name}");
            }
            if t.rank() == 4 {
                let fan_in: usize = t.dims()[1..].iter().product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
            }
        }
    }
    Ok(())
}

/// On one fixed batch, the eps-prediction objective must fall at least 10x with AdamW.
fn overfit_one_batch(cfg: ModelConfig, steps: usize) -> R<(f32, f32)> {
    let dev = Device::Cpu;
    let model = DiffusionModel::new(&cfg, 0, &dev, DType::F32)?;
    let (c, s, b) = (cfg.channels(), cfg.image_size(), 8);
    // Smooth images in [-1, 1], noise, and the linear-schedule forward process at random t.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut x0 = Vec::with_capacity(b * c * s * s);
    for i in 0..b {
        let (fx, fy) = (rng.random::<f32>() * 3.0, rng.random::<f32>() * 3.0);
        for ch in 0..c {
            for y in 0..s {
                for x in 0..s {
                    let v = ((x as f32 * fx + ch as f32) / s as f32 * std::f32::consts::TAU).sin()
                        * ((y as f32 * fy + i as f32) / s as f32 * std::f32::consts::TAU).cos();
                    x0.push(v);
                }
            }
        }
    }
    let x0 = Tensor::from_vec(x0, (b, c, s, s), &dev)?;
    let eps = randn(&[b, c, s, s], 10, DType::F32)?;
    let ts: Vec<u32> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let abar: Vec<f32> = ts
        .iter()
        .map(|&t| {
            (0..=t as usize)
                .map(|i| 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / 999.0))
                .product::<f64>() as f32
        })
        .collect();
    let sa = Tensor::from_vec(abar.iter().map(|a| a.sqrt()).collect(), (b, 1, 1, 1), &dev)?;
    let sb = Tensor::from_vec(
        abar.iter().map(|a| (1.0 - a).sqrt()).collect(),
        (b, 1, 1, 1),
        &dev,
    )?;
    let xt = (x0.broadcast_mul(&sa)? + eps.broadcast_mul(&sb)?)?;
    let t = Tensor::from_vec(ts, b, &dev)?;
    let params = ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.var_list(), params)?;
    let loss =
        |m: &DiffusionModel| -> R<Tensor> { Ok((m.forward(&xt, &t)? - &eps)?.sqr()?.mean_all()?) };
    let first = loss(&model)?.to_scalar::<f32>()?;
    for _ in 0..steps {
        opt.backward_step(&loss(&model)?)?;
    }
    let last = loss(&model)?.to_scalar::<f32>()?;
    Ok((first, last))
}

#[test]
fn unet_training_objective_falls_tenfold_on_a_fixed_batch() -> R<()> {
    let (first, last) = overfit_one_batch(ModelConfig::Unet(tiny_unet()), 300)?;
    assert!(last * 10.0 < first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn ddpm_unet_training_objective_falls_tenfold_on_a_fixed_batch() -> R<()> {
    let (first, last) = overfit_one_batch(ModelConfig::DdpmUnet(tiny_ddpm()), 300)?;
    assert!(last * 10.0 < first, "loss {first} -> {last}");
    Ok(())
}

/// Central finite differences in f64 against autograd for a few entries of several tensors.
fn check_gradients(cfg: ModelConfig) -> R<()> {
    let dev = Device::Cpu;
    let model = DiffusionModel::new(&cfg, 5, &dev, DType::F64)?;
    let (c, s) = (cfg.channels(), cfg.image_size());
    let x = randn(&[2, c, s, s], 6, DType::F64)?;
    let r = randn(&[2, cfg.out_channels(), s, s], 7, DType::F64)?;
    let t = Tensor::new(&[3u32, 600], &dev)?;
    let objective = |m: &DiffusionModel| -> R<Tensor> { Ok((m.forward(&x, &t)? * &r)?.sum_all()?) };
    let grads = objective(&model)?.backward()?;
    let vars = model.vars();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut checked = 0;
    for (i, (name, var)) in vars.iter().enumerate() {
        if i % 5 != 0 {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient for {name}"))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let k = rng.random_range(0..base.len());
        let h = 1e-5;
        let eval = |delta: f64| -> R<f64> {
            let mut v = base.clone();
            v[k] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &dev)?)?;
            Ok(objective(&model)?.to_scalar::<f64>()?)
        };
        let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev)?)?;
        let err = (numeric - g[k]).abs();
        // Truncation error O(h^2) and rounding O(eps_f64 / h) are both far below 1e-6.
        assert!(
            err <= 1e-6 * (1.0 + numeric.abs()),
            "{name}[{k}]: autograd {} vs finite difference {numeric}",
            g[k]
        );
        checked += 1;
    }
    assert!(checked >= 10, "checked only {checked} tensors");
    Ok(())
}

#[test]
fn unet_gradients_match_finite_differences_in_f64() -> R<()> {
    let mut c = tiny_unet();
    c.self_condition = true;
    check_gradients(ModelConfig::Unet(c))
}

#[test]
fn ddpm_unet_gradients_match_finite_differences_in_f64() -> R<()> {
    check_gradients(ModelConfig::DdpmUnet(tiny_ddpm()))
}

#[test]
fn frozen_copy_predicts_the_same_and_ignores_later_updates() -> R<()> {
    for cfg in [
        ModelConfig::Unet(tiny_unet()),
        ModelConfig::DdpmUnet(tiny_ddpm()),
    ] {
        let model = DiffusionModel::new(&cfg, 4, &Device::Cpu, DType::F32)?;
        let frozen = model.frozen()?;
        let x = randn(&[2, 2, 8, 8], 5, DType::F32)?;
        let t = Tensor::new(&[3u32, 700], &Device::Cpu)?;
        let a = model.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, frozen.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?);
        // The frozen copy is a snapshot: changing the model's weights leaves it as it was.
        for var in model.var_list() {
            var.set(&var.as_tensor().affine(0.5, 0.1)?)?;
        }
        assert_ne!(a, model.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(a, frozen.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(frozen.num_parameters(), 0, "no trainable variables");
    }
    Ok(())
}

#[test]
fn dropout_is_reproducible_from_the_training_rng() -> R<()> {
    let mut c = tiny_ddpm();
    c.dropout = 0.3;
    let model = DiffusionModel::new(&ModelConfig::DdpmUnet(c), 0, &Device::Cpu, DType::F32)?;
    let x = randn(&[2, 2, 8, 8], 1, DType::F32)?;
    let t = Tensor::new(&[1u32, 2], &Device::Cpu)?;
    let run = |seed: u64| -> R<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(model
            .forward_t(&x, &t, None, Some(&mut rng))?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let eval = model.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(run(1)?, run(1)?);
    assert_ne!(run(1)?, run(2)?);
    assert_ne!(run(1)?, eval);
    assert_eq!(
        eval,
        model.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn weights_round_trip_through_safetensors() -> R<()> {
    let dir = tempfile::tempdir()?;
    for (i, cfg) in [
        ModelConfig::Unet(tiny_unet()),
        ModelConfig::DdpmUnet(tiny_ddpm()),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("m{i}.safetensors"));
        let a = DiffusionModel::new(&cfg, 11, &Device::Cpu, DType::F32)?;
        a.save(&path)?;
        let b = DiffusionModel::load(&path, &Device::Cpu, DType::F32)?;
        assert_eq!(b.config(), &cfg);
        let x = randn(&[2, 2, 8, 8], 3, DType::F32)?;
        let t = Tensor::new(&[10u32, 900], &Device::Cpu)?;
        let ya = a.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?;
        let yb = b.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(ya, yb);
        // load_weights into a differently seeded model of the same config gives the same output.
        let c = DiffusionModel::new(&cfg, 12, &Device::Cpu, DType::F32)?;
        c.load_weights(&path)?;
        assert_eq!(ya, c.forward(&x, &t)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(())
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, UnetError>) -> UnetError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

#[test]
fn loading_weights_of_another_config_names_the_tensor_and_both_shapes() -> R<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("small.safetensors");
    DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 0, &Device::Cpu, DType::F32)?
        .save(&path)?;
    let mut wider = tiny_unet();
    wider.dim = 16;
    let other = DiffusionModel::new(&ModelConfig::Unet(wider), 0, &Device::Cpu, DType::F32)?;
    let before = other.tensors();
    let err = expect_err(other.load_weights(&path));
    let msg = err.to_string();
    assert!(matches!(err, UnetError::ShapeMismatch { .. }), "{msg}");
    // The first mismatching tensor in name order, with its shape in the model and in the file.
    assert!(msg.contains("`downs.0.0.block1.norm.bias`"), "{msg}");
    assert!(msg.contains("[8]") && msg.contains("[16]"), "{msg}");
    // Nothing was changed by the failed load.
    for (name, t) in other.tensors() {
        let same = (t - &before[&name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0, "{name} changed");
    }
    // A DdpmUnet file into a Unet: a missing tensor is named.
    let ddpm_path = dir.path().join("ddpm.safetensors");
    DiffusionModel::new(
        &ModelConfig::DdpmUnet(tiny_ddpm()),
        0,
        &Device::Cpu,
        DType::F32,
    )?
    .save(&ddpm_path)?;
    let unet = DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 0, &Device::Cpu, DType::F32)?;
    let err = expect_err(unet.load_weights(&ddpm_path));
    assert!(matches!(err, UnetError::MissingTensor { .. }), "{err}");
    Ok(())
}

/// A parameter whose header says integers (the same byte length, so the file parses) is refused
/// by name instead of its bits being read as numbers.
#[test]
fn integer_tensors_in_a_weights_file_are_refused_by_name() -> R<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("w.safetensors");
    let model = DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 0, &Device::Cpu, DType::F32)?;
    model.save(&path)?;
    let mut bytes = std::fs::read(&path)?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec())?;
    // Relabel the first tensor in the header as I32: 4 bytes per value, like F32.
    let relabelled = header.replacen("\"F32\"", "\"I32\"", 1);
    assert_ne!(relabelled, header, "no F32 tensor in the header");
    bytes[8..8 + header_len].copy_from_slice(relabelled.as_bytes());
    std::fs::write(&path, &bytes)?;
    let before = model.tensors();
    let err = expect_err(model.load_weights(&path));
    assert!(
        matches!(
            err,
            UnetError::NotFloat {
                found: DType::I32,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("I32") && msg.contains('`'), "{msg}");
    for (name, t) in model.tensors() {
        let same = (t - &before[&name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0, "{name} changed");
    }
    Ok(())
}

#[test]
fn truncated_or_garbage_weight_files_are_clear_errors() -> R<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("w.safetensors");
    DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 0, &Device::Cpu, DType::F32)?
        .save(&path)?;
    let bytes = std::fs::read(&path)?;
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors")?;
    for p in [
        truncated.as_path(),
        garbage.as_path(),
        Path::new("/nonexistent/w.safetensors"),
    ] {
        let err = expect_err(DiffusionModel::load(p, &Device::Cpu, DType::F32));
        assert!(matches!(err, UnetError::Weights { .. }), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
    }
    Ok(())
}

#[test]
fn configs_that_cannot_work_are_rejected_at_construction() -> R<()> {
    let build = |cfg: ModelConfig| DiffusionModel::new(&cfg, 0, &Device::Cpu, DType::F32);
    let field_of = |e: UnetError| match e {
        UnetError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other}"),
    };
    // 28 cannot be halved three times by four levels.
    let mut c = UnetConfig::mnist_small();
    c.dim_mults = vec![1, 2, 4, 8];
    let e = expect_err(build(ModelConfig::Unet(c)));
    assert!(e.to_string().contains("divisible by 8"), "{e}");
    assert_eq!(field_of(e), "image_size");
    let mut c = DdpmUnetConfig::cifar10();
    c.image_size = 28;
    assert_eq!(
        field_of(expect_err(build(ModelConfig::DdpmUnet(c)))),
        "image_size"
    );
    let mut c = tiny_unet();
    c.resnet_block_groups = 3;
    assert_eq!(
        field_of(expect_err(build(ModelConfig::Unet(c)))),
        "resnet_block_groups"
    );
    let mut c = tiny_ddpm();
    c.attn_resolutions = vec![5];
    assert_eq!(
        field_of(expect_err(build(ModelConfig::DdpmUnet(c)))),
        "attn_resolutions"
    );
    let mut c = tiny_ddpm();
    c.dropout = 1.0;
    assert_eq!(
        field_of(expect_err(build(ModelConfig::DdpmUnet(c)))),
        "dropout"
    );
    assert!(matches!(
        expect_err(ModelConfig::preset("imagenet")),
        UnetError::UnknownPreset { .. }
    ));
    Ok(())
}

#[test]
fn inputs_of_the_wrong_shape_are_errors_not_panics() -> R<()> {
    let model = DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 0, &Device::Cpu, DType::F32)?;
    let t = Tensor::new(&[1u32, 2], &Device::Cpu)?;
    for shape in [[2usize, 3, 8, 8], [2, 2, 16, 16], [2, 2, 8, 7]] {
        let x = Tensor::zeros(&shape, DType::F32, &Device::Cpu)?;
        assert!(matches!(
            expect_err(model.forward(&x, &t)),
            UnetError::BadInput { .. }
        ));
    }
    let x = Tensor::zeros((3, 2, 8, 8), DType::F32, &Device::Cpu)?;
    assert!(matches!(
        expect_err(model.forward(&x, &t)),
        UnetError::BadInput { .. }
    ));
    Ok(())
}

#[test]
fn configs_read_from_toml() -> R<()> {
    let text = r#"
        arch = "ddpm_unet"
        image_size = 32
        in_channels = 3
        ch = 64
        ch_mult = [1, 2, 2]
        num_res_blocks = 2
        attn_resolutions = [16]
        dropout = 0.1
        groups = 32
    "#;
    let cfg: ModelConfig = toml::from_str(text)?;
    let ModelConfig::DdpmUnet(c) = &cfg else {
        panic!("expected a DdpmUnet config")
    };
    assert_eq!(c.ch_mult, vec![1, 2, 2]);
    cfg.validate()?;
    for name in ddpm_unet::PRESETS {
        let preset = ModelConfig::preset(name)?;
        let back: ModelConfig = toml::from_str(&toml::to_string(&preset)?)?;
        assert_eq!(back, preset);
    }
    let bad = "arch = \"unet\"\nimage_size = 32\n";
    assert!(toml::from_str::<ModelConfig>(bad).is_err());
    Ok(())
}

/// docs/tensor-names.md lists every tensor of every preset; regenerate it with
/// `UPDATE_DOCS=1 cargo test -p ddpm-unet --test unet tensor_names`.
#[test]
fn tensor_names_doc_is_up_to_date() -> R<()> {
    let mut doc = String::from(
        "# Tensor names of the model presets\n\nGenerated by `UPDATE_DOCS=1 cargo test --release \
         -p ddpm-unet --test unet tensor_names`; checked by the same test. Names follow the \
         PyTorch module trees of the reference models.\n",
    );
    doc.push_str(
        "\nThe presets of the `ddpm_unet` architecture add a third column: the tensor's name in \
         diffusers' `UNet2DModel` (by the rules of `ddpm_unet::diffusers::NAME_RULES`, see \
         docs/pretrained.md); diffusers stores the attention projections marked (Linear) as \
         `(out, in)`.\n",
    );
    for name in ddpm_unet::PRESETS {
        let cfg = ModelConfig::preset(name)?;
        let model = DiffusionModel::new(&cfg, 0, &Device::Cpu, DType::F32)?;
        let levels = match &cfg {
            ModelConfig::DdpmUnet(c) => Some(c.ch_mult.len()),
            ModelConfig::Unet(_) => None,
        };
        let head = match levels {
            Some(_) => "| tensor | shape | diffusers |\n|---|---|---|",
            None => "| tensor | shape |\n|---|---|",
        };
        doc.push_str(&format!(
            "\n## `{name}` ({} parameters)\n\n{head}\n",
            model.num_parameters()
        ));
        for (tname, t) in model.tensors() {
            let theirs = match levels.map(|n| ddpm_unet::diffusers::diffusers_name(&tname, n)) {
                None => String::new(),
                Some(Some(d)) if d.linear_as_conv => format!(" `{}` (Linear) |", d.name),
                Some(Some(d)) => format!(" `{}` |", d.name),
                Some(None) => " (none) |".to_string(),
            };
            doc.push_str(&format!("| `{tname}` | {:?} |{theirs}\n", t.dims()));
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/tensor-names.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &doc)?;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/tensor-names.md is stale: rerun with UPDATE_DOCS=1"
    );
    Ok(())
}

/// Mixed precision on both architectures: f32 master weights, half-precision compute. The
/// prediction comes back in the input's dtype and close to the f32 one, every variable gets an
/// f32 gradient close to the f32 gradient, and the frozen copy computes in the half type too.
#[test]
fn half_precision_compute_keeps_f32_master_weights() -> R<()> {
    for cfg in [
        ModelConfig::Unet(tiny_unet()),
        ModelConfig::DdpmUnet(tiny_ddpm()),
    ] {
        // candle's CPU matmul has no bf16; bf16 is checked on CUDA by `cargo xtask test-matrix`.
        for (dtype, tol) in [(DType::F16, 2e-2)] {
            let model = DiffusionModel::new(&cfg, 4, &Device::Cpu, DType::F32)?;
            let half = model.clone().with_compute_dtype(dtype);
            assert_eq!(half.compute_dtype(), dtype);
            let x = randn(&[2, 2, 8, 8], 5, DType::F32)?;
            let t = Tensor::new(&[3u32, 700], &Device::Cpu)?;
            let want = model.forward(&x, &t)?;
            let got = half.forward(&x, &t)?;
            assert_eq!(got.dtype(), DType::F32);
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= tol * scale, "{dtype:?}: {diff} vs scale {scale}");
            let g_half = got.sqr()?.mean_all()?.backward()?;
            let g_full = want.sqr()?.mean_all()?.backward()?;
            let (mut num, mut den) = (0f32, 0f32);
            for var in model.var_list() {
                let gh = g_half.get(var.as_tensor()).ok_or("no half gradient")?;
                let gf = g_full.get(var.as_tensor()).ok_or("no f32 gradient")?;
                assert_eq!(gh.dtype(), DType::F32);
                num += (gh - gf)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
                den += gf.sqr()?.sum_all()?.to_scalar::<f32>()?;
            }
            let rel = (num / den).sqrt();
            assert!(rel <= 10.0 * tol, "{dtype:?}: gradient rel. error {rel}");
            let frozen = half.frozen()?;
            assert_eq!(frozen.dtype(), dtype);
            let again = frozen.forward(&x, &t)?;
            let diff = (&again - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= tol * scale, "frozen {dtype:?}: {diff}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Class conditioning (classifier-free guidance's embedding).

/// Both networks with 3 classes: the table adds exactly `(classes + 1) x time_dim` parameters;
/// the output depends on the label; no labels is the null label; the class embedding gets a
/// gradient only through the rows of the labels used.
#[test]
fn class_conditional_models_follow_their_labels() -> R<()> {
    let dev = Device::Cpu;
    let unconditional = [
        (ModelConfig::Unet(tiny_unet()), 4 * 8),
        (ModelConfig::DdpmUnet(tiny_ddpm()), 4 * 8),
    ];
    for (plain, time_dim) in unconditional {
        let mut cfg = plain.clone();
        cfg.set_num_classes(Some(3));
        let base = DiffusionModel::new(&plain, 5, &dev, DType::F32)?;
        let model = DiffusionModel::new(&cfg, 5, &dev, DType::F32)?;
        assert_eq!(
            model.num_parameters(),
            base.num_parameters() + 4 * time_dim,
            "{cfg:?}"
        );
        let x = randn(&[4, 2, 8, 8], 1, DType::F32)?;
        let t = Tensor::new(&[10u32, 10, 10, 10], &dev)?;
        let labels = Tensor::new(&[0u32, 1, 2, 3], &dev)?;
        // The same image and timestep under four labels: four different predictions.
        let x1 = x.narrow(0, 0, 1)?.repeat((4, 1, 1, 1))?;
        let y1 = model.forward_full(&x1, &t, Some(&labels), None, None)?;
        for (i, j) in [(0, 1), (1, 2), (2, 3), (0, 3)] {
            let d = (y1.get(i)? - y1.get(j)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d > 1e-3, "labels {i} and {j} give the same output ({d})");
        }
        // No labels = the null label (3) for every image.
        let null = Tensor::new(&[3u32; 4], &dev)?;
        let a = model.forward_full(&x, &t, None, None, None)?;
        let b = model.forward_full(&x, &t, Some(&null), None, None)?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        // Gradient: rows 0 and 2 used, rows 1 and 3 not.
        let used = Tensor::new(&[0u32, 2, 0, 2], &dev)?;
        let loss = model
            .forward_full(&x, &t, Some(&used), None, None)?
            .sqr()?
            .sum_all()?;
        let grads = loss.backward()?;
        let table = &model.vars()["class_emb.weight"];
        assert_eq!(table.dims(), &[4, time_dim]);
        let g = grads.get(table.as_tensor()).ok_or("no gradient")?;
        let row_norm = |r: usize| -> R<f32> { Ok(g.get(r)?.abs()?.sum_all()?.to_scalar()?) };
        assert!(row_norm(0)? > 0.0 && row_norm(2)? > 0.0);
        assert_eq!(row_norm(1)?, 0.0);
        assert_eq!(row_norm(3)?, 0.0);
    }
    Ok(())
}

/// Labels that do not fit are one clear error, never a panic: labels for an unconditional
/// model, a label past the null label, a wrong shape, float labels; `num_classes = 0` is refused.
#[test]
fn bad_labels_are_errors() -> R<()> {
    let dev = Device::Cpu;
    let x = randn(&[2, 2, 8, 8], 1, DType::F32)?;
    let t = Tensor::new(&[1u32, 2], &dev)?;
    let plain = DiffusionModel::new(&ModelConfig::Unet(tiny_unet()), 1, &dev, DType::F32)?;
    let labels = Tensor::new(&[0u32, 1], &dev)?;
    let e = plain
        .forward_full(&x, &t, Some(&labels), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("unconditional"), "{e}");

    let mut cfg = ModelConfig::Unet(tiny_unet());
    cfg.set_num_classes(Some(3));
    let model = DiffusionModel::new(&cfg, 1, &dev, DType::F32)?;
    for (bad, what) in [
        (Tensor::new(&[0u32, 4], &dev)?, "label 4"),
        (Tensor::new(&[0i64, -1], &dev)?, "label -1"),
        (Tensor::new(&[0u32, 1, 2], &dev)?, "shape"),
        (Tensor::new(&[0f32, 1.0], &dev)?, "integers"),
    ] {
        let e = model
            .forward_full(&x, &t, Some(&bad), None, None)
            .unwrap_err();
        assert!(matches!(e, UnetError::BadLabels { .. }), "{what}: {e}");
        assert!(
            e.to_string().contains(what) || e.to_string().contains("integers"),
            "{what}: {e}"
        );
    }
    cfg.set_num_classes(Some(0));
    let e = DiffusionModel::new(&cfg, 1, &dev, DType::F32).unwrap_err();
    assert!(e.to_string().contains("num_classes"), "{e}");
    Ok(())
}
