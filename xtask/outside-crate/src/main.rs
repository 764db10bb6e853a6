//! A user's program on ddpm-schedule and ddpm-unet alone, built against stock candle-core (the
//! one the crates re-export): a tiny U-Net learns to denoise a fixed batch for a few SGD steps,
//! then DDIM samples from it.

use ddpm_schedule::candle_core::{DType, Device, Tensor};
use ddpm_schedule::{timestep_tensor, SamplerConfig, Schedule, ScheduleConfig};
use ddpm_unet::{DiffusionModel, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    println!(
        "stock candle-core (this crate does not patch it); kernel policy: {}",
        ddpm_unet::KernelPolicy::active()
    );
    let mut config = ModelConfig::preset("mnist-small")?;
    config.set_image_size(16);
    let model = DiffusionModel::new(&config, 0, &dev, DType::F32)?;
    let schedule = Schedule::new(&ScheduleConfig::default(), &dev)?;
    let vars = model.var_list();

    // A fixed batch of "images": smooth blobs in [-1, 1].
    let (b, s) = (8usize, 16usize);
    let x0 = Tensor::arange(0u32, (b * s * s) as u32, &dev)?
        .to_dtype(DType::F32)?
        .affine(0.05, 0.0)?
        .sin()?
        .reshape((b, 1, s, s))?;

    let mut losses = Vec::new();
    for step in 0..6u32 {
        let t = Tensor::from_vec(
            (0..b as u32).map(|i| (i * 97 + step * 31) % 1000).collect::<Vec<_>>(),
            b,
            &dev,
        )?;
        let noise = x0.randn_like(0.0, 1.0)?;
        let x_t = schedule.q_sample(&x0, &t, &noise)?;
        let loss = (model.forward(&x_t, &t)? - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        for v in &vars {
            if let Some(g) = grads.get(v) {
                v.set(&(v.as_tensor() - (g * 0.05)?)?)?;
            }
        }
        let l = loss.to_scalar::<f32>()?;
        println!("step {step}: loss {l:.4}");
        losses.push(l);
    }
    assert!(losses.iter().all(|l| l.is_finite()), "non-finite loss");

    // DDIM, 10 steps, addressed by timestep.
    let sampler = SamplerConfig::Ddim {
        steps: Some(10),
        eta: 0.0,
        clip_x0: true,
    }
    .build(&schedule)?;
    let mut x = Tensor::randn(0f32, 1.0, (2, 1, s, s), &dev)?;
    for &t in sampler.timesteps() {
        let eps = model.forward(&x, &timestep_tensor(t, 2, &dev)?)?;
        x = sampler.step_at(&eps, &x, t, ddpm_schedule::Objective::Eps, None)?;
    }
    let (lo, hi) = (
        x.min_all()?.to_scalar::<f32>()?,
        x.max_all()?.to_scalar::<f32>()?,
    );
    println!("sampled 2 images of {s}x{s}: values in [{lo:.3}, {hi:.3}]");
    assert!(lo.is_finite() && hi.is_finite() && lo >= -1.0 - 1e-5 && hi <= 1.0 + 1e-5);
    println!("ok");
    Ok(())
}

