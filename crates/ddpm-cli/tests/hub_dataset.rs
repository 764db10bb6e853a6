//! `ddpm train --dataset hf:OWNER/NAME` against a fake Hub on 127.0.0.1
//! (crates/ddpm-data/tests/support/hub_server.rs, reached through `HF_ENDPOINT`) serving a small
//! parquet data set written by the test: the run trains, its config records the commit, a resume
//! reads the same files offline after the branch has moved, and a missing split or a corrupt
//! download is one clean error. No network is used.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_ok, assert_one_clean_error, ddpm_bare, run, write_tiny_config};

#[path = "../../ddpm-data/tests/support/hub_server.rs"]
mod hub_server;
use hub_server::{FakeHub, HubFile, Kind};

#[path = "../../ddpm-data/tests/support/hub_parquet.rs"]
mod hub_parquet;
use hub_parquet::{parquet_file, tiny_rows};

const TRAIN: &str = "data/train-00000-of-00001.parquet";

/// `ddpm` in `dir` with the Hub options pointing at `hub` and the cache in `dir/hf`.
fn ddpm_hub(dir: &Path, hub: &FakeHub, offline: bool) -> Command {
    let mut c = ddpm_bare(dir);
    c.env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" });
    c
}

fn config(dir: &Path) -> std::path::PathBuf {
    write_tiny_config(
        dir,
        "batch_size = 4\nwarmup_steps = 1\ncheckpoint_every = 2\nsample_every = 0\nlog_every = 1\nworkers = 1\n",
        "",
    )
}

#[test]
fn trains_on_a_hub_data_set_and_resumes_on_the_recorded_commit_offline() {
    let hub = FakeHub::start();
    let commit = hub.publish(
        Kind::Dataset,
        "test/tiny",
        "main",
        vec![
            HubFile::git("README.md", "# tiny\n"),
            HubFile::lfs(
                TRAIN,
                parquet_file(&tiny_rows(20, 4, false), Some(&["a", "b", "c", "d"])),
            ),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut c = ddpm_hub(dir.path(), &hub, false);
    c.args(["train", "--quiet", "--config"]).arg(&cfg).args([
        "--dataset",
        "hf:test/tiny",
        "--steps",
        "2",
        "--out",
        "run",
    ]);
    assert_ok(&run(&mut c));
    let saved = std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
    assert!(
        saved.contains(&format!("dataset = \"hf:test/tiny@{commit}\"")),
        "{saved}"
    );
    assert!(dir
        .path()
        .join("hf/hub/datasets--test--tiny/snapshots")
        .join(&commit)
        .join(TRAIN)
        .is_file());

    // main moves on and the Hub goes away: the resume reads the recorded commit from the cache.
    hub.publish(
        Kind::Dataset,
        "test/tiny",
        "main",
        vec![HubFile::lfs(
            TRAIN,
            parquet_file(&tiny_rows(3, 1, true), None),
        )],
    );
    hub.set_down(true);
    let requests = hub.request_count();
    let mut c = ddpm_hub(dir.path(), &hub, true);
    c.args(["train", "--quiet", "--resume", "run", "--steps", "4"]);
    assert_ok(&run(&mut c));
    assert_eq!(hub.request_count(), requests);
    let saved = std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
    assert!(saved.contains(&commit), "{saved}");
}

#[test]
fn a_missing_split_or_a_corrupt_download_is_one_clean_error() {
    let hub = FakeHub::start();
    hub.publish(
        Kind::Dataset,
        "test/tiny",
        "main",
        vec![HubFile::lfs(
            TRAIN,
            parquet_file(&tiny_rows(8, 2, false), None),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let train = |dataset: &str, offline: bool| {
        let mut c = ddpm_hub(dir.path(), &hub, offline);
        c.args(["train", "--quiet", "--config"]).arg(&cfg).args([
            "--dataset",
            dataset,
            "--steps",
            "1",
            "--out",
            "run-x",
        ]);
        run(&mut c)
    };
    assert_one_clean_error(
        &train("hf:test/tiny:validation", false),
        "no split \"validation\"",
    );
    assert_one_clean_error(&train("hf:test/tiny", true), "HF_HUB_OFFLINE");
    hub.corrupt(TRAIN);
    assert_one_clean_error(&train("hf:test/tiny", false), "checksum mismatch");
    assert_one_clean_error(&train("hf:test", false), "hf:OWNER/NAME");
}
