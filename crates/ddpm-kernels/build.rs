//! With the `cuda` feature: compiles `src/cuda/kernels.cu` (which includes `src/cuda/common.cuh`
//! and each op's `src/<op>/kernels.cu`) to PTX with nvcc (from `CUDA_HOME/bin` or the `PATH`;
//! `cargo xtask build-cuda` sets both) for the compute capability in `CUDA_COMPUTE_CAP`
//! (default 80; PTX runs on that and every newer GPU). Without it, nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for source in cuda_sources(std::path::Path::new("src")) {
        println!("cargo:rerun-if-changed={}", source.display());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(out.join("ddpm_kernels.ptx"))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} for ddpm-kernels' CUDA kernels: {e}. Build with `cargo xtask \
                 build-cuda`, which installs nvcc, or put a CUDA toolkit's nvcc on the PATH",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on src/cuda/kernels.cu (see above)"
    );
}

/// The CUDA sources under `dir` (`.cu` and `.cuh` files, in every folder), sorted.
fn cuda_sources(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_dir() {
            found.extend(cuda_sources(&path));
        } else if path.extension().is_some_and(|x| x == "cu" || x == "cuh") {
            found.push(path);
        }
    }
    found.sort();
    found
}
