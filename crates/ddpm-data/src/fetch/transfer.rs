//! Getting bytes from a URL or a directory into a file: HTTP Range resume, retries with
//! exponential backoff, progress bars.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::{FetchOptions, ProxyConfig};
use crate::error::{DataError, Result};

/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The largest small text file (a checksum list) read into memory.
const MAX_TEXT: u64 = 64 << 20;

/// Where a file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Url(String),
    Path(PathBuf),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Url(u) => f.write_str(u),
            Location::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Whether an error means the file does not exist at its location.
pub(crate) fn is_not_found(e: &DataError) -> bool {
    matches!(
        e,
        DataError::MissingFile { .. }
            | DataError::HttpStatus {
                status: 404 | 410,
                ..
            }
    )
}

/// Whether trying again may help.
pub(crate) fn is_transient(e: &DataError) -> bool {
    match e {
        DataError::Interrupted { .. } => true,
        DataError::HttpStatus { status, .. } => matches!(status, 408 | 429 | 500..=599),
        DataError::Http { source, .. } => matches!(
            **source,
            ureq::Error::Io(_)
                | ureq::Error::Timeout(_)
                | ureq::Error::HostNotFound
                | ureq::Error::ConnectionFailed
                | ureq::Error::Protocol(_)
        ),
        _ => false,
    }
}

/// Whether `e` is a host name that could not be resolved (no network, no DNS, a typo).
pub(crate) fn is_unresolved(e: &DataError) -> bool {
    match e {
        DataError::Http { source, .. } => match &**source {
            ureq::Error::HostNotFound => true,
            // The standard library's resolver error has no kind of its own to match.
            ureq::Error::Io(io) => io.to_string().contains("failed to lookup address"),
            _ => false,
        },
        _ => false,
    }
}

/// The TLS library's words when `e` is a failed TLS handshake (an untrusted or invalid
/// certificate, a refused protocol).
pub(crate) fn tls_failure(e: &ureq::Error) -> Option<String> {
    match e {
        ureq::Error::Rustls(e) => Some(e.to_string()),
        ureq::Error::Tls(e) => Some((*e).to_string()),
        // rustls reports a certificate it refuses as an I/O error of the handshake.
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|e| e.to_string()),
        _ => None,
    }
}

fn status_hint(status: u16) -> String {
    match status {
        404 | 410 => {
            "the file is not at this address; check --from / DDPM_DATA_MIRROR, or that the \
                      upstream site still serves it"
                .to_string()
        }
        401 | 403 => {
            "access denied; the server needs credentials this tool does not have".to_string()
        }
        408 | 429 | 500..=599 => "the server failed or is overloaded; try again later".to_string(),
        // Only when no range was asked for (a partial file's 416 goes to its checksum): a
        // proxy or a server that mishandles the request.
        416 => "the server refused a byte range though none was asked for (a proxy or server \
                that mishandles the request); try again later, or fetch from a mirror \
                (--from DIR_OR_URL or DDPM_DATA_MIRROR)"
            .to_string(),
        _ => "unexpected answer from the server; try again later, or fetch from a mirror \
              (--from DIR_OR_URL or DDPM_DATA_MIRROR)"
            .to_string(),
    }
}

/// Fetches files for one data set.
pub(crate) struct Transfer<'a> {
    opts: &'a FetchOptions,
    /// The HTTP client, or `None` when it could not be made (a bad CA bundle or proxy): each
    /// request then tries again and reports why it fails, so that copies from a directory,
    /// which need no client, still work.
    agent: Option<ureq::Agent>,
    /// The `Authorization` header of every request, when there is one.
    auth: Option<String>,
}

impl<'a> Transfer<'a> {
    pub fn new(opts: &'a FetchOptions) -> Self {
        let agent = Self::agent(opts).ok();
        Transfer {
            opts,
            agent,
            auth: None,
        }
    }

    /// The HTTP client of a transfer with `opts`: its timeouts, the certificate authorities it
    /// trusts (a bundle is read now), statuses returned rather than errors. Cheap to clone;
    /// clones share their connections.
    pub fn agent(opts: &FetchOptions) -> Result<ureq::Agent> {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(opts.roots.root_certs()?)
            .build();
        Ok(ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.timeout))
            .timeout_per_read(Some(opts.timeout))
            .user_agent(concat!("ddpm-data/", env!("CARGO_PKG_VERSION")))
            // The proxy of the options only: ureq's default would read the environment.
            .proxy(opts.proxy.as_ref().map(ProxyConfig::build).transpose()?)
            .tls_config(tls)
            .build()
            .into())
    }

    /// A transfer on `agent` (made by [`Transfer::agent`] with the same `opts`), sending `token`
    /// as a bearer token, on the first request only: a redirect drops it (the Hub's redirects
    /// lead to its CDN, which needs none; ureq's same-host rule would keep it for another port
    /// of the same host).
    pub fn with_agent(opts: &'a FetchOptions, agent: ureq::Agent, token: Option<&str>) -> Self {
        Transfer {
            opts,
            agent: Some(agent),
            auth: token.map(|t| format!("Bearer {t}")),
        }
    }

    /// A GET request of `url`, with the token if there is one; an error when the client could
    /// not be made.
    pub fn get(&self, url: &str) -> Result<ureq::RequestBuilder<ureq::typestate::WithoutBody>> {
        let agent = match &self.agent {
            Some(agent) => agent.clone(),
            None => Self::agent(self.opts)?,
        };
        let request = agent.get(url);
        Ok(match &self.auth {
            Some(auth) => request.header("Authorization", auth),
            None => request,
        })
    }

    /// The proxy a request of `url` goes through, as messages name it (`VARIABLE=ADDRESS`, the
    /// password hidden), or `None` when it goes directly.
    pub fn proxy_of(&self, url: &str) -> Option<String> {
        self.opts
            .proxy
            .as_ref()
            .filter(|proxy| proxy.applies_to(url))
            .map(|proxy| format!("{}={}", proxy.named_by, proxy.shown()))
    }

    /// The error of a request of `url` that got no answer: a failed TLS handshake says what was
    /// trusted and how to trust more.
    pub fn transport_error(&self, url: &str, e: ureq::Error) -> DataError {
        if let (ureq::Error::ConnectProxyFailed(detail), Some(proxy)) = (&e, &self.opts.proxy) {
            return DataError::HttpSetting {
                setting: proxy.named_by.clone(),
                value: proxy.shown(),
                reason: format!("the proxy refused to connect to {url} ({detail})"),
                advice: "check the proxy's address and credentials, or list the host in NO_PROXY \
                         to reach it directly"
                    .to_string(),
            };
        }
        if let Some(proxy) = &self.opts.proxy {
            let unreachable = match &e {
                ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
                ureq::Error::Io(io) => {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::HostUnreachable
                            | std::io::ErrorKind::NetworkUnreachable
                            | std::io::ErrorKind::AddrNotAvailable
                    ) || io.to_string().contains("failed to lookup address")
                }
                _ => false,
            };
            // Through a proxy, the only connection this side makes is the one to the proxy.
            if unreachable && proxy.applies_to(url) {
                return DataError::HttpSetting {
                    setting: proxy.named_by.clone(),
                    value: proxy.shown(),
                    reason: format!("cannot reach the proxy ({e}) to download {url}"),
                    advice: "check the proxy's address and that it runs, or unset it to connect \
                             directly"
                        .to_string(),
                };
            }
        }
        match tls_failure(&e) {
            Some(detail) => DataError::Tls {
                url: url.to_string(),
                advice: self.opts.roots.advice(&detail),
                detail,
                trusted: self.opts.roots.describe(),
            },
            None => DataError::Http {
                url: url.to_string(),
                via: self.proxy_of(url),
                source: Box::new(e),
            },
        }
    }

    /// A byte-count progress bar (hidden when progress is off).
    pub fn byte_bar(&self, label: &str) -> ProgressBar {
        let bar = if self.opts.progress {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(
            "{msg:32} [{bar:30}] {bytes:>10}/{total_bytes:10} {binary_bytes_per_sec:>12} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        bar
    }

    /// A file-count progress bar (hidden when progress is off).
    pub fn count_bar(&self, label: &str, len: u64) -> ProgressBar {
        let bar = if self.opts.progress {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(
            "{msg:32} [{bar:30}] {pos:>6}/{len:6} files {per_sec:>12} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        bar
    }

    /// Fetches `from` into `part`, resuming a partial `part` over HTTP. With `bar`, progress is
    /// shown on it (its length is set from the response). With `size`, a file of another size is
    /// refused (and `part` deleted) as soon as that is known: from the source file's length, the
    /// server's `Content-Length`, or the bytes received.
    pub fn fetch(
        &self,
        from: &Location,
        part: &Path,
        bar: Option<&ProgressBar>,
        size: Option<u64>,
    ) -> Result<()> {
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
        }
        let result = match from {
            Location::Path(src) => copy_file(src, part, bar, size),
            Location::Url(url) => self.http_with_retries(url, part, bar, size),
        };
        if let Err(DataError::SizeMismatch { .. }) = &result {
            let _ = std::fs::remove_file(part);
        }
        result
    }

    fn http_with_retries(
        &self,
        url: &str,
        part: &Path,
        bar: Option<&ProgressBar>,
        size: Option<u64>,
    ) -> Result<()> {
        let mut attempt = 0u32;
        loop {
            match self.http_once(url, part, bar, size) {
                // A host name that does not resolve is tried once more, not `retries` times:
                // offline, the backoff would only delay the error (by a minute at 5 retries).
                Err(e) if attempt < self.opts.retries.min(1) && is_unresolved(&e) => {
                    attempt += 1;
                    tracing::warn!("{}; trying once more", e.chain());
                    std::thread::sleep(self.opts.backoff.min(MAX_BACKOFF));
                }
                Err(e) if is_unresolved(&e) => return Err(e),
                Err(e) if attempt < self.opts.retries && is_transient(&e) => {
                    attempt += 1;
                    let delay = self
                        .opts
                        .backoff
                        .saturating_mul(1 << (attempt - 1).min(16))
                        .min(MAX_BACKOFF);
                    tracing::warn!(
                        "{}; retrying in {delay:.1?} (try {} of {})",
                        e.chain(),
                        attempt + 1,
                        self.opts.retries + 1
                    );
                    std::thread::sleep(delay);
                }
                other => return other,
            }
        }
    }

    fn http_once(
        &self,
        url: &str,
        part: &Path,
        bar: Option<&ProgressBar>,
        size: Option<u64>,
    ) -> Result<()> {
        let wrong_size = |actual: u64| DataError::SizeMismatch {
            file: url.to_string(),
            expected: size.unwrap_or_default(),
            actual,
            hint: "the server sends another file than the pinned one; try again later, or fetch \
                   from a mirror (--from DIR_OR_URL or DDPM_DATA_MIRROR)"
                .to_string(),
        };
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|size| have > size) {
            // A stale partial file longer than the whole: start over.
            let _ = std::fs::remove_file(part);
            have = 0;
        }
        let mut request = self.get(url)?;
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(|e| self.transport_error(url, e))?;
        let status = response.status().as_u16();
        let length = response.body().content_length();
        let start = match status {
            200 => 0,
            206 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !range.starts_with(&format!("bytes {have}-")) {
                    // Not the range asked for: start over on the next try.
                    let _ = std::fs::remove_file(part);
                    return Err(DataError::Interrupted {
                        url: url.to_string(),
                        received: 0,
                        source: std::io::Error::other(format!(
                            "asked for bytes {have}- but got Content-Range {range:?}"
                        )),
                    });
                }
                have
            }
            // The partial file already holds everything; its checksum decides.
            416 if have > 0 => return Ok(()),
            _ => {
                return Err(DataError::HttpStatus {
                    url: url.to_string(),
                    status,
                    hint: status_hint(status),
                })
            }
        };
        if let (Some(size), Some(len)) = (size, length) {
            if start.saturating_add(len) != size {
                return Err(wrong_size(start.saturating_add(len)));
            }
        }
        if start > 0 {
            tracing::info!("resuming {url} at byte {start}");
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(part)
            .map_err(DataError::io(part))?;
        if let Some(bar) = bar {
            if let Some(len) = length {
                bar.set_length(start + len);
            }
            bar.set_position(start);
        }
        let mut reader = response.into_body().into_reader();
        let mut received = start;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    file.flush().map_err(DataError::io(part))?;
                    return Err(DataError::Interrupted {
                        url: url.to_string(),
                        received,
                        source,
                    });
                }
            };
            file.write_all(&buf[..n]).map_err(DataError::io(part))?;
            received += n as u64;
            if let Some(bar) = bar {
                bar.inc(n as u64);
            }
            if size.is_some_and(|size| received > size) {
                return Err(wrong_size(received));
            }
        }
        if let Some(len) = length {
            if received != start + len {
                return Err(DataError::Interrupted {
                    url: url.to_string(),
                    received,
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("expected {} bytes", start + len),
                    ),
                });
            }
        }
        file.flush().map_err(DataError::io(part))
    }

    /// Reads a small text file (a checksum list); `Ok(None)` if it does not exist.
    pub fn read_text(&self, from: &Location) -> Result<Option<String>> {
        let bytes = match from {
            Location::Path(path) => {
                if !path.is_file() {
                    return Ok(None);
                }
                let file = File::open(path).map_err(DataError::io(path))?;
                let mut bytes = Vec::new();
                file.take(MAX_TEXT)
                    .read_to_end(&mut bytes)
                    .map_err(DataError::io(path))?;
                bytes
            }
            Location::Url(url) => {
                let tmp =
                    tempfile::NamedTempFile::new().map_err(DataError::io(std::env::temp_dir()))?;
                // A stale partial copy must not be resumed: always start from an empty file.
                match self.http_with_retries(url, tmp.path(), None, None) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
                let len = std::fs::metadata(tmp.path())
                    .map_err(DataError::io(tmp.path()))?
                    .len();
                if len > MAX_TEXT {
                    return Err(DataError::BadChecksumList {
                        list: url.clone(),
                        line: 0,
                        reason: format!("{len} bytes is too large for a checksum list"),
                    });
                }
                std::fs::read(tmp.path()).map_err(DataError::io(tmp.path()))?
            }
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| DataError::BadChecksumList {
                list: from.to_string(),
                line: 0,
                reason: "not UTF-8 text".to_string(),
            })
    }
}

fn copy_file(src: &Path, part: &Path, bar: Option<&ProgressBar>, size: Option<u64>) -> Result<()> {
    let mut input = match File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingFile {
                path: src.into(),
                hint: "the mirror directory does not hold this file".to_string(),
            })
        }
        Err(e) => return Err(DataError::io(src)(e)),
    };
    let len = input.metadata().map_err(DataError::io(src))?.len();
    if let Some(size) = size.filter(|&size| size != len) {
        return Err(DataError::SizeMismatch {
            file: src.display().to_string(),
            expected: size,
            actual: len,
            hint: "this is not the pinned file; replace it with a good copy".to_string(),
        });
    }
    if let Some(bar) = bar {
        bar.set_length(len);
        bar.set_position(0);
    }
    let mut output = File::create(part).map_err(DataError::io(part))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DataError::io(src)(e)),
        };
        output.write_all(&buf[..n]).map_err(DataError::io(part))?;
        if let Some(bar) = bar {
            bar.inc(n as u64);
        }
    }
    output.flush().map_err(DataError::io(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unresolved_hosts_are_told_apart_from_failures_that_pass() {
        let http = |e: ureq::Error| DataError::Http {
            url: "http://x.invalid/f".into(),
            via: None,
            source: Box::new(e),
        };
        assert!(is_unresolved(&http(ureq::Error::HostNotFound)));
        let lookup = std::io::Error::other("failed to lookup address information: unknown");
        assert!(is_unresolved(&http(ureq::Error::Io(lookup))));
        for passing in [
            ureq::Error::ConnectionFailed,
            ureq::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
        ] {
            let e = http(passing);
            assert!(!is_unresolved(&e) && is_transient(&e), "{e:?}");
        }
    }

    #[test]
    fn every_status_says_what_to_do() {
        for status in [400, 401, 403, 404, 410, 416, 429, 500, 503, 999] {
            let hint = status_hint(status);
            assert!(
                ["try again", "check", "credentials"]
                    .iter()
                    .any(|a| hint.contains(a)),
                "HTTP {status}: no advice in {hint:?}"
            );
        }
        // A 416 reaches the hint only for a request without a range (a partial file's 416 is
        // settled by its checksum), so it must not blame the partial file.
        assert!(status_hint(416).contains("none was asked for"));
    }
}
