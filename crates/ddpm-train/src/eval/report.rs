//! The evaluation report: what was evaluated and every number, as JSON (written atomically) and
//! as readable text.

use std::fmt::Write as _;
use std::path::Path;

use ddpm_fs::write_atomic;
use ddpm_schedule::{Objective, SamplerConfig, ScheduleConfig};
use serde::{Deserialize, Serialize};

use super::nll::NllReport;
use super::quality::{ClassifierSummary, QualityReport};
use super::recognisable::{Recognisability, FID_FEATURES};
use super::samples::SampleSource;
use crate::{Result, TrainError};

/// Format tag of the JSON report.
pub const EVAL_FORMAT: &str = "ddpm-rs/eval/v1";
/// Format tag of the JSON report of `ddpm eval --samples`.
pub const SAMPLES_FORMAT: &str = "ddpm-rs/eval-samples/v1";

/// Everything `ddpm eval` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// [`EVAL_FORMAT`].
    pub format: String,
    /// The checkpoint or weights file evaluated.
    pub checkpoint: String,
    /// Its training step, when known.
    pub step: Option<usize>,
    /// `ema` or `raw`.
    pub weights: String,
    /// The model's objective.
    pub objective: Objective,
    /// The model's schedule, when one of our named schedules gives its betas; `null` for betas
    /// listed one by one, which [`EvalReport::betas`] describes.
    pub schedule: Option<ScheduleConfig>,
    /// The model's betas when no named schedule gives them (a diffusers scheduler's
    /// `trained_betas`, or a formula we have no name for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<ListedBetas>,
    /// The data set (`mnist`, `folder:PATH`, ...).
    pub dataset: String,
    /// The split evaluated (`test`, `train` or `all`).
    pub split: String,
    /// Images in that split.
    pub split_images: usize,
    /// Image side.
    pub image_size: usize,
    /// Image channels.
    pub channels: usize,
    /// The bound, when computed.
    pub nll: Option<NllReport>,
    /// Sample quality, when computed.
    pub quality: Option<QualityReport>,
    /// Wall-clock seconds of the whole evaluation.
    pub seconds: f64,
}

/// Betas that no named schedule gives, as the report records them: what they are called, how
/// many, a hash that identifies them and the file they were read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedBetas {
    /// diffusers' name for them: `trained_betas` (listed in the file) or the `beta_schedule`
    /// whose formula none of ours reproduces (`laplace`).
    pub beta_schedule: String,
    /// How many: the number of timesteps `T`.
    pub count: usize,
    /// SHA-256 (hex) of the betas as little-endian `f64` bytes in timestep order.
    pub sha256: String,
    /// The first beta, `beta_0`.
    pub first: f64,
    /// The last beta, `beta_{T-1}`.
    pub last: f64,
    /// The file they were read from (a `scheduler_config.json`).
    pub file: String,
}

impl ListedBetas {
    /// The record of `betas`, named `beta_schedule`, read from `file`.
    pub fn new(beta_schedule: &str, betas: &[f64], file: &Path) -> Self {
        let bytes: Vec<u8> = betas.iter().flat_map(|b| b.to_le_bytes()).collect();
        Self {
            beta_schedule: beta_schedule.to_string(),
            count: betas.len(),
            sha256: crate::checkpoint::sha256_hex(&bytes),
            first: betas.first().copied().unwrap_or(f64::NAN),
            last: betas.last().copied().unwrap_or(f64::NAN),
            file: file.display().to_string(),
        }
    }
}

/// The serde name of a unit enum value (`fixed_large`, `eps`, ...).
fn word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn sampler_text(s: &SamplerConfig) -> String {
    let steps = |n: &Option<usize>| n.map_or_else(|| "all".to_string(), |n| n.to_string());
    match s {
        SamplerConfig::Ddim { steps: n, eta, .. } => format!("DDIM, {} steps, eta {eta}", steps(n)),
        SamplerConfig::Ddpm {
            steps: n, variance, ..
        } => format!("DDPM, {} steps, {} variance", steps(n), word(variance)),
        SamplerConfig::DpmSolver { steps: n, .. } => format!(
            "DPM-Solver++, {} steps",
            n.map_or_else(|| "default".to_string(), |n| n.to_string())
        ),
    }
}

impl EvalReport {
    /// The number of diffusion steps `T` of the model's schedule.
    pub fn timesteps(&self) -> usize {
        match (&self.schedule, &self.betas) {
            (Some(s), _) => s.timesteps,
            (None, Some(b)) => b.count,
            (None, None) => 0,
        }
    }

    /// Writes the report as pretty JSON to `path`, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| TrainError::Other(e.to_string()))?;
        write_atomic(path, &json).map_err(|e| TrainError::io(path, "writing the report", e))
    }

    /// The report as a few readable lines.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let step = self.step.map_or_else(|| "?".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "{} (step {step}, {} weights, {:?} objective, T = {})",
            self.checkpoint,
            self.weights,
            self.objective,
            self.timesteps()
        );
        if let Some(b) = &self.betas {
            let _ = writeln!(
                s,
                "betas: {} ({} values, {} to {}, sha256 {}) from {}",
                b.beta_schedule,
                b.count,
                b.first,
                b.last,
                &b.sha256[..b.sha256.len().min(16)],
                b.file
            );
        }
        let _ = writeln!(
            s,
            "data: {} {} split, {} images, {}x{}x{}",
            self.dataset,
            self.split,
            self.split_images,
            self.channels,
            self.image_size,
            self.image_size
        );
        if let Some(n) = &self.nll {
            let se = n
                .bpd_stderr
                .map_or_else(String::new, |v| format!(" +- {v:.4}"));
            let how = match n.sampled_timesteps {
                Some(k) => format!("{k} stratified timesteps per image"),
                None => format!("all {} terms", n.timesteps),
            };
            let _ = writeln!(
                s,
                "\nnegative variational bound: {:.4}{se} bits/dim ({} images, {how}, {} variance, {} CDF)",
                n.bpd,
                n.images,
                word(&n.bound.variance),
                n.bound.cdf.name()
            );
            let _ = writeln!(s, "  prior   L_T          {:>9.4}", n.prior_bpd);
            for r in n.middle.iter().rev() {
                let _ = writeln!(
                    s,
                    "  L_t, t = {:>4}..{:<4}  {:>9.4}",
                    r.first_t, r.last_t, r.bpd
                );
            }
            let _ = writeln!(s, "  decoder L_0          {:>9.4}", n.decoder_bpd);
            let _ = writeln!(s, "  ({:.1} s)", n.seconds);
        }
        if let Some(q) = &self.quality {
            let c = &q.classifier;
            let _ = writeln!(
                s,
                "\nsample quality: {} samples ({}, seed {}) vs {} test images",
                q.num_samples,
                sampler_text(&q.sampler),
                q.seed,
                q.test_images
            );
            let _ = writeln!(
                s,
                "  classifier {} ({}, width {}, {} features, test accuracy {:.2}%)",
                c.path,
                if c.trained_now {
                    "trained now"
                } else {
                    "stored"
                },
                c.config.width,
                c.config.feature_dim,
                100.0 * c.test_accuracy
            );
            if q.recognisable.fid_features == FID_FEATURES {
                let _ = writeln!(
                    s,
                    "  classifier-feature FID {:.3} (train vs test images: {:.3}); not comparable with Inception FID",
                    q.fid, q.fid_train_vs_test
                );
            } else {
                let _ = writeln!(
                    s,
                    "  FID ({}) {:.3} (train vs test images: {:.3})",
                    q.recognisable.fid_features, q.fid, q.fid_train_vs_test
                );
            }
            let _ = writeln!(
                s,
                "  Inception-style score {:.3} (test images: {:.3}; at most {})",
                q.inception_score,
                q.inception_score_test,
                q.class_names.len()
            );
            let hist: Vec<String> = q
                .class_names
                .iter()
                .zip(&q.class_histogram)
                .map(|(n, c)| format!("{n}:{c}"))
                .collect();
            let _ = writeln!(
                s,
                "  classes covered {}/{}: {}",
                q.classes_covered,
                q.class_names.len(),
                hist.join(" ")
            );
            if let (Some(g), Some(acc)) = (&q.guidance, q.label_accuracy) {
                let _ = writeln!(
                    s,
                    "  class-conditional: guidance scale {}, {}; {:.2}% of samples classified as the class they were sampled with",
                    g.scale,
                    g.class.map_or_else(|| "classes in turn".to_string(), |c| format!("class {c}")),
                    100.0 * acc
                );
            }
            let m = &q.memorization;
            let _ = writeln!(
                s,
                "  memorization: {:.2}% of samples within {:.3} (= {} x median test-to-train distance {:.3}) of a training image; test images: {:.2}%",
                100.0 * m.fraction,
                m.threshold,
                m.ratio,
                m.median_test_distance,
                100.0 * m.test_fraction
            );
            let _ = writeln!(
                s,
                "  nearest-training-image distance of samples: median {:.3}, min {:.3}{}",
                m.median_sample_distance,
                m.min_sample_distance,
                m.nearest_png
                    .as_ref()
                    .map_or_else(String::new, |p| format!(" (closest pairs: {p})"))
            );
            let _ = writeln!(
                s,
                "  recognisability, samples vs real held-out test images:"
            );
            let _ = writeln!(s, "{}", q.recognisable.to_table("    "));
            let _ = writeln!(s, "  ({:.1} s)", q.seconds);
        }
        let _ = write!(s, "\ntotal {:.1} s", self.seconds);
        s
    }
}

/// What `ddpm eval --samples` measured: images read from files, scored with the classifier of a
/// data set, next to real held-out test images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplesReport {
    /// [`SAMPLES_FORMAT`].
    pub format: String,
    /// The folder or grid image read.
    pub samples: String,
    /// How it was read.
    pub source: SampleSource,
    /// The data set whose classifier and test split were used (`mnist`, `folder:PATH`, ...).
    pub dataset: String,
    /// Image side the samples were brought to.
    pub image_size: usize,
    /// Image channels the samples were brought to.
    pub channels: usize,
    /// Seed of the choice of reference and floor images.
    pub seed: u64,
    /// The feature classifier.
    pub classifier: ClassifierSummary,
    /// What was done to the images (resized, converted, cells dropped, files skipped).
    pub notes: Vec<String>,
    /// The numbers.
    pub recognisable: Recognisability,
    /// Wall-clock seconds (classifier training included).
    pub seconds: f64,
}

impl SamplesReport {
    /// Writes the report as pretty JSON to `path`, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| TrainError::Other(e.to_string()))?;
        write_atomic(path, &json).map_err(|e| TrainError::io(path, "writing the report", e))
    }

    /// The report as a readable table.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let how = match &self.source {
            SampleSource::Folder { files, .. } => format!("a folder of {files} images"),
            SampleSource::Grid {
                cell,
                columns,
                rows,
                ..
            } => format!(
                "a grid of {columns} x {rows} cells of {cell}x{cell}, {} images",
                self.recognisable.samples.images
            ),
        };
        let _ = writeln!(s, "{} ({how})", self.samples);
        let _ = writeln!(
            s,
            "scored as {} images ({}x{}x{}), seed {}",
            self.dataset, self.channels, self.image_size, self.image_size, self.seed
        );
        let c = &self.classifier;
        let _ = writeln!(
            s,
            "classifier {} ({}, width {}, {} features, test accuracy {:.2}%)",
            c.path,
            if c.trained_now {
                "trained now"
            } else {
                "stored"
            },
            c.config.width,
            c.config.feature_dim,
            100.0 * c.test_accuracy
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", self.recognisable.to_table(""));
        if self.recognisable.fid_features == FID_FEATURES {
            let _ = writeln!(
                s,
                "(this FID is in the classifier's features: not comparable with Inception FID)"
            );
        }
        let _ = write!(s, "total {:.1} s", self.seconds);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn report(schedule: Option<ScheduleConfig>, betas: Option<ListedBetas>) -> EvalReport {
        EvalReport {
            format: EVAL_FORMAT.to_string(),
            checkpoint: "pipe".into(),
            step: None,
            weights: "diffusers".into(),
            objective: Objective::Eps,
            schedule,
            betas,
            dataset: "mnist".into(),
            split: "test".into(),
            split_images: 10,
            image_size: 16,
            channels: 1,
            nll: None,
            quality: None,
            seconds: 0.0,
        }
    }

    #[test]
    fn listed_betas_hash_their_little_endian_f64_bytes() {
        let b = ListedBetas::new("trained_betas", &[0.5, 0.25], Path::new("s.json"));
        // 0.5 = 0x3fe0000000000000 and 0.25 = 0x3fd0000000000000, little-endian.
        let bytes = [0, 0, 0, 0, 0, 0, 0xe0, 0x3f, 0, 0, 0, 0, 0, 0, 0xd0, 0x3f];
        assert_eq!(b.sha256, hex::encode(Sha256::digest(bytes)));
        assert_eq!((b.count, b.first, b.last), (2, 0.5, 0.25));
        assert_eq!(b.file, "s.json");
    }

    #[test]
    fn a_report_names_its_schedule_or_its_listed_betas() {
        let named = report(Some(ScheduleConfig::cosine(50)), None);
        let json = serde_json::to_value(&named).expect("json");
        assert_eq!(json["schedule"]["timesteps"], 50);
        assert!(
            json.get("betas").is_none(),
            "no betas key for a named schedule"
        );
        assert_eq!(named.timesteps(), 50);

        let betas = ListedBetas::new("trained_betas", &[0.1; 7], Path::new("s.json"));
        let listed = report(None, Some(betas));
        let json = serde_json::to_value(&listed).expect("json");
        assert!(json["schedule"].is_null());
        assert_eq!(json["betas"]["beta_schedule"], "trained_betas");
        assert_eq!(json["betas"]["count"], 7);
        assert_eq!(listed.timesteps(), 7);
        assert!(listed.to_text().contains("betas: trained_betas (7 values"));
        let back: EvalReport = serde_json::from_value(json).expect("read back");
        assert_eq!(back, listed);
    }
}
