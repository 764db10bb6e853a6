//! Datasets for DDPM training: MNIST, CIFAR-10, Flowers and plain image folders.
//!
//! This crate owns reading image data from disk, transforming it and batching it into candle
//! tensors. It knows nothing about noise schedules, models or training.
//!
//! Placeholder: filled by the datasets issue.
