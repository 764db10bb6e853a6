//! Our CPU kernels, as candle custom ops with native forward and backward passes.
//!
//! candle 0.11's CPU convolution and the backward passes of its broadcast ops are far slower
//! than PyTorch's; these replace them for the U-Nets' hot ops on the CPU. [`crate::ops`] decides
//! when they are used (CPU tensors of f32/f64, unless `DDPM_KERNELS=candle`).

/// Runs a generic kernel `$f::<T>(args)` for the storage's float type, wrapping the result.
macro_rules! dispatch {
    ($storage:expr, $what:literal, $f:ident, $($arg:expr),*) => {
        match $storage.dtype() {
            DType::F32 => CpuStorage::F32($f::<f32>($($arg),*)),
            DType::F64 => CpuStorage::F64($f::<f64>($($arg),*)),
            d => candle_core::bail!("{} kernel: unsupported dtype {d:?}", $what),
        }
    };
}

pub mod attention;
pub mod conv;
pub mod group_norm;

use candle_core::{CpuStorage, Layout, Result};
use gemm::Parallelism;

/// The element types our kernels support.
pub trait Float:
    candle_core::WithDType
    + Copy
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// From f64.
    fn of(v: f64) -> Self;
    /// To f64.
    fn f64(self) -> f64;
    /// e^self, in this type's precision.
    fn exp(self) -> Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn of(v: f64) -> Self {
        v
    }
    fn f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The contiguous slice of a storage under a layout.
pub(crate) fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{what}: kernel input must be contiguous"),
    }
}

/// Whether the fast kernels handle tensors of this dtype and device.
pub fn supported(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Threads to split work over.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `dst (m x n) = [dst +] a (m x k) * b (k x n)` with explicit (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element addressed by the given strides and sizes: dst is
    // m*n row-major, a and b are checked by the callers' shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { T::ONE } else { T::ZERO },
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}
