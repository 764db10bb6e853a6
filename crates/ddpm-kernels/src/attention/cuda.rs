//! Softmax attention on CUDA ([`super::Attention`]'s CUDA passes): cuBLAS
//! strided-batched GEMMs that read q, k and v where they lie in the packed `qkv` and write the
//! output (backward: the packed gradient) where it belongs, with our row-softmax kernels between
//! them. Composed of candle's ops the same layer copies q, k, v and the transposed matrices
//! into contiguous tensors and runs a softmax of five kernels (with as many more backward).
//!
//! Per image and head, with q, k, v the (d, n) matrices of the head (n pixels, row-major):
//! forward `S = scale q^T k`, `P = softmax_rows(S)`, `out = v P^T`; backward (P recomputed)
//! `dv = dout P`, `dP = dout^T v`, `G = scale P * (dP - rowsum(dP * P))`, `dq = k G^T`,
//! `dk = q G`. cuBLAS is column-major: a row-major (r, c) matrix is its (c, r) transpose there,
//! so row-major `C = A B` is the call `C^T = B^T A^T` ([`Gemm::row_major`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result};

use super::Attention;
use crate::cuda::{kernel, same_type, view, MODULE, PTX};

/// Sizes of one call: `b` images, `heads` heads of `d` features over `n` pixels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    /// Images.
    pub b: usize,
    /// Heads.
    pub heads: usize,
    /// Features per head.
    pub d: usize,
    /// Pixels.
    pub n: usize,
}

impl Dims {
    /// Elements of one image's packed qkv.
    fn qkv_image(&self) -> usize {
        3 * self.heads * self.d * self.n
    }
    /// Elements of one image's output (and of one of its q, k, v).
    fn out_image(&self) -> usize {
        self.heads * self.d * self.n
    }
    /// Elements of the attention matrices of all images and heads.
    fn scores(&self) -> usize {
        self.b * self.heads * self.n * self.n
    }
    fn check(&self) -> Result<()> {
        let largest = self.scores().max(self.b * self.qkv_image());
        if largest > u32::MAX as usize || self.n.max(self.d) > i32::MAX as usize {
            candle_core::bail!("attention: {self:?} is too large for our CUDA kernels");
        }
        Ok(())
    }
}

/// Row-major `C = alpha A B` over a batch, operands given as (device address, leading
/// dimension of the row-major matrix as stored, stride between batch entries, transposed).
#[derive(Debug, Clone, Copy)]
struct Gemm {
    /// Rows of C.
    rows: usize,
    /// Columns of C.
    cols: usize,
    /// The inner dimension.
    inner: usize,
    /// Batch entries.
    batch: usize,
    alpha: f64,
}

/// One operand: address, leading dimension (row length as stored), batch stride, and whether
/// the stored matrix is the transpose of the operand.
#[derive(Debug, Clone, Copy)]
struct Operand {
    ptr: u64,
    ld: usize,
    stride: usize,
    transposed: bool,
}

impl Gemm {
    /// Runs `C = alpha A B` (row-major) as cuBLAS's column-major `C^T = B^T A^T`.
    ///
    /// # Safety
    /// The addresses must hold `batch` matrices of the stated sizes, leading dimensions and
    /// strides, of element type `dtype`, on the device's stream.
    unsafe fn row_major(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        a: Operand,
        b: Operand,
        c: Operand,
    ) -> Result<()> {
        let (data, compute) = match dtype {
            DType::F32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::F64 => (
                sys::cudaDataType_t::CUDA_R_64F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_64F,
            ),
            DType::F16 => (
                sys::cudaDataType_t::CUDA_R_16F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::BF16 => (
                sys::cudaDataType_t::CUDA_R_16BF,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            other => candle_core::bail!("attention GEMM: unsupported dtype {other:?}"),
        };
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // alpha and beta have the compute type's precision.
        let (alpha32, beta32, alpha64, beta64) = (self.alpha as f32, 0f32, self.alpha, 0f64);
        let (alpha, beta): (*const std::ffi::c_void, *const std::ffi::c_void) =
            if dtype == DType::F64 {
                (
                    (&alpha64 as *const f64).cast(),
                    (&beta64 as *const f64).cast(),
                )
            } else {
                (
                    (&alpha32 as *const f32).cast(),
                    (&beta32 as *const f32).cast(),
                )
            };
        let i = |v: usize| v as i32;
        let l = |v: usize| v as i64;
        let blas = dev.cublas_handle();
        // Column-major C^T (cols x rows) = op(B)^T (cols x inner) * op(A)^T (inner x rows):
        // B as stored is B^T in column-major terms (N), unless stored transposed (T).
        blas::gemm_strided_batched_ex(
            *blas.handle(),
            op(b.transposed),
            op(a.transposed),
            i(self.cols),
            i(self.rows),
            i(self.inner),
            alpha,
            b.ptr as *const _,
            data,
            i(b.ld),
            l(b.stride),
            a.ptr as *const _,
            data,
            i(a.ld),
            l(a.stride),
            beta,
            c.ptr as *mut _,
            data,
            i(c.ld),
            l(c.stride),
            i(self.batch),
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .w()
    }
}

/// One warp per row: 8 rows per block of 256 threads.
fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Address of element `offset` of a device allocation starting at `base`.
fn at<T>(base: u64, offset: usize) -> u64 {
    base + (offset * std::mem::size_of::<T>()) as u64
}

/// `S = scale q^T k` for every image and head into `s` (b, heads, n, n), then the row softmax
/// in place: `s` holds P.
fn probabilities<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    g: Dims,
    scale: f64,
    qkv: &CudaView<T>,
    s: &mut CudaSlice<T>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    {
        let (x, _gx) = qkv.device_ptr(&stream);
        let (sp, _gs) = s.device_ptr_mut(&stream);
        let (d, n, hd) = (g.d, g.n, g.heads);
        let gemm = Gemm {
            rows: n,
            cols: n,
            inner: d,
            batch: g.b,
            alpha: scale,
        };
        for h in 0..hd {
            let q = Operand {
                ptr: at::<T>(x, h * d * n),
                ld: n,
                stride: g.qkv_image(),
                transposed: true,
            };
            let k = Operand {
                ptr: at::<T>(x, (hd + h) * d * n),
                ld: n,
                stride: g.qkv_image(),
                transposed: false,
            };
            let out = Operand {
                ptr: at::<T>(sp, h * n * n),
                ld: n,
                stride: hd * n * n,
                transposed: false,
            };
            // SAFETY: q and k are (d, n) blocks of the packed qkv (b images of 3 heads d n),
            // s holds b * heads (n, n) matrices.
            unsafe { gemm.row_major(dev, dtype, q, k, out)? };
        }
    }
    let func = dev.get_or_load_custom_func(&kernel("softmax_rows", dtype), MODULE, PTX)?;
    let (rows, cols) = ((g.b * g.heads * g.n) as u32, g.n as u32);
    let mut launch = func.builder();
    launch.arg(&mut *s).arg(&rows).arg(&cols);
    // SAFETY: the arguments match the kernel's signature in kernels.cu.
    unsafe { launch.launch(rows_config(g.b * g.heads * g.n)) }.w()?;
    Ok(())
}

/// The forward pass: `out` (b, heads * d, n) from `qkv` (b, 3 * heads * d, n).
pub(crate) fn forward(
    op: &Attention,
    g: Dims,
    qkv: &CudaStorage,
    l: &Layout,
) -> Result<CudaStorage> {
    g.check()?;
    let dev = qkv.device().clone();
    let dtype = qkv.dtype();
    let slice = float_slices!("attention", &qkv.slice, |s: T| {
        let x = view(s, l, "attention qkv")?;
        // SAFETY: the GEMM writes every score, the softmax reads only those.
        let mut p = unsafe { dev.alloc::<T>(g.scores())? };
        probabilities(&dev, dtype, g, op.scale, &x, &mut p)?;
        // SAFETY: the GEMMs write every output element.
        let mut out = unsafe { dev.alloc::<T>(g.b * g.out_image())? };
        let stream = dev.cuda_stream();
        {
            let (xp, _gx) = x.device_ptr(&stream);
            let (pp, _gp) = p.device_ptr(&stream);
            let (op_, _go) = out.device_ptr_mut(&stream);
            let (d, n, hd) = (g.d, g.n, g.heads);
            let gemm = Gemm {
                rows: d,
                cols: n,
                inner: n,
                batch: g.b,
                alpha: 1.0,
            };
            for h in 0..hd {
                let v = Operand {
                    ptr: at::<T>(xp, (2 * hd + h) * d * n),
                    ld: n,
                    stride: g.qkv_image(),
                    transposed: false,
                };
                let pt = Operand {
                    ptr: at::<T>(pp, h * n * n),
                    ld: n,
                    stride: hd * n * n,
                    transposed: true,
                };
                let o = Operand {
                    ptr: at::<T>(op_, h * d * n),
                    ld: n,
                    stride: g.out_image(),
                    transposed: false,
                };
                // SAFETY: v is a (d, n) block of qkv, P (n, n) per image and head, out (d, n)
                // per image and head.
                unsafe { gemm.row_major(&dev, dtype, v, pt, o)? };
            }
        }
        out
    });
    Ok(CudaStorage { slice, device: dev })
}

/// The backward pass: the gradient of the packed `qkv` from `qkv` and the output gradient
/// `dout` (b, heads * d, n).
pub(crate) fn backward(
    op: &Attention,
    g: Dims,
    qkv: &CudaStorage,
    l: &Layout,
    dout: &CudaStorage,
    ldo: &Layout,
) -> Result<CudaStorage> {
    g.check()?;
    let dev = qkv.device().clone();
    let dtype = qkv.dtype();
    let func = dev.get_or_load_custom_func(&kernel("softmax_rows_bwd", dtype), MODULE, PTX)?;
    let slice = float_slices!("attention", &qkv.slice, |s: T| {
        let x = view(s, l, "attention qkv")?;
        let dys = same_type::<T>(dout, "attention gradient")?;
        let dy = view(dys, ldo, "attention gradient")?;
        // SAFETY: written in full by the GEMM before it is read.
        let mut p = unsafe { dev.alloc::<T>(g.scores())? };
        probabilities(&dev, dtype, g, op.scale, &x, &mut p)?;
        // SAFETY: written in full by the GEMM before it is read.
        let mut dp = unsafe { dev.alloc::<T>(g.scores())? };
        // SAFETY: dq, dk and dv are written in full by the GEMMs.
        let mut dx = unsafe { dev.alloc::<T>(g.b * g.qkv_image())? };
        let stream = dev.cuda_stream();
        let (d, n, hd) = (g.d, g.n, g.heads);
        let img = g.qkv_image();
        let scores = |ptr: u64, h: usize, transposed: bool| Operand {
            ptr: at::<T>(ptr, h * n * n),
            ld: n,
            stride: hd * n * n,
            transposed,
        };
        let part = |ptr: u64, h: usize, which: usize, transposed: bool| Operand {
            ptr: at::<T>(ptr, (which * hd + h) * d * n),
            ld: n,
            stride: img,
            transposed,
        };
        let grad = |ptr: u64, h: usize, transposed: bool| Operand {
            ptr: at::<T>(ptr, h * d * n),
            ld: n,
            stride: g.out_image(),
            transposed,
        };
        {
            let (xp, _gx) = x.device_ptr(&stream);
            let (yp, _gy) = dy.device_ptr(&stream);
            let (pp, _gp) = p.device_ptr(&stream);
            let (dpp, _gdp) = dp.device_ptr_mut(&stream);
            let (dxp, _gdx) = dx.device_ptr_mut(&stream);
            for h in 0..hd {
                // dv (d, n) = dout (d, n) P (n, n)
                let dv = Gemm {
                    rows: d,
                    cols: n,
                    inner: n,
                    batch: g.b,
                    alpha: 1.0,
                };
                // dP (n, n) = dout^T (n, d) v (d, n)
                let dpg = Gemm {
                    rows: n,
                    cols: n,
                    inner: d,
                    batch: g.b,
                    alpha: 1.0,
                };
                // SAFETY: every operand is a (d, n) block of qkv, dx or dout, or an (n, n)
                // matrix of P or dP, per image and head.
                unsafe {
                    dv.row_major(
                        &dev,
                        dtype,
                        grad(yp, h, false),
                        scores(pp, h, false),
                        part(dxp, h, 2, false),
                    )?;
                    dpg.row_major(
                        &dev,
                        dtype,
                        grad(yp, h, true),
                        part(xp, h, 2, false),
                        scores(dpp, h, false),
                    )?;
                }
            }
        }
        // G = scale P * (dP - rowsum(dP * P)), in place in dP.
        let (rows, cols) = ((g.b * g.heads * g.n) as u32, g.n as u32);
        let mut launch = func.builder();
        launch
            .arg(&p)
            .arg(&mut dp)
            .arg(&rows)
            .arg(&cols)
            .arg(&op.scale);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { launch.launch(rows_config(g.b * g.heads * g.n)) }.w()?;
        {
            let (xp, _gx) = x.device_ptr(&stream);
            let (gp, _gg) = dp.device_ptr(&stream);
            let (dxp, _gdx) = dx.device_ptr_mut(&stream);
            let gemm = Gemm {
                rows: d,
                cols: n,
                inner: n,
                batch: g.b,
                alpha: 1.0,
            };
            for h in 0..hd {
                // SAFETY: as above.
                unsafe {
                    // dq (d, n) = k (d, n) G^T (n, n)
                    gemm.row_major(
                        &dev,
                        dtype,
                        part(xp, h, 1, false),
                        scores(gp, h, true),
                        part(dxp, h, 0, false),
                    )?;
                    // dk (d, n) = q (d, n) G (n, n)
                    gemm.row_major(
                        &dev,
                        dtype,
                        part(xp, h, 0, false),
                        scores(gp, h, false),
                        part(dxp, h, 1, false),
                    )?;
                }
            }
        }
        dx
    });
    Ok(CudaStorage { slice, device: dev })
}

#[cfg(test)]
mod tests {
    use crate::cuda::testing::{gpu, randn, rel_err};
    use candle_core::{DType, Device, Var};

    /// Softmax attention on CUDA against our CPU attention op (tested against candle's ops and
    /// finite differences): output and the gradient of qkv, several heads, pixel counts that
    /// are not multiples of a warp, f32 and bf16.
    #[test]
    fn attention_matches_the_cpu_op() {
        use crate::attention::{attention, Attention, Kind};
        let Some(dev) = gpu() else { return };
        for (i, &(b, heads, d, h, w)) in [
            (2, 1, 8, 4, 5),
            (3, 2, 4, 3, 3),
            (1, 4, 16, 7, 1),
            (2, 1, 64, 16, 16),
        ]
        .iter()
        .enumerate()
        {
            let op = Attention {
                kind: Kind::Softmax,
                heads,
                dim_head: d,
                scale: (d as f64).powf(-0.5),
            };
            let qkv = randn(&[b, 3 * heads * d, h, w], 30 + i as u64);
            let probe = randn(&[b, heads * d, h, w], 40 + i as u64);
            let run = |dev: &Device, dtype: DType| {
                let x = Var::from_tensor(&qkv.to_device(dev).unwrap().to_dtype(dtype).unwrap())
                    .unwrap();
                let y = attention(&x, op).unwrap();
                let p = probe.to_device(dev).unwrap().to_dtype(dtype).unwrap();
                let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(&x).unwrap().clone())
            };
            let what = format!("attention b {b} heads {heads} d {d} pixels {h}x{w}");
            let (yc, gc) = run(&Device::Cpu, DType::F32);
            let (yg, gg) = run(&dev, DType::F32);
            assert!(
                rel_err(&yg, &yc) < 1e-4,
                "{what}: forward {}",
                rel_err(&yg, &yc)
            );
            assert!(
                rel_err(&gg, &gc) < 1e-4,
                "{what}: dqkv {}",
                rel_err(&gg, &gc)
            );
            let (yh, gh) = run(&dev, DType::BF16);
            assert!(
                rel_err(&yh, &yc) < 3e-2,
                "{what}: bf16 forward {}",
                rel_err(&yh, &yc)
            );
            assert!(
                rel_err(&gh, &gc) < 5e-2,
                "{what}: bf16 dqkv {}",
                rel_err(&gh, &gc)
            );
        }
    }
}
