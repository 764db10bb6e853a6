//! Noise-prediction U-Nets for denoising diffusion models.
//!
//! Two architectures, both configurable through serde structs readable from TOML:
//! - [`Unet`]: the lucidrains / "annotated diffusion" model (weight-standardized ResNet blocks
//!   with scale-shift time conditioning, linear attention at every level, full attention in the
//!   middle, optional self-conditioning);
//! - [`DdpmUnet`]: the DDPM paper's model (preset [`DdpmUnetConfig::cifar10`] has the paper's
//!   35.7M parameters).
//!
//! [`DiffusionModel`] owns either network with its variables: deterministic seeded init,
//! safetensors save/load with the config in the file's metadata, and input checks. The hot
//! operations all go through [`ops`], the one place to swap in faster kernels.
//!
//! Which implementation each hot op uses is a [`KernelPolicy`], a value the caller gives the
//! model ([`DiffusionModel::with_kernel_policy`]; every forward pass runs under it) or installs
//! for the process (the `ddpm` binary builds it from the run's config and its environment); this
//! crate reads no environment variables.
//!
//! This crate knows nothing about noise schedules, datasets or training loops; the kernels it
//! calls through [`ops`] live in the `ddpm-kernels` crate below it (re-exported as [`kernels`]).
//!
//! # Tensor names
//! Names follow the PyTorch module trees of the reference models, so a weights file maps one to
//! one onto them: for [`Unet`] `init_conv.weight`, `time_mlp.1.weight`,
//! `downs.0.0.block1.proj.weight`, `downs.0.2.fn.fn.to_qkv.weight`, `mid_attn.fn.norm.weight`,
//! `ups.0.3.1.weight`, `final_conv.bias`, ...; for [`DdpmUnet`] `temb.dense.0.weight`,
//! `conv_in.weight`, `down.0.block.0.norm1.weight`, `down.1.attn.0.q.weight`,
//! `down.0.downsample.conv.weight`, `mid.attn_1.proj_out.bias`, `up.3.upsample.conv.weight`,
//! `norm_out.weight`, `conv_out.bias`, ... `docs/tensor-names.md` lists every name of the presets.
//!
//! # Example
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_unet::{DiffusionModel, ModelConfig};
//!
//! let config = ModelConfig::preset("mnist-small")?;
//! let model = DiffusionModel::new(&config, 0, &Device::Cpu, DType::F32)?;
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! let t = Tensor::new(&[10u32, 500], &Device::Cpu)?;
//! let eps = model.forward(&x, &t)?;
//! assert_eq!(eps.dims(), &[2, 1, 28, 28]);
//! # Ok::<(), ddpm_unet::UnetError>(())
//! ```
#![warn(missing_docs)]

pub mod attention;
pub mod ddpm_unet;
pub mod diffusers;
pub mod embedding;
pub mod flops;
pub mod init;
pub mod layers;
pub mod model;
pub mod ops;
pub mod resample;
pub mod resnet;
pub mod unet;
pub mod weights;

use std::path::PathBuf;

/// The candle-core this crate is built on: use it for the tensors and devices passed in and out,
/// so that no version has to be matched by hand.
pub use candle_core;
/// The candle-nn this crate is built on (`VarBuilder`, `VarMap`).
pub use candle_nn;
/// Our kernels (the `ddpm-kernels` crate), which [`ops`] chooses between.
pub use ddpm_kernels as kernels;
/// Which implementation each op uses (from `ddpm-kernels`).
pub use ddpm_kernels::policy;
pub use ddpm_kernels::KernelPolicy;
pub use ddpm_unet::{DdpmUnet, DdpmUnetConfig};
pub use model::{DiffusionModel, ModelConfig, PRESETS};
pub use unet::{Unet, UnetConfig};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// A config field has a value the model cannot be built with.
    #[error("invalid model config: `{field}`: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Why it is wrong and what would work.
        reason: String,
    },
    /// No preset has this name.
    #[error("unknown model preset `{name}`; known presets: {known}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names.
        known: String,
    },
    /// Class labels that do not fit the model.
    #[error("bad class labels: {reason}")]
    BadLabels {
        /// What is wrong and what the model takes.
        reason: String,
    },
    /// The input tensors do not fit the model.
    #[error(
        "model input has shape {found:?} with timesteps {t_found:?}, but the model expects \
         (batch, {channels}, {size}, {size}) and timesteps (batch,)"
    )]
    BadInput {
        /// Shape of the image input.
        found: Vec<usize>,
        /// Shape of the timestep input.
        t_found: Vec<usize>,
        /// Channels the model expects.
        channels: usize,
        /// Image size the model expects.
        size: usize,
    },
    /// A weights file cannot be read, written or understood.
    #[error("weights file {path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A weights file lacks a tensor the model needs.
    #[error(
        "weights file {path} does not match this model: it has no tensor `{name}` (shape \
         {expected:?} in the model); was it saved from another model config?"
    )]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The first missing tensor.
        name: String,
        /// Its shape in the model.
        expected: Vec<usize>,
    },
    /// A weights file holds a tensor of another shape.
    #[error(
        "weights file {path} does not match this model: tensor `{name}` has shape {found:?} \
         in the file but {expected:?} in the model; was it saved from another model config?"
    )]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The first mismatching tensor.
        name: String,
        /// Its shape in the model.
        expected: Vec<usize>,
        /// Its shape in the file.
        found: Vec<usize>,
    },
    /// A weights file holds a parameter as integers or booleans, which no float model stores.
    #[error(
        "weights file {path} is not a float model's: tensor `{name}` is stored as {found:?}, \
         where a model's parameters are floating point (F32, F16, BF16 or F64); the file is \
         damaged or not model weights"
    )]
    NotFloat {
        /// The file.
        path: PathBuf,
        /// The first such tensor.
        name: String,
        /// Its dtype in the file.
        found: candle_core::DType,
    },
    /// A weights file holds a tensor the model does not have.
    #[error(
        "weights file {path} does not match this model: it has tensor `{name}`, which the \
         model does not; was it saved from another model config?"
    )]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The first unexpected tensor.
        name: String,
    },
    /// A diffusers model directory or `config.json` asks for something this crate cannot load.
    #[error("{path}: `{field}` = {value}: {reason}")]
    DiffusersConfig {
        /// The file or directory.
        path: PathBuf,
        /// The field at fault, as diffusers names it.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// Why it cannot be loaded.
        reason: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
