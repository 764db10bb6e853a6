//! diffusers' `DDPMScheduler` and `DDIMScheduler` configs (`scheduler_config.json`) as this
//! crate's schedule, objective and sampler settings.
//!
//! The betas are computed by diffusers' own formulas (in `f64`, where diffusers rounds them to
//! `f32`), so every `beta_schedule` diffusers has is reproduced, whether or not one of our named
//! schedules matches it; [`DiffusersScheduler::schedule`] builds a [`Schedule`] from them. The
//! names differ: diffusers' `scaled_linear` (linear in `sqrt(beta)`) is our
//! [`BetaSchedule::Quadratic`], and its `squaredcos_cap_v2` caps the betas at 0.999 with no
//! lower clip, where our default [`BetaSchedule::Cosine`] clips them to `[1e-4, 0.9999]`: it is
//! our cosine with `min_beta = f64::MIN_POSITIVE, max_beta = 0.999`.
//! [`DiffusersScheduler::named`] gives the named schedule that reproduces the betas, when one
//! does.
//!
//! A setting our samplers cannot honour (thresholding, learned variances, zero terminal SNR,
//! a clip range other than 1, ...) is refused with an error naming the field and its value. Keys
//! neither scheduler knows are ignored, as diffusers ignores them, and listed in
//! [`DiffusersScheduler::notes`].
//!
//! ```
//! use ddpm_schedule::diffusers::DiffusersScheduler;
//! use ddpm_schedule::{BetaSchedule, Objective};
//!
//! let cfg = r#"{"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
//!               "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}"#;
//! let s = DiffusersScheduler::from_json(cfg)?;
//! assert_eq!(s.objective, Objective::Eps);
//! assert!(matches!(s.named.map(|c| c.beta_schedule), Some(BetaSchedule::Quadratic { .. })));
//! assert_eq!(s.betas.len(), 1000);
//! # Ok::<(), ddpm_schedule::ScheduleError>(())
//! ```

use candle_core::{DType, Device};
use serde_json::{Map, Value};

use crate::config::{check_betas, linspace, BetaSchedule, ScheduleConfig, MAX_TIMESTEPS};
use crate::error::{Result, ScheduleError};
use crate::objective::Objective;
use crate::posterior::DdpmVariance;
use crate::schedule::Schedule;

/// The offset `s` of diffusers' `squaredcos_cap_v2` (Nichol & Dhariwal's cosine schedule).
pub const SQUAREDCOS_S: f64 = 0.008;
/// The cap of diffusers' `squaredcos_cap_v2` betas (`betas_for_alpha_bar`'s `max_beta`).
pub const SQUAREDCOS_MAX_BETA: f64 = 0.999;

/// The scheduler class a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerClass {
    /// `DDPMScheduler` (also assumed when the config names no class).
    Ddpm,
    /// `DDIMScheduler`.
    Ddim,
}

/// How diffusers spreads a sampler's steps over the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `leading`: `0, r, 2r, ...` with `r = T / S` rounded down (diffusers' default).
    Leading,
    /// `trailing`: `T - 1, T - 1 - r, ...` with `r = T / S`.
    Trailing,
    /// `linspace`: `S` values from 0 to `T - 1`, rounded (half to even, as numpy).
    Linspace,
}

/// A diffusers scheduler config read into this crate's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusersScheduler {
    /// The class the config names.
    pub class: SchedulerClass,
    /// The betas, one per training timestep, by diffusers' formula for the config's
    /// `beta_schedule` (or its `trained_betas`).
    pub betas: Vec<f64>,
    /// diffusers' name of the schedule (`trained_betas` when the config lists them).
    pub beta_schedule: String,
    /// Our named schedule that reproduces [`DiffusersScheduler::betas`] (to rounding), when one
    /// does.
    pub named: Option<ScheduleConfig>,
    /// What the network predicts (`prediction_type`).
    pub objective: Objective,
    /// The DDPM step's variance (`variance_type`).
    pub variance: DdpmVariance,
    /// Whether the predicted x_0 is clipped to [-1, 1] (`clip_sample`).
    pub clip_x0: bool,
    /// How diffusers spaces a sampler's steps (`timestep_spacing`).
    pub timestep_spacing: TimestepSpacing,
    /// The offset diffusers adds to each inference timestep (`steps_offset`).
    pub steps_offset: usize,
    /// Keys of the file neither scheduler knows, ignored (diffusers ignores them too).
    pub notes: Vec<String>,
}

/// The keys of `DDPMScheduler` and `DDIMScheduler` configs this module reads.
pub const KNOWN_SCHEDULER_KEYS: [&str; 16] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
    "set_alpha_to_one",
];

struct Fields<'a> {
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn refuse(&self, field: &str, value: &Value, reason: impl Into<String>) -> ScheduleError {
        ScheduleError::DiffusersConfig {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str, default: Value) -> Value {
        self.map.get(key).cloned().unwrap_or(default)
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        let v = self.get(key, Value::from(default));
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.refuse(key, &v, "must be a finite number"))
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        let v = self.get(key, Value::from(default));
        v.as_bool()
            .ok_or_else(|| self.refuse(key, &v, "must be true or false"))
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.get(key, Value::from(default));
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.refuse(key, &v, "must be a non-negative integer"))
    }

    fn string(&self, key: &str, default: &str) -> Result<(String, Value)> {
        let v = self.get(key, Value::from(default));
        match v.as_str() {
            Some(s) => Ok((s.to_string(), v.clone())),
            None => Err(self.refuse(key, &v, "must be a string")),
        }
    }
}

impl DiffusersScheduler {
    /// Reads a `scheduler_config.json` (its text). A key absent from the file takes diffusers'
    /// default, as diffusers does.
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| ScheduleError::DiffusersConfig {
                field: "(file)".into(),
                value: "-".into(),
                reason: format!("not valid JSON: {e}"),
            })?;
        let map = root
            .as_object()
            .ok_or_else(|| ScheduleError::DiffusersConfig {
                field: "(file)".into(),
                value: "-".into(),
                reason: "not a JSON object".into(),
            })?;
        Self::from_map(map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self> {
        let f = Fields { map };
        let class = match map.get("_class_name") {
            None => SchedulerClass::Ddpm,
            Some(v) if v == "DDPMScheduler" => SchedulerClass::Ddpm,
            Some(v) if v == "DDIMScheduler" => SchedulerClass::Ddim,
            Some(v) => {
                return Err(f.refuse(
                    "_class_name",
                    v,
                    "only DDPMScheduler and DDIMScheduler configs can be read",
                ))
            }
        };
        let mut unknown: Vec<&String> = map
            .keys()
            .filter(|k| !k.starts_with('_') && !KNOWN_SCHEDULER_KEYS.contains(&k.as_str()))
            .collect();
        unknown.sort();
        let notes = if unknown.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "ignored scheduler keys that diffusers' schedulers do not take: {}",
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )]
        };

        for (key, why) in [
            (
                "thresholding",
                "dynamic thresholding is not supported: only clipping to [-1, 1]",
            ),
            (
                "rescale_betas_zero_snr",
                "zero terminal SNR is not supported: our schedules keep alphas_cumprod[T-1] > 0",
            ),
        ] {
            if f.bool(key, false)? {
                return Err(f.refuse(key, &Value::Bool(true), why));
            }
        }
        if !f.bool("set_alpha_to_one", true)? {
            return Err(f.refuse(
                "set_alpha_to_one",
                &Value::Bool(false),
                "our DDIM's last step goes to alphas_cumprod = 1 (set_alpha_to_one = true)",
            ));
        }
        let clip_x0 = f.bool("clip_sample", true)?;
        let range = f.f64("clip_sample_range", 1.0)?;
        if clip_x0 && range != 1.0 {
            return Err(f.refuse(
                "clip_sample_range",
                &Value::from(range),
                "our samplers clip x_0 to [-1, 1]: only 1.0 is supported",
            ));
        }
        let (prediction, pv) = f.string("prediction_type", "epsilon")?;
        let objective = match prediction.as_str() {
            "epsilon" => Objective::Eps,
            "sample" => Objective::X0,
            "v_prediction" => Objective::V,
            _ => {
                return Err(f.refuse(
                    "prediction_type",
                    &pv,
                    "must be epsilon, sample or v_prediction",
                ))
            }
        };
        let (variance_type, vv) = f.string("variance_type", "fixed_small")?;
        let variance = match variance_type.as_str() {
            // fixed_small_log is the same standard deviation, computed through its log.
            "fixed_small" | "fixed_small_log" => DdpmVariance::FixedSmall,
            "fixed_large" => DdpmVariance::FixedLarge,
            "learned" | "learned_range" => {
                return Err(f.refuse(
                    "variance_type",
                    &vv,
                    "learned variances need a network with twice the output channels; only \
                     fixed_small, fixed_small_log and fixed_large are supported",
                ))
            }
            _ => {
                return Err(f.refuse(
                    "variance_type",
                    &vv,
                    "only fixed_small, fixed_small_log and fixed_large are supported",
                ))
            }
        };
        let (spacing, sv) = f.string("timestep_spacing", "leading")?;
        let timestep_spacing = match spacing.as_str() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            _ => {
                return Err(f.refuse(
                    "timestep_spacing",
                    &sv,
                    "must be leading, trailing or linspace",
                ))
            }
        };
        let steps_offset = f.usize("steps_offset", 0)?;
        // Accepted and unused: they only matter with thresholding, refused above.
        f.f64("dynamic_thresholding_ratio", 0.995)?;
        f.f64("sample_max_value", 1.0)?;

        let timesteps = f.usize("num_train_timesteps", 1000)?;
        if timesteps == 0 || timesteps > MAX_TIMESTEPS {
            return Err(f.refuse(
                "num_train_timesteps",
                &Value::from(timesteps),
                format!("must be in 1..={MAX_TIMESTEPS}"),
            ));
        }
        let (betas, beta_schedule, named) = betas_of(&f, timesteps)?;
        check_betas(&betas).map_err(|e| {
            f.refuse(
                if beta_schedule == "trained_betas" {
                    "trained_betas"
                } else {
                    "beta_schedule"
                },
                &Value::from(beta_schedule.as_str()),
                format!("gives betas outside (0, 1): {e}"),
            )
        })?;
        Ok(Self {
            class,
            betas,
            beta_schedule,
            named,
            objective,
            variance,
            clip_x0,
            timestep_spacing,
            steps_offset,
            notes,
        })
    }

    /// The number of training timesteps `T`.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The schedule of [`DiffusersScheduler::betas`], with buffers of `dtype` on `device`.
    pub fn schedule(&self, device: &Device, dtype: DType) -> Result<Schedule> {
        Schedule::from_betas(self.betas.clone(), device, dtype)
    }

    /// The timesteps diffusers' `DDIMScheduler.set_timesteps(steps)` visits, descending, with
    /// this config's spacing and offset. Our [`crate::DdimSampler::with_timesteps`] over them is
    /// diffusers' DDIM step whenever diffusers' previous timestep `t - T / steps` (rounded down)
    /// is the next one listed: always for `leading`, and for `trailing` when `steps` divides T.
    pub fn inference_timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let t_max = self.timesteps();
        if steps == 0 || steps > t_max {
            return Err(ScheduleError::InvalidSteps {
                steps,
                timesteps: t_max,
            });
        }
        let raw: Vec<f64> = match self.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = t_max / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t_max as f64 / steps as f64;
                (0..steps)
                    .map(|k| (t_max as f64 - k as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
            TimestepSpacing::Linspace => linspace(0.0, (t_max - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() + self.steps_offset as f64)
                .collect(),
        };
        raw.into_iter()
            .map(|t| {
                if t >= 0.0 && t < t_max as f64 {
                    Ok(t as usize)
                } else {
                    Err(ScheduleError::DiffusersConfig {
                        field: "steps_offset".into(),
                        value: self.steps_offset.to_string(),
                        reason: format!(
                            "puts inference timestep {t} outside 0..{t_max} at {steps} steps"
                        ),
                    })
                }
            })
            .collect()
    }
}

/// The betas of the config, diffusers' name of their schedule, and our named schedule that
/// reproduces them (checked: to 1e-12 relative plus 1e-15, the rounding of `1 - ratio` in the
/// cosine schedule's two forms), if any.
fn betas_of(f: &Fields, timesteps: usize) -> Result<(Vec<f64>, String, Option<ScheduleConfig>)> {
    let trained = f.get("trained_betas", Value::Null);
    if !trained.is_null() {
        let list = trained
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| f.refuse("trained_betas", &trained, "must be a list of numbers"))?;
        if list.len() != timesteps {
            return Err(f.refuse(
                "trained_betas",
                &Value::from(format!("[{} values]", list.len())),
                format!("must list num_train_timesteps = {timesteps} betas"),
            ));
        }
        return Ok((list, "trained_betas".into(), None));
    }
    let (name, nv) = f.string("beta_schedule", "linear")?;
    let start = f.f64("beta_start", 1e-4)?;
    let end = f.f64("beta_end", 0.02)?;
    let (betas, named) = match name.as_str() {
        "linear" => (
            linspace(start, end, timesteps),
            Some(BetaSchedule::Linear { start, end }),
        ),
        "scaled_linear" => (
            linspace(start.sqrt(), end.sqrt(), timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            Some(BetaSchedule::Quadratic { start, end }),
        ),
        "sigmoid" => (
            linspace(-6.0, 6.0, timesteps)
                .into_iter()
                .map(|x| (end - start) / (1.0 + (-x).exp()) + start)
                .collect(),
            Some(BetaSchedule::Sigmoid { start, end }),
        ),
        "squaredcos_cap_v2" => (
            alpha_bar_betas(timesteps, |t| {
                let c =
                    ((t + SQUAREDCOS_S) / (1.0 + SQUAREDCOS_S) * std::f64::consts::FRAC_PI_2).cos();
                c * c
            }),
            Some(BetaSchedule::Cosine {
                s: SQUAREDCOS_S,
                min_beta: f64::MIN_POSITIVE,
                max_beta: SQUAREDCOS_MAX_BETA,
            }),
        ),
        "laplace" => (
            alpha_bar_betas(timesteps, |t| {
                let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }),
            None,
        ),
        _ => {
            return Err(f.refuse(
                "beta_schedule",
                &nv,
                "must be linear, scaled_linear, squaredcos_cap_v2, sigmoid or laplace (or give \
                 trained_betas)",
            ))
        }
    };
    let named = named
        .map(|beta_schedule| ScheduleConfig {
            timesteps,
            beta_schedule,
        })
        .filter(|c| {
            c.betas().is_ok_and(|ours| {
                ours.iter()
                    .zip(&betas)
                    .all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs() + 1e-15)
            })
        });
    Ok((betas, name, named))
}

/// diffusers' `betas_for_alpha_bar`: `beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`.
fn alpha_bar_betas(timesteps: usize, alpha_bar: impl Fn(f64) -> f64) -> Vec<f64> {
    let n = timesteps as f64;
    (0..timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(SQUAREDCOS_MAX_BETA)
        })
        .collect()
}

/// The `_diffusers_version` written into exported scheduler configs.
pub const EXPORT_DIFFUSERS_VERSION: &str = "0.42.1";

/// A `DDPMScheduler` `scheduler_config.json` for our `schedule`, `objective` and DDPM
/// `variance`, clipping x_0 when `clip_x0`: the inverse of [`DiffusersScheduler::from_json`].
///
/// The betas are given as a named `beta_schedule` when one of diffusers' formulas reproduces
/// ours (checked by reading the candidate back: every beta to 1e-12 relative): `linear` for our
/// `linear` (and for our lucidrains-style `scaled_linear`, whose ends scaled by 1000/T are a
/// linear schedule), `scaled_linear` for our `quadratic`, `sigmoid` for `sigmoid`, and
/// `squaredcos_cap_v2` for a cosine schedule whose clipping diffusers' 0.999 cap reproduces.
/// Otherwise (our default cosine, clipped to `[1e-4, 0.9999]`) the exact betas are written as
/// `trained_betas`.
pub fn scheduler_config_json(
    schedule: &ScheduleConfig,
    objective: Objective,
    variance: DdpmVariance,
    clip_x0: bool,
) -> Result<Value> {
    let ours = schedule.betas()?;
    let t = schedule.timesteps;
    let named: Option<(&str, f64, f64)> = match schedule.beta_schedule {
        BetaSchedule::Linear { start, end } => Some(("linear", start, end)),
        BetaSchedule::ScaledLinear { start, end } => {
            // Our lucidrains-style scaling: the ends times 1000/T.
            let scale = 1000.0 / t as f64;
            Some(("linear", start * scale, end * scale))
        }
        BetaSchedule::Quadratic { start, end } => Some(("scaled_linear", start, end)),
        BetaSchedule::Sigmoid { start, end } => Some(("sigmoid", start, end)),
        // beta_start and beta_end are not used by this formula; diffusers' defaults are written.
        BetaSchedule::Cosine { s, .. } if s == SQUAREDCOS_S => {
            Some(("squaredcos_cap_v2", 1e-4, 0.02))
        }
        BetaSchedule::Cosine { .. } => None,
    };
    let mut config = serde_json::json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": EXPORT_DIFFUSERS_VERSION,
        "num_train_timesteps": t,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "trained_betas": null,
        "variance_type": match variance {
            DdpmVariance::FixedSmall => "fixed_small",
            DdpmVariance::FixedLarge => "fixed_large",
        },
        "clip_sample": clip_x0,
        "clip_sample_range": 1.0,
        "prediction_type": match objective {
            Objective::Eps => "epsilon",
            Objective::X0 => "sample",
            Objective::V => "v_prediction",
        },
        "thresholding": false,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": false,
    });
    let same = |c: &Value| {
        DiffusersScheduler::from_map(c.as_object().expect("a JSON object")).is_ok_and(|read| {
            read.betas.len() == ours.len()
                && read
                    .betas
                    .iter()
                    .zip(&ours)
                    .all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs() + 1e-15)
        })
    };
    if let Some((name, start, end)) = named {
        config["beta_schedule"] = name.into();
        config["beta_start"] = start.into();
        config["beta_end"] = end.into();
        if same(&config) {
            return Ok(config);
        }
        config["beta_start"] = 1e-4.into();
        config["beta_end"] = 0.02.into();
    }
    config["beta_schedule"] = "linear".into();
    config["trained_betas"] = Value::from(ours.clone());
    debug_assert!(same(&config));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> DiffusersScheduler {
        DiffusersScheduler::from_json(text).expect(text)
    }

    fn refused_field(text: &str) -> String {
        match DiffusersScheduler::from_json(text) {
            Err(ScheduleError::DiffusersConfig { field, .. }) => field,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn the_google_ddpm_config_is_the_papers_schedule() {
        // google/ddpm-cifar10-32's scheduler_config.json (diffusers 0.1.1).
        let s = read(
            r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
               "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": true,
               "num_train_timesteps": 1000, "trained_betas": null, "variance_type": "fixed_small"}"#,
        );
        assert_eq!(s.class, SchedulerClass::Ddpm);
        assert_eq!(s.named, Some(ScheduleConfig::default()));
        assert_eq!(
            s.betas,
            ScheduleConfig::default().betas().expect("default schedule")
        );
        assert_eq!(
            (s.objective, s.variance, s.clip_x0),
            (Objective::Eps, DdpmVariance::FixedSmall, true)
        );
        assert!(s.notes.is_empty());
    }

    #[test]
    fn settings_our_samplers_cannot_honour_are_refused_by_name() {
        for (text, field) in [
            (r#"{"thresholding": true}"#, "thresholding"),
            (
                r#"{"rescale_betas_zero_snr": true}"#,
                "rescale_betas_zero_snr",
            ),
            (r#"{"clip_sample_range": 2.0}"#, "clip_sample_range"),
            (r#"{"variance_type": "learned_range"}"#, "variance_type"),
            (r#"{"variance_type": "fixed_large_log"}"#, "variance_type"),
            (r#"{"prediction_type": "flow"}"#, "prediction_type"),
            (r#"{"beta_schedule": "exp"}"#, "beta_schedule"),
            (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
            (
                r#"{"trained_betas": [0.1, 1.5], "num_train_timesteps": 2}"#,
                "trained_betas",
            ),
            (r#"{"_class_name": "PNDMScheduler"}"#, "_class_name"),
            (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
            (r#"{"num_train_timesteps": -3}"#, "num_train_timesteps"),
            (r#"{"beta_start": "small"}"#, "beta_start"),
            (r#"{"set_alpha_to_one": false}"#, "set_alpha_to_one"),
            (r#"{"beta_start": 0.5, "beta_end": 2.0}"#, "beta_schedule"),
            ("[1, 2]", "(file)"),
            ("{", "(file)"),
        ] {
            assert_eq!(refused_field(text), field, "{text}");
        }
        // The message names the field and its value.
        let e = DiffusersScheduler::from_json(r#"{"variance_type": "learned"}"#).unwrap_err();
        assert!(e.to_string().contains("variance_type") && e.to_string().contains("\"learned\""));
        // clip_sample_range does not matter when clipping is off; unknown keys are noted.
        let s = read(r#"{"clip_sample": false, "clip_sample_range": 2.0, "tensor_format": "pt"}"#);
        assert!(!s.clip_x0);
        assert!(s.notes[0].contains("tensor_format"), "{:?}", s.notes);
    }

    #[test]
    fn prediction_types_and_classes() {
        let s = read(r#"{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}"#);
        assert_eq!((s.class, s.objective), (SchedulerClass::Ddim, Objective::V));
        assert_eq!(
            read(r#"{"prediction_type": "sample"}"#).objective,
            Objective::X0
        );
        assert_eq!(
            read(r#"{"variance_type": "fixed_large"}"#).variance,
            DdpmVariance::FixedLarge
        );
    }

    #[test]
    fn inference_timesteps_are_diffusers_set_timesteps() {
        let with = |spacing: &str, offset: usize| {
            read(&format!(
                r#"{{"timestep_spacing": "{spacing}", "steps_offset": {offset}}}"#
            ))
        };
        assert_eq!(
            with("leading", 0).inference_timesteps(10).expect("ts"),
            vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(
            with("leading", 1).inference_timesteps(4).expect("ts"),
            vec![751, 501, 251, 1]
        );
        assert_eq!(
            with("trailing", 0).inference_timesteps(10).expect("ts"),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        // numpy's linspace(0, 999, 4).round(): 0, 333, 666, 999.
        assert_eq!(
            with("linspace", 0).inference_timesteps(4).expect("ts"),
            vec![999, 666, 333, 0]
        );
        assert!(with("leading", 0).inference_timesteps(1001).is_err());
        // An offset that pushes a timestep past T - 1 is an error, not an index panic later.
        assert!(with("leading", 1).inference_timesteps(1000).is_err());
    }
    #[test]
    fn exported_configs_read_back_as_our_betas() {
        let cases: [(BetaSchedule, usize, &str); 8] = [
            (BetaSchedule::default(), 1000, "linear"),
            (BetaSchedule::default(), 200, "linear"),
            (
                BetaSchedule::ScaledLinear {
                    start: 1e-4,
                    end: 0.02,
                },
                200,
                "linear",
            ),
            (
                BetaSchedule::Quadratic {
                    start: 0.00085,
                    end: 0.012,
                },
                1000,
                "scaled_linear",
            ),
            (
                BetaSchedule::Sigmoid {
                    start: 1e-4,
                    end: 0.02,
                },
                300,
                "sigmoid",
            ),
            (
                BetaSchedule::Cosine {
                    s: SQUAREDCOS_S,
                    min_beta: f64::MIN_POSITIVE,
                    max_beta: SQUAREDCOS_MAX_BETA,
                },
                20,
                "squaredcos_cap_v2",
            ),
            // Our default cosine clips to [1e-4, 0.9999]: no diffusers formula, explicit betas.
            (
                BetaSchedule::from_name("cosine").expect("cosine"),
                1000,
                "trained_betas",
            ),
            (
                BetaSchedule::from_name("cosine").expect("cosine"),
                50,
                "trained_betas",
            ),
        ];
        for (beta_schedule, timesteps, want) in cases {
            let ours = ScheduleConfig {
                timesteps,
                beta_schedule,
            };
            let json = scheduler_config_json(&ours, Objective::V, DdpmVariance::FixedLarge, true)
                .expect("exported");
            let read = DiffusersScheduler::from_json(&json.to_string()).expect("read back");
            assert_eq!(read.beta_schedule, want, "{ours:?}");
            let betas = ours.betas().expect("betas");
            for (a, b) in read.betas.iter().zip(&betas) {
                assert!((a - b).abs() <= 1e-12 * b, "{ours:?}: {a} vs {b}");
            }
            assert_eq!(read.betas.len(), timesteps);
            assert_eq!(
                (read.objective, read.variance, read.clip_x0, read.class),
                (
                    Objective::V,
                    DdpmVariance::FixedLarge,
                    true,
                    SchedulerClass::Ddpm
                )
            );
            assert!(read.notes.is_empty(), "{:?}", read.notes);
        }
    }
}
