//! Saving and loading weights as safetensors, atomically, with checks that name the first
//! tensor that does not fit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::UnetError;

/// Serializes named tensors and string metadata into safetensors bytes.
pub fn to_safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, UnetError> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    safetensors::serialize(contiguous, Some(metadata)).map_err(|e| UnetError::Weights {
        path: "<memory>".into(),
        reason: e.to_string(),
    })
}

/// Named tensors and metadata read from a safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// Tensors by name, on the requested device.
    pub tensors: HashMap<String, Tensor>,
    /// The file's `__metadata__` entries.
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file, turning any I/O or format problem into an error naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<SafetensorsFile, UnetError> {
    let err = |reason: String| UnetError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let bytes =
        ddpm_fs::read_regular_file(path, u64::MAX).map_err(|e| err(format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        err(format!(
            "not a valid safetensors file (truncated or corrupt?): {e}"
        ))
    })?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| err(format!("cannot decode tensors: {e}")))?;
    Ok(SafetensorsFile { tensors, metadata })
}

/// Copies `tensors` into `vars` after checking that both hold exactly the same names and shapes;
/// the error names the first tensor that differs and both shapes. Nothing is changed on error.
pub fn assign_checked(
    vars: &BTreeMap<String, Var>,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), UnetError> {
    for (name, var) in vars {
        match tensors.get(name) {
            None => {
                return Err(UnetError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                })
            }
            Some(t) if t.dims() != var.dims() => {
                return Err(UnetError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                })
            }
            Some(t) if !t.dtype().is_float() => {
                return Err(UnetError::NotFloat {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    found: t.dtype(),
                })
            }
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !vars.contains_key(*k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(UnetError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: (*name).clone(),
        });
    }
    for (name, var) in vars {
        if let Some(t) = tensors.get(name) {
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weights_file_that_is_not_regular_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = read_safetensors(dir.path(), &Device::Cpu).expect_err("a directory");
        assert!(e.to_string().contains("a directory"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("f.safetensors");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo runs");
            assert!(made.success());
            let e = read_safetensors(&fifo, &Device::Cpu).expect_err("a FIFO");
            assert!(e.to_string().contains("a FIFO"), "{e}");
        }
    }
}
