//! Saving and loading weights as safetensors, atomically, with checks that name the first
//! tensor that does not fit.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::UnetError;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed to disk,
/// then renamed over `path` (and the directory synced), so a crash leaves either the old file or
/// the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            // Persist the rename; some filesystems do not support syncing a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

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
    let bytes = fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
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
