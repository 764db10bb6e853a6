//! Datasets for DDPM training: MNIST, CIFAR-10, Flowers and plain image folders.
//!
//! This crate owns getting image data from disk into batches of candle tensors: the readers of
//! the canonical formats ([`mnist`] IDX, [`cifar`] binary batches, [`folder`] image folders), the
//! [`transform`]s (to [0, 1], center crop, bicubic antialiased resize, random horizontal flip, to
//! [-1, 1], and back to `u8`), the in-memory [`Dataset`], the seeded, resumable, multi-threaded
//! [`Loader`], PNG grids for samples ([`image_io`]), and fetching the data sets ([`mod@fetch`]). It
//! knows nothing about noise schedules, models or training.
//!
//! Every problem with a file is a [`DataError`] naming the file; nothing panics on bad bytes.
//!
//! ```
//! use ddpm_data::{Dataset, Loader, LoaderPosition};
//! # fn main() -> ddpm_data::Result<()> {
//! // Real code opens a data set from disk:
//! //   Dataset::open(&"flowers".parse()?, &DataConfig::default(), Split::Train)?
//! // Here: eight 1-channel 2x2 images with labels 0 and 1.
//! let pixels: Vec<u8> = (0..32).collect();
//! let labels = vec![0, 1, 0, 1, 0, 1, 0, 1];
//! let dataset = Dataset::from_u8(1, 2, pixels, labels, vec!["a".into(), "b".into()])?;
//!
//! let mut loader = Loader::new(dataset, 4, 42, true, 1)?;
//! let batch = loader.next_batch()?;
//! assert_eq!(batch.images.dims(), &[4, 1, 2, 2]); // f32 in [-1, 1]
//! assert_eq!(batch.labels.dims(), &[4]);
//!
//! // Save the position with a checkpoint; a loader that seeks to it continues identically.
//! let saved: LoaderPosition = loader.position();
//! let next = loader.next_batch()?;
//! loader.seek(saved)?;
//! assert_eq!(loader.next_batch()?.indices, next.indices);
//!
//! // Sampled images (in [-1, 1]) are saved as a PNG grid.
//! let path = std::env::temp_dir().join("ddpm-data-doc-grid.png");
//! ddpm_data::save_image_grid(&batch.images, 2, &path)?;
//! # std::fs::remove_file(path).ok();
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod cifar;
pub mod dataset;
pub mod error;
pub mod fetch;
pub mod folder;
pub mod hub;
pub mod hub_dataset;
pub mod image_io;
pub mod loader;
pub mod mnist;
mod regular;
pub mod spec;
pub mod transform;

/// The candle-core this crate is built on: use it for the tensors and devices passed in and out,
/// so that no version has to be matched by hand.
pub use candle_core;
pub use dataset::Dataset;
pub use error::{DataError, Result};
pub use fetch::{fetch, FetchOptions, FetchOutcome, FetchReport, Source};
pub use image_io::{save_image, save_image_grid};
pub use loader::{Batch, Loader, LoaderPosition};
pub use spec::{DataConfig, DatasetSpec, Split};
