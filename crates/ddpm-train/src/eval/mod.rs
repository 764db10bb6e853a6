//! Evaluation of a trained model, offline and with no downloaded network: the negative
//! variational bound in bits/dim on a data set ([`nll`]), and sample quality measured in the
//! feature space of a small classifier the tool trains itself ([`classifier`]): a Fréchet
//! distance and an Inception-Score-style score ([`fid`]), the class histogram of the samples and
//! a memorization check against the training images ([`memorization`]), all gathered by
//! [`quality`] into an [`EvalReport`]; the share of samples the classifier recognises, their
//! class histogram and its entropy, next to real held-out images ([`recognisable`]), also for
//! samples read from files ([`samples`], a [`SamplesReport`]). `docs/quality.md` says how each
//! number is computed.

pub mod classifier;
pub mod fid;
pub mod inception;
pub mod memorization;
pub mod nll;
pub mod quality;
pub mod recognisable;
pub mod report;
pub mod samples;

use ddpm_data::Dataset;
use ddpm_unet::DiffusionModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use classifier::{Classifier, ClassifierConfig, ClassifierTraining, LoadedClassifier};
pub use nll::{variational_bound, NllOptions, NllReport};
pub use quality::{sample_quality, QualityOptions, QualityReport};
pub use recognisable::Recognisability;
pub use report::{EvalReport, ListedBetas, SamplesReport};
pub use samples::{load_samples, LoadedSamples, SampleLoadOptions};

use crate::{Result, TrainError};

/// Errors unless `dataset`'s images have the model's channels and size.
pub fn check_compatible(model: &DiffusionModel, dataset: &Dataset) -> Result<()> {
    let cfg = model.config();
    let (c, s) = (cfg.channels(), cfg.image_size());
    if dataset.channels() != c || dataset.image_size() != s {
        return Err(TrainError::Other(format!(
            "data set {} has {}-channel {}x{} images, but the model takes {c}-channel {s}x{s} \
             images: evaluate it on data of its own size and channels",
            dataset.name(),
            dataset.channels(),
            dataset.image_size(),
            dataset.image_size(),
        )));
    }
    Ok(())
}

/// `n` distinct indices of `0..len` (all of them when `n >= len`), the first `n` of a
/// permutation seeded by `seed`: a fixed, class-balanced-in-expectation subset even of data sets
/// stored sorted by class.
pub fn subset(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order.truncate(n.min(len));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_seeded_and_distinct() {
        let a = subset(100, 10, 3);
        assert_eq!(a, subset(100, 10, 3));
        assert_ne!(a, subset(100, 10, 4));
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 10);
        assert_eq!(subset(5, 10, 0).len(), 5);
    }
}
