//! FID comparable with published numbers: the Fréchet distance ([`super::fid`]) between the
//! pool3 features (2048 values) of pytorch-fid's Inception-v3, run on candle.
//!
//! - [`net`]: the network, pytorch-fid's `fid_inception_v3` (torchvision's Inception-v3 with
//!   its FID blocks), tensor names as in its weights file.
//! - [`resize`]: input handling as pytorch-fid's `InceptionV3(resize_input=True,
//!   normalize_input=True)`: bilinear resizing to 299x299 as `F.interpolate(mode="bilinear",
//!   align_corners=False)` and pixels in [-1, 1]. Grayscale images are repeated to three
//!   channels (what pytorch-fid's loader does by converting them to RGB).
//! - [`weights`]: pytorch-fid's weights file, fetched once into a cache directory and checked
//!   against the SHA-256 prefix in its name; `.pth` (either `torch.save` format, [`pth`]) or
//!   `.safetensors` with the same names.
//!
//! The classifier FID ([`super::quality`]) stays the offline default; this one needs the
//! weights (about 95 MB). `docs/fid.md` says what each computes and how this network was checked
//! against pytorch-fid's own module.

pub mod net;
pub mod pth;
pub mod resize;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ddpm_unet::candle_nn::VarBuilder;

pub use net::{FidInceptionV3, FEATURES};
pub use weights::{
    ensure_weights, ensure_weights_with, read_weights, FID_WEIGHTS_FILE, FID_WEIGHTS_URL,
};

use super::fid::{frechet_distance, GaussianStats};
use super::recognisable::Recognisability;
use crate::{Result, TrainError};

/// The side pytorch-fid resizes its inputs to.
pub const INPUT_SIZE: usize = 299;

/// What a report's FID is computed in when it is this network's (the `fid_features` of a
/// [`Recognisability`]; the classifier's is [`super::recognisable::FID_FEATURES`]).
pub const FID_FEATURES: &str = "Inception-v3, pytorch-fid pool3";

/// pytorch-fid's Inception-v3 with its input handling: images in, pool3 features out.
#[derive(Debug, Clone)]
pub struct InceptionFid {
    net: FidInceptionV3,
    device: Device,
    batch_size: usize,
}

impl InceptionFid {
    /// Loads the network from a weights file ([`read_weights`]: pytorch-fid's `.pth` or a
    /// `.safetensors` with its names) onto `device`. The file is not verified here: see
    /// [`ensure_weights`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = read_weights(path, device)?;
        Self::from_tensors(tensors, device).map_err(|e| {
            TrainError::Other(format!(
                "{} does not hold pytorch-fid's Inception weights ({e})",
                path.display()
            ))
        })
    }

    /// Builds the network from tensors named as in pytorch-fid's state dict.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        Self::new(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            device,
        )
    }

    /// Builds the network from `vb` (names as in pytorch-fid's state dict, `f32`).
    pub fn new(vb: VarBuilder, device: &Device) -> Result<Self> {
        Ok(Self {
            net: FidInceptionV3::new(vb)?,
            device: device.clone(),
            batch_size: 16,
        })
    }

    /// Sets how many images go through the network at once (default 16; at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The pool3 features (n, 2048), `f32`, of `images` (n, c, h, w) with pixels in [-1, 1]
    /// (the project's convention; pytorch-fid's [0, 1] images `x` are `2 x - 1` here), `c` 1 or
    /// 3, any size: resized to 299x299 bilinearly, in batches.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.dims4()?.0;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let len = self.batch_size.min(n - start);
            let batch = images.narrow(0, start, len)?.to_device(&self.device)?;
            // Bilinear weights sum to 1, so resizing in [-1, 1] equals pytorch-fid's resizing
            // in [0, 1] followed by 2 x - 1.
            let x = resize::resize_bilinear(&resize::to_rgb(&batch)?, INPUT_SIZE)?;
            out.push(self.net.forward(&x)?);
            start += len;
        }
        if out.is_empty() {
            return Ok(Tensor::zeros((0, FEATURES), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The Gaussian statistics (mean, covariance) of the features of `images`.
    pub fn stats(&self, images: &Tensor) -> Result<GaussianStats> {
        GaussianStats::from_tensor(&self.features(images)?)
    }

    /// The FID between two sets of images in [-1, 1]: the Fréchet distance of their features'
    /// Gaussians (each set needs at least 2 images; published FIDs use 10,000 or 50,000).
    pub fn fid(&self, a: &Tensor, b: &Tensor) -> Result<f64> {
        frechet_distance(&self.stats(a)?, &self.stats(b)?)
    }

    /// Replaces the FIDs of `numbers` (the samples' and the real floor's, both against the
    /// reference images) by Inception FIDs of the same images and names the features
    /// ([`FID_FEATURES`]); `samples`, `reference` and `floor` are the images `numbers` was
    /// computed from. Returns the reference images' statistics, for further distances.
    pub fn rescore(
        &self,
        numbers: &mut Recognisability,
        samples: &Tensor,
        reference: &Tensor,
        floor: &Tensor,
    ) -> Result<GaussianStats> {
        let r = self.stats(reference)?;
        numbers.samples.fid = frechet_distance(&self.stats(samples)?, &r)?;
        numbers.real_floor.fid = frechet_distance(&self.stats(floor)?, &r)?;
        numbers.fid_features = FID_FEATURES.to_string();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_unet::candle_nn::VarMap;

    #[test]
    fn the_network_builds_from_its_tensor_names_and_gives_2048_features() {
        // A VarMap records every tensor the network asks for: their names are pytorch-fid's.
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let model = InceptionFid::new(vb, &Device::Cpu).expect("build");
        let names: Vec<String> = map.data().lock().expect("lock").keys().cloned().collect();
        // 94 BasicConv2d layers, each a convolution weight and four BatchNorm tensors.
        assert_eq!(names.len(), 94 * 5);
        for name in [
            "Conv2d_1a_3x3.conv.weight",
            "Conv2d_4a_3x3.bn.running_var",
            "Mixed_5b.branch_pool.conv.weight",
            "Mixed_6e.branch7x7dbl_5.bn.running_mean",
            "Mixed_7c.branch3x3dbl_3b.conv.weight",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        // Grayscale 28x28 and RGB 32x32 images in [-1, 1]: (n, 2048) features, in batches.
        let model = model.with_batch_size(2);
        let gray = Tensor::rand(-1f32, 1.0, (3, 1, 28, 28), &Device::Cpu).expect("x");
        let f = model.features(&gray).expect("features");
        assert_eq!(f.dims(), &[3, FEATURES]);
        // Post-ReLU averages: finite and non-negative.
        let v = f
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0));
    }

    #[test]
    fn zero_weights_give_zero_features_and_missing_tensors_are_named() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let model = InceptionFid::new(vb, &Device::Cpu).expect("build");
        let x = Tensor::rand(-1f32, 1.0, (1, 3, 32, 32), &Device::Cpu).expect("x");
        let f = model.features(&x).expect("features");
        assert_eq!(f.dims(), &[1, FEATURES]);
        let max = f.abs().expect("abs").max_all().expect("max");
        assert_eq!(max.to_scalar::<f32>().expect("scalar"), 0.0);
        let e = InceptionFid::from_tensors(HashMap::new(), &Device::Cpu).expect_err("empty");
        assert!(e.to_string().contains("Conv2d_1a_3x3"), "{e}");
    }
}
