//! Mixed precision: `--precision f32|bf16|f16` and dynamic loss scaling for f16.
//!
//! The model's variables, the optimizer moments and the EMA stay in f32 (the master weights);
//! only the forward and backward passes run in the half type (see
//! [`ddpm_unet::DiffusionModel::with_compute_dtype`]). f16 has a narrow exponent range, so its
//! loss is multiplied by a scale before the backward pass and the gradients are divided by it
//! after; a step whose gradients overflow is skipped and the scale halved.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// The dtype the network computes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 compute with f32 master weights (no loss scaling needed).
    Bf16,
    /// float16 compute with f32 master weights and dynamic loss scaling.
    F16,
}

impl Precision {
    /// Parses `f32`, `bf16` or `f16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            other => Err(TrainError::Config(format!(
                "unknown precision `{other}`: use f32, bf16 or f16"
            ))),
        }
    }

    /// The dtype of the forward and backward passes.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name used in configs and flags.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Refuses half precision on the CPU: candle's CPU backend has no fast half-precision
    /// convolution and our CPU kernels are f32/f64, so it would be both slower and less exact.
    pub fn check_device(self, device: &Device) -> Result<()> {
        if self != Self::F32 && device.is_cpu() {
            return Err(TrainError::Config(format!(
                "--precision {} needs a CUDA device (--device cuda): on the CPU half precision \
                 is slower than f32 and less exact, so it is not supported there; use \
                 --precision f32",
                self.name()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dynamic loss scaling as in PyTorch's `GradScaler`: start at 2^16, halve on overflow (and skip
/// that step), double after `growth_interval` clean steps. Saved in checkpoints for exact resume.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub clean_steps: usize,
    /// Clean steps after which the scale doubles.
    pub growth_interval: usize,
    /// Steps skipped because of overflow, in total.
    pub skipped: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            clean_steps: 0,
            growth_interval: 2000,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// Records the outcome of a step whose unscaled gradient norm was `grad_norm`; returns
    /// whether the optimizer may apply the step (false on overflow).
    pub fn update(&mut self, grad_norm: f64) -> bool {
        if !grad_norm.is_finite() {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(2f64.powi(24));
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_refuses_half_on_cpu() {
        assert_eq!(Precision::parse("BF16").ok(), Some(Precision::Bf16));
        assert_eq!(Precision::parse("fp16").ok(), Some(Precision::F16));
        assert_eq!(Precision::parse("f32").ok(), Some(Precision::F32));
        assert!(Precision::parse("f8").is_err());
        assert!(Precision::F32.check_device(&Device::Cpu).is_ok());
        let e = Precision::Bf16
            .check_device(&Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--precision bf16 needs a CUDA device"), "{e}");
        assert_eq!(Precision::F16.compute_dtype(), DType::F16);
    }

    #[test]
    fn scaler_halves_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::default()
        };
        assert!(!s.update(f64::INFINITY));
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.skipped, 1);
        assert!(!s.update(f64::NAN));
        assert_eq!(s.scale, 16384.0);
        for _ in 0..3 {
            assert!(s.update(1.5));
        }
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.clean_steps, 0);
        let toml = toml::to_string(&s).unwrap_or_default();
        assert_eq!(toml::from_str::<LossScaler>(&toml).ok(), Some(s));
    }
}
