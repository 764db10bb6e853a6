//! A data set split in memory: images decoded once, at the target size, as `u8` (c, h, w).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::GrayImage;

use crate::error::{DataError, Result};
use crate::folder::{self, parallel_map};
use crate::spec::{DataConfig, DatasetSpec, Split};
use crate::transform::{self, DEFAULT_IMAGE_SIZE};
use crate::{cifar, mnist};

/// The largest image side accepted in a configuration.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// A split of a data set, decoded and resized in memory.
///
/// Open one with [`Dataset::open`]; batch it with [`crate::Loader`].
#[derive(Clone)]
pub struct Dataset {
    name: String,
    channels: usize,
    size: usize,
    pixels: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
    flip: bool,
    skipped: Vec<PathBuf>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pixels are left out: they are megabytes.
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("channels", &self.channels)
            .field("size", &self.size)
            .field("classes", &self.class_names)
            .field("flip", &self.flip)
            .field("skipped", &self.skipped.len())
            .finish()
    }
}

impl Dataset {
    /// Reads, checks, decodes and resizes a split of a data set.
    ///
    /// MNIST, Fashion-MNIST and CIFAR-10 are read from `cfg.root/mnist`,
    /// `cfg.root/fashion-mnist` and `cfg.root/cifar10`, Flowers from `cfg.root/flowers`, a
    /// folder from its own path, a Hub data set (`hf:`) from the Hub's cache, downloaded there
    /// with the [installed](crate::hub::installed) Hub options ([`crate::hub_dataset`]). Images
    /// are decoded in parallel (`cfg.threads`) and cached at
    /// `cfg.image_size` (default: MNIST and Fashion-MNIST 28, others 32).
    pub fn open(spec: &DatasetSpec, cfg: &DataConfig, split: Split) -> Result<Self> {
        Self::open_limited(spec, cfg, split, None)
    }

    /// Like [`Dataset::open`], but reads and decodes only the first `limit` images of the split
    /// (all of them when it has fewer): for a figure of a few images, without decoding the rest.
    /// For a Hub data set only the parquet files that hold them are downloaded, and class names
    /// taken from string labels are those of these images.
    pub fn open_first(
        spec: &DatasetSpec,
        cfg: &DataConfig,
        split: Split,
        limit: usize,
    ) -> Result<Self> {
        Self::open_limited(spec, cfg, split, Some(limit))
    }

    fn open_limited(
        spec: &DatasetSpec,
        cfg: &DataConfig,
        split: Split,
        limit: Option<usize>,
    ) -> Result<Self> {
        let size = match cfg.image_size {
            Some(s) if s == 0 || s > MAX_IMAGE_SIZE => {
                return Err(DataError::Config(format!(
                    "image_size {s} is outside 1..={MAX_IMAGE_SIZE}"
                )))
            }
            Some(s) => s,
            None => spec.native_size().unwrap_or(DEFAULT_IMAGE_SIZE),
        };
        let flip = cfg.flip.unwrap_or_else(|| spec.default_flip());
        let dir = spec.dir(&cfg.root);
        let threads = cfg.thread_count();
        let mut ds = match spec {
            DatasetSpec::Mnist | DatasetSpec::FashionMnist => {
                let (mut images, mut labels) = mnist::load_as(&dir, split, spec.name())?;
                if let Some(limit) = limit.filter(|&l| l < images.count) {
                    images.count = limit;
                    images.pixels.truncate(limit * images.rows * images.cols);
                    labels.truncate(limit);
                }
                let native = images.rows == images.cols && images.rows == size;
                let pixels = if native {
                    images.pixels
                } else {
                    let (w, h) = (images.cols as u32, images.rows as u32);
                    resize_all(&images.pixels, images.count, threads, |raw| {
                        let img = GrayImage::from_raw(w, h, raw.to_vec());
                        img.map(|img| transform::resize_square(&img, size as u32).into_raw())
                    })?
                };
                let class_names = match spec {
                    DatasetSpec::FashionMnist => mnist::FASHION_MNIST_CLASSES
                        .iter()
                        .map(|c| c.to_string())
                        .collect(),
                    _ => (0..mnist::NUM_CLASSES).map(|d| d.to_string()).collect(),
                };
                Dataset::from_u8(
                    1,
                    size,
                    pixels,
                    labels.into_iter().map(u32::from).collect(),
                    class_names,
                )?
            }
            DatasetSpec::Cifar10 => {
                let mut batch = cifar::load(&dir, split)?;
                if let Some(limit) = limit.filter(|&l| l < batch.len()) {
                    batch
                        .pixels
                        .truncate(limit * batch.pixels.len() / batch.len());
                    batch.labels.truncate(limit);
                }
                let pixels = if size == cifar::SIDE {
                    batch.pixels
                } else {
                    let side = cifar::SIDE as u32;
                    resize_all(&batch.pixels, batch.len(), threads, |raw| {
                        let img = transform::chw_to_rgb(raw, side, side)?;
                        Some(transform::rgb_to_chw(&transform::resize_square(
                            &img,
                            size as u32,
                        )))
                    })?
                };
                let class_names = cifar::CLASS_NAMES.iter().map(|s| s.to_string()).collect();
                Dataset::from_u8(
                    3,
                    size,
                    pixels,
                    batch.labels.into_iter().map(u32::from).collect(),
                    class_names,
                )?
            }
            DatasetSpec::Flowers | DatasetSpec::Folder(_) => {
                folder::check_test_fraction(cfg.test_fraction)?;
                let index = folder::scan(&dir)?;
                let (n_train, n_test) = index.split_counts(cfg.test_fraction);
                tracing::info!(
                    folder = %dir.display(),
                    classes = index.classes.len(),
                    train = n_train,
                    test = n_test,
                    test_fraction = cfg.test_fraction,
                    "image folder split: {n_train} training and {n_test} test images \
                     ({} of each class held out)",
                    cfg.test_fraction
                );
                if split == Split::Test && n_test == 0 {
                    return Err(DataError::EmptyTestSplit {
                        path: dir,
                        test_fraction: cfg.test_fraction,
                        images: index.files.len(),
                    });
                }
                let mut files = index.split_with(split, cfg.test_fraction);
                if let Some(limit) = limit {
                    files.truncate(limit);
                }
                let decoded = folder::decode_all(&files, size as u32, threads, cfg.skip_corrupt)?;
                if decoded.labels.is_empty() {
                    return Err(DataError::Empty {
                        path: dir,
                        reason: format!("no readable image in the {split} split"),
                    });
                }
                let mut ds =
                    Dataset::from_u8(3, size, decoded.pixels, decoded.labels, index.classes)?;
                ds.skipped = decoded.skipped;
                ds
            }
            DatasetSpec::Hub(hub) => {
                let options = crate::hub::installed();
                let images =
                    crate::hub_dataset::load_first(hub, cfg, split, size, &options, limit)?;
                let mut ds = Dataset::from_u8(
                    images.channels,
                    size,
                    images.pixels,
                    images.labels,
                    images.class_names,
                )?;
                ds.skipped = images.skipped;
                ds
            }
        };
        ds.name = format!("{spec} ({split})");
        ds.flip = flip;
        tracing::info!(
            dataset = %ds.name,
            images = ds.len(),
            size,
            flip,
            skipped = ds.skipped.len(),
            "opened data set"
        );
        Ok(ds)
    }

    /// Builds a data set from images already in memory: `channels` x `size` x `size` bytes per
    /// image, concatenated, and one label per image below `class_names.len()`. Flips are off.
    pub fn from_u8(
        channels: usize,
        size: usize,
        pixels: Vec<u8>,
        labels: Vec<u32>,
        class_names: Vec<String>,
    ) -> Result<Self> {
        if channels == 0 || size == 0 {
            return Err(DataError::Config(format!(
                "images of {channels} channels and side {size}"
            )));
        }
        if pixels.len() != labels.len() * channels * size * size {
            return Err(DataError::Config(format!(
                "{} labels of {channels}x{size}x{size} images need {} pixel bytes, got {}",
                labels.len(),
                labels.len() * channels * size * size,
                pixels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= class_names.len()) {
            return Err(DataError::Config(format!(
                "label {bad} but only {} class names",
                class_names.len()
            )));
        }
        Ok(Dataset {
            name: "in-memory".to_string(),
            channels,
            size,
            pixels,
            labels,
            class_names,
            flip: false,
            skipped: Vec::new(),
        })
    }

    /// Turns random horizontal flips (applied by the loader) on or off.
    pub fn with_flip(mut self, flip: bool) -> Self {
        self.flip = flip;
        self
    }

    /// A human-readable name such as `flowers (train)`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Channels per image: 1 for MNIST, 3 otherwise.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The side of the square images.
    pub fn image_size(&self) -> usize {
        self.size
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The class names, in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// All labels, in image order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Whether the loader applies random horizontal flips.
    pub fn flip(&self) -> bool {
        self.flip
    }

    /// The files skipped as unreadable when opening (only with `skip_corrupt`).
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// The number of files skipped as unreadable when opening.
    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }

    /// The bytes of one image: channels x size x size values, planar (c, h, w).
    pub fn image_u8(&self, i: usize) -> Result<&[u8]> {
        let len = self.image_len();
        self.pixels
            .get(i * len..(i + 1) * len)
            .filter(|_| i < self.len())
            .ok_or(DataError::IndexOutOfRange {
                index: i,
                len: self.len(),
            })
    }

    /// One image, transformed to `f32` in [-1, 1], (c, h, w) order, unflipped.
    pub fn image(&self, i: usize) -> Result<Vec<f32>> {
        let src = self.image_u8(i)?;
        let mut out = vec![0f32; src.len()];
        transform::write_signed_chw(src, self.size, false, &mut out);
        Ok(out)
    }

    /// One image as a (c, h, w) `f32` tensor in [-1, 1] on the CPU, unflipped.
    pub fn image_tensor(&self, i: usize) -> Result<Tensor> {
        let data = self.image(i)?;
        Ok(Tensor::from_vec(
            data,
            (self.channels, self.size, self.size),
            &Device::Cpu,
        )?)
    }

    /// The number of values in one image.
    pub(crate) fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }
}

/// Resizes `count` equal-sized raw images in parallel with `f`, concatenating the results.
fn resize_all<F>(pixels: &[u8], count: usize, threads: usize, f: F) -> Result<Vec<u8>>
where
    F: Fn(&[u8]) -> Option<Vec<u8>> + Sync,
{
    let len = pixels.len().checked_div(count).unwrap_or(0);
    let results = parallel_map(count, threads, true, |i| {
        f(&pixels[i * len..(i + 1) * len])
            .ok_or_else(|| DataError::Config(format!("image {i} has the wrong number of bytes")))
    });
    let mut out = Vec::new();
    for r in results {
        match r {
            Some(Ok(v)) => out.extend_from_slice(&v),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        let pixels = (0..n * 4).map(|v| (v * 10) as u8).collect();
        let labels = (0..n as u32).map(|i| i % 2).collect();
        Dataset::from_u8(1, 2, pixels, labels, vec!["even".into(), "odd".into()]).unwrap()
    }

    #[test]
    fn in_memory_data_sets_are_checked() {
        assert!(Dataset::from_u8(1, 2, vec![0; 7], vec![0, 0], vec!["a".into()]).is_err());
        assert!(Dataset::from_u8(1, 2, vec![0; 8], vec![0, 1], vec!["a".into()]).is_err());
        assert!(Dataset::from_u8(0, 2, vec![], vec![], vec![]).is_err());
        let ds = toy(3);
        assert_eq!(
            (ds.len(), ds.channels(), ds.image_size(), ds.num_classes()),
            (3, 1, 2, 2)
        );
        assert!(!ds.flip());
        assert!(ds.with_flip(true).flip());
    }

    #[test]
    fn images_come_out_in_signed_range() {
        let ds = toy(3);
        assert_eq!(ds.image_u8(1).unwrap(), &[40, 50, 60, 70]);
        let img = ds.image(1).unwrap();
        assert_eq!(
            img,
            [40u8, 50, 60, 70].map(transform::u8_to_signed).to_vec()
        );
        let t = ds.image_tensor(2).unwrap();
        assert_eq!(t.dims(), &[1, 2, 2]);
        assert!(matches!(
            ds.image(3),
            Err(DataError::IndexOutOfRange { index: 3, len: 3 })
        ));
    }

    #[test]
    fn folder_test_fractions_set_the_split_and_an_empty_test_split_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("pets");
        std::fs::create_dir(&folder).unwrap();
        for i in 0..12u8 {
            image::RgbImage::from_pixel(4, 4, image::Rgb([i, 0, 0]))
                .save(folder.join(format!("{i:02}.png")))
                .unwrap();
        }
        let spec = DatasetSpec::Folder(folder.clone());
        let cfg = |test_fraction| DataConfig {
            image_size: Some(4),
            threads: Some(1),
            test_fraction,
            ..DataConfig::default()
        };
        let train = Dataset::open(&spec, &cfg(0.1), Split::Train).unwrap();
        let test = Dataset::open(&spec, &cfg(0.1), Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (11, 1));
        assert_eq!(train.class_names(), &["pets".to_string()]);
        let test = Dataset::open(&spec, &cfg(0.5), Split::Test).unwrap();
        assert_eq!(test.len(), 6);
        let train = Dataset::open(&spec, &cfg(0.0), Split::Train).unwrap();
        assert_eq!(train.len(), 12);
        let err = Dataset::open(&spec, &cfg(0.0), Split::Test).unwrap_err();
        assert!(matches!(err, DataError::EmptyTestSplit { .. }), "{err}");
        assert!(err.to_string().contains("pets"), "{err}");
        let err = Dataset::open(&spec, &cfg(1.0), Split::Train).unwrap_err();
        assert!(err.to_string().contains("test_fraction 1"), "{err}");
    }

    /// `open_first` gives the first images of what `open` gives, decoded alike, and all of them
    /// when the split has fewer.
    #[test]
    fn the_first_images_of_a_split_are_those_of_the_whole_split() {
        let dir = tempfile::tempdir().unwrap();
        // CIFAR-10's layout: five training batches of 3 images, resized to 8x8.
        let batches = dir.path().join("cifar10").join(cifar::BATCH_DIR);
        std::fs::create_dir_all(&batches).unwrap();
        for (k, file) in cifar::split_files(&batches, Split::Train)
            .iter()
            .enumerate()
        {
            let labels: Vec<u8> = (0..3).map(|i| (k * 3 + i) as u8 % 10).collect();
            let pixels: Vec<u8> = (0..3 * 3 * 32 * 32)
                .map(|i| (i * 7 + k * 31) as u8)
                .collect();
            cifar::write_batch(file, &labels, &pixels).unwrap();
        }
        // A folder of 12 images.
        let folder = dir.path().join("pets");
        std::fs::create_dir(&folder).unwrap();
        for i in 0..12u8 {
            image::RgbImage::from_fn(6, 6, |x, y| image::Rgb([i, x as u8 * 40, y as u8 * 40]))
                .save(folder.join(format!("{i:02}.png")))
                .unwrap();
        }
        let cfg = DataConfig {
            root: dir.path().to_path_buf(),
            image_size: Some(8),
            threads: Some(2),
            test_fraction: 0.0,
            ..DataConfig::default()
        };
        for spec in [DatasetSpec::Cifar10, DatasetSpec::Folder(folder)] {
            let all = Dataset::open(&spec, &cfg, Split::Train).unwrap();
            assert!(all.len() >= 12, "{spec}: {}", all.len());
            for limit in [1, 4, 7] {
                let first = Dataset::open_first(&spec, &cfg, Split::Train, limit).unwrap();
                assert_eq!(first.len(), limit, "{spec}");
                for i in 0..limit {
                    assert_eq!(
                        first.image_u8(i).unwrap(),
                        all.image_u8(i).unwrap(),
                        "{spec} {i}"
                    );
                    assert_eq!(first.labels()[i], all.labels()[i], "{spec} {i}");
                }
            }
            let more = Dataset::open_first(&spec, &cfg, Split::Train, 1000).unwrap();
            assert_eq!(more.len(), all.len(), "{spec}");
        }
    }

    #[test]
    fn bad_image_sizes_are_rejected() {
        let cfg = DataConfig {
            image_size: Some(0),
            ..DataConfig::default()
        };
        assert!(matches!(
            Dataset::open(&DatasetSpec::Mnist, &cfg, Split::Train),
            Err(DataError::Config(_))
        ));
    }
}
