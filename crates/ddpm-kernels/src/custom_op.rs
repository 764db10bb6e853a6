//! The one skeleton of this crate's candle custom ops.
//!
//! candle's `CustomOp1/2/3` traits hand an op each input as a storage and a layout, once per
//! backend, and take back the output's storage and shape. Around its math every op here does the
//! same: the geometry from the inputs' layouts (checked), the contiguous slice of each input, the
//! dispatch on the float type, the output's length against its shape, and (backward) a packed
//! gradient cut into one tensor per input. So an op writes only its [`Kernel`]: its plan (the
//! geometry and the output's shape), its CPU math for one float type, its CUDA pass and its
//! backward pass; `custom_op!(Type, N)` implements candle's `CustomOpN` from it, and [`unpack`]
//! cuts packed gradients. (The CUDA launches share `crate::cuda::launch`.)

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Tensor};

use crate::Float;

/// An op over `N` inputs, as its forward and backward passes need it.
pub(crate) trait Kernel<const N: usize> {
    /// candle's name of the op (`ddpm-...`), which errors name too.
    const NAME: &'static str;
    /// What the op derives from its inputs' layouts (its geometry).
    type Plan;

    /// Checks the inputs' layouts; the plan and the output's shape.
    fn plan(&self, layouts: [&Layout; N]) -> Result<(Self::Plan, Shape)>;

    /// The output from the inputs (contiguous, one float type) on the CPU, every element
    /// written: as many as the plan's shape holds.
    fn cpu<T: Float>(&self, plan: &Self::Plan, inputs: [&[T]; N]) -> Result<Vec<T>> {
        let _ = (plan, inputs);
        candle_core::bail!(
            "{} is a CUDA kernel (the CPU has its own kernels)",
            Self::NAME
        )
    }

    /// The output on CUDA (the storages in the first one's dtype).
    fn cuda(&self, plan: &Self::Plan, inputs: [(&CudaStorage, &Layout); N]) -> Result<CudaStorage> {
        let _ = (plan, inputs);
        candle_core::bail!("{} has no CUDA kernel", Self::NAME)
    }

    /// The gradient of each input from the output's gradient `grad` (the output is `res`).
    fn bwd(&self, args: [&Tensor; N], res: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        let _ = (args, res, grad);
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// `CustomOpN::cpu_fwd` of a [`Kernel`]: the plan, the inputs' slices in the first input's
/// float type (f32 or f64), the kernel, and its output checked against the plan's shape.
pub(crate) fn cpu_fwd<K: Kernel<N>, const N: usize>(
    op: &K,
    inputs: [(&CpuStorage, &Layout); N],
) -> Result<(CpuStorage, Shape)> {
    let (plan, shape) = op.plan(inputs.map(|(_, l)| l))?;
    let dtype = inputs[0].0.dtype();
    if let Some((other, _)) = inputs.iter().find(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{}: inputs of {dtype:?} and {:?}", K::NAME, other.dtype());
    }
    fn run<K: Kernel<N>, T: Float, const N: usize>(
        op: &K,
        plan: &K::Plan,
        inputs: [(&CpuStorage, &Layout); N],
        shape: &Shape,
    ) -> Result<Vec<T>> {
        let mut slices: [&[T]; N] = [&[]; N];
        for (i, (slice, (s, l))) in slices.iter_mut().zip(inputs).enumerate() {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("{}: input {} must be contiguous", K::NAME, i + 1)
            };
            *slice = &s.as_slice::<T>()?[start..end];
        }
        let out = op.cpu(plan, slices)?;
        if out.len() != shape.elem_count() {
            candle_core::bail!(
                "{}: {} values for an output of {shape:?}",
                K::NAME,
                out.len()
            );
        }
        Ok(out)
    }
    let storage = match dtype {
        DType::F32 => CpuStorage::F32(run(op, &plan, inputs, &shape)?),
        DType::F64 => CpuStorage::F64(run(op, &plan, inputs, &shape)?),
        d => candle_core::bail!("{} kernel: unsupported dtype {d:?}", K::NAME),
    };
    Ok((storage, shape))
}

/// `CustomOpN::cuda_fwd` of a [`Kernel`]: the plan, then the CUDA pass.
pub(crate) fn cuda_fwd<K: Kernel<N>, const N: usize>(
    op: &K,
    inputs: [(&CudaStorage, &Layout); N],
) -> Result<(CudaStorage, Shape)> {
    let (plan, shape) = op.plan(inputs.map(|(_, l)| l))?;
    Ok((op.cuda(&plan, inputs)?, shape))
}

/// `packed` (flat, as a backward pass writes several gradients into one buffer) cut into
/// consecutive pieces of `shapes`; each piece shares `packed`'s storage.
pub(crate) fn unpack<const K: usize>(packed: &Tensor, shapes: [Shape; K]) -> Result<[Tensor; K]> {
    let mut start = 0;
    let mut pieces = Vec::with_capacity(K);
    for shape in shapes {
        let n = shape.elem_count();
        pieces.push(packed.narrow(0, start, n)?.reshape(shape)?);
        start += n;
    }
    Ok(pieces
        .try_into()
        .unwrap_or_else(|_| unreachable!("one piece per shape")))
}

/// `custom_op!(Type, N)`: candle's `CustomOpN` (N = 1, 2 or 3) for `Type`, a [`Kernel<N>`]:
/// the CPU and CUDA passes through [`cpu_fwd`] and [`cuda_fwd`], the backward pass through
/// [`Kernel::bwd`].
macro_rules! custom_op {
    ($ty:ty, 1) => {
        impl candle_core::CustomOp1 for $ty {
            fn name(&self) -> &'static str {
                <$ty as $crate::custom_op::Kernel<1>>::NAME
            }
            fn cpu_fwd(
                &self,
                s: &candle_core::CpuStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::custom_op::cpu_fwd(self, [(s, l)])
            }
            fn cuda_fwd(
                &self,
                s: &candle_core::CudaStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::custom_op::cuda_fwd(self, [(s, l)])
            }
            fn bwd(
                &self,
                arg: &candle_core::Tensor,
                res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<Option<candle_core::Tensor>> {
                let [g] = <$ty as $crate::custom_op::Kernel<1>>::bwd(self, [arg], res, grad)?;
                Ok(g)
            }
        }
    };
    ($ty:ty, 2) => {
        custom_op!(@n $ty, CustomOp2, 2, [s1 l1 a1 g1, s2 l2 a2 g2]);
    };
    ($ty:ty, 3) => {
        custom_op!(@n $ty, CustomOp3, 3, [s1 l1 a1 g1, s2 l2 a2 g2, s3 l3 a3 g3]);
    };
    // `CustomOpN` for N > 1, whose backward pass returns a tuple: one name per input for its
    // storage, layout, tensor and gradient.
    (@n $ty:ty, $op:ident, $n:literal, [$($s:ident $l:ident $a:ident $g:ident),+]) => {
        impl candle_core::$op for $ty {
            fn name(&self) -> &'static str {
                <$ty as $crate::custom_op::Kernel<$n>>::NAME
            }
            fn cpu_fwd(
                &self,
                $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::custom_op::cpu_fwd(self, [$(($s, $l)),+])
            }
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::custom_op::cuda_fwd(self, [$(($s, $l)),+])
            }
            #[allow(clippy::type_complexity)]
            fn bwd(
                &self,
                $($a: &candle_core::Tensor,)+
                res: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<($(custom_op!(@gradient $a),)+)> {
                let [$($g),+] =
                    <$ty as $crate::custom_op::Kernel<$n>>::bwd(self, [$($a),+], res, grad)?;
                Ok(($($g),+))
            }
        }
    };
    (@gradient $a:ident) => {
        Option<candle_core::Tensor>
    };
}
