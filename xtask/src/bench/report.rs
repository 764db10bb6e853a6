//! The Markdown report of a run (`docs/benchmarks.md`): the machine, the parity table, the
//! results table and the prose that says what was measured and how to reproduce it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::probe::{candle_version, cpu_count, cpu_model, ddpm_version, rustc_version, utc_now};
use super::stats::{Measured, Stats};
use super::torch::{Torch, PIP_PACKAGES};
use super::{BenchArgs, Engine, KernelChoice, ParityResult, Plan, DDIM_STEPS};

pub(super) fn render_parity(parities: &[ParityResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| preset | parameters (ours) | parameters (PyTorch) | max relative error | relative L2 error | result |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
    for p in parities {
        let result = if p.ok {
            format!("ok (tolerance {:.0e})", p.tol)
        } else {
            format!("**FAILED**: {}", p.failures.join("; "))
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.1e} | {:.1e} | {} |",
            p.preset, p.params_ours, p.params_torch, p.max_rel_err, p.rel_l2_err, result
        );
    }
    s
}

/// A run's settings and results, to render as Markdown.
pub(super) struct Report<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) threads: usize,
    pub(super) rounds: usize,
    pub(super) plans: &'a [Plan],
    pub(super) engines: &'a [Engine],
    pub(super) results: &'a BTreeMap<(String, Engine), Measured>,
    pub(super) parities: &'a [ParityResult],
    pub(super) torch: &'a Torch,
    pub(super) load_at_start: Option<String>,
    pub(super) elapsed_s: f64,
}

/// A time in ms below 10 s, else in s.
fn fmt_time(s: f64) -> String {
    if s < 10.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

fn fmt_mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0))
}

impl Report<'_> {
    fn get(&self, preset: &str, engine: Engine) -> Option<&Measured> {
        self.results.get(&(preset.to_string(), engine))
    }

    /// The results table: per preset and measurement, each engine's median (spread) and the
    /// ratio of each of our columns to PyTorch's.
    pub(super) fn results_table(&self) -> String {
        let ours: Vec<Engine> = self
            .engines
            .iter()
            .copied()
            .filter(|e| *e != Engine::PyTorch)
            .collect();
        let has_torch = self.engines.contains(&Engine::PyTorch);
        let mut s = String::new();
        let mut header = "| preset | measurement |".to_string();
        let mut rule = "|---|---|".to_string();
        for e in self.engines {
            let _ = write!(header, " {} |", e.label());
            rule.push_str("---:|");
        }
        if has_torch {
            for e in &ours {
                let _ = write!(header, " {} / PyTorch |", e.label());
                rule.push_str("---:|");
            }
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for plan in self.plans {
            type Row<'r> = (String, Box<dyn Fn(&Measured) -> (Option<f64>, String) + 'r>);
            let timed = |values: fn(&Measured) -> &Vec<f64>, batch: usize| {
                move |m: &Measured| match Stats::of(values(m)) {
                    Some(st) => (
                        Some(st.median),
                        format!(
                            "{} ±{:.0}% · {:.1} img/s",
                            fmt_time(st.median),
                            st.spread_pct(),
                            batch as f64 / st.median
                        ),
                    ),
                    None => (None, "n/a".into()),
                }
            };
            let rows: Vec<Row> = vec![
                (
                    format!("training step, batch {}", plan.train_batch),
                    Box::new(timed(|m| &m.train, plan.train_batch)),
                ),
                (
                    format!("sampling step (forward), batch {}", plan.sample_batch),
                    Box::new(timed(|m| &m.sample, plan.sample_batch)),
                ),
                (
                    format!("DDIM sample, {DDIM_STEPS} steps, batch {}", plan.ddim_batch),
                    Box::new(timed(|m| &m.ddim, plan.ddim_batch)),
                ),
                (
                    "peak RSS, training process".into(),
                    Box::new(|m: &Measured| {
                        (m.rss_train_kb.map(|v| v as f64), fmt_mib(m.rss_train_kb))
                    }),
                ),
                (
                    "peak RSS, sampling process".into(),
                    Box::new(|m: &Measured| {
                        (m.rss_sample_kb.map(|v| v as f64), fmt_mib(m.rss_sample_kb))
                    }),
                ),
            ];
            for (i, (name, cell)) in rows.iter().enumerate() {
                let preset = if i == 0 {
                    format!("`{}`", plan.preset)
                } else {
                    String::new()
                };
                let mut line = format!("| {preset} | {name} |");
                let mut values: BTreeMap<Engine, Option<f64>> = BTreeMap::new();
                for &e in self.engines {
                    let (v, text) = match self.get(&plan.preset, e) {
                        Some(m) => cell(m),
                        None => (None, "n/a".into()),
                    };
                    values.insert(e, v);
                    let _ = write!(line, " {text} |");
                }
                if has_torch {
                    for e in &ours {
                        let ratio = match (values.get(e), values.get(&Engine::PyTorch)) {
                            (Some(Some(a)), Some(Some(b))) if *b > 0.0 => format!("{:.2}", a / b),
                            _ => "n/a".into(),
                        };
                        let _ = write!(line, " {ratio} |");
                    }
                }
                let _ = writeln!(s, "{line}");
            }
        }
        s
    }

    fn command_line(&self) -> String {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect();
        format!("cargo xtask {}", args.join(" "))
    }

    pub(super) fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks: ddpm-rs and PyTorch side by side\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench` (xtask/src/bench.rs); do not edit by hand. Every \
             number below comes from one run of the command shown, on the machine described, with \
             our side and PyTorch's measured alternately in the same run. Speed claims about \
             ddpm-rs count only as the ratios in this table.\n"
        );
        if self.args.quick {
            let _ = writeln!(
                s,
                "**This is a `--quick` smoke run** (tiny batches, one repetition): it checks that \
                 the harness works; its numbers are not benchmarks.\n"
            );
        }
        let _ = writeln!(s, "## Machine and run\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| command | `{}` |", self.command_line());
        let _ = writeln!(s, "| date | {} |", utc_now());
        let _ = writeln!(s, "| CPU | {} |", cpu_model());
        let _ = writeln!(
            s,
            "| cores | {} logical CPUs (`/proc/cpuinfo`); available to this process: {} |",
            cpu_count().map_or("unknown".into(), |n| n.to_string()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            s,
            "| threads | {} on both sides (ours: `RAYON_NUM_THREADS`; PyTorch: \
             `torch.set_num_threads`, `OMP_NUM_THREADS`) |",
            self.threads
        );
        if let Some(load) = &self.load_at_start {
            let _ = writeln!(s, "| load average at start | {load} (1 min) |");
        }
        let _ = writeln!(s, "| ddpm-rs | {} |", ddpm_version());
        let _ = writeln!(
            s,
            "| candle | {} (`candle-core` in Cargo.lock); {} |",
            candle_version(),
            rustc_version()
        );
        let kernels = match self.args.kernels {
            KernelChoice::Ours => "ours (the default; `DDPM_KERNELS=candle` selects candle's ops)",
            KernelChoice::Candle => "candle's ops only (`DDPM_KERNELS=candle`)",
            KernelChoice::Both => {
                "ours, and candle's ops (`DDPM_KERNELS=candle`) as a second column"
            }
        };
        let _ = writeln!(
            s,
            "| our kernels | {kernels}; allocator mimalloc, as the `ddpm` binary |"
        );
        let _ = writeln!(
            s,
            "| kernel policy | `{}` (`ddpm_unet::KernelPolicy`; the candle column switches only \
             its backend) |",
            ddpm_unet::KernelPolicy::active()
        );
        match self.torch {
            Torch::Available { version, .. } => {
                let _ = writeln!(
                    s,
                    "| PyTorch | {version}, CPU, float32, default allocator |"
                );
            }
            Torch::Unavailable { reason } => {
                let _ = writeln!(s, "| PyTorch | **unavailable**: {reason} |");
            }
        }
        let _ = writeln!(
            s,
            "| rounds | {} (each round: one process per side and task; sides alternate going \
             first) |",
            self.rounds
        );
        let _ = writeln!(s, "| wall time of the run | {:.0} s |\n", self.elapsed_s);

        if !self.parities.is_empty() {
            let _ = writeln!(s, "## Parity: the PyTorch reference is our model\n");
            let _ = writeln!(
                s,
                "`bench/pytorch/models.py` re-implements both architectures in PyTorch from our \
                 Rust sources, with module names equal to our tensor names. For each preset, \
                 our worker writes the model's weights (seeded init, every vector perturbed so \
                 that GroupNorm affines and biases matter) with `DiffusionModel::save`, and our \
                 output on a fixed input (batch 3, t = 0, 417, 999); `bench/pytorch/parity.py` \
                 loads the weights with `load_state_dict(strict=True)`, compares the parameter \
                 count and the preset's config, and runs the same input. Relative error is \
                 max |ours - PyTorch| / max |ours|. Run it alone with `cargo xtask bench \
                 --parity-only`.\n"
            );
            s.push_str(&render_parity(self.parities));
            s.push('\n');
        }

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "Each cell: median time, ± half the min-to-max range as a percentage of the median, \
             and the throughput at that median; memory is the largest peak resident set size \
             (`VmHWM`) of the processes doing that task. **ours / PyTorch** is the ratio of \
             times (or of memory): above 1 means ddpm-rs is slower (or uses more), below 1 \
             that it is faster (or uses less).\n"
        );
        s.push_str(&self.results_table());
        s.push('\n');

        let _ = writeln!(s, "## What is measured\n");
        let _ = writeln!(
            s,
            "- **training step**: one step of `ddpm train`, the trainer's own: \
             `ddpm_train::Trainer::train_step` on a trainer made by `Trainer::with_dataset` with \
             the preset's model, the batch below and `TrainConfig`'s defaults for the rest, on \
             random images held in memory. The step: the loader's next batch (the u8 cache \
             turned into f32 in [-1, 1], prepared by its prefetch thread), timesteps and \
             Gaussian noise, `q_sample` (linear schedule, T = 1000), eps prediction in training \
             mode (dropout on for the DdpmUnet presets), MSE loss, backward, the global gradient \
             norm, clipping to norm 1 folded into AdamW's in-place update (betas 0.9/0.999, eps \
             1e-8, no weight decay, lr 1e-3 after a 100-step warm-up), then the EMA update of the \
             weights (decay 0.995, warmed up as min(decay, (1 + n) / (10 + n))). PyTorch does \
             the same work per step: a shuffled batch of u8 images from memory converted to \
             floats, the same forward process and loss, `clip_grad_norm_`, `torch.optim.AdamW` \
             and the same EMA update (`torch._foreach_lerp_`). Our trainer also holds the \
             second model that `ddpm train` samples its grids from (no step uses it; it counts \
             in the peak memory).\n\
             - **sampling step**: one forward pass without gradients (evaluation mode).\n\
             - **DDIM sample**: a whole deterministic {DDIM_STEPS}-step DDIM sample (eta 0, x0 \
             clipped) from noise; ours through `ddpm_train::sample`.\n\
             - Inputs are random (training images of random bytes, uniform in [-1, 1]; \
             Gaussian noise to sample from); weights are each side's seeded default init \
             (values do not change the work).\n\
             - Per process: warm-up steps first (not timed), then the timed steps; the DDIM \
             sample runs after the sampling steps in the same process."
        );
        let _ = writeln!(s, "\n| preset | parameters | training: batch, warm-up + timed steps per round | sampling: batch, warm-up + timed steps per round | DDIM: batch, samples per round |");
        let _ = writeln!(s, "|---|---:|---|---|---|");
        for p in self.plans {
            let params = self
                .engines
                .iter()
                .find_map(|e| self.get(&p.preset, *e).and_then(|m| m.params))
                .map_or("n/a".into(), |n| n.to_string());
            let _ = writeln!(
                s,
                "| `{}` | {params} | {}, {} + {} | {}, {} + {} | {}, {} |",
                p.preset,
                p.train_batch,
                p.train_warmup,
                p.train_iters,
                p.sample_batch,
                p.sample_warmup,
                p.sample_iters,
                p.ddim_batch,
                p.ddim_runs
            );
        }
        if let Some(p) = self.plans.iter().find(|p| p.preset == "cifar10") {
            let _ = writeln!(
                s,
                "\n`cifar10` (the paper's 35.7M-parameter model) trains at batch {} and samples \
                 DDIM at batch {} here, smaller than the other presets, to keep the whole run \
                 under 15 minutes on 2 cores.",
                p.train_batch, p.ddim_batch
            );
        }
        let _ = writeln!(s, "\n## Reproduce\n");
        let _ = writeln!(
            s,
            "```sh\n{}\n```\n\nThe first run creates `target/bench-venv` with {} from PyPI \
             (about 5 GB: PyPI's torch wheel brings its CUDA libraries); `--python PATH` uses an \
             existing interpreter instead and `--no-torch` times our side alone. `--quick` is a \
             smoke run of a couple of minutes (report in target/bench/quick.md). `--kernels \
             both` adds a column with candle's own ops (`DDPM_KERNELS=candle`). Raw per-step \
             timings of the last run are in target/bench/last-run.json; with \
             `DDPM_BENCH_PHASES=1` our workers also print where each timed training step's time \
             goes (`Trainer::time_phases`: batch, inputs, forward, backward, clip, AdamW, EMA, \
             each ended by a device synchronization). Run it on an otherwise idle machine: these \
             are wall-clock times, and PyTorch's OpenMP threads slow down by an order of \
             magnitude when another process competes for the cores.\n\n\
             Micro-benchmarks of the hot ops (3x3 conv2d forward and forward + backward, \
             GroupNorm, linear and full attention, one `mnist-small` forward) through \
             `ddpm_unet::ops` and the layers: `cargo bench -p ddpm-unet` (criterion, a few \
             minutes); with `DDPM_KERNELS=candle` they run on candle's ops.",
            self.command_line(),
            PIP_PACKAGES.join(", ")
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Task, WorkerResult};

    fn fake(engine: &str, step_s: f64, rss_kb: u64) -> WorkerResult {
        WorkerResult {
            engine: engine.into(),
            preset: "mnist-small".into(),
            task: "train".into(),
            batch: 32,
            threads: 2,
            params: 714_753,
            times_s: vec![step_s * 0.9, step_s, step_s * 1.1],
            ddim_s: vec![],
            ddim_batch: 64,
            ddim_steps: DDIM_STEPS,
            peak_rss_kb: Some(rss_kb),
            version: String::new(),
            kernels: None,
            device: None,
            precision: None,
            gpu_peak_kb: None,
            gpu_name: None,
        }
    }

    /// The table shows each side's median and the ratio ours / PyTorch of times and memory.
    #[test]
    fn table_has_medians_and_ratios() {
        let args = BenchArgs {
            quick: false,
            threads: None,
            presets: vec![],
            rounds: None,
            kernels: KernelChoice::Ours,
            no_torch: false,
            python: None,
            parity_only: false,
            out: None,
        };
        let plans = vec![Plan::new("mnist-small", false)];
        let engines = vec![Engine::Ours, Engine::PyTorch];
        let mut results = BTreeMap::new();
        let mut ours = Measured::default();
        ours.add(&fake("ours", 1.0, 400 * 1024), Task::Train);
        let mut torch = Measured::default();
        torch.add(&fake("pytorch", 0.5, 800 * 1024), Task::Train);
        results.insert(("mnist-small".to_string(), Engine::Ours), ours);
        results.insert(("mnist-small".to_string(), Engine::PyTorch), torch);
        let torch_state = Torch::Unavailable {
            reason: "test".into(),
        };
        let report = Report {
            args: &args,
            threads: 2,
            rounds: 1,
            plans: &plans,
            engines: &engines,
            results: &results,
            parities: &[],
            torch: &torch_state,
            load_at_start: None,
            elapsed_s: 1.0,
        };
        let table = report.results_table();
        assert!(
            table.contains("| `mnist-small` | training step, batch 32 | 1000 ms ±10% · 32.0 img/s | 500 ms ±10% · 64.0 img/s | 2.00 |"),
            "{table}"
        );
        assert!(table.contains("| peak RSS, training process | 400 MiB | 800 MiB | 0.50 |"));
        assert!(table.contains("| sampling step (forward), batch 64 | n/a | n/a | n/a |"));
        assert!(report.render().contains("**unavailable**: test"));
    }
}
