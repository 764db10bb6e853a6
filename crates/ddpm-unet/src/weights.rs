//! Saving and loading weights as safetensors, atomically, with checks that name the first
//! tensor that does not fit.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
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

/// The most bytes read from a text input: a TOML config or a checkpoint's JSON (ours hold a few
/// kilobytes; this leaves room for any hand-written one).
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// What a file-system object that is not a regular file is, for errors ("a FIFO (named pipe)").
pub fn file_kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

fn not_regular(meta: &fs::Metadata) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {}, not a regular file: give a file", file_kind(meta)),
    )
}

/// Checks that `path` (symlinks followed) is a regular file, before anything opens it: opening a
/// FIFO blocks until a writer comes, and a device such as `/dev/zero` never ends. The error
/// (kind `InvalidInput`) says what the path is instead; a missing path keeps its `NotFound`.
pub fn check_regular_file(path: &Path) -> std::io::Result<fs::Metadata> {
    let meta = fs::metadata(path)?;
    if meta.is_file() {
        Ok(meta)
    } else {
        Err(not_regular(&meta))
    }
}

/// Checks that `path`, a file about to be written or appended to, is a regular file or does not
/// exist yet: opening a FIFO for writing blocks until a reader comes. The error (kind
/// `InvalidInput`) says what the path is and to remove it.
pub fn check_writable_file(path: &Path) -> std::io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file: remove it", file_kind(&meta)),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads all of `path` if it is a regular file ([`check_regular_file`]) of at most `limit` bytes;
/// a larger one is refused (kind `InvalidData`) rather than read.
pub fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    check_regular_file(path)?;
    let file = fs::File::open(path)?;
    // Checked again on what was opened, in case the path was replaced in between.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let too_big = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is {len} bytes, more than the {} MB read from such a file: is it the \
                 right file?",
                limit >> 20
            ),
        )
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_regular_file`] of a UTF-8 text file of at most [`MAX_TEXT_BYTES`].
pub fn read_regular_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular_file(path, MAX_TEXT_BYTES)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not UTF-8 text: is it the right file?",
        )
    })
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
    let bytes = read_regular_file(path, u64::MAX).map_err(|e| err(format!("cannot read: {e}")))?;
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
    fn only_regular_files_of_at_most_the_limit_are_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a.toml");
        fs::write(&file, b"steps = 1\n").expect("written");
        assert_eq!(read_regular_file(&file, 10).expect("read"), b"steps = 1\n");
        let e = read_regular_file(&file, 9).expect_err("too big");
        assert!(e.to_string().contains("it is 10 bytes"), "{e}");
        let e = read_regular_file(dir.path(), 100).expect_err("a directory");
        assert!(
            e.to_string()
                .contains("it is a directory, not a regular file"),
            "{e}"
        );
        let missing = read_regular_file(&dir.path().join("none"), 100).expect_err("missing");
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        #[cfg(unix)]
        {
            let fifo = dir.path().join("f.json");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo runs");
            assert!(made.success());
            // Opening it would block until a writer came: refused before that.
            let e = read_regular_text(&fifo).expect_err("a FIFO");
            assert!(
                e.to_string()
                    .contains("a FIFO (named pipe), not a regular file"),
                "{e}"
            );
            let e = read_regular_text(Path::new("/dev/zero")).expect_err("a device");
            assert!(e.to_string().contains("a character device"), "{e}");
            let e = read_safetensors(&fifo, &Device::Cpu).expect_err("a FIFO");
            assert!(e.to_string().contains("a FIFO"), "{e}");
        }
    }
}
