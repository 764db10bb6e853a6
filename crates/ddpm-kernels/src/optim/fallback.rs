//! The optimizer's updates composed of candle's tensor ops: for tensors our kernels do not take
//! (other dtypes, strided views, devices without our kernels) and for a policy with candle's
//! backend. They give the values of the in-place kernels up to f32 rounding, but allocate new
//! moments, variables and averages at every step.

use candle_core::{DType, Result, Tensor, Var};

use super::AdamWStep;

/// One AdamW step of `var` from its gradient `g` (see [`super::adamw`]): the moments `m` and
/// `v` are replaced by new (detached) tensors, the variable is set to its new value.
pub fn adamw(var: &Var, m: &mut Tensor, v: &mut Tensor, g: &Tensor, s: &AdamWStep) -> Result<()> {
    let [bc1, bc2] = s.bias_corrections();
    // Moments are detached so that they never chain an autograd graph across steps.
    let g = g.to_dtype(DType::F32)?.detach();
    let g = if s.grad_scale == 1.0 {
        g
    } else {
        (g * s.grad_scale)?
    };
    *m = ((&*m * s.beta1)? + (&g * (1.0 - s.beta1))?)?.detach();
    *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?.detach();
    let m_hat = (&*m / bc1)?;
    let v_hat = (&*v / bc2)?;
    let update = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
    let p = var.as_tensor().to_dtype(DType::F32)?.detach();
    let p = ((p * (1.0 - s.lr * s.weight_decay))? - (update * s.lr)?)?;
    var.set(&p.to_dtype(var.dtype())?)
}

/// One EMA step `average <- decay average + (1 - decay) value`, as a new (detached) tensor in
/// f32.
pub fn ema(average: &mut Tensor, value: &Tensor, decay: f64) -> Result<()> {
    let p = value.to_dtype(DType::F32)?;
    // Detached: the average must not keep an autograd graph reaching back through every
    // earlier step (that would hold every old average in memory).
    *average = ((&*average * decay)? + (p * (1.0 - decay))?)?.detach();
    Ok(())
}

/// The sum of squares of the elements of all of `tensors`: per tensor in f32 (as candle's
/// `sum_all` does), added in f64, with one read-back for all of them.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let sums = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()
}
