//! Fetching the canonical data sets into the data directory, verified and placed atomically.
//!
//! [`fetch`] downloads (or copies from a mirror) the files of MNIST, CIFAR-10 or Flowers into
//! `<data>/mnist/*.gz`, `<data>/cifar10/cifar-10-batches-bin/*.bin` and `<data>/flowers/<class>/`.
//!
//! - **Verification.** Every file is checked before it is placed: MNIST's four IDX files and
//!   CIFAR-10's archive against the md5 checksums torchvision pins ([`MNIST_FILES`],
//!   [`CIFAR10_MD5`]), plus the mirror's `SHA256SUMS` where a mirror has one. A Flowers mirror must
//!   list every file in `flowers/SHA256SUMS`. A mismatch deletes what was fetched and names the
//!   file.
//! - **Atomic placement.** Files are fetched into `<data>/.<name>.partial/`, checked, arranged in
//!   the final layout there, a marker file ([`MARKER`]) recording each file's size and checksum is
//!   written last, and the directory is renamed into place: an interrupted fetch never leaves a
//!   data set that looks complete.
//! - **Resume and retries.** Network errors are retried with exponential backoff, each retry
//!   resuming with an HTTP `Range` request; a download that still fails keeps its partial file in
//!   the staging directory, and the next run resumes it.
//! - **No-op when present.** If the marker is there and every recorded file has its recorded size,
//!   nothing is fetched.
//! - **Mirrors.** [`Source::Dir`] or [`Source::Url`] fetch the same files from a directory or
//!   another base URL laid out as `<mirror>/mnist/`, `<mirror>/cifar10/cifar-10-binary.tar.gz` and
//!   `<mirror>/flowers/<class>/...`; [`MIRROR_ENV`] (`DDPM_DATA_MIRROR`) sets the default mirror
//!   for [`FetchOptions::from_env`]. A mirror holding only MNIST's t10k files is accepted: the
//!   fetch says so and places them, and [`crate::mnist`] then holds out a fixed part of them.
//!
//! **Flowers from upstream.** The 5-class "Flowers Recognition" set that the mirror holds (4,317
//! images) is distributed by Kaggle behind a login, so there is no public URL to pin. The default
//! upstream archive is TensorFlow's public `flower_photos.tgz` ([`FLOWERS_URL`]: 3,670 images in
//! `daisy`, `dandelion`, `roses`, `sunflowers`, `tulips`), a related but different set. Its
//! SHA-256 could not be checked from the offline machines this was written on, so none is pinned:
//! an upstream Flowers fetch requires [`FetchOptions::flowers_sha256`] (a checksum you trust; any
//! `.tar.gz` of class folders works with [`FetchOptions::flowers_url`]), or use a mirror.

mod checksum;
mod store;
mod transfer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use checksum::Checksum;
pub use store::MARKER;

use checksum::{is_hex, verify_file, ChecksumList};
use store::{check_marker, extract_tar_gz, list_files, FileRecord, Marker, Staging};
use transfer::{is_not_found, is_transient, Location, Transfer};

use crate::cifar;
use crate::error::{DataError, Result};
use crate::folder;
use crate::spec::DatasetSpec;

/// The environment variable naming the default mirror (a directory or a base URL).
pub const MIRROR_ENV: &str = "DDPM_DATA_MIRROR";

/// The upstream base URLs of MNIST, tried in order (torchvision's list).
pub const MNIST_URLS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

/// MNIST's files and their md5 checksums as pinned by torchvision; the t10k (test) pair first.
pub const MNIST_FILES: [(&str, &str); 4] = [
    (
        "t10k-images-idx3-ubyte.gz",
        "9fb629c4189551a2d022fa330f9573f3",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
    (
        "train-images-idx3-ubyte.gz",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "d53e105ee54ea40749a09fcbcd1e9432",
    ),
];

/// CIFAR-10's binary archive (`cifar-10-binary.tar.gz`).
pub const CIFAR10_ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// Where CIFAR-10's binary archive is published.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The md5 of CIFAR-10's binary archive, as pinned by torchvision.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// The default upstream Flowers archive (see the module doc: no checksum is pinned for it).
pub const FLOWERS_URL: &str =
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz";

/// Where to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The data sets' public upstream addresses.
    Upstream,
    /// A local mirror directory laid out like `shared/data` (`mnist/`, `cifar10/`, `flowers/`).
    Dir(PathBuf),
    /// A mirror at another base URL, with the same layout.
    Url(String),
}

impl Source {
    /// Parses `--from`: `http://` and `https://` addresses are URLs, `file://PATH` and anything
    /// else a directory.
    pub fn parse(s: &str) -> Source {
        let s = s.trim();
        if s.starts_with("http://") || s.starts_with("https://") {
            Source::Url(s.to_string())
        } else if let Some(path) = s.strip_prefix("file://") {
            Source::Dir(PathBuf::from(path))
        } else {
            Source::Dir(PathBuf::from(s))
        }
    }

    /// The mirror named by [`MIRROR_ENV`], if it is set and not empty.
    pub fn from_env() -> Option<Source> {
        std::env::var(MIRROR_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| Source::parse(&v))
    }

    /// Whether this is a mirror rather than upstream.
    pub fn is_mirror(&self) -> bool {
        !matches!(self, Source::Upstream)
    }

    /// Where a mirror keeps `file` (a relative path) of `dataset`; `None` for upstream.
    fn locate(&self, dataset: &str, file: &str) -> Option<Location> {
        match self {
            Source::Upstream => None,
            Source::Dir(dir) => Some(Location::Path(dir.join(dataset).join(file))),
            Source::Url(base) => Some(Location::Url(format!(
                "{}/{dataset}/{}",
                base.trim_end_matches('/'),
                encode_path(file)
            ))),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Upstream => f.write_str("upstream"),
            Source::Dir(dir) => write!(f, "mirror {}", dir.display()),
            Source::Url(url) => write!(f, "mirror {url}"),
        }
    }
}

/// Percent-encodes each segment of a relative path for a URL.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The data directory (`data`), which receives `mnist/`, `cifar10/` and `flowers/`.
    pub data_dir: PathBuf,
    /// Where to fetch from.
    pub source: Source,
    /// How many times a failed download is retried (resuming where it stopped).
    pub retries: u32,
    /// The wait before the first retry; it doubles with each retry (capped at a minute).
    pub backoff: Duration,
    /// The connect and per-read timeout.
    pub timeout: Duration,
    /// Whether to draw progress bars (on a terminal).
    pub progress: bool,
    /// The upstream Flowers archive (a `.tar.gz`/`.tgz` of class folders; URL or path); default
    /// [`FLOWERS_URL`].
    pub flowers_url: Option<String>,
    /// The SHA-256 of the upstream Flowers archive, required to fetch it (none is pinned).
    pub flowers_sha256: Option<String>,
}

impl FetchOptions {
    /// Options fetching from upstream into `data_dir`, with 5 retries starting at 1 s.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        FetchOptions {
            data_dir: data_dir.into(),
            source: Source::Upstream,
            retries: 5,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            progress: true,
            flowers_url: None,
            flowers_sha256: None,
        }
    }

    /// Like [`FetchOptions::new`], fetching from the mirror in [`MIRROR_ENV`] when it is set.
    pub fn from_env(data_dir: impl Into<PathBuf>) -> Self {
        FetchOptions {
            source: Source::from_env().unwrap_or(Source::Upstream),
            ..FetchOptions::new(data_dir)
        }
    }

    fn mismatch_hint(&self) -> String {
        match &self.source {
            Source::Upstream => {
                "the download is damaged or the server now serves another file; run \
                                 the fetch again, or use --from with a mirror holding a good copy"
                    .to_string()
            }
            mirror => format!(
                "the {mirror} holds a damaged or non-canonical copy; replace it there, or fetch \
                 from upstream"
            ),
        }
    }
}

/// Whether a fetch did anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The data set was already in place and its files had their recorded sizes.
    AlreadyPresent,
    /// The files were fetched, verified and placed.
    Fetched,
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The data set.
    pub dataset: DatasetSpec,
    /// Its directory.
    pub dir: PathBuf,
    /// Whether anything was fetched.
    pub outcome: FetchOutcome,
    /// The number of files in place.
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Whether the whole canonical data set is there (false: MNIST's test split only).
    pub complete: bool,
    /// Things the user should know (e.g. that a mirror had only the test split).
    pub notes: Vec<String>,
}

impl fmt::Display for FetchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.outcome {
            FetchOutcome::AlreadyPresent => "already in place (sizes checked against its marker):",
            FetchOutcome::Fetched => "fetched and verified",
        };
        write!(
            f,
            "{}: {what} {} files, {:.1} MB in {}",
            self.dataset,
            self.files,
            self.bytes as f64 / 1e6,
            self.dir.display()
        )?;
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}

/// Whether a data set has been fetched into `data_dir` and is still intact (a cheap check of the
/// marker and file sizes). A folder counts as fetched when it exists.
pub fn is_fetched(spec: &DatasetSpec, data_dir: &Path) -> bool {
    match spec {
        DatasetSpec::Folder(path) => path.is_dir(),
        other => check_marker(&other.dir(data_dir), other.name()).is_some(),
    }
}

/// Fetches a data set (see the module doc); a quick no-op when it is already in place.
pub fn fetch(spec: &DatasetSpec, opts: &FetchOptions) -> Result<FetchReport> {
    match spec {
        DatasetSpec::Mnist => fetch_mnist(opts),
        DatasetSpec::Cifar10 => {
            let (locations, expected) = match &opts.source {
                Source::Upstream => (
                    vec![Location::Url(CIFAR10_URL.to_string())],
                    vec![Checksum::Md5(CIFAR10_MD5.to_string())],
                ),
                mirror => {
                    let transfer = Transfer::new(opts);
                    let sums = mirror_sums(&transfer, mirror, "cifar10")?;
                    let mut expected = vec![Checksum::Md5(CIFAR10_MD5.to_string())];
                    if let Some(hex) = sums.as_ref().and_then(|s| s.get(CIFAR10_ARCHIVE)) {
                        expected.push(Checksum::Sha256(hex.to_string()));
                    }
                    (
                        mirror
                            .locate("cifar10", CIFAR10_ARCHIVE)
                            .into_iter()
                            .collect(),
                        expected,
                    )
                }
            };
            fetch_cifar_archive(opts, locations, expected)
        }
        DatasetSpec::Flowers => fetch_flowers(opts),
        DatasetSpec::Folder(path) => Err(DataError::NotFetchable(path.display().to_string())),
    }
}

fn report(spec: DatasetSpec, dir: PathBuf, outcome: FetchOutcome, marker: &Marker) -> FetchReport {
    FetchReport {
        dataset: spec,
        dir,
        outcome,
        files: marker.files.len(),
        bytes: marker.bytes(),
        complete: marker.complete,
        notes: marker.notes.clone(),
    }
}

fn already_present(spec: DatasetSpec, dir: PathBuf, marker: &Marker) -> FetchReport {
    tracing::debug!(
        "{spec}: already in {} ({} files, fetched from {})",
        dir.display(),
        marker.files.len(),
        marker.source
    );
    report(spec, dir, FetchOutcome::AlreadyPresent, marker)
}

/// Runs `body` in a fresh or resumed staging directory and places its tree on success. On a
/// network error the staging directory is kept so that the next run resumes; on any other error
/// it is removed.
fn staged(
    spec: DatasetSpec,
    opts: &FetchOptions,
    body: impl FnOnce(&Staging, &Transfer) -> Result<Marker>,
) -> Result<FetchReport> {
    let name = spec.name();
    let target = opts.data_dir.join(name);
    let staging = Staging::open(&opts.data_dir, name)?;
    let transfer = Transfer::new(opts);
    tracing::info!("{spec}: fetching from {}", opts.source);
    match body(&staging, &transfer) {
        Ok(marker) => {
            staging.finish(&target, &marker)?;
            tracing::debug!(
                "{spec}: placed {} files in {}",
                marker.files.len(),
                target.display()
            );
            Ok(report(spec, target, FetchOutcome::Fetched, &marker))
        }
        Err(e) => {
            if is_transient(&e) && staging.has_progress() {
                tracing::warn!(
                    "{spec}: partial download kept in {}; run the fetch again to resume",
                    staging.root.display()
                );
            } else {
                staging.discard();
            }
            Err(e)
        }
    }
}

/// Reads a mirror's `<dataset>/SHA256SUMS`, if it has one.
fn mirror_sums(
    transfer: &Transfer,
    source: &Source,
    dataset: &str,
) -> Result<Option<ChecksumList>> {
    let Some(location) = source.locate(dataset, "SHA256SUMS") else {
        return Ok(None);
    };
    match transfer.read_text(&location)? {
        Some(text) => ChecksumList::parse(&text, dataset, &location.to_string()).map(Some),
        None => Ok(None),
    }
}

/// Turns "not found" at a mirror into [`DataError::MirrorMissing`].
fn missing_at_mirror(e: DataError, source: &Source, file: &str, hint: &str) -> DataError {
    if source.is_mirror() && is_not_found(&e) {
        DataError::MirrorMissing {
            mirror: match source {
                Source::Dir(d) => d.display().to_string(),
                Source::Url(u) => u.clone(),
                Source::Upstream => String::new(),
            },
            file: file.to_string(),
            hint: format!("{hint} ({})", e.chain()),
        }
    } else {
        e
    }
}

/// Fetches one file from the first location that has it into `dest`, verified.
fn fetch_verified(
    transfer: &Transfer,
    staging: &Staging,
    opts: &FetchOptions,
    label: &str,
    locations: &[Location],
    expected: &[Checksum],
    dest: &Path,
) -> Result<checksum::Digests> {
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let part = staging.downloads.join(format!("{file_name}.part"));
    let bar = transfer.byte_bar(label);
    let mut result = Err(DataError::Config(format!(
        "no location to fetch {label} from"
    )));
    for location in locations {
        result = transfer.fetch(location, &part, Some(&bar));
        match &result {
            Ok(()) => break,
            Err(e) if locations.len() > 1 => tracing::warn!("{}", e.chain()),
            Err(_) => {}
        }
    }
    bar.finish();
    result?;
    let digests = verify_file(&part, label, expected, &opts.mismatch_hint())?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    std::fs::rename(&part, dest).map_err(DataError::io(dest))?;
    Ok(digests)
}

fn fetch_mnist(opts: &FetchOptions) -> Result<FetchReport> {
    let spec = DatasetSpec::Mnist;
    let target = spec.dir(&opts.data_dir);
    if let Some(marker) = check_marker(&target, spec.name()) {
        if marker.complete || opts.source.is_mirror() {
            return Ok(already_present(spec, target, &marker));
        }
        tracing::info!(
            "{}: holds only the test split; fetching the full set from upstream",
            target.display()
        );
    }
    let hint = "place the gzipped IDX files in the mirror's mnist/ folder, or fetch from upstream \
                (no --from, DDPM_DATA_MIRROR unset) on a machine with internet access";
    staged(spec.clone(), opts, |staging, transfer| {
        let sums = mirror_sums(transfer, &opts.source, "mnist")?;
        let mut marker = Marker::new("mnist", opts.source.to_string(), true);
        let mut absent = Vec::new();
        for (name, md5) in MNIST_FILES {
            let mut expected = vec![Checksum::Md5(md5.to_string())];
            let listed = sums.as_ref().and_then(|s| s.get(name));
            if let Some(hex) = listed {
                expected.push(Checksum::Sha256(hex.to_string()));
            }
            let locations: Vec<Location> = match opts.source.locate("mnist", name) {
                Some(l) => vec![l],
                None => MNIST_URLS
                    .iter()
                    .map(|base| Location::Url(format!("{base}{name}")))
                    .collect(),
            };
            let label = format!("mnist/{name}");
            let dest = staging.tree.join(name);
            match fetch_verified(
                transfer, staging, opts, &label, &locations, &expected, &dest,
            ) {
                Ok(d) => marker.files.push(FileRecord {
                    path: name.to_string(),
                    size: d.size,
                    md5: d.md5,
                    sha256: d.sha256,
                }),
                // A mirror may hold only the test split; files it lists must be there.
                Err(e)
                    if name.starts_with("train")
                        && opts.source.is_mirror()
                        && listed.is_none()
                        && is_not_found(&e) =>
                {
                    absent.push(name)
                }
                Err(e) => return Err(missing_at_mirror(e, &opts.source, &label, hint)),
            }
        }
        match absent.as_slice() {
            [] => {}
            [one] => {
                return Err(missing_at_mirror(
                    DataError::MissingFile {
                        path: one.into(),
                        hint: "not in the mirror".to_string(),
                    },
                    &opts.source,
                    &format!("mnist/{one}"),
                    "the mirror has half of the training pair; add the other file or remove both",
                ))
            }
            _ => {
                let note = format!(
                    "the {} has only the MNIST test split (t10k-*, 10,000 images), which was placed; \
                     training will use its first 8,000 images and hold out the last 2,000 as the test split",
                    opts.source
                );
                tracing::warn!("{note}");
                marker.complete = false;
                marker.notes.push(note);
            }
        }
        Ok(marker)
    })
}

/// Fetches CIFAR-10's archive from the first of `locations` that has it, checks it against
/// `expected`, and extracts its batches.
fn fetch_cifar_archive(
    opts: &FetchOptions,
    locations: Vec<Location>,
    expected: Vec<Checksum>,
) -> Result<FetchReport> {
    let spec = DatasetSpec::Cifar10;
    let target = spec.dir(&opts.data_dir);
    if let Some(marker) = check_marker(&target, spec.name()) {
        return Ok(already_present(spec, target, &marker));
    }
    let label = format!("cifar10/{CIFAR10_ARCHIVE}");
    let hint = format!(
        "download {CIFAR10_ARCHIVE} (md5 {CIFAR10_MD5}) from {CIFAR10_URL} into the mirror's \
         cifar10/ folder, or fetch from upstream (no --from, DDPM_DATA_MIRROR unset) on a machine \
         with internet access"
    );
    if let Some(Location::Path(path)) = locations.first() {
        if !path.is_file() {
            // Say so before creating anything.
            let e = DataError::MissingFile {
                path: path.clone(),
                hint: "not in the mirror".to_string(),
            };
            return Err(missing_at_mirror(e, &opts.source, &label, &hint));
        }
    }
    staged(spec, opts, |staging, transfer| {
        let archive = staging.downloads.join(CIFAR10_ARCHIVE);
        let digests = fetch_verified(
            transfer, staging, opts, &label, &locations, &expected, &archive,
        )
        .map_err(|e| missing_at_mirror(e, &opts.source, &label, &hint))?;
        tracing::info!("extracting {CIFAR10_ARCHIVE}");
        extract_tar_gz(&archive, &staging.extract)?;
        let batches = staging.extract.join(cifar::BATCH_DIR);
        for name in cifar::TRAIN_FILES.iter().chain([&cifar::TEST_FILE]) {
            let len = std::fs::metadata(batches.join(name))
                .map(|m| m.len())
                .unwrap_or(0);
            if len == 0 || len % cifar::RECORD_LEN as u64 != 0 {
                return Err(DataError::ArchiveLayout {
                    archive: label.clone(),
                    reason: format!(
                        "{}/{name} is missing or not a whole number of records",
                        cifar::BATCH_DIR
                    ),
                });
            }
        }
        let dest = staging.tree.join(cifar::BATCH_DIR);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(DataError::io(&dest))?;
        }
        std::fs::rename(&batches, &dest).map_err(DataError::io(&dest))?;
        let mut marker = Marker::new("cifar10", opts.source.to_string(), true);
        marker.archive = Some(FileRecord {
            path: CIFAR10_ARCHIVE.to_string(),
            size: digests.size,
            md5: digests.md5,
            sha256: digests.sha256,
        });
        marker.files = list_files(&staging.tree)?
            .into_iter()
            .map(|(path, size)| FileRecord {
                path,
                size,
                md5: None,
                sha256: None,
            })
            .collect();
        Ok(marker)
    })
}

fn fetch_flowers(opts: &FetchOptions) -> Result<FetchReport> {
    let spec = DatasetSpec::Flowers;
    let target = spec.dir(&opts.data_dir);
    if let Some(marker) = check_marker(&target, spec.name()) {
        return Ok(already_present(spec, target, &marker));
    }
    match &opts.source {
        Source::Upstream => {
            let url = opts
                .flowers_url
                .clone()
                .unwrap_or_else(|| FLOWERS_URL.to_string());
            let sha = opts
                .flowers_sha256
                .as_deref()
                .map(str::trim)
                .unwrap_or_default();
            if !is_hex(sha, 64) {
                return Err(DataError::NoChecksum {
                    what: url,
                    hint: "no SHA-256 is pinned for an upstream Flowers archive (the mirror's Kaggle \
                           set has no public URL, and TensorFlow's flower_photos.tgz could not be \
                           checked offline); pass the archive's SHA-256 you trust (--flowers-sha256), \
                           or fetch from a mirror (--from DIR_OR_URL or DDPM_DATA_MIRROR) whose \
                           flowers/SHA256SUMS lists every file"
                        .to_string(),
                });
            }
            let location = match Source::parse(&url) {
                Source::Dir(path) => Location::Path(path),
                _ => Location::Url(url),
            };
            fetch_flowers_archive(opts, location, Checksum::Sha256(sha.to_ascii_lowercase()))
        }
        mirror => fetch_flowers_mirror(opts, mirror),
    }
}

fn fetch_flowers_archive(
    opts: &FetchOptions,
    location: Location,
    expected: Checksum,
) -> Result<FetchReport> {
    staged(DatasetSpec::Flowers, opts, |staging, transfer| {
        let name = location.to_string();
        let name = name
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("flowers.tgz")
            .to_string();
        let archive = staging.downloads.join(&name);
        let label = format!("flowers/{name}");
        let digests = fetch_verified(
            transfer,
            staging,
            opts,
            &label,
            std::slice::from_ref(&location),
            std::slice::from_ref(&expected),
            &archive,
        )?;
        tracing::info!("extracting {name}");
        extract_tar_gz(&archive, &staging.extract)?;
        let root = class_root(&staging.extract)?;
        for (class, dir) in image_subdirs(&root)? {
            let dest = staging.tree.join(&class);
            if dest.exists() {
                std::fs::remove_dir_all(&dest).map_err(DataError::io(&dest))?;
            }
            std::fs::rename(&dir, &dest).map_err(DataError::io(&dest))?;
        }
        folder::scan(&staging.tree).map_err(|e| DataError::ArchiveLayout {
            archive: label.clone(),
            reason: format!("expected one folder of images per class: {e}"),
        })?;
        let mut marker = Marker::new("flowers", format!("{location}"), true);
        marker.archive = Some(FileRecord {
            path: name,
            size: digests.size,
            md5: None,
            sha256: digests.sha256,
        });
        marker.files = list_files(&staging.tree)?
            .into_iter()
            .map(|(path, size)| FileRecord {
                path,
                size,
                md5: None,
                sha256: None,
            })
            .collect();
        Ok(marker)
    })
}

/// Descends through directories that hold nothing but a single sub-directory.
fn class_root(dir: &Path) -> Result<PathBuf> {
    let mut dir = dir.to_path_buf();
    loop {
        let mut subdirs = Vec::new();
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).map_err(DataError::io(&dir))? {
            let entry = entry.map_err(DataError::io(&dir))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.path().is_dir() {
                subdirs.push(entry.path());
            } else {
                files += 1;
            }
        }
        match subdirs.as_slice() {
            [only] if files == 0 => dir = only.clone(),
            _ => return Ok(dir),
        }
    }
}

/// The sub-directories of `dir` that directly hold images, with their names.
fn image_subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(DataError::io(dir))? {
        let entry = entry.map_err(DataError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        if folder::scan_class_has_images(&path)? {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

fn fetch_flowers_mirror(opts: &FetchOptions, mirror: &Source) -> Result<FetchReport> {
    let transfer = Transfer::new(opts);
    let sums_hint =
        "a Flowers mirror must list every file in flowers/SHA256SUMS (sha256sum output, \
                     paths relative to flowers/)";
    let sums = mirror_sums(&transfer, mirror, "flowers")?.ok_or_else(|| {
        missing_at_mirror(
            DataError::MissingFile {
                path: "flowers/SHA256SUMS".into(),
                hint: "not in the mirror".to_string(),
            },
            mirror,
            "flowers/SHA256SUMS",
            sums_hint,
        )
    })?;
    if sums.entries.is_empty() {
        return Err(DataError::BadChecksumList {
            list: "flowers/SHA256SUMS".to_string(),
            line: 0,
            reason: format!("lists no files: {sums_hint}"),
        });
    }
    staged(DatasetSpec::Flowers, opts, |staging, transfer| {
        let bar = transfer.count_bar("flowers", sums.entries.len() as u64);
        let part = staging.downloads.join("file.part");
        let mut marker = Marker::new("flowers", mirror.to_string(), true);
        let mut resumed = 0usize;
        for (rel, hex) in &sums.entries {
            let dest = staging.tree.join(rel);
            let label = format!("flowers/{rel}");
            let expected = [Checksum::Sha256(hex.clone())];
            // Files verified by an earlier, interrupted run are kept.
            let kept = dest.is_file()
                && checksum::digest_file(&dest, false, true)?.sha256.as_deref()
                    == Some(hex.as_str());
            if kept {
                resumed += 1;
            } else {
                let location = mirror
                    .locate("flowers", rel)
                    .expect("a mirror has locations");
                transfer
                    .fetch(&location, &part, None)
                    .map_err(|e| missing_at_mirror(e, mirror, &label, sums_hint))?;
                verify_file(&part, &label, &expected, &opts.mismatch_hint())?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
                }
                std::fs::rename(&part, &dest).map_err(DataError::io(&dest))?;
            }
            let size = std::fs::metadata(&dest)
                .map_err(DataError::io(&dest))?
                .len();
            marker.files.push(FileRecord {
                path: rel.clone(),
                size,
                md5: None,
                sha256: Some(hex.clone()),
            });
            bar.inc(1);
        }
        bar.finish();
        if resumed > 0 {
            tracing::info!(
                "flowers: {resumed} files were already fetched and verified by an earlier run"
            );
        }
        let index = folder::scan(&staging.tree)?;
        let counts: Vec<String> = index
            .classes
            .iter()
            .zip(index.class_counts())
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        marker.notes.push(format!(
            "{} files verified against the mirror's SHA256SUMS; classes: {}",
            marker.files.len(),
            counts.join(", ")
        ));
        Ok(marker)
    })
}

#[cfg(test)]
mod tests;
