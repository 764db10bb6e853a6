//! Exponential moving average of the weights, with a warm-up of the decay so that short runs
//! already have a usable EMA model.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::inplace;
use crate::Result;

/// The decay actually used at update number `step` (1-based):
/// `min(decay, (1 + step) / (10 + step))`, the warm-up of TensorFlow's `ExponentialMovingAverage`
/// with `num_updates`; it starts near 0.18 and approaches `decay`.
pub fn warmed_decay(decay: f64, step: usize) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// EMA copies of a set of variables (held in f32). On the CPU they are updated in place
/// ([`crate::inplace`]).
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An EMA starting at the current values of `vars`.
    pub fn new(vars: &BTreeMap<String, Var>, decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F32)?.copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// Moves the averages towards `vars` after optimizer step `step` (1-based).
    pub fn update(&mut self, vars: &BTreeMap<String, Var>, step: usize) -> Result<()> {
        let d = warmed_decay(self.decay, step);
        // On CUDA, every average in one kernel launch.
        let pairs: Vec<[&Tensor; 2]> = vars
            .iter()
            .filter_map(|(name, var)| Some([self.shadow.get(name)?, var.as_tensor()]))
            .collect();
        if !pairs.is_empty() && pairs.iter().all(|pair| inplace::cuda_multi(pair)) {
            inplace::cuda_ema(&pairs, d)?;
            return Ok(());
        }
        for (name, var) in vars {
            if let Some(s) = self.shadow.get_mut(name) {
                if inplace::supported(&[s, var.as_tensor()]) {
                    inplace::ema_update(s, var.as_tensor(), d)?;
                    continue;
                }
                let p = var.as_tensor().to_dtype(DType::F32)?;
                // Detached: the average must not keep an autograd graph reaching back through
                // every earlier step (that would hold every old average in memory).
                *s = ((&*s * d)? + (p * (1.0 - d))?)?.detach();
            }
        }
        Ok(())
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
        let mut ema = Ema::new(&vars, 0.9)?;
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
