//! `xtask fetch-data` end to end against the local mirror in `../shared/data`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))
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
fn fetch_all_from_the_mirror_in_the_environment() {
    assert!(
        shared().is_dir(),
        "expected the real data in {}",
        shared().display()
    );
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let out = xtask(&["fetch-data", "all", "--data-dir", dir], Some(&shared()));
    let log = text(&out);
    assert!(!out.status.success(), "cifar10 is not in the mirror: {log}");
    assert!(log.contains("only the MNIST test split"), "{log}");
    assert!(log.contains("cifar10/cifar-10-binary.tar.gz"), "{log}");
    assert!(
        log.contains("1 of 3 data sets could not be fetched: cifar10"),
        "{log}"
    );
    assert!(data
        .path()
        .join("mnist/t10k-images-idx3-ubyte.gz")
        .is_file());
    assert!(data.path().join("flowers/tulip").is_dir());
    assert!(!data.path().join("cifar10").exists());

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
fn fetch_mnist_with_from_and_bad_arguments() {
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
    assert!(String::from_utf8_lossy(&out.stdout).contains("fetched and verified 2 files"));

    let out = xtask(&["fetch-data", "imagenet"], None);
    assert!(!out.status.success());
    let out = xtask(&["fetch-data", "flowers", "--data-dir", dir], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("--flowers-sha256"), "{}", text(&out));
}
