//! The crate's error type.

use candle_core::DType;

/// Everything that can go wrong in `ddpm-schedule`: a bad configuration, a tensor of the wrong
/// shape or dtype, a sampler asked for a step it does not have, or an error from candle.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// `timesteps` was 0; a diffusion needs at least one step.
    #[error("timesteps must be at least 1, got 0")]
    ZeroTimesteps,

    /// `timesteps` is beyond any usable diffusion (a typo or a corrupt config), and building its
    /// buffers would take gigabytes.
    #[error("timesteps must be at most {max}, got {got}")]
    TooManyTimesteps {
        /// The value given.
        got: usize,
        /// [`crate::config::MAX_TIMESTEPS`].
        max: usize,
    },

    /// A schedule's `start` is not below its `end`.
    #[error("{schedule} beta schedule: start ({start}) must be smaller than end ({end})")]
    StartNotBelowEnd {
        /// The schedule's name, e.g. `"linear"`.
        schedule: &'static str,
        /// The configured start value.
        start: f64,
        /// The configured end value.
        end: f64,
    },

    /// A numeric parameter is outside its valid range.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidParameter {
        /// The parameter's name, e.g. `"beta_schedule.start"` or `"eta"`.
        field: &'static str,
        /// The value that was given.
        value: f64,
        /// Why the value is not valid.
        reason: &'static str,
    },

    /// A computed beta is not strictly inside (0, 1).
    #[error(
        "beta at timestep {timestep} is {value}, outside (0, 1); \
         pick smaller start/end or more timesteps"
    )]
    BetaOutOfRange {
        /// The timestep whose beta is invalid.
        timestep: usize,
        /// The invalid value.
        value: f64,
    },

    /// The signal is gone long before the last step: `alphas_cumprod` falls below
    /// [`crate::config::MIN_ALPHA_BAR`], where the derived buffers overflow.
    #[error(
        "the schedule's alphas_cumprod falls below 1e-60 at timestep {timestep} of {timesteps}, \
         where its derived buffers overflow: use fewer timesteps or smaller betas (a linear \
         schedule over many steps wants its start and end scaled by 1000 / timesteps)"
    )]
    SignalVanishes {
        /// The first timestep below the bound.
        timestep: usize,
        /// The schedule's length.
        timesteps: usize,
    },

    /// A respacing or sampler asked for more steps than the schedule has, or for none.
    #[error("cannot respace a {timesteps}-step schedule to {steps} steps: need 1 <= steps <= {timesteps}")]
    InvalidSteps {
        /// The requested number of steps.
        steps: usize,
        /// The schedule's number of timesteps.
        timesteps: usize,
    },

    /// A timestep tensor has a dtype that cannot index the schedule's buffers.
    #[error("timestep tensor must be U32 or I64, got {0:?}")]
    TimestepDtype(DType),

    /// The schedule's buffers were asked to be stored in a non-float dtype.
    #[error("schedule buffers must use a float dtype (F16, BF16, F32, F64), got {0:?}")]
    BufferDtype(DType),

    /// A tensor has the wrong shape for the operation.
    #[error("{what}: expected shape {expected}, got {found:?}")]
    Shape {
        /// Which argument is wrong.
        what: &'static str,
        /// A description of the expected shape.
        expected: String,
        /// The shape that was given.
        found: Vec<usize>,
    },

    /// A sampler was asked for a step index past the end of its timesteps.
    #[error("sampler step index {index} is out of range for {len} timesteps")]
    StepOutOfRange {
        /// The requested index into `timesteps()`.
        index: usize,
        /// The sampler's number of steps.
        len: usize,
    },

    /// A sampler was asked to step from a timestep that is not one of its timesteps.
    #[error(
        "timestep {timestep} is not one of this sampler's {len} timesteps (a respaced sampler \
         steps only from the timesteps it lists: Sampler::timesteps)"
    )]
    NotASamplerTimestep {
        /// The requested timestep.
        timestep: usize,
        /// The sampler's number of steps.
        len: usize,
    },

    /// A stochastic sampler step needs fresh Gaussian noise but none was given.
    #[error(
        "sampler step {index} (timestep {timestep}) adds noise, but no noise tensor was given"
    )]
    MissingNoise {
        /// The index into `timesteps()`.
        index: usize,
        /// The original timestep of that step.
        timestep: usize,
    },

    /// A multistep sampler's step needs the predicted x_0 of the step before, and the history
    /// passed does not hold it (or none was passed).
    #[error(
        "sampler step {index} (timestep {timestep}) is a multistep step: it needs the predicted \
         x_0 of step {index} - 1; drive the sampler with Sampler::step_with_history and one \
         StepHistory per run, every step in order"
    )]
    MissingHistory {
        /// The index into `timesteps()`.
        index: usize,
        /// The original timestep of that step.
        timestep: usize,
    },

    /// A diffusers scheduler config asks for something this crate cannot reproduce.
    #[error("diffusers scheduler config: `{field}` = {value}: {reason}")]
    DiffusersConfig {
        /// The field at fault, as diffusers names it.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ScheduleError>;
