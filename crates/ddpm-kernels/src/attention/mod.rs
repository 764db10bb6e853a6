//! Multi-head attention over the pixels of a packed `qkv` projection (b, 3 * heads * d, h, w),
//! forward and backward, one (image, head) pair at a time: softmax attention (Vaswani et al.)
//! and the linear attention of Shen et al. 2018.
//!
//! Composed from candle's ops, one attention layer is about twenty graph nodes over the large
//! activations (chunk, reshapes, transposes made contiguous, an exponential, a sum and a
//! division per softmax, the matrix products), each with its own pass over memory and, in the
//! backward pass, its own zero-filled gradient buffer. Here it is one op: the forward pass keeps
//! nothing but its input, and the backward pass recomputes the softmaxes (cheap next to the
//! matrix products) and writes the gradient of `qkv` in place.
//!
//! The candle custom ops are here, the CPU kernels in `cpu`, softmax attention's CUDA passes in
//! `cuda` (cuBLAS GEMMs and the row-softmax kernels of `kernels.cu`), and candle's
//! composition in [`fallback`].

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fallback;

use candle_core::{Layout, Result, Shape, Tensor};

use crate::custom_op::Kernel;
use crate::Float;

/// Which attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `out = v softmax_j(scale * q^T k)^T`, per head: cost quadratic in the pixels.
    Softmax,
    /// `out = (softmax_n(k) v^T)^T (scale * softmax_d(q))`: queries normalized over features,
    /// keys over positions; cost linear in the pixels.
    Linear,
}

/// Attention over a packed `qkv` (b, 3 * heads * dim_head, h, w) into (b, heads * dim_head, h, w),
/// channels ordered `(head, feature)` within each of q, k and v; as a custom op.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    /// Softmax or linear attention.
    pub kind: Kind,
    /// Number of heads.
    pub heads: usize,
    /// Features per head.
    pub dim_head: usize,
    /// Softmax attention: multiplies `q^T k` before the softmax. Linear attention: multiplies
    /// the normalized queries.
    pub scale: f64,
}

/// Shape of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    b: usize,
    heads: usize,
    d: usize,
    n: usize,
}

impl Geom {
    fn new(dims: &[usize], op: &Attention) -> Result<Self> {
        let &[b, c, h, w] = dims else {
            candle_core::bail!("attention: expected qkv of shape (b, c, h, w), got {dims:?}")
        };
        let (heads, d) = (op.heads, op.dim_head);
        if heads == 0 || d == 0 || c != 3 * heads * d {
            candle_core::bail!(
                "attention: qkv has {c} channels, expected 3 * {heads} heads * {d} features"
            );
        }
        Ok(Self {
            b,
            heads,
            d,
            n: h * w,
        })
    }
    /// The sizes for the CUDA passes, which run softmax attention only.
    #[cfg(feature = "cuda")]
    fn cuda(&self, op: &Attention) -> Result<cuda::Dims> {
        if op.kind != Kind::Softmax {
            candle_core::bail!(
                "attention: linear attention has no CUDA kernel (candle's ops run it)"
            );
        }
        Ok(cuda::Dims {
            b: self.b,
            heads: self.heads,
            d: self.d,
            n: self.n,
        })
    }
    /// Elements of one head's q (or k, v, out).
    fn head_len(&self) -> usize {
        self.d * self.n
    }
    /// Elements of one image's q (or k, v, out).
    fn part_len(&self) -> usize {
        self.heads * self.head_len()
    }
}

/// The output's shape: (b, heads * dim_head, h, w) for `qkv` (b, 3 * heads * dim_head, h, w).
fn out_shape(g: &Geom, dims: &[usize]) -> Shape {
    Shape::from((g.b, g.heads * g.d, dims[2], dims[3]))
}

impl Kernel<1> for Attention {
    const NAME: &'static str = "ddpm-attention";
    type Plan = Geom;

    fn plan(&self, [l]: [&Layout; 1]) -> Result<(Geom, Shape)> {
        let g = Geom::new(l.dims(), self)?;
        Ok((g, out_shape(&g, l.dims())))
    }

    fn cpu<T: Float>(&self, g: &Geom, [qkv]: [&[T]; 1]) -> Result<Vec<T>> {
        Ok(cpu::forward(self, g, qkv))
    }

    /// Softmax attention on CUDA: [`cuda`] (linear attention there is composed of candle's
    /// ops by `ops::linear_attention`).
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        g: &Geom,
        [(s, l)]: [(&candle_core::CudaStorage, &Layout); 1],
    ) -> Result<candle_core::CudaStorage> {
        cuda::forward(self, g.cuda(self)?, s, l)
    }

    fn bwd(&self, [qkv]: [&Tensor; 1], _: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        let grad = grad.contiguous()?;
        Ok([Some(
            qkv.apply_op2_no_bwd(&grad, &AttentionBackward(*self))?,
        )])
    }
}
custom_op!(Attention, 1);

/// The backward pass, over (qkv, output gradient): the gradient of qkv.
struct AttentionBackward(Attention);

impl Kernel<2> for AttentionBackward {
    const NAME: &'static str = "ddpm-attention-backward";
    type Plan = Geom;

    /// The sizes from qkv's layout, checked against the gradient's.
    fn plan(&self, [l1, l2]: [&Layout; 2]) -> Result<(Geom, Shape)> {
        let g = Geom::new(l1.dims(), &self.0)?;
        if l2.shape().elem_count() != g.b * g.part_len() {
            candle_core::bail!(
                "attention backward: gradient {:?} does not match qkv {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        Ok((g, l1.shape().clone()))
    }

    fn cpu<T: Float>(&self, g: &Geom, [qkv, grad]: [&[T]; 2]) -> Result<Vec<T>> {
        Ok(cpu::backward(&self.0, g, qkv, grad))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        g: &Geom,
        [(s1, l1), (s2, l2)]: [(&candle_core::CudaStorage, &Layout); 2],
    ) -> Result<candle_core::CudaStorage> {
        cuda::backward(&self.0, g.cuda(&self.0)?, s1, l1, s2, l2)
    }
}
custom_op!(AttentionBackward, 2);

/// Attention over `qkv` (b, 3 * heads * dim_head, h, w) through our kernel (made contiguous).
pub fn attention(qkv: &Tensor, op: Attention) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(op)
}
