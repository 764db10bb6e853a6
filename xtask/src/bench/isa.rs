//! `bench --isa avx2`: both sides capped at AVX2 on a CPU that has AVX-512, the nearest this
//! machine comes to a CPU without it.
//!
//! Our side loses AVX-512 in two places: gemm's micro-kernels (every matrix product, candle's
//! included) are compiled in only with the crates' `avx512` feature, so the run uses an xtask
//! built with `--no-default-features` (in `target/avx2`); our own kernels read `DDPM_AVX512=0`.
//! PyTorch's ATen kernels and the C++ that inductor generates follow `ATEN_CPU_CAPABILITY`,
//! oneDNN's convolutions `ONEDNN_MAX_CPU_ISA` and MKL's matrix products
//! `MKL_ENABLE_INSTRUCTIONS`; inductor gets a cache of its own (`target/bench/inductor-avx2`),
//! because its cache does not tell code compiled for AVX-512 from code for AVX2 (a compiled
//! training step from the shared cache crashed). The same core still runs both, so its caches, clock and the width
//! of its vector units are those of the AVX-512 CPU: the ratios approximate, and do not replace,
//! a run on an AVX2 CPU.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::ValueEnum;

use super::{target_dir, workspace_root};

/// The instruction sets a run's two sides may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Isa {
    /// Everything the CPU has.
    Native,
    /// At most AVX2 (and FMA) on both sides.
    Avx2,
}

/// The environment of a run capped at AVX2: ours, then PyTorch's.
const AVX2_ENV: &[(&str, &str)] = &[
    ("DDPM_AVX512", "0"),
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
    ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
];

/// inductor's cache directory (default: one per user under /tmp).
const INDUCTOR_CACHE: &str = "TORCHINDUCTOR_CACHE_DIR";

/// What the PyTorch side reports as its CPU capability when capped (`bench.py`'s version line).
pub(super) const TORCH_AVX2_CAPABILITY: &str = "CPU capability AVX2";

/// Whether this process runs capped at AVX2: built without the `avx512` feature and started
/// with every variable of [`AVX2_ENV`].
pub(super) fn running_capped() -> bool {
    !cfg!(feature = "avx512")
        && AVX2_ENV
            .iter()
            .all(|(k, v)| std::env::var(k).is_ok_and(|x| x == *v))
}

/// Runs this same command capped at AVX2: with an xtask built without AVX-512 matrix kernels
/// (built here first when this one has them) and the capping variables set from the start, so
/// that the run's kernel policy, workers and PyTorch processes all see them.
pub(super) fn rerun_capped() -> anyhow::Result<()> {
    let exe = if cfg!(feature = "avx512") {
        build_without_avx512()?
    } else {
        std::env::current_exe().context("finding the xtask executable")?
    };
    eprintln!("bench: running capped at AVX2 with {}", exe.display());
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1))
        .envs(AVX2_ENV.iter().copied());
    if std::env::var_os(INDUCTOR_CACHE).is_none() {
        cmd.env(INDUCTOR_CACHE, target_dir().join("bench/inductor-avx2"));
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", exe.display()))?;
    if !status.success() {
        bail!("the run capped at AVX2 failed ({status})");
    }
    Ok(())
}

/// Builds xtask with `--no-default-features` in `target/avx2` and returns its path.
fn build_without_avx512() -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("avx2");
    eprintln!(
        "bench: building xtask without AVX-512 matrix kernels (--no-default-features) in {}",
        dir.display()
    );
    let status = crate::cargo()
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--package",
            "xtask",
            "--no-default-features",
        ])
        .arg("--target-dir")
        .arg(&dir)
        .status()
        .context("starting cargo")?;
    if !status.success() {
        bail!("building xtask without AVX-512 kernels failed ({status})");
    }
    Ok(dir.join("release/xtask"))
}

/// The report's line on instruction sets.
pub(super) fn describe(isa: Isa) -> String {
    match isa {
        Isa::Native => "everything the CPU has, on both sides (`--isa native`)".into(),
        Isa::Avx2 => {
            let vars: Vec<String> = AVX2_ENV.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
            format!(
                "**capped at AVX2 on both sides** (`--isa avx2`): ours built without gemm's \
                 AVX-512 kernels (`--no-default-features`), and {}. The same CPU runs both, so \
                 this approximates, and does not replace, a CPU without AVX-512",
                vars.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every capping variable is named in the report, and ours comes with the build's feature.
    #[test]
    fn avx2_report_names_every_variable() {
        let text = describe(Isa::Avx2);
        for (k, v) in AVX2_ENV {
            assert!(
                text.contains(&format!("`{k}={v}`")),
                "{k} missing from: {text}"
            );
        }
        assert!(text.contains("--no-default-features"));
        // A test binary is never started with the variables, so it does not count as capped.
        if std::env::var_os("ATEN_CPU_CAPABILITY").is_none() {
            assert!(!running_capped());
        }
    }
}
