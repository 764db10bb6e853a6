//! `xtask fetch-data` end to end: bad arguments (hermetic), and fetching from a mirror that holds
//! the real data sets (the real-data suite, `cargo xtask test-real`, which fetched them into a
//! directory in the mirror layout and names it in `DDPM_REAL_DATA`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fetched real data sets (see the module doc); fails with how to get them.
fn shared() -> PathBuf {
    match std::env::var_os("DDPM_REAL_DATA") {
        Some(dir) if Path::new(&dir).join("mnist").is_dir() => PathBuf::from(dir),
        _ => panic!(
            "this test reads the real data sets: run it with `cargo xtask test-real` (fetches \
             MNIST and Flowers into data/; offline: set DDPM_DATA_MIRROR=DIR to a mirror)"
        ),
    }
}

/// Whether the real MNIST has its training files (upstream) or only the t10k pair (our mirror).
fn mnist_complete() -> bool {
    shared().join("mnist/train-images-idx3-ubyte.gz").is_file()
}

fn xtask(args: &[&str], mirror: Option<&PathBuf>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args)
        .arg("--no-progress")
        .env_remove("DDPM_DATA_MIRROR");
    if let Some(m) = mirror {
        cmd.env("DDPM_DATA_MIRROR", m);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn fetch_all_from_the_mirror_in_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let out = xtask(&["fetch-data", "all", "--data-dir", dir], Some(&shared()));
    let log = text(&out);
    // The real-data suite fetches MNIST and Flowers only (our mirror has no more), so the
    // mirror lacks Fashion-MNIST and CIFAR-10: each is named, and the others are placed.
    assert!(!out.status.success(), "cifar10 is not in the mirror: {log}");
    assert_eq!(
        log.contains("only the MNIST test split"),
        !mnist_complete(),
        "{log}"
    );
    assert!(log.contains("cifar10/cifar-10-binary.tar.gz"), "{log}");
    assert!(
        log.contains("fashion-mnist/t10k-images-idx3-ubyte.gz"),
        "{log}"
    );
    assert!(
        log.contains("2 of 4 data sets could not be fetched: fashion-mnist, cifar10"),
        "{log}"
    );
    assert!(data
        .path()
        .join("mnist/t10k-images-idx3-ubyte.gz")
        .is_file());
    // The 4,317-image set names its classes in the singular, TensorFlow's 3,670-image set plural.
    assert!(
        data.path().join("flowers/tulip").is_dir() || data.path().join("flowers/tulips").is_dir()
    );
    assert!(!data.path().join("cifar10").exists());
    assert!(!data.path().join("fashion-mnist").exists());

    // A second run of what succeeded is a no-op.
    let out = xtask(&["fetch-data", "mnist", "--data-dir", dir], Some(&shared()));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already in place"),
        "{}",
        text(&out)
    );
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn fetch_mnist_with_from() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let from = shared();
    let out = xtask(
        &[
            "fetch-data",
            "mnist",
            "--data-dir",
            dir,
            "--from",
            from.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let files = if mnist_complete() { 4 } else { 2 };
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("fetched and verified {files} files")),
        "{}",
        text(&out)
    );
}

#[test]
fn bad_arguments_and_missing_sources_are_named() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let out = xtask(&["fetch-data", "imagenet"], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("imagenet"), "{}", text(&out));
    // A mirror directory that does not exist is named, and nothing is placed.
    let out = xtask(
        &[
            "fetch-data",
            "mnist",
            "--data-dir",
            dir,
            "--from",
            "/no/such/mirror",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("/no/such/mirror"), "{}", text(&out));
    assert!(!data.path().join("mnist").exists());
    // So is a Flowers archive that does not exist.
    let out = xtask(
        &[
            "fetch-data",
            "flowers",
            "--data-dir",
            dir,
            "--flowers-url",
            "/no/such/flowers.tgz",
            "--flowers-sha256",
            &"0".repeat(64),
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/no/such/flowers.tgz"),
        "{}",
        text(&out)
    );
    assert!(!data.path().join("flowers").exists());
}
