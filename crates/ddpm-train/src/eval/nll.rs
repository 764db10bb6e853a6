//! The negative variational bound of a model on a data set, in bits/dim (DDPM paper eq. 5 and
//! its Table 2): the prior term, the decoder term L_0 and the middle terms L_1 .. L_{T-1}, each
//! computed by [`ddpm_schedule::likelihood`], summed over the full chain or estimated from a few
//! stratified timesteps per image, with a per-term breakdown and a standard error.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_data::Dataset;
use ddpm_schedule::likelihood::bits_per_dim;
use ddpm_schedule::{BoundConfig, Objective, Schedule};
use ddpm_unet::DiffusionModel;
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sample::gaussian;
use crate::{Result, TrainError};

/// Domain separator of the bound's RNG (noise and timesteps), so that `seed` here and the
/// sampling seed draw unrelated streams.
const NLL_RNG_DOMAIN: u64 = 0x6e6c_6c5f_626f_756e; // "nll_boun"

/// How to compute the bound.
#[derive(Debug, Clone)]
pub struct NllOptions {
    /// The reverse variance, clipping and CDF of the bound.
    pub bound: BoundConfig,
    /// `None`: sum every term `t = 0..T`. `Some(K)`: estimate the middle terms from `K` timesteps
    /// per image, one drawn uniformly from each of `K` equal strata of `1..T` (unbiased).
    pub timesteps_per_image: Option<usize>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Seed of the noise (and of the sampled timesteps).
    pub seed: u64,
    /// Number of contiguous ranges of `1..T` the middle terms are reported in (e.g. 4: quartiles).
    pub ranges: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for NllOptions {
    fn default() -> Self {
        Self {
            bound: BoundConfig::default(),
            timesteps_per_image: None,
            batch_size: 64,
            seed: 0,
            ranges: 4,
            progress: false,
        }
    }
}

/// The middle terms `L_t` for `t` in `first_t..=last_t`, summed, in bits/dim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TermRange {
    /// First timestep of the range (0-based; the term at `t` is the paper's `L_t`).
    pub first_t: usize,
    /// Last timestep of the range, inclusive.
    pub last_t: usize,
    /// The range's share of the bound, in bits/dim (mean over images).
    pub bpd: f64,
}

/// The bound on a set of images, in bits/dim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NllReport {
    /// Images evaluated.
    pub images: usize,
    /// Values per image (`c * h * w`).
    pub dims: usize,
    /// Diffusion steps `T` of the schedule.
    pub timesteps: usize,
    /// `"full"` (every term) or `"stratified"` (`sampled_timesteps` middle terms per image).
    pub estimator: String,
    /// Middle terms evaluated per image in the stratified estimator.
    pub sampled_timesteps: Option<usize>,
    /// The variance, clipping and CDF used.
    pub bound: BoundConfig,
    /// Seed of the noise and timesteps.
    pub seed: u64,
    /// The negative bound, mean over images: `prior_bpd + decoder_bpd + middle_bpd`.
    pub bpd: f64,
    /// Standard error of `bpd` (sample standard deviation of the per-image values over
    /// sqrt(images)); it covers both the choice of images and the Monte Carlo noise. `None` for
    /// one image.
    pub bpd_stderr: Option<f64>,
    /// The prior term `L_T = KL(q(x_T | x_0) || N(0, I))`.
    pub prior_bpd: f64,
    /// The decoder term `L_0 = -log p(x_0 | x_1)`.
    pub decoder_bpd: f64,
    /// The middle terms `L_1 .. L_{T-1}` together (the sum of `middle`).
    pub middle_bpd: f64,
    /// The middle terms by contiguous ranges of timesteps.
    pub middle: Vec<TermRange>,
    /// Mean of each term `L_t`, `t = 0..T`, in bits/dim (full estimator only).
    pub per_timestep_bpd: Option<Vec<f64>>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Splits `first..=last` into at most `parts` contiguous ranges of near-equal size.
pub fn split_range(first: usize, last: usize, parts: usize) -> Vec<(usize, usize)> {
    if last < first || parts == 0 {
        return Vec::new();
    }
    let n = last - first + 1;
    let parts = parts.min(n);
    (0..parts)
        .map(|k| (first + k * n / parts, first + (k + 1) * n / parts - 1))
        .collect()
}

/// A network as the bound sees it: `(x_t, t) -> output` of the model's objective.
pub type Denoiser<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a;

/// Accumulates the bound over batches of images.
pub struct BoundEstimator<'s> {
    schedule: &'s Schedule,
    objective: Objective,
    opts: NllOptions,
    rng: ChaCha8Rng,
    ranges: Vec<(usize, usize)>,
    strata: Vec<(usize, usize)>,
    dims: Option<usize>,
    /// Per image: total nats.
    totals: Vec<f64>,
    prior: f64,
    decoder: f64,
    range_sums: Vec<f64>,
    per_t: Vec<f64>,
    start: Instant,
}

impl<'s> BoundEstimator<'s> {
    /// An empty estimator for a model of `objective` on `schedule`.
    pub fn new(schedule: &'s Schedule, objective: Objective, opts: &NllOptions) -> Result<Self> {
        let t_max = schedule.timesteps();
        if opts.batch_size == 0 {
            return Err(TrainError::Other(
                "the batch size must be at least 1".into(),
            ));
        }
        let strata = match opts.timesteps_per_image {
            None => Vec::new(),
            Some(k) if k == 0 || k > t_max.saturating_sub(1) => {
                return Err(TrainError::Other(format!(
                    "the number of sampled timesteps per image must be in 1..={} (T - 1 for T = \
                     {t_max}), got {k}",
                    t_max.saturating_sub(1)
                )))
            }
            Some(k) => split_range(1, t_max - 1, k),
        };
        Ok(Self {
            schedule,
            objective,
            rng: ChaCha8Rng::seed_from_u64(opts.seed ^ NLL_RNG_DOMAIN),
            ranges: split_range(1, t_max.saturating_sub(1), opts.ranges.max(1)),
            strata,
            opts: opts.clone(),
            dims: None,
            totals: Vec::new(),
            prior: 0.0,
            decoder: 0.0,
            range_sums: vec![0.0; opts.ranges.max(1).min(t_max.saturating_sub(1))],
            per_t: vec![0.0; t_max],
            start: Instant::now(),
        })
    }

    /// Forward passes each image of a batch needs.
    pub fn passes_per_image(&self) -> usize {
        match self.opts.timesteps_per_image {
            None => self.schedule.timesteps(),
            Some(k) => k + 1,
        }
    }

    fn range_of(&self, t: usize) -> Option<usize> {
        self.ranges.iter().position(|&(a, b)| a <= t && t <= b)
    }

    /// The terms of every image at the timesteps `ts` (one per image), in nats.
    fn terms(&mut self, x0: &Tensor, ts: &[u32], denoise: &mut Denoiser) -> Result<Vec<f64>> {
        let b = x0.dim(0)?;
        let t = Tensor::from_vec(ts.to_vec(), b, x0.device())?;
        let noise = gaussian(&mut self.rng, x0.dims(), x0.device())?.to_dtype(x0.dtype())?;
        let x_t = self.schedule.q_sample(x0, &t, &noise)?;
        let out = denoise(&x_t, &t)?;
        let terms = self
            .schedule
            .vb_term(&out, x0, &x_t, &t, self.objective, &self.opts.bound)?;
        Ok(terms.to_vec1::<f64>()?)
    }

    /// Adds the terms of a batch of images `x0` `(b, ...)` on 8-bit levels of [-1, 1], calling
    /// `denoise` for every forward pass.
    pub fn add_batch(
        &mut self,
        x0: &Tensor,
        denoise: &mut Denoiser,
        bar: &ProgressBar,
    ) -> Result<()> {
        let b = x0.dim(0)?;
        let dims = x0.elem_count() / b.max(1);
        match self.dims {
            Some(d) if d != dims => {
                return Err(TrainError::Other(format!(
                    "images of {dims} values after images of {d}"
                )))
            }
            _ => self.dims = Some(dims),
        }
        let prior = self.schedule.prior_kl(x0)?.to_vec1::<f64>()?;
        let mut totals = prior.clone();
        self.prior += prior.iter().sum::<f64>();
        let t_max = self.schedule.timesteps();
        match self.opts.timesteps_per_image {
            None => {
                for t in 0..t_max {
                    let terms = self.terms(x0, &vec![t as u32; b], denoise)?;
                    let sum: f64 = terms.iter().sum();
                    self.per_t[t] += sum;
                    if t == 0 {
                        self.decoder += sum;
                    } else if let Some(r) = self.range_of(t) {
                        self.range_sums[r] += sum;
                    }
                    for (acc, v) in totals.iter_mut().zip(&terms) {
                        *acc += v;
                    }
                    bar.inc(b as u64);
                }
            }
            Some(_) => {
                let dec = self.terms(x0, &vec![0; b], denoise)?;
                self.decoder += dec.iter().sum::<f64>();
                for (acc, v) in totals.iter_mut().zip(&dec) {
                    *acc += v;
                }
                bar.inc(b as u64);
                for k in 0..self.strata.len() {
                    let (lo, hi) = self.strata[k];
                    let weight = (hi - lo + 1) as f64;
                    let ts: Vec<u32> = (0..b)
                        .map(|_| self.rng.random_range(lo..=hi) as u32)
                        .collect();
                    let terms = self.terms(x0, &ts, denoise)?;
                    for (i, v) in terms.iter().enumerate() {
                        let w = weight * v;
                        totals[i] += w;
                        if let Some(r) = self.range_of(ts[i] as usize) {
                            self.range_sums[r] += w;
                        }
                    }
                    bar.inc(b as u64);
                }
            }
        }
        self.totals.extend(totals);
        Ok(())
    }

    /// The report over every image added so far.
    pub fn finish(self) -> Result<NllReport> {
        let n = self.totals.len();
        let Some(dims) = self.dims.filter(|_| n > 0) else {
            return Err(TrainError::Other("no image to evaluate".into()));
        };
        let bpd = |nats: f64| bits_per_dim(nats / n as f64, dims);
        let per_image: Vec<f64> = self.totals.iter().map(|&v| bits_per_dim(v, dims)).collect();
        let mean = per_image.iter().sum::<f64>() / n as f64;
        let stderr = (n > 1).then(|| {
            let var = per_image.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        });
        let middle: Vec<TermRange> = self
            .ranges
            .iter()
            .zip(&self.range_sums)
            .map(|(&(first_t, last_t), &s)| TermRange {
                first_t,
                last_t,
                bpd: bpd(s),
            })
            .collect();
        let full = self.opts.timesteps_per_image.is_none();
        Ok(NllReport {
            images: n,
            dims,
            timesteps: self.schedule.timesteps(),
            estimator: if full { "full" } else { "stratified" }.to_string(),
            sampled_timesteps: self.opts.timesteps_per_image,
            bound: self.opts.bound,
            seed: self.opts.seed,
            bpd: mean,
            bpd_stderr: stderr,
            prior_bpd: bpd(self.prior),
            decoder_bpd: bpd(self.decoder),
            middle_bpd: middle.iter().map(|r| r.bpd).sum(),
            middle,
            per_timestep_bpd: full.then(|| self.per_t.iter().map(|&s| bpd(s)).collect()),
            seconds: self.start.elapsed().as_secs_f64(),
        })
    }
}

/// The network's output at `(x_t, t)` without gradients; a self-conditioned model first
/// predicts x_0 without conditioning and is then conditioned on it (clipped), as in sampling.
pub fn model_output(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    x_t: &Tensor,
    t: &Tensor,
) -> Result<Tensor> {
    let out = model.forward_t(x_t, t, None, None)?.detach();
    if !model.config().self_condition() {
        return Ok(out);
    }
    let x0 = schedule
        .predict_x0(objective, &out, x_t, t)?
        .clamp(-1f32, 1f32)?;
    Ok(model.forward_t(x_t, t, Some(&x0), None)?.detach())
}

/// Stacks the images `indices` of `dataset` into a `(b, c, h, w)` F32 tensor on `device`.
pub fn image_batch(dataset: &Dataset, indices: &[usize], device: &Device) -> Result<Tensor> {
    let images = indices
        .iter()
        .map(|&i| dataset.image_tensor(i))
        .collect::<ddpm_data::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&images, 0)?
        .to_dtype(DType::F32)?
        .to_device(device)?)
}

/// The negative variational bound of `model` on the images `indices` of `dataset`, in bits/dim.
pub fn variational_bound(
    model: &DiffusionModel,
    schedule: &Schedule,
    objective: Objective,
    dataset: &Dataset,
    indices: &[usize],
    opts: &NllOptions,
) -> Result<NllReport> {
    super::check_compatible(model, dataset)?;
    let mut est = BoundEstimator::new(schedule, objective, opts)?;
    let bar = if opts.progress {
        crate::trainer::progress_bar((indices.len() * est.passes_per_image()) as u64, "bound")
    } else {
        ProgressBar::hidden()
    };
    tracing::info!(
        images = indices.len(),
        timesteps = schedule.timesteps(),
        estimator = if opts.timesteps_per_image.is_some() { "stratified" } else { "full" },
        passes_per_image = est.passes_per_image(),
        variance = ?opts.bound.variance,
        "computing the variational bound"
    );
    let mut denoise = |x_t: &Tensor, t: &Tensor| model_output(model, schedule, objective, x_t, t);
    for chunk in indices.chunks(opts.batch_size.max(1)) {
        let x0 = image_batch(dataset, chunk, model.device())?;
        est.add_batch(&x0, &mut denoise, &bar)?;
    }
    bar.finish_and_clear();
    let report = est.finish()?;
    tracing::info!(
        bpd = report.bpd,
        stderr = report.bpd_stderr,
        seconds = report.seconds,
        "variational bound done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_schedule::{BetaSchedule, DdpmVariance, NormalCdf, ScheduleConfig};

    /// The four 8-bit levels of the toy data (u8 0, 64, 160, 255), mapped to [-1, 1].
    const LEVELS: [f64; 4] = [-1.0, 64.0 / 127.5 - 1.0, 160.0 / 127.5 - 1.0, 1.0];

    /// `n` images of `d` values, each value uniform over `LEVELS` and independent: the true
    /// entropy is exactly 2 bits/dim.
    fn toy_data(n: usize, d: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..n * d)
            .map(|_| LEVELS[rng.random_range(0..LEVELS.len())])
            .collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).expect("toy data")
    }

    /// The exact optimum for this data: E[x_0 | x_t] in closed form (a softmax over the levels of
    /// the Gaussian likelihoods q(x_t | x_0 = level)), returned as the model output of
    /// `objective`.
    fn oracle(s: &Schedule, objective: Objective, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let ts = t.to_vec1::<u32>()?;
        let d = x_t.dim(1)?;
        let xs = x_t.flatten_all()?.to_vec1::<f64>()?;
        let abar = s.alphas_cumprod().values();
        let mut out = Vec::with_capacity(xs.len());
        for (i, &x) in xs.iter().enumerate() {
            let a = abar[ts[i / d] as usize];
            let (sa, var) = (a.sqrt(), 1.0 - a);
            let logits: Vec<f64> = LEVELS
                .iter()
                .map(|&l| -(x - sa * l).powi(2) / (2.0 * var))
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|z| (z - m).exp()).collect();
            let x0 = w.iter().zip(LEVELS).map(|(w, l)| w * l).sum::<f64>() / w.iter().sum::<f64>();
            let eps = (x - sa * x0) / var.sqrt();
            out.push(match objective {
                Objective::Eps => eps,
                Objective::X0 => x0,
                Objective::V => sa * eps - var.sqrt() * x0,
            });
        }
        Ok(Tensor::from_vec(out, x_t.dims(), &Device::Cpu)?)
    }

    fn bound(s: &Schedule, objective: Objective, x0: &Tensor, opts: &NllOptions) -> NllReport {
        let mut est = BoundEstimator::new(s, objective, opts).expect("estimator");
        let mut denoise = |x_t: &Tensor, t: &Tensor| oracle(s, objective, x_t, t);
        let n = x0.dim(0).expect("n");
        let mut start = 0;
        while start < n {
            let b = opts.batch_size.min(n - start);
            let batch = x0.narrow(0, start, b).expect("batch");
            est.add_batch(&batch, &mut denoise, &ProgressBar::hidden())
                .expect("batch");
            start += b;
        }
        est.finish().expect("report")
    }

    /// A schedule whose first step adds noise of sd 0.001, well inside an 8-bit bin (half width
    /// 0.0039), so that the decoder can be nearly exact, and whose last step leaves
    /// sqrt(abar) ~ 1e-3 of the signal, so that the prior term is negligible.
    fn toy_schedule(timesteps: usize) -> Schedule {
        let cfg = ScheduleConfig {
            timesteps,
            beta_schedule: BetaSchedule::Quadratic {
                start: 1e-6,
                end: 40.0 / timesteps as f64,
            },
        };
        Schedule::with_dtype(&cfg, &Device::Cpu, DType::F64).expect("schedule")
    }

    const ENTROPY_BITS: f64 = 2.0;

    fn opts(variance: DdpmVariance, k: Option<usize>) -> NllOptions {
        NllOptions {
            bound: BoundConfig {
                variance,
                clip_x0: true,
                cdf: NormalCdf::Exact,
            },
            timesteps_per_image: k,
            batch_size: 64,
            seed: 7,
            ..NllOptions::default()
        }
    }

    #[track_caller]
    fn assert_terms_add_up(r: &NllReport) {
        let parts = r.prior_bpd + r.decoder_bpd + r.middle_bpd;
        assert!((r.bpd - parts).abs() < 1e-9, "{} vs {parts}", r.bpd);
        let ranges: f64 = r.middle.iter().map(|m| m.bpd).sum();
        assert!((r.middle_bpd - ranges).abs() < 1e-12);
        if let Some(per_t) = &r.per_timestep_bpd {
            assert_eq!(per_t.len(), r.timesteps);
            let sum: f64 = per_t.iter().sum::<f64>() + r.prior_bpd;
            assert!((r.bpd - sum).abs() < 1e-9, "{} vs {sum}", r.bpd);
        }
    }

    #[test]
    fn oracle_bound_is_at_least_the_entropy_and_close_to_it() {
        // 8192 values uniform over 4 levels: the data's entropy is exactly 2 bits/dim, and the
        // bound of any model is at least that in expectation; the estimate may fall below it by
        // its Monte Carlo error only (3 standard errors).
        let x0 = toy_data(128, 64, 1);
        let s800 = toy_schedule(800);
        let fine = bound(
            &s800,
            Objective::Eps,
            &x0,
            &opts(DdpmVariance::FixedSmall, None),
        );
        let se = fine.bpd_stderr.expect("stderr");
        assert_terms_add_up(&fine);
        assert!(fine.bpd > ENTROPY_BITS - 3.0 * se, "{} +- {se}", fine.bpd);
        // Close: the prior and decoder terms are ~1e-6 bits by the choice of schedule, and the
        // only slack left, the Gaussian reverse steps fitted to mixture posteriors, shrinks with
        // T (0.15 bits at T = 200, 0.015 at T = 800 in this toy).
        assert!(fine.prior_bpd < 1e-5 && fine.decoder_bpd < 1e-4, "{fine:?}");
        assert!(fine.bpd < ENTROPY_BITS + 0.05, "{} +- {se}", fine.bpd);
        let coarse = bound(
            &toy_schedule(200),
            Objective::Eps,
            &x0,
            &opts(DdpmVariance::FixedSmall, None),
        );
        assert!(
            coarse.bpd > fine.bpd + 0.05,
            "{} vs {}",
            coarse.bpd,
            fine.bpd
        );
        // The bound does not depend on how the optimum is parametrized: x0 and v give the same
        // numbers up to rounding (same noise, exact conversions).
        for objective in [Objective::X0, Objective::V] {
            let r = bound(&s800, objective, &x0, &opts(DdpmVariance::FixedSmall, None));
            assert!(
                (r.bpd - fine.bpd).abs() < 1e-9,
                "{objective:?}: {} vs {}",
                r.bpd,
                fine.bpd
            );
        }
        // The larger variance beta_t gives a valid but looser bound.
        let large = bound(
            &s800,
            Objective::Eps,
            &x0,
            &opts(DdpmVariance::FixedLarge, None),
        );
        assert_terms_add_up(&large);
        assert!(large.bpd > fine.bpd, "{} vs {}", large.bpd, fine.bpd);
    }

    #[test]
    fn stratified_estimate_agrees_with_the_full_sum_within_its_error() {
        let x0 = toy_data(128, 16, 2);
        let s = toy_schedule(400);
        let full = bound(&s, Objective::V, &x0, &opts(DdpmVariance::FixedSmall, None));
        for k in [8, 50] {
            let est = bound(
                &s,
                Objective::V,
                &x0,
                &opts(DdpmVariance::FixedSmall, Some(k)),
            );
            assert_eq!(est.estimator, "stratified");
            assert_eq!(est.sampled_timesteps, Some(k));
            assert!(est.per_timestep_bpd.is_none());
            assert_terms_add_up(&est);
            // The prior needs no sampling: it is the same number.
            assert_eq!(est.prior_bpd, full.prior_bpd);
            let (a, b) = (full.bpd_stderr.expect("se"), est.bpd_stderr.expect("se"));
            let tol = 3.0 * (a * a + b * b).sqrt();
            assert!(
                (est.bpd - full.bpd).abs() < tol,
                "K={k}: {} vs {} (tol {tol})",
                est.bpd,
                full.bpd
            );
            // Each quartile of the middle terms is estimated without bias too.
            assert_eq!(est.middle.len(), 4);
            for (e, f) in est.middle.iter().zip(&full.middle) {
                assert_eq!((e.first_t, e.last_t), (f.first_t, f.last_t));
            }
        }
    }

    #[test]
    fn bad_options_are_rejected() {
        let s = Schedule::with_dtype(&ScheduleConfig::linear(10), &Device::Cpu, DType::F64)
            .expect("schedule");
        for k in [0, 10] {
            assert!(BoundEstimator::new(
                &s,
                Objective::Eps,
                &opts(DdpmVariance::FixedSmall, Some(k))
            )
            .is_err());
        }
        assert!(
            BoundEstimator::new(&s, Objective::Eps, &opts(DdpmVariance::FixedSmall, Some(9)))
                .is_ok()
        );
        assert_eq!(split_range(1, 9, 4), vec![(1, 2), (3, 4), (5, 6), (7, 9)]);
        assert_eq!(split_range(1, 2, 4), vec![(1, 1), (2, 2)]);
        assert!(split_range(1, 0, 4).is_empty());
        let est = BoundEstimator::new(&s, Objective::Eps, &opts(DdpmVariance::FixedSmall, None))
            .expect("est");
        assert!(est.finish().is_err());
    }
}
