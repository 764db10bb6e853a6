//! The Markdown report of a run (`docs/benchmarks.md`): the machine, the parity table, the
//! results table and the prose that says what was measured and how to reproduce it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ddpm_unet::{flops, ModelConfig};

use super::probe::{candle_version, cpu_count, cpu_model, ddpm_version, rustc_version, utc_now};
use super::stats::{Measured, Stats};
use super::torch::{Torch, PIP_PACKAGES};
use super::{BenchArgs, Engine, KernelChoice, ParityResult, PeakResult, Plan, DDIM_STEPS};

pub(super) fn render_parity(parities: &[ParityResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| preset | parameters (ours) | parameters (PyTorch) | max relative error | relative L2 error | GFLOP per image forward (ours / PyTorch's counter) | result |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    for p in parities {
        let result = if p.ok {
            format!("ok (tolerance {:.0e})", p.tol)
        } else {
            format!("**FAILED**: {}", cell_text(&p.failures.join("; ")))
        };
        let flops = |f: Option<u64>| f.map_or("n/a".into(), |f| format!("{:.4}", f as f64 / 1e9));
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.1e} | {:.1e} | {} / {} | {} |",
            p.preset,
            p.params_ours,
            p.params_torch,
            p.max_rel_err,
            p.rel_l2_err,
            flops(p.flops_ours),
            flops(p.flops_torch),
            result
        );
    }
    s
}

/// Text that is safe inside a Markdown table cell (one line, no `|`), at most 120 characters.
fn cell_text(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").replace('|', "/");
    match line.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line,
    }
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
    pub(super) peaks: &'a [PeakResult],
    pub(super) torch: &'a Torch,
    pub(super) load_at_start: Option<String>,
    pub(super) elapsed_s: f64,
}

/// A time in ms below 10 s, else in s.
fn fmt_time(s: f64) -> String {
    if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 10.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

fn fmt_mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0))
}

/// A rate in GFLOP/s, or TFLOP/s from 1000 GFLOP/s up (tidy: not a timing).
fn fmt_rate(flops_per_s: f64) -> String {
    if flops_per_s >= 1e12 {
        format!("{:.1} TFLOP/s", flops_per_s / 1e12)
    } else {
        format!("{:.1} GFLOP/s", flops_per_s / 1e9)
    }
}

/// One phase of a preset: its name, its FLOPs and where its times are.
struct Phase {
    name: String,
    flops: f64,
    times: fn(&Measured) -> &Vec<f64>,
    error: fn(&Measured) -> &Option<String>,
}

impl Report<'_> {
    fn get(&self, preset: &str, engine: Engine) -> Option<&Measured> {
        self.results.get(&(preset.to_string(), engine))
    }

    /// The dtype whose peak a run's steps are measured against: `f32`, or `bf16` for half
    /// precision.
    fn peak_dtype(&self) -> &'static str {
        if self.args.precision == "f32" {
            "f32"
        } else {
            "bf16"
        }
    }

    /// The machine's peak for this run's precision: the higher of the two sides' measurements.
    pub(super) fn peak(&self) -> Option<f64> {
        self.peaks
            .iter()
            .filter_map(|p| p.rates.get(self.peak_dtype()).copied())
            .max_by(f64::total_cmp)
    }

    fn phases(&self, plan: &Plan) -> Vec<Phase> {
        let forward = ModelConfig::preset(&plan.preset)
            .map(|c| flops::forward_flops(&c))
            .unwrap_or_default();
        vec![
            Phase {
                name: format!("train step, batch {}", plan.train_batch),
                flops: forward.training_step(plan.train_batch),
                times: |m| &m.train,
                error: |m| &m.error_train,
            },
            Phase {
                name: format!("DDPM sampling step, batch {}", plan.sample_batch),
                flops: forward.batch(plan.sample_batch),
                times: |m| &m.sample,
                error: |m| &m.error_sample,
            },
            Phase {
                name: format!("DDIM-{DDIM_STEPS} sample, batch {}", plan.ddim_batch),
                flops: DDIM_STEPS as f64 * forward.batch(plan.ddim_batch),
                times: |m| &m.ddim,
                error: |m| &m.error_sample,
            },
        ]
    }

    /// PyTorch's engines of this run, the best mode first (the headline ratio).
    fn torch_engines(&self) -> Vec<Engine> {
        let mut t: Vec<Engine> = self
            .engines
            .iter()
            .copied()
            .filter(|e| !e.is_ours())
            .collect();
        t.sort_by_key(|e| std::cmp::Reverse(*e));
        t
    }

    /// The results table: per preset and phase, the FLOPs of the step, each engine's median
    /// time (spread), the ratios of each of our columns to each PyTorch mode (best first), and
    /// each engine's FLOP/s with its fraction of the machine's peak.
    pub(super) fn results_table(&self) -> String {
        let ours: Vec<Engine> = self
            .engines
            .iter()
            .copied()
            .filter(|e| e.is_ours())
            .collect();
        let torch = self.torch_engines();
        let peak = self.peak();
        let short = |e: Engine| e.label().trim_start_matches("PyTorch ").to_string();
        let mut s = String::new();
        let mut header = "| preset | phase | GFLOP per step |".to_string();
        let mut rule = "|---|---|---:|".to_string();
        for e in self.engines {
            let _ = write!(header, " {} |", e.label());
            rule.push_str("---:|");
        }
        for o in &ours {
            for t in &torch {
                let bold = *t == torch[0];
                let name = format!("{} ÷ {}", o.label(), short(*t));
                let _ = write!(
                    header,
                    " {} |",
                    if bold { format!("**{name}**") } else { name }
                );
                rule.push_str("---:|");
            }
        }
        for e in self.engines {
            let _ = write!(header, " {} FLOP/s (of peak) |", e.label());
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for plan in self.plans {
            for (i, phase) in self.phases(plan).iter().enumerate() {
                let preset = if i == 0 {
                    format!("`{}`", plan.preset)
                } else {
                    String::new()
                };
                let mut line = format!("| {preset} | {} | {:.1} |", phase.name, phase.flops / 1e9);
                let mut medians: BTreeMap<Engine, f64> = BTreeMap::new();
                for &e in self.engines {
                    let m = self.get(&plan.preset, e);
                    let stats = m.and_then(|m| Stats::of((phase.times)(m)));
                    let text = match (stats, m.and_then(|m| (phase.error)(m).as_deref())) {
                        (Some(st), _) => {
                            medians.insert(e, st.median);
                            format!("{} ±{:.0}%", fmt_time(st.median), st.spread_pct())
                        }
                        (None, Some(err)) => format!("failed: {}", cell_text(err)),
                        (None, None) => "n/a".into(),
                    };
                    let _ = write!(line, " {text} |");
                }
                for o in &ours {
                    for t in &torch {
                        let ratio = match (medians.get(o), medians.get(t)) {
                            (Some(a), Some(b)) if *b > 0.0 => format!("{:.2}", a / b),
                            _ => "n/a".into(),
                        };
                        let _ = write!(line, " {ratio} |");
                    }
                }
                for e in self.engines {
                    let text = match medians.get(e) {
                        Some(t) if *t > 0.0 && phase.flops > 0.0 => {
                            let rate = phase.flops / t;
                            match peak {
                                Some(p) if p > 0.0 => {
                                    format!("{} ({:.0}%)", fmt_rate(rate), 100.0 * rate / p)
                                }
                                _ => fmt_rate(rate),
                            }
                        }
                        _ => "n/a".into(),
                    };
                    let _ = write!(line, " {text} |");
                }
                let _ = writeln!(s, "{line}");
            }
        }
        s
    }

    /// The peak table: each side's matrix-multiply rate per dtype.
    fn peak_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| measured by | matrix side | dtype | rate |\n|---|---:|---|---:|"
        );
        for p in self.peaks {
            for (dtype, rate) in &p.rates {
                let who = if p.engine == "ours" {
                    format!("ours: candle's matmul ({})", p.version)
                } else {
                    format!("PyTorch: torch.matmul ({})", p.version)
                };
                let _ = writeln!(s, "| {who} | {} | {dtype} | {} |", p.size, fmt_rate(*rate));
            }
        }
        s
    }

    /// The compile-time table of PyTorch's compiled modes: seconds per process (min to max) and
    /// failures.
    fn compile_table(&self) -> Option<String> {
        let compiled: Vec<Engine> = self
            .torch_engines()
            .into_iter()
            .filter(|e| *e != Engine::PyTorch)
            .collect();
        if compiled.is_empty() {
            return None;
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| preset | PyTorch mode | torch.compile mode | compile, training process | compile, sampling process |\n|---|---|---|---:|---:|"
        );
        for plan in self.plans {
            for &e in &compiled {
                let Some(m) = self.get(&plan.preset, e) else {
                    continue;
                };
                let cell = |v: &[f64], err: &Option<String>| match (Stats::of(v), err) {
                    (_, Some(err)) => format!("failed: {}", cell_text(err)),
                    (Some(st), None) if st.max - st.min > 0.05 * st.max => {
                        format!("{:.1} s ({:.1}-{:.1} s)", st.median, st.min, st.max)
                    }
                    (Some(st), None) => format!("{:.1} s", st.median),
                    (None, None) => "n/a".into(),
                };
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {} | {} | {} |",
                    plan.preset,
                    e.label(),
                    m.compile_mode.as_deref().unwrap_or("n/a"),
                    cell(&m.compile_train, &m.error_train),
                    cell(&m.compile_sample, &m.error_sample)
                );
            }
        }
        Some(s)
    }

    /// Peak memory per preset and engine.
    fn memory_table(&self) -> String {
        let mut s = String::new();
        let gpu = self.args.device.starts_with("cuda");
        let _ = writeln!(
            s,
            "| preset | engine | peak RSS, training process | peak RSS, sampling process |{}\n|---|---|---:|---:|{}",
            if gpu { " peak GPU memory (PyTorch's allocator) |" } else { "" },
            if gpu { "---:|" } else { "" }
        );
        for plan in self.plans {
            for &e in self.engines {
                let Some(m) = self.get(&plan.preset, e) else {
                    continue;
                };
                let mut line = format!(
                    "| `{}` | {} | {} | {} |",
                    plan.preset,
                    e.label(),
                    fmt_mib(m.rss_train_kb),
                    fmt_mib(m.rss_sample_kb)
                );
                if gpu {
                    let _ = write!(line, " {} |", fmt_mib(m.gpu_peak_kb));
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
        let gpu = self.args.device.starts_with("cuda");
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks: ddpm-rs and PyTorch side by side\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench` (xtask/src/bench.rs); do not edit by hand. Every \
             number below comes from one run of the command shown, on the machine described, with \
             our side and PyTorch's (eager, and its best mode) measured alternately in the same \
             run. Speed claims about ddpm-rs count only as the ratios in this table; the headline \
             is ours against PyTorch's best mode.\n"
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
        if !gpu {
            let _ = writeln!(
                s,
                "| instruction sets | {} |",
                super::isa::describe(self.args.isa)
            );
        }
        let _ = writeln!(
            s,
            "| cores | {} logical CPUs (`/proc/cpuinfo`); available to this process: {} |",
            cpu_count().map_or("unknown".into(), |n| n.to_string()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        if gpu {
            let name = self
                .gpu_name()
                .unwrap_or_else(|| "unknown (PyTorch did not run)".into());
            let _ = writeln!(s, "| GPU | {name} (`{}`) |", self.args.device);
        }
        let _ = writeln!(s, "| precision | {} on both sides |", self.args.precision);
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
            "| our kernels | {kernels}; allocator mimalloc and candle's idle threads parked \
             (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0` unless set), as the `ddpm` binary |"
        );
        let _ = writeln!(
            s,
            "| kernel policy | `{}` (`ddpm_unet::KernelPolicy`; the candle column switches only \
             its backend) |",
            ddpm_unet::KernelPolicy::active()
        );
        match self.torch {
            Torch::Available { version, .. } => {
                let modes: Vec<&str> = self
                    .engines
                    .iter()
                    .filter(|e| !e.is_ours())
                    .map(|e| e.label())
                    .collect();
                let _ = writeln!(
                    s,
                    "| PyTorch | {version}; {}: {} |",
                    self.args.device,
                    modes.join(", ")
                );
            }
            Torch::Unavailable { reason } => {
                let _ = writeln!(s, "| PyTorch | **unavailable**: {reason} |");
            }
        }
        if let Some(p) = self.peak() {
            let _ = writeln!(
                s,
                "| peak ({}) | {} (the higher of the two sides' matmul rates, below) |",
                self.peak_dtype(),
                fmt_rate(p)
            );
        }
        let _ = writeln!(
            s,
            "| rounds | {} (each round: one process per engine and task; the order reverses \
             every round) |",
            self.rounds
        );
        let _ = writeln!(s, "| wall time of the run | {:.0} s |\n", self.elapsed_s);

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "Each time cell: the median over all timed steps of all rounds, ± half the \
             min-to-max range as a percentage of the median. **ours ÷ best** is the headline: \
             our time over PyTorch's best mode's (below 1: ddpm-rs is faster); ours ÷ eager \
             compares with plain PyTorch. GFLOP per step and FLOP/s count the convolutions and \
             matrix products of the model (`ddpm_unet::flops`; a training step is 3 forward \
             passes, a DDIM sample {DDIM_STEPS}); the percentage is of the machine's peak, the \
             matrix-multiply rate measured in this run (section Peak). A cell that says \
             failed names why (a compile error's first line, a timeout); the other modes of \
             that row still count.\n"
        );
        s.push_str(&self.results_table());
        s.push('\n');

        let _ = writeln!(s, "## Peak\n");
        let _ = writeln!(
            s,
            "The machine's matrix-multiply rate, measured on both sides at the start and at \
             the end of the run, each side's higher rate kept (a rate measured while another \
             process shared the cores would inflate every fraction): the best of 5 products of \
             two square matrices (f32 without TF32; bf16 too on CUDA), 2 n^3 FLOPs each. The \
             higher rate of the run's precision is the peak the fractions above are of.\n"
        );
        s.push_str(&self.peak_table());
        s.push('\n');

        if let Some(table) = self.compile_table() {
            let _ = writeln!(s, "## Compile time\n");
            let _ = writeln!(
                s,
                "Seconds a PyTorch process spent compiling (`torch.compile`, inductor): the \
                 untimed warm-up steps' time beyond as many steady steps, plus, for sampling, \
                 the first call at the DDIM batch size when it differs; the median over the \
                 processes of the run, with the range where it varies. Inductor caches \
                 compiled code on disk, so later processes of a run compile faster than the \
                 first. Compile time is not part of any step time above.\n"
            );
            s.push_str(&table);
            s.push('\n');
        }

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
                 count and the preset's config, runs the same input, and counts the FLOPs of \
                 one image's forward pass with `torch.utils.flop_counter.FlopCounterMode` \
                 against ours (`ddpm_unet::flops`, within 0.1%). Relative error is \
                 max |ours - PyTorch| / max |ours|. Run it alone with `cargo xtask bench \
                 --parity-only`.\n"
            );
            s.push_str(&render_parity(self.parities));
            s.push('\n');
        }

        let _ = writeln!(s, "## Memory\n");
        let _ = writeln!(
            s,
            "The largest peak resident set size (`VmHWM`) of the processes doing each task{}.\n",
            if gpu {
                "; on CUDA also PyTorch's peak allocated GPU memory"
            } else {
                ""
            }
        );
        s.push_str(&self.memory_table());
        s.push('\n');

        let _ = writeln!(s, "## What is measured\n");
        let _ = writeln!(
            s,
            "- **train step**: one step of `ddpm train`, the trainer's own: \
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
             - **DDPM sampling step**: one forward pass without gradients (evaluation mode), \
             the work of one step of ancestral sampling.\n\
             - **DDIM-{DDIM_STEPS} sample**: a whole deterministic {DDIM_STEPS}-step DDIM sample \
             (eta 0, x0 clipped) from noise; ours through `ddpm_train::sample`.\n\
             - **PyTorch's modes** (`bench/pytorch/bench.py --mode`): *eager* is plain PyTorch; \
             *best* is what a performance-minded user turns on: `torch.compile` (inductor, \
             static shapes; `mode=\"max-autotune\"` on CUDA, inductor's default mode on the \
             CPU, `--compile-mode` overrides), the model and its inputs in `channels_last`, \
             `AdamW(fused=True)`, and on CUDA `torch.backends.cudnn.benchmark = True` and TF32 \
             for f32 matmuls and convolutions; *compile* (`--torch-mode compile`) is \
             `torch.compile` alone. Compilation happens in the untimed warm-up and is reported \
             in Compile time, never in a step time.\n\
             - **FLOPs** (`ddpm_unet::flops::forward_flops`): 2 per multiply-add of every \
             convolution (attention's 1x1 projections included), linear layer and product \
             inside attention (q^T k and the weighted sum for full attention, k v^T and its \
             product with q for linear attention); not normalizations, activations, softmax, \
             residual adds, resampling or the optimizer, which are linear in the activations. \
             A training step counts as 3 forward passes (forward, then the input and the \
             weight gradient of every product in the backward pass). PyTorch's \
             `FlopCounterMode` counts the same forward pass to within 0.1% (Parity).\n\
             - Inputs are random (training images of random bytes; Gaussian noise to sample \
             from); weights are each side's seeded default init (values do not change the \
             work).\n\
             - Per process: warm-up steps first (not timed), then the timed steps; the DDIM \
             sample runs after the sampling steps in the same process."
        );
        let _ = writeln!(s, "\n| preset | parameters | GFLOP per image forward | training: batch, warm-up + timed steps per round | sampling: batch, warm-up + timed steps per round | DDIM: batch, samples per round |");
        let _ = writeln!(s, "|---|---:|---:|---|---|---|");
        for p in self.plans {
            let params = self
                .engines
                .iter()
                .find_map(|e| self.get(&p.preset, *e).and_then(|m| m.params))
                .map_or("n/a".into(), |n| n.to_string());
            let gflop = ModelConfig::preset(&p.preset)
                .map(|c| format!("{:.3}", flops::forward_flops(&c).total() as f64 / 1e9))
                .unwrap_or_else(|_| "n/a".into());
            let _ = writeln!(
                s,
                "| `{}` | {params} | {gflop} | {}, {} + {} | {}, {} + {} | {}, {} |",
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
        if !gpu {
            if let Some(p) = self.plans.iter().find(|p| p.preset == "cifar10") {
                let _ = writeln!(
                    s,
                    "\n`cifar10` (the paper's 35.7M-parameter model) and `learnopencv` train at \
                     batch {} and sample DDIM at batch {} here, smaller than the other presets, \
                     to keep the run's length reasonable on a few cores.",
                    p.train_batch, p.ddim_batch
                );
            }
        }
        let _ = writeln!(s, "\n## Reproduce\n");
        let _ = writeln!(
            s,
            "```sh\n{}\n```\n\nThe first run creates `target/bench-venv` with {} from PyPI \
             (about 5 GB: PyPI's torch wheel brings its CUDA libraries); `--python PATH` uses an \
             existing interpreter instead and `--no-torch` times our side alone. \
             `--torch-mode eager|compile|best|all` picks PyTorch's modes (all: eager and best); \
             `--out PATH` writes this report elsewhere; `--worker-timeout SECONDS` bounds each \
             process (a compile that does not finish becomes a failed cell). `--quick` is a \
             smoke run (report in target/bench/quick.md). `--kernels both` adds a column with \
             candle's own ops (`DDPM_KERNELS=candle`). On a GPU machine: `--device cuda \
             --precision bf16` (presets `cifar10` and `celebahq-256` by default; \
             `bench/gpu/run-on-gpu.sh` runs it from prebuilt binaries). Raw per-step timings of \
             the last run are in target/bench/last-run.json; with `DDPM_BENCH_PHASES=1` our \
             workers also print where each timed training step's time goes \
             (`Trainer::time_phases`). Run it on an otherwise idle machine: these are \
             wall-clock times, and PyTorch's OpenMP threads slow down by an order of magnitude \
             when another process competes for the cores.\n\n\
             Micro-benchmarks of the hot ops (3x3 conv2d forward and forward + backward, \
             GroupNorm, linear and full attention, one `mnist-small` forward) through \
             `ddpm_unet::ops` and the layers: `cargo bench -p ddpm-unet` (criterion, a few \
             minutes); with `DDPM_KERNELS=candle` they run on candle's ops.",
            self.command_line(),
            PIP_PACKAGES.join(", ")
        );
        s
    }

    /// The GPU's name, as PyTorch's processes reported it.
    fn gpu_name(&self) -> Option<String> {
        self.results.values().find_map(|m| m.gpu_name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Task, TorchMode, WorkerResult};

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
            mode: None,
            compile_mode: None,
            compile_s: None,
            error: None,
        }
    }

    fn args() -> BenchArgs {
        BenchArgs {
            quick: false,
            threads: None,
            presets: vec![],
            rounds: None,
            kernels: KernelChoice::Ours,
            no_torch: false,
            python: None,
            parity_only: false,
            out: None,
            torch_mode: TorchMode::All,
            compile_mode: None,
            device: "cpu".into(),
            precision: "f32".into(),
            worker_timeout: None,
            isa: crate::bench::Isa::Native,
        }
    }

    /// The table shows each engine's median, ours ÷ best first (in bold) and ours ÷ eager, the
    /// FLOPs of the step and each engine's FLOP/s with its fraction of the measured peak; a
    /// failed compile shows its error in its cell and the other columns stay.
    #[test]
    fn table_has_medians_ratios_and_fractions_of_peak() {
        let args = args();
        let plans = vec![Plan::new("mnist-small", false, false)];
        let engines = vec![Engine::Ours, Engine::PyTorch, Engine::TorchBest];
        let mut results = BTreeMap::new();
        let mut ours = Measured::default();
        ours.add(&fake("ours", 1.0, 400 * 1024), Task::Train);
        let mut eager = Measured::default();
        eager.add(&fake("pytorch", 0.5, 800 * 1024), Task::Train);
        let mut best = Measured::default();
        let mut b = fake("pytorch", 0.25, 900 * 1024);
        b.compile_s = Some(12.0);
        b.compile_mode = Some("default".into());
        best.add(&b, Task::Train);
        let mut failed = fake("pytorch", 0.0, 0);
        failed.times_s.clear();
        failed.error = Some("BackendCompilerFailed: no | compiler\nsecond line".into());
        best.add(&failed, Task::Sample);
        results.insert(("mnist-small".to_string(), Engine::Ours), ours);
        results.insert(("mnist-small".to_string(), Engine::PyTorch), eager);
        results.insert(("mnist-small".to_string(), Engine::TorchBest), best);
        let peaks = vec![PeakResult {
            engine: "ours".into(),
            size: 64,
            rates: BTreeMap::from([("f32".to_string(), 10e9)]),
            version: String::new(),
        }];
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
            peaks: &peaks,
            torch: &torch_state,
            load_at_start: None,
            elapsed_s: 1.0,
        };
        let table = report.results_table();
        assert!(
            table.starts_with(
                "| preset | phase | GFLOP per step | ours | PyTorch eager | PyTorch best | \
                 **ours ÷ best** | ours ÷ eager | ours FLOP/s (of peak) |"
            ),
            "{table}"
        );
        // 3 forward passes of 32 images of 0.2085 GFLOP: 20.0 GFLOP per training step.
        let f = flops::forward_flops(&ModelConfig::preset("mnist-small").unwrap());
        let step = f.training_step(32) / 1e9;
        let row = format!(
            "| `mnist-small` | train step, batch 32 | {step:.1} | 1000 ms ±10% | 500 ms ±10% | \
             250 ms ±10% | 4.00 | 2.00 | {:.1} GFLOP/s ({:.0}%) |",
            step,
            step * 10.0
        );
        assert!(table.contains(&row), "{row}\n{table}");
        assert!(
            table.contains("| DDPM sampling step, batch 64 |")
                && table.contains("| failed: BackendCompilerFailed: no / compiler |"),
            "{table}"
        );
        let md = report.render();
        assert!(md.contains("**unavailable**: test"));
        assert!(
            md.contains("| `mnist-small` | PyTorch best | default | 12.0 s | failed:"),
            "{md}"
        );
        assert!(md.contains("| peak (f32) | 10.0 GFLOP/s"), "{md}");
    }
}
