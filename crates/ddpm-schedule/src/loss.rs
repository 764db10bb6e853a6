//! Training losses between the network's prediction and the objective's target: L1, L2 or Huber
//! per element, averaged over each sample, then a weighted mean over the batch.
//!
//! Built only from candle ops with a backward pass (sub, abs, sqr, minimum, mul, mean), so the
//! loss is differentiable with respect to the prediction.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScheduleError};
use crate::forward::check_same_shape;
use crate::objective::Objective;
use crate::schedule::{check_timestep_tensor, Schedule};

/// Default `delta` of the Huber loss (PyTorch's `smooth_l1_loss` default `beta`).
pub const DEFAULT_HUBER_DELTA: f64 = 1.0;
/// Default `gamma` of min-SNR weighting (Hang et al. 2023).
pub const DEFAULT_MIN_SNR_GAMMA: f64 = 5.0;

fn default_delta() -> f64 {
    DEFAULT_HUBER_DELTA
}
fn default_gamma() -> f64 {
    DEFAULT_MIN_SNR_GAMMA
}

/// The elementwise loss. Written `{ kind = "l2" }`, `{ kind = "l1" }` or
/// `{ kind = "huber", delta = 1.0 }` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossKind {
    /// `|d|` with d = prediction - target.
    L1,
    /// `d^2` (the DDPM paper's L_simple for the eps objective).
    #[default]
    L2,
    /// PyTorch's `smooth_l1_loss` with `beta = delta`: `0.5 d^2 / delta` where `|d| < delta`,
    /// else `|d| - 0.5 delta`.
    Huber {
        /// Where the loss switches from quadratic to linear; must be > 0.
        #[serde(default = "default_delta")]
        delta: f64,
    },
}

impl LossKind {
    /// Checks the parameters (Huber's delta must be finite and > 0).
    pub fn validate(&self) -> Result<()> {
        if let Self::Huber { delta } = *self {
            if !(delta.is_finite() && delta > 0.0) {
                return Err(ScheduleError::InvalidParameter {
                    field: "loss.delta",
                    value: delta,
                    reason: "must be a finite number > 0",
                });
            }
        }
        Ok(())
    }

    /// The loss of each sample, averaged over all non-batch dims: a `(b,)` tensor.
    ///
    /// `prediction` and `target` share a shape of rank >= 1 with the batch first.
    pub fn per_sample(&self, prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
        // prediction, target: (b, ...)
        self.validate()?;
        check_same_shape("target", prediction, target)?;
        let batch = match prediction.dims().first() {
            Some(&b) if b > 0 => b,
            _ => {
                return Err(ScheduleError::Shape {
                    what: "prediction",
                    expected: "rank >= 1 with a non-empty batch first".to_string(),
                    found: prediction.dims().to_vec(),
                })
            }
        };
        let per_sample_len = prediction.elem_count() / batch;
        let diff = (prediction - target)?;
        let elementwise = match *self {
            Self::L1 => diff.abs()?,
            Self::L2 => diff.sqr()?,
            Self::Huber { delta } => {
                // With d = |diff| and m = min(d, delta): m (d - m/2) / delta is 0.5 d^2 / delta
                // below delta and d - delta/2 above it, with one expression for both sides.
                let d = diff.abs()?;
                let m = d.minimum(delta)?;
                ((&m * (&d - (&m * 0.5)?)?)? / delta)?
            }
        };
        Ok(elementwise.reshape((batch, per_sample_len))?.mean(1)?)
    }
}

/// How the per-sample losses are weighted. Written `{ kind = "uniform" }` or
/// `{ kind = "min_snr", gamma = 5.0 }` in configs.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossWeighting {
    /// Weight 1 for every sample.
    #[default]
    Uniform,
    /// Min-SNR-gamma (Hang et al. 2023): the weight of a sample at t is min(snr_t, gamma)
    /// expressed for the objective: eps: `min(snr, gamma) / snr`; x0: `min(snr, gamma)`;
    /// v: `min(snr, gamma) / (snr + 1)`.
    MinSnr {
        /// The SNR cap; must be > 0.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

impl LossWeighting {
    /// Checks the parameters (min-SNR's gamma must be finite and > 0).
    pub fn validate(&self) -> Result<()> {
        if let Self::MinSnr { gamma } = *self {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(ScheduleError::InvalidParameter {
                    field: "loss.weighting.gamma",
                    value: gamma,
                    reason: "must be a finite number > 0",
                });
            }
        }
        Ok(())
    }

    /// The weight of each sample at its timestep: a `(b,)` tensor in the schedule's dtype, on its
    /// device. `t` is a `(b,)` U32 or I64 tensor.
    pub fn weights(&self, schedule: &Schedule, objective: Objective, t: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let snr = schedule.snr().gather(t)?;
        match *self {
            Self::Uniform => Ok(snr.ones_like()?),
            Self::MinSnr { gamma } => {
                let clipped = snr.minimum(gamma)?;
                Ok(match objective {
                    Objective::Eps => (clipped / snr)?,
                    Objective::X0 => clipped,
                    Objective::V => (clipped / (snr + 1.0)?)?,
                })
            }
        }
    }
}

/// The mean over the batch of `weights[i] * per_sample[i]` (a scalar tensor); with no weights,
/// the plain mean. The weights are not normalised, as in Hang et al. and lucidrains' code.
pub fn weighted_mean(per_sample: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => Ok(per_sample.mean_all()?),
        Some(w) => {
            check_same_shape("weights", per_sample, w)?;
            let w = w
                .to_device(per_sample.device())?
                .to_dtype(per_sample.dtype())?;
            Ok((per_sample * w)?.mean_all()?)
        }
    }
}

/// A complete training loss: the elementwise kind and the per-sample weighting. In TOML the
/// kind's fields sit at the top level:
/// ```toml
/// kind = "huber"
/// delta = 0.5
/// weighting = { kind = "min_snr", gamma = 5.0 }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DiffusionLoss {
    /// The elementwise loss.
    #[serde(flatten)]
    pub kind: LossKind,
    /// The per-sample weighting.
    #[serde(default)]
    pub weighting: LossWeighting,
}

impl DiffusionLoss {
    /// Checks the parameters of both parts.
    pub fn validate(&self) -> Result<()> {
        self.kind.validate()?;
        self.weighting.validate()
    }

    /// The scalar loss between `prediction` and `target` (shape `(b, ...)`) for samples at
    /// timesteps `t` (shape `(b,)`), trained on `objective`. Differentiable in `prediction`.
    pub fn compute(
        &self,
        schedule: &Schedule,
        objective: Objective,
        prediction: &Tensor,
        target: &Tensor,
        t: &Tensor,
    ) -> Result<Tensor> {
        self.validate()?;
        let per_sample = self.kind.per_sample(prediction, target)?;
        check_timestep_tensor(t, per_sample.dim(0)?)?;
        match self.weighting {
            LossWeighting::Uniform => weighted_mean(&per_sample, None),
            weighting => {
                let w = weighting.weights(schedule, objective, t)?;
                weighted_mean(&per_sample, Some(&w))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::test_util::{assert_close, schedule_f64, ts, values, TOL_F64};
    use crate::ScheduleConfig;

    /// min-SNR weight as a function of (snr, gamma).
    type WeightFormula = fn(f64, f64) -> f64;
    /// The derivative of an elementwise loss with respect to the difference.
    type Derivative = Box<dyn Fn(f64) -> f64>;

    fn t2(rows: [[f64; 4]; 2]) -> Tensor {
        Tensor::new(&rows, &Device::Cpu).expect("tensor")
    }

    /// prediction - target = [[0, 1, 2, -2], [0.5, -0.5, 0.5, 0.5]].
    fn pair() -> (Tensor, Tensor) {
        let pred = t2([[0.0, 1.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5]]);
        let target = t2([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]);
        (pred, target)
    }

    #[test]
    fn per_sample_losses_match_hand_computed_values() {
        let (pred, target) = pair();
        let l1 = LossKind::L1.per_sample(&pred, &target).expect("l1");
        assert_close(&values(&l1), &[(1.0 + 2.0 + 2.0) / 4.0, 0.5], TOL_F64, "l1");
        let l2 = LossKind::L2.per_sample(&pred, &target).expect("l2");
        assert_close(
            &values(&l2),
            &[(1.0 + 4.0 + 4.0) / 4.0, 0.25],
            TOL_F64,
            "l2",
        );
        // Huber, delta = 1.5: |d| = 1 and 0.5 are below delta (0.5 d^2 / 1.5); |d| = 2 is above
        // (2 - 0.75).
        let huber = LossKind::Huber { delta: 1.5 }
            .per_sample(&pred, &target)
            .expect("huber");
        let below = |d: f64| 0.5 * d * d / 1.5;
        let want = [(0.0 + below(1.0) + 2.0 * (2.0 - 0.75)) / 4.0, below(0.5)];
        assert_close(&values(&huber), &want, TOL_F64, "huber");
    }

    #[test]
    fn huber_is_continuous_at_delta_and_reduces_to_half_l2_and_l1() {
        let delta = 0.5;
        let at = Tensor::new(&[[delta]], &Device::Cpu).expect("t");
        let zero = at.zeros_like().expect("zeros");
        let h = LossKind::Huber { delta }.per_sample(&at, &zero).expect("h");
        // Both branches give delta / 2 at |d| = delta.
        assert_close(&values(&h), &[0.5 * delta], TOL_F64, "at delta");
        // With a huge delta, Huber is L2 / (2 delta); with a tiny one it approaches L1.
        let (pred, target) = pair();
        let big = LossKind::Huber { delta: 1e3 }
            .per_sample(&pred, &target)
            .expect("h");
        let l2 = values(&LossKind::L2.per_sample(&pred, &target).expect("l2"));
        assert_close(
            &values(&big),
            &l2.iter().map(|v| v / 2e3).collect::<Vec<_>>(),
            TOL_F64,
            "large delta",
        );
        let small = LossKind::Huber { delta: 1e-9 }
            .per_sample(&pred, &target)
            .expect("h");
        let l1 = values(&LossKind::L1.per_sample(&pred, &target).expect("l1"));
        assert_close(&values(&small), &l1, 1e-8, "small delta");
    }

    #[test]
    fn weighted_mean_weights_each_sample() {
        let (pred, target) = pair();
        let l2 = LossKind::L2.per_sample(&pred, &target).expect("l2");
        let plain = weighted_mean(&l2, None).expect("mean");
        assert_close(&values(&plain), &[(2.25 + 0.25) / 2.0], TOL_F64, "mean");
        let w = Tensor::new(&[2.0f32, 0.5], &Device::Cpu).expect("w");
        let weighted = weighted_mean(&l2, Some(&w)).expect("weighted");
        assert_close(
            &values(&weighted),
            &[(2.0 * 2.25 + 0.5 * 0.25) / 2.0],
            TOL_F64,
            "w",
        );
        let bad = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).expect("w");
        assert!(weighted_mean(&l2, Some(&bad)).is_err());
    }

    #[test]
    fn min_snr_weights_follow_their_formula() {
        let cfg = ScheduleConfig::default();
        let s = schedule_f64(&cfg);
        let betas = cfg.betas().expect("valid");
        let steps = [0u32, 10, 100, 500, 999];
        let gamma = 5.0;
        // snr_t = abar_t / (1 - abar_t), from the betas.
        let snr: Vec<f64> = steps
            .iter()
            .map(|&t| {
                let abar: f64 = betas[..=t as usize].iter().map(|b| 1.0 - b).product();
                abar / (1.0 - abar)
            })
            .collect();
        assert!(snr[0] > gamma && snr[4] < gamma, "the steps straddle gamma");
        let weighting = LossWeighting::MinSnr { gamma };
        let cases: [(Objective, WeightFormula); 3] = [
            (Objective::Eps, |snr, g| snr.min(g) / snr),
            (Objective::X0, |snr, g| snr.min(g)),
            (Objective::V, |snr, g| snr.min(g) / (snr + 1.0)),
        ];
        for (objective, formula) in cases {
            let w = weighting
                .weights(&s, objective, &ts(&steps))
                .expect("weights");
            let want: Vec<f64> = snr.iter().map(|&x| formula(x, gamma)).collect();
            assert_close(&values(&w), &want, TOL_F64, "min-snr weights");
        }
        let uniform = LossWeighting::Uniform
            .weights(&s, Objective::V, &ts(&steps))
            .expect("weights");
        assert_eq!(values(&uniform), vec![1.0; 5]);
    }

    #[test]
    fn a_gradient_flows_through_every_loss() {
        // d/dpred of mean_b w_b mean_n l(pred - target): l' / (b n) times the sample's weight,
        // with l' = sign(d) (L1), 2 d (L2), d / delta below delta and sign(d) above (Huber).
        // No difference is 0 or exactly delta, where the derivative is not unique.
        let s = schedule_f64(&ScheduleConfig::default());
        let t = ts(&[3, 700]);
        let target = t2([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]);
        let diff = [[0.3, 1.0, 2.0, -2.0], [0.5, -0.5, 0.25, -0.1]];
        let pred0 = (t2(diff) + &target).expect("pred");
        let n = 8.0;
        let delta = 0.75;
        let kinds: [(LossKind, Derivative); 3] = [
            (LossKind::L1, Box::new(|d: f64| d.signum())),
            (LossKind::L2, Box::new(|d: f64| 2.0 * d)),
            (
                LossKind::Huber { delta },
                Box::new(move |d: f64| {
                    if d.abs() < delta {
                        d / delta
                    } else {
                        d.signum()
                    }
                }),
            ),
        ];
        for (kind, dl) in kinds {
            for weighting in [LossWeighting::Uniform, LossWeighting::MinSnr { gamma: 5.0 }] {
                let w = values(&weighting.weights(&s, Objective::Eps, &t).expect("w"));
                let pred = Var::from_tensor(&pred0).expect("var");
                let loss = DiffusionLoss { kind, weighting }
                    .compute(&s, Objective::Eps, pred.as_tensor(), &target, &t)
                    .expect("loss");
                assert_eq!(loss.dims(), &[] as &[usize]);
                let grads = loss.backward().expect("backward");
                let g = grads.get(pred.as_tensor()).expect("a gradient for pred");
                let want: Vec<f64> = diff
                    .iter()
                    .enumerate()
                    .flat_map(|(b, row)| row.iter().map(move |&d| (b, d)))
                    .map(|(b, d)| w[b] * dl(d) / n)
                    .collect();
                assert_close(&values(g), &want, TOL_F64, "gradient");
            }
        }
    }

    #[test]
    fn loss_works_on_f32_predictions_with_f64_buffers() {
        let s = schedule_f64(&ScheduleConfig::default());
        let (pred, target) = pair();
        let (pred, target) = (
            pred.to_dtype(DType::F32).expect("f32"),
            target.to_dtype(DType::F32).expect("f32"),
        );
        let loss = DiffusionLoss {
            kind: LossKind::L2,
            weighting: LossWeighting::MinSnr { gamma: 5.0 },
        }
        .compute(&s, Objective::V, &pred, &target, &ts(&[1, 2]))
        .expect("loss");
        assert_eq!(loss.dtype(), DType::F32);
    }

    #[test]
    fn bad_loss_parameters_and_shapes_are_errors() {
        let s = schedule_f64(&ScheduleConfig::default());
        let (pred, target) = pair();
        let t = ts(&[1, 2]);
        for delta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let loss = DiffusionLoss {
                kind: LossKind::Huber { delta },
                weighting: LossWeighting::Uniform,
            };
            assert!(matches!(
                loss.compute(&s, Objective::Eps, &pred, &target, &t),
                Err(ScheduleError::InvalidParameter {
                    field: "loss.delta",
                    ..
                })
            ));
        }
        let loss = DiffusionLoss {
            kind: LossKind::L2,
            weighting: LossWeighting::MinSnr { gamma: 0.0 },
        };
        assert!(matches!(
            loss.validate(),
            Err(ScheduleError::InvalidParameter {
                field: "loss.weighting.gamma",
                ..
            })
        ));
        let other = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).expect("zeros");
        assert!(matches!(
            LossKind::L1.per_sample(&pred, &other),
            Err(ScheduleError::Shape { .. })
        ));
        let empty = Tensor::zeros((0, 3), DType::F64, &Device::Cpu).expect("zeros");
        assert!(LossKind::L1.per_sample(&empty, &empty).is_err());
        assert!(matches!(
            DiffusionLoss::default().compute(&s, Objective::Eps, &pred, &target, &ts(&[1])),
            Err(ScheduleError::Shape { what: "t", .. })
        ));
    }

    #[test]
    fn loss_configs_read_from_toml() {
        let cases = [
            ("kind = \"l2\"", DiffusionLoss::default()),
            (
                "kind = \"huber\"\ndelta = 0.5\nweighting = { kind = \"min_snr\", gamma = 4 }",
                DiffusionLoss {
                    kind: LossKind::Huber { delta: 0.5 },
                    weighting: LossWeighting::MinSnr { gamma: 4.0 },
                },
            ),
            (
                "kind = \"huber\"\nweighting = { kind = \"min_snr\" }",
                DiffusionLoss {
                    kind: LossKind::Huber {
                        delta: DEFAULT_HUBER_DELTA,
                    },
                    weighting: LossWeighting::MinSnr {
                        gamma: DEFAULT_MIN_SNR_GAMMA,
                    },
                },
            ),
            (
                "kind = \"l1\"\nweighting = { kind = \"uniform\" }",
                DiffusionLoss {
                    kind: LossKind::L1,
                    weighting: LossWeighting::Uniform,
                },
            ),
        ];
        for (text, want) in cases {
            let got: DiffusionLoss = toml::from_str(text).expect(text);
            assert_eq!(got, want, "{text}");
            let back: DiffusionLoss =
                toml::from_str(&toml::to_string(&got).expect("ser")).expect("de");
            assert_eq!(back, want);
        }
    }
}
