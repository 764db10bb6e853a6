//! A fake Hugging Face Hub on 127.0.0.1 for tests: answers the requests the Hub client
//! (`ddpm_data::hub`, and `hf-hub` 0.4's sync client) makes, from repositories held in memory. Include it with
//! `#[path = ".../ddpm-data/tests/support/hub_server.rs"] mod hub_server;` (it needs the `sha1`
//! and `sha2` crates among the test's dependencies, and `hex`).
//!
//! Served:
//! - `GET /api/{models,datasets}/OWNER/NAME/revision/REV[?blobs=true]`: the listing,
//!   `{"id", "sha", "siblings": [{"rfilename", "size", "blobId", "lfs": {"sha256", "size",
//!   "pointerSize"}}]}` (`lfs` for LFS files only), or 404 with `{"error": ...}`;
//! - `GET /OWNER/NAME/resolve/REV/PATH` (models) and `/datasets/OWNER/NAME/resolve/REV/PATH`:
//!   the file, with `x-repo-commit`, `etag` (the Git blob SHA-1, quoted) and, for LFS files,
//!   `x-linked-etag` (the SHA-256, quoted) and `x-linked-size`; a `Range: bytes=A-[B]` request gets
//!   206 and `content-range: bytes A-B/SIZE`, as hf-hub asks `bytes=0-0` first for the metadata.
//!
//! `REV` is a branch (or any ref, `/` escaped as `%2F`) or a commit id. [`FakeHub::corrupt`] and
//! [`FakeHub::resize`] make the server send other bytes than its listing declares;
//! [`FakeHub::set_down`] makes it answer 503 to everything, and [`FakeHub::stall`] makes it read
//! requests and never answer them.

#![allow(dead_code)] // each test binary uses a part

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Digest as _;

/// Model or data-set repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/api/models/...`, `/OWNER/NAME/resolve/...`.
    Model,
    /// `/api/datasets/...`, `/datasets/OWNER/NAME/resolve/...`.
    Dataset,
}

/// One file of a commit.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// Its path in the repository.
    pub path: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Stored with Git LFS (listed with `lfs`, sent with `x-linked-etag`).
    pub lfs: bool,
}

impl HubFile {
    /// A file kept in Git itself.
    pub fn git(path: &str, bytes: impl Into<Vec<u8>>) -> HubFile {
        HubFile {
            path: path.into(),
            bytes: bytes.into(),
            lfs: false,
        }
    }

    /// A Git LFS file.
    pub fn lfs(path: &str, bytes: impl Into<Vec<u8>>) -> HubFile {
        HubFile {
            path: path.into(),
            bytes: bytes.into(),
            lfs: true,
        }
    }
}

#[derive(Default)]
struct RepoState {
    /// Commit id to its files.
    commits: HashMap<String, Vec<HubFile>>,
    /// Ref (branch, tag, `refs/convert/parquet`) to commit id.
    refs: HashMap<String, String>,
}

/// A change made to every listing's JSON.
type Rewrite = dyn Fn(&str) -> String + Send + Sync;

#[derive(Default)]
struct State {
    repos: HashMap<(Kind, String), RepoState>,
    requests: Vec<String>,
    corrupt: HashSet<String>,
    resized: HashMap<String, i64>,
    down: bool,
    /// Request paths (or `*`, all) read and never answered.
    stalled: HashSet<String>,
    /// Rewrites every listing's JSON before it is sent.
    rewrite: Option<Arc<Rewrite>>,
    commits_made: u64,
}

/// A running fake Hub (its thread lives as long as the test process).
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`: the endpoint to give the client.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Starts a Hub with no repositories.
    pub fn start() -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        FakeHub { endpoint, state }
    }

    /// Makes a new commit of `files` in the repository `id` (created if new) and points `branch`
    /// at it; returns the commit id (40 hex digits, different for every commit).
    pub fn publish(&self, kind: Kind, id: &str, branch: &str, files: Vec<HubFile>) -> String {
        let mut st = self.state.lock().unwrap();
        st.commits_made += 1;
        let mut h = sha1::Sha1::new();
        h.update(format!("{kind:?} {id} {branch} {}", st.commits_made).as_bytes());
        for f in &files {
            h.update(f.path.as_bytes());
            h.update(&f.bytes);
        }
        let commit = hex::encode(h.finalize());
        let repo = st.repos.entry((kind, id.to_string())).or_default();
        repo.commits.insert(commit.clone(), files);
        repo.refs.insert(branch.to_string(), commit.clone());
        commit
    }

    /// Points `reference` of the repository at an existing commit.
    pub fn set_ref(&self, kind: Kind, id: &str, reference: &str, commit: &str) {
        let mut st = self.state.lock().unwrap();
        let repo = st.repos.get_mut(&(kind, id.to_string())).unwrap();
        assert!(repo.commits.contains_key(commit));
        repo.refs.insert(reference.to_string(), commit.to_string());
    }

    /// From now on, the bytes of every file at `path` are sent with one byte changed (the size
    /// stays that of the listing).
    pub fn corrupt(&self, path: &str) {
        self.state.lock().unwrap().corrupt.insert(path.to_string());
    }

    /// From now on, every file at `path` is sent `delta` bytes longer (zeros) or shorter than the
    /// listing declares (its headers consistent with what is sent).
    pub fn resize(&self, path: &str, delta: i64) {
        self.state
            .lock()
            .unwrap()
            .resized
            .insert(path.to_string(), delta);
    }

    /// Undoes [`FakeHub::corrupt`], [`FakeHub::resize`] and [`FakeHub::rewrite_listings`].
    pub fn heal(&self) {
        let mut st = self.state.lock().unwrap();
        st.corrupt.clear();
        st.resized.clear();
        st.rewrite = None;
    }

    /// Whether every request is answered 503.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// From now on, a request for a file at `path` (`*`: every request) is read and never
    /// answered: the connection stays open and silent for a minute.
    pub fn stall(&self, path: &str) {
        self.state.lock().unwrap().stalled.insert(path.to_string());
    }

    /// From now on, every listing's JSON goes through `f` before it is sent (a Hub that lies).
    pub fn rewrite_listings(&self, f: impl Fn(&str) -> String + Send + Sync + 'static) {
        self.state.lock().unwrap().rewrite = Some(Arc::new(f));
    }

    /// The request targets (path and query) received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many requests have been received.
    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

/// Decodes `%XX` escapes.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Response {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn json_error(status: &'static str, message: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: format!("{{\"error\": \"{message}\"}}").into_bytes(),
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let response = {
        let mut st = state.lock().unwrap();
        st.requests.push(target.clone());
        let stalled = st.stalled.contains("*")
            || st
                .stalled
                .iter()
                .any(|p| target.contains("/resolve/") && target.ends_with(&format!("/{p}")));
        if stalled {
            drop(st);
            std::thread::sleep(std::time::Duration::from_secs(60));
            return Ok(());
        }
        if st.down {
            json_error("503 Service Unavailable", "down")
        } else {
            let mut response = route(&st, &target, headers.get("range").map(String::as_str));
            if let Some(f) = st.rewrite.as_ref().filter(|_| target.starts_with("/api/")) {
                response.body = f(&String::from_utf8_lossy(&response.body)).into_bytes();
            }
            response
        }
    };
    write!(stream, "HTTP/1.1 {}\r\n", response.status)?;
    for (k, v) in &response.headers {
        write!(stream, "{k}: {v}\r\n")?;
    }
    write!(
        stream,
        "content-length: {}\r\nconnection: close\r\n\r\n",
        response.body.len()
    )?;
    stream.write_all(&response.body)?;
    stream.flush()
}

fn route(st: &State, target: &str, range: Option<&str>) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.trim_start_matches('/');
    if let Some(rest) = path.strip_prefix("api/") {
        let (kind, rest) = match rest.split_once('/') {
            Some(("models", r)) => (Kind::Model, r),
            Some(("datasets", r)) => (Kind::Dataset, r),
            _ => return json_error("404 Not Found", "no such API"),
        };
        let Some((id, rev)) = rest.split_once("/revision/") else {
            return json_error("404 Not Found", "no such API");
        };
        return listing(st, kind, id, &unescape(rev), query.contains("blobs=true"));
    }
    let (kind, rest) = match path.strip_prefix("datasets/") {
        Some(r) => (Kind::Dataset, r),
        None => (Kind::Model, path),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let id = format!("{}/{}", parts[0], parts[1]);
        return file(
            st,
            kind,
            &id,
            &unescape(parts[3]),
            &unescape(parts[4]),
            range,
        );
    }
    json_error("404 Not Found", "not found")
}

fn resolve<'a>(st: &'a State, kind: Kind, id: &str, rev: &str) -> Option<(String, &'a [HubFile])> {
    let repo = st.repos.get(&(kind, id.to_string()))?;
    let commit = repo
        .refs
        .get(rev)
        .cloned()
        .unwrap_or_else(|| rev.to_string());
    let files = repo.commits.get(&commit)?;
    Some((commit, files))
}

fn listing(st: &State, kind: Kind, id: &str, rev: &str, blobs: bool) -> Response {
    let Some((commit, files)) = resolve(st, kind, id, rev) else {
        return json_error("404 Not Found", "Repository or revision not found");
    };
    let siblings: Vec<String> = files
        .iter()
        .map(|f| {
            if !blobs {
                return format!("{{\"rfilename\": \"{}\"}}", f.path);
            }
            // An LFS file's `blobId` is that of its pointer in Git.
            let (blob, lfs) = if f.lfs {
                let pointer = lfs_pointer(&f.bytes);
                let lfs = format!(
                    ", \"lfs\": {{\"sha256\": \"{}\", \"size\": {}, \"pointerSize\": {}}}",
                    sha256(&f.bytes),
                    f.bytes.len(),
                    pointer.len()
                );
                (git_sha1(pointer.as_bytes()), lfs)
            } else {
                (git_sha1(&f.bytes), String::new())
            };
            format!(
                "{{\"rfilename\": \"{}\", \"blobId\": \"{blob}\", \"size\": {}{lfs}}}",
                f.path,
                f.bytes.len()
            )
        })
        .collect();
    let body = format!(
        "{{\"_id\": \"x\", \"id\": \"{id}\", \"sha\": \"{commit}\", \"private\": false, \"siblings\": [{}]}}",
        siblings.join(", ")
    );
    Response {
        status: "200 OK",
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into_bytes(),
    }
}

fn file(st: &State, kind: Kind, id: &str, rev: &str, path: &str, range: Option<&str>) -> Response {
    let Some((commit, files)) = resolve(st, kind, id, rev) else {
        return json_error("404 Not Found", "Repository or revision not found");
    };
    let Some(f) = files.iter().find(|f| f.path == path) else {
        return json_error("404 Not Found", "Entry not found");
    };
    let mut headers = vec![
        ("x-repo-commit".to_string(), commit),
        ("etag".to_string(), format!("\"{}\"", git_sha1(&f.bytes))),
        ("accept-ranges".to_string(), "bytes".to_string()),
    ];
    if f.lfs {
        headers.push(("x-linked-etag".into(), format!("\"{}\"", sha256(&f.bytes))));
        headers.push(("x-linked-size".into(), f.bytes.len().to_string()));
    }
    let mut bytes = f.bytes.clone();
    if st.corrupt.contains(path) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
    }
    if let Some(&delta) = st.resized.get(path) {
        let len = (bytes.len() as i64 + delta).max(0) as usize;
        bytes.resize(len, 0);
    }
    let total = bytes.len();
    let Some(range) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Response {
            status: "200 OK",
            headers,
            body: bytes,
        };
    };
    let (a, b) = range.split_once('-').unwrap_or((range, ""));
    let start: usize = a.parse().unwrap_or(0);
    let end: usize = b
        .parse()
        .unwrap_or(total.saturating_sub(1))
        .min(total.saturating_sub(1));
    if total == 0 || start > end {
        headers.push(("content-range".into(), format!("bytes */{total}")));
        return Response {
            status: "416 Range Not Satisfiable",
            headers,
            body: Vec::new(),
        };
    }
    headers.push((
        "content-range".into(),
        format!("bytes {start}-{end}/{total}"),
    ));
    Response {
        status: "206 Partial Content",
        headers,
        body: bytes[start..=end].to_vec(),
    }
}

/// The Git LFS pointer file of `bytes` (what Git holds in its place).
pub fn lfs_pointer(bytes: &[u8]) -> String {
    format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        sha256(bytes),
        bytes.len()
    )
}

/// The Git blob SHA-1 of `bytes` (hex).
pub fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

/// The SHA-256 of `bytes` (hex).
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}
