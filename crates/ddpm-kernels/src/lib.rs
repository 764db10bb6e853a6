//! The hand-written kernels of ddpm-rs, as candle custom ops with native forward and backward
//! passes, one folder per op, each with its CPU kernels (`cpu.rs`), its CUDA version (`cuda.rs`
//! and `kernels.cu`, with the `cuda` feature) and candle's composition of the same op
//! (`fallback.rs`) side by side; and the [`KernelPolicy`] that chooses between them.
//!
//! candle 0.11's CPU convolution and the backward passes of its broadcast ops are far slower
//! than PyTorch's; these replace them for the U-Nets' hot ops. `ddpm_unet::ops` (the one
//! switchboard) decides which implementation runs: CPU tensors of f32/f64 and CUDA float
//! tensors take our kernels, as the [`KernelPolicy`] in force says, and everything else the
//! fallbacks. ddpm-train's optimizer, EMA and sampling loop call [`optim`] directly, with the
//! run's policy. This crate knows no model, schedule, data set or training loop, and reads no
//! environment variable. All of the project's `unsafe` code for speed (SIMD, raw slices,
//! uninitialised buffers, CUDA launches) lives here.
//!
//! - [`conv`]: convolution on GEMM (im2col, padded rows; Winograd for 3x3 stride-1 convs), a
//!   bias per channel or per image (the time embedding), a residual added in the output loop (a
//!   ResNet block's sum), padding that may differ at the end; backward as GEMMs, the input
//!   gradient of stride-1 convs as a convolution with the flipped kernel. On CUDA im2col/col2im
//!   and cuBLAS.
//! - [`group_norm`]: GroupNorm with a per-(image, channel) affine (scale-shift conditioning),
//!   SiLU and dropout in one pass forward and two backward.
//! - [`attention`]: softmax and linear attention over a packed qkv, one op each.
//! - [`upsample`]: nearest 2x upsampling.
//! - [`concat`](mod@concat): concatenation along the channels (the U-Nets' skip connections).
//! - [`optim`]: AdamW, the EMA and the gradient norm over all variables: in place on the CPU,
//!   one launch for all of them on CUDA, candle's tensor ops otherwise.
//! - `custom_op`: the one skeleton of the custom ops (the plan from the layouts, the slices, the
//!   dtype dispatch, the packed gradients); `cuda` (with the `cuda` feature): what the CUDA
//!   kernels share (the PTX, launches, the gathers).
//!
//! Every graph node candle builds costs a pass over memory forward and a zero-filled gradient
//! plus an addition backward, so fusing ops here saves more than their own arithmetic.
//! Element-wise loops are written to vectorize (branch-free [`exp_f32`], lane-wise sums) and are
//! compiled again for AVX2 + FMA and for AVX-512, chosen at run time (`avx2_dispatch!`, [`avx2`],
//! [`avx512`]).

/// `avx2_dispatch! { /// docs  fn name<T>(args) -> R = body_fn }` defines `name`, which runs
/// `body_fn` (an `#[inline(always)]` generic function) from a copy compiled for AVX-512 (F and
/// VL, with AVX2 and FMA) when the CPU has it ([`avx512`]), else from one compiled for AVX2 +
/// FMA when the CPU has them ([`avx2`]), and from the baseline x86-64 build otherwise: the crate
/// is built for plain x86-64, where our element-wise loops get 4-wide SSE2 at most. The AVX-512
/// copies (16-lane blocks, 32 vector registers) made `cifar-small` steps on an Intel Xeon 1-10%
/// faster than the AVX2 ones (4 alternating pairs each, training and sampling).
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* fn $name:ident<$t:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$t: Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512_build<$t: Float>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2_build<$t: Float>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::avx512() {
                    // SAFETY: the CPU has AVX-512F and VL, AVX2 and FMA (checked by `avx512`).
                    return unsafe { avx512_build($($arg),*) };
                }
                if $crate::avx2() {
                    // SAFETY: the CPU has AVX2 and FMA (checked by `avx2`).
                    return unsafe { avx2_build($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[macro_use]
mod custom_op;
#[cfg(feature = "cuda")]
#[macro_use]
pub mod cuda;

pub mod attention;
pub mod concat;
pub mod conv;
pub mod group_norm;
pub mod optim;
pub mod policy;
pub mod upsample;

pub use policy::KernelPolicy;

use std::mem::MaybeUninit;

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
    + std::ops::SubAssign
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
    /// e^self, in this type's precision: for f32 [`exp_f32`] (branch-free, so that loops over it
    /// vectorize; relative error below 2e-7), for f64 the standard library's.
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
        exp_f32(self)
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

/// e^x for f32 without branches or calls, so that the compiler vectorizes loops over it (the
/// standard library's `expf` is a call per element). `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
/// `e^r` by its Taylor polynomial to degree 7 (truncation error below 3e-9 relative), and `2^n`
/// built in the exponent bits. Inputs are clamped to [-87, 88]: below, the result is about
/// 1.6e-38 instead of a denormal or 0 (harmless next to 1 in a sigmoid or softmax); above, the
/// float maximum is near. NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5 * 2^23 (exact for |v| < 2^22): plain float
    // arithmetic, where `round` would be a library call on baseline x86-64.
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `shifted` lies in [2^23, 2^24), where the float's step is 1, so its low bits are n itself:
    // bits(shifted) = bits(SHIFTER) + n. Integer arithmetic on those bits gives 2^n's exponent
    // field without `n as i32`, whose saturating, NaN-checked conversion does not vectorize.
    // (For NaN, p is NaN and so is the product.)
    let exponent = shifted
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(exponent << 23)
}

/// The sum of `f(x)` over `xs` in f64, from f32-width partial sums over short runs: the runs
/// vectorize, and the f64 total keeps the error of long sums down.
#[inline(always)]
pub fn sum<T: Float>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for run in xs.chunks(256) {
        let mut acc = [T::ZERO; LANES];
        let mut it = run.chunks_exact(LANES);
        for c in &mut it {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        let mut s = T::ZERO;
        for &v in it.remainder() {
            s += f(v);
        }
        for a in acc {
            s += a;
        }
        total += s.f64();
    }
    total
}

/// `sum(f(x[i], y[i]))` in f64 from f32-width partial sums, as [`sum`].
#[inline(always)]
pub(crate) fn sum2<T: Float>(xs: &[T], ys: &[T], f: impl Fn(T, T) -> T) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for (rx, ry) in xs.chunks(256).zip(ys.chunks(256)) {
        let mut acc = [T::ZERO; LANES];
        let (mut ix, mut iy) = (rx.chunks_exact(LANES), ry.chunks_exact(LANES));
        for (cx, cy) in (&mut ix).zip(&mut iy) {
            for ((a, &u), &v) in acc.iter_mut().zip(cx).zip(cy) {
                *a += f(u, v);
            }
        }
        let mut s = T::ZERO;
        for (&u, &v) in ix.remainder().iter().zip(iy.remainder()) {
            s += f(u, v);
        }
        for a in acc {
            s += a;
        }
        total += s.f64();
    }
    total
}

/// `s` as f32 values, when `T` is f32 (for kernels written for f32 only).
pub(crate) fn as_f32<T: Float>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is f32: same layout, same length.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) })
}

/// Whether this CPU runs the AVX-512 builds of our kernels (AVX-512F and VL with AVX2 and FMA;
/// detected once): not when the [`KernelPolicy`] caps the instruction set
/// lower, so that the AVX2 builds can be compared on the same machine.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let present = *AVX512.get_or_init(|| {
            avx2_present()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
        });
        present && crate::KernelPolicy::active().cpu_isa == crate::policy::CpuIsa::Auto
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the AVX2 + FMA builds of our element-wise loops (checked once).
/// Not when the [`KernelPolicy`] asks for the baseline build.
pub fn avx2() -> bool {
    avx2_present() && crate::KernelPolicy::active().cpu_isa != crate::policy::CpuIsa::Baseline
}

/// Whether this CPU has AVX2 and FMA (detected once).
fn avx2_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Storage for `n` values of `T` that a kernel writes in full before it reads them (a GEMM output
/// without accumulation, an im2col patch matrix, an element-wise result), allocated without
/// zero-filling it: freed memory is reused by the allocator, so `vec![0; n]` would be a full pass
/// over every output and scratch buffer (docs/benchmarks.md, "Kernel decisions", gives the
/// measurement).
///
/// It dereferences to `[MaybeUninit<T>]`, so that nothing reads a value before it is written:
/// call sites write through [`matmul_to`], [`write_copy`], [`fill`], `MaybeUninit::write` (which
/// compiles to the same stores as an assignment) and rayon's `par_chunks_mut`, and then turn it
/// into a `Vec<T>` with [`Uninit::assume_init`], stating in a `SAFETY` comment why every element
/// was written. Where a site sums into a buffer, it writes the zeros itself ([`fill`]).
///
/// In this crate's unit tests the storage starts out as NaN, so that an element a kernel fails
/// to write shows up in the tests' comparisons instead of as whatever the allocator left there.
pub(crate) struct Uninit<T>(Box<[MaybeUninit<T>]>);

impl<T: Float> Uninit<T> {
    /// Storage for `n` values, none written.
    pub(crate) fn new(n: usize) -> Self {
        #[allow(unused_mut)]
        let mut b = Box::new_uninit_slice(n);
        #[cfg(test)]
        b.fill(MaybeUninit::new(T::of(f64::NAN)));
        Self(b)
    }

    /// The values, once every one has been written.
    ///
    /// # Safety
    ///
    /// Every element has been written (through the slice this dereferences to).
    pub(crate) unsafe fn assume_init(self) -> Vec<T> {
        // SAFETY: every element is initialised (the caller's contract); `T` has no invalid bit
        // patterns once written.
        unsafe { self.0.assume_init() }.into_vec()
    }
}

impl<T> std::ops::Deref for Uninit<T> {
    type Target = [MaybeUninit<T>];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Uninit<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `s` as the values written to it.
///
/// # Safety
///
/// Every element of `s` has been written.
#[inline(always)]
pub(crate) unsafe fn assume_init_ref<T>(s: &[MaybeUninit<T>]) -> &[T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and every element is initialised (the caller's
    // contract).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// `s` as the values written to it, for reading and writing.
///
/// # Safety
///
/// Every element of `s` has been written.
#[inline(always)]
pub(crate) unsafe fn assume_init_mut<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: as in `assume_init_ref`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// Writes `src` to `dst` (of the same length; one `memcpy`) and returns `dst` as values.
#[inline(always)]
pub(crate) fn write_copy<'a, T: Copy>(dst: &'a mut [MaybeUninit<T>], src: &[T]) -> &'a mut [T] {
    assert_eq!(dst.len(), src.len(), "write_copy: lengths differ");
    // SAFETY: `dst` holds `src.len()` elements of `T`'s layout and cannot overlap `src` (it is
    // borrowed exclusively); after the copy every element of `dst` is initialised.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), src.len());
        assume_init_mut(dst)
    }
}

/// Writes `v` to every element of `dst` and returns it as values.
#[inline(always)]
pub(crate) fn fill<T: Copy>(dst: &mut [MaybeUninit<T>], v: T) -> &mut [T] {
    dst.fill(MaybeUninit::new(v));
    // SAFETY: every element was just written.
    unsafe { assume_init_mut(dst) }
}

/// Whether the fast kernels handle tensors of this dtype and device.
pub fn supported(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Whether our CUDA kernels (convolutions, GroupNorm, attention, ...) take `t`: a CUDA tensor
/// of a float type, in a build with the `cuda` feature, unless the [`KernelPolicy`] says
/// `cuda_kernels = off`.
pub fn cuda_supported(t: &candle_core::Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::enabled() && cuda::supported(t)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// Whether the fused GroupNorm op ([`group_norm`]) runs for `t` (b, c, ...) in `groups` groups:
/// on the CPU ([`supported`]) or on CUDA ([`cuda_supported`], groups of at most 3072 channels).
pub fn group_norm_supported(t: &candle_core::Tensor, groups: usize) -> bool {
    #[cfg(feature = "cuda")]
    let cuda = cuda_supported(t) && t.rank() >= 2 && group_norm::cuda::fits(t.dims()[1], groups);
    #[cfg(not(feature = "cuda"))]
    let cuda = {
        let _ = groups;
        false
    };
    supported(t) || cuda
}

/// Threads to split work over.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f`, work on `device`, on one of rayon's worker threads while the caller waits (in
/// place when the caller is one already, or when `device` is not the CPU: a CUDA context is
/// bound to the thread that made it), and returns what it returns. Each parallel loop of our
/// kernels started from outside the pool is handed to its threads and waited for across
/// threads; started from inside, the calling worker takes part and the others steal. A whole
/// CPU training step run this way was 4-8% faster on 2 cores (`learnopencv`, `mnist-small`;
/// docs/benchmarks.md, "Kernel decisions").
pub fn on_pool<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(f())));
    out.expect("rayon::scope returns after its spawned work has run")
}

/// `dst (m x n) = [dst +] a (m x k) * b (k x n)` with explicit (row, column) strides; `dst` is
/// row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) {
    assert!(dst.len() >= m * n, "matmul: output too short");
    // SAFETY: dst holds the m*n row-major outputs, initialised (it is a `&mut [T]`); a and b
    // are checked by the callers' shapes.
    unsafe {
        gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr(), n),
            accumulate,
            (a, a_strides),
            (b, b_strides),
            par,
        )
    }
}

/// `dst (m x n) = a (m x k) * b (k x n)` into storage not yet written (no accumulation), as
/// [`matmul`]: writes the first `m * n` elements of `dst` and returns them as values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_to<'d, T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &'d mut [MaybeUninit<T>],
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) -> &'d mut [T] {
    let dst = &mut dst[..m * n];
    // SAFETY: dst holds the m*n row-major outputs; a and b are checked by the callers' shapes.
    // Without accumulation (`read_dst == false`) the gemm crate never reads dst: it sets alpha
    // to zero and stores `beta * a * b` (zeros when k == 0) to each of its m*n elements, after
    // which they are initialised.
    unsafe {
        gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr().cast::<T>(), n),
            false,
            (a, a_strides),
            (b, b_strides),
            par,
        );
        assume_init_mut(dst)
    }
}

/// `dst (m x n) = a (m x k) * b (k x n)` into storage not yet written, as [`matmul_to`], with
/// the rows of `dst` `dst.1` values apart (`dst.1 >= n`): writes `n` values at the start of each
/// of the m rows, nothing between them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_rows_to<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs): (&mut [MaybeUninit<T>], usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) {
    assert!(dst_rs >= n, "matmul: output rows overlap");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * dst_rs + n,
        "matmul: output too short"
    );
    // SAFETY: dst holds the m rows of n outputs, `dst_rs` apart; a and b are checked by the
    // callers' shapes. As in `matmul_to`, without accumulation dst is only written.
    unsafe {
        gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr().cast::<T>(), dst_rs),
            false,
            (a, a_strides),
            (b, b_strides),
            par,
        );
    }
}

/// `a (m x k) * b (k x n)` as a new row-major vector ([`matmul_to`] into fresh storage).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_new<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) -> Vec<T> {
    let mut dst = Uninit::new(m * n);
    matmul_to(m, n, k, &mut dst, a, a_strides, b, b_strides, par);
    // SAFETY: `matmul_to` wrote all m * n elements.
    unsafe { dst.assume_init() }
}

/// The `gemm` crate's product into `dst.0`, row-major (m x n) with rows `dst.1` apart, reading
/// it first when `accumulate`.
///
/// # Safety
///
/// `dst.0` is valid for writing the m rows of n elements (and initialised when `accumulate`);
/// `a` and `b` hold every element their strides address.
#[inline(always)]
unsafe fn gemm_raw<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (a, (a_rs, a_cs)): (&[T], (usize, usize)),
    (b, (b_rs, b_cs)): (&[T], (usize, usize)),
    par: Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `on_pool` runs CPU work on a rayon worker and returns its value; from a worker it runs
    /// in place.
    #[test]
    fn on_pool_runs_on_a_worker_thread() {
        let cpu = candle_core::Device::Cpu;
        let (index, inner) = on_pool(&cpu, || {
            let index = rayon::current_thread_index();
            let here = std::thread::current().id();
            (index, on_pool(&cpu, || std::thread::current().id() == here))
        });
        assert!(index.is_some(), "ran outside rayon's pool");
        assert!(inner, "a nested call moved to another thread");
        assert_eq!(on_pool(&cpu, || 6 * 7), 42);
    }

    /// `exp_f32` against f64's exp: relative error below 3e-7 over the range that matters,
    /// the clamped ends, and NaN.
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let want = (x as f32 as f64).exp();
            let got = exp_f32(x as f32) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 2e-38 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(1000.0) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// `matmul` against a direct triple loop, with transposed operands and accumulation.
    #[test]
    fn matmul_matches_direct_loops() {
        for (m, n, k) in [
            (3, 5, 4),
            (32, 128, 7),
            (17, 300, 33),
            (33, 200, 5),
            (1, 1000, 3),
        ] {
            for (a_t, b_t, acc) in [
                (false, false, false),
                (true, false, true),
                (false, true, true),
            ] {
                let a: Vec<f64> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f64 - 6.0) / 5.0)
                    .collect();
                let b: Vec<f64> = (0..k * n)
                    .map(|i| ((i * 11 % 17) as f64 - 8.0) / 3.0)
                    .collect();
                let a_s = if a_t { (1, m) } else { (k, 1) };
                let b_s = if b_t { (1, k) } else { (n, 1) };
                let init: Vec<f64> = (0..m * n).map(|i| (i % 5) as f64).collect();
                let mut got = init.clone();
                matmul(m, n, k, &mut got, acc, &a, a_s, &b, b_s, Parallelism::None);
                if !acc {
                    // Into storage not yet written (NaN in tests): the same values, all written.
                    let fresh = matmul_new(m, n, k, &a, a_s, &b, b_s, Parallelism::None);
                    assert_eq!(fresh, got, "{m}x{n}x{k} matmul_new");
                    let mut dst = Uninit::new(m * n + 3);
                    let to = matmul_to(m, n, k, &mut dst, &a, a_s, &b, b_s, Parallelism::None);
                    assert_eq!(&*to, &got[..], "{m}x{n}x{k} matmul_to");
                }
                for i in 0..m {
                    for j in 0..n {
                        let mut want = if acc { init[i * n + j] } else { 0.0 };
                        for p in 0..k {
                            want += a[i * a_s.0 + p * a_s.1] * b[p * b_s.0 + j * b_s.1];
                        }
                        let g = got[i * n + j];
                        assert!((g - want).abs() < 1e-9 * (1.0 + want.abs()), "{m}x{n}x{k}");
                    }
                }
            }
        }
    }

    /// The chunked sums against plain f64 sums, on lengths around the run and lane sizes.
    #[test]
    fn chunked_sums_match_f64_sums() {
        for len in [0usize, 1, 15, 16, 17, 255, 256, 257, 1000, 4099] {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let ys: Vec<f32> = (0..len).map(|i| ((i * 13 % 29) as f32) / 3.0).collect();
            let want: f64 = xs.iter().map(|&v| v as f64).sum();
            assert!(
                (sum(&xs, |v| v) - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{len}"
            );
            let want2: f64 = xs.iter().zip(&ys).map(|(&a, &b)| a as f64 * b as f64).sum();
            let got2 = sum2(&xs, &ys, |a, b| a * b);
            assert!((got2 - want2).abs() < 1e-4 * (1.0 + want2.abs()), "{len}");
        }
    }
}
