//! Every environment variable `ddpm` reads, in one place (the library crates read none: what a
//! variable chooses is passed to them as a value). docs/environment.md lists them.
//!
//! | variable | what it sets |
//! |---|---|
//! | `DDPM_LOG` | the log filter (`--log`) |
//! | `DDPM_DATA_MIRROR` | a mirror (directory or base URL) every fetch reads from |
//! | `DDPM_CACHE_DIR` | where downloaded model files (Inception weights) are kept: [`cache_dir`] |
//! | `DDPM_KERNELS` | `candle`: candle's ops instead of ours ([`KernelPolicy::backend`]) |
//! | `DDPM_WINOGRAD` | `0`: no Winograd convolutions ([`KernelPolicy::winograd`]) |
//! | `DDPM_AVX512` | `0`: at most AVX2 in our CPU kernels ([`KernelPolicy::cpu_isa`]) |
//! | `DDPM_CUDA_KERNELS` | `basic` or `off` ([`KernelPolicy::cuda_kernels`]) |
//! | `DDPM_CUDA_CONV` | `candle`/`cudnn`: candle's CUDA convolution ([`KernelPolicy::cuda_conv`]) |
//! | `DDPM_CUDA_POOL` | `release`: hand freed GPU memory back to the driver at every sync |
//! | `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE` | the Hugging Face Hub: [`hub_options`] |
//! | `MIMALLOC_PURGE_DELAY` | when set, mimalloc's own purge delay is left in force |
//! | `CANDLE_BARRIER_POOL_SPIN_LIMIT` | when set, candle's own spin limit is left in force: [`park_idle_candle_threads`] |
//! | `DDPM_FAULT_NAN_AT_STEP` | tests only: a NaN loss at that step |
//! | `DDPM_F16_INITIAL_SCALE` | tests only: the first f16 loss scale |
//! | `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, ... | a data-parallel launch (docs/distributed.md) |
//!
//! A variable with a value we do not know is an error naming it, never silently ignored.

use anyhow::Result;
use ddpm_data::fetch::{Source, MIRROR_ENV};
use ddpm_unet::KernelPolicy;

/// The value of `name`, if it is set and not empty.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `base` (from a config, or the default) with the kernel variables of the environment applied
/// ([`KernelPolicy::with_overrides`]).
pub fn kernel_policy(base: KernelPolicy) -> Result<KernelPolicy> {
    base.with_overrides(var).map_err(anyhow::Error::msg)
}

/// Installs `base` with the environment's kernel variables applied (see [`kernel_policy`]) and
/// logs it; returns it.
pub fn install_kernel_policy(base: KernelPolicy) -> Result<KernelPolicy> {
    let policy = kernel_policy(base)?;
    policy.install();
    tracing::debug!(%policy, "kernel policy");
    Ok(policy)
}

/// The mirror named by `DDPM_DATA_MIRROR`, if it is set.
pub fn data_mirror() -> Option<Source> {
    var(MIRROR_ENV).map(|v| Source::parse(&v))
}

/// The cache of downloaded model files (pytorch-fid's Inception weights): `DDPM_CACHE_DIR`, else
/// `DATA_ROOT/cache`.
pub fn cache_dir(data_root: &std::path::Path) -> std::path::PathBuf {
    var("DDPM_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| data_root.join("cache"))
}

/// The Hugging Face Hub options of the environment, as `huggingface_hub` reads them: the
/// endpoint `HF_ENDPOINT`; the cache `HF_HUB_CACHE`, else `$HF_HOME/hub`, else the default
/// `~/.cache/huggingface/hub`; the token `HF_TOKEN`; offline mode `HF_HUB_OFFLINE` (`1`, `true`,
/// `yes`, `on`, or `0`, `false`, `no`, `off`; anything else is an error naming it); the
/// seconds a request may wait for an answer `HF_HUB_DOWNLOAD_TIMEOUT`. A progress
/// bar is shown while a file downloads when stderr is a terminal.
pub fn hub_options() -> Result<ddpm_data::hub::HubOptions> {
    let offline = match var("HF_HUB_OFFLINE").map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => true,
        Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => false,
        Some(v) => anyhow::bail!("HF_HUB_OFFLINE={v}: use 1 (offline) or 0"),
    };
    let timeout = match var("HF_HUB_DOWNLOAD_TIMEOUT") {
        None => None,
        Some(v) => match v.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 => {
                Some(std::time::Duration::from_secs_f64(secs))
            }
            _ => anyhow::bail!(
                "HF_HUB_DOWNLOAD_TIMEOUT={v}: give the seconds a Hub request may wait for an \
                 answer (more than 0, at most 86400; default {})",
                ddpm_data::hub::DEFAULT_TIMEOUT.as_secs()
            ),
        },
    };
    let cache_dir = var("HF_HUB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| var("HF_HOME").map(|h| std::path::Path::new(&h).join("hub")));
    Ok(ddpm_data::hub::HubOptions {
        endpoint: var("HF_ENDPOINT"),
        cache_dir,
        token: var("HF_TOKEN"),
        offline,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        timeout,
        retries: None,
        roots: trusted_roots(),
        proxy: proxy(),
    })
}

pub use crate::net_env::{proxy, trusted_roots};

/// Whether freed GPU memory goes back to the driver at every sync: `DDPM_CUDA_POOL=release`;
/// `keep` (the default) keeps it for reuse. Any other value is an error naming it.
pub fn cuda_pool_release() -> Result<bool> {
    ddpm_train::device::parse_cuda_pool(var("DDPM_CUDA_POOL").as_deref())
        .map_err(anyhow::Error::msg)
}

/// The data-parallel world of this process: the launcher's variables (`RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`, ...; docs/distributed.md), a single process when they are unset.
pub fn world() -> Result<ddpm_train::World, ddpm_train::distributed::DistError> {
    ddpm_train::World::from_vars(|name| std::env::var(name).ok())
}

/// candle's variable for how long its CPU worker threads spin, waiting for the next op, before
/// they sleep.
pub const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Makes candle's CPU worker threads sleep as soon as an op of candle's own ends, unless the
/// user set [`CANDLE_SPIN_LIMIT`]. By default they spin 25,000 times first, and on a machine
/// with few cores that spinning takes the cores from our kernels' threads, which run next:
/// training steps were 5-12% faster without it on a 2-core AMD EPYC (`mnist-small`, `fashion`,
/// `learnopencv`; alternating processes), sampling no slower (docs/benchmarks.md, "Kernel
/// decisions"). Call at start-up, before any other thread exists and before the first op.
pub fn park_idle_candle_threads() {
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        // Start-up is single-threaded: no other thread reads the environment meanwhile.
        std::env::set_var(CANDLE_SPIN_LIMIT, "0");
    }
}

/// Keeps library backtraces out of error messages, unless the user set `RUST_LIB_BACKTRACE`.
/// candle attaches a backtrace to its errors whenever one can be captured, and with
/// `RUST_BACKTRACE=1` in the shell that made a one-line error twenty lines long. Panics still
/// print theirs (`RUST_BACKTRACE` alone governs those once this is set). Call at start-up,
/// before any other thread exists.
pub fn no_backtraces_in_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Start-up is single-threaded: no other thread reads the environment meanwhile.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Whether mimalloc's purge delay was set by the user (`MIMALLOC_PURGE_DELAY`), to be left alone.
pub fn mimalloc_purge_delay_set() -> bool {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
}
