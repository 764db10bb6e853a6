//! An HTTP proxy on 127.0.0.1 for tests: it answers `CONNECT HOST:PORT` by connecting there and
//! relaying bytes both ways until either side closes, checks `Proxy-Authorization` when made
//! with credentials, and records every target asked for. Host names under `.test` (`hub.test`,
//! `files.test`) lead to 127.0.0.1: only through the proxy do they exist. Include it with
//! `#[path = ".../ddpm-data/tests/support/connect_proxy.rs"] mod connect_proxy;`.

#![allow(dead_code)] // each test binary uses a part

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A running proxy (its thread lives as long as the test process).
pub struct ConnectProxy {
    /// `HOST:PORT` of the proxy.
    pub addr: String,
    targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    /// A proxy that asks for no credentials, or for the `Basic` ones in `auth` (`USER:PASSWORD`).
    pub fn start(auth: Option<&str>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&targets);
        let expected = auth.map(|a| format!("Basic {}", base64(a.as_bytes())));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (log, expected) = (Arc::clone(&log), expected.clone());
                std::thread::spawn(move || {
                    let _ = tunnel(stream, &log, expected.as_deref());
                });
            }
        });
        ConnectProxy { addr, targets }
    }

    /// The `CONNECT` targets asked for so far, in order (refused ones too).
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

fn tunnel(
    mut client: TcpStream,
    log: &Mutex<Vec<String>>,
    expected: Option<&str>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("proxy-authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    log.lock().unwrap().push(target.to_string());
    if method != "CONNECT" {
        client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    }
    if expected.is_some() && authorization.as_deref() != expected {
        client.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
        )?;
        return Ok(());
    }
    let upstream = match target.rsplit_once(':') {
        Some((host, port)) if host.ends_with(".test") => {
            TcpStream::connect(format!("127.0.0.1:{port}"))?
        }
        _ => TcpStream::connect(target)?,
    };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let (mut up_read, mut up_write) = (upstream.try_clone()?, upstream);
    let mut client_write = client.try_clone()?;
    let to_upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut up_write);
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Both);
    let _ = to_upstream.join();
    Ok(())
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
