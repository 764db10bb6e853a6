//! Sampling: the reverse process from pure noise with any sampler of `ddpm-schedule`, batched,
//! seeded, optionally recording frames for an animation.

use candle_core::{DType, Device, Tensor};
use ddpm_schedule::{Objective, SamplerConfig, Schedule, StepHistory};
use ddpm_unet::ops::Kernels;
use ddpm_unet::DiffusionModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{inplace, Result};

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
    /// the last frame the final images; at most the sampler's steps + 1 (its distinct states).
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

/// A copy of `x` on the CPU that later in-place steps leave alone.
fn snapshot(x: &Tensor) -> Result<Tensor> {
    Ok(if x.device().is_cpu() {
        x.copy()?
    } else {
        x.to_device(&Device::Cpu)?
    })
}

/// Runs the reverse process of `schedule` with `model` (predicting `objective`).
///
/// On the CPU (f32) each step updates x_t in place ([`AffineStep`]); a candle-backend [`ddpm_unet::KernelPolicy`]
/// selects the sampler's tensor ops instead, which give the same images up to float rounding.
pub fn sample(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
) -> Result<Samples> {
    let in_place = ddpm_unet::ops::kernels() == Kernels::Ours;
    sample_with(model, schedule, objective, opts, in_place)
}

/// [`sample`], with the in-place step allowed or not.
fn sample_with(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
    allow_in_place: bool,
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
    // A sampler of n steps passes through n + 1 states: more frames would only repeat them.
    let n_frames = opts.frames.min(ts.len() + 1);
    let frame_at: Vec<usize> = if n_frames >= 2 {
        (0..n_frames)
            .map(|k| k * ts.len() / (n_frames - 1))
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
        // On the CPU in f32, x_t is updated in place by the step's scalar coefficients: nothing
        // is allocated per step outside the model. Elsewhere, the sampler's tensor ops.
        let in_place = allow_in_place && device.is_cpu() && x.dtype() == DType::F32;
        // The timestep inputs of every step, made once per batch.
        let tts = ts
            .iter()
            .map(|&t| Tensor::from_vec(vec![t as u32; b], b, &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut self_cond: Option<Tensor> = None;
        // What a multistep sampler (DPM-Solver++) carries from step to step: the predicted x_0,
        // as a tensor or, in place, as one f32 buffer per batch.
        let mut history = StepHistory::new();
        let mut last_x0 = if in_place && sampler.is_multistep() {
            vec![0f32; x.elem_count()]
        } else {
            Vec::new()
        };
        for (i, tt) in tts.iter().enumerate() {
            for (k, &at) in frame_at.iter().enumerate() {
                if at == i {
                    frames[k].push(snapshot(&x)?);
                }
            }
            // Sampling needs no gradients: detaching cuts the autograd graph at every step, so memory
            // stays that of one forward pass.
            let out = model.forward_t(&x, tt, self_cond.as_ref(), None)?.detach();
            if cfg.self_condition() {
                let x0 = schedule
                    .predict_x0(objective, &out, &x, tt)?
                    .clamp(-1f32, 1f32)?;
                self_cond = Some(x0);
            }
            if in_place {
                // The noise comes from the sampling RNG in element order: the values, in the
                // order, that `gaussian` draws for the tensor path.
                let step = sampler.affine_step(i, objective)?;
                inplace::update_in_place("sampler-step", &x, &out.contiguous()?, |x, out| {
                    if sampler.is_multistep() {
                        step.apply_multistep(out, x, &mut last_x0, || {
                            StandardNormal.sample(&mut rng)
                        })
                    } else {
                        step.apply(out, x, || StandardNormal.sample(&mut rng))
                    }
                })?;
            } else {
                let noise = if sampler.needs_noise(i) {
                    Some(gaussian(&mut rng, &[b, c, s, s], &device)?)
                } else {
                    None
                };
                x = sampler
                    .step_with_history(&out, &x, i, objective, noise.as_ref(), &mut history)?
                    .detach();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_schedule::{DdpmVariance, ScheduleConfig};
    use ddpm_unet::{ModelConfig, UnetConfig};

    /// The in-place loop and the sampler's tensor ops give the same images and frames (up to
    /// f32 rounding carried through a few model evaluations), with and without noise and with
    /// self-conditioning, including a ragged last batch.
    #[test]
    fn in_place_steps_match_the_tensor_steps() -> Result<()> {
        let schedule = Schedule::new(&ScheduleConfig::default(), &Device::Cpu)?;
        for self_condition in [false, true] {
            let config = ModelConfig::Unet(UnetConfig {
                image_size: 8,
                channels: 2,
                dim: 8,
                dim_mults: vec![1, 2],
                resnet_block_groups: 2,
                self_condition,
                ..UnetConfig::default()
            });
            let model = DiffusionModel::new(&config, 3, &Device::Cpu, DType::F32)?;
            let samplers = [
                SamplerConfig::Ddpm {
                    steps: Some(8),
                    variance: DdpmVariance::FixedSmall,
                    clip_x0: true,
                },
                SamplerConfig::Ddim {
                    steps: Some(6),
                    eta: 0.5,
                    clip_x0: false,
                },
                SamplerConfig::DpmSolver {
                    steps: Some(6),
                    spacing: ddpm_schedule::DpmSpacing::Linspace,
                    clip_x0: true,
                },
            ];
            for sampler in samplers {
                let opts = SampleOptions {
                    num: 5,
                    sampler,
                    seed: 11,
                    batch_size: 3,
                    frames: 3,
                    progress: false,
                };
                let a = sample_with(&model, &schedule, Objective::Eps, &opts, true)?;
                let b = sample_with(&model, &schedule, Objective::Eps, &opts, false)?;
                let pairs =
                    std::iter::once((&a.images, &b.images)).chain(a.frames.iter().zip(&b.frames));
                assert_eq!(a.frames.len(), 3);
                for (x, y) in pairs {
                    assert_eq!(x.dims(), y.dims());
                    let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let size = y.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(size > 0.1, "{sampler:?}: degenerate samples");
                    assert!(
                        diff <= 1e-4,
                        "{sampler:?} self-cond {self_condition}: {diff}"
                    );
                }
                // The first frame is the initial noise, untouched by the in-place steps.
                assert_eq!(
                    a.frames[0].flatten_all()?.to_vec1::<f32>()?,
                    b.frames[0].flatten_all()?.to_vec1::<f32>()?
                );
            }
        }
        Ok(())
    }
}
