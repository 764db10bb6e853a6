//! Sinusoidal timestep embeddings (Vaswani et al. 2017, as used by DDPM).

use candle_core::{DType, Result, Tensor};

/// Embeds timesteps `t` (b,) of any numeric dtype into (b, dim) features
/// `[sin(t * f_0), ..., sin(t * f_{h-1}), cos(t * f_0), ..., cos(t * f_{h-1})]` with
/// `h = dim / 2` and `f_i = exp(-ln(10000) * i / (h - 1))`, zero-padded when `dim` is odd.
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    if half < 2 {
        candle_core::bail!("time embedding dimension must be at least 4, got {dim}");
    }
    let dev = t.device();
    let scale = (10000f64).ln() / (half as f64 - 1.0);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(i as f64) * scale).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let b = t.dims1()?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape((b, 1))?
        .broadcast_mul(&freqs)?;
    let mut emb = Tensor::cat(&[args.sin()?, args.cos()?], 1)?;
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
}
