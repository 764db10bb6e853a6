//! The network settings of the environment, as curl, `requests` and OpenSSL read them: the
//! proxy and the CA bundle of every download. The `ddpm` binary and xtask (which includes this
//! file) read them here and pass them to ddpm-data as values.

/// The variables that name the proxy, in the order they are looked at: the https proxy first
/// (most downloads are https), then the one for every scheme, then the http proxy.
pub const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
];

/// The variables that list the hosts reached without the proxy, the first set.
pub const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// The variables that name a CA bundle, in the order they are looked at: `requests`' own two,
/// then OpenSSL's file and directory.
pub const CA_BUNDLE_VARS: [&str; 4] = [
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The HTTP proxy of every download: the first of [`PROXY_VARS`] that is set, with the hosts of
/// the first of [`NO_PROXY_VARS`] reached directly. A bad address is an error when a download
/// starts.
pub fn proxy() -> Option<ddpm_data::fetch::ProxyConfig> {
    let (named_by, url) = PROXY_VARS.iter().find_map(|v| {
        let url = std::env::var(v).ok().filter(|u| !u.trim().is_empty())?;
        Some((*v, url))
    })?;
    let no_proxy = NO_PROXY_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_default();
    Some(ddpm_data::fetch::ProxyConfig::new(
        &url, named_by, &no_proxy,
    ))
}

/// The certificate authorities HTTPS downloads trust: the PEM bundle named by the first of
/// [`CA_BUNDLE_VARS`] that is set (as `requests` and OpenSSL read them; it replaces the built-in
/// roots), else the built-in Mozilla roots. The bundle is read when a download starts, so a bad
/// one stops only downloads.
pub fn trusted_roots() -> ddpm_data::fetch::TrustedRoots {
    CA_BUNDLE_VARS
        .iter()
        .find_map(|v| {
            let path = std::env::var_os(v).filter(|p| !p.is_empty())?;
            Some(ddpm_data::fetch::TrustedRoots::Bundle {
                path: path.into(),
                named_by: (*v).to_string(),
            })
        })
        .unwrap_or_default()
}
