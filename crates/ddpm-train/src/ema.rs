//! Exponential moving average of the weights, with a warm-up of the decay so that short runs
//! already have a usable EMA model.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use ddpm_kernels::optim::{self as kernels, EmaPair};
use ddpm_kernels::KernelPolicy;

use crate::Result;

/// The decay actually used at update number `step` (1-based):
/// `min(decay, (1 + step) / (10 + step))`, the warm-up of TensorFlow's `ExponentialMovingAverage`
/// with `num_updates`; it starts near 0.18 and approaches `decay`.
pub fn warmed_decay(decay: f64, step: usize) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// EMA copies of a set of variables (held in f32), updated as its [`KernelPolicy`] says (with
/// our kernels in place: [`ddpm_kernels::optim::ema`]).
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    kernels: KernelPolicy,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An EMA starting at the current values of `vars`, updated under `kernels` (the run's
    /// policy).
    pub fn new(vars: &BTreeMap<String, Var>, decay: f64, kernels: KernelPolicy) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            kernels,
            shadow,
        })
    }

    /// Moves the averages towards `vars` after optimizer step `step` (1-based).
    pub fn update(&mut self, vars: &BTreeMap<String, Var>, step: usize) -> Result<()> {
        let d = warmed_decay(self.decay, step);
        let mut pairs: Vec<EmaPair<'_>> = self
            .shadow
            .iter_mut()
            .filter_map(|(name, average)| {
                Some(EmaPair {
                    average,
                    value: vars.get(name)?.as_tensor(),
                })
            })
            .collect();
        kernels::ema(self.kernels, &mut pairs, d)?;
        Ok(())
    }

    /// The decay of update number `step` (1-based) and the averages by name, for an optimizer
    /// that moves them in its own pass over the weights ([`crate::optim::AdamW::step_scaled`]):
    /// each `average <- decay average + (1 - decay) value`, as [`Ema::update`] does.
    pub fn for_update(&mut self, step: usize) -> (f64, &mut BTreeMap<String, Tensor>) {
        (warmed_decay(self.decay, step), &mut self.shadow)
    }

    /// The averaged tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Replaces the averages (from a checkpoint). Each is copied, because the averages are
    /// updated in place and must not share memory with the caller's tensors.
    pub fn set_tensors(&mut self, tensors: BTreeMap<String, Tensor>) -> Result<()> {
        self.shadow = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn follows_the_closed_form_recursion() -> Result<()> {
        let var = Var::new(&[0.0f32], &Device::Cpu)?;
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let mut ema = Ema::new(&vars, 0.9, KernelPolicy::default())?;
        let mut expect = 0f64;
        for step in 1..=30 {
            var.set(&Tensor::new(&[step as f32], &Device::Cpu)?)?;
            ema.update(&vars, step)?;
            let d = 0.9f64.min((1.0 + step as f64) / (10.0 + step as f64));
            expect = d * expect + (1.0 - d) * step as f64;
        }
        let got = ema.tensors()["w"].to_vec1::<f32>()?[0] as f64;
        assert!((got - expect).abs() < 1e-4 * expect, "{got} vs {expect}");
        assert_eq!(warmed_decay(0.9999, 0), 0.1);
        assert_eq!(warmed_decay(0.5, 1000), 0.5);
        Ok(())
    }
}
