//! An HTTPS front for the plain-HTTP test servers: it accepts TLS on 127.0.0.1 with the
//! certificate in `tests/fixtures/tls/` (for `localhost` and `127.0.0.1`, signed by the test CA
//! `ca.pem`), reads one request, passes it to the server behind it, and sends back everything
//! that server answers until it closes the connection (the test servers answer one request per
//! connection). Include it with `#[path = ".../ddpm-data/tests/support/tls_front.rs"] mod
//! tls_front;` (it needs `rustls` with its `ring` provider among the test's dependencies).

#![allow(dead_code)] // each test binary uses a part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;

/// The folder of the test CA, the server's certificate and its key.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ddpm-data/tests/fixtures/tls")
}

/// A running front (its thread lives as long as the test process).
pub struct TlsFront {
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    connections: Arc<AtomicUsize>,
}

impl TlsFront {
    /// Starts a front for the plain-HTTP server at `backend` (`http://HOST:PORT`).
    pub fn start(backend: &str) -> TlsFront {
        let backend = backend
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let config = Arc::new(server_config());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let (config, backend) = (Arc::clone(&config), backend.clone());
                std::thread::spawn(move || {
                    let _ = relay(stream, config, &backend);
                });
            }
        });
        TlsFront { base, connections }
    }

    /// The connections accepted so far (a refused handshake counts too).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn server_config() -> rustls::ServerConfig {
    let dir = fixtures();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

/// One connection: the request's head from the client to the backend, then the backend's whole
/// answer back.
fn relay(
    client: TcpStream,
    config: Arc<rustls::ServerConfig>,
    backend: &str,
) -> std::io::Result<()> {
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, client);
    let mut head = Vec::new();
    {
        let mut reader = BufReader::new(&mut tls);
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
    }
    let mut upstream = TcpStream::connect(backend)?;
    upstream.write_all(&head)?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    tls.write_all(&answer)?;
    tls.conn.send_close_notify();
    tls.flush()
}
