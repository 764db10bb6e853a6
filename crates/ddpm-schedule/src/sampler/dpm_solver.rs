//! DPM-Solver++ (2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", Algorithm 2): a deterministic multistep solver of the
//! diffusion ODE in its data-prediction form, as diffusers' `DPMSolverMultistepScheduler` runs it
//! by default (`algorithm_type = "dpmsolver++"`, `solver_order = 2`, `solver_type = "midpoint"`,
//! `lower_order_final = true`, `final_sigmas_type = "zero"`, no thresholding).
//!
//! With `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)` and the half log-SNR
//! `lambda_t = ln(alpha_t / sigma_t)`, a step from `s0 = timesteps()[i]` to the next timestep `t`
//! (or to `sigma = 0`, i.e. x_0, after the last) with `h = lambda_t - lambda_s0` is
//!
//! ```text
//! first order:  x_t = (sigma_t / sigma_s0) x_s0 + alpha_t (1 - e^-h) x0_hat(s0)
//! second order: x_t = (sigma_t / sigma_s0) x_s0 + alpha_t (1 - e^-h) D,
//!               D = (1 + 1 / (2 r)) x0_hat(s0) - 1 / (2 r) x0_hat(s1),  r = (lambda_s0 - lambda_s1) / h
//! ```
//!
//! where `s1 = timesteps()[i - 1]` and `x0_hat` is the model's output turned into a prediction of
//! x_0 (whatever the model's objective), clipped to [-1, 1] when asked. The first step has no
//! earlier prediction and is first order; so is the last, which lands on x0_hat itself (sigma 0);
//! every other step is second order. The first-order step is exactly DDIM with eta = 0 between the
//! same timesteps.
//!
//! Step i > 0 uses the prediction of step i - 1: drive it with
//! [`Sampler::step_with_history`] and one [`StepHistory`] per run, or in place with
//! [`AffineStep::apply_multistep`] and one x_0 buffer per run.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::affine::{x0_coefficients, AffineStep};
use super::{check_index, Sampler, StepHistory};
use crate::error::{Result, ScheduleError};
use crate::forward::check_same_shape;
use crate::objective::Objective;
use crate::schedule::{timestep_tensor, Schedule};

/// How the solver's steps are spread over the training timesteps, as diffusers'
/// `timestep_spacing` of `DPMSolverMultistepScheduler` (with `steps_offset = 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpmSpacing {
    /// `round(linspace(0, T - 1, S + 1))` descending, without its final 0 (diffusers' default for
    /// this scheduler): starts at T - 1, never visits 0. Needs `S < T` (or `S = 1`).
    #[default]
    Linspace,
    /// `k * (T // (S + 1))` for `k = S, ..., 1`: never visits T - 1 unless `S + 1 = T`. Needs
    /// `S < T`.
    Leading,
    /// `round(T - k T / S) - 1` for `k = 0, ..., S - 1`: starts at T - 1, ends at `T / S - 1`.
    Trailing,
}

impl DpmSpacing {
    /// The names a config or flag may use.
    pub const NAMES: &'static str = "linspace, leading, trailing";
}

/// The steps of DPM-Solver++ when none are asked for: 20, or fewer for a short schedule.
pub const DEFAULT_DPM_STEPS: usize = 20;

/// The `steps` timesteps, descending, that DPM-Solver++ visits on a `t_max`-step schedule with
/// `spacing` (as diffusers computes them: numpy's `linspace`, half-to-even rounding).
///
/// Errors unless `1 <= steps <= t_max`, and when the spacing would repeat a timestep (linspace
/// with `steps = t_max > 1`, leading with `t_max / (steps + 1) < 1`), which the solver cannot
/// step between.
pub fn dpm_timesteps(t_max: usize, steps: usize, spacing: DpmSpacing) -> Result<Vec<usize>> {
    if steps == 0 || steps > t_max {
        return Err(ScheduleError::InvalidSteps {
            steps,
            timesteps: t_max,
        });
    }
    let ts: Vec<usize> = match spacing {
        DpmSpacing::Linspace => {
            // numpy: start + arange(n) * ((stop - start) / (n - 1)), the last point set to stop.
            let delta = (t_max - 1) as f64 / steps as f64;
            (1..=steps)
                .rev()
                .map(|k| {
                    let v = if k == steps {
                        (t_max - 1) as f64
                    } else {
                        k as f64 * delta
                    };
                    v.round_ties_even() as usize
                })
                .collect()
        }
        DpmSpacing::Leading => {
            let ratio = t_max / (steps + 1);
            (1..=steps).rev().map(|k| k * ratio).collect()
        }
        DpmSpacing::Trailing => {
            // numpy: arange(T, 0, -T / S) is T - k (T / S) for k = 0..S, rounded, minus 1.
            let ratio = t_max as f64 / steps as f64;
            (0..steps)
                .map(|k| ((t_max as f64 - k as f64 * ratio).round_ties_even() as usize).max(1) - 1)
                .collect()
        }
    };
    if ts.windows(2).any(|w| w[1] >= w[0]) {
        return Err(ScheduleError::InvalidParameter {
            field: "steps",
            value: steps as f64,
            reason: "this timestep spacing repeats timesteps at so many steps for the schedule's \
                     T: use fewer steps (or `trailing` spacing)",
        });
    }
    Ok(ts)
}

/// How to build a [`DpmSolverSampler`]: named fields, so that arguments cannot be swapped.
///
/// ```
/// use ddpm_schedule::sampler::{DpmSolverOptions, DpmSpacing};
/// let opts = DpmSolverOptions { steps: Some(10), ..DpmSolverOptions::default() };
/// assert_eq!((opts.spacing, opts.clip_x0), (DpmSpacing::Linspace, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpmSolverOptions {
    /// The number of steps (model evaluations), in `1..=T`; [`DEFAULT_DPM_STEPS`] (at most
    /// T - 1) when `None`.
    pub steps: Option<usize>,
    /// How the steps are spread over the training timesteps.
    pub spacing: DpmSpacing,
    /// Clip the predicted x_0 to [-1, 1] before it is used (and remembered for the next step).
    /// Off by default, as diffusers' `thresholding = false`.
    pub clip_x0: bool,
}

/// The scalars of one solver step, independent of the model's objective.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DpmCoefficients {
    /// `sigma_t / sigma_s0`.
    from_x: f64,
    /// The coefficient of this step's predicted x_0.
    from_x0: f64,
    /// The coefficient of the previous step's predicted x_0 (0 on first-order steps).
    from_last_x0: f64,
}

/// DPM-Solver++ (2M) over a [`Schedule`]; see the module documentation.
#[derive(Debug, Clone)]
pub struct DpmSolverSampler {
    schedule: Schedule,
    timesteps: Vec<usize>,
    coefficients: Vec<DpmCoefficients>,
    clip_x0: bool,
}

impl DpmSolverSampler {
    /// A sampler over `schedule` as `options` say (errors unless `1 <= steps <= T` and the
    /// spacing gives distinct timesteps, see [`dpm_timesteps`]).
    pub fn new(schedule: &Schedule, options: DpmSolverOptions) -> Result<Self> {
        let t_max = schedule.timesteps();
        let steps = options
            .steps
            .unwrap_or(DEFAULT_DPM_STEPS.min(t_max.saturating_sub(1)).max(1));
        let timesteps = dpm_timesteps(t_max, steps, options.spacing)?;
        let abar = schedule.alphas_cumprod().values();
        // (alpha, sigma, lambda) of a timestep; `None` is the final sigma = 0.
        let point = |t: Option<usize>| -> (f64, f64, f64) {
            match t {
                Some(t) => {
                    let (a, s) = (abar[t].sqrt(), (1.0 - abar[t]).sqrt());
                    (a, s, a.ln() - s.ln())
                }
                None => (1.0, 0.0, f64::INFINITY),
            }
        };
        let n = timesteps.len();
        let coefficients = (0..n)
            .map(|i| {
                let (alpha_s0, sigma_s0, lambda_s0) = point(Some(timesteps[i]));
                let (alpha_t, sigma_t, lambda_t) = point(timesteps.get(i + 1).copied());
                // alpha_t (1 - e^-h) with e^-h = (sigma_t / alpha_t) / (sigma_s0 / alpha_s0):
                // finite at sigma_t = 0, where it is alpha_t = 1.
                let phi = alpha_t - sigma_t * alpha_s0 / sigma_s0;
                let from_x = sigma_t / sigma_s0;
                // The first step has no earlier prediction; the last goes to sigma = 0
                // (diffusers' lower_order_final with final_sigmas_type = "zero").
                if i == 0 || i + 1 == n {
                    return DpmCoefficients {
                        from_x,
                        from_x0: phi,
                        from_last_x0: 0.0,
                    };
                }
                let (_, _, lambda_s1) = point(Some(timesteps[i - 1]));
                let r = (lambda_s0 - lambda_s1) / (lambda_t - lambda_s0);
                DpmCoefficients {
                    from_x,
                    from_x0: phi * (1.0 + 0.5 / r),
                    from_last_x0: -phi * 0.5 / r,
                }
            })
            .collect();
        Ok(Self {
            schedule: schedule.clone(),
            timesteps,
            coefficients,
            clip_x0: options.clip_x0,
        })
    }

    /// The original timesteps to feed the model, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Whether step `i` is second order: it uses the predicted x_0 of step `i - 1`.
    pub fn is_second_order(&self, i: usize) -> bool {
        self.coefficients
            .get(i)
            .is_some_and(|c| c.from_last_x0 != 0.0)
    }

    fn coefficients(&self, i: usize) -> Result<DpmCoefficients> {
        check_index(i, self.timesteps.len())?;
        Ok(self.coefficients[i])
    }

    /// One solver step from `x_t` at `timesteps()[i]`, see [`Sampler::step_with_history`]:
    /// `history` must hold the predicted x_0 of step `i - 1` when step `i` is second order
    /// ([`ScheduleError::MissingHistory`] otherwise), and holds step `i`'s on return.
    pub fn step_with_history(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        history: &mut StepHistory,
    ) -> Result<Tensor> {
        // model_output, x_t: (b, ...)
        let c = self.coefficients(i)?;
        let last = if c.from_last_x0 != 0.0 {
            let last = history
                .x0_of(i - 1)
                .ok_or(ScheduleError::MissingHistory {
                    index: i,
                    timestep: self.timesteps[i],
                })?
                .clone();
            check_same_shape("the previous step's x_0", x_t, &last)?;
            Some(last)
        } else {
            None
        };
        let t = timestep_tensor(self.timesteps[i], x_t.dim(0)?, self.schedule.device())?;
        let mut x0 = self.schedule.predict_x0(objective, model_output, x_t, &t)?;
        if self.clip_x0 {
            x0 = x0.clamp(-1.0, 1.0)?;
        }
        let mut x_prev = ((x_t * c.from_x)? + (&x0 * c.from_x0)?)?;
        if let Some(last) = last {
            x_prev = (x_prev + (last * c.from_last_x0)?)?;
        }
        history.record(i, x0);
        Ok(x_prev)
    }

    /// Step `i` as scalar coefficients, see [`Sampler::affine_step`]; a second-order step has a
    /// nonzero [`AffineStep::prev_from_last_x0`] and is applied with
    /// [`AffineStep::apply_multistep`].
    pub fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        let c = self.coefficients(i)?;
        let (x0_from_x, x0_from_out) =
            x0_coefficients(&self.schedule, objective, self.timesteps[i]);
        Ok(AffineStep {
            x0_from_x,
            x0_from_out,
            clip_x0: self.clip_x0,
            prev_from_x0: c.from_x0,
            prev_from_x: c.from_x,
            prev_from_last_x0: c.from_last_x0,
            sigma: None,
        })
    }
}

impl Sampler for DpmSolverSampler {
    fn timesteps(&self) -> &[usize] {
        DpmSolverSampler::timesteps(self)
    }

    /// Never: the solver is deterministic.
    fn needs_noise(&self, _i: usize) -> bool {
        false
    }

    /// The step without a history: fine for first-order steps (the first and the last), an
    /// error ([`ScheduleError::MissingHistory`]) for second-order ones, which need
    /// [`Sampler::step_with_history`].
    fn step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut history = StepHistory::new();
        self.step_with_history(model_output, x_t, i, objective, &mut history)
    }

    fn is_multistep(&self) -> bool {
        true
    }

    fn step_with_history(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        i: usize,
        objective: Objective,
        _noise: Option<&Tensor>,
        history: &mut StepHistory,
    ) -> Result<Tensor> {
        DpmSolverSampler::step_with_history(self, model_output, x_t, i, objective, history)
    }

    fn affine_step(&self, i: usize, objective: Objective) -> Result<AffineStep> {
        DpmSolverSampler::affine_step(self, i, objective)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::sampler::{DdimOptions, DdimSampler};
    use crate::test_util::{assert_close, normal_tensor, schedule_f64, ts, values};
    use crate::ScheduleConfig;

    fn options(steps: usize, spacing: DpmSpacing, clip_x0: bool) -> DpmSolverOptions {
        DpmSolverOptions {
            steps: Some(steps),
            spacing,
            clip_x0,
        }
    }

    #[test]
    fn timesteps_are_diffusers_spacings() {
        // Values printed by numpy with diffusers' formulas (DPMSolverMultistepScheduler
        // .set_timesteps, diffusers 0.42.1).
        let lin = dpm_timesteps(1000, 10, DpmSpacing::Linspace).unwrap();
        assert_eq!(lin, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
        let lead = dpm_timesteps(1000, 10, DpmSpacing::Leading).unwrap();
        assert_eq!(lead, [900, 810, 720, 630, 540, 450, 360, 270, 180, 90]);
        let trail = dpm_timesteps(1000, 10, DpmSpacing::Trailing).unwrap();
        assert_eq!(trail, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
        assert_eq!(
            dpm_timesteps(1000, 7, DpmSpacing::Linspace).unwrap(),
            [999, 856, 714, 571, 428, 285, 143]
        );
        assert_eq!(
            dpm_timesteps(1000, 7, DpmSpacing::Trailing).unwrap(),
            [999, 856, 713, 570, 428, 285, 142]
        );
        assert_eq!(
            dpm_timesteps(10, 9, DpmSpacing::Trailing).unwrap(),
            [9, 8, 7, 6, 5, 3, 2, 1, 0]
        );
        assert_eq!(dpm_timesteps(1000, 1, DpmSpacing::Linspace).unwrap(), [999]);
        assert_eq!(
            dpm_timesteps(1000, 999, DpmSpacing::Linspace).unwrap()[..3],
            [999, 998, 997]
        );
        for spacing in [
            DpmSpacing::Linspace,
            DpmSpacing::Leading,
            DpmSpacing::Trailing,
        ] {
            for steps in [1, 2, 10, 20, 50, 250] {
                let ts = dpm_timesteps(1000, steps, spacing).unwrap();
                assert_eq!(ts.len(), steps);
                assert!(ts.windows(2).all(|w| w[0] > w[1]), "{spacing:?} {steps}");
                assert!(ts[0] < 1000);
            }
        }
    }

    #[test]
    fn bad_step_counts_are_errors() {
        let s = schedule_f64(&ScheduleConfig::linear(100));
        for steps in [0, 101] {
            assert!(matches!(
                DpmSolverSampler::new(&s, options(steps, DpmSpacing::Linspace, false)),
                Err(ScheduleError::InvalidSteps { .. })
            ));
        }
        // Spacings that would repeat a timestep.
        for spacing in [DpmSpacing::Linspace, DpmSpacing::Leading] {
            assert!(matches!(
                DpmSolverSampler::new(&s, options(100, spacing, false)),
                Err(ScheduleError::InvalidParameter { field: "steps", .. })
            ));
        }
        assert!(DpmSolverSampler::new(&s, options(100, DpmSpacing::Trailing, false)).is_ok());
        // The default: 20 steps, or T - 1 for a short schedule.
        let d = DpmSolverSampler::new(&s, DpmSolverOptions::default()).unwrap();
        assert_eq!(d.timesteps().len(), DEFAULT_DPM_STEPS);
        let short = schedule_f64(&ScheduleConfig::linear(8));
        let d = DpmSolverSampler::new(&short, DpmSolverOptions::default()).unwrap();
        assert_eq!(d.timesteps(), [7, 6, 5, 4, 3, 2, 1]);
        let x = normal_tensor(1, &[1, 2]);
        let sampler = DpmSolverSampler::new(&s, options(5, DpmSpacing::Linspace, false)).unwrap();
        assert!(matches!(
            sampler.affine_step(5, Objective::Eps),
            Err(ScheduleError::StepOutOfRange { index: 5, len: 5 })
        ));
        assert!(matches!(
            Sampler::step(&sampler, &x, &x, 5, Objective::Eps, None),
            Err(ScheduleError::StepOutOfRange { index: 5, len: 5 })
        ));
    }

    #[test]
    fn first_and_last_steps_are_ddim_with_eta_zero() {
        // The first-order DPM-Solver++ step is DDIM (eta = 0) between the same timesteps; the last
        // goes to sigma = 0, i.e. DDIM's step "to x_0".
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        for spacing in [DpmSpacing::Linspace, DpmSpacing::Trailing] {
            let dpm = DpmSolverSampler::new(&s, options(12, spacing, false)).unwrap();
            let ddim = DdimSampler::with_timesteps(
                &s,
                dpm.timesteps(),
                DdimOptions {
                    clip_x0: false,
                    ..DdimOptions::default()
                },
            )
            .unwrap();
            for objective in [Objective::Eps, Objective::X0, Objective::V] {
                for i in [0, 11] {
                    assert!(!dpm.is_second_order(i));
                    let x = normal_tensor(10 + i as u64, &[2, 3]);
                    let out = normal_tensor(20 + i as u64, &[2, 3]);
                    let mut history = StepHistory::new();
                    let got = dpm
                        .step_with_history(&out, &x, i, objective, &mut history)
                        .unwrap();
                    let want = ddim.step(&out, &x, i, objective, None).unwrap();
                    assert_close(&values(&got), &values(&want), 1e-9, "first order = DDIM");
                }
            }
            assert!((1..11).all(|i| dpm.is_second_order(i)));
        }
    }

    /// The predicted x_0 of a model that knows the data are the single point `x_star`, from x_t at
    /// timestep `t`, as the model's output of kind `objective`.
    fn oracle(s: &Schedule, x_star: &Tensor, x: &Tensor, t: usize, objective: Objective) -> Tensor {
        let abar = s.alphas_cumprod().values()[t];
        let eps = ((x - (x_star * abar.sqrt()).unwrap()).unwrap() / (1.0 - abar).sqrt()).unwrap();
        let n = x.dim(0).unwrap();
        s.training_target(objective, x_star, &eps, &ts(&vec![t as u32; n]))
            .unwrap()
    }

    #[test]
    fn an_exact_constant_x0_model_is_followed_exactly() {
        // When every prediction of x_0 is x*, the ODE's solution is
        // x_t = alpha_t x* + sigma_t eps_T with the starting noise eps_T, and every step (first
        // and second order, D = x*) reproduces it; the last lands on x*.
        let s = schedule_f64(&ScheduleConfig::default());
        let x_star = normal_tensor(30, &[2, 4]).tanh().unwrap();
        for objective in [Objective::Eps, Objective::X0, Objective::V] {
            for steps in [1, 2, 10, 25] {
                let dpm =
                    DpmSolverSampler::new(&s, options(steps, DpmSpacing::Linspace, true)).unwrap();
                let abar = s.alphas_cumprod().values();
                let t0 = dpm.timesteps()[0];
                let eps_t = normal_tensor(31, &[2, 4]);
                let on_path = |t: Option<usize>| -> Vec<f64> {
                    let a = t.map_or(1.0, |t| abar[t]);
                    let x = ((&x_star * a.sqrt()).unwrap() + (&eps_t * (1.0 - a).sqrt()).unwrap())
                        .unwrap();
                    values(&x)
                };
                let mut x = Tensor::from_vec(on_path(Some(t0)), &[2, 4], &candle_core::Device::Cpu)
                    .unwrap();
                let mut history = StepHistory::new();
                for (i, &t) in dpm.timesteps().iter().enumerate() {
                    let out = oracle(&s, &x_star, &x, t, objective);
                    x = dpm
                        .step_with_history(&out, &x, i, objective, &mut history)
                        .unwrap();
                    let want = on_path(dpm.timesteps().get(i + 1).copied());
                    assert_close(&values(&x), &want, 1e-10, "on the ODE path");
                }
                assert_close(&values(&x), &values(&x_star), 1e-10, "lands on x*");
            }
        }
    }

    /// Error at timestep 500 of DPM-Solver++ (2M) (`second = true`) or DDIM, against
    /// the exact probability-flow ODE for Gaussian data N(0, s^2 I): there x_0_hat(x_t) =
    /// alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) x_t and the flow scales x_t by the ratio of the
    /// marginal standard deviations sqrt(alpha_t^2 s^2 + sigma_t^2).
    fn gaussian_flow_error(s: &Schedule, steps: usize, second: bool) -> f64 {
        let sd = 0.5f64;
        let abar = s.alphas_cumprod().values();
        let std_at = |t: usize| (abar[t] * sd * sd + 1.0 - abar[t]).sqrt();
        let dpm = DpmSolverSampler::new(s, options(steps, DpmSpacing::Linspace, false)).unwrap();
        let ts_ = dpm.timesteps().to_vec();
        let ddim = DdimSampler::with_timesteps(
            s,
            &ts_,
            DdimOptions {
                clip_x0: false,
                ..DdimOptions::default()
            },
        )
        .unwrap();
        let x_start = normal_tensor(40, &[1, 16]);
        let mut x = x_start.clone();
        let mut history = StepHistory::new();
        // The steps down to timestep 500, which every linspace spacing used here visits.
        let end = ts_.iter().position(|&t| t == 500).expect("visits 500");
        for (i, &t) in ts_[..end].iter().enumerate() {
            let x0 = (&x * (abar[t].sqrt() * sd * sd / (std_at(t) * std_at(t)))).unwrap();
            x = if second {
                dpm.step_with_history(&x0, &x, i, Objective::X0, &mut history)
            } else {
                ddim.step(&x0, &x, i, Objective::X0, None)
            }
            .unwrap();
        }
        let want = (&x_start * (std_at(500) / std_at(ts_[0]))).unwrap();
        values(&(x - want).unwrap())
            .iter()
            .fold(0.0, |m, e| m.max(e.abs()))
    }

    #[test]
    fn the_solver_is_second_order_on_gaussian_data() {
        // Halving the step size divides the global error of DDIM (first order) by about 2 and
        // that of DPM-Solver++ (2M) by about 4 (measured 3.5, 3.8, 3.9 and 1.97, 1.99, 1.99); at
        // equal steps the latter is the more accurate.
        let s = schedule_f64(&ScheduleConfig::default());
        let (dpm, ddim): (Vec<f64>, Vec<f64>) = [10, 20, 40, 80]
            .iter()
            .map(|&n| {
                (
                    gaussian_flow_error(&s, n, true),
                    gaussian_flow_error(&s, n, false),
                )
            })
            .unzip();
        // Measured: 3.3e-3 vs 6.8e-3 at 10 steps, 6.4e-5 vs 8.7e-4 at 80.
        for k in 0..4 {
            assert!(dpm[k] < ddim[k] / 1.5, "{dpm:?} vs {ddim:?}");
        }
        assert!(dpm[3] < ddim[3] / 10.0, "{dpm:?} vs {ddim:?}");
        for k in 1..4 {
            let (r2, r1) = (dpm[k - 1] / dpm[k], ddim[k - 1] / ddim[k]);
            assert!(
                r2 > 3.0 && (1.5..3.0).contains(&r1),
                "ratios {r2} {r1}: {dpm:?} {ddim:?}"
            );
        }
    }

    #[test]
    fn second_order_steps_need_the_previous_prediction() {
        let s = schedule_f64(&ScheduleConfig::default());
        let dpm = DpmSolverSampler::new(&s, options(10, DpmSpacing::Linspace, false)).unwrap();
        let x = normal_tensor(50, &[2, 3]);
        let out = normal_tensor(51, &[2, 3]);
        // Without a history, or with the prediction of another step.
        assert!(matches!(
            Sampler::step(&dpm, &out, &x, 3, Objective::Eps, None),
            Err(ScheduleError::MissingHistory {
                index: 3,
                timestep: 699
            })
        ));
        let mut history = StepHistory::new();
        dpm.step_with_history(&out, &x, 0, Objective::Eps, &mut history)
            .unwrap();
        assert!(history.x0_of(0).is_some());
        assert!(matches!(
            dpm.step_with_history(&out, &x, 2, Objective::Eps, &mut history),
            Err(ScheduleError::MissingHistory { index: 2, .. })
        ));
        dpm.step_with_history(&out, &x, 1, Objective::Eps, &mut history)
            .unwrap();
        // A history of another shape.
        let other = normal_tensor(52, &[2, 4]);
        assert!(matches!(
            dpm.step_with_history(&other, &other, 2, Objective::Eps, &mut history),
            Err(ScheduleError::Shape { .. })
        ));
        // The first-order first and last steps need none.
        assert!(Sampler::step(&dpm, &out, &x, 0, Objective::Eps, None).is_ok());
        assert!(Sampler::step(&dpm, &out, &x, 9, Objective::Eps, None).is_ok());
        assert!(!dpm.needs_noise(0) && dpm.is_multistep());
    }

    #[test]
    fn in_place_steps_follow_the_tensor_steps() {
        // A whole run, through the Sampler trait, with model outputs that depend on x: the
        // in-place steps (f32 values, f64 arithmetic, an f32 x_0 buffer) against the tensor
        // steps in f64 on the same f32-rounded outputs.
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        let f32_round = |t: Tensor| {
            t.to_dtype(DType::F32)
                .and_then(|t| t.to_dtype(DType::F64))
                .unwrap()
        };
        for objective in [Objective::Eps, Objective::X0, Objective::V] {
            for clip_x0 in [false, true] {
                let cfg = crate::SamplerConfig::DpmSolver {
                    steps: Some(15),
                    spacing: DpmSpacing::Trailing,
                    clip_x0,
                };
                let sampler = cfg.build(&s).unwrap();
                let x_start = f32_round(normal_tensor(60, &[2, 8]));
                let mut x = x_start.clone();
                let mut xs: Vec<f32> = values(&x_start).iter().map(|&v| v as f32).collect();
                let mut last = vec![0f32; xs.len()];
                let mut history = StepHistory::new();
                let bias = normal_tensor(61, &[2, 8]);
                for i in 0..sampler.timesteps().len() {
                    // The output the model gives for the tensor path's x (both paths are fed it).
                    let out = f32_round(((&x * 0.3).unwrap() + &bias).unwrap());
                    let outv: Vec<f32> = values(&out).iter().map(|&v| v as f32).collect();
                    let step = sampler.affine_step(i, objective).unwrap();
                    assert_eq!(step.uses_last_x0(), i > 0 && i < 14);
                    step.apply_multistep(&outv, &mut xs, &mut last, || unreachable!("no noise"));
                    x = sampler
                        .step_with_history(&out, &x, i, objective, None, &mut history)
                        .unwrap();
                    let want = values(&x);
                    for (k, (&got, &want)) in xs.iter().zip(&want).enumerate() {
                        let err = (got as f64 - want).abs();
                        assert!(
                            err <= 1e-5 * (1.0 + want.abs()),
                            "{objective:?} clip {clip_x0} step {i} elem {k}: {got} vs {want}"
                        );
                    }
                    // Continue both from the same (f32) state.
                    x = Tensor::from_vec(
                        xs.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                        &[2, 8],
                        &candle_core::Device::Cpu,
                    )
                    .unwrap();
                }
                if clip_x0 {
                    assert!(xs.iter().all(|v| v.abs() <= 1.0));
                }
            }
        }
    }
}
