//! Which certificate authorities an HTTPS server's certificate is checked against: the Mozilla
//! roots compiled in, or the certificates of a PEM bundle the user names (a company's proxy that
//! inspects TLS re-signs every site with its own CA; a private mirror or Hub may have one).
//!
//! The binary passes the bundle in as a value (`ddpm` takes it from the variables `requests`,
//! curl and OpenSSL read); this crate reads no environment. As with those tools, a bundle
//! *replaces* the compiled-in roots. It is read when the first HTTP client is made, not before, so a bad one
//! does not stop work that needs no network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ureq::tls::{Certificate, PemItem, RootCerts};

use crate::error::{DataError, Result};

/// Files of a bundle directory read at most (a certificate store holds a few hundred).
const MAX_DIR_FILES: usize = 10_000;
/// Bytes of one bundle file read at most (the system bundle is about 200 KB).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The certificate authorities HTTPS servers are checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TrustedRoots {
    /// The Mozilla roots compiled in (`webpki-roots`).
    #[default]
    Bundled,
    /// Only the certificates in a PEM file, or in the PEM files of a directory.
    Bundle {
        /// The file or directory.
        path: PathBuf,
        /// Where the user named it (a variable such as `SSL_CERT_FILE`, or an option), for
        /// messages.
        named_by: String,
    },
}

impl TrustedRoots {
    /// What is trusted, in words: "the built-in Mozilla roots" or "the CA certificates of
    /// PATH (VAR)".
    pub fn describe(&self) -> String {
        match self {
            TrustedRoots::Bundled => "the built-in Mozilla roots".to_string(),
            TrustedRoots::Bundle { path, named_by } => {
                format!("the CA certificates of {} ({named_by})", path.display())
            }
        }
    }

    /// What to do about a refused server certificate, from the TLS library's `detail`: a
    /// certificate of an authority that is not trusted needs its CA named (in the variable in
    /// force, when one is), any other refusal (expired, another host's) is the server's.
    pub fn advice(&self, detail: &str) -> String {
        let unknown_issuer = detail.contains("UnknownIssuer") || detail.contains("unknown issuer");
        match self {
            _ if !unknown_issuer => "the certificate itself is refused, whoever signed it: check \
                                     the address (HF_ENDPOINT, the mirror's URL) and the server's \
                                     certificate (its dates and host names)"
                .to_string(),
            TrustedRoots::Bundled => "behind a proxy that inspects TLS, or for a server with a \
                                      private CA, name a PEM file of its CA certificates in \
                                      SSL_CERT_FILE (or REQUESTS_CA_BUNDLE)"
                .to_string(),
            TrustedRoots::Bundle { named_by, .. } => format!(
                "add the server's CA certificate to that bundle, or point {named_by} (the \
                 variable in force) at one that holds it"
            ),
        }
    }

    /// The root certificates of an HTTP client: the bundle's certificates read now, or the
    /// compiled-in roots.
    pub(crate) fn root_certs(&self) -> Result<RootCerts> {
        match self {
            TrustedRoots::Bundled => Ok(RootCerts::WebPki),
            TrustedRoots::Bundle { path, named_by } => {
                let bad = |reason: String| DataError::HttpSetting {
                    setting: named_by.clone(),
                    value: path.display().to_string(),
                    reason,
                    advice: "name a PEM file (or folder of them) of CA certificates, or unset it \
                             to trust the built-in roots"
                        .to_string(),
                };
                let certs = read_bundle(path).map_err(bad)?;
                if certs.is_empty() {
                    return Err(bad(
                        "it holds no certificate (no -----BEGIN CERTIFICATE----- block)".into(),
                    ));
                }
                Ok(RootCerts::Specific(Arc::new(certs)))
            }
        }
    }
}

/// The certificates of the PEM file at `path`, or of every PEM file in the directory at `path`
/// (files without certificates are passed over, as OpenSSL does in `SSL_CERT_DIR`).
fn read_bundle(path: &Path) -> std::result::Result<Vec<Certificate<'static>>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it ({e})"))?;
    if !meta.is_dir() {
        return read_pem(path);
    }
    let entries = std::fs::read_dir(path).map_err(|e| format!("cannot list it ({e})"))?;
    let mut certs = Vec::new();
    let mut passed_over = Vec::new();
    for entry in entries.take(MAX_DIR_FILES) {
        let entry = entry.map_err(|e| format!("cannot list it ({e})"))?;
        // Links (the hashed names of a certificate store) are followed; folders are not.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            match read_pem(&entry.path()) {
                Ok(found) => certs.extend(found),
                Err(why) => passed_over.push(why),
            }
        }
    }
    if certs.is_empty() && !passed_over.is_empty() {
        return Err(format!(
            "none of its files holds a certificate that can be read ({} passed over; the first: \
             {})",
            passed_over.len(),
            passed_over[0]
        ));
    }
    Ok(certs)
}

/// The certificates of one PEM file (keys and other blocks beside them are passed over).
fn read_pem(path: &Path) -> std::result::Result<Vec<Certificate<'static>>, String> {
    use std::io::Read;
    // A FIFO would block the open, a device never end: only regular files are read.
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {} ({e})", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {} bytes, more than the {} MB a bundle may have",
            path.display(),
            meta.len(),
            MAX_FILE_BYTES >> 20
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {} ({e})", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "{} is not valid PEM (a block is broken or not closed by its -----END \
                     line)",
                    path.display()
                ))
            }
        }
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    #[test]
    fn the_advice_names_the_variable_in_force_and_tells_a_bad_certificate_apart() {
        let unknown = "invalid peer certificate: UnknownIssuer";
        assert!(TrustedRoots::Bundled
            .advice(unknown)
            .contains("SSL_CERT_FILE"));
        let bundle = TrustedRoots::Bundle {
            path: "/etc/ssl/certs/ca-certificates.crt".into(),
            named_by: "REQUESTS_CA_BUNDLE".into(),
        };
        let a = bundle.advice(unknown);
        assert!(
            a.contains("point REQUESTS_CA_BUNDLE") && !a.contains("SSL_CERT_FILE"),
            "{a}"
        );
        for other in ["invalid peer certificate: Expired", "NotValidForName"] {
            let a = bundle.advice(other);
            assert!(a.contains("the certificate itself is refused"), "{a}");
        }
    }

    #[test]
    fn a_bundle_is_read_from_a_file_or_a_directory() {
        let file = TrustedRoots::Bundle {
            path: fixture("ca.pem"),
            named_by: "SSL_CERT_FILE".into(),
        };
        assert!(matches!(file.root_certs(), Ok(RootCerts::Specific(c)) if c.len() == 1));
        // The directory holds the CA, the server's certificate and its key (passed over).
        let dir = TrustedRoots::Bundle {
            path: fixture(""),
            named_by: "SSL_CERT_DIR".into(),
        };
        assert!(matches!(dir.root_certs(), Ok(RootCerts::Specific(c)) if c.len() == 2));
    }

    #[test]
    fn a_bad_bundle_is_an_error_naming_it_and_its_variable() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let broken = tmp.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let fifo = tmp.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let broken_dir = tmp.path().join("certs");
        std::fs::create_dir(&broken_dir).unwrap();
        std::fs::copy(&broken, broken_dir.join("a.pem")).unwrap();
        for (path, says) in [
            (tmp.path().join("missing.pem"), "cannot read it"),
            (empty, "holds no certificate"),
            (broken, "not valid PEM (a block is broken"),
            (fifo, "not a regular file"),
            (
                broken_dir,
                "none of its files holds a certificate that can be read",
            ),
        ] {
            let roots = TrustedRoots::Bundle {
                path: path.clone(),
                named_by: "SSL_CERT_FILE".into(),
            };
            let e = roots.root_certs().expect_err("an error").to_string();
            assert!(
                e.contains(&format!("SSL_CERT_FILE={}", path.display())),
                "{e}"
            );
            assert!(e.contains(says), "{e}");
        }
    }
}
