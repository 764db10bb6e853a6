//! Sinusoidal timestep embeddings (Vaswani et al. 2017, as used by DDPM).

use candle_core::{DType, Result, Tensor};

/// Embeds timesteps `t` (b,) of any numeric dtype into (b, dim) features
/// `[sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]` with
/// `h = dim / 2` and `f_i = exp(-ln(10000) * i / (h - 1))`, zero-padded when `dim` is odd: the
/// DDPM paper's layout ([`sinusoidal_embedding_with`] with no flip and a shift of 1).
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    sinusoidal_embedding_with(t, dim, false, 1.0, dtype)
}

/// [`sinusoidal_embedding`] in the layout of diffusers' `Timesteps(dim, flip_sin_to_cos,
/// freq_shift)`: frequencies `f_i = exp(-ln(10000) * i / (h - freq_shift))`, and the cosines
/// first when `flip_sin_to_cos`. The DDPM paper's models use `false, 1`; diffusers' own default
/// (the models its training examples write) is `true, 0`.
pub fn sinusoidal_embedding_with(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    dtype: DType,
) -> Result<Tensor> {
    let half = dim / 2;
    if half < 2 {
        candle_core::bail!("time embedding dimension must be at least 4, got {dim}");
    }
    let denominator = half as f64 - freq_shift;
    if !(denominator > 0.0 && freq_shift.is_finite()) {
        candle_core::bail!(
            "time embedding frequency shift {freq_shift} must be finite and below half the \
             dimension ({half})"
        );
    }
    let dev = t.device();
    let scale = (10000f64).ln() / denominator;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(i as f64) * scale).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let b = t.dims1()?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape((b, 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    emb.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_closed_form() -> Result<()> {
        let t = Tensor::new(&[0u32, 1, 250, 999], &Device::Cpu)?;
        let dim = 8;
        let e = sinusoidal_embedding(&t, dim, DType::F64)?.to_vec2::<f64>()?;
        for (row, &tv) in e.iter().zip([0.0f64, 1.0, 250.0, 999.0].iter()) {
            for i in 0..4 {
                let f = (-(10000f64.ln()) * i as f64 / 3.0).exp();
                // f32 arguments: the tolerance follows from f32 rounding of t * f (|t f| <= 999).
                assert!((row[i] - (tv * f).sin()).abs() < 1e-4);
                assert!((row[i + 4] - (tv * f).cos()).abs() < 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn diffusers_layouts_flip_and_shift_as_its_formula_says() -> Result<()> {
        let t = Tensor::new(&[7u32, 640], &Device::Cpu)?;
        let (dim, half) = (10, 5);
        for (flip, shift) in [(true, 0.0), (false, 0.0), (true, 1.0)] {
            let e = sinusoidal_embedding_with(&t, dim, flip, shift, DType::F64)?;
            let e = e.to_vec2::<f64>()?;
            for (row, tv) in e.iter().zip([7.0f64, 640.0]) {
                for i in 0..half {
                    let f = (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp();
                    let (s, c) = ((tv * f).sin(), (tv * f).cos());
                    let (first, second) = if flip { (c, s) } else { (s, c) };
                    assert!((row[i] - first).abs() < 1e-3, "{flip} {shift} {i}");
                    assert!((row[i + half] - second).abs() < 1e-3, "{flip} {shift} {i}");
                }
            }
        }
        assert!(sinusoidal_embedding_with(&t, dim, false, 5.0, DType::F32).is_err());
        Ok(())
    }
}

/// A learned embedding of class labels, added to the time embedding (as diffusers'
/// `UNet2DModel` does with `num_class_embeds`), for class-conditional models trained with
/// classifier-free guidance (Ho & Salimans 2022).
///
/// The table has `num_classes + 1` rows: labels `0..num_classes` are the classes and label
/// `num_classes` is the *null* label, the unconditional model that guidance contrasts with.
/// Its rows start as N(0, 1) values, like PyTorch's `nn.Embedding`.
#[derive(Debug, Clone)]
pub struct ClassEmbedding {
    weight: Tensor,
}

impl ClassEmbedding {
    /// A table of `num_classes + 1` rows of `dim` values, as `weight` under `vb`.
    pub fn new(num_classes: usize, dim: usize, vb: candle_nn::VarBuilder) -> Result<Self> {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        Ok(Self {
            weight: vb.get_with_hints((num_classes + 1, dim), "weight", init)?,
        })
    }

    /// The rows of `labels` (b,) as (b, dim) in `dtype`; the null label for every image when
    /// `labels` is `None`.
    pub fn forward(&self, labels: Option<&Tensor>, b: usize, dtype: DType) -> Result<Tensor> {
        let labels = match labels {
            Some(l) => l.to_dtype(DType::U32)?,
            None => {
                let null = self.weight.dim(0)? as u32 - 1;
                Tensor::from_vec(vec![null; b], b, self.weight.device())?
            }
        };
        self.weight.index_select(&labels, 0)?.to_dtype(dtype)
    }
}
