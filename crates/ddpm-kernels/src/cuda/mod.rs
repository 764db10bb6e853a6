//! Our CUDA kernels (`cuda/kernels.cu`, compiled to PTX by build.rs with nvcc): im2col and
//! col2im, so that a convolution on CUDA is one gather, one cuBLAS GEMM and (backward) one
//! deterministic gather-sum, instead of candle's chain of pads, strided copies and a stack whose
//! backward zero-fills a full-size gradient per kernel tap; and the forward and backward passes of
//! [`super::group_norm::GroupNorm`] (GroupNorm + per-(image, channel) affine + SiLU + dropout,
//! one kernel each instead of some fifteen candle ops forward and thirty backward); softmax
//! attention (`cuda/attention.rs`: cuBLAS GEMMs on the packed qkv and our row-softmax kernels); and
//! multi-tensor updates (AdamW, the EMA and the gradient norm of all variables in one launch
//! each: [`adamw_multi`], [`axpby_multi`], [`sum_of_squares`]).
//!
//! Every kernel takes f32, f64, f16 and bf16 (sums in f32, f64 for f64), except the optimizer
//! updates (f32 master weights): one block per (image, group) for GroupNorm, one warp per row
//! or plane for the softmax and the convolution output's backward, a grid-stride loop over the
//! output (16-byte vectors where the rows allow) for the others.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::group_norm::{Dropout, GroupNorm};
use crate::policy::CudaKernels;

/// The PTX of `cuda/kernels.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ddpm_kernels.ptx"));
/// The module name the PTX is cached under in candle's device.
const MODULE: &str = "ddpm_unet_kernels";

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

/// Whether the GroupNorm kernels take `groups` groups of `channels`: the backward pass keeps
/// two sums per channel of a group in shared memory, at most 48 KiB (f64).
pub fn group_norm_fits(channels: usize, groups: usize) -> bool {
    groups > 0 && channels / groups * 2 * 8 <= 48 * 1024
}

/// The name of kernel `name` for `dtype` in kernels.cu, e.g. `im2col_bf16`.
fn kernel(name: &str, dtype: DType) -> String {
    format!("{name}_{}", dtype.as_str())
}

/// One block per plane of `len` elements (at most 256 threads, a whole number of warps).
fn per_plane(planes: usize, len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (planes as u32, 1, 1),
        block_dim: (len.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch over `n` elements with a grid-stride loop: 256 threads, at most 64k blocks.
fn elementwise(n: usize) -> LaunchConfig {
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

// After `float_slices!`, which it uses.
pub(crate) mod attention;

/// The typed slice of `s` starting at the layout's offset; errors unless contiguous.
fn view<'a, T>(
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
fn same_type<'a, T: 'static>(storage: &'a CudaStorage, what: &str) -> Result<&'a CudaSlice<T>> {
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

/// The geometry of a convolution's im2col: input (b, c, h, w), a kh x kw kernel, `stride`,
/// `pad` zeros before each spatial dimension, and the output size (oh, ow), which fixes the
/// padding after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfold {
    /// Batch.
    pub b: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// Zero rows/columns before the input.
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl Unfold {
    fn input_shape(&self) -> Shape {
        Shape::from((self.b, self.c, self.h, self.w))
    }
    /// (c * kh * kw, b * oh * ow): rows (channel, tap), columns (image, output pixel).
    fn cols_shape(&self) -> Shape {
        Shape::from((self.c * self.kh * self.kw, self.b * self.oh * self.ow))
    }
}

/// A gather whose adjoint is a gather too, each one CUDA kernel with one thread block per row
/// (one image's segment of an output row of `im2col`, one plane otherwise): the differentiable op is one of these, its
/// backward pass the [`Gather::adjoint`].
#[derive(Debug, Clone, Copy)]
enum Gather {
    /// (b, c, h, w) -> (c * kh * kw, b * oh * ow).
    Im2col(Unfold),
    /// (c * kh * kw, b * oh * ow) -> (b, c, h, w), the sum over the windows reading each input.
    Col2im(Unfold),
    /// Nearest 2x upsampling of `planes` planes of h x w.
    Upsample2x { planes: usize, h: usize, w: usize },
    /// Its adjoint: the sum of each 2 x 2 block.
    Upsample2xAdjoint { planes: usize, h: usize, w: usize },
}

impl Gather {
    fn adjoint(self) -> Self {
        match self {
            Self::Im2col(g) => Self::Col2im(g),
            Self::Col2im(g) => Self::Im2col(g),
            Self::Upsample2x { planes, h, w } => Self::Upsample2xAdjoint { planes, h, w },
            Self::Upsample2xAdjoint { planes, h, w } => Self::Upsample2x { planes, h, w },
        }
    }

    /// The kernel's name (without the dtype), the input and output element counts, the launch,
    /// and the kernel's u32 arguments after the two pointers. `vec`: elements of the dtype in
    /// 16 bytes; im2col and stride-1 col2im move that many per thread and tap (`*_vec`
    /// kernels) where the rows are whole multiples of it, else one (`vec` 1: always one).
    fn plan(&self, vec: usize) -> (&'static str, usize, usize, LaunchConfig, Vec<u32>) {
        let u = |v: usize| v as u32;
        match *self {
            Self::Im2col(g) | Self::Col2im(g) => {
                let args = [g.b, g.c, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.oh, g.ow];
                let (image, cols) = (g.input_shape().elem_count(), g.cols_shape().elem_count());
                let args = args.map(u).to_vec();
                if let Self::Im2col(_) = self {
                    // One thread per (channel, image, output row, vec output columns).
                    let threads = g.c * g.b * g.oh * g.ow;
                    if vec > 1 && g.ow.is_multiple_of(vec) {
                        ("im2col_vec", image, cols, elementwise(threads / vec), args)
                    } else {
                        ("im2col", image, cols, elementwise(threads), args)
                    }
                } else if vec > 1 && g.stride == 1 && g.w.is_multiple_of(vec) {
                    ("col2im_vec", cols, image, elementwise(image / vec), args)
                } else {
                    ("col2im", cols, image, elementwise(image), args)
                }
            }
            Self::Upsample2x { planes, h, w } => {
                let n = planes * h * w;
                let cfg = per_plane(planes, 4 * h * w);
                ("upsample2x", n, 4 * n, cfg, vec![u(h), u(w)])
            }
            Self::Upsample2xAdjoint { planes, h, w } => {
                let n = planes * h * w;
                let cfg = per_plane(planes, h * w);
                ("upsample2x_adjoint", 4 * n, n, cfg, vec![u(h), u(w)])
            }
        }
    }

    /// The output's shape for an input of shape `input`.
    fn out_shape(&self, input: &Shape) -> Shape {
        match *self {
            Self::Im2col(g) => g.cols_shape(),
            Self::Col2im(g) => g.input_shape(),
            Self::Upsample2x { h, w, .. } | Self::Upsample2xAdjoint { h, w, .. } => {
                let mut dims = input.dims().to_vec();
                let r = dims.len();
                (dims[r - 2], dims[r - 1]) = match self {
                    Self::Upsample2x { .. } => (2 * h, 2 * w),
                    _ => (h, w),
                };
                Shape::from(dims)
            }
        }
    }

    fn launch(&self, src: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let vec = if extended() {
            16 / src.dtype().size_in_bytes()
        } else {
            1
        };
        let (name, in_len, out_len, cfg, args) = self.plan(vec);
        if l.shape().elem_count() != in_len {
            candle_core::bail!("{name}: input of shape {:?} for {self:?}", l.shape());
        }
        // The kernels' 32-bit grid-stride index must not wrap (see `span`).
        if in_len.max(out_len) > (u32::MAX as usize) - (1 << 24) {
            candle_core::bail!("{name}: tensors over 2^32 - 2^24 elements are not supported");
        }
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.0 > i32::MAX as u32 {
            candle_core::bail!(
                "{name}: {} thread blocks is outside CUDA's grid for {self:?}",
                cfg.grid_dim.0
            );
        }
        let dev = src.device().clone();
        let func = dev.get_or_load_custom_func(&kernel(name, src.dtype()), MODULE, PTX)?;
        let slice = float_slices!("gather", &src.slice, |s: T| {
            let input = view(s, l, name)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(out_len)? };
            let mut launch = func.builder();
            launch.arg(&input);
            launch.arg(&out);
            for a in &args {
                launch.arg(a);
            }
            // SAFETY: the arguments match the kernel's signature in kernels.cu.
            unsafe { launch.launch(cfg) }.w()?;
            out
        });
        Ok(CudaStorage { slice, device: dev })
    }
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "ddpm-gather"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("{self:?} is a CUDA kernel (the CPU has its own kernels)")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((self.launch(s, l)?, self.out_shape(l.shape())))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(self.adjoint())?))
    }
}

/// The im2col matrix (c * kh * kw, b * oh * ow) of `x` (b, c, h, w) for a convolution with
/// geometry `g` (differentiable: its backward pass is col2im).
pub fn im2col(x: &Tensor, g: Unfold) -> Result<Tensor> {
    let expected = g.input_shape();
    if x.shape() != &expected {
        candle_core::bail!("im2col: expected shape {expected:?}, got {:?}", x.shape());
    }
    x.contiguous()?.apply_op1(Gather::Im2col(g))
}

/// Nearest-neighbour 2x upsampling of `x` (..., h, w) to (..., 2h, 2w) (differentiable: its
/// backward pass sums each 2 x 2 block).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("upsample_nearest_2x: expected (..., h, w), got {dims:?}");
    }
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let planes = x.elem_count() / (h * w).max(1);
    x.contiguous()?
        .apply_op1(Gather::Upsample2x { planes, h, w })
}

/// The kernel arguments of [`GroupNorm`]'s activation and dropout, in kernels.cu's order.
struct PostArgs {
    silu: i32,
    dropout: i32,
    threshold: u32,
    s1: u32,
    s2: u32,
    keep: f64,
}

impl PostArgs {
    fn new(op: &GroupNorm) -> Self {
        let (dropout, threshold, s1, s2, keep) = match op.dropout.filter(|d| d.p > 0.0) {
            Some(d) => {
                let (threshold, s1, s2) = Dropout::hash_params(&d);
                (1, threshold, s1, s2, 1.0 / (1.0 - d.p))
            }
            None => (0, 0, 0, 0, 1.0),
        };
        Self {
            silu: op.silu as i32,
            dropout,
            threshold,
            s1,
            s2,
            keep,
        }
    }
    fn push<'a>(&'a self, launch: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
        launch.arg(&self.silu);
        launch.arg(&self.dropout);
        launch.arg(&self.threshold);
        launch.arg(&self.s1);
        launch.arg(&self.s2);
        launch.arg(&self.keep);
    }
}

/// (b, c, hw) of a GroupNorm input, checked against `groups`.
fn gn_dims(l: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
    let dims = l.dims();
    if dims.len() < 2 {
        candle_core::bail!("group_norm: expected (b, c, ...), got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
    }
    if l.shape().elem_count() + 2 * b * c > u32::MAX as usize {
        candle_core::bail!("group_norm: tensors over 2^32 elements are not supported");
    }
    Ok((b, c, dims[2..].iter().product()))
}

/// Dynamic shared memory a GroupNorm kernel may ask for: CUDA's 48 KiB without opting in,
/// less the kernels' static scratch.
const SHARED_LIMIT: usize = 46 * 1024;

/// One block per (image, group): 256 threads, or 128 for small groups.
fn per_group(blocks: usize, group_len: usize, shared: usize) -> LaunchConfig {
    let threads = if group_len >= 2048 { 256 } else { 128 };
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

fn check_len(l: &Layout, len: usize, what: &str) -> Result<()> {
    if l.shape().elem_count() != len {
        candle_core::bail!(
            "group_norm: {what} has {} elements, expected {len}",
            l.shape().elem_count()
        );
    }
    Ok(())
}

/// [`GroupNorm`]'s forward pass on CUDA: `y` from `x`, `a`, `d` (b, c).
#[allow(clippy::too_many_arguments)]
pub(super) fn group_norm_fwd(
    op: &GroupNorm,
    x: &CudaStorage,
    lx: &Layout,
    a: &CudaStorage,
    la: &Layout,
    d: &CudaStorage,
    ld: &Layout,
) -> Result<CudaStorage> {
    let (b, c, hw) = gn_dims(lx, op.groups)?;
    check_len(la, b * c, "a")?;
    check_len(ld, b * c, "d")?;
    let dev = x.device().clone();
    let len = c / op.groups * hw;
    // The group in shared memory where it fits (and the later kernels are on).
    let shared = len * x.dtype().size_in_bytes();
    let (name, shared) = if extended() && shared <= SHARED_LIMIT {
        ("group_norm_fwd_shared", shared)
    } else {
        ("group_norm_fwd", 0)
    };
    let func = dev.get_or_load_custom_func(&kernel(name, x.dtype()), MODULE, PTX)?;
    let post = PostArgs::new(op);
    let (groups, c32, hw32) = (op.groups as u32, c as u32, hw as u32);
    let cfg = per_group(b * op.groups, len, shared);
    let slice = float_slices!("group_norm", &x.slice, |s: T| {
        let xs = view(s, lx, "group_norm x")?;
        let av = view(same_type::<T>(a, "group_norm a")?, la, "group_norm a")?;
        let dv = view(same_type::<T>(d, "group_norm d")?, ld, "group_norm d")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(lx.shape().elem_count())? };
        let mut launch = func.builder();
        launch.arg(&xs).arg(&av).arg(&dv).arg(&y);
        launch.arg(&groups).arg(&c32).arg(&hw32).arg(&op.eps);
        post.push(&mut launch);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { launch.launch(cfg) }.w()?;
        y
    });
    Ok(CudaStorage { slice, device: dev })
}

/// [`GroupNorm`]'s backward pass on CUDA: `[dx | da | dd]` from `x`, `[a | d]` and the output
/// gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn group_norm_bwd(
    op: &GroupNorm,
    x: &CudaStorage,
    lx: &Layout,
    ad: &CudaStorage,
    lad: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<(CudaStorage, usize)> {
    let (b, c, hw) = gn_dims(lx, op.groups)?;
    check_len(lad, 2 * b * c, "[a | d]")?;
    check_len(ldy, lx.shape().elem_count(), "the gradient")?;
    let dev = x.device().clone();
    let post = PostArgs::new(op);
    let cg = c / op.groups;
    let acc = if x.dtype() == DType::F64 { 8 } else { 4 };
    // The accumulators, then (where it fits) the group of x and of the gradient.
    let sums = (2 * cg * acc).next_multiple_of(16);
    let shared = sums + 2 * cg * hw * x.dtype().size_in_bytes();
    let (name, shared) = if extended() && shared <= SHARED_LIMIT {
        ("group_norm_bwd_shared", shared)
    } else {
        ("group_norm_bwd", 2 * cg * acc)
    };
    let func = dev.get_or_load_custom_func(&kernel(name, x.dtype()), MODULE, PTX)?;
    let cfg = per_group(b * op.groups, cg * hw, shared);
    let (b32, groups, c32, hw32) = (b as u32, op.groups as u32, c as u32, hw as u32);
    let out_len = lx.shape().elem_count() + 2 * b * c;
    let slice = float_slices!("group_norm", &x.slice, |s: T| {
        let xs = view(s, lx, "group_norm x")?;
        let adv = view(
            same_type::<T>(ad, "group_norm [a | d]")?,
            lad,
            "group_norm [a | d]",
        )?;
        let dyv = view(
            same_type::<T>(dy, "group_norm grad")?,
            ldy,
            "group_norm grad",
        )?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(out_len)? };
        let mut launch = func.builder();
        launch.arg(&xs).arg(&adv).arg(&dyv).arg(&out);
        launch
            .arg(&b32)
            .arg(&groups)
            .arg(&c32)
            .arg(&hw32)
            .arg(&op.eps);
        post.push(&mut launch);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { launch.launch(cfg) }.w()?;
        out
    });
    Ok((CudaStorage { slice, device: dev }, out_len))
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

/// Convolution of `x` (b, c, h, w) with `weight` (c_out, c, kh, kw) plus `bias` (c_out, or
/// (b, c_out) for a bias per image): `pads.0` zeros before and `pads.1` after each spatial
/// dimension. Our im2col, one cuBLAS GEMM `weight (c_out, c kh kw) x cols (c kh kw, b oh ow)`,
/// and our [`ConvOut`] kernel (the GEMM's (c_out, b, oh ow) result transposed to
/// (b, c_out, oh, ow), the bias added). Backward: two GEMMs (the weight gradient one product
/// over all images), col2im, and [`ConvOut`]'s transpose with the bias gradient's sums.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pads: (usize, usize),
) -> Result<Tensor> {
    let geom = super::conv::Geom::new(x.dims(), weight.dims(), stride, pads.0, pads.1)?;
    let (b, c_out, oh, ow) = (geom.b, geom.o, geom.ho, geom.wo);
    let g = Unfold {
        b,
        c: geom.c,
        h: geom.h,
        w: geom.w,
        kh: geom.kh,
        kw: geom.kw,
        stride: geom.stride,
        pad: geom.pad,
        oh,
        ow,
    };
    let yt = weight
        .reshape((c_out, g.c * g.kh * g.kw))?
        .matmul(&im2col(x, g)?)?;
    let bias = match bias {
        Some(v) if v.elem_count() == c_out => v.reshape((1, c_out))?,
        Some(v) if v.elem_count() == b * c_out => v.reshape((b, c_out))?,
        Some(v) => candle_core::bail!(
            "conv2d: bias of shape {:?} for {c_out} output channels and {b} images",
            v.dims()
        ),
        None => Tensor::zeros((1, c_out), x.dtype(), x.device())?,
    };
    yt.apply_op2(&bias.contiguous()?, ConvOut { b, c_out, oh, ow })
}

/// A convolution's output from its GEMM: (c_out, b oh ow) -> (b, c_out, oh, ow), plus a bias
/// (rows, c_out) with one row, or one per image.
#[derive(Debug, Clone, Copy)]
struct ConvOut {
    b: usize,
    c_out: usize,
    oh: usize,
    ow: usize,
}

/// [`ConvOut`]'s backward: the output gradient transposed back, and its per-plane sums.
#[derive(Debug, Clone, Copy)]
struct ConvOutBackward(ConvOut);

impl ConvOut {
    fn len(&self) -> usize {
        self.b * self.c_out * self.oh * self.ow
    }
    /// Elements per thread (forward) or per lane and step (backward): 16 bytes of `dtype`
    /// where planes are whole multiples of it and the later kernels are on, else one.
    fn vec(&self, dtype: DType) -> usize {
        let v = 16 / dtype.size_in_bytes();
        if extended() && (self.oh * self.ow).is_multiple_of(v) {
            v
        } else {
            1
        }
    }
    /// The forward kernel and its launch: a grid-stride loop over vectors of a plane.
    fn forward_launch(&self, dtype: DType) -> (&'static str, LaunchConfig) {
        match self.vec(dtype) {
            1 => ("conv_out", elementwise(self.len())),
            v => ("conv_out_vec", elementwise(self.len() / v)),
        }
    }
    /// The backward kernel and its launch: one warp per plane, 8 per block.
    fn backward_launch(&self, dtype: DType) -> (&'static str, LaunchConfig) {
        let name = match self.vec(dtype) {
            1 => "conv_out_bwd",
            _ => "conv_out_bwd_vec",
        };
        let cfg = LaunchConfig {
            grid_dim: ((self.b * self.c_out).div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        (name, cfg)
    }
    fn dims(&self) -> [u32; 3] {
        [self.b, self.c_out, self.oh * self.ow].map(|v| v as u32)
    }
}

impl candle_core::CustomOp2 for ConvOut {
    fn name(&self) -> &'static str {
        "ddpm-conv-out"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("ddpm-conv-out is a CUDA kernel (the CPU has its own convolution)")
    }
    fn cuda_fwd(
        &self,
        yt: &CudaStorage,
        ly: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let rows = lb.shape().elem_count() / self.c_out.max(1);
        if ly.shape().elem_count() != self.len() || !(rows == 1 || rows == self.b) {
            candle_core::bail!(
                "{}: shapes {:?}, {:?} for {self:?}",
                self.name(),
                ly.shape(),
                lb.shape()
            );
        }
        if self.len() + self.b * self.c_out > (u32::MAX as usize) - (1 << 24) {
            candle_core::bail!(
                "{}: tensors over 2^32 - 2^24 elements are not supported",
                self.name()
            );
        }
        let dev = yt.device().clone();
        let (name, cfg) = self.forward_launch(yt.dtype());
        let func = dev.get_or_load_custom_func(&kernel(name, yt.dtype()), MODULE, PTX)?;
        let (dims, rows) = (self.dims(), rows as u32);
        let slice = float_slices!("conv_out", &yt.slice, |s: T| {
            let ys = view(s, ly, "conv_out")?;
            let bv = view(same_type::<T>(bias, "conv_out bias")?, lb, "conv_out bias")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(self.len())? };
            let mut launch = func.builder();
            launch.arg(&ys).arg(&bv).arg(&out);
            launch.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&rows);
            // SAFETY: the arguments match the kernel's signature in kernels.cu.
            unsafe { launch.launch(cfg) }.w()?;
            out
        });
        let shape = Shape::from((self.b, self.c_out, self.oh, self.ow));
        Ok((CudaStorage { slice, device: dev }, shape))
    }
    fn bwd(
        &self,
        yt: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = grad.contiguous()?.apply_op1(ConvOutBackward(*self))?;
        let dyt = packed.narrow(0, 0, self.len())?.reshape(yt.shape())?;
        let per_image = packed.narrow(0, self.len(), self.b * self.c_out)?;
        let dbias = if bias.elem_count() == self.c_out {
            per_image.reshape((self.b, self.c_out))?.sum_keepdim(0)?
        } else {
            per_image
        };
        Ok((Some(dyt), Some(dbias.reshape(bias.shape())?)))
    }
}

impl CustomOp1 for ConvOutBackward {
    fn name(&self) -> &'static str {
        "ddpm-conv-out-backward"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("ddpm-conv-out-backward is a CUDA kernel")
    }
    fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.0;
        if lg.shape().elem_count() != op.len() {
            candle_core::bail!(
                "{}: gradient of shape {:?} for {op:?}",
                self.name(),
                lg.shape()
            );
        }
        let dev = g.device().clone();
        let (name, cfg) = op.backward_launch(g.dtype());
        let func = dev.get_or_load_custom_func(&kernel(name, g.dtype()), MODULE, PTX)?;
        let dims = op.dims();
        let out_len = op.len() + op.b * op.c_out;
        let slice = float_slices!("conv_out_bwd", &g.slice, |s: T| {
            let gs = view(s, lg, "conv_out_bwd")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(out_len)? };
            let mut launch = func.builder();
            launch.arg(&gs).arg(&out);
            launch.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
            // SAFETY: the arguments match the kernel's signature in kernels.cu.
            unsafe { launch.launch(cfg) }.w()?;
            out
        });
        Ok((CudaStorage { slice, device: dev }, Shape::from(out_len)))
    }
}

/// The f32 slice of a contiguous CUDA storage, or an error naming `what`.
fn f32_slice<'a>(s: &'a CudaStorage, what: &str) -> Result<&'a CudaSlice<f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: needs an f32 tensor, got {:?}", s.dtype()),
    }
}

/// `(start, len)` of a contiguous layout of `n` elements, or an error naming `what`.
fn span(l: &Layout, n: Option<usize>, what: &str) -> Result<(usize, usize)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: needs a contiguous tensor");
    };
    if n.is_some_and(|n| n != b - a) {
        candle_core::bail!(
            "{what}: operand of {} elements for a destination of {n:?}",
            b - a
        );
    }
    // The kernels' 32-bit grid-stride index must not wrap: n plus one grid (at most 2^24
    // threads, see `elementwise`) stays below 2^32.
    if b - a > (u32::MAX as usize) - (1 << 24) {
        candle_core::bail!("{what}: tensors over 2^32 - 2^24 elements are not supported");
    }
    Ok((a, b - a))
}

/// In place on f32: `dst = keep * dst + take * f(scale * src)`, `f` the square when `square`
/// (AdamW's second moment), else the identity (its first moment, the EMA).
#[derive(Debug, Clone, Copy)]
pub struct Axpby {
    /// Factor of the old value.
    pub keep: f32,
    /// Factor of the new term.
    pub take: f32,
    /// Factor of the source before `f`.
    pub scale: f32,
    /// Square the scaled source.
    pub square: bool,
}

impl candle_core::InplaceOp2 for Axpby {
    fn name(&self) -> &'static str {
        "ddpm-axpby"
    }
    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("ddpm-axpby is a CUDA kernel (the CPU has its own in-place updates)")
    }
    fn cuda_fwd(
        &self,
        d: &mut CudaStorage,
        ld: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<()> {
        let (d0, n) = span(ld, None, self.name())?;
        let (s0, _) = span(ls, Some(n), self.name())?;
        let dev = d.device().clone();
        let func = dev.get_or_load_custom_func("axpby_f32", MODULE, PTX)?;
        let src = f32_slice(s, self.name())?.slice(s0..s0 + n);
        let CudaStorageSlice::F32(dst) = &mut d.slice else {
            candle_core::bail!("{}: needs an f32 destination", self.name());
        };
        let mut dst = dst.slice_mut(d0..d0 + n);
        let (n32, square) = (n as u32, self.square as i32);
        let mut launch = func.builder();
        launch.arg(&mut dst).arg(&src).arg(&n32);
        launch
            .arg(&self.keep)
            .arg(&self.take)
            .arg(&self.scale)
            .arg(&square);
        // SAFETY: the arguments match the kernel's signature in kernels.cu.
        unsafe { launch.launch(elementwise(n)) }.w()?;
        Ok(())
    }
}

/// AdamW's in-place update of f32 variables `p` from the moments `m`, `v`:
/// `p = p * decay - lr * (m * inv_bc1) / (sqrt(v * inv_bc2) + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    p: &mut CudaStorage,
    lp: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    [decay, inv_bc1, inv_bc2, lr, eps]: [f32; 5],
) -> Result<()> {
    let what = "adamw-update";
    let (p0, n) = span(lp, None, what)?;
    let (m0, _) = span(lm, Some(n), what)?;
    let (v0, _) = span(lv, Some(n), what)?;
    let dev = p.device().clone();
    let func = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
    let mv = f32_slice(m, what)?.slice(m0..m0 + n);
    let vv = f32_slice(v, what)?.slice(v0..v0 + n);
    let CudaStorageSlice::F32(ps) = &mut p.slice else {
        candle_core::bail!("{what}: needs f32 variables");
    };
    let mut pv = ps.slice_mut(p0..p0 + n);
    let n32 = n as u32;
    let mut launch = func.builder();
    launch.arg(&mut pv).arg(&mv).arg(&vv).arg(&n32);
    launch
        .arg(&decay)
        .arg(&inv_bc1)
        .arg(&inv_bc2)
        .arg(&lr)
        .arg(&eps);
    // SAFETY: the arguments match the kernel's signature in kernels.cu.
    unsafe { launch.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// One group of tensors of a multi-tensor kernel (kernels.cu's `Slot`): up to four f32
/// tensors of `n` elements, and the first thread block that works on them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    ptr: [u64; 4],
    n: u32,
    first_block: u32,
}

// SAFETY: plain data laid out as kernels.cu's `Slot` (four u64, two u32; repr(C)).
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Slot {}

/// Elements per thread block of the multi-tensor kernels (kernels.cu's `MULTI_CHUNK`).
const MULTI_CHUNK: usize = 4096;

/// The device address of the first element of a contiguous f32 CUDA tensor, and its length.
fn f32_address(t: &Tensor, what: &str) -> Result<(u64, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("{what}: expected CUDA tensors, got one on {:?}", t.device());
    };
    let (start, n) = span(layout, None, what)?;
    let slice = f32_slice(s, what)?;
    let stream = s.device.cuda_stream();
    let (ptr, _guard) = slice.device_ptr(&stream);
    Ok((ptr + (start * std::mem::size_of::<f32>()) as u64, n))
}

/// The slots of `groups` (each group's tensors of one length; empty groups left out) on the
/// device of the first tensor, and the thread blocks they take.
fn slots<const K: usize>(
    groups: &[[&Tensor; K]],
    what: &str,
) -> Result<Option<(candle_core::CudaDevice, CudaSlice<Slot>, usize)>> {
    let Some(first) = groups.first() else {
        return Ok(None);
    };
    let candle_core::Device::Cuda(dev) = first[0].device() else {
        candle_core::bail!("{what}: expected CUDA tensors");
    };
    let mut out = Vec::with_capacity(groups.len());
    let mut blocks = 0usize;
    for group in groups {
        let mut slot = Slot::default();
        for (i, t) in group.iter().enumerate() {
            if !t.device().same_device(first[0].device()) {
                candle_core::bail!("{what}: tensors on different devices");
            }
            let (ptr, n) = f32_address(t, what)?;
            if i > 0 && n != slot.n as usize {
                candle_core::bail!(
                    "{what}: tensors of {} and {n} elements in one group",
                    slot.n
                );
            }
            slot.ptr[i] = ptr;
            slot.n = n as u32;
        }
        if slot.n == 0 {
            continue;
        }
        slot.first_block = blocks as u32;
        blocks += (slot.n as usize).div_ceil(MULTI_CHUNK);
        out.push(slot);
    }
    if out.is_empty() {
        return Ok(None);
    }
    if blocks > i32::MAX as usize {
        candle_core::bail!("{what}: {blocks} thread blocks is outside CUDA's grid");
    }
    let slots = dev.clone_htod(&out)?;
    Ok(Some((dev.clone(), slots, blocks)))
}

/// A launch of `blocks` blocks of 256 threads (the multi-tensor kernels).
fn multi_config(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The sum of the squares of all elements of `tensors` (contiguous f32 CUDA tensors of one
/// device), in f64: one kernel for all of them writes per-block partial sums, read back once
/// and added on the host in a fixed order (the same result every run), instead of a square, a
/// `sum_all` and a stack per gradient.
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    let groups: Vec<[&Tensor; 1]> = tensors.iter().map(|&t| [t]).collect();
    let Some((dev, slots, blocks)) = self::slots(&groups, "sum-of-squares")? else {
        return Ok(0.0);
    };
    let func = dev.get_or_load_custom_func("sumsq_multi_f32", MODULE, PTX)?;
    // SAFETY: every block writes its partial.
    let partials = unsafe { dev.alloc::<f64>(blocks)? };
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&partials);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds, and one partial per block.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(dev.clone_dtoh(&partials)?.iter().sum())
}

/// AdamW's factors for one step of [`adamw_multi`], in f32 as the kernels use them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWFactors {
    /// Multiplies every gradient first (the clipping factor).
    pub scale: f32,
    /// beta1 and 1 - beta1.
    pub first: [f32; 2],
    /// beta2 and 1 - beta2.
    pub second: [f32; 2],
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `1 / (1 - beta1^t)`.
    pub inv_bc1: f32,
    /// `1 / (1 - beta2^t)`.
    pub inv_bc2: f32,
    /// The learning rate.
    pub lr: f32,
    /// Added to the denominator.
    pub eps: f32,
}

/// One AdamW step for every group `[p, m, v, g]` (contiguous f32 CUDA tensors) in one kernel
/// launch: the moments and the variables are overwritten where they are, with the arithmetic
/// of [`Axpby`] (for m, then v) followed by [`adamw_update`].
///
/// `p`, `m` and `v` are written although only read access to them is taken: they must be the
/// caller's own buffers (an optimizer's variables and moments), not shared with other tensors.
pub fn adamw_multi(groups: &[[&Tensor; 4]], f: &AdamWFactors) -> Result<()> {
    let Some((dev, slots, blocks)) = slots(groups, "adamw-multi")? else {
        return Ok(());
    };
    let func = dev.get_or_load_custom_func("adamw_multi_f32", MODULE, PTX)?;
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&f.scale);
    launch.arg(&f.first[0]).arg(&f.first[1]);
    launch.arg(&f.second[0]).arg(&f.second[1]);
    launch.arg(&f.decay).arg(&f.inv_bc1).arg(&f.inv_bc2);
    launch.arg(&f.lr).arg(&f.eps);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(())
}

/// `dst = keep * dst + take * src` for every pair `[dst, src]` (contiguous f32 CUDA tensors) in
/// one kernel launch: an EMA of all variables. `dst` is written although only read access is
/// taken: it must be the caller's own buffer.
pub fn axpby_multi(pairs: &[[&Tensor; 2]], keep: f32, take: f32) -> Result<()> {
    let Some((dev, slots, blocks)) = slots(pairs, "axpby-multi")? else {
        return Ok(());
    };
    let func = dev.get_or_load_custom_func("axpby_multi_f32", MODULE, PTX)?;
    let count = slots.len() as u32;
    let mut launch = func.builder();
    launch.arg(&slots).arg(&count).arg(&keep).arg(&take);
    // SAFETY: the arguments match the kernel's signature in kernels.cu; the slots address
    // tensors the caller holds.
    unsafe { launch.launch(multi_config(blocks)) }.w()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each CUDA kernel against the CPU: candle's convolution and our CPU GroupNorm kernel
    //! (itself tested against candle's ops and finite differences), forward and every gradient.
    //! Skipped without a CUDA device, unless built with `DDPM_REQUIRE_CUDA=1` (the GPU builds).
    use super::*;
    use crate::group_norm::Dropout;
    use candle_core::{Device, Var};

    fn gpu() -> Option<Device> {
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
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
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

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rand_distr::StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Forward, input, weight and bias gradients of our CUDA convolution against candle's CPU
    /// conv2d (the end padding as an explicitly padded input) plus a broadcast bias, with a
    /// weighted sum as the loss. `bias_rows`: 0 (no bias), 1 (per channel) or the batch.
    fn check_conv(
        dev: &Device,
        x: &[usize],
        c_out: usize,
        k: usize,
        stride: usize,
        pads: (usize, usize),
        bias_rows: usize,
    ) {
        let xc = randn(x, 1);
        let wc = randn(&[c_out, x[1], k, k], 2);
        let bc = randn(&[bias_rows.max(1), c_out], 4);
        let var = |t: &Tensor, dev: &Device| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap();
        let (xv, wv, bv) = (
            var(&xc, &Device::Cpu),
            var(&wc, &Device::Cpu),
            var(&bc, &Device::Cpu),
        );
        let xp = xv
            .pad_with_zeros(2, pads.0, pads.1)
            .unwrap()
            .pad_with_zeros(3, pads.0, pads.1)
            .unwrap();
        let mut yc = xp.conv2d(&wv, 0, stride, 1, 1).unwrap();
        if bias_rows > 0 {
            let b4 = bv.reshape((bias_rows, c_out, 1, 1)).unwrap();
            yc = yc.broadcast_add(&b4).unwrap();
        }
        let probe = randn(yc.dims(), 3);
        let gc = (&yc * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let (xg, wg, bg) = (var(&xc, dev), var(&wc, dev), var(&bc, dev));
        let bias = (bias_rows > 0).then_some(bg.as_tensor());
        let yg = conv2d(&xg, &wg, bias, stride, pads).unwrap();
        let pg = probe.to_device(dev).unwrap();
        let gg = (&yg * &pg).unwrap().sum_all().unwrap().backward().unwrap();
        let what = format!(
            "conv x {x:?} c_out {c_out} k {k} stride {stride} pads {pads:?} bias rows {bias_rows}"
        );
        assert!(
            rel_err(&yg, &yc) < 1e-5,
            "{what}: forward {}",
            rel_err(&yg, &yc)
        );
        let (dxg, dxc) = (gg.get(&xg).unwrap(), gc.get(&xv).unwrap());
        assert!(rel_err(dxg, dxc) < 1e-5, "{what}: dx {}", rel_err(dxg, dxc));
        let (dwg, dwc) = (gg.get(&wg).unwrap(), gc.get(&wv).unwrap());
        assert!(rel_err(dwg, dwc) < 1e-5, "{what}: dw {}", rel_err(dwg, dwc));
        if bias_rows > 0 {
            let (dbg, dbc) = (gg.get(&bg).unwrap(), gc.get(&bv).unwrap());
            assert!(rel_err(dbg, dbc) < 1e-5, "{what}: db {}", rel_err(dbg, dbc));
        }
    }

    #[test]
    fn conv_matches_candle_on_the_cpu() {
        let Some(dev) = gpu() else { return };
        check_conv(&dev, &[2, 3, 5, 7], 4, 3, 1, (1, 1), 0);
        check_conv(&dev, &[1, 4, 8, 8], 5, 3, 2, (1, 1), 1);
        check_conv(&dev, &[3, 5, 8, 6], 2, 3, 2, (0, 1), 0); // the paper's "SAME" downsampling
        check_conv(&dev, &[2, 6, 4, 4], 3, 1, 1, (0, 0), 1);
        check_conv(&dev, &[2, 6, 5, 5], 3, 1, 2, (0, 0), 2);
        check_conv(&dev, &[2, 3, 6, 6], 4, 5, 1, (2, 2), 2);
        check_conv(&dev, &[4, 64, 16, 16], 32, 3, 1, (1, 1), 4);
    }

    /// A convolution in bf16 on CUDA against f32 on the CPU, within bf16's precision.
    #[test]
    fn conv_in_bf16_is_within_its_precision() {
        let Some(dev) = gpu() else { return };
        let (xc, wc, bc) = (
            randn(&[2, 32, 8, 8], 5),
            randn(&[16, 32, 3, 3], 6),
            randn(&[2, 16], 7),
        );
        let yc = xc
            .conv2d(&wc, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bc.reshape((2, 16, 1, 1)).unwrap())
            .unwrap();
        let h = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
        let yg = conv2d(&h(&xc), &h(&wc), Some(&h(&bc)), 1, (1, 1)).unwrap();
        assert!(
            rel_err(&yg, &yc) < 2e-2,
            "bf16 forward {}",
            rel_err(&yg, &yc)
        );
    }

    /// Our GroupNorm op on CUDA against the same op on the CPU: output and the gradients of x,
    /// a and d, for f32; and bf16 on CUDA against f32 on the CPU within bf16's precision.
    fn check_group_norm(
        dev: &Device,
        dims: &[usize],
        groups: usize,
        silu: bool,
        dropout: Option<Dropout>,
    ) {
        let (b, c) = (dims[0], dims[1]);
        let xc = ((randn(dims, 4) * 2.0).unwrap() + 0.5).unwrap();
        let ac = randn(&[b, c], 5);
        let dc = randn(&[b, c], 6);
        let probe = randn(dims, 7);
        let run = |dev: &Device, dtype: DType| {
            let to = |t: &Tensor| {
                Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap()
            };
            let (x, a, d) = (to(&xc), to(&ac), to(&dc));
            let y =
                super::super::group_norm::group_norm_act(&x, groups, &a, &d, silu, dropout, 1e-5)
                    .unwrap();
            let p = probe.to_device(dev).unwrap().to_dtype(dtype).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            let grads = [&x, &a, &d].map(|v| g.get(v).unwrap().clone());
            (y, grads)
        };
        let (yc, gc) = run(&Device::Cpu, DType::F32);
        let what = format!("group_norm {dims:?} groups {groups} silu {silu} dropout {dropout:?}");
        let (yg, gg) = run(dev, DType::F32);
        assert!(
            rel_err(&yg, &yc) < 1e-5,
            "{what}: forward {}",
            rel_err(&yg, &yc)
        );
        for (name, (g, c)) in ["dx", "da", "dd"].iter().zip(gg.iter().zip(&gc)) {
            assert!(rel_err(g, c) < 1e-4, "{what}: {name} {}", rel_err(g, c));
        }
        let (yh, gh) = run(dev, DType::BF16);
        assert!(
            rel_err(&yh, &yc) < 2e-2,
            "{what}: bf16 forward {}",
            rel_err(&yh, &yc)
        );
        for (name, (g, c)) in ["dx", "da", "dd"].iter().zip(gh.iter().zip(&gc)) {
            assert!(
                rel_err(g, c) < 5e-2,
                "{what}: bf16 {name} {}",
                rel_err(g, c)
            );
        }
    }

    #[test]
    fn group_norm_matches_the_cpu_kernel() {
        let Some(dev) = gpu() else { return };
        let drop = Some(Dropout {
            p: 0.3,
            seed: 0x1234_5678_9abc,
        });
        check_group_norm(&dev, &[2, 8, 5, 3], 4, false, None);
        check_group_norm(&dev, &[3, 6, 4, 4], 3, true, None);
        check_group_norm(&dev, &[2, 8, 6, 6], 2, true, drop);
        check_group_norm(&dev, &[1, 5, 7], 1, true, None); // 1-D, one group of odd size
        check_group_norm(&dev, &[4, 64, 32, 32], 32, true, drop);
        check_group_norm(&dev, &[2, 512, 4, 4], 32, true, None);
        // Groups too large for shared memory: the kernels that read global memory throughout.
        check_group_norm(&dev, &[2, 8, 64, 64], 2, true, drop);
    }

    #[test]
    fn upsample_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let xc = randn(&[2, 3, 4, 5], 8);
        let probe = randn(&[2, 3, 8, 10], 9);
        let run = |dev: &Device| {
            let x = Var::from_tensor(&xc.to_device(dev).unwrap()).unwrap();
            // The CPU kernel on the CPU, the CUDA kernel on the GPU (as ddpm-unet's `ops` picks).
            let y = if dev.is_cpu() {
                crate::resample::upsample_nearest_2x(&x).unwrap()
            } else {
                upsample_nearest_2x(&x).unwrap()
            };
            let p = probe.to_device(dev).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let ((yc, gc), (yg, gg)) = (run(&Device::Cpu), run(&dev));
        assert_eq!(rel_err(&yg, &yc), 0.0, "upsample forward");
        assert!(
            rel_err(&gg, &gc) < 1e-6,
            "upsample backward {}",
            rel_err(&gg, &gc)
        );
    }

    /// [`adamw_update`] as an in-place op, for the test.
    struct AdamW([f32; 5]);

    impl candle_core::InplaceOp3 for AdamW {
        fn name(&self) -> &'static str {
            "test-adamw"
        }
        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            unreachable!("CUDA only")
        }
        fn cuda_fwd(
            &self,
            p: &mut CudaStorage,
            lp: &Layout,
            m: &CudaStorage,
            lm: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<()> {
            adamw_update(p, lp, m, lm, v, lv, self.0)
        }
    }

    /// The moments, the EMA and AdamW's update in place on CUDA against the formulas evaluated
    /// with tensor ops on the CPU (on a narrowed view, so offsets are exercised too).
    #[test]
    fn optimizer_updates_match_the_formulas() {
        let Some(dev) = gpu() else { return };
        let n = 70_001;
        let (pc, gc) = (randn(&[n + 5], 10), randn(&[n], 11));
        let (mc, vc) = (randn(&[n], 12), randn(&[n], 13).abs().unwrap());
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let (p, g, m, v) = (on(&pc), on(&gc), on(&mc), on(&vc));
        let p_view = p.narrow(0, 5, n).unwrap();
        let axpby = |keep: f32, take: f32, scale: f32, square: bool| Axpby {
            keep,
            take,
            scale,
            square,
        };
        m.inplace_op2(&g, &axpby(0.9, 0.1, 0.5, false)).unwrap();
        v.inplace_op2(&g, &axpby(0.99, 0.01, 0.5, true)).unwrap();
        let params = [0.999f32, 1.0 / 0.1, 1.0 / 0.01, 1e-3, 1e-8];
        p_view.inplace_op3(&m, &v, &AdamW(params)).unwrap();
        let g_half = (&gc * 0.5).unwrap();
        let m_ref = ((&mc * 0.9).unwrap() + (&g_half * 0.1).unwrap()).unwrap();
        let v_ref = ((&vc * 0.99).unwrap() + (g_half.sqr().unwrap() * 0.01).unwrap()).unwrap();
        let update = ((&m_ref * 10.0).unwrap()
            / ((&v_ref * 100.0).unwrap().sqrt().unwrap() + 1e-8).unwrap())
        .unwrap();
        let p_ref =
            ((pc.narrow(0, 5, n).unwrap() * 0.999).unwrap() - (update * 1e-3).unwrap()).unwrap();
        assert!(rel_err(&m, &m_ref) < 1e-6, "m {}", rel_err(&m, &m_ref));
        assert!(rel_err(&v, &v_ref) < 1e-6, "v {}", rel_err(&v, &v_ref));
        assert!(
            rel_err(&p_view, &p_ref) < 1e-6,
            "p {}",
            rel_err(&p_view, &p_ref)
        );
        // The 5 elements before the view are untouched.
        assert_eq!(
            rel_err(&p.narrow(0, 0, 5).unwrap(), &pc.narrow(0, 0, 5).unwrap()),
            0.0
        );
    }

    /// The gradient norm's sum of squares against f64 sums on the CPU, over several tensors
    /// (one of them a view with an offset, one of a single element).
    #[test]
    fn sum_of_squares_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let cpu = [randn(&[3, 1000], 20), randn(&[70_001], 21), randn(&[1], 22)];
        let on: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&dev).unwrap()).collect();
        let view = on[1].narrow(0, 7, 60_000).unwrap();
        let sq = |t: &Tensor| -> f64 {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|&x| x as f64 * x as f64).sum()
        };
        let expected = sq(&cpu[0]) + sq(&cpu[1].narrow(0, 7, 60_000).unwrap()) + sq(&cpu[2]);
        let got = sum_of_squares(&[&on[0], &view, &on[2]]).unwrap();
        assert!(
            (got - expected).abs() <= 1e-12 * expected,
            "sum of squares {got} vs {expected}"
        );
        assert_eq!(sum_of_squares(&[]).unwrap(), 0.0);
    }

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

    /// The multi-tensor AdamW and EMA kernels against the single-tensor kernels, over tensors
    /// of several sizes (one of a single element, one not a whole number of chunks).
    #[test]
    fn multi_tensor_updates_match_the_single_tensor_kernels() {
        let Some(dev) = gpu() else { return };
        let sizes = [70_001usize, 4096, 1, 9000];
        let make = |seed: u64| -> Vec<Tensor> {
            let on = |(i, &n): (usize, &usize)| randn(&[n], seed + i as u64).to_device(&dev);
            sizes.iter().enumerate().map(|x| on(x).unwrap()).collect()
        };
        let copy =
            |ts: &[Tensor]| -> Vec<Tensor> { ts.iter().map(|t| t.copy().unwrap()).collect() };
        let (p1, g, m1) = (make(100), make(200), make(300));
        let v1: Vec<Tensor> = make(400).iter().map(|t| t.abs().unwrap()).collect();
        let (p2, m2, v2) = (copy(&p1), copy(&m1), copy(&v1));
        let axpby = |keep: f32, take: f32, scale: f32, square: bool| Axpby {
            keep,
            take,
            scale,
            square,
        };
        for i in 0..sizes.len() {
            m1[i]
                .inplace_op2(&g[i], &axpby(0.9, 0.1, 0.5, false))
                .unwrap();
            v1[i]
                .inplace_op2(&g[i], &axpby(0.99, 0.01, 0.5, true))
                .unwrap();
            let params = [0.999f32, 10.0, 100.0, 1e-3, 1e-8];
            p1[i].inplace_op3(&m1[i], &v1[i], &AdamW(params)).unwrap();
        }
        let f = AdamWFactors {
            scale: 0.5,
            first: [0.9, 0.1],
            second: [0.99, 0.01],
            decay: 0.999,
            inv_bc1: 10.0,
            inv_bc2: 100.0,
            lr: 1e-3,
            eps: 1e-8,
        };
        let groups: Vec<[&Tensor; 4]> = (0..sizes.len())
            .map(|i| [&p2[i], &m2[i], &v2[i], &g[i]])
            .collect();
        adamw_multi(&groups, &f).unwrap();
        for i in 0..sizes.len() {
            for (name, a, b) in [("p", &p2, &p1), ("m", &m2, &m1), ("v", &v2, &v1)] {
                let e = rel_err(&a[i], &b[i]);
                assert!(e < 1e-6, "adamw-multi {name} of size {}: {e}", sizes[i]);
            }
        }
        let (e1, e2) = (make(500), make(500));
        for i in 0..sizes.len() {
            e1[i]
                .inplace_op2(&p1[i], &axpby(0.95, 0.05, 1.0, false))
                .unwrap();
        }
        let pairs: Vec<[&Tensor; 2]> = (0..sizes.len()).map(|i| [&e2[i], &p1[i]]).collect();
        axpby_multi(&pairs, 0.95, 0.05).unwrap();
        for i in 0..sizes.len() {
            let e = rel_err(&e2[i], &e1[i]);
            assert!(e < 1e-6, "axpby-multi of size {}: {e}", sizes[i]);
        }
    }
}
