//! Parsing `--device cpu|cuda[:N]`, and how freed memory is kept for reuse on each device.

use candle_core::Device;

use crate::{Result, TrainError};

/// Parses `cpu`, `cuda` or `cuda:N` into a device. Without the `cuda` feature, asking for CUDA is
/// an error that says how to get a CUDA build.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                TrainError::Config(format!("bad device `{spec}`: use cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(TrainError::Config(format!(
                "unknown device `{spec}`: use cpu, cuda or cuda:N"
            )))
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(TrainError::Config(format!(
            "device `{spec}` asked for, but this ddpm was built without CUDA support: rebuild \
             with `--features cuda` (see README) or use --device cpu"
        )));
    }
    check_ordinal(&spec, ordinal)?;
    let device = Device::new_cuda(ordinal)?;
    keep_freed_memory(ordinal)?;
    Ok(device)
}

/// An error naming the devices there are when `cuda:N` asks for one beyond them (the driver's
/// own answer is an opaque `CUDA_ERROR_INVALID_DEVICE`).
#[cfg(feature = "cuda")]
pub(crate) fn check_ordinal(spec: &str, ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    match CudaContext::device_count() {
        Ok(n) if n <= 0 => Err(TrainError::Config(format!(
            "device `{spec}` asked for, but the NVIDIA driver reports no CUDA device: use --device cpu"
        ))),
        Ok(n) if ordinal >= n as usize => Err(TrainError::Config(format!(
            "device `{spec}` asked for, but this machine has {n} CUDA device(s): use cuda:0 to \
             cuda:{} (nvidia-smi lists them)",
            n - 1
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(TrainError::Config(format!(
            "device `{spec}`: the NVIDIA driver could not be queried ({e}); is the driver \
             (libcuda.so.1) installed and a GPU visible?"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn check_ordinal(_spec: &str, _ordinal: usize) -> Result<()> {
    Ok(())
}

/// Whether [`parse_device`] leaves a CUDA device's memory pool at the driver's default (freed
/// memory handed back at every synchronization) instead of keeping it; see
/// [`set_cuda_pool_release`].
static CUDA_POOL_RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`parse_device`] leave CUDA memory pools at the driver's default (`true`), to compare
/// with keeping freed memory (`false`, the default). The `ddpm` binary sets it from
/// `DDPM_CUDA_POOL=release`.
pub fn set_cuda_pool_release(release: bool) {
    CUDA_POOL_RELEASE.store(release, std::sync::atomic::Ordering::Relaxed);
}

/// The CUDA pool choice a user wrote (`DDPM_CUDA_POOL`): `release` (true), `keep` or nothing
/// (false), in any case; anything else is an error that says what is accepted.
pub fn parse_cuda_pool(value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("keep") => Ok(false),
        Some("release") => Ok(true),
        Some(other) => Err(format!(
            "DDPM_CUDA_POOL={other}: use release (hand freed GPU memory back to the driver at \
             every sync) or keep (the default: keep it for reuse)"
        )),
    }
}

/// candle allocates a fresh buffer for every op through the device's default stream-ordered
/// memory pool, whose default release threshold of 0 hands freed memory back to the driver at
/// every synchronization; the next step must then map it again. Keeping it in the pool (as
/// PyTorch's caching allocator does) makes allocation nearly free. [`set_cuda_pool_release`]
/// keeps the driver's default, to compare.
#[cfg(feature = "cuda")]
fn keep_freed_memory(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if CUDA_POOL_RELEASE.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let fail = |what: &str, r: sys::CUresult| {
        TrainError::Config(format!("CUDA device {ordinal}: {what} failed ({r:?})"))
    };
    // SAFETY: plain driver calls on out-parameters that live for the duration of each call.
    unsafe {
        let mut dev: sys::CUdevice = 0;
        let r = sys::cuDeviceGet(&mut dev, ordinal as i32);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("cuDeviceGet", r));
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            // No memory pools on this device: candle then allocates synchronously anyway.
            tracing::debug!("no default memory pool on CUDA device {ordinal} ({r:?})");
            return Ok(());
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("setting the memory pool's release threshold", r));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_memory(_ordinal: usize) -> Result<()> {
    Ok(())
}

/// mimalloc's `mi_option_purge_delay` (index 15 of `mi_option_e` in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps memory that the process frees for its own reuse instead of handing it back to the OS,
/// for programs whose global allocator is mimalloc (the `ddpm` binary, the benchmarks).
///
/// candle allocates a fresh buffer for every op. By default mimalloc returns freed pages to the
/// OS after 10 ms (its default; tidy: not a timing), so every training step faults the same
/// memory in again, and with transparent
/// huge pages the kernel zeroes 2 MiB per fault: a large part of a CPU training step on our
/// 2-core machines. The peak resident memory does not grow (freed memory is reused, not added
/// to). Callers leave a `MIMALLOC_PURGE_DELAY` the user set in force by not calling this.
/// Harmless when mimalloc is linked but not the global allocator.
pub fn keep_freed_host_memory() {
    // SAFETY: sets one integer option; called at start-up, before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cuda_pool_choice_is_release_keep_or_an_error() {
        assert_eq!(parse_cuda_pool(None), Ok(false));
        assert_eq!(parse_cuda_pool(Some("keep")), Ok(false));
        assert_eq!(parse_cuda_pool(Some(" Release ")), Ok(true));
        let e = parse_cuda_pool(Some("yes")).unwrap_err();
        assert!(
            e.starts_with("DDPM_CUDA_POOL=yes") && e.contains("release"),
            "{e}"
        );
    }

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(parse_device("cpu").is_ok_and(|d| d.is_cpu()));
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("without CUDA"), "{e}");
        }
    }
}
