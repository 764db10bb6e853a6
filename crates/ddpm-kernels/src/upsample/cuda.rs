//! Nearest 2x upsampling on CUDA: one of the gathers of [`crate::cuda::gather`] (one thread
//! block per plane; the backward pass sums each 2 x 2 block); the kernels are in `kernels.cu`
//! here.

use candle_core::{Result, Tensor};

use crate::cuda::gather::Gather;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::{gpu, randn, rel_err};
    use candle_core::{Device, Var};

    #[test]
    fn upsample_matches_the_cpu() {
        let Some(dev) = gpu() else { return };
        let xc = randn(&[2, 3, 4, 5], 8);
        let probe = randn(&[2, 3, 8, 10], 9);
        let run = |dev: &Device| {
            let x = Var::from_tensor(&xc.to_device(dev).unwrap()).unwrap();
            // The CPU kernel on the CPU, the CUDA kernel on the GPU (as ddpm-unet's `ops` picks).
            let y = if dev.is_cpu() {
                super::super::upsample_nearest_2x(&x).unwrap()
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
}
