//! Respacing: running the reverse process on S <= T of the original timesteps.
//!
//! The kept timesteps are evenly spaced over `0..T` including both ends:
//! `t_i = round(i (T - 1) / (S - 1))` for `i = 0..S` (improved-diffusion's `space_timesteps` with
//! one section; `round` is half away from zero), and `[T - 1]` when `S == 1`. With `S == T`
//! every timestep is kept.

use crate::error::{Result, ScheduleError};
use crate::schedule::Schedule;

/// The `steps` kept timesteps of a `timesteps`-step schedule, ascending and distinct.
pub fn spaced_timesteps(timesteps: usize, steps: usize) -> Result<Vec<usize>> {
    if steps == 0 || steps > timesteps {
        return Err(ScheduleError::InvalidSteps { steps, timesteps });
    }
    if steps == 1 {
        return Ok(vec![timesteps - 1]);
    }
    let stride = (timesteps - 1) as f64 / (steps - 1) as f64;
    Ok((0..steps)
        .map(|i| ((i as f64 * stride).round() as usize).min(timesteps - 1))
        .collect())
}

/// A schedule reduced to S of its timesteps, as improved-diffusion's `SpacedDiffusion`: the new
/// betas are `beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}` (with `abar_{t_{-1}} = 1`), so the
/// respaced schedule's `alphas_cumprod` equals the original one at the kept timesteps.
#[derive(Debug, Clone)]
pub struct RespacedSchedule {
    schedule: Schedule,
    timestep_map: Vec<usize>,
}

impl RespacedSchedule {
    /// Keeps `steps` evenly spaced timesteps of `base` (errors unless `1 <= steps <= T`).
    pub fn new(base: &Schedule, steps: usize) -> Result<Self> {
        let timestep_map = spaced_timesteps(base.timesteps(), steps)?;
        let abar = base.alphas_cumprod().values();
        let mut prev = 1.0;
        let betas = timestep_map
            .iter()
            .map(|&t| {
                let beta = 1.0 - abar[t] / prev;
                prev = abar[t];
                beta
            })
            .collect();
        let schedule = Schedule::from_betas(betas, base.device(), base.dtype())?;
        Ok(Self {
            schedule,
            timestep_map,
        })
    }

    /// The whole of `base`, unchanged (index i is timestep i).
    pub fn identity(base: &Schedule) -> Self {
        Self {
            schedule: base.clone(),
            timestep_map: (0..base.timesteps()).collect(),
        }
    }

    /// The respaced schedule, indexed by respaced index `0..S`.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// `timestep_map()[i]` is the original timestep of respaced index i (ascending); feed it to
    /// the model as its time input.
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    /// The number of kept steps S.
    pub fn steps(&self) -> usize {
        self.timestep_map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, schedule_f64, TOL_F64};
    use crate::ScheduleConfig;

    #[test]
    fn spaced_timesteps_are_even_and_span_the_schedule() {
        assert_eq!(
            spaced_timesteps(10, 10).expect("ok"),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(spaced_timesteps(1000, 1).expect("ok"), vec![999]);
        assert_eq!(spaced_timesteps(1000, 2).expect("ok"), vec![0, 999]);
        // i * 999 / 3 for i = 0..4.
        assert_eq!(
            spaced_timesteps(1000, 4).expect("ok"),
            vec![0, 333, 666, 999]
        );
        for (t_max, steps) in [(1000, 50), (1000, 999), (300, 7), (4000, 250)] {
            let ts = spaced_timesteps(t_max, steps).expect("ok");
            assert_eq!(ts.len(), steps);
            assert_eq!(ts[0], 0);
            assert_eq!(ts[steps - 1], t_max - 1);
            let gaps: Vec<usize> = ts.windows(2).map(|w| w[1] - w[0]).collect();
            let (lo, hi) = (
                gaps.iter().min().copied().unwrap_or(0),
                gaps.iter().max().copied().unwrap_or(0),
            );
            assert!(
                lo >= 1 && hi - lo <= 1,
                "gaps {lo}..{hi} for {steps} of {t_max}"
            );
        }
        for steps in [0, 11] {
            assert!(matches!(
                spaced_timesteps(10, steps),
                Err(ScheduleError::InvalidSteps { .. })
            ));
        }
    }

    #[test]
    fn respacing_to_all_steps_reproduces_the_betas() {
        for cfg in [ScheduleConfig::default(), ScheduleConfig::cosine(500)] {
            let s = schedule_f64(&cfg);
            let r = RespacedSchedule::new(&s, s.timesteps()).expect("respace");
            assert_eq!(r.timestep_map(), (0..s.timesteps()).collect::<Vec<_>>());
            // 1 - abar_t / abar_{t-1} recovers beta_t up to the rounding of the ratio, a few
            // ulps of 1 (~1e-16 absolute, whatever beta_t is).
            let b = r.schedule().betas().values();
            for (t, (&got, &want)) in b.iter().zip(s.betas().values()).enumerate() {
                assert!(
                    (got - want).abs() <= 8.0 * f64::EPSILON,
                    "t = {t}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn respacing_keeps_alphas_cumprod_at_the_kept_timesteps() {
        let s = schedule_f64(&ScheduleConfig::cosine(1000));
        for steps in [1, 2, 50, 250] {
            let r = RespacedSchedule::new(&s, steps).expect("respace");
            assert_eq!(r.steps(), steps);
            assert_eq!(r.schedule().timesteps(), steps);
            let kept: Vec<f64> = r
                .timestep_map()
                .iter()
                .map(|&t| s.alphas_cumprod().values()[t])
                .collect();
            assert_close(
                r.schedule().alphas_cumprod().values(),
                &kept,
                TOL_F64,
                "abar",
            );
            // beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}.
            let b = r.schedule().betas().values();
            for i in 1..steps {
                let want = 1.0 - kept[i] / kept[i - 1];
                assert!((b[i] - want).abs() < 1e-15, "{} vs {want}", b[i]);
            }
        }
        assert!(matches!(
            RespacedSchedule::new(&s, 1001),
            Err(ScheduleError::InvalidSteps {
                steps: 1001,
                timesteps: 1000
            })
        ));
    }
}
