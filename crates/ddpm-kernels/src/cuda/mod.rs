//! What our CUDA kernels share (the `cuda` feature): the PTX of `kernels.cu` (compiled by
//! build.rs with nvcc from each op's `kernels.cu`, included there, and `common.cuh`), the
//! launch configurations, the typed views of candle's storages, [`launch`] (one kernel over
//! contiguous inputs into a fresh output: the CUDA side of the custom-op skeleton), the
//! differentiable gathers of [`gather`], and whether the policy has our CUDA kernels on.
//!
//! The kernels themselves sit with their ops: `conv/cuda.rs` (im2col/col2im on cuBLAS),
//! `group_norm/cuda.rs`, `attention/cuda.rs` (cuBLAS GEMMs and row softmaxes), `upsample/cuda.rs`
//! and `optim/cuda.rs` (AdamW, EMA and gradient-norm updates of all variables in one launch).
//! Every kernel takes f32, f64, f16 and bf16 (sums in f32, f64 for f64), except the optimizer
//! updates (f32 master weights): one block per (image, group) for GroupNorm, one warp per row
//! or plane for the softmax and the convolution output's backward, a grid-stride loop over the
//! output (16-byte vectors where the rows allow) for the others.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Tensor};

use crate::policy::CudaKernels;

/// The PTX of `cuda/kernels.cu`.
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ddpm_kernels.ptx"));
/// The module name the PTX is cached under in candle's device.
pub(crate) const MODULE: &str = "ddpm_unet_kernels";

/// Whether our CUDA kernels take `t`: a CUDA tensor of a float type.
pub fn supported(t: &Tensor) -> bool {
    // Empty tensors go to candle's ops: a kernel launch over zero blocks is an error.
    t.device().is_cuda()
        && t.elem_count() > 0
        && matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        )
}

/// The name of kernel `name` for `dtype` in kernels.cu, e.g. `im2col_bf16`.
pub(crate) fn kernel(name: &str, dtype: DType) -> String {
    format!("{name}_{}", dtype.as_str())
}

/// One block per plane of `len` elements (at most 256 threads, a whole number of warps).
pub(crate) fn per_plane(planes: usize, len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (planes as u32, 1, 1),
        block_dim: (len.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch over `n` elements with a grid-stride loop: 256 threads, at most 64k blocks.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `$body` with `$s` bound to the typed slice of a float [`CudaStorageSlice`] and `$t` to its
/// element type, wrapping the returned `CudaSlice` back into the same variant.
macro_rules! float_slices {
    ($what:literal, $slice:expr, |$s:ident: $t:ident| $body:expr) => {
        match $slice {
            CudaStorageSlice::F32($s) => {
                type $t = f32;
                CudaStorageSlice::F32($body)
            }
            CudaStorageSlice::F64($s) => {
                type $t = f64;
                CudaStorageSlice::F64($body)
            }
            CudaStorageSlice::F16($s) => {
                type $t = half::f16;
                CudaStorageSlice::F16($body)
            }
            CudaStorageSlice::BF16($s) => {
                type $t = half::bf16;
                CudaStorageSlice::BF16($body)
            }
            _ => candle_core::bail!("{} CUDA kernel: unsupported dtype", $what),
        }
    };
}

pub mod gather;

/// The typed slice of `s` starting at the layout's offset; errors unless contiguous.
pub(crate) fn view<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.slice(start..end)),
        None => candle_core::bail!("{what}: our CUDA kernels take contiguous tensors"),
    }
}

/// The typed slice of `storage` with `storage`'s own type `T`, or an error naming `what`.
pub(crate) fn same_type<'a, T: 'static>(
    storage: &'a CudaStorage,
    what: &str,
) -> Result<&'a CudaSlice<T>> {
    let any: &dyn std::any::Any = match &storage.slice {
        CudaStorageSlice::F32(s) => s,
        CudaStorageSlice::F64(s) => s,
        CudaStorageSlice::F16(s) => s,
        CudaStorageSlice::BF16(s) => s,
        _ => candle_core::bail!("{what}: unsupported dtype {:?}", storage.dtype()),
    };
    any.downcast_ref::<CudaSlice<T>>().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: dtype differs from the first input's"))
    })
}

/// Whether our CUDA kernels are on: unless the [`KernelPolicy`](crate::KernelPolicy) says
/// `cuda_kernels = off` (then convolutions and GroupNorm on CUDA are composed of candle's ops,
/// as before these kernels).
pub fn enabled() -> bool {
    crate::KernelPolicy::active().cuda_kernels != CudaKernels::Off
}

/// Whether the later CUDA kernels are on too (attention, 16-byte im2col/col2im, the gradient
/// norm's sums): unless the policy says `cuda_kernels = basic` (only the first set: scalar
/// im2col/col2im, GroupNorm, upsampling, optimizer updates) or `off`. For comparisons, and a way
/// around a kernel that fails its tests on some GPU.
pub fn extended() -> bool {
    crate::KernelPolicy::active().cuda_kernels == CudaKernels::All
}

/// A scalar argument of a kernel, after its pointers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// `uint32_t`.
    U32(u32),
    /// `int`.
    I32(i32),
    /// `double`.
    F64(f64),
}

impl Arg {
    fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        match self {
            Arg::U32(v) => launch.arg(v),
            Arg::I32(v) => launch.arg(v),
            Arg::F64(v) => launch.arg(v),
        };
    }
}

/// Runs kernel `name` (kernels.cu's, for the first input's float type) with `cfg` over the
/// contiguous `inputs` (all of the first one's dtype), a fresh output of `out_len` elements and
/// then `args`, in that order; returns the output.
///
/// # Safety
///
/// Kernel `name` takes (one pointer per input, the output's pointer, `args`) in that order,
/// reads the inputs within their lengths, and writes every one of the output's `out_len`
/// elements (which are not initialised before).
pub(crate) unsafe fn launch(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    out_len: usize,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<CudaStorage> {
    let Some(&(first, _)) = inputs.first() else {
        candle_core::bail!("{name}: a kernel launch without inputs");
    };
    let dev = first.device().clone();
    let func = dev.get_or_load_custom_func(&kernel(name, first.dtype()), MODULE, PTX)?;
    let slice = float_slices!("launch", &first.slice, |s: T| {
        let mut views = Vec::with_capacity(inputs.len());
        for (i, &(storage, l)) in inputs.iter().enumerate() {
            let typed = if i == 0 {
                s
            } else {
                same_type::<T>(storage, name)?
            };
            views.push(view(typed, l, name)?);
        }
        // SAFETY: the kernel writes every element (the caller's contract).
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let mut launch = func.builder();
        for v in &views {
            launch.arg(v);
        }
        launch.arg(&out);
        for a in args {
            a.push(&mut launch);
        }
        // SAFETY: the arguments match the kernel's signature (the caller's contract).
        unsafe { launch.launch(cfg) }.w()?;
        out
    });
    Ok(CudaStorage { slice, device: dev })
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the CUDA kernels' tests share: each kernel is checked against the CPU (candle's ops
    //! or our CPU kernels, themselves tested against candle's ops and finite differences),
    //! forward and every gradient. Skipped without a CUDA device, unless built with
    //! `DDPM_REQUIRE_CUDA=1` (the GPU builds).
    use candle_core::{DType, Device, Tensor};

    pub(crate) fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                // The GPU scripts build these tests with DDPM_REQUIRE_CUDA set (`cargo xtask
                // build-cuda`): there a missing device is a failure, not a skip.
                assert!(
                    option_env!("DDPM_REQUIRE_CUDA").is_none(),
                    "built with DDPM_REQUIRE_CUDA but there is no CUDA device: {e}"
                );
                eprintln!("skipped: no CUDA device ({e})");
                None
            }
        }
    }

    /// max |a - b| / max(max |b|, 1e-3), the tensors taken to the CPU in f32.
    pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let a = a
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = b
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(a.dims(), b.dims());
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.max(1e-3)
    }

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}
