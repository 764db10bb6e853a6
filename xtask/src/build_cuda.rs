//! `cargo xtask build-cuda`: builds `ddpm` (and this xtask, for the GPU test matrix and
//! benchmark) with CUDA on a machine that has no GPU and no CUDA toolkit.
//!
//! CUDA 13 comes from NVIDIA's PyPI wheels, pinned to the version of our GPU machines' driver
//! (580, CUDA 13.0: PTX from a newer nvcc would not load there): nvcc, its headers, the runtime,
//! cuBLAS, cuRAND and NVRTC are installed into `target/cuda-venv`. Linking needs `libcuda.so`,
//! which only a driver installs, so a stub exporting the driver functions that cudarc binds is
//! compiled from cudarc's own list; at run time the real driver's `libcuda.so.1` is loaded. The
//! binaries go to `dist/cuda/` with `env.sh`, which points the loader at the CUDA 13 libraries
//! of the machine it runs on (PyTorch's `nvidia/cu13/lib` where there is no system CUDA), and
//! with `unet-tests`, ddpm-kernels' test binary, whose `cuda::` tests check our CUDA
//! kernels against the CPU on the GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench::{target_dir, workspace_root};

/// The pinned wheels of the CUDA 13.0 toolchain.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];
/// Added with `--cudnn`.
const CUDNN_WHEEL: &str = "nvidia-cudnn-cu13==9.13.0.50";
/// Added with `--nccl`.
const NCCL_WHEEL: &str = "nvidia-nccl-cu13==2.28.9";
/// Written into the toolkit once every wheel is installed.
const READY_MARKER: &str = ".ddpm-cuda-ready";
/// The shared libraries linked by name (`-lNAME`) whose wheels ship only versioned files, and
/// where the versioned file is, relative to the toolkit's `lib`.
const LINKED: &[(&str, &str)] = &[
    ("libcudart.so", "libcudart.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libcurand.so", "libcurand.so.10"),
    ("libcudnn.so", "../../cudnn/lib/libcudnn.so.9"),
    ("libnccl.so", "../../nccl/lib/libnccl.so.2"),
];

/// Arguments of `build-cuda`.
#[derive(Args, Debug)]
pub struct BuildCudaArgs {
    /// Compute capability to compile the kernels for (90: H100/H200; 80: A100).
    #[arg(long, default_value = "90")]
    compute_cap: String,
    /// Also build with cuDNN (candle's `cudnn`; installs the cuDNN wheel). Convolutions then run
    /// forward and backward through cuDNN.
    #[arg(long)]
    cudnn: bool,
    /// Also build with NCCL (data-parallel training, see docs/distributed.md; installs the NCCL
    /// wheel). The binary then needs `libnccl.so.2` at run time (PyTorch's, or a system NCCL).
    #[arg(long)]
    nccl: bool,
    /// Where the binaries go.
    #[arg(long, default_value = "dist/cuda")]
    out: PathBuf,
    /// Only set up the toolkit and print the environment to build with.
    #[arg(long)]
    env_only: bool,
    /// Also write `ddpm.xz` and `xtask.xz` (about 8 MB each instead of 65 MB), for carrying to
    /// a GPU machine; `bench/gpu/run-on-gpu.sh` unpacks them there.
    #[arg(long)]
    xz: bool,
}

/// Builds ddpm-kernels' test binary with `--features cuda` (its CUDA kernels' tests against the
/// CPU, run on a GPU machine as `unet-tests cuda::`) and returns its path, read from
/// cargo's JSON messages. It is built with `DDPM_REQUIRE_CUDA=1` (read at compile time), so a
/// missing CUDA device fails those tests instead of skipping them.
fn build_kernel_tests(root: &Path, env: &[(&str, String)]) -> anyhow::Result<PathBuf> {
    eprintln!("build-cuda: cargo test -p ddpm-kernels --features cuda --release --no-run");
    let output = crate::cargo()
        .args([
            "test",
            "-p",
            "ddpm-kernels",
            "--lib",
            "--features",
            "cuda",
            "--release",
        ])
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DDPM_REQUIRE_CUDA", "1")
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building ddpm-kernels' CUDA tests failed (see above)");
    }
    test_executable(
        &String::from_utf8_lossy(&output.stdout),
        KERNEL_TESTS_TARGET,
    )
    .context("cargo built no test executable for ddpm-kernels")
}

/// The library target whose test binary carries the CUDA kernels' tests (ddpm-kernels' lib).
const KERNEL_TESTS_TARGET: &str = "ddpm_kernels";

/// The executable of `target`'s test binary in cargo's JSON messages (`--message-format json`).
fn test_executable(messages: &str, target: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Runs `build-cuda`.
pub fn run(args: BuildCudaArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    let venv = target_dir().join("cuda-venv");
    let cuda = install_toolkit(&venv, args.cudnn, args.nccl)?;
    link_shims(&cuda)?;
    let target = target_dir().join("cuda");
    let path = format!(
        "{}:{}",
        cuda.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("CUDA_HOME", cuda.display().to_string()),
        ("CUDA_COMPUTE_CAP", args.compute_cap.clone()),
        ("CARGO_TARGET_DIR", target.display().to_string()),
        ("PATH", path),
    ];
    if args.env_only {
        for (k, v) in &env {
            println!("export {k}={v}");
        }
        return Ok(());
    }
    let mut wanted = vec![if args.cudnn { "cudnn" } else { "cuda" }];
    if args.nccl {
        wanted.push("nccl");
    }
    let features = wanted
        .iter()
        .flat_map(|f| [format!("ddpm-cli/{f}"), format!("xtask/{f}")])
        .collect::<Vec<_>>()
        .join(",");
    eprintln!(
        "build-cuda: cargo build --release -p ddpm-cli -p xtask --features {features} \
         (CUDA 13.0, compute capability {}; the first build takes 15-25 minutes on 2 cores)",
        args.compute_cap
    );
    let status = crate::cargo()
        .args(["build", "--release", "-p", "ddpm-cli", "-p", "xtask"])
        .args(["--features", &features])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("the CUDA build failed (see above)");
    }
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let tests = build_kernel_tests(&root, &env)?;
    let binaries = [
        ("ddpm", target.join("release").join("ddpm")),
        ("xtask", target.join("release").join("xtask")),
        ("unet-tests", tests),
    ];
    for (bin, from) in binaries {
        let to = out.join(bin);
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        // Debug symbols are not needed on the GPU machine and would double what is carried.
        let _ = Command::new("strip").arg(&to).status();
        if args.xz {
            let ok = Command::new("xz")
                .args(["-T0", "-6", "-k", "-f"])
                .arg(&to)
                .status()
                .context("running xz (install xz-utils)")?;
            if !ok.success() {
                bail!("xz {} failed", to.display());
            }
        }
    }
    std::fs::write(out.join("env.sh"), ENV_SH).context("writing env.sh")?;
    eprintln!(
        "build-cuda: wrote {dir}/ddpm, {dir}/xtask, {dir}/unet-tests and {dir}/env.sh. On the \
         GPU machine, from the repository root: `. {dir}/env.sh && {dir}/ddpm train --device \
         cuda ...`, `{dir}/xtask test-matrix` and `{dir}/unet-tests \
         cuda::` (our CUDA kernels against the CPU)",
        dir = args.out.display()
    );
    Ok(())
}

/// `env.sh`, sourced on the GPU machine: finds the CUDA 13 libraries (a system CUDA, else the
/// `nvidia/cu13/lib` folder of an installed PyTorch) and puts them on the loader's path.
const ENV_SH: &str = r#"# Source me: points the dynamic loader at the NVIDIA driver's libcuda.so.1 and at CUDA 13's
# cuBLAS, cuRAND, NVRTC and runtime (a system CUDA 13, else PyTorch's nvidia/cu13/lib).
_ddpm_add() { export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; echo "ddpm: libraries from $1" >&2; }
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    if [ -e "$d/libcuda.so.1" ]; then _ddpm_add "$d"; break; fi
  done
fi
_ddpm_found=
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
  if [ -z "$_ddpm_found" ] && [ -e "$d/libcublas.so.13" ]; then _ddpm_add "$d"; _ddpm_found=1; fi
done
[ -n "$_ddpm_found" ] || echo "ddpm: no CUDA 13 libraries (libcublas.so.13) found; install CUDA 13 or PyTorch cu13" >&2
unset _ddpm_found
# cuDNN 9 and NCCL 2, needed by builds with `--cudnn` / `--nccl`: a system copy, else PyTorch's.
for _ddpm_lib in libcudnn.so.9 libnccl.so.2; do
  if ! ldconfig -p 2>/dev/null | grep -q "$_ddpm_lib "; then
    for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, n, "lib") for p in nvidia.__path__ for n in ("cudnn", "nccl", "cu13")))' 2>/dev/null); do
      if [ -e "$d/$_ddpm_lib" ]; then _ddpm_add "$d"; break; fi
    done
  fi
done
unset _ddpm_lib
"#;

/// Installs the pinned wheels into `venv` unless done; returns the toolkit root
/// (`.../site-packages/nvidia/cu13`).
fn install_toolkit(venv: &Path, cudnn: bool, nccl: bool) -> anyhow::Result<PathBuf> {
    let marker = venv.join(READY_MARKER);
    let mut wheels: Vec<&str> = WHEELS.to_vec();
    if cudnn {
        wheels.push(CUDNN_WHEEL);
    }
    if nccl {
        wheels.push(NCCL_WHEEL);
    }
    let wanted = wheels.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let python = venv.join("bin/python");
        if !python.is_file() {
            eprintln!("build-cuda: creating {}", venv.display());
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(venv)
                .status()
                .context("running python3 -m venv (install Python 3 with venv)")?;
            if !ok.success() {
                bail!("python3 -m venv {} failed", venv.display());
            }
        }
        eprintln!("build-cuda: installing the CUDA 13.0 toolchain from PyPI (about 1.2 GB)");
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&wheels)
            .status()
            .context("running pip")?;
        if !ok.success() {
            bail!(
                "pip could not install the CUDA wheels ({})",
                wheels.join(" ")
            );
        }
        std::fs::write(&marker, &wanted).context("writing the toolkit marker")?;
    }
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let cu13 = entry?.path().join("site-packages/nvidia/cu13");
        if cu13.join("bin/nvcc").is_file() {
            return Ok(cu13);
        }
    }
    bail!(
        "no nvcc under {}/python*/site-packages/nvidia/cu13",
        lib.display()
    )
}

/// Unversioned names for the linked libraries, and a `libcuda.so` stub.
fn link_shims(cuda: &Path) -> anyhow::Result<()> {
    let lib = cuda.join("lib");
    for (name, real) in LINKED {
        let link = lib.join(name);
        // cuDNN's and NCCL's links only where their wheels are installed.
        if !link.exists() && lib.join(real).exists() {
            std::os::unix::fs::symlink(real, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let stub = lib.join("libcuda.so");
    if stub.exists() {
        return Ok(());
    }
    let symbols = driver_symbols()?;
    let c_file = target_dir().join("cuda-stub.c");
    let body: String = symbols
        .iter()
        .map(|s| format!("void {s}(void) {{}}\n"))
        .collect();
    std::fs::write(&c_file, body)?;
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&stub)
        .arg(&c_file)
        .status()
        .context("running cc for the libcuda stub")?;
    if !ok.success() {
        bail!("compiling the libcuda.so stub failed");
    }
    eprintln!(
        "build-cuda: libcuda.so stub with {} driver symbols (link time only)",
        symbols.len()
    );
    Ok(())
}

/// The CUDA driver functions cudarc binds, read from its source in cargo's registry.
fn driver_symbols() -> anyhow::Result<Vec<String>> {
    let out = crate::cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "ddpm-cli/cuda",
        ])
        .current_dir(workspace_root())
        .output()
        .context("running cargo metadata")?;
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph of ddpm-cli/cuda")?;
    let sys = Path::new(manifest)
        .parent()
        .context("cudarc's manifest path")?
        .join("src/driver/sys/mod.rs");
    let text =
        std::fs::read_to_string(&sys).with_context(|| format!("reading {}", sys.display()))?;
    let mut names: Vec<String> = text
        .split("load::<_F>(\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    if names.len() < 100 {
        bail!(
            "found only {} driver symbols in {}",
            names.len(),
            sys.display()
        );
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary is found by the kernels crate's library target (the kernels moved out of
    /// ddpm-unet, and a search for `ddpm_unet` found nothing, failing every `build-cuda`), and
    /// the target name is the lib name cargo gives ddpm-kernels.
    #[test]
    fn the_kernel_test_binary_is_found_by_its_target() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"ddpm_unet","kind":["lib"]},"executable":"/t/ddpm_unet-1"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"ddpm_kernels","kind":["lib"]},"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"ddpm_kernels","kind":["lib"]},"executable":"/t/ddpm_kernels-2"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            test_executable(&messages, KERNEL_TESTS_TARGET),
            Some(PathBuf::from("/t/ddpm_kernels-2"))
        );
        assert_eq!(test_executable("not json\n", KERNEL_TESTS_TARGET), None);
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/ddpm-kernels/Cargo.toml"),
        )
        .expect("ddpm-kernels' Cargo.toml");
        assert!(
            manifest.contains("name = \"ddpm-kernels\""),
            "the kernels crate was renamed: update KERNEL_TESTS_TARGET"
        );
        assert!(
            !manifest.contains("[lib]"),
            "a [lib] name may differ from the package's"
        );
    }
}
