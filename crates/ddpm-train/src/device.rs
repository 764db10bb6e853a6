//! Parsing `--device cpu|cuda[:N]`.

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
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
