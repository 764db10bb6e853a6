//! Bilinear resizing as PyTorch's `F.interpolate(x, size, mode="bilinear", align_corners=False)`
//! (no antialiasing), written as two matrix products so that it runs on any candle device.
//!
//! Output pixel `i` of `out` samples the input at `src = (i + 0.5) * in / out - 0.5`, clamped
//! below at 0; with `i0 = floor(src)`, `i1 = min(i0 + 1, in - 1)` and `l = src - i0` it is
//! `(1 - l) x[i0] + l x[i1]`. Rows and columns are interpolated independently, so the resized
//! image is `R_h x R_w^T` with one such `(out, in)` weight matrix per axis.

use candle_core::{DType, Tensor};

use crate::{Result, TrainError};

/// The `(out, in)` interpolation matrix of one axis, row-major: row `i` holds the two weights
/// of output pixel `i` (see the module doc). Computed in `f64`.
pub fn bilinear_weights(input: usize, output: usize) -> Vec<f64> {
    let mut m = vec![0f64; output * input];
    if input == 0 {
        return m;
    }
    let scale = input as f64 / output as f64;
    for i in 0..output {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let l = src - i0 as f64;
        m[i * input + i0] += 1.0 - l;
        m[i * input + i1] += l;
    }
    m
}

/// Resizes `images` (n, c, h, w) to (n, c, `size`, `size`) bilinearly, as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)`. The weights are `f32` (the images'
/// dtype for `f32` images) on the images' device.
pub fn resize_bilinear(images: &Tensor, size: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if h == 0 || w == 0 || size == 0 {
        return Err(TrainError::Other(format!(
            "cannot resize {h}x{w} images to {size}x{size}: sizes must be positive"
        )));
    }
    if h == size && w == size {
        return Ok(images.clone());
    }
    let dtype = images.dtype();
    let device = images.device();
    let to_tensor = |m: Vec<f64>, rows: usize, cols: usize| -> Result<Tensor> {
        Ok(Tensor::from_vec(m, (rows, cols), device)?.to_dtype(dtype)?)
    };
    let rh = to_tensor(bilinear_weights(h, size), size, h)?;
    let rw_t = to_tensor(bilinear_weights(w, size), size, w)?
        .t()?
        .contiguous()?;
    // (n c, h, w) x (w, size) -> (n c, h, size); then (size, h) x (n c, h, size).
    let x = images.contiguous()?.reshape((n * c, h, w))?;
    let x = x.broadcast_matmul(&rw_t)?;
    let x = rh
        .broadcast_left(n * c)?
        .contiguous()?
        .matmul(&x.contiguous()?)?;
    Ok(x.reshape((n, c, size, size))?)
}

/// `images` as `f32` (n, 3, h, w): 3-channel images as they are, 1-channel (grayscale) images
/// repeated to 3 channels, as pytorch-fid's data loader does by converting them to RGB.
pub fn to_rgb(images: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = images.dims4()?;
    let images = images.to_dtype(DType::F32)?;
    match c {
        3 => Ok(images),
        1 => Ok(images.repeat((1, 3, 1, 1))?),
        other => Err(TrainError::Other(format!(
            "the Inception FID takes 1- or 3-channel images, got {other} channels"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weights_match_hand_computed_values() {
        // 2 -> 4: scale 0.5, src = (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25.
        // src 1.25 has i0 = 1 = i1 (the edge), so the last row is all x[1].
        let m = bilinear_weights(2, 4);
        let want = [1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{m:?}");
        }
        // 4 -> 2: scale 2, src = 0.5 and 2.5: the mean of pixels (0, 1) and (2, 3).
        assert_eq!(
            bilinear_weights(4, 2),
            vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
        );
        // Every row sums to 1 (an affine map of the pixel values commutes with resizing).
        for (input, output) in [(28, 299), (32, 299), (300, 299), (5, 7)] {
            for row in bilinear_weights(input, output).chunks_exact(input) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn resizing_a_2x2_image_to_3x3() {
        // 2 -> 3: scale 2/3, src = 0 (clamped from -1/6), 0.5, 7/6 (clamped to the edge):
        // rows and columns weigh (1, 0), (0.5, 0.5), (0, 1).
        let x = Tensor::new(&[[[[0f32, 1.0], [2.0, 3.0]]]], &Device::Cpu).expect("x");
        let y = resize_bilinear(&x, 3).expect("resize");
        let got = y
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let want = [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn grayscale_is_repeated_to_rgb() {
        let x = Tensor::new(&[[[[0.25f32]]]], &Device::Cpu).expect("x");
        assert_eq!(to_rgb(&x).expect("rgb").dims(), &[1, 3, 1, 1]);
        let two = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).expect("x");
        assert!(to_rgb(&two).is_err());
    }
}
