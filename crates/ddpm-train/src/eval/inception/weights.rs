//! pytorch-fid's Inception weights: fetched once into a cache directory, verified against the
//! SHA-256 prefix their file name carries (`pt_inception-2015-12-05-6726825d.pth`: the digest
//! starts with `6726825d`, torch.hub's convention), and read from `.pth` (either `torch.save`
//! format) or `.safetensors` with the same tensor names.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ddpm_data::fetch::{fetch_file, FetchOptions};
use sha2::{Digest, Sha256};

use super::pth;
use crate::{Result, TrainError};

/// The file name of pytorch-fid's FID Inception weights (ported from TensorFlow's
/// `inception-2015-12-05`); the hex digits before the extension begin its SHA-256.
pub const FID_WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";

/// Where pytorch-fid publishes [`FID_WEIGHTS_FILE`] (its GitHub release `fid_weights`).
pub const FID_WEIGHTS_URL: &str =
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// The SHA-256 prefix a weights file name carries: the hex digits between its last `-` and the
/// first `.` after it (`pt_inception-2015-12-05-6726825d.pth` -> `6726825d`), torch.hub's
/// convention; `None` without one (fewer than 8 hex digits).
pub fn hash_prefix(file_name: &str) -> Option<&str> {
    let stem = file_name.split('.').next()?;
    let prefix = stem.rsplit('-').next()?;
    (prefix.len() >= 8 && prefix.bytes().all(|b| b.is_ascii_hexdigit())).then_some(prefix)
}

/// The lowercase hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| TrainError::Io {
        what: "reading weights".into(),
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Errors unless the SHA-256 of `path` starts with `prefix` (hex, any case).
pub fn verify_prefix(path: &Path, prefix: &str) -> Result<()> {
    let digest = sha256_file(path)?;
    if digest.starts_with(&prefix.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(TrainError::Other(format!(
            "Inception weights {} have SHA-256 {}..., not the {prefix}... their name promises: \
             the file is damaged or not pytorch-fid's; it was deleted, fetch it again",
            path.display(),
            &digest[..prefix.len().min(digest.len())]
        )))
    }
}

/// The last segment of a URL or path.
fn file_name(source: &str) -> &str {
    let trimmed = source.trim_end_matches('/');
    let name = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed);
    name.split(['?', '#']).next().unwrap_or(name)
}

/// The weights named by `source` (a URL such as [`FID_WEIGHTS_URL`], `file://PATH` or a local
/// path) in `cache_dir`, fetched there once: a cached copy whose SHA-256 starts with the prefix
/// of its name ([`hash_prefix`]) is used as it is; otherwise the file is fetched (retried,
/// resumed) into `cache_dir/.NAME.partial`, verified, and renamed into place. A copy that fails
/// verification is deleted and named in the error. `progress` draws a progress bar.
pub fn ensure_weights(cache_dir: &Path, source: &str, progress: bool) -> Result<PathBuf> {
    let opts = FetchOptions {
        progress,
        ..FetchOptions::new(cache_dir)
    };
    ensure_weights_with(cache_dir, source, &opts)
}

/// [`ensure_weights`] with the fetch's retries, timeout and progress bar from `opts`.
pub fn ensure_weights_with(cache_dir: &Path, source: &str, opts: &FetchOptions) -> Result<PathBuf> {
    let name = file_name(source);
    let prefix = hash_prefix(name).ok_or_else(|| {
        TrainError::Other(format!(
            "cannot verify Inception weights {source}: the file name carries no SHA-256 prefix \
             (like pt_inception-2015-12-05-6726825d.pth); load a file you trust by path instead"
        ))
    })?;
    let dest = cache_dir.join(name);
    if dest.is_file() {
        match verify_prefix(&dest, prefix) {
            Ok(()) => return Ok(dest),
            Err(e) => {
                tracing::warn!("{e}");
                std::fs::remove_file(&dest).map_err(|source| TrainError::Io {
                    what: "deleting damaged weights".into(),
                    path: dest.clone(),
                    source,
                })?;
            }
        }
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| TrainError::Io {
        what: "creating the weights cache".into(),
        path: cache_dir.to_path_buf(),
        source,
    })?;
    let part = cache_dir.join(format!(".{name}.partial"));
    fetch_file(source, &part, name, opts).map_err(|e| {
        TrainError::Other(format!(
            "fetching Inception weights from {source}: {} (or download the file yourself and \
             pass its path)",
            e.chain()
        ))
    })?;
    if let Err(e) = verify_prefix(&part, prefix) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &dest).map_err(|source| TrainError::Io {
        what: "placing verified weights".into(),
        path: dest.clone(),
        source,
    })?;
    Ok(dest)
}

/// The tensors of a weights file by name, on `device`: `.safetensors`, or a PyTorch state dict
/// (`.pth`, zip or legacy `torch.save`).
pub fn read_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(TrainError::Other(format!(
            "Inception weights {} do not exist: fetch pytorch-fid's {FID_WEIGHTS_FILE} \
             ({FID_WEIGHTS_URL})",
            path.display()
        )));
    }
    let tensors = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            TrainError::Other(format!(
                "{} is not a readable safetensors file ({e})",
                path.display()
            ))
        })?
    } else {
        pth::read_pth(path)?
    };
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed download names the URL and why it failed (here the refused connection), not the
    /// URL alone.
    #[test]
    fn a_failed_download_says_why() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/{FID_WEIGHTS_FILE}");
        let cache = tempfile::tempdir().unwrap();
        let opts = FetchOptions {
            retries: 0,
            progress: false,
            ..FetchOptions::new(cache.path())
        };
        let err = ensure_weights_with(cache.path(), &url, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&url) && err.to_ascii_lowercase().contains("refused"),
            "{err}"
        );
        assert!(!cache.path().join(FID_WEIGHTS_FILE).exists());
    }

    #[test]
    fn the_hash_prefix_comes_from_the_name() {
        assert_eq!(hash_prefix(FID_WEIGHTS_FILE), Some("6726825d"));
        assert_eq!(file_name(FID_WEIGHTS_URL), FID_WEIGHTS_FILE);
        assert_eq!(hash_prefix("inception.pth"), None);
        assert_eq!(hash_prefix("pt_inception-2015.pth"), None);
        assert_eq!(hash_prefix("x-6726825z.pth"), None);
    }

    /// A file named after its own digest's first 8 hex digits.
    fn named_by_digest(dir: &Path, bytes: &[u8]) -> PathBuf {
        let digest = hex::encode(Sha256::digest(bytes));
        let path = dir.join(format!("w-{}.pth", &digest[..8]));
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn weights_are_copied_once_and_verified() {
        let src = tempfile::tempdir().expect("tmp");
        let cache = tempfile::tempdir().expect("tmp");
        let file = named_by_digest(src.path(), b"some weights");
        let source = file.to_string_lossy().to_string();
        let cached = ensure_weights(cache.path(), &source, false).expect("fetch");
        assert_eq!(cached, cache.path().join(file.file_name().expect("name")));
        assert_eq!(std::fs::read(&cached).expect("read"), b"some weights");
        // Cached: the source is no longer needed.
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(
            ensure_weights(cache.path(), &source, false).expect("again"),
            cached
        );
        // A damaged cached copy is deleted (and, with the source gone, the fetch fails).
        std::fs::write(&cached, b"other bytes").expect("write");
        let e = ensure_weights(cache.path(), &source, false).expect_err("gone");
        assert!(e.to_string().contains("fetching Inception weights"), "{e}");
        assert!(!cached.exists());
    }

    #[test]
    fn a_wrong_prefix_is_refused_and_deleted() {
        let src = tempfile::tempdir().expect("tmp");
        let cache = tempfile::tempdir().expect("tmp");
        let file = src.path().join(FID_WEIGHTS_FILE);
        std::fs::write(&file, b"not the weights").expect("write");
        let e = ensure_weights(cache.path(), &file.to_string_lossy(), false).expect_err("bad");
        let msg = e.to_string();
        assert!(msg.contains("not the 6726825d"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(std::fs::read_dir(cache.path()).expect("ls").count(), 0);
        // No prefix in the name, or no file: errors naming the file.
        let plain = src.path().join("inception.pth");
        std::fs::write(&plain, b"x").expect("write");
        assert!(ensure_weights(cache.path(), &plain.to_string_lossy(), false).is_err());
        let missing = src.path().join("gone-6726825d.pth");
        let e = ensure_weights(cache.path(), &missing.to_string_lossy(), false).expect_err("no");
        assert!(e.to_string().contains("gone-6726825d.pth"), "{e}");
        let e = read_weights(&missing, &Device::Cpu).expect_err("no");
        assert!(e.to_string().contains("do not exist"), "{e}");
    }
}
