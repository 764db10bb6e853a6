//! The Hugging Face Hub: a verifying client with timeouts, on `hf-hub`'s cache conventions.
//!
//! [`Hub::snapshot`] resolves a revision (a branch, tag or commit) of a model or data-set
//! repository to its commit and lists the files there; [`Hub::get`] brings one file of that
//! commit into the local cache and returns its path. The cache is the one `huggingface_hub`
//! (Python) and `hf-hub` share: `blobs/` named by ETag, `snapshots/<commit>/<path>` links to them,
//! `refs/<revision>` holding a commit, under `<cache>/{models,datasets}--OWNER--NAME/`.
//!
//! How files travel. The requests are made here, on the same HTTP client as the data sets'
//! fetches ([`mod@crate::fetch`]): with a connect and per-read timeout ([`HubOptions::timeout`]), so
//! a Hub that stops answering is an error rather than a hang, and with retries that resume a
//! broken download (`Range`). `hf-hub` 0.4's own client has no timeouts and panics on some
//! malformed answers; from `hf-hub` this module takes the URL and cache conventions and the
//! token file. A file is downloaded by its commit URL to `blobs/<hash>.part` under a lock
//! (`.locks/<repo folder>/<hash>.lock`, where `huggingface_hub` keeps its own: another process
//! downloading the same blob is waited for), checked, then renamed into `blobs/`.
//!
//! What is checked. Every file returned by [`Hub::get`] is checked against the repository's listing
//! (`/api/{models,datasets}/OWNER/NAME/revision/REV?blobs=true`): its size, and its SHA-256 for
//! files stored with Git LFS (the weights and parquet files), or its Git blob SHA-1 for small
//! files kept in Git itself. A file that does not match is deleted from the cache (blob and link)
//! and is an error ([`DataError::ChecksumMismatch`], [`DataError::SizeMismatch`]); a cached file
//! that no longer matches is fetched again. In offline mode the listing is not available: a cached
//! file is checked against the hash its blob is named after (the ETag: SHA-256 for LFS files,
//! the Git SHA-1 otherwise).
//!
//! Nothing here reads the environment: the endpoint, cache, token and offline mode are
//! [`HubOptions`], which the `ddpm` binary fills from `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE` (docs/environment.md).
//!
//! ```no_run
//! use ddpm_data::hub::{Hub, HubOptions, Repo};
//! # fn main() -> ddpm_data::Result<()> {
//! let hub = Hub::new(&HubOptions::default())?;
//! let snapshot = hub.snapshot(&Repo::model("google/ddpm-cifar10-32")?, "main")?;
//! println!("main is {}", snapshot.commit);
//! let config = hub.get(&snapshot, "unet/config.json")?;
//! # let _ = config;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha1::Digest as _;

use crate::error::{DataError, Result};
use crate::fetch::checksum::is_hex;
use crate::fetch::transfer::{Location, Transfer};
use crate::image_io::unique_sibling;

/// The Hub's address when [`HubOptions::endpoint`] is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The connect and per-read timeout when [`HubOptions::timeout`] is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many per-read timeouts the whole listing request may take.
const LISTING_TIMEOUTS: u32 = 10;

/// The largest repository listing read (the Hub's for a repository of 100,000 files is about
/// 30 MB).
const MAX_LISTING: u64 = 256 << 20;

/// How to reach the Hub and where its files are cached.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub's base URL (default [`DEFAULT_ENDPOINT`]); the binary takes it from `HF_ENDPOINT`.
    pub endpoint: Option<String>,
    /// The cache directory (the `hub` folder of `HF_HOME`); default
    /// `~/.cache/huggingface/hub` in the user's home directory.
    pub cache_dir: Option<PathBuf>,
    /// An access token for private or gated repositories; without one, the token file that
    /// `huggingface-cli login` writes beside the cache (`<cache>/../token`) is used if present.
    pub token: Option<String>,
    /// Serve everything from the cache and never contact the Hub.
    pub offline: bool,
    /// Show a progress bar while a file downloads.
    pub progress: bool,
    /// How long connecting, and each read of an answer, may take before the request fails
    /// (default [`DEFAULT_TIMEOUT`]); the binary takes it from `HF_HUB_DOWNLOAD_TIMEOUT`.
    pub timeout: Option<Duration>,
    /// How many times a download that failed for a reason that may pass (a timeout, a broken
    /// connection, HTTP 429 or 5xx) is tried again, resuming where it stopped, with waits of 1,
    /// 2, 4, ... seconds (default 5). The listing is asked for once.
    pub retries: Option<u32>,
    /// The certificate authorities an HTTPS endpoint is checked against (a bundle is read when
    /// the client is made, online only).
    pub roots: crate::fetch::TrustedRoots,
    /// The HTTP proxy requests go through (none: direct connections).
    pub proxy: Option<crate::fetch::ProxyConfig>,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token stays out of logs.
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("roots", &self.roots)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl HubOptions {
    /// The endpoint in use, without a trailing `/`.
    pub fn endpoint(&self) -> String {
        self.endpoint
            .as_deref()
            .map(|e| e.trim().trim_end_matches('/'))
            .filter(|e| !e.is_empty())
            .unwrap_or(DEFAULT_ENDPOINT)
            .to_string()
    }

    /// The timeout in use: [`HubOptions::timeout`], or [`DEFAULT_TIMEOUT`].
    pub fn timeout(&self) -> Duration {
        self.timeout
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The cache directory in use: [`HubOptions::cache_dir`], or `~/.cache/huggingface/hub`.
    pub fn cache(&self) -> Result<PathBuf> {
        match &self.cache_dir {
            Some(dir) => Ok(dir.clone()),
            None => dirs::home_dir()
                .map(|home| home.join(".cache").join("huggingface").join("hub"))
                .ok_or_else(|| {
                    DataError::Config(
                        "no home directory for the Hugging Face cache: set HF_HOME".to_string(),
                    )
                }),
        }
    }
}

/// The options [`installed`] returns.
static INSTALLED: std::sync::RwLock<Option<HubOptions>> = std::sync::RwLock::new(None);

/// Makes `options` the process-wide Hub options, which [`crate::Dataset::open`] uses for
/// `hf:` data sets (the binary installs what the environment says, as it installs the kernel
/// policy; library users may instead call [`crate::hub_dataset::load`] with options of their
/// own).
pub fn install(options: HubOptions) {
    *INSTALLED.write().unwrap_or_else(|e| e.into_inner()) = Some(options);
}

/// The installed Hub options ([`install`]), or the defaults.
pub fn installed() -> HubOptions {
    INSTALLED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The kind of a Hub repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoType {
    /// A model (weights and configs).
    Model,
    /// A data set.
    Dataset,
}

impl RepoType {
    /// `models` or `datasets`: the word in the Hub's API paths and cache folder names.
    pub fn plural(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }

    fn to_hf(self) -> hf_hub::RepoType {
        match self {
            RepoType::Model => hf_hub::RepoType::Model,
            RepoType::Dataset => hf_hub::RepoType::Dataset,
        }
    }
}

/// A Hub repository: its type and `OWNER/NAME` id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    /// Model or data set.
    pub repo_type: RepoType,
    /// `OWNER/NAME`.
    pub id: String,
}

impl Repo {
    /// A repository, its id checked: `OWNER/NAME` (or a bare `NAME`, as old canonical
    /// repositories are named), of ASCII letters, digits, `-`, `_` and `.`, neither part starting
    /// with `.` or `-` nor holding `..`.
    pub fn new(repo_type: RepoType, id: &str) -> Result<Repo> {
        let parts: Vec<&str> = id.split('/').collect();
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
        };
        if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
            return Err(DataError::Hub {
                what: format!("the repository {id:?}"),
                hint: "a Hub repository is OWNER/NAME (letters, digits, '-', '_', '.'), such as \
                       ylecun/mnist or google/ddpm-cifar10-32"
                    .to_string(),
                source: None,
            });
        }
        Ok(Repo {
            repo_type,
            id: id.to_string(),
        })
    }

    /// A model repository ([`Repo::new`]).
    pub fn model(id: &str) -> Result<Repo> {
        Repo::new(RepoType::Model, id)
    }

    /// A data-set repository ([`Repo::new`]).
    pub fn dataset(id: &str) -> Result<Repo> {
        Repo::new(RepoType::Dataset, id)
    }

    /// The repository's folder in the cache: `models--OWNER--NAME` or `datasets--OWNER--NAME`.
    pub fn cache_folder(&self) -> String {
        format!(
            "{}--{}",
            self.repo_type.plural(),
            self.id.replace('/', "--")
        )
    }

    fn hf(&self, revision: &str) -> hf_hub::Repo {
        hf_hub::Repo::with_revision(
            self.id.clone(),
            self.repo_type.to_hf(),
            revision.to_string(),
        )
    }
}

impl fmt::Display for Repo {
    /// `OWNER/NAME` for a model, `datasets/OWNER/NAME` for a data set (as in the Hub's URLs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.repo_type {
            RepoType::Model => f.write_str(&self.id),
            RepoType::Dataset => write!(f, "datasets/{}", self.id),
        }
    }
}

/// One file of a repository at a commit, with what it is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// The path in the repository, `/`-separated.
    pub path: String,
    /// Its size in bytes, when known (from the listing; not in offline mode).
    pub size: Option<u64>,
    /// The SHA-256 of its content (lower-case hex), for a Git LFS file.
    pub sha256: Option<String>,
    /// Its Git blob SHA-1 (lower-case hex), for a file kept in Git itself.
    pub git_sha1: Option<String>,
}

/// A repository at one commit: what [`Hub::snapshot`] resolved a revision to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The repository.
    pub repo: Repo,
    /// The revision asked for (branch, tag or commit).
    pub revision: String,
    /// The commit it resolved to: 40 lower-case hex digits.
    pub commit: String,
    /// The files at that commit, sorted by path (in offline mode: those in the cache).
    pub files: Vec<RepoFile>,
    /// Whether this came from the cache (offline mode) rather than from the Hub.
    pub offline: bool,
}

impl Snapshot {
    /// The file at `path`, if the commit has it.
    pub fn file(&self, path: &str) -> Option<&RepoFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// `OWNER/NAME@COMMIT` (with `datasets/` before data sets), for messages.
    pub fn label(&self) -> String {
        format!("{}@{}", self.repo, self.commit)
    }
}

/// Whether `s` is a full commit id: 40 hex digits.
pub fn is_commit(s: &str) -> bool {
    is_hex(s, 40)
}

/// A client of the Hub with its cache: see the module doc.
pub struct Hub {
    options: HubOptions,
    cache: PathBuf,
    /// `None` in offline mode.
    online: Option<Online>,
}

/// What requests to the Hub need.
struct Online {
    /// Timeouts, retries and progress bars of the downloads.
    fetch: crate::fetch::FetchOptions,
    /// The HTTP client, made once: every request of this Hub reuses its connections.
    agent: ureq::Agent,
    /// The access token, if any.
    token: Option<String>,
}

impl Online {
    fn transfer(&self) -> Transfer<'_> {
        Transfer::with_agent(&self.fetch, self.agent.clone(), self.token.as_deref())
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("options", &self.options)
            .field("cache", &self.cache)
            .finish()
    }
}

/// The repository's listing as the Hub's API gives it (`?blobs=true`).
#[derive(Deserialize)]
struct Listing {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Hub {
    /// A client for these options. Contacts nothing yet.
    pub fn new(options: &HubOptions) -> Result<Hub> {
        let cache = options.cache()?;
        if !options.offline {
            check_endpoint(&options.endpoint())?;
        }
        let online = (!options.offline).then(|| {
            let mut fetch = crate::fetch::FetchOptions::new(PathBuf::new());
            fetch.timeout = options.timeout();
            fetch.progress = options.progress;
            fetch.retries = options.retries.unwrap_or(fetch.retries);
            fetch.roots = options.roots.clone();
            fetch.proxy = options.proxy.clone();
            // The token of the options, else the one `huggingface-cli login` wrote beside the
            // cache (nothing is taken from the environment here).
            let token = options
                .token
                .as_ref()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .or_else(|| hf_hub::Cache::new(cache.clone()).token());
            Transfer::agent(&fetch).map(|agent| Online {
                fetch,
                agent,
                token,
            })
        });
        let online = online.transpose()?;
        Ok(Hub {
            options: options.clone(),
            cache,
            online,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Whether this client never contacts the Hub.
    pub fn is_offline(&self) -> bool {
        self.online.is_none()
    }

    fn repo_dir(&self, repo: &Repo) -> PathBuf {
        self.cache.join(repo.cache_folder())
    }

    /// Resolves `revision` (a branch such as `main`, a tag, a ref such as
    /// `refs/convert/parquet`, or a commit) of `repo` to its commit and lists the files there.
    ///
    /// Online this asks the Hub (and records `refs/<revision>` in the cache, so that offline mode
    /// finds it later); offline it reads the cache: a commit's snapshot folder, or the commit a
    /// ref names, and the files cached for it.
    pub fn snapshot(&self, repo: &Repo, revision: &str) -> Result<Snapshot> {
        check_revision(revision)?;
        match &self.online {
            None => self.cached_snapshot(repo, revision),
            Some(online) => {
                let endpoint = self.options.endpoint();
                let url = format!("{endpoint}/api/{}", repo.hf(revision).api_url());
                let what = format!("{repo} at revision {revision}");
                let listing: Listing = online
                    .transfer()
                    .get(&url)?
                    .query("blobs", "true")
                    // A listing is small: one sent slowly enough to keep each read within the
                    // timeout still ends at ten of them.
                    .config()
                    .timeout_global(Some(self.options.timeout() * LISTING_TIMEOUTS))
                    .build()
                    .call()
                    .map_err(|e| {
                        let e = online.transfer().transport_error(&url, e);
                        download_error(&what, &endpoint, e)
                    })
                    .and_then(|mut response| {
                        let status = response.status().as_u16();
                        let body = response
                            .body_mut()
                            .with_config()
                            .limit(MAX_LISTING)
                            .read_to_string();
                        if status != 200 {
                            return Err(status_error(
                                &what,
                                &url,
                                &endpoint,
                                status,
                                body.as_deref().unwrap_or_default(),
                            ));
                        }
                        let body = body.map_err(|e| {
                            let via = online.transfer().proxy_of(&url);
                            transport_error(&what, &endpoint, e, via.as_deref())
                        })?;
                        serde_json::from_str(&body).map_err(|e| DataError::Hub {
                            what: format!("{what} ({url})"),
                            hint: "the Hub's answer is not a repository listing".to_string(),
                            source: Some(Box::new(e)),
                        })
                    })?;
                let commit = listing.sha.to_ascii_lowercase();
                if !is_commit(&commit) {
                    return Err(DataError::Hub {
                        what,
                        hint: format!(
                            "the Hub named the commit {:?}, not 40 hex digits",
                            listing.sha
                        ),
                        source: None,
                    });
                }
                if is_commit(revision) && revision.to_ascii_lowercase() != commit {
                    return Err(DataError::Hub {
                        what,
                        hint: format!(
                            "the Hub answered for another commit, {commit}: is {endpoint} a \
                             Hugging Face Hub?"
                        ),
                        source: None,
                    });
                }
                let mut files = Vec::with_capacity(listing.siblings.len());
                for s in listing.siblings {
                    check_path(&s.rfilename).map_err(|reason| DataError::Hub {
                        what: format!("{repo}@{commit}"),
                        hint: format!("the listing names a file {:?}: {reason}", s.rfilename),
                        source: None,
                    })?;
                    // The hashes name files in the cache: nothing but hex digits of the right
                    // length may pass.
                    let bad_hash = |kind: &str, digits: usize, h: &str| DataError::Hub {
                        what: format!("{repo}@{commit}"),
                        hint: format!(
                            "the listing gives {} the {kind} {h:?}, not {digits} hex digits: is \
                             {endpoint} a Hugging Face Hub?",
                            s.rfilename
                        ),
                        source: None,
                    };
                    if let Some(lfs) = &s.lfs {
                        if !is_hex(&lfs.sha256, 64) {
                            return Err(bad_hash("SHA-256", 64, &lfs.sha256));
                        }
                    }
                    if let Some(blob) = &s.blob_id {
                        if !is_hex(blob, 40) {
                            return Err(bad_hash("blob id", 40, blob));
                        }
                    }
                    let hex = |h: String| Some(h.to_ascii_lowercase());
                    files.push(match s.lfs {
                        Some(lfs) => RepoFile {
                            path: s.rfilename,
                            size: Some(lfs.size),
                            sha256: hex(lfs.sha256),
                            git_sha1: None,
                        },
                        None => RepoFile {
                            path: s.rfilename,
                            size: s.size,
                            sha256: None,
                            git_sha1: s.blob_id.and_then(hex),
                        },
                    });
                }
                files.sort_by(|a, b| a.path.cmp(&b.path));
                if revision != commit {
                    self.write_ref(repo, revision, &commit)?;
                }
                Ok(Snapshot {
                    repo: repo.clone(),
                    revision: revision.to_string(),
                    commit,
                    files,
                    offline: false,
                })
            }
        }
    }

    /// `refs/<revision>` = `commit` in the repository's cache folder (as `huggingface_hub` does).
    fn write_ref(&self, repo: &Repo, revision: &str, commit: &str) -> Result<()> {
        let path = self.repo_dir(repo).join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
        }
        // Written aside (under a name of this process's own) and renamed, so a reader never sees
        // half a commit id and two writers never take each other's file.
        let tmp = unique_sibling(&path);
        std::fs::write(&tmp, commit).map_err(DataError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(DataError::io(&path))
    }

    fn cached_snapshot(&self, repo: &Repo, revision: &str) -> Result<Snapshot> {
        let dir = self.repo_dir(repo);
        let lower = revision.to_ascii_lowercase();
        let commit = if is_commit(&lower) && dir.join("snapshots").join(&lower).is_dir() {
            lower
        } else {
            match std::fs::read_to_string(dir.join("refs").join(revision)) {
                Ok(c) if is_commit(c.trim()) => c.trim().to_ascii_lowercase(),
                _ => {
                    return Err(DataError::HubOffline {
                        what: format!("{repo} at revision {revision}"),
                        cache: self.cache.clone(),
                    })
                }
            }
        };
        let root = dir.join("snapshots").join(&commit);
        let mut files = Vec::new();
        if root.is_dir() {
            list_cached(&root, "", &mut files)?;
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Snapshot {
            repo: repo.clone(),
            revision: revision.to_string(),
            commit,
            files,
            offline: true,
        })
    }

    /// The local path of `path` at the snapshot's commit: from the cache when it is there and
    /// verifies, downloaded otherwise (then verified; see the module doc). Offline, a file not
    /// in the cache is [`DataError::HubOffline`].
    pub fn get(&self, snapshot: &Snapshot, path: &str) -> Result<PathBuf> {
        let label = format!("{}/{path}", snapshot.label());
        let Some(entry) = snapshot.file(path) else {
            if snapshot.offline {
                return Err(DataError::HubOffline {
                    what: label,
                    cache: self.cache.clone(),
                });
            }
            let shown: Vec<&str> = snapshot
                .files
                .iter()
                .take(12)
                .map(|f| f.path.as_str())
                .collect();
            return Err(DataError::Hub {
                what: label,
                hint: format!(
                    "the commit has no such file; it has {} files: {}{}",
                    snapshot.files.len(),
                    shown.join(", "),
                    if snapshot.files.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
                source: None,
            });
        };
        let pointer = self
            .repo_dir(&snapshot.repo)
            .join("snapshots")
            .join(&snapshot.commit)
            .join(path);
        if pointer.exists() {
            let expected = if snapshot.offline {
                cached_entry(&pointer, path)
            } else {
                entry.clone()
            };
            match verify(&pointer, &expected, &label) {
                Ok(()) => return Ok(pointer),
                Err(e) if self.online.is_none() => {
                    return Err(damaged_in_cache(&label, &pointer, e))
                }
                Err(e) => {
                    tracing::warn!(file = %label, error = %e, "cached Hub file does not match the listing: downloading it again");
                    if verify(&pointer, &cached_entry(&pointer, path), &label).is_ok() {
                        // The blob still matches the hash it is named by: it is sound, and other
                        // commits may link to it. Only this link, which the listing says should
                        // lead to other bytes, goes.
                        let _ = std::fs::remove_file(&pointer);
                    } else {
                        remove_cached(&pointer);
                    }
                }
            }
        } else if pointer.symlink_metadata().is_ok() {
            // A link to a blob that is gone.
            remove_cached(&pointer);
        }
        let Some(online) = &self.online else {
            return Err(DataError::HubOffline {
                what: label,
                cache: self.cache.clone(),
            });
        };
        self.download(online, snapshot, entry, &pointer, &label)?;
        Ok(pointer)
    }

    /// Downloads `entry` of the snapshot into its blob (under a lock, checked against the
    /// listing) and links `pointer` to it.
    fn download(
        &self,
        online: &Online,
        snapshot: &Snapshot,
        entry: &RepoFile,
        pointer: &Path,
        label: &str,
    ) -> Result<()> {
        let endpoint = self.options.endpoint();
        let Some(size) = entry.size else {
            // Without a size, a server could send bytes without end.
            return Err(DataError::Hub {
                what: label.to_string(),
                hint: format!(
                    "the listing gives no size for it: is {endpoint} a Hugging Face Hub?"
                ),
                source: None,
            });
        };
        let hf = snapshot.repo.hf(&snapshot.commit);
        let url = format!(
            "{endpoint}/{}/resolve/{}/{}",
            hf.url(),
            hf.url_revision(),
            quote_path(&entry.path)
        );
        let blobs = self.repo_dir(&snapshot.repo).join("blobs");
        std::fs::create_dir_all(&blobs).map_err(DataError::io(&blobs))?;
        // Named by the hash the Hub gives as its ETag (huggingface_hub's layout); a file the
        // listing gives no hash for is named by the SHA-256 of what arrived.
        let known = entry.sha256.clone().or_else(|| entry.git_sha1.clone());
        let stem = known
            .clone()
            .unwrap_or_else(|| format!("unlisted-{}", sha256_hex(url.as_bytes())));
        // Where `huggingface_hub` keeps its locks, so that the two wait for each other.
        let locks = self.cache.join(".locks").join(snapshot.repo.cache_folder());
        std::fs::create_dir_all(&locks).map_err(DataError::io(&locks))?;
        let lock_path = locks.join(format!("{stem}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(DataError::io(&lock_path))?;
        if let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock() {
            tracing::info!(file = %label, lock = %lock_path.display(), "another process is downloading this file: waiting for it");
            lock.lock().map_err(DataError::io(&lock_path))?;
        }
        let blob = blobs.join(&stem);
        // Another process may have brought it while this one waited.
        let have = known.is_some() && verify(&blob, entry, label).is_ok();
        let blob = if have {
            blob
        } else {
            let part = blobs.join(format!("{stem}.part"));
            tracing::info!(file = %label, %url, "downloading from the Hub");
            let transfer = online.transfer();
            let bar = transfer.byte_bar(&entry.path);
            let fetched =
                transfer.fetch(&Location::Url(url.clone()), &part, Some(&bar), Some(size));
            bar.finish_and_clear();
            fetched.map_err(|e| download_error(label, &endpoint, e))?;
            if let Err(e) = verify(&part, entry, label) {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            let blob = match known {
                Some(_) => blob,
                None => blobs.join(hash_file(&part, sha2::Sha256::new())?),
            };
            std::fs::rename(&part, &blob).map_err(DataError::io(&blob))?;
            blob
        };
        link(&blob, pointer)?;
        drop(lock);
        Ok(())
    }
}

/// Points `pointer` (in `snapshots/<commit>/`) at `blob` (in `blobs/`): a relative symbolic link
/// where the system has them, as `huggingface_hub` makes; a copy elsewhere.
///
/// A link that is already right is left alone, and a new one replaces the old by a rename, so a
/// process reading the file while another links it never finds it missing.
fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let dir = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    let tmp = unique_sibling(pointer);
    #[cfg(unix)]
    {
        // From the link's folder up to the repository folder, then into blobs/.
        let repo_dir = blob
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let depth = dir
            .strip_prefix(repo_dir)
            .map_or(0, |d| d.components().count());
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        if std::fs::read_link(pointer).is_ok_and(|t| t == target) {
            return Ok(());
        }
        std::os::unix::fs::symlink(&target, &tmp).map_err(DataError::io(&tmp))?;
    }
    #[cfg(not(unix))]
    std::fs::copy(blob, &tmp).map_err(DataError::io(&tmp))?;
    std::fs::rename(&tmp, pointer).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io(pointer)(e)
    })
}

/// A repository path for a URL: each byte outside the unreserved set and `/` percent-encoded.
fn quote_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses an endpoint that is not an `http(s)://HOST[:PORT]` address, before any request.
fn check_endpoint(endpoint: &str) -> Result<()> {
    let bad = |why: &str| DataError::Hub {
        what: format!("the Hub endpoint {endpoint:?}"),
        hint: format!(
            "{why}: give the address as http(s)://HOST[:PORT] (HF_ENDPOINT; default \
             {DEFAULT_ENDPOINT})"
        ),
        source: None,
    };
    let uri: ureq::http::Uri = endpoint.parse().map_err(|_| bad("it is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("it is not an http or https URL"));
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(bad("it names no host"));
    };
    // The port as written (the parser drops one it cannot read rather than failing): after any
    // user info and an IPv6 address's brackets.
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    let after_host = host_port
        .rsplit_once(']')
        .map_or(host_port, |(_, rest)| rest);
    if let Some((_, port)) = after_host.rsplit_once(':') {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("its port is not a number from 1 to 65535"));
        }
    }
    Ok(())
}

/// Refuses revisions that could leave the cache's `refs/` folder or break a URL.
fn check_revision(revision: &str) -> Result<()> {
    let bad = revision.is_empty()
        || revision.starts_with('/')
        || revision.ends_with('/')
        || revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        || revision
            .chars()
            .any(|c| c.is_control() || matches!(c, ' ' | '\\' | ':' | '?' | '#' | '%' | '~' | '^'));
    if bad {
        return Err(DataError::Hub {
            what: format!("the revision {revision:?}"),
            hint: "a revision is a branch, tag or commit id (such as main, v1.0, \
                   refs/convert/parquet or 40 hex digits)"
                .to_string(),
            source: None,
        });
    }
    Ok(())
}

/// Why a repository path is unsafe to place in the cache, if it is.
fn check_path(path: &str) -> std::result::Result<(), &'static str> {
    if path.is_empty() || path.contains('\\') || path.contains('\0') {
        return Err("empty, or with a backslash or NUL");
    }
    for c in Path::new(path).components() {
        if !matches!(c, Component::Normal(_)) {
            return Err("not a plain relative path (it is absolute, or has `.` or `..`)");
        }
    }
    Ok(())
}

/// The files under a cached snapshot folder, with the hash each one's blob is named after.
fn list_cached(dir: &Path, prefix: &str, out: &mut Vec<RepoFile>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(DataError::io(dir))? {
        let entry = entry.map_err(DataError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            list_cached(&path, &rel, out)?;
        } else if path.is_file() {
            out.push(cached_entry(&path, &rel));
        }
    }
    Ok(())
}

/// What a cached file can be checked against offline: the hash in its blob's name.
fn cached_entry(pointer: &Path, rel: &str) -> RepoFile {
    let blob = std::fs::read_link(pointer).ok().and_then(|t| {
        t.file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
    });
    let hex = |len| blob.clone().filter(|b| is_hex(b, len));
    RepoFile {
        path: rel.to_string(),
        size: None,
        sha256: hex(64),
        git_sha1: hex(40),
    }
}

/// The error for a cached file that offline mode finds damaged (its bytes do not match the hash
/// its blob is named by): nothing was deleted, and only an online run can replace it.
fn damaged_in_cache(label: &str, pointer: &Path, e: DataError) -> DataError {
    let detail = match e {
        DataError::ChecksumMismatch {
            algorithm,
            expected,
            actual,
            ..
        } => format!("its {algorithm} is {actual}, not the {expected} its blob is named by"),
        other => other.to_string(),
    };
    DataError::Hub {
        what: label.to_string(),
        hint: format!(
            "the cached copy {} is damaged ({detail}); offline mode (HF_HUB_OFFLINE) cannot \
             fetch it again: run once online to replace it",
            pointer.display()
        ),
        source: None,
    }
}

/// Deletes a cached file: its blob (where the link leads) and the link itself.
fn remove_cached(pointer: &Path) {
    if let Ok(blob) = std::fs::canonicalize(pointer) {
        if blob != pointer {
            let _ = std::fs::remove_file(&blob);
        }
    }
    let _ = std::fs::remove_file(pointer);
}

/// Checks a local file against its listing entry: size, then SHA-256 (LFS) or Git blob SHA-1.
fn verify(path: &Path, expected: &RepoFile, label: &str) -> Result<()> {
    const HINT: &str = "the Hub (or something between) served other bytes than its listing \
                        declares; run again to download it anew, and report it if it persists";
    let len = std::fs::metadata(path).map_err(DataError::io(path))?.len();
    if let Some(size) = expected.size {
        if size != len {
            return Err(DataError::SizeMismatch {
                file: label.to_string(),
                expected: size,
                actual: len,
                hint: HINT.to_string(),
            });
        }
    }
    let mismatch = |algorithm, expected: &str, actual: String| DataError::ChecksumMismatch {
        file: label.to_string(),
        algorithm,
        expected: expected.to_string(),
        actual,
        hint: HINT.to_string(),
    };
    if let Some(want) = &expected.sha256 {
        let got = hash_file(path, sha2::Sha256::new())?;
        if &got != want {
            return Err(mismatch("sha256", want, got));
        }
    } else if let Some(want) = &expected.git_sha1 {
        let mut hasher = sha1::Sha1::new();
        hasher.update(format!("blob {len}\0").as_bytes());
        let got = hash_file(path, hasher)?;
        if &got != want {
            return Err(mismatch("git blob sha1", want, got));
        }
    }
    Ok(())
}

/// Feeds a file through a hasher; its digest as lower-case hex.
fn hash_file<D: sha1::Digest>(path: &Path, mut hasher: D) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(DataError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The SHA-256 of `bytes` as lower-case hex (what the Hub lists for an LFS file).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The Git blob SHA-1 of `bytes` as lower-case hex (what the Hub lists as a file's `blobId`).
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
    hasher.update(bytes);
    hex::encode(hasher.finalize())
}

/// What an HTTP status from the Hub most likely means.
fn status_hint(status: u16, endpoint: &str) -> String {
    match status {
        401 | 403 => "the Hub refused access: a private or gated repository needs a token with \
                      access (HF_TOKEN, or `huggingface-cli login`), and a gated one your \
                      acceptance of its terms on its page"
            .to_string(),
        404 => format!(
            "not found on {endpoint}: check OWNER/NAME and the revision (private repositories \
             answer 404 without a token: set HF_TOKEN)"
        ),
        429 => "the Hub is rate-limiting these requests: wait and run again (a token raises the \
                limit)"
            .to_string(),
        s if s >= 500 => format!("the Hub failed (HTTP {s}): run again later"),
        s => format!(
            "{endpoint} answered HTTP {s}, which a Hub does not send for this request: run \
             again later, and if it persists check HF_ENDPOINT (or a proxy in between)"
        ),
    }
}

fn transport_hint(endpoint: &str) -> String {
    format!(
        "cannot reach {endpoint}: check the network (or HF_ENDPOINT); with the files already \
         cached, set HF_HUB_OFFLINE=1 to use them without the network"
    )
}

/// A request to the Hub that got no answer (or broke off), with what to do; `via` names the
/// proxy it went through, if any, which may be at fault as much as the Hub.
fn transport_error(what: &str, endpoint: &str, e: ureq::Error, via: Option<&str>) -> DataError {
    if let Some(via) = via {
        return DataError::Hub {
            what: what.to_string(),
            hint: format!(
                "the connection to {endpoint} through the proxy {via} failed: check that the \
                 proxy works, or list the Hub's host in NO_PROXY to reach it directly; with the \
                 files already cached, set HF_HUB_OFFLINE=1 to use them without the network"
            ),
            source: Some(Box::new(e)),
        };
    }
    let hint = match &e {
        ureq::Error::Timeout(_) => format!(
            "{endpoint} did not answer in time (HF_HUB_DOWNLOAD_TIMEOUT sets the seconds); check \
             the network (or HF_ENDPOINT); with the files already cached, set HF_HUB_OFFLINE=1 to \
             use them without the network"
        ),
        ureq::Error::Io(_) | ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => {
            transport_hint(endpoint)
        }
        // It answered, with something a Hub does not send (a redirect without a target or in a
        // loop, a body over the limit, broken HTTP).
        _ => format!("the answer of {endpoint} cannot be used: is it a Hugging Face Hub?"),
    };
    DataError::Hub {
        what: what.to_string(),
        hint,
        source: Some(Box::new(e)),
    }
}

/// An answer other than 200 to a request to the Hub, with what to do.
fn status_error(what: &str, url: &str, endpoint: &str, status: u16, body: &str) -> DataError {
    let detail = hub_message(body).map(|m| format!(" (the Hub says: {m})"));
    DataError::Hub {
        what: what.to_string(),
        hint: format!(
            "{}{}",
            status_hint(status, endpoint),
            detail.unwrap_or_default()
        ),
        source: Some(format!("HTTP {status} from {url}").into()),
    }
}

/// The `error` field of a JSON error body from the Hub, if there is one.
fn hub_message(body: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        error: String,
    }
    serde_json::from_str::<Body>(body)
        .ok()
        .map(|b| b.error.chars().take(200).collect())
}

/// An error of a file's download, in the Hub's terms.
fn download_error(what: &str, endpoint: &str, e: DataError) -> DataError {
    match e {
        DataError::HttpStatus { url, status, .. } => status_error(what, &url, endpoint, status, ""),
        DataError::Http { source, via, .. } => {
            transport_error(what, endpoint, *source, via.as_deref())
        }
        DataError::Interrupted {
            received, source, ..
        } => DataError::Hub {
            what: what.to_string(),
            hint: format!(
                "the download from {endpoint} broke off after {received} bytes ({source}), \
                 after every retry: run again to resume it (HF_HUB_DOWNLOAD_TIMEOUT sets the \
                 seconds a read may wait)"
            ),
            source: None,
        },
        DataError::SizeMismatch {
            expected, actual, ..
        } => DataError::SizeMismatch {
            file: what.to_string(),
            expected,
            actual,
            hint: "the Hub (or something between) served another size than its listing \
                   declares; run again to download it anew, and report it if it persists"
                .to_string(),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_git_and_sha256_sum() {
        // `printf 'hello\n' | git hash-object --stdin` and `sha256sum`.
        assert_eq!(
            git_blob_sha1(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            sha256_hex(b"hello\n"),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert_eq!(
            git_blob_sha1(b""),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }

    #[test]
    fn every_status_says_what_to_do() {
        let endpoint = "http://hub.test";
        for status in [400, 401, 403, 404, 405, 416, 429, 500, 503] {
            let hint = status_hint(status, endpoint);
            let acts = ["run again", "check", "set", "wait", "token"];
            assert!(
                acts.iter().any(|a| hint.contains(a)),
                "HTTP {status}: no advice in {hint:?}"
            );
        }
        assert!(status_hint(416, endpoint).contains("HF_ENDPOINT"));
    }

    #[test]
    fn repo_ids_and_revisions_are_checked() {
        for good in ["ylecun/mnist", "uoft-cs/cifar10", "a/b.c_d-e", "mnist"] {
            assert!(Repo::dataset(good).is_ok(), "{good}");
        }
        for bad in [
            "", "a/b/c", "../x", "a/..", "a/.b", "a b/c", "a/-x", "/a", "a/",
        ] {
            assert!(Repo::dataset(bad).is_err(), "{bad:?}");
        }
        let repo = Repo::dataset("ylecun/mnist").unwrap();
        assert_eq!(repo.cache_folder(), "datasets--ylecun--mnist");
        assert_eq!(repo.to_string(), "datasets/ylecun/mnist");
        assert_eq!(
            Repo::model("google/ddpm-cifar10-32")
                .unwrap()
                .cache_folder(),
            "models--google--ddpm-cifar10-32"
        );
        for good in ["main", "v1.0", "refs/convert/parquet", "refs/pr/3"] {
            assert!(check_revision(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a//b", "/main", "main/", "a b", "a:b", "x/../y"] {
            assert!(check_revision(bad).is_err(), "{bad:?}");
        }
        assert!(is_commit(&"a".repeat(40)) && !is_commit(&"g".repeat(40)) && !is_commit("abc"));
        for bad in ["../x", "/etc/passwd", "a/../../b", "a\\b", ""] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path("data/train-00000-of-00001.parquet").is_ok());
    }

    #[test]
    fn options_default_and_hide_the_token() {
        let o = HubOptions {
            endpoint: Some("http://127.0.0.1:9/ ".into()),
            token: Some("hf_secret".into()),
            cache_dir: Some("/tmp/c".into()),
            ..HubOptions::default()
        };
        assert_eq!(o.endpoint(), "http://127.0.0.1:9");
        assert_eq!(HubOptions::default().endpoint(), DEFAULT_ENDPOINT);
        for good in [
            "https://huggingface.co",
            "http://127.0.0.1:8080/",
            "http://[::1]:9/",
        ] {
            assert!(check_endpoint(good.trim_end_matches('/')).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("http://127.0.0.1:99999", "port"),
            ("http://127.0.0.1:0", "port"),
            ("ftp://mirror", "http or https"),
            ("127.0.0.1:8080", "http or https"),
            ("http://", "not a URL"),
            ("not a url", "not a URL"),
        ] {
            let Err(err) = check_endpoint(bad) else {
                panic!("{bad} accepted");
            };
            let err = err.to_string();
            assert!(
                err.contains(why) && err.contains("HF_ENDPOINT"),
                "{bad}: {err}"
            );
        }
        // Offline mode contacts nothing, so it does not look at the endpoint.
        let offline = HubOptions {
            endpoint: Some("ftp://x".into()),
            offline: true,
            cache_dir: Some("/tmp/c".into()),
            ..HubOptions::default()
        };
        assert!(Hub::new(&offline).is_ok());
        assert_eq!(o.cache().unwrap(), PathBuf::from("/tmp/c"));
        let shown = format!("{o:?} {:?}", Hub::new(&o).unwrap());
        assert!(!shown.contains("hf_secret"), "{shown}");
    }

    #[test]
    fn offline_snapshots_come_from_the_cache_and_verify_by_blob_name() {
        let dir = tempfile::tempdir().unwrap();
        let opts = HubOptions {
            cache_dir: Some(dir.path().to_path_buf()),
            offline: true,
            ..HubOptions::default()
        };
        let hub = Hub::new(&opts).unwrap();
        let repo = Repo::model("o/n").unwrap();
        let err = hub.snapshot(&repo, "main").unwrap_err();
        assert!(matches!(err, DataError::HubOffline { .. }), "{err}");
        assert!(err.to_string().contains("o/n at revision main"), "{err}");
        // A cache as hf-hub leaves it: a blob named by its hash, a link, a ref.
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let root = dir.path().join("models--o--n");
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        std::fs::create_dir_all(root.join("snapshots").join(commit).join("unet")).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), commit).unwrap();
        let body = b"{\"a\": 1}\n";
        let blob = git_blob_sha1(body);
        std::fs::write(root.join("blobs").join(&blob), body).unwrap();
        let link = root.join("snapshots").join(commit).join("unet/config.json");
        std::os::unix::fs::symlink(format!("../../../blobs/{blob}"), &link).unwrap();
        let snap = hub.snapshot(&repo, "main").unwrap();
        assert_eq!(snap.commit, commit);
        assert!(snap.offline);
        assert_eq!(snap.files.len(), 1);
        assert_eq!(snap.files[0].git_sha1.as_deref(), Some(blob.as_str()));
        assert_eq!(hub.get(&snap, "unet/config.json").unwrap(), link);
        assert_eq!(hub.snapshot(&repo, commit).unwrap().commit, commit);
        let err = hub.get(&snap, "unet/model.safetensors").unwrap_err();
        assert!(matches!(err, DataError::HubOffline { .. }), "{err}");
        assert!(err.to_string().contains("unet/model.safetensors"), "{err}");
        // A blob that no longer has its hash is refused.
        std::fs::write(root.join("blobs").join(&blob), b"{\"a\": 2}\n").unwrap();
        let err = hub.get(&snap, "unet/config.json").unwrap_err();
        assert!(
            matches!(&err, DataError::Hub { hint, .. } if hint.contains("is damaged")),
            "{err}"
        );
    }
}
