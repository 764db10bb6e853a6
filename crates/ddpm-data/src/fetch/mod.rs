//! Fetching the canonical data sets into the data directory, verified and placed atomically.
//!
//! [`fetch`] downloads (or copies from a mirror) the files of MNIST, Fashion-MNIST, CIFAR-10 or
//! Flowers into `<data>/mnist/*.gz`, `<data>/fashion-mnist/*.gz`,
//! `<data>/cifar10/cifar-10-batches-bin/*.bin` and `<data>/flowers/<class>/`.
//!
//! - **Verification.** Every file is checked before it is placed: MNIST's and Fashion-MNIST's
//!   four IDX files and CIFAR-10's archive against the md5 checksums torchvision pins
//!   ([`MNIST_FILES`], [`FASHION_MNIST_FILES`], [`CIFAR10_MD5`]), the Flowers archive against
//!   its pinned size and SHA-256 ([`FLOWERS_SIZE`], [`FLOWERS_SHA256`]), plus the mirror's `SHA256SUMS` where a mirror has
//!   one. A Flowers mirror must list every file in `flowers/SHA256SUMS`. A mismatch deletes what
//!   was fetched and names the file.
//! - **Safe extraction.** Archives are extracted into the staging directory only: an entry with
//!   an absolute path or one that climbs out with `..` stops the fetch; links, devices and FIFOs
//!   are never created; the number of entries and the size of each file and of all of them are
//!   bounded.
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
//!   another base URL laid out as `<mirror>/mnist/`, `<mirror>/fashion-mnist/`,
//!   `<mirror>/cifar10/cifar-10-binary.tar.gz` and `<mirror>/flowers/<class>/...`; the binaries
//!   take the default mirror from the environment variable named by [`MIRROR_ENV`]
//!   (`DDPM_DATA_MIRROR`) and pass it in ([`FetchOptions::with_mirror`]); this crate reads no
//!   environment. A mirror holding only MNIST's (or Fashion-MNIST's) t10k files is accepted: the
//!   fetch says so and places them, and [`crate::mnist`] then holds out a fixed part of them.
//!
//! **Flowers from upstream.** The default Flowers source is TensorFlow's public
//! `flower_photos.tgz` ([`FLOWERS_URLS`], tried in order): 3,670 photos in five classes, `daisy`
//! 633, `dandelion` 898, `roses` 641, `sunflowers` 699, `tulips` 799 ([`FLOWERS_CLASSES`]), under
//! a top folder `flower_photos/` with a `LICENSE.txt`. Its size and SHA-256 are pinned
//! ([`FLOWERS_SIZE`], [`FLOWERS_SHA256`]); the top folder is stripped, so the classes land in
//! `<data>/flowers/<class>/`, with `LICENSE.txt` beside them. The 5-class "Flowers Recognition"
//! set of 4,317 images (`daisy`, `dandelion`, `rose`, `sunflower`, `tulip`) is distributed by
//! Kaggle behind a login, so it has no public URL; it is read from a mirror
//! ([`Source::Dir`]/[`Source::Url`], `--from` or [`MIRROR_ENV`]), verified against the mirror's
//! `flowers/SHA256SUMS`. Another archive of class folders can be fetched with
//! [`FetchOptions::flowers_url`] and [`FetchOptions::flowers_sha256`] (a checksum you trust).

pub(crate) mod checksum;
mod proxy;
mod store;
mod tls;
pub(crate) mod transfer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use checksum::Checksum;
pub use proxy::ProxyConfig;
pub use store::MARKER;
pub use tls::TrustedRoots;

use checksum::{is_hex, verify_file, ChecksumList};
use store::{check_marker, extract_tar_gz, list_files, ExtractLimits, FileRecord, Marker, Staging};
use transfer::{is_not_found, is_transient, Location, Transfer};

use crate::cifar;
use crate::error::{DataError, Result};
use crate::folder;
use crate::spec::DatasetSpec;

/// The name of the environment variable with which the binaries (`ddpm`, `cargo xtask`) name the
/// default mirror (a directory or a base URL); this crate never reads it.
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

/// The upstream base URLs of Fashion-MNIST, tried in order: its publisher's (Zalando Research)
/// download address, then the copy in its GitHub repository (`zalandoresearch/fashion-mnist`).
pub const FASHION_MNIST_URLS: [&str; 2] = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
];

/// Fashion-MNIST's files and their md5 checksums as its publisher lists them (torchvision pins
/// the same); the t10k (test) pair first. The file names are MNIST's.
pub const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    (
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
    (
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
];

/// CIFAR-10's binary archive (`cifar-10-binary.tar.gz`).
pub const CIFAR10_ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// Where CIFAR-10's binary archive is published.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The md5 of CIFAR-10's binary archive, as pinned by torchvision.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// The default upstream Flowers archive, TensorFlow's `flower_photos.tgz` (see the module doc).
pub const FLOWERS_URL: &str = "http://download.tensorflow.org/example_images/flower_photos.tgz";
/// Where the default Flowers archive is published, tried in order: [`FLOWERS_URL`], then the
/// storage bucket behind it (the same file).
pub const FLOWERS_URLS: [&str; 2] = [
    FLOWERS_URL,
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
];
/// The size in bytes of the default Flowers archive.
pub const FLOWERS_SIZE: u64 = 228_813_984;
/// The SHA-256 of the default Flowers archive.
pub const FLOWERS_SHA256: &str = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c";
/// The classes of the default Flowers archive and their numbers of images (3,670 in all).
pub const FLOWERS_CLASSES: [(&str, usize); 5] = [
    ("daisy", 633),
    ("dandelion", 898),
    ("roses", 641),
    ("sunflowers", 699),
    ("tulips", 799),
];

/// Where to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The data sets' public upstream addresses.
    Upstream,
    /// A local mirror directory laid out as `mnist/`, `cifar10/`, `flowers/` (see the module doc).
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
    /// The data directory (`data`), which receives `mnist/`, `fashion-mnist/`, `cifar10/` and
    /// `flowers/`.
    pub data_dir: PathBuf,
    /// Where to fetch from.
    pub source: Source,
    /// How many times a failed download is retried (resuming where it stopped).
    pub retries: u32,
    /// The wait before the first retry; it doubles with each retry (capped at a minute).
    pub backoff: Duration,
    /// The connect and per-read timeout.
    pub timeout: Duration,
    /// The certificate authorities HTTPS servers are checked against.
    pub roots: TrustedRoots,
    /// The HTTP proxy downloads go through (none: direct connections).
    pub proxy: Option<ProxyConfig>,
    /// Whether to draw progress bars (on a terminal).
    pub progress: bool,
    /// The upstream Flowers archive (a `.tar.gz`/`.tgz` of class folders; URL or path) instead of
    /// the default [`FLOWERS_URLS`]; needs [`FetchOptions::flowers_sha256`].
    pub flowers_url: Option<String>,
    /// The SHA-256 of the upstream Flowers archive instead of the pinned [`FLOWERS_SHA256`];
    /// required with [`FetchOptions::flowers_url`].
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
            roots: TrustedRoots::Bundled,
            proxy: None,
            progress: true,
            flowers_url: None,
            flowers_sha256: None,
        }
    }

    /// Like [`FetchOptions::new`], fetching from `mirror` when there is one (a binary passes
    /// the one its user named, e.g. in [`MIRROR_ENV`]).
    pub fn with_mirror(data_dir: impl Into<PathBuf>, mirror: Option<Source>) -> Self {
        FetchOptions {
            source: mirror.unwrap_or(Source::Upstream),
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

/// Whether a data set is in `data_dir`: fetched and still intact (a cheap check of the marker and
/// file sizes), or placed there by hand in the layout its reader expects (see [`is_hand_placed`]).
/// A folder counts when it exists; a Hub data set always does (it is downloaded into the Hub's
/// cache when it is opened: [`crate::hub_dataset`]).
pub fn is_fetched(spec: &DatasetSpec, data_dir: &Path) -> bool {
    match spec {
        DatasetSpec::Folder(path) => path.is_dir(),
        DatasetSpec::Hub(_) => true,
        other => {
            let dir = other.dir(data_dir);
            check_marker(&dir, other.name()).is_some() || is_hand_placed(other, &dir)
        }
    }
}

/// Whether `dir` holds a data set copied there by hand, without a fetch marker: MNIST's or
/// Fashion-MNIST's t10k or train IDX pair (gzip-compressed or not), CIFAR-10's
/// `cifar-10-batches-bin/test_batch.bin`, or at least one class folder of Flowers. Such data is
/// used as it is: the readers check its format, but no checksum (there is nothing to compare
/// with). A directory with a fetch marker is never hand-placed: a marker that no longer matches means a damaged fetch, which is fetched again.
pub fn is_hand_placed(spec: &DatasetSpec, dir: &Path) -> bool {
    if dir.join(MARKER).exists() {
        return false;
    }
    let present = |name: &str| dir.join(name).is_file() || dir.join(format!("{name}.gz")).is_file();
    match spec {
        DatasetSpec::Mnist | DatasetSpec::FashionMnist => {
            (present(crate::mnist::TEST_IMAGES) && present(crate::mnist::TEST_LABELS))
                || (present(crate::mnist::TRAIN_IMAGES) && present(crate::mnist::TRAIN_LABELS))
        }
        DatasetSpec::Cifar10 => dir.join(cifar::BATCH_DIR).join(cifar::TEST_FILE).is_file(),
        DatasetSpec::Flowers => folder::scan(dir).is_ok_and(|index| !index.files.is_empty()),
        DatasetSpec::Folder(_) | DatasetSpec::Hub(_) => false,
    }
}

/// Downloads (or copies) one file from `from` (an `http(s)://` URL, `file://PATH` or a path) to
/// `part`, with the data sets' transfer: retries with backoff, an HTTP `Range` resume of a
/// partial `part`, a progress bar labelled `label` when `opts.progress`. It verifies nothing: the
/// caller checks the bytes before using them (`opts.data_dir` and `opts.source` are unused).
pub fn fetch_file(from: &str, part: &Path, label: &str, opts: &FetchOptions) -> Result<()> {
    let location = match Source::parse(from) {
        Source::Url(url) => Location::Url(url),
        Source::Dir(path) => Location::Path(path),
        Source::Upstream => Location::Path(PathBuf::from(from)),
    };
    let transfer = Transfer::new(opts);
    let bar = transfer.byte_bar(label);
    let result = transfer.fetch(&location, part, Some(&bar), None);
    bar.finish_and_clear();
    result
}

/// Fetches a data set (see the module doc); a quick no-op when it is already in place.
pub fn fetch(spec: &DatasetSpec, opts: &FetchOptions) -> Result<FetchReport> {
    match spec {
        DatasetSpec::Mnist => fetch_idx(opts, &MNIST_SET),
        DatasetSpec::FashionMnist => fetch_idx(opts, &FASHION_MNIST_SET),
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
        DatasetSpec::Hub(_) => Err(DataError::Hub {
            what: spec.to_string(),
            hint: "a Hub data set is not fetched into the data directory: its files are \
                   downloaded into the Hub's cache when it is opened (`ddpm train --dataset \
                   hf:OWNER/NAME`)"
                .to_string(),
            source: None,
        }),
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

/// What a fetched file must be: its checksums, and its size where that is pinned.
#[derive(Debug, Clone, Copy)]
struct Expected<'a> {
    checksums: &'a [Checksum],
    size: Option<u64>,
}

impl<'a> Expected<'a> {
    /// Checksums only.
    fn sums(checksums: &'a [Checksum]) -> Self {
        Expected {
            checksums,
            size: None,
        }
    }
}

/// Fetches one file from the first location that has it into `dest`, verified.
fn fetch_verified(
    transfer: &Transfer,
    staging: &Staging,
    opts: &FetchOptions,
    label: &str,
    locations: &[Location],
    expected: Expected<'_>,
    dest: &Path,
) -> Result<checksum::Digests> {
    let Expected {
        checksums: expected,
        size,
    } = expected;
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
        result = transfer.fetch(location, &part, Some(&bar), size);
        match &result {
            Ok(()) => break,
            Err(e) if locations.len() > 1 => tracing::warn!("{}", e.chain()),
            Err(_) => {}
        }
    }
    bar.finish();
    result?;
    if let Some(size) = size {
        let actual = std::fs::metadata(&part)
            .map_err(DataError::io(&part))?
            .len();
        if actual != size {
            let _ = std::fs::remove_file(&part);
            return Err(DataError::SizeMismatch {
                file: label.to_string(),
                expected: size,
                actual,
                hint: opts.mismatch_hint(),
            });
        }
    }
    let digests = verify_file(&part, label, expected, &opts.mismatch_hint())?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    std::fs::rename(&part, dest).map_err(DataError::io(dest))?;
    Ok(digests)
}

/// An IDX data set in MNIST's layout (four gzipped files, the t10k pair first): what
/// [`fetch_idx`] fetches.
struct IdxSet {
    spec: DatasetSpec,
    /// How its notes name it (`MNIST`, `Fashion-MNIST`).
    title: &'static str,
    /// Its files and their pinned md5 checksums.
    files: [(&'static str, &'static str); 4],
    /// Its upstream base URLs, tried in order.
    urls: &'static [&'static str],
}

const MNIST_SET: IdxSet = IdxSet {
    spec: DatasetSpec::Mnist,
    title: "MNIST",
    files: MNIST_FILES,
    urls: &MNIST_URLS,
};

const FASHION_MNIST_SET: IdxSet = IdxSet {
    spec: DatasetSpec::FashionMnist,
    title: "Fashion-MNIST",
    files: FASHION_MNIST_FILES,
    urls: &FASHION_MNIST_URLS,
};

fn fetch_idx(opts: &FetchOptions, set: &IdxSet) -> Result<FetchReport> {
    let spec = set.spec.clone();
    let name = spec.name();
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
    let hint = format!(
        "place the gzipped IDX files in the mirror's {name}/ folder, or fetch from upstream (no \
         --from, DDPM_DATA_MIRROR unset) on a machine with internet access"
    );
    staged(spec.clone(), opts, |staging, transfer| {
        let sums = mirror_sums(transfer, &opts.source, name)?;
        let mut marker = Marker::new(name, opts.source.to_string(), true);
        let mut absent = Vec::new();
        for (file, md5) in set.files {
            let mut expected = vec![Checksum::Md5(md5.to_string())];
            let listed = sums.as_ref().and_then(|s| s.get(file));
            if let Some(hex) = listed {
                expected.push(Checksum::Sha256(hex.to_string()));
            }
            let locations: Vec<Location> = match opts.source.locate(name, file) {
                Some(l) => vec![l],
                None => set
                    .urls
                    .iter()
                    .map(|base| Location::Url(format!("{base}{file}")))
                    .collect(),
            };
            let label = format!("{name}/{file}");
            let dest = staging.tree.join(file);
            match fetch_verified(
                transfer,
                staging,
                opts,
                &label,
                &locations,
                Expected::sums(&expected),
                &dest,
            ) {
                Ok(d) => marker.files.push(FileRecord {
                    path: file.to_string(),
                    size: d.size,
                    md5: d.md5,
                    sha256: d.sha256,
                }),
                // A mirror may hold only the test split; files it lists must be there.
                Err(e)
                    if file.starts_with("train")
                        && opts.source.is_mirror()
                        && listed.is_none()
                        && is_not_found(&e) =>
                {
                    absent.push(file)
                }
                Err(e) => return Err(missing_at_mirror(e, &opts.source, &label, &hint)),
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
                    &format!("{name}/{one}"),
                    "the mirror has half of the training pair; add the other file or remove both",
                ))
            }
            _ => {
                let note = format!(
                    "the {} has only the {} test split (t10k-*, 10,000 images), which was placed; \
                     training will use its first 8,000 images and hold out the last 2,000 as the test split",
                    opts.source, set.title
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
            transfer,
            staging,
            opts,
            &label,
            &locations,
            Expected::sums(&expected),
            &archive,
        )
        .map_err(|e| missing_at_mirror(e, &opts.source, &label, &hint))?;
        tracing::info!("extracting {CIFAR10_ARCHIVE}");
        extract_tar_gz(&archive, &staging.extract, &label, ExtractLimits::default())?;
        let batches = staging.extract.join(cifar::BATCH_DIR);
        for name in cifar::TRAIN_FILES.iter().chain([&cifar::TEST_FILE]) {
            let len = std::fs::metadata(batches.join(name))
                .map(|m| m.len())
                .unwrap_or(0);
            if len == 0 || !len.is_multiple_of(cifar::RECORD_LEN as u64) {
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
            let archive = flowers_archive(opts)?;
            fetch_flowers_archive(opts, archive)
        }
        mirror => fetch_flowers_mirror(opts, mirror),
    }
}

/// An upstream Flowers archive to fetch: where, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlowersArchive {
    /// Tried in order.
    locations: Vec<Location>,
    /// Its SHA-256, lowercase hex.
    sha256: String,
    /// Its size, when it is the pinned archive.
    size: Option<u64>,
}

/// The archive the options ask for: the pinned TensorFlow archive by default;
/// [`FetchOptions::flowers_url`] with [`FetchOptions::flowers_sha256`] for another one.
fn flowers_archive(opts: &FetchOptions) -> Result<FlowersArchive> {
    let url = opts
        .flowers_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let sha = opts
        .flowers_sha256
        .as_deref()
        .map(str::trim)
        .filter(|h| !h.is_empty());
    if let Some(sha) = sha {
        if !is_hex(sha, 64) {
            return Err(DataError::Config(format!(
                "--flowers-sha256 {sha:?} is not a SHA-256: expected 64 hexadecimal digits"
            )));
        }
    }
    let is_pinned_url = |u: &str| FLOWERS_URLS.contains(&u);
    let sha256 = match (url, sha) {
        (_, Some(sha)) => sha.to_ascii_lowercase(),
        (None, None) => FLOWERS_SHA256.to_string(),
        (Some(u), None) if is_pinned_url(u) => FLOWERS_SHA256.to_string(),
        (Some(u), None) => {
            return Err(DataError::NoChecksum {
                what: u.to_string(),
                hint: format!(
                    "an archive other than the pinned one ({FLOWERS_URL}) needs the SHA-256 you \
                     trust for it (--flowers-sha256 HEX); or leave out --flowers-url to fetch \
                     the pinned archive, or fetch from a mirror (--from DIR_OR_URL or \
                     {MIRROR_ENV}) whose flowers/SHA256SUMS lists every file"
                ),
            })
        }
    };
    let locations = match url {
        Some(u) => vec![match Source::parse(u) {
            Source::Dir(path) => Location::Path(path),
            _ => Location::Url(u.to_string()),
        }],
        None => FLOWERS_URLS
            .iter()
            .map(|u| Location::Url(u.to_string()))
            .collect(),
    };
    let size = (sha256 == FLOWERS_SHA256).then_some(FLOWERS_SIZE);
    Ok(FlowersArchive {
        locations,
        sha256,
        size,
    })
}

fn fetch_flowers_archive(opts: &FetchOptions, archive: FlowersArchive) -> Result<FetchReport> {
    staged(DatasetSpec::Flowers, opts, |staging, transfer| {
        let first = archive
            .locations
            .first()
            .map(|l| l.to_string())
            .unwrap_or_default();
        let name = first
            .rsplit(['/', '\\'])
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("flowers.tgz")
            .to_string();
        let path = staging.downloads.join(&name);
        let label = format!("flowers/{name}");
        let expected = Checksum::Sha256(archive.sha256.clone());
        let digests = fetch_verified(
            transfer,
            staging,
            opts,
            &label,
            &archive.locations,
            Expected {
                checksums: std::slice::from_ref(&expected),
                size: archive.size,
            },
            &path,
        )?;
        tracing::info!("extracting {name}");
        let extracted = extract_tar_gz(&path, &staging.extract, &label, ExtractLimits::default())?;
        // Strip the top folder (flower_photos/): its class folders and licence go into place.
        let root = class_root(&staging.extract)?;
        for (class, dir) in image_subdirs(&root)? {
            let dest = staging.tree.join(&class);
            if dest.exists() {
                std::fs::remove_dir_all(&dest).map_err(DataError::io(&dest))?;
            }
            std::fs::rename(&dir, &dest).map_err(DataError::io(&dest))?;
        }
        for entry in std::fs::read_dir(&root).map_err(DataError::io(&root))? {
            let entry = entry.map_err(DataError::io(&root))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && file_name.to_ascii_uppercase().starts_with("LICENSE") {
                let dest = staging.tree.join(&file_name);
                std::fs::rename(entry.path(), &dest).map_err(DataError::io(&dest))?;
            }
        }
        let index = folder::scan(&staging.tree)
            .ok()
            .filter(|index| !index.flat)
            .ok_or_else(|| DataError::ArchiveLayout {
                archive: label.clone(),
                reason: "expected one folder of images per class (under one top folder or none)"
                    .to_string(),
            })?;
        let source = archive
            .locations
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(" or ");
        let mut marker = Marker::new("flowers", source, true);
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
        let counts: Vec<String> = index
            .classes
            .iter()
            .zip(index.class_counts())
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        marker.notes.push(format!(
            "{} images from an archive verified against its SHA-256; classes: {}",
            index.files.len(),
            counts.join(", ")
        ));
        if !extracted.skipped.is_empty() {
            marker.notes.push(format!(
                "{} archive entries that are not plain files or folders were not extracted",
                extracted.skipped.len()
            ));
        }
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
                    .fetch(&location, &part, None, None)
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
