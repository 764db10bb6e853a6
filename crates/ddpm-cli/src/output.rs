//! What an output path already holds, read before any work starts: the commands replace only
//! their own earlier outputs, never a file of the user's.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

/// What is at an output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Nothing: the output is new.
    Absent,
    /// A regular file that the caller recognises as an earlier output of its own.
    Ours,
    /// A directory, device, pipe or socket: never read, never replaced.
    NotRegular,
    /// A regular file of something else.
    Foreign,
}

/// What is at `path`, reading at most its first `head` bytes for `ours` to recognise (so that a
/// large file costs no more than its start).
pub(crate) fn existing(path: &Path, head: u64, ours: impl Fn(&[u8]) -> bool) -> Result<Existing> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.is_file() {
        return Ok(Existing::NotRegular);
    }
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(head).read_to_end(&mut bytes));
    Ok(if read.is_ok() && ours(&bytes) {
        Existing::Ours
    } else {
        Existing::Foreign
    })
}

/// Whether `bytes` are a JSON object with `key` whose value `accept` takes.
pub(crate) fn json_has(
    bytes: &[u8],
    key: &str,
    accept: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get(key).map(&accept))
        .unwrap_or(false)
}
