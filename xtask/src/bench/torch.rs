//! The PyTorch side: the virtual environment in `target/bench-venv` (created with pip when
//! missing, checked on every run) and the command lines of `bench/pytorch/*.py`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use super::{target_dir, workspace_root, BenchArgs};

/// The Python packages of the PyTorch side.
pub(super) const PIP_PACKAGES: &[&str] = &["torch", "safetensors", "numpy"];
/// Written into the virtual environment only once every package imports.
const VENV_READY_MARKER: &str = ".ddpm-bench-ready";

/// Where PyTorch comes from in this run.
pub(super) enum Torch {
    Available { python: PathBuf, version: String },
    Unavailable { reason: String },
}

/// Checks that `python` imports every package; returns "torch X, Python Y".
pub(crate) fn check_python(python: &Path) -> anyhow::Result<String> {
    let out = Command::new(python)
        .args([
            "-c",
            "import platform, numpy, safetensors, torch; \
             print(f'torch {torch.__version__}, Python {platform.python_version()}')",
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import torch, safetensors and numpy: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Creates `venv` with the packages from PyPI; on any failure removes it again, so that a broken
/// environment is never taken for a good one. The marker file is written last.
fn install_venv(venv: &Path) -> anyhow::Result<String> {
    eprintln!(
        "bench: creating {} with {} from PyPI (about 5 GB, several minutes; done once)",
        venv.display(),
        PIP_PACKAGES.join(", ")
    );
    let result = (|| -> anyhow::Result<String> {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .context("running `python3 -m venv` (is Python 3 installed?)")?;
        if !status.success() {
            bail!("`python3 -m venv {}` failed ({status})", venv.display());
        }
        let python = venv.join("bin/python");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
            ])
            .args(PIP_PACKAGES)
            .stdout(Stdio::inherit())
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("`pip install {}` failed ({status})", PIP_PACKAGES.join(" "));
        }
        let version = check_python(&python)?;
        std::fs::write(venv.join(VENV_READY_MARKER), format!("{version}\n"))
            .context("writing the ready marker")?;
        Ok(version)
    })();
    if result.is_err() && venv.exists() {
        let _ = std::fs::remove_dir_all(venv);
    }
    result
}

/// Finds or creates the Python of the PyTorch side; never tries to install more than once.
pub(super) fn setup_torch(args: &BenchArgs) -> anyhow::Result<Torch> {
    if args.no_torch {
        return Ok(Torch::Unavailable {
            reason: "--no-torch was given".into(),
        });
    }
    if let Some(python) = &args.python {
        let version = check_python(python)?;
        return Ok(Torch::Available {
            python: python.clone(),
            version,
        });
    }
    let venv = target_dir().join("bench-venv");
    let python = venv.join("bin/python");
    if venv.join(VENV_READY_MARKER).exists() {
        match check_python(&python) {
            Ok(version) => return Ok(Torch::Available { python, version }),
            Err(e) => eprintln!("bench: {} is broken ({e:#}); reinstalling", venv.display()),
        }
    } else if venv.exists() {
        eprintln!(
            "bench: {} is incomplete (an interrupted or failed install); reinstalling",
            venv.display()
        );
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    Ok(match install_venv(&venv) {
        Ok(version) => Torch::Available { python, version },
        Err(e) => Torch::Unavailable {
            reason: format!("installing PyTorch into {} failed: {e:#}", venv.display()),
        },
    })
}

/// The command of one `bench/pytorch/` script with `threads` threads (its arguments still to
/// add).
pub(crate) fn python_cmd(python: &Path, script: &str, threads: usize) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(workspace_root().join("bench/pytorch").join(script))
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}
