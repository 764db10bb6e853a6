//! [`KernelPolicy`]: which implementation each hot operation uses, as one explicit value.
//!
//! Every op in `ddpm_unet::ops` has several implementations: our CPU kernels, our CUDA kernels
//! and candle's own ops (this crate). Which one runs is decided by a `KernelPolicy` that
//! the caller chooses: the `ddpm` binary builds it from its flags and configuration, records it
//! in the run's config and checkpoints, and benchmark reports print it. No library crate reads an
//! environment variable to choose.
//!
//! The policy is passed to what runs the ops: `ddpm_unet::DiffusionModel::with_kernel_policy`,
//! ddpm-train's optimizer, EMA and sampler, and this crate's [`crate::optim`] functions each
//! take one, and run their work inside [`KernelPolicy::scoped`]. The ops and kernels read the
//! policy in force with [`KernelPolicy::active`]: they run on rayon's threads and inside
//! candle's custom ops (forward and backward), where no per-call argument can reach, so the
//! policy in force is one value for the whole process. Outside every scope it is the installed
//! one ([`KernelPolicy::install`]; the default, ours everywhere, is the fastest measured).
//!
//! # Scopes and threads
//!
//! [`KernelPolicy::scoped`] nests: an inner scope of another policy on the same thread switches
//! to it and gives the outer one back when it ends (also on a panic). Across threads, scopes of
//! the same policy run together, and a scope of another policy waits until they have ended, so
//! an op never sees the policy change under it and two models of different policies can be
//! used from two threads (one after the other, not at once). A thread that switches the policy
//! inside its own scope while other threads hold scopes waits for them; two threads doing that
//! at the same time would wait for each other forever, which panics instead. Kernels that run on
//! rayon's threads see the policy of the scope that started them; code running inside a rayon
//! task should not open a scope of another policy (it would switch the policy under the
//! enclosing op's other tasks, which is correct only up to float rounding).

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

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
    /// Winograd F(4x4, 3x3) instead of F(2x2, 3x3) where a thread's images hold at least 64 of
    /// its 4x4 tiles (CPU, with `winograd` on): a quarter of im2col's multiply-adds instead of
    /// 4/9, and rounding about 20 times larger (near 3e-5 of the outputs' size over 256 input
    /// channels in f32, against 1.4e-6). Off by default: `learnopencv`'s sampling steps were 8%
    /// faster with it and its training steps no faster (docs/benchmarks.md, "Kernel
    /// decisions"), not enough to give up F(2x2, 3x3)'s accuracy unasked.
    pub winograd_4x4: bool,
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
            winograd_4x4: false,
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

/// The policy in force, packed into one word (see [`KernelPolicy::pack`]): the installed one
/// outside every scope, else the open scopes' policy. Read on every op, so an atomic rather than
/// the lock of [`SCOPES`].
static ACTIVE: AtomicU32 = AtomicU32::new(KernelPolicy::DEFAULT_PACKED);

/// The bookkeeping of [`KernelPolicy::scoped`] (see the module doc), changed only under its
/// lock; [`CHANGED`] wakes the threads waiting for a scope.
struct Scopes {
    /// The installed policy (packed), in force when no scope is open.
    base: u32,
    /// Threads that hold at least one open scope.
    threads: usize,
    /// Open scopes that switched the policy inside another scope of the same thread (their
    /// thread then holds every open scope, and no other thread may join).
    switched: usize,
    /// Threads waiting to switch the policy inside their own scope.
    switching: usize,
}

static SCOPES: Mutex<Scopes> = Mutex::new(Scopes {
    base: KernelPolicy::DEFAULT_PACKED,
    threads: 0,
    switched: 0,
    switching: 0,
});
static CHANGED: Condvar = Condvar::new();

thread_local! {
    /// Scopes open on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

fn scopes() -> MutexGuard<'static, Scopes> {
    // The lock is never held across user code, so a poisoned state is still consistent.
    SCOPES.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait(s: MutexGuard<'static, Scopes>) -> MutexGuard<'static, Scopes> {
    CHANGED.wait(s).unwrap_or_else(PoisonError::into_inner)
}

/// An open scope: gives the previous policy back when dropped.
struct ScopeGuard {
    /// The policy in force before this scope (packed).
    previous: u32,
    /// Whether this scope switched the policy inside another scope of its thread.
    switched: bool,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let depth = DEPTH.get() - 1;
        DEPTH.set(depth);
        let mut s = scopes();
        if self.switched {
            // This thread holds every open scope (no other may join a switched one).
            s.switched -= 1;
            ACTIVE.store(self.previous, Ordering::Relaxed);
        }
        if depth == 0 {
            s.threads -= 1;
            if s.threads == 0 {
                ACTIVE.store(s.base, Ordering::Relaxed);
            }
        }
        drop(s);
        CHANGED.notify_all();
    }
}

impl KernelPolicy {
    // Winograd on (bit 1); every other field at its first variant (0).
    const DEFAULT_PACKED: u32 = 0b0000_0010;

    /// The policy in force: that of the open scopes ([`KernelPolicy::scoped`]), else the
    /// installed one (the default until one is installed).
    pub fn active() -> KernelPolicy {
        KernelPolicy::unpack(ACTIVE.load(Ordering::Relaxed))
    }

    /// Makes this policy the one in force outside every scope, for the rest of the process (a
    /// binary installs the one it was asked for once, at start); returns the one it replaces.
    /// While scopes are open it takes effect when they have all ended.
    pub fn install(self) -> KernelPolicy {
        let mut s = scopes();
        let old = std::mem::replace(&mut s.base, self.pack());
        if s.threads == 0 {
            ACTIVE.store(s.base, Ordering::Relaxed);
        }
        KernelPolicy::unpack(old)
    }

    /// Runs `f` with this policy in force, then gives the previous one back (also on a panic).
    /// Scopes nest; across threads, scopes of one policy run together and a scope of another
    /// waits for them to end (see the module doc).
    ///
    /// # Panics
    /// When two threads each switch the policy inside their own open scope at the same time
    /// (each would wait for the other's scope to end).
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        let _guard = self.enter();
        f()
    }

    /// Opens a scope of this policy (see [`KernelPolicy::scoped`]).
    fn enter(self) -> ScopeGuard {
        let me = self.pack();
        let depth = DEPTH.get();
        let mut s = scopes();
        let mut waiting_to_switch = false;
        let switched = loop {
            let active = ACTIVE.load(Ordering::Relaxed);
            if s.threads == 0 || active == me && (depth > 0 || s.switched == 0) {
                break false;
            }
            if depth > 0 && s.threads == 1 {
                // Another policy inside this thread's own scope, which no other thread holds.
                break true;
            }
            if depth > 0 && !waiting_to_switch {
                if s.switching > 0 {
                    drop(s);
                    panic!(
                        "two threads each switch the kernel policy inside their own scope: each \
                         would wait for the other's scope to end (use one policy per thread, or \
                         switch outside the scopes)"
                    );
                }
                s.switching += 1;
                waiting_to_switch = true;
            }
            s = wait(s);
        };
        if waiting_to_switch {
            s.switching -= 1;
        }
        let previous = ACTIVE.swap(me, Ordering::Relaxed);
        if depth == 0 {
            s.threads += 1;
        }
        if switched {
            s.switched += 1;
        }
        DEPTH.set(depth + 1);
        ScopeGuard { previous, switched }
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
        backend
            | u32::from(self.winograd) << 1
            | isa << 2
            | cuda << 4
            | conv << 6
            | u32::from(self.winograd_4x4) << 7
    }

    fn unpack(w: u32) -> KernelPolicy {
        KernelPolicy {
            backend: if w & 1 == 0 {
                Backend::Ours
            } else {
                Backend::Candle
            },
            winograd: w >> 1 & 1 == 1,
            winograd_4x4: w >> 7 & 1 == 1,
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
    ("DDPM_WINOGRAD", "1 | 0 | 4x4 (F(4x4, 3x3) where it pays)"),
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
                ("DDPM_WINOGRAD", "4x4") => {
                    p.winograd = true;
                    p.winograd_4x4 = true;
                    true
                }
                ("DDPM_WINOGRAD" | "DDPM_AVX512", "1" | "on" | "0" | "off") => {
                    let on = matches!(v.as_str(), "1" | "on");
                    if name == "DDPM_WINOGRAD" {
                        p.winograd = on;
                        p.winograd_4x4 = false;
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
    /// `backend=ours winograd=on cpu-isa=auto cuda-kernels=all cuda-conv=ours` (`winograd=4x4`
    /// with [`KernelPolicy::winograd_4x4`]).
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
        let winograd = match (self.winograd, self.winograd_4x4) {
            (false, _) => "off",
            (true, false) => "on",
            (true, true) => "4x4",
        };
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
            for (winograd, winograd_4x4) in [(false, false), (true, false), (true, true)] {
                for cpu_isa in [CpuIsa::Auto, CpuIsa::Avx2, CpuIsa::Baseline] {
                    for cuda_kernels in [CudaKernels::All, CudaKernels::Basic, CudaKernels::Off] {
                        for cuda_conv in [CudaConv::Ours, CudaConv::Candle] {
                            out.push(KernelPolicy {
                                backend,
                                winograd,
                                winograd_4x4,
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
        assert_eq!(all.len(), 108);
        for p in all {
            assert_eq!(KernelPolicy::unpack(p.pack()), p, "{p}");
        }
        assert_eq!(KernelPolicy::default().pack(), KernelPolicy::DEFAULT_PACKED);
    }

    #[test]
    fn serde_names_and_partial_tables() {
        let p: KernelPolicy =
            serde_json::from_str(r#"{"backend": "candle", "cpu_isa": "avx2"}"#).unwrap();
        // A table without `winograd_4x4` (every config and checkpoint written before it) reads
        // as F(2x2, 3x3).
        assert!(!p.winograd_4x4);
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
                winograd_4x4: false,
                cpu_isa: CpuIsa::Avx2,
                cuda_kernels: CudaKernels::Basic,
                cuda_conv: CudaConv::Candle,
            }
        );
        // 4x4 turns Winograd on with the larger tiles; 1 gives the default tiles back.
        let p = with(&[("DDPM_WINOGRAD", "4x4")]).unwrap();
        assert!(p.winograd && p.winograd_4x4);
        assert_eq!(
            p.to_string(),
            "backend=ours winograd=4x4 cpu-isa=auto cuda-kernels=all cuda-conv=ours"
        );
        let p = p.with_overrides(|n| (n == "DDPM_WINOGRAD").then(|| "on".into()));
        assert_eq!(p.unwrap(), KernelPolicy::default());
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
    fn scoped_restores_the_previous_policy_and_nests() {
        let candle = KernelPolicy {
            backend: Backend::Candle,
            ..KernelPolicy::default()
        };
        let plain = KernelPolicy {
            winograd: false,
            ..KernelPolicy::default()
        };
        // Inside a scope of our own, so that the tests running beside this one cannot change
        // the policy restored to.
        let base = KernelPolicy {
            cpu_isa: CpuIsa::Avx2,
            ..KernelPolicy::default()
        };
        base.scoped(|| {
            let seen = candle.scoped(|| {
                let outer = KernelPolicy::active();
                let inner =
                    plain.scoped(|| (KernelPolicy::active(), candle.scoped(KernelPolicy::active)));
                (outer, inner, KernelPolicy::active())
            });
            assert_eq!(seen, (candle, (plain, candle), candle));
            assert_eq!(KernelPolicy::active(), base);
            // A panic inside a (nested) scope gives every outer policy back.
            let caught = std::panic::catch_unwind(|| {
                candle.scoped(|| {
                    let inner = std::panic::catch_unwind(|| plain.scoped(|| panic!("inside")));
                    assert!(inner.is_err());
                    assert_eq!(KernelPolicy::active(), candle);
                    panic!("outside");
                })
            });
            assert!(caught.is_err());
            assert_eq!(KernelPolicy::active(), base);
        });
    }

    /// A scope of another policy on another thread waits until the open one has ended, so the
    /// first thread's ops never see the policy change under them; one of the same policy joins.
    #[test]
    fn other_threads_wait_for_another_policy_and_join_the_same() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{mpsc, Arc};
        let candle = KernelPolicy {
            backend: Backend::Candle,
            ..KernelPolicy::default()
        };
        let ours = KernelPolicy::default();
        let first_done = Arc::new(AtomicBool::new(false));
        let (joined_tx, joined_rx) = mpsc::channel();
        let (joined, other) = candle.scoped(|| {
            let done = first_done.clone();
            let other = std::thread::spawn(move || {
                ours.scoped(|| (KernelPolicy::active(), done.load(Ordering::SeqCst)))
            });
            // A thread of the same policy joins at once: it reports from inside its scope while
            // this one is still open.
            let same = std::thread::spawn(move || {
                candle.scoped(|| joined_tx.send(KernelPolicy::active()).expect("send"))
            });
            let joined = joined_rx.recv().expect("the same policy joins");
            same.join().expect("same-policy thread");
            // Give the other thread every chance to (wrongly) enter.
            for _ in 0..100 {
                std::thread::yield_now();
                assert_eq!(KernelPolicy::active(), candle);
            }
            first_done.store(true, Ordering::SeqCst);
            (joined, other)
        });
        assert_eq!(joined, candle);
        let (policy, after_first) = other.join().expect("other thread");
        assert_eq!(policy, ours);
        assert!(
            after_first,
            "another policy's scope opened while this one was open"
        );
    }

    /// Two threads that each switch the policy inside their own scope would wait for each
    /// other: the second panics (ending its scope), and the first then switches.
    #[test]
    fn two_threads_switching_inside_their_scopes_panic_instead_of_waiting_forever() {
        use std::sync::{Arc, Barrier};
        let winograd_off = KernelPolicy {
            winograd: false,
            cpu_isa: CpuIsa::Baseline,
            ..KernelPolicy::default()
        };
        let switch_to = KernelPolicy {
            cpu_isa: CpuIsa::Baseline,
            ..KernelPolicy::default()
        };
        let both_in = Arc::new(Barrier::new(2));
        let b_in = both_in.clone();
        let b = std::thread::spawn(move || {
            winograd_off.scoped(|| {
                b_in.wait();
                // Wait until the first thread is waiting to switch.
                while scopes().switching == 0 {
                    std::thread::yield_now();
                }
                std::panic::catch_unwind(|| switch_to.scoped(|| ())).is_err()
            })
        });
        let seen = winograd_off.scoped(|| {
            both_in.wait();
            switch_to.scoped(KernelPolicy::active)
        });
        assert!(b.join().expect("thread"), "the second switch did not panic");
        assert_eq!(seen, switch_to);
    }
}
