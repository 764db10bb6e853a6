//! The HTTP proxy downloads go through, and the hosts they reach directly.
//!
//! The binary passes it in as a value ([`ProxyConfig::new`]; `ddpm` takes it from the variables
//! curl and `requests` read); this crate reads no environment, and the HTTP client's own
//! reading of it is turned off. One proxy serves every
//! download, http:// and https:// alike, through HTTP `CONNECT`; the loopback addresses are
//! always reached directly, as a proxy cannot reach them. A proxy address that cannot be used is
//! an error when the first download starts, never silently a direct connection.

use std::fmt;

use crate::error::{DataError, Result};

/// Hosts never sent through a proxy.
const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// An HTTP proxy for downloads.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Its address, `http://[USER:PASSWORD@]HOST[:PORT]` (or `https://`; `HOST:PORT` alone means
    /// `http://`).
    pub url: String,
    /// Where the user named it (a variable such as `HTTPS_PROXY`, or an option), for messages.
    pub named_by: String,
    /// Hosts reached directly (the entries of `NO_PROXY`).
    pub no_proxy: Vec<String>,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A password in the address stays out of logs.
        f.debug_struct("ProxyConfig")
            .field("url", &redacted(&self.url))
            .field("named_by", &self.named_by)
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxyConfig {
    /// The proxy at `url` (trimmed), named by `named_by` in messages, with `no_proxy` a
    /// comma-separated list of hosts reached directly (`host`, `host:port` taken as `host`,
    /// `.domain` or `*.domain` for its sub-domains, `*` for all).
    pub fn new(url: &str, named_by: &str, no_proxy: &str) -> Self {
        ProxyConfig {
            url: url.trim().to_string(),
            named_by: named_by.to_string(),
            no_proxy: no_proxy
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    /// Its address as messages show it, without the password.
    pub(crate) fn shown(&self) -> String {
        redacted(&self.url)
    }

    /// Whether a request of `url` goes through this proxy (its host is not in `NO_PROXY` nor
    /// the loopback).
    pub(crate) fn applies_to(&self, url: &str) -> bool {
        match (self.build(), url.parse::<ureq::http::Uri>()) {
            (Ok(proxy), Ok(uri)) => !proxy.is_no_proxy(&uri),
            _ => false,
        }
    }

    /// The HTTP client's proxy, or an error that names the setting and says what is wrong.
    pub(crate) fn build(&self) -> Result<ureq::Proxy> {
        let bad = |reason: String| DataError::HttpSetting {
            setting: self.named_by.clone(),
            value: self.shown(),
            reason,
            advice: "give the proxy as http://HOST:PORT (or http://USER:PASSWORD@HOST:PORT), or \
                     unset it to connect directly"
                .to_string(),
        };
        let after_scheme = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        // An unencoded `/`, `?` or `#` in the user part ends the address there: the rest would
        // be read as a path, and the user name as the host.
        if let Some(cut) = after_scheme.find(['/', '?', '#']) {
            if after_scheme[cut..].contains('@') {
                return Err(bad(
                    "its user name or password holds `/`, `?` or `#`, which must be \
                     percent-encoded (%2F, %3F, %23)"
                        .to_string(),
                ));
            }
        }
        let authority = after_scheme
            .rsplit_once('@')
            .map_or(after_scheme, |(_, h)| h);
        let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
        if let Some((_, port)) = authority.rsplit_once(':') {
            let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            if digits && !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Err(bad(format!("port {port} is not a port (1 to 65535)")));
            }
        }
        let scheme = self
            .url
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        if scheme
            .as_deref()
            .is_some_and(|s| s != "http" && s != "https")
        {
            return Err(bad(format!(
                "{}:// proxies are not supported, only http:// and https://",
                scheme.unwrap_or_default()
            )));
        }
        let parsed =
            ureq::Proxy::new(&self.url).map_err(|e| bad(format!("not a proxy address ({e})")))?;
        let host = parsed.host();
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad("it names no host".to_string()));
        }
        let mut builder = ureq::Proxy::builder(parsed.protocol())
            .host(host)
            .port(parsed.port());
        if let Some(user) = parsed.username() {
            builder = builder.username(user);
        }
        if let Some(password) = parsed.password() {
            builder = builder.password(password);
        }
        for entry in self.no_proxy.iter().map(String::as_str).chain(LOOPBACK) {
            builder = builder.no_proxy(&bracketed(without_port(entry)));
        }
        builder
            .build()
            .map_err(|e| bad(format!("not a proxy address ({e})")))
    }
}

/// The host part of a `NO_PROXY` entry: `host:port` and `[v6]:port` lose the port (the host is
/// then reached directly on every port), as the HTTP client matches host names only.
fn without_port(entry: &str) -> &str {
    let cut = match entry.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            // A bare IPv6 address (`::1`, `fe80::1`) has colons of its own and no port.
            if host.starts_with('[') && host.ends_with(']') || !host.contains(':') {
                Some(host)
            } else {
                None
            }
        }
        _ => None,
    };
    cut.unwrap_or(entry)
}

/// A bare IPv6 address (`fe80::1`, as curl takes it in `NO_PROXY`) in brackets, the form the
/// HTTP client matches against a URL's host (`https://[fe80::1]/`); any other entry as it is.
fn bracketed(host: &str) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `url` with the password of its user part replaced by `***` (the user part ends at the last
/// `@`, so a password holding `/` or `@` is hidden whole).
fn redacted(url: &str) -> String {
    let (prefix, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    let user = match userinfo.split_once(':') {
        Some((name, _)) => format!("{name}:***"),
        None => userinfo.to_string(),
    };
    format!("{prefix}{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_proxy_list_is_split_and_trimmed() {
        let p = ProxyConfig::new(" http://s:2 ", "HTTPS_PROXY", "a.example, .b.example,,");
        assert_eq!(p.url, "http://s:2");
        assert_eq!(p.named_by, "HTTPS_PROXY");
        assert_eq!(p.no_proxy, ["a.example", ".b.example"]);
    }

    #[test]
    fn no_proxy_entries_with_a_port_match_their_host() {
        assert_eq!(without_port("hub.example:8443"), "hub.example");
        assert_eq!(without_port("10.0.0.7:80"), "10.0.0.7");
        assert_eq!(without_port("[::1]:8080"), "[::1]");
        assert_eq!(without_port("fe80::1"), "fe80::1");
        assert_eq!(without_port(".example.com"), ".example.com");
        assert_eq!(without_port("host:"), "host:");
        let p = ProxyConfig::new("http://p.example:3128", "HTTPS_PROXY", "hub.example:8443");
        assert!(!p.applies_to("https://hub.example:8443/x"));
        assert!(!p.applies_to("https://hub.example/x"));
        assert!(p.applies_to("https://other.example/x"));
        // A bare IPv6 address (curl's form) bypasses the proxy as its bracketed form does.
        for entry in ["fe80::1", "[fe80::1]", "[fe80::1]:8443"] {
            let p = ProxyConfig::new("http://p.example:3128", "HTTPS_PROXY", entry);
            assert!(!p.applies_to("https://[fe80::1]/x"), "{entry}");
            assert!(!p.applies_to("https://[fe80::1]:8443/x"), "{entry}");
            assert!(p.applies_to("https://[fe80::2]/x"), "{entry}");
        }
    }

    #[test]
    fn proxies_are_checked_and_passwords_kept_out_of_messages() {
        let proxy = |url: &str| ProxyConfig {
            url: url.to_string(),
            named_by: "HTTPS_PROXY".into(),
            no_proxy: vec![],
        };
        for good in [
            "http://p.example:3128",
            "p.example:3128",
            "https://u:pw@p.example",
            "http://[::1]:8080",
            "http://u:p%2Fw@p.example:3128",
        ] {
            assert!(proxy(good).build().is_ok(), "{good}");
        }
        for (bad, says) in [
            ("socks5://p.example:1080", "not supported"),
            ("ftp://p.example", "not supported"),
            ("http://", "HTTPS_PROXY=http://"),
            ("http://user:secret@", "user:***@"),
            ("http://alice:pa/secret@127.0.0.1:3128", "percent-encoded"),
            (
                "http://alice:secret@127.0.0.1:99999",
                "port 99999 is not a port",
            ),
            ("http://127.0.0.1:0", "port 0"),
        ] {
            let e = proxy(bad).build().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        assert_eq!(redacted("http://u:pw@h:1/x"), "http://u:***@h:1/x");
        assert_eq!(redacted("http://u:p/w@h:1"), "http://u:***@h:1");
        assert_eq!(redacted("http://u@h:1"), "http://u@h:1");
        assert_eq!(redacted("h:1"), "h:1");
        assert!(!format!("{:?}", proxy("http://u:pw@h:1")).contains("pw"));
    }
}
