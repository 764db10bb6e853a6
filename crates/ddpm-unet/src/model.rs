//! [`DiffusionModel`]: either U-Net with its variables, seeded initialization, presets and
//! safetensors persistence.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::ddpm_unet::{DdpmUnet, DdpmUnetConfig};
use crate::init::SeededInit;
use crate::layers::TrainRng;
use crate::unet::{Unet, UnetConfig};
use crate::weights::{assign_checked, read_safetensors, to_safetensors_bytes};
use crate::KernelPolicy;
use crate::UnetError;
use ddpm_fs::write_atomic;

/// Metadata key holding the model config (JSON) in a weights file.
pub const CONFIG_METADATA_KEY: &str = "ddpm.model_config";
/// Metadata key holding the file format tag in a weights file.
pub const FORMAT_METADATA_KEY: &str = "ddpm.format";
/// Value of [`FORMAT_METADATA_KEY`] for model weights written by this crate.
pub const WEIGHTS_FORMAT: &str = "ddpm-rs/model-weights/v1";

/// The architecture and hyper-parameters of a noise-prediction network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum ModelConfig {
    /// The lucidrains / annotated-diffusion [`Unet`].
    Unet(UnetConfig),
    /// The DDPM paper's [`DdpmUnet`].
    DdpmUnet(DdpmUnetConfig),
}

/// Names of the built-in presets, for help texts and errors.
pub const PRESETS: &[&str] = &[
    "mnist-small",
    "fashion",
    "cifar-small",
    "cifar10",
    "learnopencv",
    "celebahq-256",
];

impl ModelConfig {
    /// A named preset: `mnist-small` (Unet, 28x28x1), `fashion` (the annotated-diffusion Unet,
    /// 28x28x1), `cifar-small` (DdpmUnet, 32x32x3), `cifar10` (the paper's 35.7M model) or
    /// `learnopencv` (the DdpmUnet of LearnOpenCV's DDPM tutorial, 32x32x3) or `celebahq-256`
    /// (the layout of google/ddpm-celebahq-256, 256x256x3). The channels and
    /// image size follow the data set when a run trains one (see `set_channels`).
    pub fn preset(name: &str) -> Result<Self, UnetError> {
        Ok(match name {
            "mnist-small" => Self::Unet(UnetConfig::mnist_small()),
            "fashion" => Self::Unet(UnetConfig::annotated_fashion()),
            "cifar-small" => Self::DdpmUnet(DdpmUnetConfig::cifar_small()),
            "cifar10" => Self::DdpmUnet(DdpmUnetConfig::cifar10()),
            "learnopencv" => Self::DdpmUnet(DdpmUnetConfig::learnopencv()),
            "celebahq-256" => Self::DdpmUnet(DdpmUnetConfig::celebahq_256()),
            other => {
                return Err(UnetError::UnknownPreset {
                    name: other.to_string(),
                    known: PRESETS.join(", "),
                })
            }
        })
    }

    /// Image height and width.
    pub fn image_size(&self) -> usize {
        match self {
            Self::Unet(c) => c.image_size,
            Self::DdpmUnet(c) => c.image_size,
        }
    }

    /// Sets the image size (validated when the model is built).
    pub fn set_image_size(&mut self, size: usize) {
        match self {
            Self::Unet(c) => c.image_size = size,
            Self::DdpmUnet(c) => c.image_size = size,
        }
    }

    /// Image channels the model reads (excluding self-conditioning).
    pub fn channels(&self) -> usize {
        match self {
            Self::Unet(c) => c.channels,
            Self::DdpmUnet(c) => c.in_channels,
        }
    }

    /// Sets the image channels (and the output channels with them).
    pub fn set_channels(&mut self, channels: usize) {
        match self {
            Self::Unet(c) => c.channels = channels,
            Self::DdpmUnet(c) => c.in_channels = channels,
        }
    }

    /// Output channels of the model.
    pub fn out_channels(&self) -> usize {
        match self {
            Self::Unet(c) => c.out_channels(),
            Self::DdpmUnet(c) => c.out_channels(),
        }
    }

    /// The classes of a class-conditional model (`None`: unconditional).
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            Self::Unet(c) => c.num_classes,
            Self::DdpmUnet(c) => c.num_classes,
        }
    }

    /// Makes the model class-conditional with `n` classes (`None`: unconditional).
    pub fn set_num_classes(&mut self, n: Option<usize>) {
        match self {
            Self::Unet(c) => c.num_classes = n,
            Self::DdpmUnet(c) => c.num_classes = n,
        }
    }

    /// Whether the model takes a self-conditioning input.
    pub fn self_condition(&self) -> bool {
        matches!(self, Self::Unet(c) if c.self_condition)
    }

    /// A lower bound on the values (of the compute dtype) that one image's training forward
    /// pass keeps for the backward pass, for estimating memory before a run starts (see the
    /// architectures' `activation_values_per_image`).
    pub fn activation_values_per_image(&self) -> f64 {
        match self {
            Self::Unet(c) => c.activation_values_per_image(),
            Self::DdpmUnet(c) => c.activation_values_per_image(),
        }
    }

    /// Checks the config; the error names the field and why it is wrong.
    pub fn validate(&self) -> Result<(), UnetError> {
        match self {
            Self::Unet(c) => c.validate(),
            Self::DdpmUnet(c) => c.validate(),
        }
    }
}

#[derive(Debug, Clone)]
enum Network {
    Unet(Box<Unet>),
    DdpmUnet(Box<DdpmUnet>),
}

/// A noise-prediction network with its trainable variables.
#[derive(Clone)]
pub struct DiffusionModel {
    config: ModelConfig,
    network: Network,
    varmap: VarMap,
    device: Device,
    dtype: DType,
    compute_dtype: DType,
    /// The policy every forward pass runs under; `None`: the one in force at the call.
    kernels: Option<KernelPolicy>,
}

impl std::fmt::Debug for DiffusionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffusionModel")
            .field("config", &self.config)
            .field("parameters", &self.num_parameters())
            .field("dtype", &self.dtype)
            .field("compute_dtype", &self.compute_dtype)
            .field("kernels", &self.kernels)
            .finish()
    }
}

impl DiffusionModel {
    /// Builds a model with every parameter initialized from `seed` (PyTorch's default
    /// distributions; the same seed gives the same weights on every machine).
    pub fn new(
        config: &ModelConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, UnetError> {
        config.validate()?;
        let varmap = VarMap::new();
        let backend = SeededInit::new(varmap.clone(), seed);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let network = match config {
            ModelConfig::Unet(c) => Network::Unet(Box::new(Unet::new(c, vb)?)),
            ModelConfig::DdpmUnet(c) => Network::DdpmUnet(Box::new(DdpmUnet::new(c, vb)?)),
        };
        Ok(Self {
            config: config.clone(),
            network,
            varmap,
            device: device.clone(),
            dtype,
            compute_dtype: dtype,
            kernels: None,
        })
    }

    /// Runs every forward pass of this model (and of its [`DiffusionModel::frozen`] copies)
    /// under `policy` ([`KernelPolicy::scoped`]), whatever policy is in force around the call:
    /// two models of different policies can be compared in one process. A model given none
    /// runs under the policy in force at each call (the installed one, or an enclosing
    /// scope's). The backward pass of a loss runs under the policy in force when it is called:
    /// run it inside [`DiffusionModel::kernel_policy`]'s scope too (ddpm-train's trainer runs
    /// its whole step there).
    pub fn with_kernel_policy(mut self, policy: KernelPolicy) -> Self {
        self.kernels = Some(policy);
        self
    }

    /// The policy this model's forward passes run under: the one given to
    /// [`DiffusionModel::with_kernel_policy`], else the one in force now
    /// ([`KernelPolicy::active`]).
    pub fn kernel_policy(&self) -> KernelPolicy {
        self.kernels.unwrap_or_else(KernelPolicy::active)
    }

    /// Mixed precision: keeps the variables in their dtype (the f32 master weights) and runs
    /// every forward pass in `dtype` (bf16 or f16), with weights cast per op and the prediction
    /// returned in the dtype of the input. Gradients reach the variables in their own dtype.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The dtype forward passes compute in (see [`DiffusionModel::with_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// A copy for inference: the same network over detached copies of the current weights, so
    /// that forward passes record no autograd graph (far less memory while sampling). The copy
    /// has no trainable variables and does not see later changes to this model's weights. Its
    /// weights are stored in the compute dtype, so a bf16 sampler casts nothing per step.
    pub fn frozen(&self) -> Result<Self, UnetError> {
        if self.varmap.all_vars().is_empty() {
            // Already a frozen copy: its weights are detached and in the compute dtype.
            return Ok(self.clone());
        }
        let dtype = self.compute_dtype;
        let tensors: HashMap<String, Tensor> = self
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.copy()?.detach())))
            .collect::<Result<_, candle_core::Error>>()?;
        let vb = VarBuilder::from_tensors(tensors, dtype, &self.device);
        let network = match &self.config {
            ModelConfig::Unet(c) => Network::Unet(Box::new(Unet::new(c, vb)?)),
            ModelConfig::DdpmUnet(c) => Network::DdpmUnet(Box::new(DdpmUnet::new(c, vb)?)),
        };
        Ok(Self {
            config: self.config.clone(),
            network,
            varmap: VarMap::new(),
            device: self.device.clone(),
            dtype,
            compute_dtype: dtype,
            kernels: self.kernels,
        })
    }

    /// Loads a weights file written by [`DiffusionModel::save`]: the config is read from the
    /// file's metadata, and every tensor is checked against it.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self, UnetError> {
        let file = read_safetensors(path, device)?;
        let config = config_from_metadata(&file.metadata, path)?;
        Self::from_tensors(&config, &file.tensors, device, dtype, path)
    }

    /// A model of `config` holding `tensors` (from `source`, named in errors), which must be
    /// exactly its tensors. They are checked against the config before the model is built, so
    /// a file whose config claims a far larger model than its tensors fails without allocating
    /// that model.
    pub fn from_tensors(
        config: &ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        source: &Path,
    ) -> Result<Self, UnetError> {
        check_tensors(config, tensors, source)?;
        let model = Self::new(config, 0, device, dtype)?;
        assign_checked(&model.vars(), tensors, source)?;
        Ok(model)
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device of the model's variables.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the model's variables.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The trainable variables, by tensor name.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        match self.varmap.data().lock() {
            Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The variables in a stable order (sorted by name), as an optimizer wants them.
    pub fn var_list(&self) -> Vec<Var> {
        self.vars().into_values().collect()
    }

    /// The current values of the variables, by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// The number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars().values().map(|v| v.elem_count()).sum()
    }

    /// Checks that `x` is (b, channels, s, s) and `t` is (b,).
    fn check_input(&self, x: &Tensor, t: &Tensor) -> Result<(), UnetError> {
        let (c, s) = (self.config.channels(), self.config.image_size());
        let ok_x = matches!(x.dims(), &[_, xc, h, w] if xc == c && h == s && w == s);
        let ok_t = t.rank() == 1 && x.rank() == 4 && t.dims()[0] == x.dims()[0];
        if !ok_x || !ok_t {
            return Err(UnetError::BadInput {
                found: x.dims().to_vec(),
                t_found: t.dims().to_vec(),
                channels: c,
                size: s,
            });
        }
        Ok(())
    }

    /// Checks class labels for a batch of `b` images: shape (b,), an integer dtype, each at most
    /// the null label, and a class-conditional model.
    fn check_labels(&self, labels: &Tensor, b: usize) -> Result<(), UnetError> {
        let bad = |reason: String| Err(UnetError::BadLabels { reason });
        let Some(n) = self.config.num_classes() else {
            return bad(
                "class labels were given, but the model is unconditional (no `num_classes`)".into(),
            );
        };
        if labels.dims() != [b] || labels.dtype().is_float() {
            return bad(format!(
                "labels must be integers of shape ({b},), got {:?} {:?}",
                labels.dtype(),
                labels.dims()
            ));
        }
        // One read of the b labels (one transfer from a GPU).
        let values = labels.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
        if let Some(bad_label) = values.iter().find(|&&l| l < 0 || l > n as i64) {
            return bad(format!(
                "label {bad_label} is outside 0..{n} (the model's {n} classes) and {n} (the null \
                 label)"
            ));
        }
        Ok(())
    }

    /// Evaluation-mode prediction (no dropout) for `x` (b, c, s, s) at timesteps `t` (b,), in
    /// the dtype of `x`.
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor, UnetError> {
        self.forward_t(x, t, None, None)
    }

    /// Prediction with an optional self-conditioning input and, in training mode, the RNG that
    /// draws dropout masks (`None` = evaluation mode).
    pub fn forward_t(
        &self,
        x: &Tensor,
        t: &Tensor,
        x_self_cond: Option<&Tensor>,
        rng: TrainRng,
    ) -> Result<Tensor, UnetError> {
        self.forward_full(x, t, None, x_self_cond, rng)
    }

    /// [`DiffusionModel::forward_t`] with class labels `labels` (b,) of any integer dtype, for a
    /// class-conditional model: each in `0..num_classes`, or `num_classes` for the null label
    /// (the unconditional model); `None` gives every image the null label. Labels given to a
    /// model without classes, or out of range, are [`UnetError::BadLabels`].
    pub fn forward_full(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        x_self_cond: Option<&Tensor>,
        rng: TrainRng,
    ) -> Result<Tensor, UnetError> {
        self.check_input(x, t)?;
        if let Some(labels) = labels {
            self.check_labels(labels, x.dims()[0])?;
        }
        if let Some(cond) = x_self_cond {
            if cond.dims() != x.dims() {
                return Err(UnetError::BadInput {
                    found: cond.dims().to_vec(),
                    t_found: t.dims().to_vec(),
                    channels: self.config.channels(),
                    size: self.config.image_size(),
                });
            }
        }
        let out_dtype = x.dtype();
        let run = || -> Result<Tensor, UnetError> {
            let x = x.to_dtype(self.compute_dtype)?;
            let cond = x_self_cond
                .map(|c| c.to_dtype(self.compute_dtype))
                .transpose()?;
            let y = match &self.network {
                Network::Unet(n) => n.forward(&x, t, cond.as_ref(), labels)?,
                Network::DdpmUnet(n) => n.forward(&x, t, labels, rng)?,
            };
            Ok(y.to_dtype(out_dtype)?)
        };
        match self.kernels {
            Some(policy) => policy.scoped(run),
            None => run(),
        }
    }

    /// Metadata stored with the weights: the format tag and the config as JSON.
    pub fn metadata(&self) -> Result<HashMap<String, String>, UnetError> {
        let json = serde_json::to_string(&self.config).map_err(|e| UnetError::Weights {
            path: "<config>".into(),
            reason: e.to_string(),
        })?;
        Ok(HashMap::from([
            (FORMAT_METADATA_KEY.to_string(), WEIGHTS_FORMAT.to_string()),
            (CONFIG_METADATA_KEY.to_string(), json),
        ]))
    }

    /// Writes the weights and config to `path` as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<(), UnetError> {
        let bytes = to_safetensors_bytes(&self.tensors(), self.metadata()?)?;
        write_atomic(path, &bytes).map_err(|e| UnetError::Weights {
            path: path.to_path_buf(),
            reason: format!("cannot write: {e}"),
        })
    }

    /// Replaces this model's weights with those of `path`, which must hold exactly this model's
    /// tensor names and shapes (the error names the first mismatch).
    pub fn load_weights(&self, path: &Path) -> Result<(), UnetError> {
        let file = read_safetensors(path, &self.device)?;
        assign_checked(&self.vars(), &file.tensors, path)
    }

    /// Copies the values of `tensors` (same names and shapes) into the variables.
    pub fn set_tensors(
        &self,
        tensors: &HashMap<String, Tensor>,
        source: &Path,
    ) -> Result<(), UnetError> {
        assign_checked(&self.vars(), tensors, source)
    }
}

/// Checks that `tensors` hold every tensor `config`'s network asks for, with its shape, without
/// allocating the network: it is built over the given tensors themselves, so nothing larger than
/// them is created. The error names `source` and the first missing or mismatched tensor.
pub fn check_tensors(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<(), UnetError> {
    config.validate()?;
    let device = tensors
        .values()
        .next()
        .map_or(Device::Cpu, |t| t.device().clone());
    let dtype = tensors.values().next().map_or(DType::F32, |t| t.dtype());
    let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &device);
    let built = match config {
        ModelConfig::Unet(c) => Unet::new(c, vb).map(|_| ()),
        ModelConfig::DdpmUnet(c) => DdpmUnet::new(c, vb).map(|_| ()),
    };
    built.map_err(|e| UnetError::Weights {
        path: source.to_path_buf(),
        reason: format!("its tensors do not make the model its config describes: {e}"),
    })
}

/// Reads the model config stored in a weights file's metadata.
pub fn config_from_metadata(
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<ModelConfig, UnetError> {
    let json = metadata
        .get(CONFIG_METADATA_KEY)
        .ok_or_else(|| UnetError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "no `{CONFIG_METADATA_KEY}` metadata, so not a model written by ddpm-rs: a \
                 diffusers model loads from its pipeline directory (`ddpm sample --pretrained \
                 DIR`; `ddpm_unet::diffusers` in Rust), other weights by building the model from \
                 its config and calling `load_weights`"
            ),
        })?;
    serde_json::from_str(json).map_err(|e| UnetError::Weights {
        path: path.to_path_buf(),
        reason: format!("model config in metadata is invalid: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Each preset's layout (levels, blocks per level, where attention sits) at 8x8 (or the
    /// smallest size its levels allow) with 8 base channels, so that a forward and backward pass
    /// take milliseconds.
    fn tiny(preset: &str) -> Result<ModelConfig, UnetError> {
        let mut cfg = ModelConfig::preset(preset)?;
        match &mut cfg {
            ModelConfig::Unet(c) => {
                c.dim = 8;
                c.image_size = 8;
            }
            ModelConfig::DdpmUnet(c) => {
                // 8x8, or as small as the levels allow (celebahq-256's six levels: 32x32).
                let size = 8usize.max(1 << (c.ch_mult.len() - 1));
                let shrink = c.image_size / size;
                c.attn_resolutions = c.attn_resolutions.iter().map(|r| r / shrink).collect();
                c.image_size = size;
                c.ch = 8;
                c.groups = c.groups.min(8);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// `sum(model(x, t)^2)` and its gradient with respect to every variable, in training mode
    /// (dropout drawn from `rng`) or evaluation mode.
    fn grads(
        model: &DiffusionModel,
        x: &Tensor,
        t: &Tensor,
        rng: TrainRng,
    ) -> Result<BTreeMap<String, Tensor>, UnetError> {
        let loss = model.forward_t(x, t, None, rng)?.sqr()?.sum_all()?;
        let g = loss.backward()?;
        let mut out = BTreeMap::new();
        for (name, var) in model.vars() {
            let grad = g.get(var.as_tensor()).ok_or_else(|| UnetError::Weights {
                path: name.clone().into(),
                reason: "no gradient".into(),
            })?;
            assert_eq!(grad.dims(), var.dims(), "gradient shape of {name}");
            out.insert(name, grad.clone());
        }
        Ok(out)
    }

    /// Two models of one network with different kernel policies, used in one process: each
    /// forward pass runs under its own model's policy, whatever is in force around the call and
    /// on whichever thread. Our kernels and candle's ops round differently (so the outputs are
    /// not bit-identical, which shows that the two paths really differ), agree to f32 rounding,
    /// and each model reproduces bit for bit the output of its policy's path.
    #[test]
    fn each_model_runs_under_its_own_kernel_policy() -> Result<(), UnetError> {
        use crate::policy::Backend;
        let dev = Device::Cpu;
        let ours = KernelPolicy::default();
        let candle = KernelPolicy {
            backend: Backend::Candle,
            ..KernelPolicy::default()
        };
        let cfg = tiny("mnist-small")?;
        let base = DiffusionModel::new(&cfg, 7, &dev, DType::F32)?;
        let (c, s) = (cfg.channels(), cfg.image_size());
        let x = Tensor::randn(0f32, 1.0, (2, c, s, s), &dev)?;
        let t = Tensor::new(&[3u32, 250], &dev)?;
        let bits = |y: &Tensor| -> Result<Vec<u32>, UnetError> {
            Ok(y.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        // The two paths, by scoping the model without a policy of its own.
        let want_ours = bits(&ours.scoped(|| base.forward(&x, &t))?)?;
        let want_candle = bits(&candle.scoped(|| base.forward(&x, &t))?)?;
        assert_ne!(want_ours, want_candle, "the two policies ran the same path");
        let (a, b) = (
            ours.scoped(|| base.forward(&x, &t))?,
            candle.scoped(|| base.forward(&x, &t))?,
        );
        let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // f32 sums of a few hundred terms in another order, through a few layers.
        assert!(diff <= 1e-4 * (1.0 + scale), "{diff} (scale {scale})");

        let m_ours = base.clone().with_kernel_policy(ours);
        let m_candle = base.clone().with_kernel_policy(candle);
        assert_eq!(m_candle.kernel_policy(), candle);
        assert_eq!(m_candle.frozen()?.kernel_policy(), candle);
        // Inside a scope of the other policy, each model still runs its own.
        assert_eq!(bits(&candle.scoped(|| m_ours.forward(&x, &t))?)?, want_ours);
        assert_eq!(
            bits(&ours.scoped(|| m_candle.forward(&x, &t))?)?,
            want_candle
        );
        // From two threads at once (the scopes take turns), a few passes each.
        std::thread::scope(|scope| -> Result<(), UnetError> {
            let runs = [(&m_ours, &want_ours), (&m_candle, &want_candle)].map(|(m, want)| {
                let (x, t) = (&x, &t);
                scope.spawn(move || -> Result<(), UnetError> {
                    for _ in 0..3 {
                        assert_eq!(&bits(&m.frozen()?.forward(x, t)?)?, want);
                    }
                    Ok(())
                })
            });
            for r in runs {
                r.join().expect("thread")?;
            }
            Ok(())
        })
    }

    /// Batch 1 used to fail in the backward pass of the DDPM U-Net: a per-image bias (1, c)
    /// got a per-channel gradient (c,). Every preset's layout trains at batch 1, and (in
    /// evaluation mode, where images do not interact) the gradient of a batch of two is the sum
    /// of the two images' batch-1 gradients.
    #[test]
    fn every_preset_layout_trains_at_batch_one() -> Result<(), UnetError> {
        let dev = Device::Cpu;
        for preset in PRESETS {
            let cfg = tiny(preset)?;
            let model = DiffusionModel::new(&cfg, 7, &dev, DType::F32)?;
            let (c, s) = (cfg.channels(), cfg.image_size());
            let x = Tensor::randn(0f32, 1.0, (2, c, s, s), &dev)?;
            let t = Tensor::new(&[3u32, 250], &dev)?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            grads(
                &model,
                &x.narrow(0, 0, 1)?,
                &t.narrow(0, 0, 1)?,
                Some(&mut rng),
            )?;

            let both = grads(&model, &x, &t, None)?;
            let first = grads(&model, &x.narrow(0, 0, 1)?, &t.narrow(0, 0, 1)?, None)?;
            let second = grads(&model, &x.narrow(0, 1, 1)?, &t.narrow(0, 1, 1)?, None)?;
            for (name, g) in &both {
                let sum = (&first[name] + &second[name])?;
                let scale = g.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (g - sum)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // f32 sums over a few thousand terms in different orders: about 1e-5 relative.
                assert!(
                    diff <= 1e-4 * (1.0 + scale),
                    "{preset} {name}: batch-2 gradient differs from the batch-1 sum by {diff} \
                     (max {scale})"
                );
            }
        }
        Ok(())
    }
}
