//! GroupNorm with a per-(image, channel) affine (scale-shift conditioning), SiLU and dropout,
//! one op forward and one backward: the candle custom ops here, the CPU kernels in `cpu`, the
//! CUDA passes in `cuda` (kernels in `kernels.cu`), and candle's composition in [`fallback`].

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fallback;

use candle_core::{Layout, Result, Shape, Tensor};

use crate::custom_op::{unpack, Kernel};
use crate::Float;
use cpu::Geom;

/// Inverted dropout applied after the activation: each element is zeroed with probability `p`
/// (the rest scaled by `1 / (1 - p)`), by a mask that is a hash of (`seed`, element index), so
/// the backward pass regenerates it instead of storing it, and the same seed gives the same
/// mask on any thread count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element, in [0, 1).
    pub p: f64,
    /// Seed of the mask; draw a fresh one per call.
    pub seed: u64,
}

impl Dropout {
    /// The mask's factor per element: 0 or `1 / (1 - p)` (for composing dropout from tensor
    /// ops off the fused kernel; cast to the activations' type).
    pub fn mask(&self, len: usize) -> Vec<f64> {
        let m = cpu::Mask::<f64>::new(*self);
        (0..len).map(|i| m.factor(i)).collect()
    }

    /// The hash's threshold and two seed words: element `i` is kept when
    /// `hash32(hash32(i + s1) ^ s2) >= threshold` (shared with the CUDA kernel).
    pub(crate) fn hash_params(&self) -> (u32, u32, u32) {
        (
            (self.p * 4_294_967_296.0).clamp(0.0, u32::MAX as f64) as u32,
            cpu::hash32(self.seed as u32),
            cpu::hash32((self.seed >> 32) as u32 ^ 0x9e37_79b9),
        )
    }
}

/// GroupNorm with a per-(image, channel) affine `a`, `d` (b, c) and an optional SiLU, over
/// (x, a, d), as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Apply SiLU after the affine.
    pub silu: bool,
    /// Dropout after the activation (training only).
    pub dropout: Option<Dropout>,
}

/// The backward pass over (x, `[a | d]`, grad): `[dx | da | dd]`, flat.
struct GroupNormBackward(GroupNorm);

impl Kernel<3> for GroupNorm {
    const NAME: &'static str = "ddpm-group-norm";
    type Plan = Geom;

    fn plan(&self, [x, _, _]: [&Layout; 3]) -> Result<(Geom, Shape)> {
        Ok((Geom::new(x.dims(), self.groups)?, x.shape().clone()))
    }

    fn cpu<T: Float>(&self, g: &Geom, [x, a, d]: [&[T]; 3]) -> Result<Vec<T>> {
        Ok(cpu::forward(g, x, a, d, self))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        _: &Geom,
        inputs: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> Result<candle_core::CudaStorage> {
        cuda::forward(self, inputs)
    }

    fn bwd(
        &self,
        [x, a, d]: [&Tensor; 3],
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        // The two small affines packed into one input (a custom op takes three), so that the
        // gradient, as large as `x`, goes in without a copy.
        let a_and_d = Tensor::cat(&[&a.flatten_all()?, &d.flatten_all()?], 0)?;
        let packed =
            x.apply_op3_no_bwd(&a_and_d, &grad.contiguous()?, &GroupNormBackward(*self))?;
        let shapes = [x.shape().clone(), a.shape().clone(), d.shape().clone()];
        let [dx, da, dd] = unpack(&packed, shapes)?;
        Ok([Some(dx), Some(da), Some(dd)])
    }
}
custom_op!(GroupNorm, 3);

impl Kernel<3> for GroupNormBackward {
    const NAME: &'static str = "ddpm-group-norm-backward";
    /// The geometry and the number of (image, channel) pairs.
    type Plan = (Geom, usize);

    fn plan(&self, [x, ad, _]: [&Layout; 3]) -> Result<((Geom, usize), Shape)> {
        let g = Geom::new(x.dims(), self.0.groups)?;
        let bc = ad.shape().elem_count() / 2;
        Ok(((g, bc), Shape::from(x.shape().elem_count() + 2 * bc)))
    }

    fn cpu<T: Float>(&self, (g, bc): &(Geom, usize), [x, ad, dy]: [&[T]; 3]) -> Result<Vec<T>> {
        let (a, d) = ad.split_at(*bc);
        Ok(cpu::backward(g, x, a, d, dy, &self.0))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        _: &(Geom, usize),
        inputs: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> Result<candle_core::CudaStorage> {
        cuda::backward(&self.0, inputs)
    }
}
custom_op!(GroupNormBackward, 3);

/// GroupNorm of `x` (b, c, ...) with a per-(image, channel) affine `a`, `d` (b, c), then SiLU
/// when `silu`, then `dropout` when given, through our kernel:
/// `dropout(act((x - mean) / std * a + d))`.
pub fn group_norm_act(
    x: &Tensor,
    groups: usize,
    a: &Tensor,
    d: &Tensor,
    silu: bool,
    dropout: Option<Dropout>,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &d.contiguous()?,
        GroupNorm {
            groups,
            eps,
            silu,
            dropout,
        },
    )
}

/// GroupNorm of `x` (b, c, ...) with `gamma`, `beta` (c) through our kernel.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (a, d) = per_image(x, gamma, beta)?;
    group_norm_act(x, groups, &a, &d, false, None, eps)
}

/// `gamma`, `beta` (c) broadcast to (b, c): the per-image affine of a plain GroupNorm.
pub fn per_image(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, c) = (x.dims()[0], gamma.elem_count());
    Ok((
        gamma.reshape((1, c))?.broadcast_as((b, c))?,
        beta.reshape((1, c))?.broadcast_as((b, c))?,
    ))
}
