//! The HTTP client's settings. HTTPS: data-set files and the Hub through a TLS front
//! (`support/tls_front.rs`) whose certificate is signed by a private test CA, trusted when the
//! CA bundle is named ([`TrustedRoots::Bundle`]), refused at once with the built-in roots, with
//! a message that says how to trust it; a bad bundle is an error that names it, and only for
//! HTTP. Proxies (`support/connect_proxy.rs`): downloads go through the one named, with its
//! credentials, except to the hosts of `NO_PROXY` and the loopback; a bad one is named, and so
//! is one that breaks the connection.

#[path = "support/connect_proxy.rs"]
mod connect_proxy;
#[path = "support/file_server.rs"]
mod file_server;
#[path = "support/hub_options.rs"]
mod hub_options;
#[path = "support/hub_server.rs"]
mod hub_server;
#[path = "support/tls_front.rs"]
mod tls_front;

use std::collections::HashMap;

use connect_proxy::ConnectProxy;
use ddpm_data::fetch::{fetch_file, FetchOptions, ProxyConfig, TrustedRoots};
use ddpm_data::hub::{Hub, Repo};
use ddpm_data::DataError;
use file_server::Server;
use hub_server::{FakeHub, HubFile, Kind};
use tls_front::{fixtures, TlsFront};

fn bytes() -> Vec<u8> {
    (0..70_000u32).map(|i| (i * 13 % 253) as u8).collect()
}

fn test_ca() -> TrustedRoots {
    TrustedRoots::Bundle {
        path: fixtures().join("ca.pem"),
        named_by: "SSL_CERT_FILE".into(),
    }
}

fn quiet(roots: TrustedRoots) -> FetchOptions {
    FetchOptions {
        progress: false,
        retries: 3,
        backoff: std::time::Duration::from_millis(10),
        roots,
        ..FetchOptions::new("unused")
    }
}

#[test]
fn a_file_over_https_is_fetched_when_its_ca_is_trusted() {
    let server = Server::start(HashMap::from([("f.bin".to_string(), bytes())]));
    let front = TlsFront::start(&server.base);
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("f.part");
    let url = format!("{}/f.bin", front.base);
    fetch_file(&url, &part, "f.bin", &quiet(test_ca())).unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), bytes());
    // Also by host name, which the certificate names too.
    let by_name = url.replace("127.0.0.1", "localhost");
    std::fs::remove_file(&part).unwrap();
    fetch_file(&by_name, &part, "f.bin", &quiet(test_ca())).unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), bytes());
}

#[test]
fn an_untrusted_certificate_is_refused_at_once_saying_how_to_trust_it() {
    let server = Server::start(HashMap::from([("f.bin".to_string(), bytes())]));
    let front = TlsFront::start(&server.base);
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("f.part");
    let url = format!("{}/f.bin", front.base);
    let e = fetch_file(&url, &part, "f.bin", &quiet(TrustedRoots::Bundled)).unwrap_err();
    assert!(matches!(e, DataError::Tls { .. }), "{e:?}");
    let msg = e.to_string();
    for says in [
        url.as_str(),
        "secure connection failed",
        "built-in Mozilla roots",
        "SSL_CERT_FILE",
    ] {
        assert!(msg.contains(says), "`{says}` not in: {msg}");
    }
    // Not a failure that passes: tried once, not retried.
    assert_eq!(front.connections(), 1);
    assert!(server.requests().is_empty(), "no request got through");
    assert!(!part.exists() || std::fs::read(&part).unwrap().is_empty());
}

#[test]
fn a_bad_bundle_is_named_and_does_not_stop_copies_from_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TrustedRoots::Bundle {
        path: dir.path().join("no-such.pem"),
        named_by: "REQUESTS_CA_BUNDLE".into(),
    };
    let part = dir.path().join("f.part");
    let e = fetch_file(
        "https://127.0.0.1:9/f.bin",
        &part,
        "f",
        &quiet(missing.clone()),
    )
    .unwrap_err();
    assert!(matches!(e, DataError::HttpSetting { .. }), "{e:?}");
    assert!(e.to_string().contains("REQUESTS_CA_BUNDLE="), "{e}");
    // A local copy needs no HTTP client, so the bundle is not read.
    let src = dir.path().join("src.bin");
    std::fs::write(&src, bytes()).unwrap();
    fetch_file(src.to_str().unwrap(), &part, "f", &quiet(missing)).unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), bytes());
}

#[test]
fn the_hub_over_https_with_its_ca_trusted_and_refused_without() {
    let hub = FakeHub::start();
    hub.publish(
        Kind::Model,
        "o/n",
        "main",
        vec![
            HubFile::git("unet/config.json", b"{}\n".to_vec()),
            HubFile::lfs("unet/weights.bin", bytes()),
        ],
    );
    let front = TlsFront::start(&hub.endpoint);
    let cache = tempfile::tempdir().unwrap();
    let repo = Repo::model("o/n").unwrap();
    let mut opts = hub_options::options(&hub, cache.path());
    opts.endpoint = Some(front.base.clone());

    let refused = Hub::new(&opts)
        .unwrap()
        .snapshot(&repo, "main")
        .unwrap_err();
    let msg = refused.to_string();
    assert!(
        msg.contains("secure connection") && msg.contains("SSL_CERT_FILE"),
        "{msg}"
    );

    opts.roots = test_ca();
    let client = Hub::new(&opts).unwrap();
    let snap = client.snapshot(&repo, "main").unwrap();
    let file = client.get(&snap, "unet/weights.bin").unwrap();
    assert_eq!(std::fs::read(file).unwrap(), bytes());

    // A bundle that cannot be read is an error when the client is made online, not offline.
    opts.roots = TrustedRoots::Bundle {
        path: cache.path().join("none.pem"),
        named_by: "SSL_CERT_FILE".into(),
    };
    let Err(e) = Hub::new(&opts) else {
        panic!("an unreadable bundle is refused")
    };
    assert!(e.to_string().contains("SSL_CERT_FILE="), "{e}");
    opts.offline = true;
    let offline = Hub::new(&opts).unwrap();
    let snap = offline.snapshot(&repo, "main").unwrap();
    assert_eq!(
        std::fs::read(offline.get(&snap, "unet/weights.bin").unwrap()).unwrap(),
        bytes()
    );
}

fn through(proxy: &str, no_proxy: &[&str]) -> Option<ProxyConfig> {
    Some(ProxyConfig {
        url: proxy.to_string(),
        named_by: "HTTPS_PROXY".into(),
        no_proxy: no_proxy.iter().map(|h| h.to_string()).collect(),
    })
}

/// `http://files.test:PORT/f.bin` of `server`: a name only the test proxy resolves.
fn via_name(server: &Server) -> String {
    server.url("f.bin").replace("127.0.0.1", "files.test")
}

#[test]
fn downloads_go_through_the_proxy_but_not_to_no_proxy_hosts_or_the_loopback() {
    let server = Server::start(HashMap::from([("f.bin".to_string(), bytes())]));
    let proxy = ConnectProxy::start(None);
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("f.part");
    let opts = FetchOptions {
        proxy: through(&format!("http://{}", proxy.addr), &[]),
        ..quiet(TrustedRoots::Bundled)
    };
    fetch_file(&via_name(&server), &part, "f", &opts).unwrap();
    assert_eq!(std::fs::read(&part).unwrap(), bytes());
    let port = server.base.rsplit(':').next().unwrap().to_string();
    assert_eq!(proxy.targets(), [format!("files.test:{port}")]);

    // The loopback is reached directly.
    std::fs::remove_file(&part).unwrap();
    fetch_file(&server.url("f.bin"), &part, "f", &opts).unwrap();
    assert_eq!(proxy.targets().len(), 1);

    // So are the hosts of NO_PROXY: files.test, which only the proxy knows, is not found.
    let direct = FetchOptions {
        proxy: through(&format!("http://{}", proxy.addr), &["files.test"]),
        retries: 0,
        ..quiet(TrustedRoots::Bundled)
    };
    assert!(fetch_file(&via_name(&server), &part, "f", &direct).is_err());
    assert_eq!(proxy.targets().len(), 1);
}

#[test]
fn the_hub_over_https_through_a_proxy_that_asks_for_credentials() {
    let hub = FakeHub::start();
    hub.publish(
        Kind::Model,
        "o/n",
        "main",
        vec![HubFile::lfs("unet/weights.bin", bytes())],
    );
    let front = TlsFront::start(&hub.endpoint);
    let proxy = ConnectProxy::start(Some("me:s3cret"));
    let cache = tempfile::tempdir().unwrap();
    let repo = Repo::model("o/n").unwrap();
    let mut opts = hub_options::options(&hub, cache.path());
    opts.endpoint = Some(front.base.replace("127.0.0.1", "hub.test"));
    opts.roots = test_ca();
    opts.retries = Some(0);

    opts.proxy = through(&format!("http://me:wrong@{}", proxy.addr), &[]);
    let Err(refused) = Hub::new(&opts).unwrap().snapshot(&repo, "main") else {
        panic!("a proxy that refuses the credentials is an error")
    };
    let msg = refused.to_string();
    assert!(
        msg.contains("proxy") && msg.contains("HTTPS_PROXY"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "the password stays out: {msg}");

    opts.proxy = through(&format!("http://me:s3cret@{}", proxy.addr), &[]);
    let client = Hub::new(&opts).unwrap();
    let snap = client.snapshot(&repo, "main").unwrap();
    let file = client.get(&snap, "unet/weights.bin").unwrap();
    assert_eq!(std::fs::read(file).unwrap(), bytes());
    assert!(proxy.targets().iter().all(|t| t.starts_with("hub.test:")));
}

#[test]
fn a_proxy_that_does_not_answer_is_named_not_the_server() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        proxy: through(&format!("http://{addr}"), &[]),
        ..quiet(TrustedRoots::Bundled)
    };
    let e = fetch_file("http://files.test:1/f", &dir.path().join("p"), "f", &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("HTTPS_PROXY=http://{addr}")),
        "{msg}"
    );
    assert!(msg.contains("cannot reach the proxy"), "{msg}");
    // A proxy whose name does not resolve is named too, its password hidden.
    let opts = FetchOptions {
        proxy: through("http://bob:hunter2@proxy.invalid:3128", &[]),
        ..quiet(TrustedRoots::Bundled)
    };
    let e = fetch_file("http://files.test:1/f", &dir.path().join("p"), "f", &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("HTTPS_PROXY=http://bob:***@proxy.invalid:3128"),
        "{msg}"
    );
    assert!(
        msg.contains("cannot reach the proxy") && !msg.contains("hunter2"),
        "{msg}"
    );
}

#[test]
fn a_proxy_address_that_cannot_be_used_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FetchOptions {
        proxy: through("socks5://user:pw@p.example:1080", &[]),
        ..quiet(TrustedRoots::Bundled)
    };
    let e = fetch_file("http://files.test:1/f", &dir.path().join("p"), "f", &opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::HttpSetting { .. }), "{e:?}");
    assert!(
        msg.starts_with("HTTPS_PROXY=socks5://user:***@p.example:1080"),
        "{msg}"
    );
}

/// A proxy that breaks the way `how` says: `garbage` answers `CONNECT` with bytes that are not
/// HTTP, `close` hangs up without a word, `tunnel-close` says the tunnel is made and then
/// closes it. Returns its `HOST:PORT`.
fn broken_proxy(how: &'static str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = match how {
                "garbage" => stream.write_all(b"\x16\x03\x01 SSH-2.0-OpenSSH\r\n\r\n"),
                "tunnel-close" => stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n"),
                _ => Ok(()),
            };
        }
    });
    addr
}

#[test]
fn a_proxy_that_breaks_the_connection_is_named_with_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start();
    hub.publish(
        Kind::Model,
        "o/n",
        "main",
        vec![HubFile::lfs("w.bin", bytes())],
    );
    let cache = tempfile::tempdir().unwrap();
    for how in ["garbage", "close", "tunnel-close"] {
        let addr = broken_proxy(how);
        let shown = format!("HTTPS_PROXY=http://u:***@{addr}");
        let opts = FetchOptions {
            proxy: through(&format!("http://u:pw@{addr}"), &[]),
            retries: 1,
            ..quiet(TrustedRoots::Bundled)
        };
        let e = fetch_file("http://files.test:1/f", &dir.path().join("p"), "f", &opts).unwrap_err();
        let msg = e.chain();
        assert!(
            msg.contains(&shown) && !msg.contains(":pw@"),
            "{how}: {msg}"
        );
        // The Hub's client does not blame the Hub either.
        let mut opts = hub_options::options(&hub, cache.path());
        opts.endpoint = Some(hub.endpoint.replace("127.0.0.1", "hub.test"));
        opts.retries = Some(0);
        opts.proxy = through(&format!("http://u:pw@{addr}"), &[]);
        let e = Hub::new(&opts)
            .unwrap()
            .snapshot(&Repo::model("o/n").unwrap(), "main")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&shown), "{how}: {msg}");
        assert!(!msg.contains("is it a Hugging Face Hub"), "{how}: {msg}");
    }
}
