//! The feature extractor of the sample-quality metrics: a small CNN classifier trained by the
//! tool itself on a data set's training split (no downloaded network), stored as safetensors
//! with its config and test accuracy in the metadata.
//!
//! Architecture, for `w = width` and images of side `s`: three 3x3 convolutions (`c -> w`,
//! `w -> 2w` stride 2, `2w -> 4w` stride 2), each followed by GroupNorm (4 groups) and SiLU; the
//! `4w x r x r` map (`r = ceil(s / 4)`) flattened; a linear layer to `feature_dim` values with
//! SiLU, whose output is the *feature* vector the Fréchet distance uses (the penultimate layer);
//! and a linear head `feature_dim -> classes`. Flattening (rather than pooling) keeps where things
//! are in the image, which the digits and objects of these centred data sets need.
//! Trained with cross-entropy and our [`AdamW`] over candle ops that all have a backward pass.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use ddpm_data::{Dataset, DatasetSpec, Loader};
use ddpm_fs::write_atomic;
use ddpm_unet::ops::{self, ConvParams};
use ddpm_unet::weights::{assign_checked, read_safetensors, to_safetensors_bytes};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{warmup_lr, AdamW, AdamWConfig};
use crate::{Result, TrainError};

/// Format tag in a classifier file's metadata.
pub const CLASSIFIER_FORMAT: &str = "ddpm-rs/classifier/v1";
/// Metadata key of the [`ClassifierMeta`] JSON.
pub const CLASSIFIER_META_KEY: &str = "ddpm.classifier";
const FORMAT_KEY: &str = "ddpm.format";
/// Groups of every GroupNorm of the classifier.
const GROUPS: usize = 4;

/// The classifier's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Image side.
    pub image_size: usize,
    /// Image channels.
    pub channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Channels of the first convolution (then 2x and 4x); a multiple of 4.
    pub width: usize,
    /// Dimension of the feature vector (the penultimate layer).
    pub feature_dim: usize,
}

impl ClassifierConfig {
    /// The side of the feature map after the two stride-2 convolutions, `ceil(s / 4)`.
    pub fn map_size(&self) -> usize {
        let down = |s: usize| s.saturating_sub(1) / 2 + 1;
        down(down(self.image_size))
    }

    /// The default shape for `dataset`'s images and classes: width 16, 64 features.
    pub fn for_dataset(dataset: &Dataset) -> Self {
        Self {
            image_size: dataset.image_size(),
            channels: dataset.channels(),
            num_classes: dataset.num_classes(),
            width: 16,
            feature_dim: 64,
        }
    }

    /// Checks the fields; the error names the wrong one. `width` and `feature_dim` are bounded
    /// ([`MAX_WIDTH`], [`MAX_FEATURES`]) so that a typo cannot ask for more memory than any
    /// machine has (the default is 16 and 64; the FID's covariance is `feature_dim` squared).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Other(format!("classifier: {m}")));
        if self.width == 0 || !self.width.is_multiple_of(GROUPS) || self.width > MAX_WIDTH {
            return bad(format!(
                "`width` (--classifier-width) must be a positive multiple of {GROUPS} up to \
                 {MAX_WIDTH}, got {}",
                self.width
            ));
        }
        if !(1..=MAX_FEATURES).contains(&self.feature_dim) {
            return bad(format!(
                "`feature_dim` (--classifier-features) must be in 1..={MAX_FEATURES}, got {}",
                self.feature_dim
            ));
        }
        if self.num_classes < 2 {
            return bad(format!(
                "needs at least 2 classes, the data set has {}",
                self.num_classes
            ));
        }
        if self.image_size < 4 || self.channels == 0 {
            return bad(format!(
                "images of {} channels and side {} are too small",
                self.channels, self.image_size
            ));
        }
        Ok(())
    }
}

/// The widest classifier [`ClassifierConfig::validate`] allows (base channels).
pub const MAX_WIDTH: usize = 1024;

/// The most features [`ClassifierConfig::validate`] allows.
pub const MAX_FEATURES: usize = 4096;

/// How the classifier is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTraining {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to 0).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of the initialization and the data order.
    pub seed: u64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 64,
            lr: 2e-3,
            warmup_steps: 50,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

/// What is stored with a classifier's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierMeta {
    /// [`CLASSIFIER_FORMAT`].
    pub format: String,
    /// The data set it was trained on (`mnist`, `folder:PATH`, ...).
    pub dataset: String,
    /// Its shape.
    pub config: ClassifierConfig,
    /// How it was trained.
    pub training: ClassifierTraining,
    /// Training images.
    pub train_images: usize,
    /// Test images its accuracy was measured on.
    pub test_images: usize,
    /// Top-1 accuracy on the test split.
    pub test_accuracy: f64,
    /// Mean cross-entropy of the last 50 training steps.
    pub final_loss: f64,
    /// Seconds the training took.
    pub train_seconds: f64,
    /// The class names of the training split, in label order (absent in files written before
    /// they were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// [`training_fingerprint`] of the training split it was trained on (absent in files written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_fingerprint: Option<String>,
}

/// Domain tag hashed first by [`training_fingerprint`]: a change of what is hashed changes it.
const FINGERPRINT_DOMAIN: &[u8] = b"ddpm-rs/classifier-train-data/v1";

/// A fingerprint of what a classifier trained on `train` learned from: SHA-256 (hex) of the
/// split's channels and image size, its class names in order, and every image's label and
/// decoded 8-bit pixels, in order. Any change of the images, their classes or the class names
/// changes it. It reads the decoded cache once (about 50 MB for MNIST's training split).
pub fn training_fingerprint(train: &Dataset) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let word = |h: &mut Sha256, v: usize| h.update((v as u64).to_le_bytes());
    h.update(FINGERPRINT_DOMAIN);
    word(&mut h, train.channels());
    word(&mut h, train.image_size());
    word(&mut h, train.num_classes());
    for name in train.class_names() {
        word(&mut h, name.len());
        h.update(name.as_bytes());
    }
    word(&mut h, train.len());
    for (i, label) in train.labels().iter().enumerate() {
        h.update(label.to_le_bytes());
        h.update(train.image_u8(i)?);
    }
    Ok(hex::encode(h.finalize()))
}

/// Whether `spec` is one of the fixed, named data sets (MNIST, Fashion-MNIST, CIFAR-10,
/// Flowers), whose classifiers written before fingerprints were recorded are still trusted; an
/// image folder or a Hub data set can change under the same name, so its classifier must carry
/// a fingerprint.
fn is_canonical(spec: &DatasetSpec) -> bool {
    matches!(
        spec,
        DatasetSpec::Mnist
            | DatasetSpec::FashionMnist
            | DatasetSpec::Cifar10
            | DatasetSpec::Flowers
    )
}

/// Errors unless the classifier of `meta` (stored at `path`) was trained on `train` as it is
/// now: the same class names in the same order and the same [`training_fingerprint`]. A stored
/// classifier without a fingerprint (written by an older ddpm-rs) passes only for a canonical
/// data set (`is_canonical`). The error is one sentence naming the file and saying to retrain.
pub fn check_trained_on(
    meta: &ClassifierMeta,
    path: &Path,
    spec: &DatasetSpec,
    train: &Dataset,
) -> Result<()> {
    let advice = "retrain it with `ddpm eval --train-classifier` (or delete the file)";
    let data = format!("the training split of {spec}");
    if let Some(names) = &meta.class_names {
        if names.as_slice() != train.class_names() {
            return Err(TrainError::Other(format!(
                "the stored classifier {} was trained on the classes [{}], but {data} has the \
                 classes [{}]: {advice}",
                path.display(),
                names.join(", "),
                train.class_names().join(", ")
            )));
        }
    }
    match &meta.train_fingerprint {
        Some(stored) if *stored != training_fingerprint(train)? => Err(TrainError::Other(format!(
            "the stored classifier {} was trained on other images than {data} holds now \
                 ({} images; it was trained on {}): {advice}",
            path.display(),
            train.len(),
            meta.train_images
        ))),
        None if !is_canonical(spec) => Err(TrainError::Other(format!(
            "the stored classifier {} records no fingerprint of the images and classes it was \
             trained on (written by an older ddpm-rs), so it cannot be checked against {data}: \
             {advice}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// The classifier's weights.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: ClassifierConfig,
    vars: BTreeMap<String, Var>,
}

/// PyTorch's default init of conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
/// drawn from a ChaCha8 stream per tensor name.
fn uniform_var(
    name: &str,
    shape: &[usize],
    fan_in: usize,
    seed: u64,
    device: &Device,
) -> Result<Var> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ h);
    let bound = 1.0 / (fan_in as f32).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

impl Classifier {
    /// A freshly initialized classifier (the same seed gives the same weights).
    pub fn new(config: &ClassifierConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let (c, w, f, k) = (
            config.channels,
            config.width,
            config.feature_dim,
            config.num_classes,
        );
        let mut vars = BTreeMap::new();
        for (i, (cin, cout)) in [(c, w), (w, 2 * w), (2 * w, 4 * w)].into_iter().enumerate() {
            let fan_in = cin * 9;
            let wn = format!("conv{i}.weight");
            let bn = format!("conv{i}.bias");
            vars.insert(
                wn.clone(),
                uniform_var(&wn, &[cout, cin, 3, 3], fan_in, seed, device)?,
            );
            vars.insert(bn.clone(), uniform_var(&bn, &[cout], fan_in, seed, device)?);
            vars.insert(
                format!("norm{i}.weight"),
                Var::ones(cout, DType::F32, device)?,
            );
            vars.insert(
                format!("norm{i}.bias"),
                Var::zeros(cout, DType::F32, device)?,
            );
        }
        let r = config.map_size();
        for (name, din, dout) in [("fc", 4 * w * r * r, f), ("head", f, k)] {
            let wn = format!("{name}.weight");
            let bn = format!("{name}.bias");
            vars.insert(
                wn.clone(),
                uniform_var(&wn, &[dout, din], din, seed, device)?,
            );
            vars.insert(bn.clone(), uniform_var(&bn, &[dout], din, seed, device)?);
        }
        Ok(Self {
            config: config.clone(),
            vars,
        })
    }

    /// The classifier's shape.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// The trainable variables by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    fn var(&self, name: &str) -> Result<&Tensor> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| TrainError::Other(format!("classifier has no tensor `{name}`")))
    }

    /// The feature vectors (penultimate layer) of images `x` `(b, c, s, s)` in [-1, 1]: `(b, F)`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        // x: (b, c, s, s)
        let cfg = &self.config;
        let ok = matches!(x.dims(), &[_, c, h, w] if c == cfg.channels && h == cfg.image_size && w == cfg.image_size);
        if !ok {
            return Err(TrainError::Other(format!(
                "classifier input has shape {:?}, expected (batch, {}, {}, {})",
                x.dims(),
                cfg.channels,
                cfg.image_size,
                cfg.image_size
            )));
        }
        let mut h = x.to_dtype(DType::F32)?;
        for (i, stride) in [1usize, 2, 2].into_iter().enumerate() {
            h = ops::conv2d(
                &h,
                self.var(&format!("conv{i}.weight"))?,
                Some(self.var(&format!("conv{i}.bias"))?),
                ConvParams { stride, padding: 1 },
            )?;
            h = ops::group_norm(
                &h,
                GROUPS,
                self.var(&format!("norm{i}.weight"))?,
                self.var(&format!("norm{i}.bias"))?,
                1e-5,
            )?;
            h = ops::silu(&h)?;
        }
        let flat = h.flatten_from(1)?;
        let f = ops::linear(&flat, self.var("fc.weight")?, Some(self.var("fc.bias")?))?;
        Ok(ops::silu(&f)?)
    }

    /// The class logits `(b, K)` of feature vectors `(b, F)`.
    pub fn logits_of_features(&self, features: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(
            features,
            self.var("head.weight")?,
            Some(self.var("head.bias")?),
        )?)
    }

    /// Features `(n, F)` and class probabilities `(n, K)` of many images, in batches, without
    /// gradients, as F64 tensors on the CPU.
    pub fn embed(&self, images: &Tensor, batch_size: usize) -> Result<(Tensor, Tensor)> {
        let n = images.dim(0)?;
        let device = self.device();
        let (mut feats, mut probs) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let b = batch_size.max(1).min(n - start);
            let x = images.narrow(0, start, b)?.to_device(&device)?;
            let f = self.features(&x)?.detach();
            let logits = self.logits_of_features(&f)?.detach();
            probs.push(
                ops::softmax(&logits, 1)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F64)?,
            );
            feats.push(f.to_device(&Device::Cpu)?.to_dtype(DType::F64)?);
            start += b;
        }
        Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&probs, 0)?))
    }

    fn device(&self) -> Device {
        self.vars
            .values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Writes the weights and `meta` to `path` as safetensors, atomically (creating the folder).
    pub fn save(&self, path: &Path, meta: &ClassifierMeta) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, "creating", e))?;
        }
        let tensors: BTreeMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let json = serde_json::to_string(meta).map_err(|e| TrainError::Other(e.to_string()))?;
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), CLASSIFIER_FORMAT.to_string()),
            (CLASSIFIER_META_KEY.to_string(), json),
        ]);
        let bytes = to_safetensors_bytes(&tensors, metadata)?;
        write_atomic(path, &bytes).map_err(|e| TrainError::io(path, "writing classifier", e))
    }

    /// Loads a classifier written by [`Classifier::save`], with its metadata.
    pub fn load(path: &Path, device: &Device) -> Result<(Self, ClassifierMeta)> {
        let file = read_safetensors(path, device)?;
        let bad = |reason: String| TrainError::Checkpoint {
            path: Some(path.to_path_buf()),
            reason,
        };
        if file.metadata.get(FORMAT_KEY).map(String::as_str) != Some(CLASSIFIER_FORMAT) {
            return Err(bad(format!(
                "is not a classifier written by ddpm-rs (no `{FORMAT_KEY}` = `{CLASSIFIER_FORMAT}`); \
                 retrain it with `ddpm eval --train-classifier`"
            )));
        }
        let meta: ClassifierMeta = file
            .metadata
            .get(CLASSIFIER_META_KEY)
            .ok_or_else(|| bad(format!("has no `{CLASSIFIER_META_KEY}` metadata")))
            .and_then(|s| {
                serde_json::from_str(s)
                    .map_err(|e| bad(format!("invalid classifier metadata: {e}")))
            })?;
        let classifier = Self::new(&meta.config, 0, device)?;
        assign_checked(&classifier.vars, &file.tensors, path)?;
        Ok((classifier, meta))
    }
}

/// Mean cross-entropy of `logits` `(b, K)` against `labels` `(b,)` u32, built from ops with a
/// backward pass (a max-shifted log-sum-exp).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_z)?;
    let labels: Vec<u32> = labels.to_device(&Device::Cpu)?.to_vec1()?;
    let mut one_hot = vec![0f32; b * k];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < k {
            one_hot[i * k + l as usize] = 1.0;
        }
    }
    let one_hot = Tensor::from_vec(one_hot, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    let total = (log_probs * one_hot)?.sum_all()?.neg()?;
    Ok((total / b as f64)?)
}

/// Top-1 accuracy of `classifier` on every image of `dataset`.
pub fn accuracy(classifier: &Classifier, dataset: &Dataset, batch_size: usize) -> Result<f64> {
    let device = classifier.device();
    let n = dataset.len();
    let mut correct = 0usize;
    let mut start = 0;
    while start < n {
        let idx: Vec<usize> = (start..(start + batch_size.max(1)).min(n)).collect();
        let x = super::nll::image_batch(dataset, &idx, &device)?;
        let logits = classifier
            .logits_of_features(&classifier.features(&x)?)?
            .detach();
        let pred: Vec<u32> = logits.argmax(1)?.to_device(&Device::Cpu)?.to_vec1()?;
        correct += idx
            .iter()
            .zip(&pred)
            .filter(|(&i, &p)| dataset.labels()[i] == p)
            .count();
        start += idx.len();
    }
    Ok(correct as f64 / n.max(1) as f64)
}

/// Trains a classifier of `config` on `train` and measures it on `test`.
pub fn train_classifier(
    config: &ClassifierConfig,
    training: &ClassifierTraining,
    train: &Dataset,
    test: &Dataset,
    device: &Device,
    progress: bool,
) -> Result<(Classifier, ClassifierMeta)> {
    if training.steps == 0 || training.batch_size == 0 {
        return Err(TrainError::Other(
            "classifier: `steps` and `batch_size` must be at least 1".into(),
        ));
    }
    if !(training.lr > 0.0 && training.lr.is_finite()) {
        return Err(TrainError::Other(format!(
            "classifier: `lr` must be positive, got {}",
            training.lr
        )));
    }
    let start = Instant::now();
    let classifier = Classifier::new(config, training.seed, device)?;
    let batch = training.batch_size.min(train.len());
    let mut loader = Loader::new(train.clone(), batch, training.seed, true, 1)?;
    let mut opt = AdamW::new(
        classifier.vars.clone(),
        AdamWConfig {
            lr: training.lr,
            weight_decay: training.weight_decay,
            ..AdamWConfig::default()
        },
        // The classifier has no policy of its own: its ops and its updates run under the one
        // in force (the one the binary installed).
        ddpm_unet::KernelPolicy::active(),
    )?;
    tracing::info!(
        dataset = train.name(),
        images = train.len(),
        steps = training.steps,
        width = config.width,
        features = config.feature_dim,
        "training the feature classifier"
    );
    let bar = if progress {
        crate::trainer::progress_bar(training.steps as u64, "classifier")
    } else {
        ProgressBar::hidden()
    };
    let mut recent: Vec<f64> = Vec::new();
    for step in 1..=training.steps {
        let b = loader.next_batch()?;
        let x = b.images.to_device(device)?;
        let logits = classifier.logits_of_features(&classifier.features(&x)?)?;
        let loss = cross_entropy(&logits, &b.labels)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(TrainError::Other(format!(
                "classifier training: the loss became {value} at step {step}; lower its learning rate"
            )));
        }
        let grads = loss.backward()?;
        let named: BTreeMap<String, Tensor> = classifier
            .vars
            .iter()
            .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
            .collect();
        let progress_frac = step as f64 / training.steps as f64;
        let lr = warmup_lr(training.lr, training.warmup_steps, step)
            * 0.5
            * (1.0 + (std::f64::consts::PI * progress_frac).cos()).max(0.0);
        opt.step(&named, lr.max(1e-3 * training.lr))?;
        recent.push(value);
        if recent.len() > 50 {
            recent.remove(0);
        }
        bar.inc(1);
        if step % 100 == 0 || step == training.steps {
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            bar.set_message(format!("loss {mean:.3}"));
            tracing::debug!(step, loss = mean, "classifier");
        }
    }
    bar.finish_and_clear();
    let test_accuracy = accuracy(&classifier, test, 256)?;
    let meta = ClassifierMeta {
        format: CLASSIFIER_FORMAT.to_string(),
        dataset: String::new(),
        config: config.clone(),
        training: training.clone(),
        train_images: train.len(),
        test_images: test.len(),
        test_accuracy,
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        train_seconds: start.elapsed().as_secs_f64(),
        class_names: Some(train.class_names().to_vec()),
        train_fingerprint: Some(training_fingerprint(train)?),
    };
    tracing::info!(
        test_accuracy,
        loss = meta.final_loss,
        seconds = meta.train_seconds,
        "feature classifier trained"
    );
    Ok((classifier, meta))
}

/// Where the classifier of a data set at an image size is kept:
/// `<data root>/classifiers/<name>-<size>.safetensors` (`mnist-28`, `cifar10-32`, `flowers-32`;
/// an image folder is named after its last component and a hash of its path, a Hub data set
/// after its repository and split).
pub fn default_path(data_root: &Path, spec: &DatasetSpec, image_size: usize) -> PathBuf {
    let name = match spec {
        DatasetSpec::Folder(p) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in p.to_string_lossy().bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            let base: String = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("folder-{base}-{:08x}", h as u32)
        }
        // A Hub data set: its repository and split (`hf-OWNER--NAME-train`).
        DatasetSpec::Hub(h) => format!(
            "hf-{}-{}",
            h.repo.replace('/', "--"),
            h.split_or_default().replace('/', "--")
        ),
        other => other.name().to_string(),
    };
    data_root
        .join("classifiers")
        .join(format!("{name}-{image_size}.safetensors"))
}

/// A classifier ready for use and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedClassifier {
    /// The network.
    pub classifier: Classifier,
    /// Its stored metadata.
    pub meta: ClassifierMeta,
    /// Its file.
    pub path: PathBuf,
    /// Whether it was trained by this call.
    pub trained_now: bool,
}

/// Loads the classifier at `path`, or trains one (on `train`, measured on `test`) and stores it
/// there when the file is missing or `retrain` is set. A stored classifier must fit `config`'s
/// image size, channels and classes, and must have been trained on `train` as it is now
/// ([`check_trained_on`]); its own width and feature size are kept.
#[allow(clippy::too_many_arguments)]
pub fn load_or_train(
    path: &Path,
    retrain: bool,
    config: &ClassifierConfig,
    training: &ClassifierTraining,
    dataset: &DatasetSpec,
    train: &Dataset,
    test: &Dataset,
    device: &Device,
    progress: bool,
) -> Result<LoadedClassifier> {
    if !retrain && path.exists() {
        let (classifier, meta) = Classifier::load(path, device)?;
        let c = &meta.config;
        if (c.image_size, c.channels, c.num_classes)
            != (config.image_size, config.channels, config.num_classes)
        {
            return Err(TrainError::Other(format!(
                "the stored classifier {} was trained on {}-channel {}x{} images of {} classes, \
                 but the data has {}-channel {}x{} images of {} classes: retrain it with \
                 `ddpm eval --train-classifier` (or delete the file)",
                path.display(),
                c.channels,
                c.image_size,
                c.image_size,
                c.num_classes,
                config.channels,
                config.image_size,
                config.image_size,
                config.num_classes
            )));
        }
        check_trained_on(&meta, path, dataset, train)?;
        tracing::info!(path = %path.display(), test_accuracy = meta.test_accuracy, "feature classifier loaded");
        return Ok(LoadedClassifier {
            classifier,
            meta,
            path: path.to_path_buf(),
            trained_now: false,
        });
    }
    let (classifier, mut meta) = train_classifier(config, training, train, test, device, progress)?;
    meta.dataset = dataset.to_string();
    classifier.save(path, &meta)?;
    tracing::info!(path = %path.display(), "feature classifier saved");
    Ok(LoadedClassifier {
        classifier,
        meta,
        path: path.to_path_buf(),
        trained_now: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes that differ only in brightness: dark (0..40) and bright (215..255) 8x8 images.
    fn toy(n: usize, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = (i % 2) as u32;
            let base = if label == 0 { 0u8 } else { 215 };
            pixels.extend((0..64).map(|_| base + rng.random_range(0..40u8)));
            labels.push(label);
        }
        Dataset::from_u8(1, 8, pixels, labels, vec!["dark".into(), "bright".into()]).expect("toy")
    }

    /// Widths and feature counts beyond the bounds are refused by name (400000 and 1e8 aborted
    /// on allocations of terabytes); the bounds themselves pass.
    #[test]
    fn absurd_classifier_sizes_are_refused() {
        let base = ClassifierConfig::for_dataset(&toy(4, 0));
        let with = |width, feature_dim| ClassifierConfig {
            width,
            feature_dim,
            ..base.clone()
        };
        assert!(with(MAX_WIDTH, MAX_FEATURES).validate().is_ok());
        let e = with(400_000, 64).validate().expect_err("too wide");
        assert!(e.to_string().contains("--classifier-width"), "{e}");
        let e = with(16, 100_000_000)
            .validate()
            .expect_err("too many features");
        assert!(e.to_string().contains("--classifier-features"), "{e}");
    }

    #[test]
    fn cross_entropy_is_the_closed_form() {
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu).expect("l");
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).expect("y");
        let got = cross_entropy(&logits, &labels)
            .expect("ce")
            .to_scalar::<f32>()
            .expect("s");
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let want = ((lse - 3.0) + 3f64.ln()) / 2.0;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn trains_saves_and_loads() {
        let (train, test) = (toy(64, 1), toy(32, 2));
        let config = ClassifierConfig {
            width: 4,
            feature_dim: 8,
            ..ClassifierConfig::for_dataset(&train)
        };
        let training = ClassifierTraining {
            steps: 40,
            batch_size: 16,
            warmup_steps: 5,
            lr: 1e-2,
            ..ClassifierTraining::default()
        };
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c/toy-8.safetensors");
        let spec = DatasetSpec::Folder("toy".into());
        let a = load_or_train(
            &path,
            false,
            &config,
            &training,
            &spec,
            &train,
            &test,
            &Device::Cpu,
            false,
        )
        .expect("trained");
        assert!(a.trained_now && path.exists());
        assert!(a.meta.test_accuracy > 0.9, "{:?}", a.meta);
        let b = load_or_train(
            &path,
            false,
            &config,
            &training,
            &spec,
            &train,
            &test,
            &Device::Cpu,
            false,
        )
        .expect("loaded");
        assert!(!b.trained_now);
        // The metadata round-trips through JSON (floats to within their printed precision).
        assert_eq!(b.meta.config, a.meta.config);
        assert_eq!(b.meta.training, a.meta.training);
        assert_eq!(b.meta.test_accuracy, a.meta.test_accuracy);
        assert_eq!(b.meta.dataset, "folder:toy");
        let x = super::super::nll::image_batch(&test, &[0, 1, 2], &Device::Cpu).expect("x");
        let (fa, pa) = a.classifier.embed(&x, 2).expect("embed");
        let (fb, pb) = b.classifier.embed(&x, 3).expect("embed");
        assert_eq!(fa.dims(), &[3, 8]);
        assert_eq!(pa.dims(), &[3, 2]);
        assert_eq!(
            fa.to_vec2::<f64>().expect("f"),
            fb.to_vec2::<f64>().expect("f")
        );
        assert_eq!(
            pa.to_vec2::<f64>().expect("p"),
            pb.to_vec2::<f64>().expect("p")
        );
        // A classifier of other images is refused with a clear reason.
        let other = ClassifierConfig {
            image_size: 16,
            ..config
        };
        let e = load_or_train(
            &path,
            false,
            &other,
            &training,
            &spec,
            &train,
            &test,
            &Device::Cpu,
            false,
        )
        .expect_err("mismatch");
        assert!(e.to_string().contains("--train-classifier"), "{e}");
    }

    /// `toy` with its images, class names or labels changed one at a time.
    fn toy_with(n: usize, seed: u64, names: [&str; 2], swap_first: bool) -> Dataset {
        let t = toy(n, seed);
        let pixels: Vec<u8> = (0..t.len())
            .flat_map(|i| t.image_u8(i).expect("image").to_vec())
            .collect();
        let mut labels = t.labels().to_vec();
        if swap_first {
            labels[0] = 1 - labels[0];
        }
        Dataset::from_u8(
            1,
            8,
            pixels,
            labels,
            names.iter().map(|s| s.to_string()).collect(),
        )
        .expect("toy")
    }

    /// The fingerprint follows the images, their labels and the class names, and nothing else.
    #[test]
    fn fingerprint_changes_with_images_labels_and_class_names() {
        let base = training_fingerprint(&toy(16, 1)).expect("fp");
        assert_eq!(base.len(), 64);
        assert_eq!(base, training_fingerprint(&toy(16, 1)).expect("fp"));
        assert_eq!(
            base,
            training_fingerprint(&toy_with(16, 1, ["dark", "bright"], false)).expect("fp")
        );
        for (what, other) in [
            ("other pixels", toy(16, 2)),
            ("one image fewer", toy(15, 1)),
            (
                "renamed classes",
                toy_with(16, 1, ["night", "bright"], false),
            ),
            (
                "classes swapped in order",
                toy_with(16, 1, ["bright", "dark"], false),
            ),
            ("one label moved", toy_with(16, 1, ["dark", "bright"], true)),
        ] {
            assert_ne!(
                base,
                training_fingerprint(&other).expect("fp"),
                "{what} kept the fingerprint"
            );
        }
    }

    /// A stored classifier is reused while its training data is unchanged, refused (one line
    /// naming the file and `--train-classifier`) once the images or the class names change, and
    /// retraining stores one that is reused again; a file without a fingerprint is refused for
    /// an image folder and trusted for a canonical data set.
    #[test]
    fn stored_classifier_of_other_data_is_refused() {
        let (train, test) = (toy(32, 1), toy(16, 2));
        let config = ClassifierConfig {
            width: 4,
            feature_dim: 8,
            ..ClassifierConfig::for_dataset(&train)
        };
        let training = ClassifierTraining {
            steps: 3,
            batch_size: 8,
            warmup_steps: 1,
            ..ClassifierTraining::default()
        };
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("toy-8.safetensors");
        let spec = DatasetSpec::Folder("toy".into());
        let go = |retrain: bool, train: &Dataset| {
            load_or_train(
                &path,
                retrain,
                &config,
                &training,
                &spec,
                train,
                &test,
                &Device::Cpu,
                false,
            )
        };
        let a = go(false, &train).expect("trained");
        assert!(a.trained_now);
        assert_eq!(
            a.meta.train_fingerprint.as_deref(),
            Some(training_fingerprint(&train).expect("fp").as_str())
        );
        assert_eq!(a.meta.class_names.as_deref(), Some(train.class_names()));
        assert!(!go(false, &toy(32, 1)).expect("reused").trained_now);

        let other_images = toy(32, 3);
        let e = go(false, &other_images).expect_err("other images");
        let msg = e.to_string();
        assert!(msg.contains("other images"), "{msg}");
        assert!(msg.contains("--train-classifier"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(!msg.contains('\n') && !msg.contains("   "), "{msg}");

        let renamed = toy_with(32, 1, ["night", "bright"], false);
        let e = go(false, &renamed).expect_err("renamed classes");
        let msg = e.to_string();
        assert!(
            msg.contains("[dark, bright]") && msg.contains("[night, bright]"),
            "{msg}"
        );
        assert!(msg.contains("--train-classifier"), "{msg}");

        // Retraining replaces it; the new one is reused for the new data and refused for the old.
        assert!(go(true, &renamed).expect("retrained").trained_now);
        assert!(!go(false, &renamed).expect("reused").trained_now);
        assert!(go(false, &train).is_err());

        // A file written before fingerprints (none in its metadata).
        let (classifier, mut meta) = Classifier::load(&path, &Device::Cpu).expect("load");
        meta.class_names = None;
        meta.train_fingerprint = None;
        classifier.save(&path, &meta).expect("save");
        let json = read_safetensors(&path, &Device::Cpu)
            .expect("read")
            .metadata[CLASSIFIER_META_KEY]
            .clone();
        assert!(!json.contains("fingerprint"), "{json}");
        let e = go(false, &renamed).expect_err("legacy folder classifier");
        let msg = e.to_string();
        assert!(
            msg.contains("no fingerprint") && msg.contains("--train-classifier"),
            "{msg}"
        );
        check_trained_on(&meta, &path, &DatasetSpec::Mnist, &renamed)
            .expect("a canonical data set keeps its older classifier");
    }

    #[test]
    fn bad_configs_and_paths() {
        let train = toy(4, 0);
        let mut c = ClassifierConfig::for_dataset(&train);
        c.width = 6;
        assert!(Classifier::new(&c, 0, &Device::Cpu).is_err());
        assert_eq!(
            default_path(Path::new("data"), &DatasetSpec::Mnist, 28),
            PathBuf::from("data/classifiers/mnist-28.safetensors")
        );
        let p = default_path(
            Path::new("d"),
            &DatasetSpec::Folder("/x/my pics".into()),
            32,
        );
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        assert!(
            name.starts_with("folder-my_pics-") && name.ends_with("-32.safetensors"),
            "{name}"
        );
    }
}
