//! Sampling: the reverse process from pure noise with any sampler of `ddpm-schedule`, batched,
//! seeded, optionally recording frames for an animation.

use candle_core::{DType, Device, Tensor};
use ddpm_kernels::optim::update_in_place;
use ddpm_schedule::{Objective, SamplerConfig, Schedule, StepHistory};
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
    /// the last frame the final images; at most the sampler's steps + 1 (its distinct states).
    pub frames: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// How a class-conditional model is sampled (unused by an unconditional one).
    pub guidance: Guidance,
}

/// The labels and the classifier-free guidance (Ho & Salimans 2022) of a class-conditional
/// model's samples: each step predicts `uncond + scale * (cond - uncond)` from the model's
/// prediction under the image's label (`cond`) and under the null label (`uncond`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guidance {
    /// The guidance scale: 1 samples the conditional model as it is (one forward pass per
    /// step), 0 the unconditional one, above 1 pushes samples towards their class (two passes,
    /// batched as one).
    pub scale: f64,
    /// The class of every image; `None` cycles through the classes (image `i` gets class
    /// `i mod classes`), so that a grid shows each class equally often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<u32>,
}

impl Default for Guidance {
    fn default() -> Self {
        Self {
            scale: 1.0,
            class: None,
        }
    }
}

impl Guidance {
    /// Checks the scale (finite, at least 0) and the class against a model's `num_classes`.
    pub fn validate(&self, num_classes: Option<usize>) -> Result<()> {
        self.validate_scale()?;
        match (self.class, num_classes) {
            (Some(c), Some(n)) if c as usize >= n => Err(crate::TrainError::Config(format!(
                "class {c} is not one of the model's {n} classes (0..{})",
                n - 1
            ))),
            (Some(c), None) => Err(crate::TrainError::Config(format!(
                "class {c} asked for, but the model is unconditional: it was not trained with \
                 classes"
            ))),
            _ => Ok(()),
        }
    }

    /// Checks the scale: finite and at least 0.
    pub fn validate_scale(&self) -> Result<()> {
        if !(self.scale.is_finite() && self.scale >= 0.0) {
            return Err(crate::TrainError::Config(format!(
                "guidance scale {} must be a finite number >= 0 (1: no guidance)",
                self.scale
            )));
        }
        Ok(())
    }

    /// The class of image `i` (counted over the whole run, not the batch) of a model with `n`
    /// classes: [`Guidance::class`], else `i mod n`.
    pub fn label_of(&self, i: usize, n: usize) -> u32 {
        self.class.unwrap_or((i % n) as u32)
    }

    /// The labels of images `first..first + b` of a model with `n` classes.
    fn labels(&self, first: usize, b: usize, n: usize, device: &Device) -> Result<Tensor> {
        let v: Vec<u32> = (first..first + b).map(|i| self.label_of(i, n)).collect();
        Ok(Tensor::from_vec(v, b, device)?)
    }
}

/// Images per row of a sample grid of `num` images: one column per class when a
/// class-conditional model's labels cycle through at most 16 classes (image `i` has class
/// `i mod classes`), else a square.
pub fn grid_columns(num: usize, num_classes: Option<usize>, guidance: &Guidance) -> usize {
    match num_classes {
        Some(n) if guidance.class.is_none() && n <= 16 && num >= n => n,
        _ => ((num as f64).sqrt().ceil() as usize).max(1),
    }
}

/// A class-conditional batch's forward passes with guidance (see [`Guidance`]): the labels the
/// model is given are made once per batch, not per step.
struct GuidedBatch {
    /// With scale 1, the batch's `b` labels; with 0, `b` null labels; otherwise the `b` labels
    /// then `b` null labels of the doubled batch whose two halves guidance combines.
    labels: Tensor,
    scale: f64,
}

impl GuidedBatch {
    /// The passes of a batch with `labels` (b,) of a model whose null label is `null`.
    fn new(labels: Tensor, null: u32, scale: f64) -> Result<Self> {
        let b = labels.dim(0)?;
        let nulls = || Tensor::from_vec(vec![null; b], b, labels.device());
        let labels = if scale == 1.0 {
            labels
        } else if scale == 0.0 {
            nulls()?
        } else {
            Tensor::cat(&[&labels, &nulls()?], 0)?
        };
        Ok(Self { labels, scale })
    }

    /// The guided prediction for `x` at `t`: one forward pass, of twice the batch when the
    /// conditional and the unconditional predictions are both needed.
    fn forward(
        &self,
        model: &DiffusionModel,
        x: &Tensor,
        t: &Tensor,
        self_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.scale == 1.0 || self.scale == 0.0 {
            return Ok(model.forward_full(x, t, Some(&self.labels), self_cond, None)?);
        }
        let b = x.dim(0)?;
        let two = |a: &Tensor| Tensor::cat(&[a, a], 0);
        let sc = self_cond.map(two).transpose()?;
        let out = model.forward_full(&two(x)?, &two(t)?, Some(&self.labels), sc.as_ref(), None)?;
        let cond = out.narrow(0, 0, b)?;
        let uncond = out.narrow(0, b, b)?;
        Ok(((cond - &uncond)?.affine(self.scale, 0.0)? + uncond)?)
    }
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

/// Runs the reverse process of `schedule` with `model` (predicting `objective`), under the
/// model's kernel policy ([`DiffusionModel::kernel_policy`]).
///
/// On the CPU (f32) with our kernels each step updates x_t in place ([`AffineStep`]); with
/// candle's backend the sampler's tensor ops run instead, which give the same images up to
/// float rounding.
///
/// [`AffineStep`]: ddpm_schedule::AffineStep
pub fn sample(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
) -> Result<Samples> {
    let never = std::sync::atomic::AtomicBool::new(false);
    sample_until(model, schedule, objective, opts, &never)?
        .ok_or_else(|| crate::TrainError::Other("sampling stopped".into()))
}

/// [`sample`], giving up (`None`) before the next denoising step once `stop` is set: a training
/// run asked to stop skips its sample grid rather than finish it.
pub fn sample_until(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<Samples>> {
    let policy = model.kernel_policy();
    // The weights stay as they are for the whole loop: each convolution's Winograd kernel is
    // transformed once, not at every step.
    let run = || {
        ddpm_kernels::conv::with_constant_weights(|| {
            sample_with(model, schedule, objective, opts, policy.ours(), stop)
        })
    };
    policy.scoped(|| ddpm_kernels::on_pool(model.device(), run))
}

/// [`sample`], with the in-place step allowed or not.
fn sample_with(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    opts: &SampleOptions,
    allow_in_place: bool,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<Samples>> {
    let sampler = opts.sampler.build(schedule)?;
    let classes = model.config().num_classes();
    opts.guidance.validate(classes)?;
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
        let guided = classes
            .map(|n| {
                let labels = opts.guidance.labels(done, b, n, &device)?;
                GuidedBatch::new(labels, n as u32, opts.guidance.scale)
            })
            .transpose()?;
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
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                bar.finish_and_clear();
                return Ok(None);
            }
            for (k, &at) in frame_at.iter().enumerate() {
                if at == i {
                    frames[k].push(snapshot(&x)?);
                }
            }
            // Sampling needs no gradients: detaching cuts the autograd graph at every step, so memory
            // stays that of one forward pass.
            let out = match &guided {
                Some(g) => g.forward(model, &x, tt, self_cond.as_ref())?,
                None => model.forward_t(&x, tt, self_cond.as_ref(), None)?,
            }
            .detach();
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
                update_in_place("sampler-step", &x, &out.contiguous()?, |x, out| {
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
    Ok(Some(Samples {
        images: Tensor::cat(&images, 0)?,
        frames,
    }))
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
                    guidance: Guidance::default(),
                };
                let never = std::sync::atomic::AtomicBool::new(false);
                let run = |in_place| {
                    sample_with(&model, &schedule, Objective::Eps, &opts, in_place, &never)?
                        .ok_or_else(|| crate::TrainError::Other("stopped".into()))
                };
                let (a, b) = (run(true)?, run(false)?);
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

    /// One model sampled under our kernels and under candle's backend, in one process: the
    /// two runs take different paths (our ops and the in-place step, candle's ops and the
    /// sampler's tensor ops), so the states along the way are not bit-identical, but they agree
    /// to f32 rounding carried through a few model evaluations.
    #[test]
    fn each_model_samples_under_its_own_kernel_policy() -> Result<()> {
        let schedule = Schedule::new(&ScheduleConfig::default(), &Device::Cpu)?;
        let config = ModelConfig::Unet(UnetConfig {
            image_size: 8,
            channels: 2,
            dim: 8,
            dim_mults: vec![1, 2],
            resnet_block_groups: 2,
            ..UnetConfig::default()
        });
        let model = DiffusionModel::new(&config, 3, &Device::Cpu, DType::F32)?;
        let candle = ddpm_unet::KernelPolicy {
            backend: ddpm_unet::policy::Backend::Candle,
            ..Default::default()
        };
        let opts = SampleOptions {
            num: 3,
            sampler: SamplerConfig::Ddim {
                steps: Some(6),
                eta: 0.5,
                clip_x0: false,
            },
            seed: 5,
            batch_size: 3,
            frames: 3,
            progress: false,
            guidance: Guidance::default(),
        };
        let ours = model.clone().with_kernel_policy(Default::default());
        let theirs = model.with_kernel_policy(candle);
        let a = sample(&ours, &schedule, Objective::Eps, &opts)?;
        let b = sample(&theirs, &schedule, Objective::Eps, &opts)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        // The state halfway (the final images of an untrained model are mostly clamped to
        // +-1, the same either way).
        assert_ne!(
            bits(&a.frames[1])?,
            bits(&b.frames[1])?,
            "both runs took one path"
        );
        let pairs = std::iter::once((&a.images, &b.images)).chain(a.frames.iter().zip(&b.frames));
        for (x, y) in pairs {
            let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-4, "{diff}");
        }
        Ok(())
    }

    fn conditional_model() -> Result<DiffusionModel> {
        let config = ModelConfig::Unet(UnetConfig {
            image_size: 8,
            channels: 1,
            dim: 8,
            dim_mults: vec![1, 2],
            resnet_block_groups: 2,
            num_classes: Some(3),
            ..UnetConfig::default()
        });
        // Its own policy: tests running beside it that switch the policy in force (the
        // candle-backend tests) cannot change its path between two runs compared bit for bit.
        Ok(DiffusionModel::new(&config, 4, &Device::Cpu, DType::F32)?
            .with_kernel_policy(ddpm_unet::KernelPolicy::default()))
    }

    /// Guidance combines the conditional and the null-label predictions as
    /// `uncond + s (cond - uncond)`, computed here from two separate forward passes; scale 1 is
    /// the conditional model alone and scale 0 the unconditional one.
    #[test]
    fn guided_forward_is_the_guidance_combination() -> Result<()> {
        let model = conditional_model()?;
        let dev = Device::Cpu;
        let x = gaussian(&mut ChaCha8Rng::seed_from_u64(1), &[3, 1, 8, 8], &dev)?;
        let t = Tensor::new(&[5u32, 500, 999], &dev)?;
        let labels = Tensor::new(&[0u32, 1, 2], &dev)?;
        let cond = model.forward_full(&x, &t, Some(&labels), None, None)?;
        let uncond = model.forward_full(&x, &t, None, None, None)?;
        for scale in [0.0, 1.0, 2.5, 4.0] {
            let got = GuidedBatch::new(labels.clone(), 3, scale)?.forward(&model, &x, &t, None)?;
            let want = ((&cond - &uncond)?.affine(scale, 0.0)? + &uncond)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "scale {scale}: {diff}");
        }
        Ok(())
    }

    /// A class-conditional model's samples: labels cycle through the classes by image index
    /// (across batches), a fixed class gives that class to every image, and the samples
    /// depend on the labels and on the scale; bad guidance is an error.
    #[test]
    fn conditional_sampling_uses_the_labels() -> Result<()> {
        let model = conditional_model()?;
        let dev = Device::Cpu;
        let g = Guidance::default();
        let l = g.labels(4, 5, 3, &dev)?.to_vec1::<u32>()?;
        assert_eq!(l, vec![1, 2, 0, 1, 2]);
        let fixed = Guidance {
            scale: 2.0,
            class: Some(2),
        };
        assert_eq!(
            fixed.labels(0, 3, 3, &dev)?.to_vec1::<u32>()?,
            vec![2, 2, 2]
        );

        let schedule = Schedule::new(&ScheduleConfig::default(), &dev)?;
        let opts = |guidance: Guidance| SampleOptions {
            num: 4,
            sampler: SamplerConfig::Ddim {
                steps: Some(5),
                eta: 0.0,
                clip_x0: true,
            },
            seed: 3,
            batch_size: 3,
            frames: 0,
            progress: false,
            guidance,
        };
        let run = |g: Guidance| -> Result<Vec<f32>> {
            Ok(sample(&model, &schedule, Objective::Eps, &opts(g))?
                .images
                .flatten_all()?
                .to_vec1()?)
        };
        let cycled = run(Guidance::default())?;
        let all_two = run(Guidance {
            scale: 1.0,
            class: Some(2),
        })?;
        let guided = run(fixed)?;
        let px = 64;
        // Image 2 has class 2 in both runs (same noise): equal; image 0 differs (class 0 vs 2).
        assert_eq!(cycled[2 * px..3 * px], all_two[2 * px..3 * px]);
        assert_ne!(cycled[..px], all_two[..px]);
        assert_ne!(all_two, guided);
        for bad in [
            Guidance {
                scale: -1.0,
                class: None,
            },
            Guidance {
                scale: f64::NAN,
                class: None,
            },
            Guidance {
                scale: 1.0,
                class: Some(3),
            },
        ] {
            assert!(sample(&model, &schedule, Objective::Eps, &opts(bad)).is_err());
        }
        Ok(())
    }
}
