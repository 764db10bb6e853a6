//! The crate's error type: every problem with a file names the file and says what is wrong.

use std::path::PathBuf;

/// Everything that can go wrong while reading, transforming, batching or fetching data.
///
/// Messages name the file or URL; the underlying cause, where there is one, is the error's
/// [`source`](std::error::Error::source) (print the chain, e.g. with anyhow's `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a named file or directory.
    #[error("{}: I/O error", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file the data set needs is not there.
    #[error("{} is missing: {hint}", path.display())]
    MissingFile {
        /// The missing file.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// A file does not start with the magic number of its format.
    #[error("{}: bad magic number {found:#010x}, expected {expected:#010x} ({what})", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The magic number the format requires.
        expected: u32,
        /// The number found in the file.
        found: u32,
        /// What kind of file was expected.
        what: &'static str,
    },
    /// A header field is impossible (zero or overflowing dimensions).
    #[error("{}: bad header: {reason}", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong with the header.
        reason: String,
    },
    /// A file is shorter than its header (or format) declares.
    #[error("{}: truncated: the header declares {expected} bytes but the file holds {found}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The number of bytes the header declares (header included).
        expected: u64,
        /// The number of bytes actually present.
        found: u64,
    },
    /// A file holds more bytes than its header declares.
    #[error("{}: {found} bytes found where the header declares {expected}: trailing data", path.display())]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// The number of bytes the header declares (header included).
        expected: u64,
        /// The number of bytes found (for compressed files, a lower bound).
        found: u64,
    },
    /// A gzip stream is corrupt or cut short.
    #[error("{}: corrupt or truncated gzip data", path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decompressor's error.
        #[source]
        source: std::io::Error,
    },
    /// A file of fixed-length records has a length that is not a whole number of records.
    #[error("{}: length {len} bytes is not a positive whole number of {record}-byte records", path.display())]
    RecordLength {
        /// The file.
        path: PathBuf,
        /// The file's length in bytes.
        len: u64,
        /// The record length of the format.
        record: u64,
    },
    /// A label is outside the data set's classes.
    #[error("{}: record {index} has label {label}, but the data set has {classes} classes", path.display())]
    BadLabel {
        /// The file.
        path: PathBuf,
        /// The record's index in the file.
        index: usize,
        /// The label found.
        label: u32,
        /// The number of classes.
        classes: usize,
    },
    /// An image file and its label file disagree on the number of items.
    #[error("{} holds {images} images but {} holds {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Its number of images.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Its number of labels.
        labels: usize,
    },
    /// An image file could not be decoded.
    #[error("{}: cannot decode image (to skip such files, set `skip_corrupt = true` under `[data]` in the config)", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An image file is cut short: its data ends before the format's end marker.
    #[error("{}: truncated image: {reason} (to skip such files, set `skip_corrupt = true` under `[data]` in the config)", path.display())]
    TruncatedImage {
        /// The image file.
        path: PathBuf,
        /// Where it ends and what is missing.
        reason: String,
    },
    /// A folder holds images both directly and in class sub-folders.
    #[error("{}: holds {top_level} images directly and class sub-folders with images ({}): use one \
             layout, either all images in the folder (one class) or one sub-folder per class", path.display(), class_folders.join(", "))]
    MixedLayout {
        /// The folder.
        path: PathBuf,
        /// The number of images directly in it.
        top_level: usize,
        /// The sub-folders that hold images.
        class_folders: Vec<String>,
    },
    /// An image could not be encoded or written.
    #[error("{}: cannot write image", path.display())]
    Encode {
        /// The output file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
    /// A directory holds no usable images.
    #[error("{}: no images found ({reason})", path.display())]
    Empty {
        /// The directory.
        path: PathBuf,
        /// Why nothing was found.
        reason: String,
    },
    /// The test split of an image folder holds no image (its test fraction is 0, or too small
    /// for the folder's classes).
    #[error("{}: the test split is empty: test_fraction {test_fraction} holds out none of its {images} images (a class of n images holds out floor(n * test_fraction)); anything that needs a test split needs a larger test_fraction ([data] test_fraction in the config, --test-fraction of `ddpm train`; default 0.1)", path.display())]
    EmptyTestSplit {
        /// The folder.
        path: PathBuf,
        /// The test fraction in use.
        test_fraction: f64,
        /// The number of images in the folder.
        images: usize,
    },
    /// A data-set name that is not understood.
    #[error("unknown data set {spec:?}: {reason}")]
    BadSpec {
        /// The text given.
        spec: String,
        /// What is accepted.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An image tensor has a shape that cannot be turned into pictures.
    #[error("expected images of shape (b, c, h, w) or (c, h, w) with c = 1 or 3, got {0:?}")]
    BadShape(Vec<usize>),
    /// An index past the end of a data set.
    #[error("image index {index} out of range for a data set of {len} images")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The data set's length.
        len: usize,
    },
    /// A loader worker thread stopped unexpectedly.
    #[error("a data loader worker thread stopped unexpectedly")]
    WorkerDied,
    /// A loader worker thread could not be started.
    #[error("cannot start a data loader thread")]
    Spawn(#[source] std::io::Error),
    /// An error from candle while building tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A transport-level HTTP failure (connection refused, reset, timeout, TLS...).
    #[error(
        "downloading {url}{}",
        via.as_deref().map(|v| format!(" through the proxy {v}")).unwrap_or_default()
    )]
    Http {
        /// The URL.
        url: String,
        /// The proxy the request went through (`VARIABLE=ADDRESS`, password hidden), when one
        /// did: the failure may be the proxy's as much as the server's.
        via: Option<String>,
        /// The client's error.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The TLS connection to a server failed: most often its certificate is not signed by an
    /// authority that is trusted.
    #[error(
        "downloading {url}: the secure connection failed ({detail}); trusted were {trusted}: \
         {advice}"
    )]
    Tls {
        /// The URL.
        url: String,
        /// The TLS library's words.
        detail: String,
        /// What was trusted ([`crate::fetch::TrustedRoots::describe`]).
        trusted: String,
        /// What to do ([`crate::fetch::TrustedRoots::advice`]).
        advice: String,
    },
    /// A setting of the HTTP client (the CA bundle, the proxy) cannot be used.
    #[error("{setting}={value}: {reason}: {advice}")]
    HttpSetting {
        /// The variable or option that gave it (`SSL_CERT_FILE`, `HTTPS_PROXY`).
        setting: String,
        /// Its value (a proxy's password left out).
        value: String,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        advice: String,
    },
    /// The connection broke while the body of a download was being received.
    #[error("downloading {url}: connection lost after {received} bytes")]
    Interrupted {
        /// The URL.
        url: String,
        /// Bytes of the file on disk so far.
        received: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an HTTP error status.
    #[error("downloading {url}: HTTP {status}: {hint}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// What it likely means and what to do.
        hint: String,
    },
    /// A downloaded or copied file does not have its pinned checksum.
    #[error("{file}: {algorithm} checksum mismatch: expected {expected}, got {actual}; the copy was deleted: {hint}")]
    ChecksumMismatch {
        /// The file (its name in the data set).
        file: String,
        /// `md5` or `sha256`.
        algorithm: &'static str,
        /// The pinned checksum.
        expected: String,
        /// The checksum of what was received.
        actual: String,
        /// What to do about it.
        hint: String,
    },
    /// A mirror lacks a file the data set needs.
    #[error("the mirror {mirror} has no {file}: {hint}")]
    MirrorMissing {
        /// The mirror (directory or URL).
        mirror: String,
        /// The missing file, relative to the mirror.
        file: String,
        /// What to do about it.
        hint: String,
    },
    /// A `SHA256SUMS` list has a line that cannot be parsed or names an unsafe path.
    #[error("{list}: line {line}: {reason}")]
    BadChecksumList {
        /// The list (path or URL).
        list: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A download has no trustworthy checksum to verify it against.
    #[error("{what}: no pinned checksum: {hint}")]
    NoChecksum {
        /// What would be downloaded.
        what: String,
        /// What to do instead.
        hint: String,
    },
    /// An archive does not hold the files the data set needs.
    #[error("{archive}: {reason}")]
    ArchiveLayout {
        /// The archive.
        archive: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// An archive entry that is refused: a path that would leave the extraction folder, or one
    /// past the limits on entries and sizes. Nothing from the archive is placed.
    #[error("{archive}: entry {entry:?} refused: {reason}; nothing from the archive was placed")]
    ArchiveEntry {
        /// The archive.
        archive: String,
        /// The entry's path as the archive gives it.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A downloaded or copied file does not have its pinned size.
    #[error("{file}: size mismatch: expected {expected} bytes, got {actual}; the copy was deleted: {hint}")]
    SizeMismatch {
        /// The file (its name in the data set).
        file: String,
        /// The pinned size.
        expected: u64,
        /// The size received (or announced by the server).
        actual: u64,
        /// What to do about it.
        hint: String,
    },
    /// The data set cannot be fetched (a user's own image folder).
    #[error("{0} cannot be fetched: it is a local image folder")]
    NotFetchable(String),
    /// A request to the Hugging Face Hub failed, or the Hub answered something unusable.
    #[error("{what}: {hint}")]
    Hub {
        /// The request or file (repository, revision, path).
        what: String,
        /// What went wrong and what to do.
        hint: String,
        /// The client's error, where there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Offline mode is on and the Hub cache lacks what is asked for.
    #[error("{what} is not in the Hub cache {} and offline mode is on (HF_HUB_OFFLINE): run once online to download it, or point HF_HOME at a cache that holds it", cache.display())]
    HubOffline {
        /// The repository and revision or file missing.
        what: String,
        /// The cache directory searched.
        cache: PathBuf,
    },
    /// A Hub data set whose files do not form a usable split of images.
    #[error("{repo}: {reason}")]
    HubDataset {
        /// The repository and revision (`OWNER/NAME@REVISION`).
        repo: String,
        /// What is missing or wrong, and what was found.
        reason: String,
    },
    /// A parquet file that cannot be read, or whose columns are not an image data set's.
    #[error("{}: {reason}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    /// The message followed by those of its sources, joined by `: `.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            out.push_str(": ");
            out.push_str(&e.to_string());
            source = e.source();
        }
        out
    }

    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| DataError::Io { path, source }
    }
}
