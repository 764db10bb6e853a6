//! Sample quality: draw samples from a model and compare them with real images in the feature
//! space of the tool's own classifier (Fréchet distance, Inception-Score-style score, class
//! histogram) and in pixel space (memorization).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use ddpm_data::{image_io, Dataset};
use ddpm_schedule::{Objective, SamplerConfig, Schedule};
use ddpm_unet::DiffusionModel;
use serde::{Deserialize, Serialize};

use super::classifier::{ClassifierConfig, ClassifierTraining, LoadedClassifier};
use super::fid::{frechet_distance, inception_score, GaussianStats};
use super::memorization::{memorization, MemorizationOptions, MemorizationReport};
use super::nll::image_batch;
use super::recognisable::{
    recognisability, reference_and_floor, Recognisability, DEFAULT_CONFIDENCE, SUBSET_DOMAIN,
};
use crate::checkpoint::write_png_atomic;
use crate::sample::{sample, Guidance, SampleOptions};
use crate::{Result, TrainError};

/// What to sample and how to compare.
#[derive(Debug, Clone)]
pub struct QualityOptions {
    /// Samples to draw (and test images to compare with, at most the split's size).
    pub num_samples: usize,
    /// The sampler (DDIM with 50 steps by default).
    pub sampler: SamplerConfig,
    /// Seed of the samples' noise; also picks the reference test and training images.
    pub seed: u64,
    /// Images per forward pass.
    pub batch_size: usize,
    /// The memorization check.
    pub memorization: MemorizationOptions,
    /// Also write the samples as a PNG grid here.
    pub samples_png: Option<PathBuf>,
    /// The confidence threshold of "recognisable".
    pub confidence: f64,
    /// Show progress bars.
    pub progress: bool,
    /// The labels and guidance of a class-conditional model's samples.
    pub guidance: Guidance,
}

impl Default for QualityOptions {
    fn default() -> Self {
        Self {
            num_samples: 1000,
            sampler: SamplerConfig::Ddim {
                steps: Some(50),
                eta: 0.0,
                clip_x0: true,
            },
            seed: 0,
            batch_size: 64,
            memorization: MemorizationOptions::default(),
            samples_png: None,
            confidence: DEFAULT_CONFIDENCE,
            progress: false,
            guidance: Guidance::default(),
        }
    }
}

/// The classifier used, as recorded in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSummary {
    /// Its file.
    pub path: String,
    /// Whether this evaluation trained it.
    pub trained_now: bool,
    /// Its shape.
    pub config: ClassifierConfig,
    /// How it was trained.
    pub training: ClassifierTraining,
    /// Its top-1 accuracy on the test split.
    pub test_accuracy: f64,
    /// Test images that accuracy was measured on.
    pub test_images: usize,
}

impl ClassifierSummary {
    /// The summary of a loaded classifier.
    pub fn of(classifier: &LoadedClassifier) -> Self {
        let m = &classifier.meta;
        Self {
            path: classifier.path.display().to_string(),
            trained_now: classifier.trained_now,
            config: m.config.clone(),
            training: m.training.clone(),
            test_accuracy: m.test_accuracy,
            test_images: m.test_images,
        }
    }
}

/// Sample-quality numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// Samples drawn.
    pub num_samples: usize,
    /// Test images compared with (the FID reference).
    pub test_images: usize,
    /// The sampler.
    pub sampler: SamplerConfig,
    /// Seed of the samples (and of the choice of reference images).
    pub seed: u64,
    /// A class-conditional model's labels and guidance (absent for an unconditional model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<Guidance>,
    /// A class-conditional model: the share of samples the classifier assigns to the class
    /// they were sampled with (absent for an unconditional model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_accuracy: Option<f64>,
    /// The feature classifier.
    pub classifier: ClassifierSummary,
    /// Fréchet distance between the samples' and the test images' classifier features.
    pub fid: f64,
    /// The same distance between as many training images and the test images: the value of a
    /// model whose samples were real images, for scale.
    pub fid_train_vs_test: f64,
    /// `exp E[KL(p(y | x) || p(y))]` of the samples, in [1, classes].
    pub inception_score: f64,
    /// The same score of the test images.
    pub inception_score_test: f64,
    /// Class names, in label order.
    pub class_names: Vec<String>,
    /// Samples per predicted class.
    pub class_histogram: Vec<usize>,
    /// Test images per predicted class.
    pub class_histogram_test: Vec<usize>,
    /// Classes predicted for at least one sample.
    pub classes_covered: usize,
    /// The memorization check.
    pub memorization: MemorizationReport,
    /// The share of recognisable samples, their class histogram and its entropy and their FID,
    /// next to the same numbers of as many real held-out test images.
    pub recognisable: Recognisability,
    /// Wall-clock seconds (sampling included, classifier training excluded).
    pub seconds: f64,
}

fn histogram(probs: &Tensor, k: usize) -> Result<Vec<usize>> {
    let pred: Vec<u32> = probs.argmax(1)?.to_vec1()?;
    let mut h = vec![0usize; k];
    for p in pred {
        if let Some(c) = h.get_mut(p as usize) {
            *c += 1;
        }
    }
    Ok(h)
}

/// Rounds images in [-1, 1] to the 8-bit levels a PNG would store.
pub fn quantize(images: &Tensor) -> Result<Tensor> {
    let levels = ((images.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
    Ok(((levels / 127.5)? - 1.0)?)
}

/// Draws `opts.num_samples` samples from `model` and measures them against `test` and `train`
/// (each opened at the model's image size) with `classifier`.
#[allow(clippy::too_many_arguments)]
pub fn sample_quality(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    classifier: &LoadedClassifier,
    train: &Dataset,
    test: &Dataset,
    opts: &QualityOptions,
) -> Result<QualityReport> {
    let start = Instant::now();
    super::check_compatible(model, test)?;
    super::check_compatible(model, train)?;
    super::recognisable::check_confidence(opts.confidence)?;
    if opts.num_samples < 2 {
        return Err(TrainError::Other(format!(
            "sample quality needs at least 2 samples (a covariance), got {}",
            opts.num_samples
        )));
    }
    if test.len() < 4 {
        return Err(TrainError::Other(format!(
            "the test split of {} has {} images: the FID reference and the real floor need at \
             least 2 each",
            test.name(),
            test.len()
        )));
    }
    let k = classifier.classifier.config().num_classes;
    if test.num_classes() != k {
        return Err(TrainError::Other(format!(
            "the classifier knows {k} classes but {} has {}",
            test.name(),
            test.num_classes()
        )));
    }
    tracing::info!(samples = opts.num_samples, sampler = ?opts.sampler, "sampling for the quality metrics");
    let samples = sample(
        model,
        schedule,
        objective,
        &SampleOptions {
            num: opts.num_samples,
            sampler: opts.sampler,
            seed: opts.seed,
            batch_size: opts.batch_size,
            frames: 0,
            progress: opts.progress,
            guidance: opts.guidance,
        },
    )?
    .images;
    let samples = quantize(&samples.to_dtype(DType::F32)?)?;
    let classes = model.config().num_classes();
    if let Some(path) = &opts.samples_png {
        let nrow = crate::sample::grid_columns(opts.num_samples, classes, &opts.guidance);
        let grid = image_io::image_grid(&samples, nrow)?;
        write_png_atomic(&grid, path).map_err(|e| TrainError::io(path, "writing", e))?;
    }
    let (test_images, floor_images) = reference_and_floor(test, opts.num_samples, opts.seed)?;
    let n_ref = test_images.dim(0)?;
    let seed = opts.seed ^ SUBSET_DOMAIN;
    let train_idx = super::subset(train.len(), n_ref, seed.wrapping_add(1));
    let cpu = candle_core::Device::Cpu;
    let train_images = image_batch(train, &train_idx, &cpu)?;
    let c = &classifier.classifier;
    let (f_samples, p_samples) = c.embed(&samples, opts.batch_size)?;
    let (f_test, p_test) = c.embed(&test_images, opts.batch_size)?;
    let (f_train, _) = c.embed(&train_images, opts.batch_size)?;
    let s_samples = GaussianStats::from_tensor(&f_samples)?;
    let s_test = GaussianStats::from_tensor(&f_test)?;
    let s_train = GaussianStats::from_tensor(&f_train)?;
    let fid = frechet_distance(&s_samples, &s_test)?;
    let fid_train_vs_test = frechet_distance(&s_train, &s_test)?;
    let flat = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
    let inception = inception_score(&flat(&p_samples)?, k)?;
    let inception_test = inception_score(&flat(&p_test)?, k)?;
    let class_histogram = histogram(&p_samples, k)?;
    let label_accuracy = match classes {
        Some(n) => {
            let pred: Vec<u32> = p_samples.argmax(1)?.to_vec1()?;
            let hits = pred
                .iter()
                .enumerate()
                .filter(|&(i, &p)| p == opts.guidance.label_of(i, n))
                .count();
            Some(hits as f64 / pred.len() as f64)
        }
        None => None,
    };
    let classes_covered = class_histogram.iter().filter(|&&c| c > 0).count();
    tracing::info!(
        fid,
        fid_train_vs_test,
        inception_score = inception,
        classes_covered,
        "feature metrics done"
    );
    let mem = memorization(&samples, &test_images, train, &opts.memorization)?;
    tracing::info!(
        fraction = mem.fraction,
        threshold = mem.threshold,
        "memorization check done"
    );
    let recognisable = recognisability(
        c,
        &samples,
        &test_images,
        &floor_images,
        test,
        opts.confidence,
        opts.batch_size,
    )?;
    tracing::info!(
        recognisable = recognisable.samples.recognisable,
        floor = recognisable.real_floor.recognisable,
        "recognisability done"
    );
    Ok(QualityReport {
        num_samples: opts.num_samples,
        test_images: n_ref,
        sampler: opts.sampler,
        seed: opts.seed,
        guidance: classes.map(|_| opts.guidance),
        label_accuracy,
        classifier: ClassifierSummary::of(classifier),
        fid,
        fid_train_vs_test,
        inception_score: inception,
        inception_score_test: inception_test,
        class_names: test.class_names().to_vec(),
        class_histogram,
        class_histogram_test: histogram(&p_test, k)?,
        classes_covered,
        memorization: mem,
        recognisable,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_to_the_8_bit_levels() {
        let x = Tensor::new(
            &[-1.5f32, -1.0, 0.0, 0.001, 0.5, 1.0],
            &candle_core::Device::Cpu,
        )
        .expect("x");
        let q = quantize(&x).expect("q").to_vec1::<f32>().expect("v");
        let level = |v: f32| ((v + 1.0) * 127.5).round();
        for (a, b) in q.iter().zip([0.0, 0.0, 128.0, 128.0, 191.0, 255.0]) {
            assert!((level(*a) - b).abs() < 1e-3, "{a}");
            assert!((a - (b / 127.5 - 1.0)).abs() < 1e-6);
        }
    }
}
