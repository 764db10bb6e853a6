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
