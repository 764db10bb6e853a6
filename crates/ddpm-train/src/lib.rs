//! Training and sampling for DDPM: the training loop, optimizer, EMA, checkpoints and evaluation.
//!
//! This crate wires a schedule, a U-Net and a dataset together. It knows nothing about
//! command-line flags.
//!
//! Placeholder: filled by the training issue.
