//! `ddpm sample --pretrained OWNER/NAME [--revision REV]` against a fake Hub on 127.0.0.1
//! (crates/ddpm-data/tests/support/hub_server.rs, reached through `HF_ENDPOINT`) serving the tiny
//! diffusers pipeline of crates/ddpm-unet/tests/fixtures/diffusers-tiny: only the needed files are
//! downloaded, the commit is recorded beside the images, offline mode reads the filled cache, a
//! revision picks another commit (the flat `.bin` layout), and corrupt or resized downloads and
//! configs we cannot represent are refused in one line, as is a Hub that never answers (after
//! `HF_HUB_DOWNLOAD_TIMEOUT`); over HTTPS, a Hub whose CA is named in `SSL_CERT_FILE` is
//! trusted and one whose CA is not is refused in one line; `HTTPS_PROXY` is the way to a Hub
//! that only a proxy reaches. No network is used.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use common::{assert_ok, assert_one_clean_error, ddpm_bare, run};

#[path = "../../ddpm-unet/tests/support/diffusers_fixture.rs"]
mod diffusers_fixture;
use diffusers_fixture::fixture;

#[path = "../../ddpm-data/tests/support/hub_server.rs"]
mod hub_server;
use hub_server::{FakeHub, HubFile, Kind};

#[path = "../../ddpm-data/tests/support/tls_front.rs"]
mod tls_front;

#[path = "../../ddpm-data/tests/support/connect_proxy.rs"]
mod connect_proxy;
// The variables `ddpm` reads, from the binary's own list (as xtask includes it).
#[allow(dead_code)]
#[path = "../src/net_env.rs"]
mod net_env;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pipeline layout of the fixture, as a repository holds it, with a `.bin` beside the
/// safetensors and files a sampler does not need.
fn pipeline_files() -> Vec<HubFile> {
    vec![
        HubFile::git(".gitattributes", "*.safetensors filter=lfs\n"),
        HubFile::git("README.md", "# tiny\n"),
        HubFile::git(
            "model_index.json",
            read(&fixture("pipeline/model_index.json")),
        ),
        HubFile::git(
            "unet/config.json",
            read(&fixture("pipeline/unet/config.json")),
        ),
        HubFile::lfs(
            "unet/diffusion_pytorch_model.safetensors",
            read(&fixture(
                "pipeline/unet/diffusion_pytorch_model.safetensors",
            )),
        ),
        HubFile::lfs(
            "unet/diffusion_pytorch_model.bin",
            read(&fixture("flat-bin/diffusion_pytorch_model.bin")),
        ),
        HubFile::git(
            "scheduler/scheduler_config.json",
            read(&fixture("pipeline/scheduler/scheduler_config.json")),
        ),
        HubFile::lfs("images/samples.png", vec![7u8; 4096]),
    ]
}

/// The flat layout of the fixture, weights as a `.bin` only.
fn flat_files() -> Vec<HubFile> {
    let f = |name: &str| read(&fixture(&format!("flat-bin/{name}")));
    vec![
        HubFile::git("model_index.json", f("model_index.json")),
        HubFile::git("config.json", f("config.json")),
        HubFile::lfs(
            "diffusion_pytorch_model.bin",
            f("diffusion_pytorch_model.bin"),
        ),
        HubFile::git("scheduler_config.json", f("scheduler_config.json")),
    ]
}

/// `ddpm sample` of 2 images with 5 DDIM steps into `dir/out` (and `dir/out` with `.json`),
/// with the Hub variables set for `hub` and the cache in `dir/hf`, plus `args`.
fn sample(dir: &Path, hub: &FakeHub, offline: bool, out: &str, args: &[&str]) -> Output {
    let mut c = ddpm_bare(dir);
    c.env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .args(["sample", "--num", "2", "--steps", "5", "--seed", "4"])
        .args(["--quiet", "--out", out])
        .args(args);
    run(&mut c)
}

fn provenance(dir: &Path, out: &str) -> serde_json::Value {
    let path = dir.join(Path::new(out).with_extension("json"));
    serde_json::from_str(&String::from_utf8(read(&path)).expect("utf-8")).expect("json")
}

/// The files sampling needs from the pipeline layout, sorted as [`downloads`] gives them, with
/// `weights` the UNet's weights file.
fn pipeline_needs(weights: &str) -> Vec<String> {
    vec![
        "model_index.json".to_string(),
        "scheduler/scheduler_config.json".to_string(),
        "unet/config.json".to_string(),
        format!("unet/{weights}"),
    ]
}

/// The files downloaded (the `resolve` requests), without the revision part.
fn downloads(hub: &FakeHub) -> Vec<String> {
    let mut files: Vec<String> = hub
        .requests()
        .iter()
        .filter_map(|r| {
            let (_, rest) = r.split_once("/resolve/")?;
            let (_, file) = rest.split_once('/')?;
            Some(file.to_string())
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

#[test]
fn a_hub_pipeline_is_fetched_recorded_and_read_offline() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let hub = FakeHub::start();
    let commit = hub.publish(Kind::Model, "google/ddpm-tiny", "main", pipeline_files());

    let o = sample(
        p,
        &hub,
        false,
        "hub.png",
        &["--pretrained", "google/ddpm-tiny"],
    );
    assert_ok(&o);
    // Only what sampling needs; the safetensors preferred to the .bin.
    assert_eq!(
        downloads(&hub),
        pipeline_needs("diffusion_pytorch_model.safetensors")
    );
    let meta = provenance(p, "hub.png");
    assert_eq!(meta["pretrained"]["repo"], "google/ddpm-tiny");
    assert_eq!(meta["pretrained"]["revision"], "main");
    assert_eq!(meta["pretrained"]["commit"], commit.as_str());
    assert_eq!(meta["pretrained"]["endpoint"], hub.endpoint.as_str());
    assert_eq!(meta["seed"], 4);
    // The cache is the huggingface_hub layout under HF_HOME/hub.
    let snapshot = p
        .join("hf/hub/models--google--ddpm-tiny/snapshots")
        .join(&commit);
    assert!(snapshot.join("unet/config.json").is_file());
    assert_eq!(
        std::fs::read_to_string(p.join("hf/hub/models--google--ddpm-tiny/refs/main"))
            .expect("ref")
            .trim(),
        commit
    );

    // The same images as from the local directory.
    let local = fixture("pipeline");
    let o = sample(
        p,
        &hub,
        false,
        "local.png",
        &["--pretrained", local.to_str().expect("utf-8")],
    );
    assert_ok(&o);
    assert!(read(&p.join("hub.png")) == read(&p.join("local.png")));
    assert!(
        provenance(p, "local.png")["pretrained"]["commit"].is_null(),
        "a local directory has no commit"
    );

    // Offline, with the Hub down: from the cache, the same images, the same commit.
    hub.set_down(true);
    let before = hub.request_count();
    let o = sample(
        p,
        &hub,
        true,
        "offline.png",
        &["--pretrained", "google/ddpm-tiny"],
    );
    assert_ok(&o);
    assert_eq!(hub.request_count(), before, "offline asks nothing");
    assert!(read(&p.join("hub.png")) == read(&p.join("offline.png")));
    let meta = provenance(p, "offline.png");
    assert_eq!(meta["pretrained"]["commit"], commit.as_str());
    assert_eq!(meta["pretrained"]["offline"], true);
    // A commit id works offline too.
    let o = sample(
        p,
        &hub,
        true,
        "offline2.png",
        &["--pretrained", "google/ddpm-tiny", "--revision", &commit],
    );
    assert_ok(&o);

    // Offline, a repository or revision not in the cache: one line naming it and what to do.
    let o = sample(
        p,
        &hub,
        true,
        "x.png",
        &["--pretrained", "google/ddpm-other"],
    );
    assert_one_clean_error(&o, "google/ddpm-other");
    assert_one_clean_error(&o, "HF_HUB_OFFLINE");
    let o = sample(
        p,
        &hub,
        true,
        "x.png",
        &["--pretrained", "google/ddpm-tiny", "--revision", "v2"],
    );
    assert_one_clean_error(&o, "v2");
}

#[test]
fn a_revision_picks_its_commit_and_the_flat_bin_layout_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let hub = FakeHub::start();
    let first = hub.publish(Kind::Model, "someone/tiny", "main", pipeline_files());
    let second = hub.publish(Kind::Model, "someone/tiny", "flat", flat_files());

    let o = sample(
        p,
        &hub,
        false,
        "flat.png",
        &["--pretrained", "someone/tiny", "--revision", "flat"],
    );
    assert_ok(&o);
    assert_eq!(
        downloads(&hub),
        [
            "config.json",
            "diffusion_pytorch_model.bin",
            "model_index.json",
            "scheduler_config.json",
        ]
    );
    let meta = provenance(p, "flat.png");
    assert_eq!(meta["pretrained"]["revision"], "flat");
    assert_eq!(meta["pretrained"]["commit"], second.as_str());
    // The same model: the same images as from the safetensors of the first commit, by its id.
    let o = sample(
        p,
        &hub,
        false,
        "first.png",
        &["--pretrained", "someone/tiny", "--revision", &first],
    );
    assert_ok(&o);
    assert_eq!(
        provenance(p, "first.png")["pretrained"]["commit"],
        first.as_str()
    );
    let local = fixture("flat-bin");
    let o = sample(
        p,
        &hub,
        false,
        "local.png",
        &["--pretrained", local.to_str().expect("utf-8")],
    );
    assert_ok(&o);
    assert!(read(&p.join("flat.png")) == read(&p.join("local.png")));

    // --revision with a local directory, an unknown revision, an unknown repository.
    let o = sample(
        p,
        &hub,
        false,
        "x.png",
        &[
            "--pretrained",
            local.to_str().expect("utf-8"),
            "--revision",
            "main",
        ],
    );
    assert_one_clean_error(&o, "local directory");
    let o = sample(
        p,
        &hub,
        false,
        "x.png",
        &["--pretrained", "someone/tiny", "--revision", "nope"],
    );
    assert_one_clean_error(&o, "someone/tiny");
    let o = sample(
        p,
        &hub,
        false,
        "x.png",
        &["--pretrained", "someone/missing"],
    );
    assert_one_clean_error(&o, "someone/missing");
    let o = sample(p, &hub, false, "x.png", &["--pretrained", "./no/such/dir"]);
    assert_one_clean_error(&o, "no such directory");
}

#[test]
fn corrupt_downloads_and_configs_we_cannot_represent_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let hub = FakeHub::start();
    hub.publish(Kind::Model, "a/tiny", "main", pipeline_files());
    let weights = "unet/diffusion_pytorch_model.safetensors";

    // Other bytes than the listing's SHA-256: refused, and nothing is left in the cache.
    hub.corrupt(weights);
    let o = sample(p, &hub, false, "x.png", &["--pretrained", "a/tiny"]);
    assert_one_clean_error(&o, "checksum mismatch");
    // A size other than the listing's.
    hub.heal();
    hub.resize(weights, -10);
    let o = sample(p, &hub, false, "x.png", &["--pretrained", "a/tiny"]);
    assert_one_clean_error(&o, "size mismatch");
    // Once the server sends the right bytes, the download succeeds.
    hub.heal();
    let o = sample(p, &hub, false, "ok.png", &["--pretrained", "a/tiny"]);
    assert_ok(&o);

    // A config our model cannot be: the field and its value named.
    let mut files = pipeline_files();
    let cfg = files
        .iter_mut()
        .find(|f| f.path == "unet/config.json")
        .expect("config");
    let mut json: serde_json::Value = serde_json::from_slice(&cfg.bytes).expect("json");
    // (6-feature heads do not divide the 16 channels of its attention blocks.)
    json["attention_head_dim"] = 6.into();
    cfg.bytes = json.to_string().into_bytes();
    hub.publish(Kind::Model, "a/multihead", "main", files);
    let o = sample(p, &hub, false, "x.png", &["--pretrained", "a/multihead"]);
    assert_one_clean_error(&o, "`attention_head_dim` = 6");

    // A repository that is not a diffusers pipeline.
    hub.publish(
        Kind::Model,
        "a/text",
        "main",
        vec![HubFile::git("tokenizer.json", "{}")],
    );
    let o = sample(p, &hub, false, "x.png", &["--pretrained", "a/text"]);
    assert_one_clean_error(&o, "not a diffusers DDPM pipeline");
}

#[test]
fn a_hub_that_never_answers_is_one_line_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let hub = FakeHub::start();
    hub.publish(Kind::Model, "a/tiny", "main", pipeline_files());
    hub.stall("*");
    let started = std::time::Instant::now();
    let mut c = ddpm_bare(p);
    c.env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", p.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "0.5")
        .args(["sample", "--num", "2", "--steps", "5", "--quiet"])
        .args(["--out", "x.png", "--pretrained", "a/tiny"]);
    let o = run(&mut c);
    assert_one_clean_error(&o, "did not answer in time");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(!p.join("x.png").exists());

    // A timeout that is not a number of seconds is refused by name.
    for bad in ["abc", "0", "-3", "inf"] {
        let mut c = ddpm_bare(p);
        c.env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", p.join("hf"))
            .env("HF_HUB_DOWNLOAD_TIMEOUT", bad)
            .args([
                "sample",
                "--num",
                "2",
                "--out",
                "x.png",
                "--pretrained",
                "a/tiny",
            ]);
        assert_one_clean_error(&run(&mut c), "HF_HUB_DOWNLOAD_TIMEOUT");
    }
}

#[test]
fn a_repository_with_only_the_fp16_variant_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let hub = FakeHub::start();
    let files: Vec<HubFile> = pipeline_files()
        .into_iter()
        .filter(|f| !f.path.starts_with("unet/diffusion_pytorch_model"))
        .chain([HubFile::lfs(
            "unet/diffusion_pytorch_model.fp16.safetensors",
            read(&fixture(
                "pipeline/unet/diffusion_pytorch_model.safetensors",
            )),
        )])
        .collect();
    hub.publish(Kind::Model, "a/half", "main", files);
    let o = sample(p, &hub, false, "h.png", &["--pretrained", "a/half"]);
    assert_ok(&o);
    assert_eq!(
        downloads(&hub),
        pipeline_needs("diffusion_pytorch_model.fp16.safetensors")
    );
}

/// `ddpm sample --pretrained o/tiny` of 2 images in 5 steps into `dir/out`, from the Hub at
/// `endpoint` with the cache in `dir/hf`, no CA bundle or proxy from the test's own environment,
/// and the variables `vars` set.
fn sample_over_network(dir: &Path, endpoint: &str, vars: &[(&str, &OsStr)], out: &str) -> Output {
    use net_env::{CA_BUNDLE_VARS, NO_PROXY_VARS, PROXY_VARS};
    let mut c = ddpm_bare(dir);
    c.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "10");
    for var in CA_BUNDLE_VARS
        .iter()
        .chain(&PROXY_VARS)
        .chain(&NO_PROXY_VARS)
    {
        c.env_remove(var);
    }
    for (var, value) in vars {
        c.env(var, value);
    }
    c.args([
        "sample",
        "--pretrained",
        "o/tiny",
        "--num",
        "2",
        "--steps",
        "5",
    ])
    .args(["--quiet", "--out", out]);
    run(&mut c)
}

/// A Hub behind HTTPS with a private CA (a company's proxy that inspects TLS): refused in one line
/// that says how to trust it, sampled from once its CA is named in `SSL_CERT_FILE` (or
/// `REQUESTS_CA_BUNDLE`, which comes first); a bundle that cannot be read is named in one line,
/// and stops only what downloads.
#[test]
fn a_hub_over_https_is_trusted_through_the_ca_bundle_variables() {
    let hub = FakeHub::start();
    hub.publish(Kind::Model, "o/tiny", "main", pipeline_files());
    let front = tls_front::TlsFront::start(&hub.endpoint);
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let ca = tls_front::fixtures().join("ca.pem");
    let sample = |bundle: &[(&str, &Path)], out: &str| {
        let vars: Vec<(&str, &OsStr)> = bundle.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        sample_over_network(p, &front.base, &vars, out)
    };

    let refused = sample(&[], "a.png");
    assert_one_clean_error(&refused, "SSL_CERT_FILE");
    assert!(!p.join("a.png").exists());

    let missing = p.join("no-such.pem");
    let bad = sample(&[("SSL_CERT_FILE", &missing)], "b.png");
    assert_one_clean_error(&bad, &format!("SSL_CERT_FILE={}", missing.display()));

    // REQUESTS_CA_BUNDLE is looked at first, as `requests` does.
    assert_ok(&sample(
        &[("REQUESTS_CA_BUNDLE", &ca), ("SSL_CERT_FILE", &missing)],
        "c.png",
    ));
    assert!(p.join("c.png").is_file());
    assert_eq!(
        downloads(&hub),
        pipeline_needs("diffusion_pytorch_model.safetensors")
    );

    // A bad bundle does not stop a command that downloads nothing.
    let mut schedule = ddpm_bare(p);
    schedule
        .env("SSL_CERT_FILE", &missing)
        .args(["schedule", "--timesteps", "10"]);
    assert_ok(&run(&mut schedule));
}

/// `HTTPS_PROXY` (with credentials) is the way to a Hub that only the proxy reaches (`hub.test`),
/// with `NO_PROXY` honoured; a proxy address that cannot be used is one line that names the
/// variable and leaves the password out.
#[test]
fn the_hub_is_reached_through_the_proxy_of_the_environment() {
    let hub = FakeHub::start();
    hub.publish(Kind::Model, "o/tiny", "main", pipeline_files());
    let proxy = connect_proxy::ConnectProxy::start(Some("me:pw"));
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let endpoint = hub.endpoint.replace("127.0.0.1", "hub.test");
    let sample = |vars: &[(&str, String)], out: &str| {
        let vars: Vec<(&str, &OsStr)> = vars.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
        sample_over_network(p, &endpoint, &vars, out)
    };
    let good = format!("http://me:pw@{}", proxy.addr);

    assert_ok(&sample(&[("https_proxy", good.clone())], "a.png"));
    assert!(p.join("a.png").is_file());
    assert!(!proxy.targets().is_empty());
    assert!(proxy.targets().iter().all(|t| t.starts_with("hub.test:")));

    // NO_PROXY: hub.test is then looked up directly, and does not exist.
    let seen = proxy.targets().len();
    let direct = sample(
        &[
            ("HTTPS_PROXY", good),
            ("NO_PROXY", "example.org, hub.test".to_string()),
            ("HF_HUB_OFFLINE", "0".to_string()),
        ],
        "b.png",
    );
    assert_one_clean_error(&direct, "cannot reach http://hub.test:");
    assert_eq!(proxy.targets().len(), seen);

    let bad = sample(
        &[(
            "HTTPS_PROXY",
            "socks5://me:pw@proxy.example:1080".to_string(),
        )],
        "c.png",
    );
    assert_one_clean_error(&bad, "HTTPS_PROXY=socks5://me:***@proxy.example:1080");
    assert!(!String::from_utf8_lossy(&bad.stderr).contains(":pw@"));
}

/// `--log trace` (what a bug report asks for) never prints the token: the HTTP client's trace
/// level, which dumps each request's bytes and so the `Authorization` header, is never shown.
#[test]
fn the_token_stays_out_of_a_trace_log() {
    let hub = FakeHub::start();
    hub.publish(Kind::Model, "o/tiny", "main", pipeline_files());
    let dir = tempfile::tempdir().expect("tmp");
    let token = OsStr::new("hf_SECRETTOKEN_for_this_test");
    let o = sample_over_network(
        dir.path(),
        &hub.endpoint,
        &[("HF_TOKEN", token), ("DDPM_LOG", OsStr::new("trace"))],
        "t.png",
    );
    assert_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DEBUG"), "the trace filter took: {err}");
    assert!(
        !err.contains("SECRETTOKEN") && !err.contains("5345 4352"),
        "{err}"
    );
}
