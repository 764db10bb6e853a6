//! Deterministic, seeded parameter initialization.
//!
//! candle's CPU random generator cannot be seeded, so [`SeededInit`] is a `VarBuilder` backend
//! that creates every variable from its own ChaCha8 stream keyed by `(seed, tensor name)`. The
//! values of a tensor therefore depend only on the seed and its name, not on the order in which
//! layers are built, and the same seed always gives the same model on every machine.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A `VarBuilder` backend that stores variables in a [`VarMap`] and initializes new ones from a
/// seeded RNG per tensor name.
#[derive(Clone)]
pub struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SeededInit {
    /// A backend that inserts the variables it creates into `varmap`.
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }

    /// The RNG of one tensor: the seed mixed with a stable 64-bit FNV-1a hash of its name.
    fn rng_for(&self, name: &str) -> ChaCha8Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ChaCha8Rng::seed_from_u64(self.seed ^ h.rotate_left(17))
    }

    fn values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f64> {
        let n = shape.elem_count();
        let mut rng = self.rng_for(name);
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f64> {
            (0..n)
                .map(|_| lo + (up - lo) * rng.random::<f64>())
                .collect()
        };
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    mean + std * z
                })
                .collect()
        };
        match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = match fan {
                    FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                    FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
                };
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` requested with shape {s:?} but exists with shape {:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.values(&s, name, h);
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("variable `{name}` is not initialized"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::var_builder::SimpleBackend;

    #[test]
    fn same_seed_and_name_give_same_values_regardless_of_order() -> Result<()> {
        let dev = Device::Cpu;
        let init = Init::Uniform { lo: -1.0, up: 1.0 };
        let a = SeededInit::new(VarMap::new(), 7);
        let a1 = a.get((3, 4).into(), "x.weight", init, DType::F32, &dev)?;
        let a2 = a.get((5,).into(), "y.weight", init, DType::F32, &dev)?;
        let b = SeededInit::new(VarMap::new(), 7);
        let b2 = b.get((5,).into(), "y.weight", init, DType::F32, &dev)?;
        let b1 = b.get((3, 4).into(), "x.weight", init, DType::F32, &dev)?;
        assert_eq!(a1.to_vec2::<f32>()?, b1.to_vec2::<f32>()?);
        assert_eq!(a2.to_vec1::<f32>()?, b2.to_vec1::<f32>()?);
        let c = SeededInit::new(VarMap::new(), 8);
        let c1 = c.get((3, 4).into(), "x.weight", init, DType::F32, &dev)?;
        assert_ne!(a1.to_vec2::<f32>()?, c1.to_vec2::<f32>()?);
        // Uniform values stay in range and are not degenerate.
        let v = a1.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert!(v.windows(2).any(|w| w[0] != w[1]));
        Ok(())
    }

    #[test]
    fn normal_init_has_requested_moments() -> Result<()> {
        let init = SeededInit::new(VarMap::new(), 1);
        let n = 20_000;
        let v = init.values(
            &Shape::from(n),
            "w",
            Init::Randn {
                mean: 2.0,
                stdev: 0.5,
            },
        );
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 0.5/sqrt(n) = 0.0035 for the mean, about 0.0025 for the variance.
        assert!((mean - 2.0).abs() < 0.02, "mean {mean}");
        assert!((var - 0.25).abs() < 0.015, "variance {var}");
        Ok(())
    }
}
