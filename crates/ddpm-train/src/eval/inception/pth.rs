//! Reading the float tensors of a PyTorch state dict saved by `torch.save`, in either format:
//! the zip archive of PyTorch >= 1.6 (through `candle_core::pickle`) or the older "legacy"
//! format that pytorch-fid's weights file predates it in (PyTorch 1.0, 2019).
//!
//! A legacy file is five pickles and the raw storages: a magic number, the protocol version,
//! system information, the state dict (each tensor a `_rebuild_tensor_v2` call whose storage is
//! a persistent id `('storage', FloatStorage, key, location, numel, None)`), the list of storage
//! keys, then for each key in that order its element count (8 bytes, little-endian) and its
//! elements. Every count and offset is checked against the file's length, so a damaged file is
//! an error naming it, never a panic.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

use crate::{Result, TrainError};

/// The first pickle of a legacy `torch.save` file: protocol 2, `LONG1` of 10 bytes holding
/// PyTorch's magic number `0x1950a86a20f9469cfc6c`, `STOP`.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// The start of a zip archive (`PK\x03\x04`).
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

/// Whether `bytes` start like a legacy `torch.save` file.
pub fn is_legacy(bytes: &[u8]) -> bool {
    bytes.starts_with(&LEGACY_MAGIC)
}

/// Whether `bytes` start like a zip archive (`torch.save` since PyTorch 1.6).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(&ZIP_MAGIC)
}

fn bad(path: &Path, what: impl std::fmt::Display) -> TrainError {
    TrainError::Other(format!(
        "{} is not a readable PyTorch state dict ({what}); download it again",
        path.display()
    ))
}

/// Reads the float (`FloatStorage`, `DoubleStorage`) tensors of a state dict in a `.pth` file of
/// either format, on the CPU, by name. Other tensors (`num_batches_tracked`) are left out.
pub fn read_pth(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = ddpm_fs::check_regular_file(path)
        .and_then(|_| std::fs::read(path))
        .map_err(|source| TrainError::Io {
            what: "reading weights".into(),
            path: path.to_path_buf(),
            source,
        })?;
    if is_zip(&bytes) {
        let tensors = candle_core::pickle::read_all(path).map_err(|e| bad(path, e))?;
        return Ok(tensors
            .into_iter()
            .filter(|(_, t)| t.dtype().is_float())
            .collect());
    }
    if !is_legacy(&bytes) {
        return Err(bad(
            path,
            "neither a zip archive nor a legacy torch.save file",
        ));
    }
    read_legacy(path, &bytes)
}

/// One tensor of the state dict: its storage key, type and view.
struct Entry {
    name: String,
    key: String,
    elem: usize,
    double: bool,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn read_pickle(path: &Path, cursor: &mut Cursor<&[u8]>) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(cursor).map_err(|e| bad(path, e))?;
    stack.finalize().map_err(|e| bad(path, e))
}

fn usizes(path: &Path, obj: Object) -> Result<Vec<usize>> {
    match obj {
        Object::Tuple(items) => items
            .into_iter()
            .map(|o| match o {
                Object::Int(i) if i >= 0 => Ok(i as usize),
                Object::Long(i) if i >= 0 => Ok(i as usize),
                other => Err(bad(path, format!("a size or stride {other:?}"))),
            })
            .collect(),
        other => Err(bad(path, format!("sizes {other:?}"))),
    }
}

fn int(path: &Path, obj: &Object) -> Result<usize> {
    match obj {
        Object::Int(i) if *i >= 0 => Ok(*i as usize),
        Object::Long(i) if *i >= 0 => Ok(*i as usize),
        other => Err(bad(path, format!("an integer {other:?}"))),
    }
}

/// The tensor entry of `value` (a `_rebuild_tensor_v2` call, possibly in `_rebuild_parameter`),
/// `None` for anything else or a storage type other than float/double.
fn entry(path: &Path, name: String, value: Object) -> Result<Option<Entry>> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (callable, args) = match (*callable, *args) {
        (Object::Class { class_name, .. }, Object::Tuple(mut a))
            if class_name == "_rebuild_parameter" && !a.is_empty() =>
        {
            match a.remove(0) {
                Object::Reduce { callable, args } => (*callable, *args),
                _ => return Ok(None),
            }
        }
        other => other,
    };
    match &callable {
        Object::Class { class_name, .. } if class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    let Object::Tuple(mut args) = args else {
        return Err(bad(path, format!("the arguments of tensor {name}")));
    };
    if args.len() < 4 {
        return Err(bad(path, format!("the arguments of tensor {name}")));
    }
    let stride = usizes(path, args.remove(3))?;
    let size = usizes(path, args.remove(2))?;
    let offset = int(path, &args[1])?;
    let Object::PersistentLoad(storage) = args.remove(0) else {
        return Err(bad(path, format!("the storage of tensor {name}")));
    };
    let Object::Tuple(storage) = *storage else {
        return Err(bad(path, format!("the storage of tensor {name}")));
    };
    let (class, key) = match (storage.get(1), storage.get(2)) {
        (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) => {
            (class_name.clone(), key.clone())
        }
        _ => return Err(bad(path, format!("the storage of tensor {name}"))),
    };
    let (elem, double) = match class.as_str() {
        "FloatStorage" => (4, false),
        "DoubleStorage" => (8, true),
        _ => return Ok(None),
    };
    if size.len() != stride.len() {
        return Err(bad(
            path,
            format!("tensor {name} has {size:?} with strides {stride:?}"),
        ));
    }
    Ok(Some(Entry {
        name,
        key,
        elem,
        double,
        offset,
        size,
        stride,
    }))
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let mut cursor = Cursor::new(&bytes[LEGACY_MAGIC.len()..]);
    let _protocol = read_pickle(path, &mut cursor)?;
    let _sys_info = read_pickle(path, &mut cursor)?;
    let state = read_pickle(path, &mut cursor)?;
    let keys = match read_pickle(path, &mut cursor)? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| match k {
                Object::Unicode(k) => Ok(k),
                other => Err(bad(path, format!("a storage key {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        other => Err(bad(path, format!("the storage keys {other:?}")))?,
    };
    let Object::Dict(items) = state else {
        return Err(bad(path, "the saved object is not a state dict"));
    };
    let mut entries = Vec::new();
    for (name, value) in items {
        if let Object::Unicode(name) = name {
            if let Some(e) = entry(path, name, value)? {
                entries.push(e);
            }
        }
    }
    // The storages follow the pickles in the order of `keys`: an 8-byte element count, then the
    // elements. Their element size is the type of the tensors that use them.
    let elem_of: HashMap<&str, usize> = entries.iter().map(|e| (e.key.as_str(), e.elem)).collect();
    let mut pos = LEGACY_MAGIC.len() + cursor.position() as usize;
    let mut storages: HashMap<String, (usize, usize)> = HashMap::new();
    for key in keys {
        let count_end = pos
            .checked_add(8)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| bad(path, "a storage runs past the end of the file"))?;
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[pos..count_end]);
        let count =
            usize::try_from(u64::from_le_bytes(count)).map_err(|_| bad(path, "a storage size"))?;
        // A storage no float tensor uses (e.g. num_batches_tracked's LongStorage) is 8 bytes a
        // value in the files this reads; it is skipped.
        let elem = elem_of.get(key.as_str()).copied().unwrap_or(8);
        let len = count
            .checked_mul(elem)
            .and_then(|n| n.checked_add(count_end))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| bad(path, format!("storage {key} runs past the end of the file")))?;
        storages.insert(key, (count_end, count));
        pos = len;
    }
    let mut out = HashMap::new();
    for e in entries {
        let &(start, count) = storages
            .get(&e.key)
            .ok_or_else(|| bad(path, format!("tensor {} has no storage", e.name)))?;
        let numel: usize = e.size.iter().product();
        // Only row-major contiguous views (what state dicts hold).
        let mut expect = 1usize;
        for (&d, &s) in e.size.iter().zip(&e.stride).rev() {
            if d > 1 && s != expect {
                return Err(bad(path, format!("tensor {} is not contiguous", e.name)));
            }
            expect = expect.saturating_mul(d);
        }
        if e.offset.checked_add(numel).is_none_or(|end| end > count) {
            return Err(bad(
                path,
                format!("tensor {} runs past its storage", e.name),
            ));
        }
        let data = &bytes[start + e.offset * e.elem..start + (e.offset + numel) * e.elem];
        let values: Vec<f32> = if e.double {
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect()
        } else {
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect()
        };
        let tensor = Tensor::from_vec(values, e.size.as_slice(), &Device::Cpu)?;
        out.insert(e.name, tensor);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fixtures/legacy.pth` and `fixtures/zip.pth`: `torch.save` of
    /// `{"a.weight": arange(6).reshape(2, 3) / 4, "a.bias": [-1.5, 2.0], "n": tensor(7)}` in the
    /// legacy and the zip format (written by bench/parity/inception.py --fixtures).
    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/eval/inception/fixtures")
            .join(name)
    }

    #[test]
    fn both_torch_save_formats_read_the_same_tensors() {
        for name in ["legacy.pth", "zip.pth"] {
            let t = read_pth(&fixture(name)).expect(name);
            let mut names: Vec<_> = t.keys().cloned().collect();
            names.sort();
            assert_eq!(names, ["a.bias", "a.weight"], "{name}");
            let w = t["a.weight"].to_vec2::<f32>().expect("w");
            assert_eq!(w, [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]], "{name}");
            assert_eq!(t["a.bias"].to_vec1::<f32>().expect("b"), [-1.5, 2.0]);
        }
    }

    #[test]
    fn a_truncated_or_foreign_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let bytes = std::fs::read(fixture("legacy.pth")).expect("fixture");
        for cut in [LEGACY_MAGIC.len() + 3, bytes.len() / 2, bytes.len() - 3] {
            let p = dir.path().join(format!("cut{cut}.pth"));
            std::fs::write(&p, &bytes[..cut]).expect("write");
            let e = read_pth(&p).expect_err("truncated");
            assert!(e.to_string().contains("download it again"), "{e}");
        }
        let p = dir.path().join("text.pth");
        std::fs::write(&p, b"not a checkpoint").expect("write");
        assert!(read_pth(&p).is_err());
        assert!(read_pth(&dir.path().join("missing.pth")).is_err());
    }
}
