//! The memorization check: how many samples lie closer to a training image than unseen test
//! images typically do.
//!
//! Distances are Euclidean over all pixel values of an image in [-1, 1] (`c * h * w` of them).
//! The threshold is `ratio` times the median distance from a test image to its nearest training
//! image: a sample closer than that to some training image is flagged as a likely copy. The same
//! threshold applied to the test images themselves gives the fraction a model that never copies
//! would still score (near-duplicates inside the data set).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_data::{image_io, Dataset};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_png_atomic;
use crate::{Result, TrainError};

/// The nearest reference image of a query and its distance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    /// Index of the reference image.
    pub index: usize,
    /// Euclidean distance over all pixel values in [-1, 1].
    pub distance: f64,
}

/// Reference images compared per matrix product.
const CHUNK: usize = 2048;

fn rows_f64(images: &Tensor) -> Result<(Vec<f64>, usize)> {
    let n = images.dim(0)?;
    let v = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let d = v.len() / n.max(1);
    Ok((v, d))
}

/// For each image of `queries` `(n, c, h, w)` in [-1, 1], its nearest image of `reference`: a
/// search by matrix products in f32 over chunks of the reference set, then the winner's
/// distance recomputed exactly in f64.
pub fn nearest_neighbours(queries: &Tensor, reference: &Dataset) -> Result<Vec<Neighbour>> {
    let n = queries.dim(0)?;
    if reference.is_empty() {
        return Err(TrainError::Other(format!(
            "no reference image to compare with in {}",
            reference.name()
        )));
    }
    let q = queries
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_from(1)?;
    if q.dim(1)? != reference.channels() * reference.image_size() * reference.image_size() {
        return Err(TrainError::Other(format!(
            "images of shape {:?} cannot be compared with the images of {}",
            queries.dims(),
            reference.name()
        )));
    }
    let q2 = q.sqr()?.sum_keepdim(1)?;
    let mut best = vec![(f32::INFINITY, 0usize); n];
    let mut start = 0;
    while start < reference.len() {
        let idx: Vec<usize> = (start..(start + CHUNK).min(reference.len())).collect();
        let c = super::nll::image_batch(reference, &idx, &Device::Cpu)?.flatten_from(1)?;
        let c2 = c.sqr()?.sum_keepdim(1)?.t()?;
        let d2 = q2
            .broadcast_add(&c2)?
            .sub(&(q.matmul(&c.t()?)? * 2.0)?)?
            .to_vec2::<f32>()?;
        for (row, b) in d2.iter().zip(best.iter_mut()) {
            for (j, &v) in row.iter().enumerate() {
                if v < b.0 {
                    *b = (v, idx[j]);
                }
            }
        }
        start += idx.len();
    }
    let (qv, d) = rows_f64(queries)?;
    best.iter()
        .enumerate()
        .map(|(i, &(_, index))| {
            let r = reference.image(index)?;
            let dist2: f64 = qv[i * d..(i + 1) * d]
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - f64::from(*b)).powi(2))
                .sum();
            Ok(Neighbour {
                index,
                distance: dist2.sqrt(),
            })
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// How to run the check.
#[derive(Debug, Clone)]
pub struct MemorizationOptions {
    /// The threshold as a multiple of the median test-to-train nearest-neighbour distance.
    pub ratio: f64,
    /// How many of the closest sample/training pairs to report and draw.
    pub pairs: usize,
    /// Where to draw them (PNG, each sample left of its nearest training image).
    pub png: Option<PathBuf>,
}

impl Default for MemorizationOptions {
    fn default() -> Self {
        Self {
            ratio: 0.5,
            pairs: 16,
            png: None,
        }
    }
}

/// A sample and its nearest training image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosePair {
    /// Index of the sample.
    pub sample: usize,
    /// Index of the training image.
    pub train_index: usize,
    /// Their distance.
    pub distance: f64,
}

/// The result of the memorization check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemorizationReport {
    /// Training images searched.
    pub train_images: usize,
    /// Samples checked.
    pub samples: usize,
    /// Test images that set the threshold.
    pub test_images: usize,
    /// The threshold's multiple of `median_test_distance`.
    pub ratio: f64,
    /// Median distance from a test image to its nearest training image.
    pub median_test_distance: f64,
    /// `ratio * median_test_distance`.
    pub threshold: f64,
    /// Median distance from a sample to its nearest training image.
    pub median_sample_distance: f64,
    /// Smallest such distance.
    pub min_sample_distance: f64,
    /// Samples closer than the threshold to a training image.
    pub flagged: usize,
    /// `flagged / samples`, in [0, 1].
    pub fraction: f64,
    /// The fraction of test images under the same threshold: the baseline of a model that never
    /// copies.
    pub test_fraction: f64,
    /// The closest pairs, closest first.
    pub closest: Vec<ClosePair>,
    /// The PNG of the closest pairs, if one was written.
    pub nearest_png: Option<String>,
}

/// Runs the check for `samples` against `train`, with the threshold set by `test_images` (all
/// `(n, c, h, w)` in [-1, 1]).
pub fn memorization(
    samples: &Tensor,
    test_images: &Tensor,
    train: &Dataset,
    opts: &MemorizationOptions,
) -> Result<MemorizationReport> {
    if !(opts.ratio > 0.0 && opts.ratio.is_finite()) {
        return Err(TrainError::Other(format!(
            "the memorization ratio must be positive, got {}",
            opts.ratio
        )));
    }
    let ns = samples.dim(0)?;
    let nt = test_images.dim(0)?;
    if ns == 0 || nt == 0 {
        return Err(TrainError::Other(
            "the memorization check needs at least one sample and one test image".into(),
        ));
    }
    let test_nn = nearest_neighbours(test_images, train)?;
    let sample_nn = nearest_neighbours(samples, train)?;
    let test_d: Vec<f64> = test_nn.iter().map(|n| n.distance).collect();
    let sample_d: Vec<f64> = sample_nn.iter().map(|n| n.distance).collect();
    let median_test_distance = median(&test_d);
    let threshold = opts.ratio * median_test_distance;
    let flagged = sample_d.iter().filter(|&&d| d < threshold).count();
    let test_flagged = test_d.iter().filter(|&&d| d < threshold).count();
    let mut order: Vec<usize> = (0..ns).collect();
    order.sort_by(|&a, &b| sample_d[a].total_cmp(&sample_d[b]));
    let closest: Vec<ClosePair> = order
        .iter()
        .take(opts.pairs)
        .map(|&i| ClosePair {
            sample: i,
            train_index: sample_nn[i].index,
            distance: sample_d[i],
        })
        .collect();
    let nearest_png = match &opts.png {
        Some(path) if !closest.is_empty() => {
            write_pairs(samples, train, &closest, path)?;
            Some(path.display().to_string())
        }
        _ => None,
    };
    Ok(MemorizationReport {
        train_images: train.len(),
        samples: ns,
        test_images: nt,
        ratio: opts.ratio,
        median_test_distance,
        threshold,
        median_sample_distance: median(&sample_d),
        min_sample_distance: sample_d.iter().cloned().fold(f64::INFINITY, f64::min),
        flagged,
        fraction: flagged as f64 / ns as f64,
        test_fraction: test_flagged as f64 / nt as f64,
        closest,
        nearest_png,
    })
}

/// Draws each pair as a sample followed by its nearest training image, four pairs per row.
fn write_pairs(samples: &Tensor, train: &Dataset, pairs: &[ClosePair], path: &Path) -> Result<()> {
    let mut images = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        images.push(
            samples
                .get(p.sample)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?,
        );
        images.push(train.image_tensor(p.train_index)?);
    }
    let grid = image_io::image_grid(&Tensor::stack(&images, 0)?, 8.min(images.len()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, "creating", e))?;
    }
    write_png_atomic(&grid, path).map_err(|e| TrainError::io(path, "writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_dataset(n: usize, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let pixels: Vec<u8> = (0..n * 3 * 4 * 4).map(|_| rng.random()).collect();
        Dataset::from_u8(3, 4, pixels, vec![0; n], vec!["x".into()]).expect("data")
    }

    fn images(ds: &Dataset, idx: &[usize]) -> Tensor {
        super::super::nll::image_batch(ds, idx, &Device::Cpu).expect("batch")
    }

    #[test]
    fn nearest_neighbours_are_exact() {
        let train = random_dataset(3000, 1);
        let q = images(&train, &[5, 2999, 2048]);
        let nn = nearest_neighbours(&q, &train).expect("nn");
        assert_eq!(
            nn.iter().map(|n| n.index).collect::<Vec<_>>(),
            vec![5, 2999, 2048]
        );
        assert!(nn.iter().all(|n| n.distance == 0.0));
        // A brute-force search in f64 agrees on fresh queries.
        let fresh = images(&random_dataset(4, 2), &[0, 1, 2, 3]);
        let nn = nearest_neighbours(&fresh, &train).expect("nn");
        let (qv, d) = rows_f64(&fresh).expect("rows");
        for (i, n) in nn.iter().enumerate() {
            let brute = (0..train.len())
                .map(|j| {
                    let r = train.image(j).expect("img");
                    let s: f64 = qv[i * d..(i + 1) * d]
                        .iter()
                        .zip(&r)
                        .map(|(a, b)| (a - f64::from(*b)).powi(2))
                        .sum();
                    s.sqrt()
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                (n.distance - brute).abs() < 1e-12,
                "{} vs {brute}",
                n.distance
            );
        }
    }

    #[test]
    fn copies_are_flagged_and_fresh_images_are_not() {
        let train = random_dataset(500, 3);
        let test = images(&random_dataset(40, 4), &(0..40).collect::<Vec<_>>());
        // 3 of 8 samples are copies of training images, the rest are new random images.
        let fresh = images(&random_dataset(5, 5), &[0, 1, 2, 3, 4]);
        let copies = images(&train, &[7, 70, 400]);
        let samples = Tensor::cat(&[&fresh, &copies], 0).expect("cat");
        let dir = tempfile::tempdir().expect("tmp");
        let png = dir.path().join("pairs.png");
        let r = memorization(
            &samples,
            &test,
            &train,
            &MemorizationOptions {
                ratio: 0.5,
                pairs: 4,
                png: Some(png.clone()),
            },
        )
        .expect("check");
        assert_eq!(r.flagged, 3);
        assert!((r.fraction - 3.0 / 8.0).abs() < 1e-15);
        assert_eq!(r.test_fraction, 0.0);
        assert_eq!(r.min_sample_distance, 0.0);
        assert!((r.threshold - 0.5 * r.median_test_distance).abs() < 1e-15);
        assert_eq!(r.closest.len(), 4);
        assert!(r.closest[..3]
            .iter()
            .all(|p| p.distance == 0.0 && p.sample >= 5));
        // 8 images of 4x4 in one row of a grid with 2-pixel padding.
        assert_eq!(
            image::image_dimensions(&png).expect("png"),
            (8 * 6 + 2, 6 + 2)
        );
        assert!(memorization(
            &samples,
            &test,
            &train,
            &MemorizationOptions {
                ratio: 0.0,
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
