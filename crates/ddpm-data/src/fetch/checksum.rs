//! Pinned checksums, `SHA256SUMS` lists and file hashing.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path};

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// A checksum a file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// An MD5 digest, lowercase hex (the checksums torchvision pins for MNIST and CIFAR-10).
    Md5(String),
    /// A SHA-256 digest, lowercase hex.
    Sha256(String),
}

impl Checksum {
    /// `md5` or `sha256`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) => "sha256",
        }
    }

    /// The expected digest in hex.
    pub fn hex(&self) -> &str {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) => h,
        }
    }
}

/// The digests of a file, computed in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Digests {
    pub size: u64,
    pub md5: Option<String>,
    pub sha256: Option<String>,
}

/// Hashes a file with the algorithms asked for, in one read.
pub(crate) fn digest_file(path: &Path, md5: bool, sha256: bool) -> Result<Digests> {
    let mut file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut m = md5.then(Md5::new);
    let mut s = sha256.then(Sha256::new);
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(DataError::io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if let Some(m) = m.as_mut() {
            m.update(&buf[..n]);
        }
        if let Some(s) = s.as_mut() {
            s.update(&buf[..n]);
        }
    }
    Ok(Digests {
        size,
        md5: m.map(|m| hex::encode(m.finalize())),
        sha256: s.map(|s| hex::encode(s.finalize())),
    })
}

/// Checks a file against every expected checksum; on a mismatch the file is deleted and the error
/// names it (`label`) and carries `hint`.
pub(crate) fn verify_file(
    path: &Path,
    label: &str,
    expected: &[Checksum],
    hint: &str,
) -> Result<Digests> {
    let wants = |algo| expected.iter().any(|c| c.algorithm() == algo);
    let digests = digest_file(path, wants("md5"), wants("sha256"))?;
    for checksum in expected {
        let actual = match checksum {
            Checksum::Md5(_) => digests.md5.as_deref(),
            Checksum::Sha256(_) => digests.sha256.as_deref(),
        }
        .unwrap_or_default();
        if !actual.eq_ignore_ascii_case(checksum.hex()) {
            let _ = std::fs::remove_file(path);
            return Err(DataError::ChecksumMismatch {
                file: label.to_string(),
                algorithm: checksum.algorithm(),
                expected: checksum.hex().to_string(),
                actual: actual.to_string(),
                hint: hint.to_string(),
            });
        }
    }
    Ok(digests)
}

/// Whether `s` is `len` hex digits.
pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A parsed `SHA256SUMS` list: relative path to digest, in the list's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChecksumList {
    pub entries: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl ChecksumList {
    /// Parses `sha256sum` output (`HEX  PATH` or `HEX *PATH`), making paths relative to the data
    /// set's directory: a leading `./` and a leading `<dataset>/` are removed. Paths must stay
    /// inside the directory.
    pub fn parse(text: &str, dataset: &str, list: &str) -> Result<Self> {
        let mut out = ChecksumList::default();
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: &str| DataError::BadChecksumList {
                list: list.to_string(),
                line: i + 1,
                reason: reason.to_string(),
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let (hash, rest) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected `SHA256  PATH`"))?;
            if !is_hex(hash, 64) {
                return Err(bad("the checksum is not 64 hex digits"));
            }
            let path = rest.trim_start_matches([' ', '\t']);
            let path = path.strip_prefix('*').unwrap_or(path);
            let mut path = path.strip_prefix("./").unwrap_or(path);
            if let Some(p) = path.strip_prefix(dataset).and_then(|p| p.strip_prefix('/')) {
                path = p;
            }
            let safe = !path.is_empty()
                && Path::new(path)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !safe {
                return Err(bad(&format!("unsafe or empty path {path:?}")));
            }
            if out
                .index
                .insert(path.to_string(), out.entries.len())
                .is_some()
            {
                return Err(bad(&format!("{path} is listed twice")));
            }
            out.entries
                .push((path.to_string(), hash.to_ascii_lowercase()));
        }
        Ok(out)
    }

    /// The digest listed for a path.
    pub fn get(&self, path: &str) -> Option<&str> {
        self.index.get(path).map(|&i| self.entries[i].1.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6";

    #[test]
    fn lists_parse_with_either_prefix_style() {
        let text = format!("{H}  mnist/t10k-images-idx3-ubyte.gz\n\n{H} *./daisy/a b.jpg\r\n");
        let list = ChecksumList::parse(&text, "mnist", "SUMS").unwrap();
        assert_eq!(list.get("t10k-images-idx3-ubyte.gz"), Some(H));
        assert_eq!(list.get("daisy/a b.jpg"), Some(H));
        assert_eq!(list.entries.len(), 2);
    }

    #[test]
    fn bad_lists_name_the_line() {
        for (text, line) in [
            (format!("{H}  ok.gz\nxyz  b.gz"), 2),
            (format!("{H}  ../escape"), 1),
            (format!("{H}  /etc/passwd"), 1),
            (format!("{H}  a\n{H}  a"), 2),
            ("no-space".to_string(), 1),
        ] {
            match ChecksumList::parse(&text, "flowers", "SUMS") {
                Err(DataError::BadChecksumList { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn files_verify_against_known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        // The standard test vectors for "abc".
        let md5 = Checksum::Md5("900150983cd24fb0d6963f7d28e17f72".into());
        let sha = Checksum::Sha256(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        );
        let d = verify_file(&path, "abc", &[md5.clone(), sha], "").unwrap();
        assert_eq!(d.size, 3);
        let wrong = Checksum::Sha256("00".repeat(32));
        match verify_file(&path, "abc", &[md5, wrong], "do this") {
            Err(DataError::ChecksumMismatch {
                file, algorithm, ..
            }) => {
                assert_eq!((file.as_str(), algorithm), ("abc", "sha256"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists(), "a file that fails verification is deleted");
    }
}
