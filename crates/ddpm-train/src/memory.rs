//! The memory a training run needs, estimated before its data are decoded or its model built, so
//! that a run that cannot fit is refused at once rather than killed after minutes of decoding.
//!
//! Two parts dominate at large image sizes: the decoded data cache (every training image as
//! `channels x size x size` bytes) and the activations one micro-batch keeps for the backward
//! pass (a lower bound from the model's layout, see
//! [`ModelConfig::activation_values_per_image`](ddpm_unet::ModelConfig::activation_values_per_image)).
//! A third dominates for very wide models: the parameters' training state (weights, gradients,
//! EMA and AdamW's moments). The caller compares them with the memory it has (this crate reads
//! no system state).

use ddpm_data::{cifar, folder, mnist, DatasetSpec};
use ddpm_unet::flops::forward_flops;

use crate::{Result, TrainConfig, TrainError};

/// What a run's largest buffers take, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Images of the training split, when they could be counted without decoding them (`None`:
    /// the data set is missing or unreadable, which opening it will report).
    pub images: Option<usize>,
    /// Image channels.
    pub channels: usize,
    /// Side of the square images the run trains on.
    pub image_size: usize,
    /// Images per micro-batch (`batch_size / grad_accum`).
    pub micro_batch: usize,
    /// The decoded data cache: images x channels x size^2 bytes (0 when not counted).
    pub data_cache_bytes: u64,
    /// A lower bound on the activations of one micro-batch's forward pass (kept for the backward
    /// pass), in the compute dtype.
    pub activation_bytes: u64,
    /// A lower bound on the model's parameters ([`ForwardFlops::weights`](ddpm_unet::flops::ForwardFlops::weights)).
    pub parameters: u64,
    /// The training state of those parameters: [`STATE_COPIES`] `f32` copies of each.
    pub state_bytes: u64,
}

/// The `f32` copies of every parameter a run keeps: the weights, their gradients, the EMA
/// weights and AdamW's two moments.
pub const STATE_COPIES: u64 = 5;

impl MemoryEstimate {
    /// The bytes the run needs in host memory: the data cache, plus the activations and the
    /// parameters' training state when the model runs on the CPU (on a GPU they take device
    /// memory instead).
    pub fn host_bytes(&self, model_on_cpu: bool) -> u64 {
        let model = if model_on_cpu {
            self.activation_bytes.saturating_add(self.state_bytes)
        } else {
            0
        };
        self.data_cache_bytes.saturating_add(model)
    }
}

/// Estimates what `config` needs, counting the training images from the data set's files (file
/// headers, sizes or names: nothing is decoded).
pub fn estimate(config: &TrainConfig) -> MemoryEstimate {
    let spec = &config.dataset;
    let image_size = config
        .data
        .image_size
        .or_else(|| spec.native_size())
        .unwrap_or(ddpm_data::transform::DEFAULT_IMAGE_SIZE);
    let channels = spec.channels();
    let images = count_training_images(config);
    let data_cache_bytes = images.map_or(0, |n| {
        (n as u64)
            .saturating_mul(channels as u64)
            .saturating_mul((image_size as u64).saturating_pow(2))
    });
    let micro_batch = config.batch_size / config.grad_accum.max(1);
    let mut model = config.model.clone();
    model.set_image_size(image_size);
    model.set_channels(channels);
    let dtype_bytes = config.precision.compute_dtype().size_in_bytes() as f64;
    let activations = model.activation_values_per_image() * micro_batch as f64 * dtype_bytes;
    let parameters = forward_flops(&model).weights;
    MemoryEstimate {
        images,
        channels,
        image_size,
        micro_batch,
        data_cache_bytes,
        // A float-to-integer `as` saturates: an absurd size stays an absurd number of bytes.
        activation_bytes: activations as u64,
        parameters,
        state_bytes: parameters.saturating_mul(4 * STATE_COPIES),
    }
}

/// The copies of every image of a training sample grid held at once: the sampled batches in
/// `f32` and their concatenation (the 8-bit grid is smaller than either), as `ddpm sample` counts.
pub const SAMPLE_GRID_COPIES: u64 = 2;

/// The host memory one sample grid written during training takes at least: `sample_num` images
/// of the run's channels and image size, [`SAMPLE_GRID_COPIES`] times in `f32`; 0 when the run
/// writes no grids (`sample_every = 0`).
pub fn sample_grid_bytes(config: &TrainConfig) -> u64 {
    if config.sample_every == 0 {
        return 0;
    }
    sample_grid_per_image(config).saturating_mul(config.sample_num as u64)
}

fn sample_grid_per_image(config: &TrainConfig) -> u64 {
    let side = config
        .data
        .image_size
        .or_else(|| config.dataset.native_size())
        .unwrap_or(ddpm_data::transform::DEFAULT_IMAGE_SIZE) as u64;
    (config.dataset.channels() as u64)
        .saturating_mul(side.saturating_mul(side))
        .saturating_mul(4 * SAMPLE_GRID_COPIES)
}

/// Refuses a `sample_num` whose grid cannot be held in `available` bytes, at the start of a run
/// or a resume rather than at the first grid (which would end in an abort after hours of
/// sampling); the error names `sample_num`, what the grid needs and how many images fit.
pub fn check_sample_grid(config: &TrainConfig, available: u64) -> Result<()> {
    let need = sample_grid_bytes(config);
    if need <= available {
        return Ok(());
    }
    let fits = available / sample_grid_per_image(config).max(1);
    Err(TrainError::Config(format!(
        "`sample_num` = {}: each sample grid written during training needs at least {} of \
         memory but {} is available; lower `sample_num` (at most about {fits} fit), or set \
         `sample_every = 0` to write no grids",
        config.sample_num,
        human_bytes(need),
        human_bytes(available),
    )))
}

/// The training split's image count, read from file headers (MNIST, Fashion-MNIST), file sizes
/// (CIFAR-10) or the folder listing; `None` when the files cannot be read.
fn count_training_images(config: &TrainConfig) -> Option<usize> {
    let dir = config.dataset.dir(&config.data.root);
    match &config.dataset {
        DatasetSpec::Mnist | DatasetSpec::FashionMnist => {
            let count = |stem: &str| -> Option<usize> {
                let file = mnist::find_file(&dir, stem)?;
                mnist::read_images(&file).ok().map(|i| i.count)
            };
            match count(mnist::TRAIN_IMAGES) {
                Some(n) => Some(n),
                // Only t10k: the training split is all but the held-out fifth.
                None => count(mnist::TEST_IMAGES).map(|n| n - n / mnist::HOLDOUT_FRACTION),
            }
        }
        DatasetSpec::Cifar10 => {
            let files = cifar::split_files(&dir.join(cifar::BATCH_DIR), ddpm_data::Split::Train);
            files.iter().try_fold(0usize, |n, f| {
                let len = std::fs::metadata(f).ok()?.len() as usize;
                Some(n + len / cifar::RECORD_LEN)
            })
        }
        DatasetSpec::Flowers | DatasetSpec::Folder(_) => {
            let index = folder::scan(&dir).ok()?;
            Some(index.split_counts(config.data.test_fraction).0)
        }
        // Counted when its parquet files are read.
        DatasetSpec::Hub(_) => None,
    }
}

/// Bytes as a short human-readable amount ("6.7 GB", "812 MB").
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    for (unit, scale) in [
        ("PB", 1e15),
        ("TB", 1e12),
        ("GB", 1e9),
        ("MB", 1e6),
        ("kB", 1e3),
    ] {
        if b >= scale {
            return format!("{:.1} {unit}", b / scale);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_data::DataConfig;

    /// A folder of `n` tiny PNGs, one class.
    fn folder_of(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let class = dir.path().join("imgs/a");
        std::fs::create_dir_all(&class).expect("class dir");
        for i in 0..n {
            image::RgbImage::new(2, 2)
                .save(class.join(format!("{i:03}.png")))
                .expect("png written");
        }
        dir
    }

    #[test]
    fn the_data_cache_is_images_times_channels_times_area() {
        let dir = folder_of(20);
        let config = TrainConfig {
            dataset: DatasetSpec::Folder(dir.path().join("imgs")),
            data: DataConfig {
                image_size: Some(4096),
                test_fraction: 0.0,
                ..DataConfig::default()
            },
            batch_size: 8,
            grad_accum: 2,
            ..TrainConfig::default()
        };
        let e = estimate(&config);
        assert_eq!(e.images, Some(20));
        assert_eq!((e.channels, e.image_size, e.micro_batch), (3, 4096, 4));
        assert_eq!(e.data_cache_bytes, 20 * 3 * 4096 * 4096);
        // The MNIST preset's middle attention alone at 1024x1024 pixels: 4 heads x (1024^2)^2
        // values per image, f32, 4 images.
        let attention = 4.0 * (1024f64 * 1024.0).powi(2) * 4.0 * 4.0;
        assert!(e.activation_bytes as f64 >= attention, "{e:?}");
        assert!(e.host_bytes(true) > e.host_bytes(false));
        assert_eq!(e.host_bytes(false), e.data_cache_bytes);
    }

    #[test]
    fn the_default_run_is_small_and_a_missing_data_set_is_not_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = TrainConfig {
            data: DataConfig::with_root(dir.path()),
            ..TrainConfig::default()
        };
        let e = estimate(&config);
        assert_eq!((e.images, e.data_cache_bytes), (None, 0));
        // 32 MNIST images through the 28x28 preset: well under a gigabyte.
        assert!(
            e.activation_bytes > 0 && e.activation_bytes < 1 << 30,
            "{e:?}"
        );
        assert_eq!(human_bytes(6_710_886_400), "6.7 GB");
        assert_eq!(human_bytes(512), "512 B");
    }
}
