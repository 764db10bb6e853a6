//! `ddpm schedule`: print a noise schedule and its derived buffers.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig};

/// Arguments of `ddpm schedule`.
#[derive(Args)]
pub struct ScheduleArgs {
    /// linear, scaled-linear, cosine, quadratic or sigmoid.
    #[arg(long, default_value = "linear")]
    kind: String,
    /// Number of diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Output format: csv or table.
    #[arg(long, default_value = "table")]
    format: String,
}

pub fn run(a: ScheduleArgs) -> Result<()> {
    let beta_schedule: BetaSchedule = crate::beta_schedule(&a.kind)?;
    let cfg = ScheduleConfig {
        timesteps: a.timesteps,
        beta_schedule,
    };
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let s =
        Schedule::with_dtype(&cfg, &Device::Cpu, DType::F64).context("building the schedule")?;
    let cols: Vec<(&str, &[f64])> = vec![
        ("beta", s.betas().values()),
        ("alpha", s.alphas().values()),
        ("alphas_cumprod", s.alphas_cumprod().values()),
        ("alphas_cumprod_prev", s.alphas_cumprod_prev().values()),
        ("sqrt_alphas_cumprod", s.sqrt_alphas_cumprod().values()),
        (
            "sqrt_one_minus_alphas_cumprod",
            s.sqrt_one_minus_alphas_cumprod().values(),
        ),
        (
            "log_one_minus_alphas_cumprod",
            s.log_one_minus_alphas_cumprod().values(),
        ),
        (
            "sqrt_recip_alphas_cumprod",
            s.sqrt_recip_alphas_cumprod().values(),
        ),
        (
            "sqrt_recipm1_alphas_cumprod",
            s.sqrt_recipm1_alphas_cumprod().values(),
        ),
        ("posterior_variance", s.posterior_variance().values()),
        (
            "posterior_log_variance_clipped",
            s.posterior_log_variance_clipped().values(),
        ),
        ("posterior_mean_coef1", s.posterior_mean_coef1().values()),
        ("posterior_mean_coef2", s.posterior_mean_coef2().values()),
        ("snr", s.snr().values()),
    ];
    let mut out = String::new();
    match a.format.as_str() {
        "csv" => {
            out.push('t');
            for (name, _) in &cols {
                out.push(',');
                out.push_str(name);
            }
            out.push('\n');
            for t in 0..cfg.timesteps {
                out.push_str(&t.to_string());
                for (_, v) in &cols {
                    out.push_str(&format!(",{:e}", v[t]));
                }
                out.push('\n');
            }
        }
        "table" => {
            let w = 14;
            out.push_str(&format!("{:>5}", "t"));
            for (name, _) in &cols {
                let short: String = name.chars().take(w - 1).collect();
                out.push_str(&format!(" {short:>w$}"));
            }
            out.push('\n');
            for t in 0..cfg.timesteps {
                out.push_str(&format!("{t:>5}"));
                for (_, v) in &cols {
                    out.push_str(&format!(" {:>w$.6e}", v[t]));
                }
                out.push('\n');
            }
        }
        other => anyhow::bail!("unknown format `{other}`: choose csv or table"),
    }
    // A closed pipe (`ddpm schedule | head`) is a normal end, not an error or a panic.
    use std::io::Write;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the schedule")
        }
        _ => Ok(()),
    }
}
