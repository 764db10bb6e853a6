//! Placing fetched data: a staging directory beside the target, a marker file written last, an
//! atomic rename into place, and safe archive extraction.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

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

/// Bounds on what extracting one archive may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExtractLimits {
    /// The most entries (files, directories, links...) an archive may hold.
    pub max_entries: usize,
    /// The most bytes all entries together may declare (written or skipped).
    pub max_total_bytes: u64,
    /// The largest single file.
    pub max_file_bytes: u64,
}

impl Default for ExtractLimits {
    /// Room for the data sets' archives (Flowers: 3,676 entries, 230 MB; CIFAR-10: 8 files,
    /// 185 MB, the largest 31 MB) many times over, and no more.
    fn default() -> Self {
        ExtractLimits {
            max_entries: 200_000,
            max_total_bytes: 8 << 30,
            max_file_bytes: 1 << 30,
        }
    }
}

/// What an extraction wrote and left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extracted {
    /// Regular files written.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// Entries not written (symbolic and hard links, devices, FIFOs...), with their kinds.
    pub skipped: Vec<String>,
}

/// The path of an archive entry as a safe relative path: no `..`, not absolute, not empty.
fn safe_relative(raw: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("its path climbs out with `..`"),
            Component::RootDir | Component::Prefix(_) => return Err("its path is absolute"),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("its path is empty");
    }
    Ok(out)
}

/// Extracts the regular files and directories of a `.tar.gz` into `dest` (emptied first).
///
/// Safe on hostile archives: an entry whose path is absolute or climbs out with `..` is an error
/// (nothing is written for it or after it); symbolic and hard links, devices and FIFOs are never
/// created (they are skipped, logged and listed in [`Extracted::skipped`]); files are written
/// only under `dest`, without their permissions, owners or extended attributes; and the number
/// of entries, the size of each file and the total size are bounded by `limits`. `label` names
/// the archive in errors.
pub(crate) fn extract_tar_gz(
    archive: &Path,
    dest: &Path,
    label: &str,
    limits: ExtractLimits,
) -> Result<Extracted> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(DataError::io(dest))?;
    }
    std::fs::create_dir_all(dest).map_err(DataError::io(dest))?;
    let file = File::open(archive).map_err(DataError::io(archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let bad = |entry: &str, reason: String| DataError::ArchiveEntry {
        archive: label.to_string(),
        entry: entry.to_string(),
        reason,
    };
    // A broken gzip or tar stream is reported as the archive's, not the extraction folder's.
    let broken = |e: std::io::Error| DataError::ArchiveLayout {
        archive: label.to_string(),
        reason: format!("cannot be read as a .tar.gz: {e}"),
    };
    let mut out = Extracted::default();
    let mut entries_seen = 0usize;
    let mut declared = 0u64;
    for entry in tar.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let raw = entry.path().map_err(broken)?.into_owned();
        let name = raw.display().to_string();
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(bad(
                &name,
                format!("the archive has more than {} entries", limits.max_entries),
            ));
        }
        let size = entry.size();
        declared = declared.saturating_add(size);
        if declared > limits.max_total_bytes {
            return Err(bad(
                &name,
                format!(
                    "the archive's entries declare more than {} bytes together",
                    limits.max_total_bytes
                ),
            ));
        }
        let rel = safe_relative(&raw).map_err(|why| {
            bad(
                &name,
                format!("{why}, so it would be written outside the extraction folder"),
            )
        })?;
        let kind = entry.header().entry_type();
        let target = dest.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(DataError::io(&target))?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if size > limits.max_file_bytes {
                return Err(bad(
                    &name,
                    format!(
                        "{size} bytes is more than the {} allowed for one file",
                        limits.max_file_bytes
                    ),
                ));
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
            }
            // `dest` was created empty and no link is ever written, so no path under it leads
            // elsewhere; a file named twice is replaced, as tar does.
            let mut file = File::create(&target).map_err(DataError::io(&target))?;
            let copied = std::io::copy(&mut (&mut entry).take(size), &mut file).map_err(broken)?;
            if copied != size {
                return Err(bad(
                    &name,
                    format!("the archive ends after {copied} of its {size} bytes"),
                ));
            }
            out.files += 1;
            out.bytes += size;
        } else {
            out.skipped.push(format!("{name} ({kind:?})"));
        }
    }
    if !out.skipped.is_empty() {
        tracing::warn!(
            "{label}: {} entries that are not plain files or folders were not extracted: {}",
            out.skipped.len(),
            out.skipped.join(", ")
        );
    }
    Ok(out)
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

    /// Writes a `.tar.gz` of raw entries: (name, kind, link target, data). Names go into the
    /// header as they are (`tar::Builder` refuses `..` and absolute paths, which these tests need).
    fn raw_tar_gz(path: &Path, entries: &[(&str, tar::EntryType, &str, &[u8])]) {
        let gz =
            flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
    }

    const FILE: tar::EntryType = tar::EntryType::Regular;

    fn extract(archive: &Path, out: &Path) -> Result<Extracted> {
        extract_tar_gz(archive, out, "test.tgz", ExtractLimits::default())
    }

    #[test]
    fn archives_extract_and_escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        raw_tar_gz(
            &archive,
            &[
                ("top/", tar::EntryType::Directory, "", b""),
                ("top/x.txt", FILE, "", b"abc"),
                ("./top/y.txt", FILE, "", b"de"),
            ],
        );
        let out = dir.path().join("out");
        let done = extract(&archive, &out).unwrap();
        assert_eq!((done.files, done.bytes), (2, 5));
        assert_eq!(std::fs::read(out.join("top/x.txt")).unwrap(), b"abc");
        assert_eq!(
            list_files(&out).unwrap(),
            vec![("top/x.txt".to_string(), 3), ("top/y.txt".to_string(), 2)]
        );

        for (name, why) in [
            ("../evil", "climbs out"),
            ("top/../../evil", "climbs out"),
            ("/tmp/evil-absolute", "absolute"),
        ] {
            let evil = dir.path().join("evil.tar.gz");
            raw_tar_gz(
                &evil,
                &[("ok.txt", FILE, "", b"fine"), (name, FILE, "", b"abc")],
            );
            let out = dir.path().join("sub/out");
            std::fs::create_dir_all(&out).unwrap();
            let err = extract(&evil, &out).unwrap_err();
            assert!(
                matches!(&err, DataError::ArchiveEntry { entry, reason, .. }
                    if entry == name && reason.contains(why)),
                "{name}: {err}"
            );
            assert!(err.to_string().contains("test.tgz"), "{err}");
            assert!(!dir.path().join("sub/evil").exists() && !dir.path().join("evil").exists());
            assert!(!Path::new("/tmp/evil-absolute").exists());
        }
    }

    #[test]
    fn links_and_devices_are_skipped_and_nothing_leaves_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("links.tar.gz");
        raw_tar_gz(
            &archive,
            &[
                ("a/link", tar::EntryType::Symlink, "../../..", b""),
                ("a/passwd", tar::EntryType::Symlink, "/etc/passwd", b""),
                ("a/hard", tar::EntryType::Link, "/etc/passwd", b""),
                ("a/dev", tar::EntryType::Char, "", b""),
                ("a/fifo", tar::EntryType::Fifo, "", b""),
                // Written through where the link would have been: a plain folder now.
                ("a/link/escaped.txt", FILE, "", b"x"),
                ("a/real.txt", FILE, "", b"y"),
            ],
        );
        let out = dir.path().join("out");
        let done = extract(&archive, &out).unwrap();
        assert_eq!(done.files, 2);
        assert_eq!(done.skipped.len(), 5, "{:?}", done.skipped);
        assert_eq!(
            list_files(&out).unwrap(),
            vec![
                ("a/link/escaped.txt".to_string(), 1),
                ("a/real.txt".to_string(), 1)
            ]
        );
        for name in ["link", "passwd", "hard"] {
            let meta = std::fs::symlink_metadata(out.join("a").join(name));
            assert!(meta.map_or(true, |m| !m.file_type().is_symlink()), "{name}");
        }
        assert!(!out.join("a/passwd").exists() && !out.join("a/dev").exists());
        assert!(!dir.path().join("escaped.txt").exists());
    }

    #[test]
    fn limits_on_entries_and_sizes_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("big.tar.gz");
        raw_tar_gz(
            &archive,
            &[
                ("a.bin", FILE, "", &[1; 100]),
                ("b.bin", FILE, "", &[2; 100]),
                ("c.bin", FILE, "", &[3; 100]),
            ],
        );
        let out = dir.path().join("out");
        let roomy = ExtractLimits {
            max_entries: 3,
            max_total_bytes: 300,
            max_file_bytes: 100,
        };
        assert_eq!(
            extract_tar_gz(&archive, &out, "big", roomy).unwrap().bytes,
            300
        );
        for (limits, what) in [
            (
                ExtractLimits {
                    max_entries: 2,
                    ..roomy
                },
                "more than 2 entries",
            ),
            (
                ExtractLimits {
                    max_total_bytes: 250,
                    ..roomy
                },
                "more than 250 bytes",
            ),
            (
                ExtractLimits {
                    max_file_bytes: 99,
                    ..roomy
                },
                "more than the 99 allowed",
            ),
        ] {
            let err = extract_tar_gz(&archive, &out, "big", limits).unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
        // Not a gzip stream at all.
        let junk = dir.path().join("junk.tgz");
        std::fs::write(&junk, b"not an archive").unwrap();
        let err = extract(&junk, &out).unwrap_err();
        assert!(
            matches!(&err, DataError::ArchiveLayout { archive, .. } if archive == "test.tgz"),
            "{err}"
        );
    }
}
