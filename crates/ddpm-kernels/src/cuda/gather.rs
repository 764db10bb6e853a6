//! Gathers whose adjoint is a gather too (im2col and col2im, nearest 2x upsampling and its
//! block sums), one differentiable custom op on CUDA: its backward pass is the adjoint gather.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

use super::{elementwise, extended, launch, per_plane, Arg};
use crate::conv::cuda::Unfold;
use crate::custom_op::Kernel;

/// A gather whose adjoint is a gather too, each one CUDA kernel with one thread block per row
/// (one image's segment of an output row of `im2col`, one plane otherwise): the differentiable
/// op is one of these, its backward pass the [`Gather::adjoint`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gather {
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
    fn launch_plan(&self, vec: usize) -> (&'static str, usize, usize, LaunchConfig, Vec<u32>) {
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
        let (name, in_len, out_len, cfg, args) = self.launch_plan(vec);
        if l.shape().elem_count() != in_len {
            candle_core::bail!("{name}: input of shape {:?} for {self:?}", l.shape());
        }
        // The kernels' 32-bit grid-stride index must not wrap (see `optim::cuda::span`).
        if in_len.max(out_len) > (u32::MAX as usize) - (1 << 24) {
            candle_core::bail!("{name}: tensors over 2^32 - 2^24 elements are not supported");
        }
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.0 > i32::MAX as u32 {
            candle_core::bail!(
                "{name}: {} thread blocks is outside CUDA's grid for {self:?}",
                cfg.grid_dim.0
            );
        }
        let args: Vec<Arg> = args.into_iter().map(Arg::U32).collect();
        // SAFETY: kernels.cu's gathers take (input, output, their u32 sizes as `launch_plan`
        // lists them) and write every element of the output (`out_len` of them).
        unsafe { launch(name, &[(src, l)], out_len, cfg, &args) }
    }
}

impl Kernel<1> for Gather {
    const NAME: &'static str = "ddpm-gather";
    type Plan = ();

    fn plan(&self, [l]: [&Layout; 1]) -> Result<((), Shape)> {
        Ok(((), self.out_shape(l.shape())))
    }

    fn cuda(&self, _: &(), [(s, l)]: [(&CudaStorage, &Layout); 1]) -> Result<CudaStorage> {
        self.launch(s, l)
    }

    fn bwd(&self, _: [&Tensor; 1], _: &Tensor, grad: &Tensor) -> Result<[Option<Tensor>; 1]> {
        Ok([Some(grad.contiguous()?.apply_op1(self.adjoint())?)])
    }
}
custom_op!(Gather, 1);
