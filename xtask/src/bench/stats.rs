//! The statistics of the timings: median and spread, and what one preset and engine measured
//! over all rounds.

use super::{Task, WorkerResult};

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Stats {
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Half the min-to-max range, relative to the median, in percent.
    pub(crate) fn spread_pct(&self) -> f64 {
        if self.median > 0.0 {
            50.0 * (self.max - self.min) / self.median
        } else {
            0.0
        }
    }
}

/// Everything measured for one preset on one engine.
#[derive(Debug, Default, Clone)]
pub(super) struct Measured {
    pub(super) train: Vec<f64>,
    pub(super) sample: Vec<f64>,
    pub(super) ddim: Vec<f64>,
    pub(super) rss_train_kb: Option<u64>,
    pub(super) rss_sample_kb: Option<u64>,
    pub(super) params: Option<usize>,
    pub(super) version: Option<String>,
    pub(super) threads: Option<usize>,
    /// Seconds of compiling per process (PyTorch's compiled modes), training and sampling.
    pub(super) compile_train: Vec<f64>,
    pub(super) compile_sample: Vec<f64>,
    /// Why a process gave no times (compile errors, timeouts), training and sampling.
    pub(super) error_train: Option<String>,
    pub(super) error_sample: Option<String>,
    /// torch.compile's mode, where compiled.
    pub(super) compile_mode: Option<String>,
    /// Peak GPU memory of the processes (PyTorch's allocator), in KiB.
    pub(super) gpu_peak_kb: Option<u64>,
    /// The GPU's name, as PyTorch reported it.
    pub(super) gpu_name: Option<String>,
}

impl Measured {
    pub(super) fn add(&mut self, r: &WorkerResult, task: Task) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if r.compile_mode.is_some() {
            self.compile_mode.clone_from(&r.compile_mode);
        }
        self.gpu_peak_kb = max(self.gpu_peak_kb, r.gpu_peak_kb);
        if r.gpu_name.is_some() {
            self.gpu_name.clone_from(&r.gpu_name);
        }
        let (compile, error) = match task {
            Task::Train => {
                self.train.extend(&r.times_s);
                self.rss_train_kb = max(self.rss_train_kb, r.peak_rss_kb);
                (&mut self.compile_train, &mut self.error_train)
            }
            Task::Sample => {
                self.sample.extend(&r.times_s);
                self.ddim.extend(&r.ddim_s);
                self.rss_sample_kb = max(self.rss_sample_kb, r.peak_rss_kb);
                (&mut self.compile_sample, &mut self.error_sample)
            }
        };
        compile.extend(r.compile_s);
        if r.error.is_some() {
            error.clone_from(&r.error);
            // A failed process reports no model: keep what the others said.
            return;
        }
        self.params = Some(r.params);
        self.version = Some(r.version.clone());
        self.threads = Some(r.threads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_spread() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 10.0));
        assert!((s.spread_pct() - 180.0).abs() < 1e-9);
        assert!(Stats::of(&[]).is_none());
    }
}
