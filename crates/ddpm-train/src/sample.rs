//! Sampling: the reverse process from pure noise with any sampler of `ddpm-schedule`, batched,
//! seeded, optionally recording frames for an animation.

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::{Objective, SamplerConfig, Schedule};
use ddpm_unet::DiffusionModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Number of images.
    pub num: usize,
    /// The sampler and its number of steps.
    pub sampler: SamplerConfig,
    /// Seed of the initial noise and of the noise of stochastic steps.
    pub seed: u64,
    /// Images denoised together.
    pub batch_size: usize,
    /// Frames of the reverse process to keep for an animation (0: none). Frame 0 is the noise,
    /// the last frame the final images.
    pub frames: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// Sampled images in [-1, 1] (n, c, h, w) on the CPU, and the recorded frames, each (n, c, h, w).
#[derive(Debug)]
pub struct Samples {
    /// The final images.
    pub images: Tensor,
    /// Snapshots of x_t along the way, when asked for.
    pub frames: Vec<Tensor>,
}

/// Standard normal noise of `shape` from `rng` (f32, on `device`).
pub fn gaussian(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Runs the reverse process of `schedule` with `model` (predicting `objective`).
pub fn sample(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
) -> Result<Samples> {
    let sampler = opts.sampler.build(schedule)?;
    // Detached weights: no autograd graph is recorded during the forward passes.
    let model = &model.frozen()?;
    let ts = sampler.timesteps().to_vec();
    let cfg = model.config();
    let (c, s) = (cfg.channels(), cfg.image_size());
    let device = model.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let batch = opts.batch_size.max(1);
    let n_batches = opts.num.div_ceil(batch);
    let bar = if opts.progress {
        crate::trainer::progress_bar((n_batches * ts.len()) as u64, "sampling")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let frame_at: Vec<usize> = if opts.frames >= 2 {
        (0..opts.frames)
            .map(|k| k * ts.len() / (opts.frames - 1))
            .collect()
    } else {
        Vec::new()
    };
    let mut images = Vec::new();
    let mut frames: Vec<Vec<Tensor>> = vec![Vec::new(); frame_at.len()];
    let mut done = 0;
    while done < opts.num {
        let b = batch.min(opts.num - done);
        let mut x = gaussian(&mut rng, &[b, c, s, s], &device)?;
        let mut self_cond: Option<Tensor> = None;
        for (i, &t) in ts.iter().enumerate() {
            for (k, &at) in frame_at.iter().enumerate() {
                if at == i {
                    frames[k].push(x.to_device(&Device::Cpu)?);
                }
            }
            let tt = Tensor::from_vec(vec![t as u32; b], b, &device)?;
            // Sampling needs no gradients: detaching cuts the autograd graph at every step, so memory
            // stays that of one forward pass.
            let out = model.forward_t(&x, &tt, self_cond.as_ref(), None)?.detach();
            if cfg.self_condition() {
                let x0 = schedule
                    .predict_x0(objective, &out, &x, &tt)?
                    .clamp(-1f32, 1f32)?;
                self_cond = Some(x0);
            }
            let noise = if sampler.needs_noise(i) {
                Some(gaussian(&mut rng, &[b, c, s, s], &device)?)
            } else {
                None
            };
            x = sampler
                .step(&out, &x, i, objective, noise.as_ref())?
                .detach();
            bar.inc(1);
        }
        let x = x
            .clamp(-1f32, 1f32)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        if let Some(last) = frame_at.iter().position(|&at| at == ts.len()) {
            frames[last].push(x.clone());
        }
        images.push(x);
        done += b;
    }
    bar.finish_and_clear();
    let frames = frames
        .into_iter()
        .map(|f| Tensor::cat(&f, 0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Samples {
        images: Tensor::cat(&images, 0)?,
        frames,
    })
}
