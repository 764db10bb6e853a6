//! The numbers of how samples look to a user, measured with the tool's classifier: the share of
//! images it labels with confidence at least a threshold ("recognisable"), the histogram of its
//! top-1 classes with the normalised entropy of that histogram, and the Fréchet distance of its
//! features to test images; each for the samples and, as the floor, for as many real held-out
//! test images.
//!
//! The test split is cut by one seeded permutation (see [`held_out_split`]): its first `R`
//! images are the FID *reference*, the next `F` the *real floor*; the two never overlap, so the
//! floor's FID is that of unseen real images against the same reference.

use std::fmt::Write as _;

use candle_core::{Device, Tensor};
use ddpm_data::Dataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::classifier::Classifier;
use super::fid::{frechet_distance, GaussianStats};
use super::nll::image_batch;
use crate::{Result, TrainError};

/// The default confidence threshold of "recognisable": the classifier's largest softmax
/// probability at least 0.9.
pub const DEFAULT_CONFIDENCE: f64 = 0.9;

/// What the reports' FID is computed in.
pub const FID_FEATURES: &str = "classifier features";

/// Domain separator of the seed that picks the reference and floor images (the one the sample
/// quality has always used for its reference images).
pub const SUBSET_DOMAIN: u64 = 0x7265_665f_696d_6773; // "ref_imgs"

/// The top-1 class of each row of `probs` (`k` values per row; the first of equal maxima)
/// counted per class: `k` counts summing to the number of rows.
pub fn class_histogram(probs: &[f64], k: usize) -> Vec<usize> {
    let mut h = vec![0usize; k];
    if k == 0 {
        return h;
    }
    for row in probs.chunks_exact(k) {
        let mut best = 0;
        for (c, p) in row.iter().enumerate() {
            if *p > row[best] {
                best = c;
            }
        }
        h[best] += 1;
    }
    h
}

/// The entropy of the histogram's class frequencies divided by `ln(classes)`: 0 when every image
/// is one class (or there is none), 1 when all classes are equally frequent.
pub fn normalised_entropy(histogram: &[usize]) -> f64 {
    let n: usize = histogram.iter().sum();
    if n == 0 || histogram.len() < 2 {
        return 0.0;
    }
    let h: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    (h / (histogram.len() as f64).ln()).clamp(0.0, 1.0)
}

/// The largest probability of each row of `probs` (`k` values per row).
pub fn confidences(probs: &[f64], k: usize) -> Vec<f64> {
    if k == 0 {
        return Vec::new();
    }
    probs
        .chunks_exact(k)
        .map(|row| row.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        .collect()
}

/// How many of `confidences` are at least `threshold`.
pub fn recognisable_count(confidences: &[f64], threshold: f64) -> usize {
    confidences.iter().filter(|&&c| c >= threshold).count()
}

/// Checks a confidence threshold: it must lie in (0, 1].
pub fn check_confidence(threshold: f64) -> Result<()> {
    if threshold > 0.0 && threshold <= 1.0 {
        Ok(())
    } else {
        Err(TrainError::Other(format!(
            "the confidence threshold must be in (0, 1], got {threshold}"
        )))
    }
}

/// The reference and floor indices of a test split of `len` images for `n` samples: one
/// permutation of `0..len` seeded by `seed`; the floor has `F = min(n, len / 2)` images and the
/// reference `R = min(n, len - F)`; the reference is the permutation's first `R` entries and the
/// floor its next `F`. Returns `(reference, floor)`.
pub fn held_out_split(len: usize, n: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let floor = n.min(len / 2);
    let reference = n.min(len - floor);
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let rest = order.split_off(reference);
    (order, rest.into_iter().take(floor).collect())
}

/// The numbers of one set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// Images scored.
    pub images: usize,
    /// Images whose largest class probability is at least the threshold.
    pub recognisable_count: usize,
    /// `recognisable_count / images`, in [0, 1].
    pub recognisable: f64,
    /// The mean of the largest class probability, in [1 / classes, 1].
    pub mean_confidence: f64,
    /// Images per top-1 class, in label order.
    pub class_histogram: Vec<usize>,
    /// The histogram's entropy over `ln(classes)`, in [0, 1].
    pub class_entropy: f64,
    /// Classes that are the top-1 class of at least one image.
    pub classes_covered: usize,
    /// Fréchet distance of the images' classifier features to the reference test images'.
    pub fid: f64,
}

impl ImageScores {
    /// The scores of images with class probabilities `probs` (`k` per image) and features
    /// `features` (`(n, F)`), against the reference statistics.
    pub fn new(
        probs: &[f64],
        k: usize,
        features: &Tensor,
        reference: &GaussianStats,
        threshold: f64,
    ) -> Result<Self> {
        let conf = confidences(probs, k);
        let n = conf.len();
        if n < 2 || n != features.dim(0)? {
            return Err(TrainError::Other(format!(
                "scoring needs at least 2 images with one feature row each (got {n} \
                 probability rows and {} feature rows)",
                features.dim(0)?
            )));
        }
        let class_histogram = class_histogram(probs, k);
        let count = recognisable_count(&conf, threshold);
        Ok(Self {
            images: n,
            recognisable_count: count,
            recognisable: count as f64 / n as f64,
            mean_confidence: conf.iter().sum::<f64>() / n as f64,
            class_entropy: normalised_entropy(&class_histogram),
            classes_covered: class_histogram.iter().filter(|&&c| c > 0).count(),
            class_histogram,
            fid: frechet_distance(&GaussianStats::from_tensor(features)?, reference)?,
        })
    }
}

/// The samples' numbers next to those of real held-out images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recognisability {
    /// The threshold on the largest class probability.
    pub confidence: f64,
    /// What the FID is computed in ([`FID_FEATURES`]).
    pub fid_features: String,
    /// Test-split images the FID reference statistics come from.
    pub reference_images: usize,
    /// Images in the test split.
    pub test_split_images: usize,
    /// Class names, in label order.
    pub class_names: Vec<String>,
    /// The samples' numbers.
    pub samples: ImageScores,
    /// The same numbers for real test images disjoint from the reference: what real images
    /// score.
    pub real_floor: ImageScores,
}

impl Recognisability {
    /// The numbers as a small table, samples next to the real floor, each line indented by
    /// `indent`.
    pub fn to_table(&self, indent: &str) -> String {
        let (s, r) = (&self.samples, &self.real_floor);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12} {:>12}",
            "", "samples", "real floor"
        );
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12} {:>12}",
            "images", s.images, r.images
        );
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>11.1}% {:>11.1}%",
            format!("recognisable (confidence >= {})", self.confidence),
            100.0 * s.recognisable,
            100.0 * r.recognisable
        );
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12.3} {:>12.3}",
            "mean confidence", s.mean_confidence, r.mean_confidence
        );
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12.3} {:>12.3}",
            "class entropy (normalised)", s.class_entropy, r.class_entropy
        );
        let k = self.class_names.len();
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12} {:>12}",
            "classes covered",
            format!("{}/{k}", s.classes_covered),
            format!("{}/{k}", r.classes_covered)
        );
        let _ = writeln!(
            t,
            "{indent}{:<34} {:>12.3} {:>12.3}",
            format!("FID ({})", self.fid_features),
            s.fid,
            r.fid
        );
        let hist = |h: &[usize]| {
            h.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            t,
            "{indent}class histogram ({}):",
            self.class_names.join(" ")
        );
        let _ = writeln!(t, "{indent}  samples    {}", hist(&s.class_histogram));
        let _ = writeln!(t, "{indent}  real floor {}", hist(&r.class_histogram));
        let _ = write!(
            t,
            "{indent}FID reference: {} test images; real floor: {} other test images (of {})",
            self.reference_images, r.images, self.test_split_images
        );
        t
    }
}

/// Features and class probabilities of images, flattened to `f64` rows.
struct Embedded {
    features: Tensor,
    probs: Vec<f64>,
}

fn embed(classifier: &Classifier, images: &Tensor, batch_size: usize) -> Result<Embedded> {
    let (features, probs) = classifier.embed(images, batch_size)?;
    Ok(Embedded {
        features,
        probs: probs.flatten_all()?.to_vec1::<f64>()?,
    })
}

/// The reference images and the real floor of `samples` images, as [`held_out_split`] picks them
/// from `test` (seed `seed ^ SUBSET_DOMAIN`): `(reference, floor)` tensors on the CPU.
pub fn reference_and_floor(test: &Dataset, samples: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let (r, f) = held_out_split(test.len(), samples, seed ^ SUBSET_DOMAIN);
    if r.len() < 2 || f.len() < 2 {
        return Err(TrainError::Other(format!(
            "the test split of {} has {} images: the FID reference and the real floor need at \
             least 2 each (4 in all)",
            test.name(),
            test.len()
        )));
    }
    Ok((
        image_batch(test, &r, &Device::Cpu)?,
        image_batch(test, &f, &Device::Cpu)?,
    ))
}

/// Scores `samples` (`(n, c, s, s)` in [-1, 1]) and the real floor against the reference, both
/// tensors as [`reference_and_floor`] returns them, with `classifier` and `threshold`.
pub fn recognisability(
    classifier: &Classifier,
    samples: &Tensor,
    reference: &Tensor,
    floor: &Tensor,
    test: &Dataset,
    threshold: f64,
    batch_size: usize,
) -> Result<Recognisability> {
    check_confidence(threshold)?;
    let k = classifier.config().num_classes;
    if test.num_classes() != k {
        return Err(TrainError::Other(format!(
            "the classifier knows {k} classes but {} has {}",
            test.name(),
            test.num_classes()
        )));
    }
    let reference_stats =
        GaussianStats::from_tensor(&embed(classifier, reference, batch_size)?.features)?;
    let s = embed(classifier, samples, batch_size)?;
    let f = embed(classifier, floor, batch_size)?;
    Ok(Recognisability {
        confidence: threshold,
        fid_features: FID_FEATURES.to_string(),
        reference_images: reference.dim(0)?,
        test_split_images: test.len(),
        class_names: test.class_names().to_vec(),
        samples: ImageScores::new(&s.probs, k, &s.features, &reference_stats, threshold)?,
        real_floor: ImageScores::new(&f.probs, k, &f.features, &reference_stats, threshold)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_top_1_classes() {
        let probs = [
            0.7, 0.2, 0.1, // 0
            0.1, 0.1, 0.8, // 2
            0.4, 0.4, 0.2, // tie: the first, 0
            0.05, 0.9, 0.05, // 1
        ];
        assert_eq!(class_histogram(&probs, 3), vec![2, 1, 1]);
        assert_eq!(class_histogram(&[], 3), vec![0, 0, 0]);
    }

    #[test]
    fn normalised_entropy_is_the_closed_form() {
        // Uniform: 1. One class: 0. Empty: 0.
        assert!((normalised_entropy(&[5, 5, 5, 5]) - 1.0).abs() < 1e-15);
        assert_eq!(normalised_entropy(&[0, 9, 0]), 0.0);
        assert_eq!(normalised_entropy(&[0, 0]), 0.0);
        // Frequencies (1/2, 1/4, 1/4, 0): entropy 1.5 ln 2, over ln 4 = 2 ln 2: 0.75 exactly.
        assert!((normalised_entropy(&[2, 1, 1, 0]) - 0.75).abs() < 1e-15);
        // (3/4, 1/4) of 2 classes: -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2 = 0.811278124459...
        assert!((normalised_entropy(&[3, 1]) - 0.811_278_124_459_132_9).abs() < 1e-12);
        // Half in one of ten classes, the rest spread evenly over the nine others:
        // (0.5 ln 2 + 0.5 ln 18) / ln 10 = 0.5 ln 36 / ln 10.
        let want = 0.5 * 36f64.ln() / 10f64.ln();
        let got = normalised_entropy(&[9, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn recognisable_means_confidence_at_least_the_threshold() {
        let probs = [
            0.95, 0.05, // sure
            0.9, 0.1, // exactly the threshold: counts
            0.6, 0.4, // unsure
            0.02, 0.98, // sure
            0.5, 0.5, // unsure
        ];
        let c = confidences(&probs, 2);
        assert_eq!(c, vec![0.95, 0.9, 0.6, 0.98, 0.5]);
        assert_eq!(recognisable_count(&c, 0.9), 3);
        assert_eq!(recognisable_count(&c, 0.5), 5);
        assert_eq!(recognisable_count(&c, 1.0), 0);
        assert!(check_confidence(0.9).is_ok() && check_confidence(1.0).is_ok());
        assert!(check_confidence(0.0).is_err() && check_confidence(1.5).is_err());
        assert!(check_confidence(f64::NAN).is_err());
    }

    #[test]
    fn image_scores_gather_the_numbers() {
        // Four images of 2 classes, features 2-dimensional; the reference is their own
        // statistics, so the FID is 0.
        let probs = [0.99, 0.01, 0.2, 0.8, 0.95, 0.05, 0.55, 0.45];
        let features = Tensor::new(
            &[[0f64, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, 3.0]],
            &Device::Cpu,
        )
        .expect("f");
        let reference = GaussianStats::from_tensor(&features).expect("stats");
        let s = ImageScores::new(&probs, 2, &features, &reference, 0.9).expect("scores");
        assert_eq!(s.images, 4);
        assert_eq!(s.recognisable_count, 2);
        assert_eq!(s.recognisable, 0.5);
        assert!((s.mean_confidence - (0.99 + 0.8 + 0.95 + 0.55) / 4.0).abs() < 1e-15);
        assert_eq!(s.class_histogram, vec![3, 1]);
        assert!((s.class_entropy - normalised_entropy(&[3, 1])).abs() < 1e-15);
        assert_eq!(s.classes_covered, 2);
        assert!(s.fid < 1e-12, "{}", s.fid);
        let one = Tensor::new(&[[0f64, 1.0]], &Device::Cpu).expect("f");
        assert!(ImageScores::new(&probs[..2], 2, &one, &reference, 0.9).is_err());
    }

    #[test]
    fn reference_and_floor_are_disjoint_and_sized() {
        for (len, n) in [
            (2000, 1000),
            (2000, 64),
            (100, 16),
            (100, 80),
            (10, 1000),
            (5, 3),
        ] {
            let (r, f) = held_out_split(len, n, 7);
            assert_eq!(f.len(), n.min(len / 2), "{len} {n}");
            assert_eq!(r.len(), n.min(len - f.len()), "{len} {n}");
            let mut all: Vec<usize> = r.iter().chain(&f).copied().collect();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), r.len() + f.len(), "overlap at {len} {n}");
            assert!(all.iter().all(|&i| i < len));
        }
        // The reference is the first R of the same permutation `subset` draws: the reference
        // images of the sample quality are unchanged by the floor.
        let (r, _) = held_out_split(2000, 256, 3);
        assert_eq!(r, super::super::subset(2000, 256, 3));
        assert_eq!(held_out_split(2000, 256, 3), held_out_split(2000, 256, 3));
    }
}
