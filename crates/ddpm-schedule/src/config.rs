//! Beta schedules and the configuration that picks one.
//!
//! All schedules are computed in `f64`. Each returns `T` betas, one per timestep `t = 0..T`.

use serde::{Deserialize, Serialize};

use crate::error::{Result, ScheduleError};

/// Default first beta of the linear-type schedules (DDPM paper).
pub const DEFAULT_BETA_START: f64 = 1e-4;
/// Default last beta of the linear-type schedules (DDPM paper).
pub const DEFAULT_BETA_END: f64 = 0.02;
/// Default offset `s` of the cosine schedule (Nichol & Dhariwal 2021).
pub const DEFAULT_COSINE_S: f64 = 0.008;
/// Default lower clip of the cosine schedule's betas.
pub const DEFAULT_COSINE_MIN_BETA: f64 = 1e-4;
/// Default upper clip of the cosine schedule's betas.
pub const DEFAULT_COSINE_MAX_BETA: f64 = 0.9999;
/// Half-width of the sigmoid schedule's input range: betas follow `sigmoid(linspace(-6, 6, T))`.
pub const SIGMOID_RANGE: f64 = 6.0;

/// The number of timesteps at which the DDPM paper's linear betas were tuned.
const REFERENCE_TIMESTEPS: usize = 1000;
/// The most timesteps a schedule may have (DDPMs use 1,000 to 4,000): a config or checkpoint
/// claiming billions is an error, not a multi-gigabyte allocation.
pub const MAX_TIMESTEPS: usize = 1_000_000;
/// Above this `sqrt(alphas_cumprod[T-1])`, x_T keeps a visible amount of signal.
const SIGNAL_WARNING_LEVEL: f64 = 0.05;

fn default_start() -> f64 {
    DEFAULT_BETA_START
}
fn default_end() -> f64 {
    DEFAULT_BETA_END
}
fn default_cosine_s() -> f64 {
    DEFAULT_COSINE_S
}
fn default_cosine_min() -> f64 {
    DEFAULT_COSINE_MIN_BETA
}
fn default_cosine_max() -> f64 {
    DEFAULT_COSINE_MAX_BETA
}

/// How the betas `beta_0 .. beta_{T-1}` are laid out over the `T` timesteps.
///
/// In TOML the variant is named by `kind`, e.g. `{ kind = "cosine" }` or
/// `{ kind = "linear", start = 1e-4, end = 0.02 }`; omitted fields take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BetaSchedule {
    /// `linspace(start, end, T)` (DDPM paper: 1e-4 to 0.02 at T = 1000).
    Linear {
        /// First beta.
        #[serde(default = "default_start")]
        start: f64,
        /// Last beta.
        #[serde(default = "default_end")]
        end: f64,
    },
    /// `linspace(start * 1000/T, end * 1000/T, T)`: identical to `Linear` at T = 1000, and keeps
    /// `alphas_cumprod[T-1]` near zero for small T (as lucidrains' `linear_beta_schedule`).
    /// Not diffusers' `scaled_linear`, which is this crate's `Quadratic`.
    ScaledLinear {
        /// First beta before scaling by 1000/T.
        #[serde(default = "default_start")]
        start: f64,
        /// Last beta before scaling by 1000/T.
        #[serde(default = "default_end")]
        end: f64,
    },
    /// Nichol & Dhariwal's cosine schedule: `abar(t) = f(t)/f(0)` with
    /// `f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)`, `beta_t = 1 - abar(t+1)/abar(t)` clipped to
    /// `[min_beta, max_beta]`. Because of the clipping, the schedule's `alphas_cumprod` is the
    /// cumulative product of the clipped betas, which departs from `f(t+1)/f(0)` after the first
    /// clipped step (at T = 1000 the first betas are clipped up to 1e-4).
    Cosine {
        /// The small offset `s` that keeps the first betas from being too small.
        #[serde(default = "default_cosine_s")]
        s: f64,
        /// Lower clip of the betas.
        #[serde(default = "default_cosine_min")]
        min_beta: f64,
        /// Upper clip of the betas (avoids the singularity at t = T).
        #[serde(default = "default_cosine_max")]
        max_beta: f64,
    },
    /// `linspace(sqrt(start), sqrt(end), T)^2` (diffusers' `scaled_linear`).
    Quadratic {
        /// First beta.
        #[serde(default = "default_start")]
        start: f64,
        /// Last beta.
        #[serde(default = "default_end")]
        end: f64,
    },
    /// `start + (end - start) * sigmoid(linspace(-6, 6, T))`, the sigmoid betas of the
    /// GeoDiff / early denoising-diffusion code. The betas run from `start + 0.0025 (end - start)`
    /// to `end - 0.0025 (end - start)`, symmetric about `(start + end) / 2`.
    Sigmoid {
        /// Lower asymptote of the betas.
        #[serde(default = "default_start")]
        start: f64,
        /// Upper asymptote of the betas.
        #[serde(default = "default_end")]
        end: f64,
    },
}

impl Default for BetaSchedule {
    fn default() -> Self {
        Self::Linear {
            start: DEFAULT_BETA_START,
            end: DEFAULT_BETA_END,
        }
    }
}

impl BetaSchedule {
    /// The cosine schedule with its default parameters (`s = 0.008`, clip `[1e-4, 0.9999]`).
    pub fn cosine() -> Self {
        Self::Cosine {
            s: DEFAULT_COSINE_S,
            min_beta: DEFAULT_COSINE_MIN_BETA,
            max_beta: DEFAULT_COSINE_MAX_BETA,
        }
    }

    /// Every schedule's name as a command line writes it (`-` where a config file has `_`).
    pub const NAMES: [&'static str; 5] =
        ["linear", "scaled-linear", "cosine", "quadratic", "sigmoid"];

    /// The schedule named `name` (one of [`BetaSchedule::NAMES`], or its config spelling with
    /// `_`; any case) with its default parameters; `None` for a name that is not one.
    pub fn from_name(name: &str) -> Option<Self> {
        let (start, end) = (DEFAULT_BETA_START, DEFAULT_BETA_END);
        match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "linear" => Some(Self::Linear { start, end }),
            "scaled-linear" => Some(Self::ScaledLinear { start, end }),
            "cosine" => Some(Self::cosine()),
            "quadratic" => Some(Self::Quadratic { start, end }),
            "sigmoid" => Some(Self::Sigmoid { start, end }),
            _ => None,
        }
    }

    /// The schedule's name as written in a config file.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::ScaledLinear { .. } => "scaled_linear",
            Self::Cosine { .. } => "cosine",
            Self::Quadratic { .. } => "quadratic",
            Self::Sigmoid { .. } => "sigmoid",
        }
    }

    /// Checks the schedule's own parameters (not yet the betas they produce).
    fn validate_parameters(&self) -> Result<()> {
        match *self {
            Self::Linear { start, end }
            | Self::ScaledLinear { start, end }
            | Self::Quadratic { start, end }
            | Self::Sigmoid { start, end } => {
                check_finite("beta_schedule.start", start)?;
                check_finite("beta_schedule.end", end)?;
                if start <= 0.0 {
                    return Err(ScheduleError::InvalidParameter {
                        field: "beta_schedule.start",
                        value: start,
                        reason: "must be > 0",
                    });
                }
                if start >= end {
                    return Err(ScheduleError::StartNotBelowEnd {
                        schedule: self.name(),
                        start,
                        end,
                    });
                }
            }
            Self::Cosine {
                s,
                min_beta,
                max_beta,
            } => {
                check_finite("beta_schedule.s", s)?;
                check_finite("beta_schedule.min_beta", min_beta)?;
                check_finite("beta_schedule.max_beta", max_beta)?;
                if s < 0.0 {
                    return Err(ScheduleError::InvalidParameter {
                        field: "beta_schedule.s",
                        value: s,
                        reason: "must be >= 0",
                    });
                }
                if min_beta <= 0.0 {
                    return Err(ScheduleError::InvalidParameter {
                        field: "beta_schedule.min_beta",
                        value: min_beta,
                        reason: "must be > 0",
                    });
                }
                if max_beta >= 1.0 {
                    return Err(ScheduleError::InvalidParameter {
                        field: "beta_schedule.max_beta",
                        value: max_beta,
                        reason: "must be < 1",
                    });
                }
                if min_beta >= max_beta {
                    return Err(ScheduleError::StartNotBelowEnd {
                        schedule: "cosine (min_beta, max_beta)",
                        start: min_beta,
                        end: max_beta,
                    });
                }
            }
        }
        Ok(())
    }

    /// The `timesteps` betas of this schedule, unvalidated.
    fn raw_betas(&self, timesteps: usize) -> Vec<f64> {
        match *self {
            Self::Linear { start, end } => linspace(start, end, timesteps),
            Self::ScaledLinear { start, end } => {
                let scale = REFERENCE_TIMESTEPS as f64 / timesteps as f64;
                linspace(start * scale, end * scale, timesteps)
            }
            Self::Cosine {
                s,
                min_beta,
                max_beta,
            } => {
                let f0 = cosine_f(0.0, timesteps, s);
                (0..timesteps)
                    .map(|t| {
                        let abar_t = cosine_f(t as f64, timesteps, s) / f0;
                        let abar_next = cosine_f(t as f64 + 1.0, timesteps, s) / f0;
                        (1.0 - abar_next / abar_t).clamp(min_beta, max_beta)
                    })
                    .collect()
            }
            Self::Quadratic { start, end } => linspace(start.sqrt(), end.sqrt(), timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            Self::Sigmoid { start, end } => linspace(-SIGMOID_RANGE, SIGMOID_RANGE, timesteps)
                .into_iter()
                .map(|x| start + (end - start) * sigmoid(x))
                .collect(),
        }
    }
}

/// `f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)` of the cosine schedule.
pub(crate) fn cosine_f(t: f64, timesteps: usize, s: f64) -> f64 {
    let c = ((t / timesteps as f64 + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos();
    c * c
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `n` evenly spaced values from `start` to `end` inclusive (`[start]` when `n == 1`).
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        end
                    } else {
                        start + step * i as f64
                    }
                })
                .collect()
        }
    }
}

fn check_finite(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(ScheduleError::InvalidParameter {
            field,
            value,
            reason: "must be a finite number",
        })
    }
}

/// Checks that every beta lies strictly inside (0, 1).
pub(crate) fn check_betas(betas: &[f64]) -> Result<()> {
    if betas.is_empty() {
        return Err(ScheduleError::ZeroTimesteps);
    }
    let mut log_alpha_bar = 0.0;
    for (timestep, &value) in betas.iter().enumerate() {
        if value.is_nan() || value <= 0.0 || value >= 1.0 {
            return Err(ScheduleError::BetaOutOfRange { timestep, value });
        }
        log_alpha_bar += (-value).ln_1p();
        if log_alpha_bar < MIN_ALPHA_BAR.ln() {
            return Err(ScheduleError::SignalVanishes {
                timestep,
                timesteps: betas.len(),
            });
        }
    }
    Ok(())
}

/// The smallest `alphas_cumprod` a schedule may reach. Below it the buffers derived from it
/// (`1 / sqrt(alphas_cumprod)` and its kin, kept in `f32` on devices) overflow to infinity, and
/// in `f64` the product itself underflows to 0 soon after: an unscaled linear schedule over a
/// million steps gave infinities from step 262,000 on and "NaN bits/dim". DDPM's reaches 4e-5.
pub const MIN_ALPHA_BAR: f64 = 1e-60;

/// The noise schedule: how many timesteps and how the betas are laid out.
///
/// Reads from TOML as
/// ```toml
/// timesteps = 1000
/// [beta_schedule]
/// kind = "linear"
/// start = 0.0001
/// end = 0.02
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The number of diffusion steps `T`.
    pub timesteps: usize,
    /// The beta schedule.
    pub beta_schedule: BetaSchedule,
}

impl Default for ScheduleConfig {
    /// The DDPM paper's schedule: T = 1000, linear betas from 1e-4 to 0.02.
    fn default() -> Self {
        Self {
            timesteps: REFERENCE_TIMESTEPS,
            beta_schedule: BetaSchedule::default(),
        }
    }
}

impl ScheduleConfig {
    /// `timesteps` steps of the unscaled linear schedule from 1e-4 to 0.02.
    pub fn linear(timesteps: usize) -> Self {
        Self {
            timesteps,
            beta_schedule: BetaSchedule::default(),
        }
    }

    /// `timesteps` steps of the linear schedule with both ends scaled by 1000/T.
    pub fn scaled_linear(timesteps: usize) -> Self {
        Self {
            timesteps,
            beta_schedule: BetaSchedule::ScaledLinear {
                start: DEFAULT_BETA_START,
                end: DEFAULT_BETA_END,
            },
        }
    }

    /// `timesteps` steps of the cosine schedule with its default parameters.
    pub fn cosine(timesteps: usize) -> Self {
        Self {
            timesteps,
            beta_schedule: BetaSchedule::cosine(),
        }
    }

    /// Checks the configuration, including that every beta it produces is inside (0, 1).
    pub fn validate(&self) -> Result<()> {
        self.betas().map(|_| ())
    }

    /// The validated betas `beta_0 .. beta_{T-1}` in `f64`.
    pub fn betas(&self) -> Result<Vec<f64>> {
        if self.timesteps == 0 {
            return Err(ScheduleError::ZeroTimesteps);
        }
        if self.timesteps > MAX_TIMESTEPS {
            return Err(ScheduleError::TooManyTimesteps {
                got: self.timesteps,
                max: MAX_TIMESTEPS,
            });
        }
        self.beta_schedule.validate_parameters()?;
        let betas = self.beta_schedule.raw_betas(self.timesteps);
        check_betas(&betas)?;
        Ok(betas)
    }

    /// Human-readable warnings about a valid but questionable configuration; empty when there is
    /// nothing to say (or when the configuration is invalid: see [`ScheduleConfig::validate`]).
    ///
    /// The unscaled linear schedule with T < 1000 is flagged because `sqrt(alphas_cumprod[T-1])`
    /// stays far from 0 (0.219 at T = 300), so x_T is not pure noise and sampling from N(0, I)
    /// starts from a mismatched distribution. Any other schedule that leaves more than 5% of the
    /// signal at t = T-1 is flagged too.
    pub fn warnings(&self) -> Vec<String> {
        let Ok(betas) = self.betas() else {
            return Vec::new();
        };
        let abar_last: f64 = betas.iter().map(|b| 1.0 - b).product();
        let signal = abar_last.sqrt();
        let mut out = Vec::new();
        if matches!(self.beta_schedule, BetaSchedule::Linear { .. })
            && self.timesteps < REFERENCE_TIMESTEPS
        {
            // The scaled schedule is the advice only where its last beta stays below 1.
            let instead = if ScheduleConfig::scaled_linear(self.timesteps)
                .validate()
                .is_ok()
            {
                "use kind = \"scaled_linear\" (ends scaled by 1000/T) or more timesteps"
            } else {
                "use kind = \"cosine\" (the scaled linear schedule reaches beta = 1 at so few \
                 timesteps) or more timesteps"
            };
            out.push(format!(
                "the unscaled linear beta schedule with timesteps = {} < 1000 leaves \
                 sqrt(alphas_cumprod[T-1]) = {signal:.3}, so x_T still carries signal and sampling \
                 from pure noise is mismatched; {instead}",
                self.timesteps
            ));
        } else if signal > SIGNAL_WARNING_LEVEL {
            out.push(format!(
                "the {} beta schedule with timesteps = {} leaves sqrt(alphas_cumprod[T-1]) = \
                 {signal:.3} > {SIGNAL_WARNING_LEVEL}, so x_T still carries signal and sampling \
                 from pure noise is mismatched",
                self.beta_schedule.name(),
                self.timesteps
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every named schedule at 1000 steps keeps alphas_cumprod above the bound, and at 100,000
    /// steps is accepted exactly when its product does; the unscaled linear one over a million
    /// steps (infinities from step 262,000 on) is refused with the timestep where it falls below.
    #[test]
    fn schedules_whose_signal_vanishes_are_refused() {
        for name in BetaSchedule::NAMES {
            for t in [1000, 100_000] {
                let config = ScheduleConfig {
                    timesteps: t,
                    beta_schedule: BetaSchedule::from_name(name).expect("a named schedule"),
                };
                let log_alpha_bar: f64 = config
                    .beta_schedule
                    .raw_betas(t)
                    .iter()
                    .map(|b| (-b).ln_1p())
                    .sum();
                let fits = log_alpha_bar >= MIN_ALPHA_BAR.ln();
                assert!(t > 1000 || fits, "{name} at {t}: {log_alpha_bar}");
                assert_eq!(config.validate().is_ok(), fits, "{name} at {t}");
            }
        }
        let e = ScheduleConfig::linear(1_000_000)
            .validate()
            .expect_err("vanishes");
        match e {
            ScheduleError::SignalVanishes {
                timestep,
                timesteps,
            } => {
                assert_eq!(timesteps, 1_000_000);
                assert!((100_000..262_000).contains(&timestep), "{timestep}");
            }
            other => panic!("{other}"),
        }
    }

    fn betas(timesteps: usize, beta_schedule: BetaSchedule) -> Vec<f64> {
        ScheduleConfig {
            timesteps,
            beta_schedule,
        }
        .betas()
        .expect("valid config")
    }

    fn abar_last(betas: &[f64]) -> f64 {
        betas.iter().map(|b| 1.0 - b).product()
    }

    #[test]
    fn every_name_gives_the_schedule_a_config_file_gives() {
        for name in BetaSchedule::NAMES {
            let by_name = BetaSchedule::from_name(name).expect(name);
            // The config spelling, through serde with every parameter left to its default.
            let text = format!("kind = \"{}\"", name.replace('-', "_"));
            let from_toml: BetaSchedule = toml::from_str(&text).expect(&text);
            assert_eq!(by_name, from_toml, "{name}");
            assert_eq!(by_name.name(), name.replace('-', "_"));
            assert_eq!(BetaSchedule::from_name(&name.to_uppercase()), Some(by_name));
        }
        assert_eq!(
            BetaSchedule::from_name("scaled_linear"),
            BetaSchedule::from_name("scaled-linear")
        );
        assert_eq!(BetaSchedule::from_name("zigzag"), None);
    }

    #[test]
    fn linear_hits_its_endpoints_and_increases_evenly() {
        let b = betas(1000, BetaSchedule::default());
        assert_eq!(b.len(), 1000);
        assert_eq!(b[0], 1e-4);
        assert_eq!(b[999], 0.02);
        let step = (0.02 - 1e-4) / 999.0;
        for w in b.windows(2) {
            assert!(w[1] > w[0]);
            // Consecutive differences are the linspace step up to a few ulps of 0.02.
            assert!((w[1] - w[0] - step).abs() < 8.0 * f64::EPSILON * 0.02);
        }
    }

    #[test]
    fn scaled_linear_equals_linear_at_1000_steps() {
        let scaled = betas(1000, ScheduleConfig::scaled_linear(1000).beta_schedule);
        assert_eq!(scaled, betas(1000, BetaSchedule::default()));
    }

    #[test]
    fn scaled_linear_removes_the_signal_at_300_steps_where_linear_does_not() {
        let scaled = betas(300, ScheduleConfig::scaled_linear(300).beta_schedule);
        // Both ends scaled by 1000/300.
        assert!((scaled[0] - 1e-4 * 1000.0 / 300.0).abs() < 1e-18);
        assert!((scaled[299] - 0.02 * 1000.0 / 300.0).abs() < 1e-15);
        let scaled_signal = abar_last(&scaled).sqrt();
        assert!(scaled_signal < 0.01, "sqrt(abar_T) = {scaled_signal}");
        // The unscaled schedule keeps about a fifth of the signal (0.219 per CANDLE.md).
        let linear_signal = abar_last(&betas(300, BetaSchedule::default())).sqrt();
        assert!((linear_signal - 0.219).abs() < 5e-4, "{linear_signal}");
    }

    #[test]
    fn cosine_alphas_cumprod_follows_the_cos2_formula_where_unclipped() {
        // At T = 300 only the last beta is clipped (to max_beta), so abar_t = f(t+1)/f(0) for
        // every t < T-1; the cumulative product of 300 factors is exact to ~300 ulps.
        let t_max = 300;
        let b = betas(t_max, BetaSchedule::cosine());
        let f0 = cosine_f(0.0, t_max, DEFAULT_COSINE_S);
        let mut abar = 1.0;
        for (t, beta) in b.iter().enumerate().take(t_max - 1) {
            abar *= 1.0 - beta;
            let expected = cosine_f(t as f64 + 1.0, t_max, DEFAULT_COSINE_S) / f0;
            assert!(
                (abar - expected).abs() <= 1e3 * f64::EPSILON * expected,
                "t = {t}: {abar} vs {expected}"
            );
        }
        assert_eq!(b[t_max - 1], DEFAULT_COSINE_MAX_BETA);
    }

    #[test]
    fn cosine_betas_are_clipped_and_follow_the_ratio_elsewhere() {
        // At T = 1000 the first betas fall below 1e-4 and are clipped up; elsewhere
        // 1 - beta_t = f(t+1)/f(t).
        let t_max = 1000;
        let b = betas(t_max, BetaSchedule::cosine());
        let mut clipped_low = 0;
        for (t, &beta) in b.iter().enumerate() {
            let s = DEFAULT_COSINE_S;
            let raw = 1.0 - cosine_f(t as f64 + 1.0, t_max, s) / cosine_f(t as f64, t_max, s);
            assert!((DEFAULT_COSINE_MIN_BETA..=DEFAULT_COSINE_MAX_BETA).contains(&beta));
            if raw < DEFAULT_COSINE_MIN_BETA {
                clipped_low += 1;
                assert_eq!(beta, DEFAULT_COSINE_MIN_BETA);
            } else if raw > DEFAULT_COSINE_MAX_BETA {
                assert_eq!(beta, DEFAULT_COSINE_MAX_BETA);
            } else {
                assert!((beta - raw).abs() < 1e-14, "t = {t}: {beta} vs {raw}");
            }
        }
        assert!(clipped_low > 0, "expected clipped first betas at T = 1000");
    }

    #[test]
    fn quadratic_is_a_square_of_evenly_spaced_roots() {
        let b = betas(
            500,
            BetaSchedule::Quadratic {
                start: 1e-4,
                end: 0.02,
            },
        );
        assert!((b[0] - 1e-4).abs() < 1e-18);
        assert!((b[499] - 0.02).abs() < 1e-16);
        let roots: Vec<f64> = b.iter().map(|x| x.sqrt()).collect();
        let step = (0.02f64.sqrt() - 1e-4f64.sqrt()) / 499.0;
        for w in roots.windows(2) {
            assert!((w[1] - w[0] - step).abs() < 1e-15);
        }
    }

    #[test]
    fn sigmoid_is_symmetric_between_its_asymptotes() {
        let (start, end) = (1e-4, 0.02);
        let b = betas(200, BetaSchedule::Sigmoid { start, end });
        // sigmoid(-x) = 1 - sigmoid(x), so beta_i + beta_{T-1-i} = start + end.
        for i in 0..200 {
            assert!((b[i] + b[199 - i] - (start + end)).abs() < 1e-16);
        }
        let sig_lo = 1.0 / (1.0 + 6f64.exp());
        assert!((b[0] - (start + (end - start) * sig_lo)).abs() < 1e-18);
        assert!(b.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn bad_configs_are_rejected_with_typed_errors() {
        let cfg = |timesteps, beta_schedule| ScheduleConfig {
            timesteps,
            beta_schedule,
        };
        assert!(matches!(
            ScheduleConfig::linear(0).validate(),
            Err(ScheduleError::ZeroTimesteps)
        ));
        let swapped = BetaSchedule::Linear {
            start: 0.02,
            end: 1e-4,
        };
        assert!(matches!(
            cfg(100, swapped).validate(),
            Err(ScheduleError::StartNotBelowEnd {
                schedule: "linear",
                ..
            })
        ));
        let negative = BetaSchedule::Quadratic {
            start: -1e-4,
            end: 0.02,
        };
        assert!(matches!(
            cfg(100, negative).validate(),
            Err(ScheduleError::InvalidParameter {
                field: "beta_schedule.start",
                ..
            })
        ));
        let nan = BetaSchedule::Sigmoid {
            start: 1e-4,
            end: f64::NAN,
        };
        assert!(matches!(
            cfg(100, nan).validate(),
            Err(ScheduleError::InvalidParameter {
                field: "beta_schedule.end",
                ..
            })
        ));
        // Scaled linear at T = 10 would need beta_T = 0.02 * 100 = 2.
        assert!(matches!(
            ScheduleConfig::scaled_linear(10).validate(),
            Err(ScheduleError::BetaOutOfRange { timestep, value }) if value >= 1.0 && timestep > 0
        ));
        let over_one = BetaSchedule::Linear {
            start: 0.5,
            end: 1.5,
        };
        assert!(matches!(
            cfg(10, over_one).validate(),
            Err(ScheduleError::BetaOutOfRange { .. })
        ));
        for (s, min_beta, max_beta, field) in [
            (-0.1, 1e-4, 0.9999, "beta_schedule.s"),
            (0.008, 0.0, 0.9999, "beta_schedule.min_beta"),
            (0.008, 1e-4, 1.0, "beta_schedule.max_beta"),
        ] {
            let c = BetaSchedule::Cosine {
                s,
                min_beta,
                max_beta,
            };
            match cfg(100, c).validate() {
                Err(ScheduleError::InvalidParameter { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidParameter({field}), got {other:?}"),
            }
        }
        let inverted = BetaSchedule::Cosine {
            s: 0.008,
            min_beta: 0.5,
            max_beta: 0.1,
        };
        assert!(matches!(
            cfg(100, inverted).validate(),
            Err(ScheduleError::StartNotBelowEnd { .. })
        ));
        // The error message names the field and the reason.
        let msg = cfg(100, swapped).validate().unwrap_err().to_string();
        assert!(msg.contains("start") && msg.contains("end"), "{msg}");
    }

    #[test]
    fn schedule_config_round_trips_through_toml() {
        let configs = [
            ScheduleConfig::default(),
            ScheduleConfig::scaled_linear(300),
            ScheduleConfig::cosine(4000),
            ScheduleConfig {
                timesteps: 50,
                beta_schedule: BetaSchedule::Quadratic {
                    start: 1e-4,
                    end: 0.03,
                },
            },
            ScheduleConfig {
                timesteps: 50,
                beta_schedule: BetaSchedule::Sigmoid {
                    start: 1e-5,
                    end: 0.01,
                },
            },
        ];
        for cfg in configs {
            let text = toml::to_string(&cfg).expect("serialize");
            let back: ScheduleConfig = toml::from_str(&text).expect("deserialize");
            assert_eq!(back, cfg, "{text}");
        }
    }

    #[test]
    fn schedule_config_reads_hand_written_toml_with_defaults() {
        let cfg: ScheduleConfig = toml::from_str(
            "timesteps = 1000\n[beta_schedule]\nkind = \"linear\"\nstart = 0.0001\nend = 0.02\n",
        )
        .expect("parse");
        assert_eq!(cfg, ScheduleConfig::default());
        let cfg: ScheduleConfig =
            toml::from_str("timesteps = 250\nbeta_schedule = { kind = \"cosine\" }\n")
                .expect("parse");
        assert_eq!(cfg, ScheduleConfig::cosine(250));
        let bad = toml::from_str::<ScheduleConfig>(
            "timesteps = 10\nbeta_schedule = { kind = \"exponential\" }\n",
        );
        assert!(bad.is_err());
    }

    #[test]
    fn unscaled_linear_below_1000_steps_warns() {
        let w = ScheduleConfig::linear(300).warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("0.219") && w[0].contains("scaled_linear"),
            "{}",
            w[0]
        );
        assert!(ScheduleConfig::linear(1000).warnings().is_empty());
        // At T = 20 the scaled schedule's last beta is 1 (invalid): the advice is another.
        assert!(ScheduleConfig::scaled_linear(20).validate().is_err());
        let w = ScheduleConfig::linear(20).warnings();
        assert!(
            w[0].contains("cosine") && !w[0].contains("kind = \"scaled_linear\""),
            "{}",
            w[0]
        );
        assert!(ScheduleConfig::scaled_linear(300).warnings().is_empty());
        assert!(ScheduleConfig::cosine(300).warnings().is_empty());
        // A schedule that barely noises warns too, whatever its kind.
        let weak = ScheduleConfig {
            timesteps: 20,
            beta_schedule: BetaSchedule::Quadratic {
                start: 1e-4,
                end: 0.02,
            },
        };
        assert_eq!(weak.warnings().len(), 1);
    }

    #[test]
    fn single_step_linspace_is_the_start() {
        assert_eq!(linspace(0.3, 0.7, 1), vec![0.3]);
        assert_eq!(betas(1, BetaSchedule::default()), vec![1e-4]);
    }
}
