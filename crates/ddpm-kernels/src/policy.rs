//! [`KernelPolicy`]: which implementation each hot operation uses, as one explicit value.
//!
//! Every op in `ddpm_unet::ops` has several implementations: our CPU kernels, our CUDA kernels
//! and candle's own ops (this crate). Which one runs is decided by a `KernelPolicy` that
//! the caller chooses: the `ddpm` binary builds it from its flags and configuration, records it
//! in the run's config and checkpoints, and benchmark reports print it. No library crate reads an
//! environment variable to choose.
//!
//! The policy in force is installed for the whole process with [`KernelPolicy::install`] (the
//! kernels run on rayon's threads and inside candle's custom ops, where no per-call argument can
//! reach); [`KernelPolicy::active`] reads it. Installing another policy switches every later op,
//! so two implementations can be compared in one process. The default is the fastest measured
//! one: ours everywhere.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// Which implementation each hot op of the U-Nets uses (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelPolicy {
    /// Our kernels or candle's ops, for every hot op on every device.
    pub backend: Backend,
    /// Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions with enough channels (CPU); off: all
    /// convolutions through im2col + GEMM.
    pub winograd: bool,
    /// The widest x86 vector instructions our CPU kernels may use.
    pub cpu_isa: CpuIsa,
    /// Which of our CUDA kernels run (a `cuda` build on a CUDA device).
    pub cuda_kernels: CudaKernels,
    /// Convolutions on CUDA: ours (im2col + cuBLAS) or candle's `conv2d` (cuDNN in a `cudnn`
    /// build).
    pub cuda_conv: CudaConv,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        KernelPolicy {
            backend: Backend::Ours,
            winograd: true,
            cpu_isa: CpuIsa::Auto,
            cuda_kernels: CudaKernels::All,
            cuda_conv: CudaConv::Ours,
        }
    }
}

/// Our kernels or candle's ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Ours: on the CPU convolution lowered onto GEMM (and Winograd), fused GroupNorm, attention
    /// and upsampling; on CUDA our CUDA kernels as [`CudaKernels`] says.
    Ours,
    /// candle's own ops everywhere, to compare against.
    Candle,
}

/// The widest x86 vector instructions our CPU kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuIsa {
    /// The widest the CPU has: AVX-512 (F and VL) with AVX2 and FMA, else AVX2 + FMA, else the
    /// baseline x86-64 build.
    Auto,
    /// At most AVX2 + FMA, even on an AVX-512 CPU (to compare the two builds on one machine).
    Avx2,
    /// The baseline x86-64 build (SSE2) only.
    Baseline,
}

/// Which of our CUDA kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CudaKernels {
    /// All of them: convolutions, GroupNorm (through shared memory where it fits), attention,
    /// upsampling and the vectorized index arithmetic.
    All,
    /// The first, simplest versions only (a fallback for a kernel that fails on some GPU).
    Basic,
    /// None: candle's ops (convolutions through an im2col of candle tensor ops).
    Off,
}

/// Convolutions on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CudaConv {
    /// Ours: im2col + one cuBLAS GEMM (or candle tensor ops when [`CudaKernels::Off`]).
    Ours,
    /// candle's `conv2d` (cuDNN in a `cudnn` build; its backward pass is convolutions too).
    Candle,
}

/// The installed policy, packed into one word (see [`KernelPolicy::pack`]); the default until
/// [`KernelPolicy::install`] is called.
static ACTIVE: AtomicU32 = AtomicU32::new(KernelPolicy::DEFAULT_PACKED);

impl KernelPolicy {
    // Winograd on (bit 1); every other field at its first variant (0).
    const DEFAULT_PACKED: u32 = 0b0000_0010;

    /// The policy in force in this process (the default until one is installed).
    pub fn active() -> KernelPolicy {
        KernelPolicy::unpack(ACTIVE.load(Ordering::Relaxed))
    }

    /// Makes this policy the one in force for every later op in this process; returns the one
    /// it replaces.
    pub fn install(self) -> KernelPolicy {
        KernelPolicy::unpack(ACTIVE.swap(self.pack(), Ordering::Relaxed))
    }

    /// Runs `f` with this policy installed, then restores the previous one (also on a panic).
    /// Meant for comparisons and tests; ops running on other threads meanwhile see it too.
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(KernelPolicy);
        impl Drop for Restore {
            fn drop(&mut self) {
                self.0.install();
            }
        }
        let _restore = Restore(self.install());
        f()
    }

    /// Whether our kernels are in use (rather than candle's ops).
    pub fn ours(&self) -> bool {
        self.backend == Backend::Ours
    }

    fn pack(self) -> u32 {
        let backend = match self.backend {
            Backend::Ours => 0,
            Backend::Candle => 1,
        };
        let isa = match self.cpu_isa {
            CpuIsa::Auto => 0,
            CpuIsa::Avx2 => 1,
            CpuIsa::Baseline => 2,
        };
        let cuda = match self.cuda_kernels {
            CudaKernels::All => 0,
            CudaKernels::Basic => 1,
            CudaKernels::Off => 2,
        };
        let conv = match self.cuda_conv {
            CudaConv::Ours => 0,
            CudaConv::Candle => 1,
        };
        backend | u32::from(self.winograd) << 1 | isa << 2 | cuda << 4 | conv << 6
    }

    fn unpack(w: u32) -> KernelPolicy {
        KernelPolicy {
            backend: if w & 1 == 0 {
                Backend::Ours
            } else {
                Backend::Candle
            },
            winograd: w >> 1 & 1 == 1,
            cpu_isa: match w >> 2 & 3 {
                0 => CpuIsa::Auto,
                1 => CpuIsa::Avx2,
                _ => CpuIsa::Baseline,
            },
            cuda_kernels: match w >> 4 & 3 {
                0 => CudaKernels::All,
                1 => CudaKernels::Basic,
                _ => CudaKernels::Off,
            },
            cuda_conv: if w >> 6 & 1 == 0 {
                CudaConv::Ours
            } else {
                CudaConv::Candle
            },
        }
    }
}

/// The names [`KernelPolicy::with_overrides`] looks up, with the values each takes: the
/// environment variables the `ddpm` binary and `cargo xtask` honour.
pub const OVERRIDES: [(&str, &str); 5] = [
    ("DDPM_KERNELS", "ours | candle"),
    ("DDPM_WINOGRAD", "1 | 0"),
    ("DDPM_AVX512", "1 | 0 (0: at most AVX2)"),
    ("DDPM_CUDA_KERNELS", "all | basic | off"),
    ("DDPM_CUDA_CONV", "ours | candle | cudnn"),
];

impl KernelPolicy {
    /// This policy with the settings that `lookup` finds under the names of [`OVERRIDES`]
    /// applied (a binary passes its environment; nothing here reads one). An unknown value is an
    /// error naming the setting and the values it takes.
    pub fn with_overrides(
        self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<KernelPolicy, String> {
        let mut p = self;
        for (name, allowed) in OVERRIDES {
            let Some(value) = lookup(name) else { continue };
            let v = value.trim().to_ascii_lowercase();
            let ok = match (name, v.as_str()) {
                ("DDPM_KERNELS", "ours") => {
                    p.backend = Backend::Ours;
                    true
                }
                ("DDPM_KERNELS", "candle") => {
                    p.backend = Backend::Candle;
                    true
                }
                ("DDPM_WINOGRAD" | "DDPM_AVX512", "1" | "on" | "0" | "off") => {
                    let on = matches!(v.as_str(), "1" | "on");
                    if name == "DDPM_WINOGRAD" {
                        p.winograd = on;
                    } else {
                        p.cpu_isa = if on { CpuIsa::Auto } else { CpuIsa::Avx2 };
                    }
                    true
                }
                ("DDPM_CUDA_KERNELS", "all" | "on") => {
                    p.cuda_kernels = CudaKernels::All;
                    true
                }
                ("DDPM_CUDA_KERNELS", "basic") => {
                    p.cuda_kernels = CudaKernels::Basic;
                    true
                }
                ("DDPM_CUDA_KERNELS", "off") => {
                    p.cuda_kernels = CudaKernels::Off;
                    true
                }
                ("DDPM_CUDA_CONV", "ours") => {
                    p.cuda_conv = CudaConv::Ours;
                    true
                }
                ("DDPM_CUDA_CONV", "candle" | "cudnn") => {
                    p.cuda_conv = CudaConv::Candle;
                    true
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "{name}={value} is not one of {allowed}: unset it or use one of those"
                ));
            }
        }
        Ok(p)
    }
}

impl fmt::Display for KernelPolicy {
    /// `backend=ours winograd=on cpu-isa=auto cuda-kernels=all cuda-conv=ours`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.backend {
            Backend::Ours => "ours",
            Backend::Candle => "candle",
        };
        let isa = match self.cpu_isa {
            CpuIsa::Auto => "auto",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Baseline => "baseline",
        };
        let cuda = match self.cuda_kernels {
            CudaKernels::All => "all",
            CudaKernels::Basic => "basic",
            CudaKernels::Off => "off",
        };
        let conv = match self.cuda_conv {
            CudaConv::Ours => "ours",
            CudaConv::Candle => "candle",
        };
        let winograd = if self.winograd { "on" } else { "off" };
        write!(
            f,
            "backend={backend} winograd={winograd} cpu-isa={isa} cuda-kernels={cuda} cuda-conv={conv}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<KernelPolicy> {
        let mut out = Vec::new();
        for backend in [Backend::Ours, Backend::Candle] {
            for winograd in [false, true] {
                for cpu_isa in [CpuIsa::Auto, CpuIsa::Avx2, CpuIsa::Baseline] {
                    for cuda_kernels in [CudaKernels::All, CudaKernels::Basic, CudaKernels::Off] {
                        for cuda_conv in [CudaConv::Ours, CudaConv::Candle] {
                            out.push(KernelPolicy {
                                backend,
                                winograd,
                                cpu_isa,
                                cuda_kernels,
                                cuda_conv,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_policy_packs_and_unpacks_to_itself() {
        let all = all();
        assert_eq!(all.len(), 72);
        for p in all {
            assert_eq!(KernelPolicy::unpack(p.pack()), p, "{p}");
        }
        assert_eq!(KernelPolicy::default().pack(), KernelPolicy::DEFAULT_PACKED);
    }

    #[test]
    fn serde_names_and_partial_tables() {
        let p: KernelPolicy =
            serde_json::from_str(r#"{"backend": "candle", "cpu_isa": "avx2"}"#).unwrap();
        assert_eq!(
            p,
            KernelPolicy {
                backend: Backend::Candle,
                cpu_isa: CpuIsa::Avx2,
                ..KernelPolicy::default()
            }
        );
        assert!(serde_json::from_str::<KernelPolicy>(r#"{"backend": "fast"}"#).is_err());
        assert!(serde_json::from_str::<KernelPolicy>(r#"{"winogard": false}"#).is_err());
        assert_eq!(
            KernelPolicy::default().to_string(),
            "backend=ours winograd=on cpu-isa=auto cuda-kernels=all cuda-conv=ours"
        );
    }

    fn with(vars: &[(&str, &str)]) -> std::result::Result<KernelPolicy, String> {
        KernelPolicy::default().with_overrides(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn each_override_sets_its_field_and_bad_values_are_named() {
        assert_eq!(with(&[]).unwrap(), KernelPolicy::default());
        let p = with(&[
            ("DDPM_KERNELS", "candle"),
            ("DDPM_WINOGRAD", "0"),
            ("DDPM_AVX512", "0"),
            ("DDPM_CUDA_KERNELS", "basic"),
            ("DDPM_CUDA_CONV", "cudnn"),
        ])
        .unwrap();
        assert_eq!(
            p,
            KernelPolicy {
                backend: Backend::Candle,
                winograd: false,
                cpu_isa: CpuIsa::Avx2,
                cuda_kernels: CudaKernels::Basic,
                cuda_conv: CudaConv::Candle,
            }
        );
        let e = with(&[("DDPM_KERNELS", "fast")]).unwrap_err();
        assert!(
            e.contains("DDPM_KERNELS=fast") && e.contains("ours | candle"),
            "{e}"
        );
        // An override wins over what the base (a run's config) says.
        let base = KernelPolicy {
            winograd: false,
            ..KernelPolicy::default()
        };
        let p = base.with_overrides(|n| (n == "DDPM_WINOGRAD").then(|| "1".into()));
        assert!(p.unwrap().winograd);
    }

    #[test]
    fn scoped_restores_the_previous_policy() {
        let candle = KernelPolicy {
            backend: Backend::Candle,
            ..KernelPolicy::default()
        };
        let before = KernelPolicy::active();
        let seen = candle.scoped(KernelPolicy::active);
        assert_eq!(seen, candle);
        assert_eq!(KernelPolicy::active(), before);
    }
}
