//! Placing fetched data: a staging directory beside the target, a marker file written last, an
//! atomic rename into place, and safe archive extraction.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// The marker file written last into a fetched data set's directory.
pub const MARKER: &str = ".ddpm-fetch.json";

/// One file of a fetched data set, as recorded in the marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    pub path: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What a completed fetch placed, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub format: u32,
    pub dataset: String,
    pub source: String,
    /// Whether every file of the canonical data set is there (false: MNIST test split only).
    pub complete: bool,
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<FileRecord>,
    pub files: Vec<FileRecord>,
}

impl Marker {
    pub fn new(dataset: &str, source: String, complete: bool) -> Self {
        Marker {
            format: 1,
            dataset: dataset.to_string(),
            source,
            complete,
            notes: Vec::new(),
            archive: None,
            files: Vec::new(),
        }
    }

    /// The total size of the recorded files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Reads the marker of `target` and checks cheaply (existence and size of every recorded file)
/// that the data set is still there; `None` if not.
pub(crate) fn check_marker(target: &Path, dataset: &str) -> Option<Marker> {
    let text = std::fs::read_to_string(target.join(MARKER)).ok()?;
    let marker: Marker = serde_json::from_str(&text).ok()?;
    if marker.format != 1 || marker.dataset != dataset || marker.files.is_empty() {
        return None;
    }
    for f in &marker.files {
        match std::fs::metadata(target.join(&f.path)) {
            Ok(m) if m.is_file() && m.len() == f.size => {}
            _ => {
                tracing::warn!(
                    "{} changed since it was fetched ({} is missing or has another size)",
                    target.display(),
                    f.path
                );
                return None;
            }
        }
    }
    Some(marker)
}

/// A staging directory `<data>/.<name>.partial/` beside the target `<data>/<name>/`.
///
/// `downloads/` keeps partial downloads across runs (for resume); `tree/` is built into the
/// final layout and renamed into place by [`Staging::finish`].
pub(crate) struct Staging {
    pub root: PathBuf,
    pub downloads: PathBuf,
    pub tree: PathBuf,
    pub extract: PathBuf,
}

impl Staging {
    pub fn open(data_dir: &Path, name: &str) -> Result<Self> {
        let root = data_dir.join(format!(".{name}.partial"));
        let staging = Staging {
            downloads: root.join("downloads"),
            tree: root.join("tree"),
            extract: root.join("extract"),
            root,
        };
        for dir in [&staging.downloads, &staging.tree] {
            std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
        }
        Ok(staging)
    }

    /// Writes the marker into the tree (last), then moves the tree into place as `target`,
    /// replacing what was there, and removes the staging directory.
    pub fn finish(self, target: &Path, marker: &Marker) -> Result<()> {
        let marker_path = self.tree.join(MARKER);
        let json = serde_json::to_string_pretty(marker)
            .map_err(|e| DataError::io(&marker_path)(e.into()))?;
        let mut file = File::create(&marker_path).map_err(DataError::io(&marker_path))?;
        file.write_all(json.as_bytes())
            .and_then(|_| file.sync_all())
            .map_err(DataError::io(&marker_path))?;
        let old = self.root.join("replaced");
        if target.exists() {
            tracing::info!("replacing {}", target.display());
            std::fs::rename(target, &old).map_err(DataError::io(target))?;
        }
        std::fs::rename(&self.tree, target).map_err(DataError::io(target))?;
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!("could not remove {}: {e}", self.root.display());
        }
        Ok(())
    }

    /// Whether anything worth resuming is there: a partial download or files already verified.
    pub fn has_progress(&self) -> bool {
        let partial = std::fs::read_dir(&self.downloads).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
        });
        let verified = std::fs::read_dir(&self.tree).is_ok_and(|mut rd| rd.next().is_some());
        partial || verified
    }

    /// Removes the staging directory and everything in it.
    pub fn discard(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}", self.root.display());
            }
        }
    }
}

/// Extracts the regular files and directories of a `.tar.gz` into `dest` (emptied first); an
/// entry whose path would leave `dest` is an error.
pub(crate) fn extract_tar_gz(archive: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(DataError::io(dest))?;
    }
    std::fs::create_dir_all(dest).map_err(DataError::io(dest))?;
    let file = File::open(archive).map_err(DataError::io(archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    tar.set_preserve_permissions(false);
    tar.set_unpack_xattrs(false);
    let io = DataError::io(archive);
    let entries = tar.entries().map_err(io)?;
    for entry in entries {
        let mut entry = entry.map_err(DataError::io(archive))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let inside = entry.unpack_in(dest).map_err(DataError::io(archive))?;
        if !inside {
            return Err(DataError::ArchiveLayout {
                archive: archive.display().to_string(),
                reason: format!("entry {name:?} would be written outside the extraction directory"),
            });
        }
    }
    Ok(())
}

/// Lists the files under `dir` (relative paths with `/`, sorted), skipping the marker.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<(String, u64)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(DataError::io(dir))? {
            let entry = entry.map_err(DataError::io(dir))?;
            let path = entry.path();
            let meta = entry.metadata().map_err(DataError::io(&path))?;
            if meta.is_dir() {
                walk(base, &path, out)?;
            } else if meta.is_file() {
                let rel = path.strip_prefix(base).unwrap_or(&path);
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                let rel = rel.join("/");
                if rel != MARKER {
                    out.push((rel, meta.len()));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_detect_missing_and_resized_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("set");
        let staging = Staging::open(dir.path(), "set").unwrap();
        std::fs::write(staging.tree.join("a.bin"), b"12345").unwrap();
        let mut marker = Marker::new("set", "test".into(), true);
        marker.files.push(FileRecord {
            path: "a.bin".into(),
            size: 5,
            md5: None,
            sha256: None,
        });
        staging.finish(&target, &marker).unwrap();
        assert!(!dir.path().join(".set.partial").exists());
        assert_eq!(check_marker(&target, "set"), Some(marker));
        assert_eq!(check_marker(&target, "other"), None);
        std::fs::write(target.join("a.bin"), b"1234").unwrap();
        assert_eq!(check_marker(&target, "set"), None);
        std::fs::remove_file(target.join("a.bin")).unwrap();
        assert_eq!(check_marker(&target, "set"), None);
    }

    #[test]
    fn finishing_replaces_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("set");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("stale"), b"x").unwrap();
        let staging = Staging::open(dir.path(), "set").unwrap();
        std::fs::write(staging.tree.join("new"), b"y").unwrap();
        staging
            .finish(&target, &Marker::new("set", "t".into(), true))
            .unwrap();
        assert!(!target.join("stale").exists());
        assert!(target.join("new").exists() && target.join(MARKER).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn archives_extract_and_escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            File::create(&archive).unwrap(),
            flate2::Compression::fast(),
        );
        let mut builder = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header.clone(), "top/x.txt", &b"abc"[..])
            .unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        let out = dir.path().join("out");
        extract_tar_gz(&archive, &out).unwrap();
        assert_eq!(std::fs::read(out.join("top/x.txt")).unwrap(), b"abc");
        assert_eq!(
            list_files(&out).unwrap(),
            vec![("top/x.txt".to_string(), 3)]
        );

        // An entry named "../evil" (written raw, as tar::Builder refuses such names).
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..7].copy_from_slice(b"../evil");
        header.set_size(3);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut raw = header.as_bytes().to_vec();
        raw.extend_from_slice(b"abc");
        raw.resize(512 * 2, 0);
        raw.extend_from_slice(&[0; 1024]);
        let evil = dir.path().join("evil.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&evil).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap();
        let out2 = dir.path().join("sub/out");
        std::fs::create_dir_all(&out2).unwrap();
        let r = extract_tar_gz(&evil, &out2);
        assert!(r.is_err(), "{r:?}");
        assert!(!dir.path().join("sub/evil").exists());
    }
}
