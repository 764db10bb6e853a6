//! The Hub client (`ddpm_data::hub`) against a fake Hub on the loopback interface: resolving
//! revisions, the cache layout hf-hub shares with Python, offline mode on a filled cache, and
//! refusal of files whose bytes or size differ from the listing.

#[path = "support/hub_options.rs"]
mod hub_options;
#[path = "support/hub_server.rs"]
mod hub_server;

use ddpm_data::hub::{Hub, HubOptions, Repo};
use ddpm_data::DataError;
use hub_options::{offline, options};
use hub_server::{FakeHub, HubFile, Kind};

const CONFIG: &[u8] = b"{\"sample_size\": 32}\n";

fn weights() -> Vec<u8> {
    (0..5000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn model(hub: &FakeHub, id: &str) -> String {
    hub.publish(
        Kind::Model,
        id,
        "main",
        vec![
            HubFile::git("unet/config.json", CONFIG),
            HubFile::lfs("unet/weights.bin", weights()),
        ],
    )
}

#[test]
fn files_are_downloaded_verified_cached_and_served_offline() {
    let hub = FakeHub::start();
    let commit = model(&hub, "o/n");
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&options(&hub, cache.path())).unwrap();
    let repo = Repo::model("o/n").unwrap();
    let snap = client.snapshot(&repo, "main").unwrap();
    assert_eq!(snap.commit, commit);
    assert!(!snap.offline);
    let paths: Vec<&str> = snap.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["unet/config.json", "unet/weights.bin"]);
    let lfs = snap.file("unet/weights.bin").unwrap();
    assert_eq!(lfs.size, Some(5000));
    assert_eq!(
        lfs.sha256.as_deref(),
        Some(hub_server::sha256(&weights()).as_str())
    );

    let config = client.get(&snap, "unet/config.json").unwrap();
    let bin = client.get(&snap, "unet/weights.bin").unwrap();
    assert_eq!(std::fs::read(&config).unwrap(), CONFIG);
    assert_eq!(std::fs::read(&bin).unwrap(), weights());
    // The layout huggingface_hub uses: links in snapshots/COMMIT to blobs named by ETag, and
    // refs/main naming the commit.
    let root = cache.path().join("models--o--n");
    assert_eq!(
        config,
        root.join("snapshots")
            .join(&commit)
            .join("unet/config.json")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        commit
    );
    assert!(root
        .join("blobs")
        .join(hub_server::sha256(&weights()))
        .is_file());
    assert!(root
        .join("blobs")
        .join(hub_server::git_sha1(CONFIG))
        .is_file());
    let requests = hub.requests();
    assert_eq!(requests[0], "/api/models/o/n/revision/main?blobs=true");
    assert!(
        requests
            .iter()
            .any(|r| r == &format!("/o/n/resolve/{commit}/unet/weights.bin")),
        "{requests:?}"
    );

    // A second get is served from the cache (after verifying it).
    let before = hub.request_count();
    assert_eq!(client.get(&snap, "unet/weights.bin").unwrap(), bin);
    assert_eq!(hub.request_count(), before);

    // Offline: the ref, the commit and the files come from the cache alone.
    hub.set_down(true);
    let off = Hub::new(&offline(cache.path())).unwrap();
    assert!(off.is_offline());
    let snap_off = off.snapshot(&repo, "main").unwrap();
    assert_eq!(snap_off.commit, commit);
    assert!(snap_off.offline);
    assert_eq!(snap_off.files.len(), 2);
    assert_eq!(off.get(&snap_off, "unet/weights.bin").unwrap(), bin);
    assert_eq!(off.snapshot(&repo, &commit).unwrap().commit, commit);
    assert_eq!(hub.request_count(), before);
    // What the cache lacks is a one-line error naming it and what to do.
    let err = off
        .snapshot(&Repo::model("o/other").unwrap(), "main")
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DataError::HubOffline { .. }), "{text}");
    assert!(
        text.contains("o/other at revision main") && text.contains("HF_HUB_OFFLINE"),
        "{text}"
    );
    assert!(!text.contains('\n'));
    let err = off.snapshot(&repo, "v2").unwrap_err();
    assert!(err.to_string().contains("o/n at revision v2"), "{err}");
    // Online, a dead Hub is a transport error that suggests offline mode.
    let err = client.snapshot(&repo, "main").unwrap_err();
    assert!(
        err.to_string().contains("503") || err.to_string().contains("failed"),
        "{err}"
    );
}

#[test]
fn corrupt_or_resized_downloads_are_refused_and_deleted() {
    let hub = FakeHub::start();
    let commit = model(&hub, "o/bad");
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&options(&hub, cache.path())).unwrap();
    let snap = client
        .snapshot(&Repo::model("o/bad").unwrap(), "main")
        .unwrap();
    let root = cache.path().join("models--o--bad");
    let link = root
        .join("snapshots")
        .join(&commit)
        .join("unet/weights.bin");
    let blob = root.join("blobs").join(hub_server::sha256(&weights()));

    hub.corrupt("unet/weights.bin");
    let err = client.get(&snap, "unet/weights.bin").unwrap_err();
    match &err {
        DataError::ChecksumMismatch {
            algorithm,
            expected,
            ..
        } => {
            assert_eq!(*algorithm, "sha256");
            assert_eq!(expected, &hub_server::sha256(&weights()));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(err.to_string().contains("unet/weights.bin"), "{err}");
    assert!(link.symlink_metadata().is_err() && !blob.exists());

    // A small file kept in Git is checked against its blob id.
    hub.corrupt("unet/config.json");
    let err = client.get(&snap, "unet/config.json").unwrap_err();
    assert!(
        matches!(&err, DataError::ChecksumMismatch { algorithm, .. } if algorithm.contains("sha1")),
        "{err}"
    );

    for delta in [-1, 7] {
        hub.heal();
        hub.resize("unet/weights.bin", delta);
        let err = client.get(&snap, "unet/weights.bin").unwrap_err();
        match err {
            DataError::SizeMismatch {
                expected, actual, ..
            } => assert_eq!((expected, actual as i64), (5000, 5000 + delta)),
            other => panic!("{delta}: expected a size mismatch, got {other}"),
        }
        assert!(link.symlink_metadata().is_err() && !blob.exists());
    }

    // Served correctly, the same file goes through.
    hub.heal();
    let path = client.get(&snap, "unet/weights.bin").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), weights());

    // A cached blob damaged on disk is detected: offline refuses it, online fetches it again.
    std::fs::write(&blob, b"rotten").unwrap();
    let off = Hub::new(&offline(cache.path())).unwrap();
    let snap_off = off
        .snapshot(&Repo::model("o/bad").unwrap(), "main")
        .unwrap();
    let err = off.get(&snap_off, "unet/weights.bin").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("is damaged")
            && text.contains("run once online")
            && !text.contains("deleted"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        b"rotten",
        "offline deletes nothing"
    );
    let path = client.get(&snap, "unet/weights.bin").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), weights());
}

#[test]
fn revisions_resolve_to_commits_and_old_commits_stay_readable() {
    let hub = FakeHub::start();
    let v1 = hub.publish(
        Kind::Dataset,
        "o/d",
        "main",
        vec![HubFile::lfs(
            "data/train-00000-of-00001.parquet",
            b"one".to_vec(),
        )],
    );
    let v2 = hub.publish(
        Kind::Dataset,
        "o/d",
        "main",
        vec![HubFile::lfs(
            "data/train-00000-of-00001.parquet",
            b"two!".to_vec(),
        )],
    );
    hub.set_ref(Kind::Dataset, "o/d", "refs/convert/parquet", &v1);
    assert_ne!(v1, v2);
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&options(&hub, cache.path())).unwrap();
    let repo = Repo::dataset("o/d").unwrap();
    let file = "data/train-00000-of-00001.parquet";

    let main = client.snapshot(&repo, "main").unwrap();
    assert_eq!(main.commit, v2);
    assert_eq!(
        std::fs::read(client.get(&main, file).unwrap()).unwrap(),
        b"two!"
    );
    let pinned = client.snapshot(&repo, &v1).unwrap();
    assert_eq!(pinned.commit, v1);
    assert_eq!(
        std::fs::read(client.get(&pinned, file).unwrap()).unwrap(),
        b"one"
    );
    // A ref with slashes goes escaped into the URL and into refs/ of the cache.
    let converted = client.snapshot(&repo, "refs/convert/parquet").unwrap();
    assert_eq!(converted.commit, v1);
    assert!(hub
        .requests()
        .contains(&"/api/datasets/o/d/revision/refs%2Fconvert%2Fparquet?blobs=true".to_string()));
    let refs = cache.path().join("datasets--o--d/refs");
    assert_eq!(
        std::fs::read_to_string(refs.join("refs/convert/parquet")).unwrap(),
        v1
    );

    // Unknown repositories, revisions and files are errors that name them.
    let err = client
        .snapshot(&Repo::dataset("o/missing").unwrap(), "main")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("datasets/o/missing") && text.contains("not found"),
        "{text}"
    );
    assert!(text.contains("HF_TOKEN"), "{text}");
    let err = client.snapshot(&repo, "nope").unwrap_err();
    assert!(err.to_string().contains("revision nope"), "{err}");
    let err = client.get(&main, "data/test.parquet").unwrap_err();
    assert!(
        err.to_string().contains("data/test.parquet") && err.to_string().contains(file),
        "{err}"
    );
    assert!(client.snapshot(&repo, "../x").is_err());
}

#[test]
fn an_unreachable_hub_is_one_line_that_suggests_offline_mode() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&HubOptions {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        cache_dir: Some(cache.path().to_path_buf()),
        ..HubOptions::default()
    })
    .unwrap();
    let err = client
        .snapshot(&Repo::model("o/n").unwrap(), "main")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot reach") && text.contains("HF_HUB_OFFLINE=1"),
        "{text}"
    );
    assert!(!text.contains('\n'));
}

#[test]
fn a_hub_that_never_answers_is_an_error_after_the_timeout_not_a_hang() {
    let hub = FakeHub::start();
    let commit = model(&hub, "o/slow");
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&HubOptions {
        timeout: Some(std::time::Duration::from_millis(300)),
        retries: Some(1),
        ..options(&hub, cache.path())
    })
    .unwrap();
    let repo = Repo::model("o/slow").unwrap();
    let snap = client.snapshot(&repo, "main").unwrap();

    // A file whose download never starts: each try times out, then the error names the file,
    // says what timed out and how to change it.
    hub.stall("unet/weights.bin");
    let started = std::time::Instant::now();
    let err = client.get(&snap, "unet/weights.bin").unwrap_err();
    let waited = started.elapsed();
    let text = err.to_string();
    assert!(
        text.contains("o/slow@") && text.contains("unet/weights.bin"),
        "{text}"
    );
    assert!(
        text.contains("did not answer in time") && text.contains("HF_HUB_DOWNLOAD_TIMEOUT"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    // Two tries that each end at the timeout, one backoff between them: far sooner than the
    // fake Hub would ever answer.
    assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");
    let stalled = format!("/o/slow/resolve/{commit}/unet/weights.bin");
    assert_eq!(
        hub.requests().iter().filter(|r| **r == stalled).count(),
        2,
        "{:?}",
        hub.requests()
    );
    // Nothing half-made is left as the file: no link, no blob (a `.part` may wait to resume).
    let root = cache.path().join("models--o--slow");
    let link = root
        .join("snapshots")
        .join(&commit)
        .join("unet/weights.bin");
    assert!(link.symlink_metadata().is_err());
    assert!(!root
        .join("blobs")
        .join(hub_server::sha256(&weights()))
        .exists());
    // Other files still come.
    let config = client.get(&snap, "unet/config.json").unwrap();
    assert_eq!(std::fs::read(config).unwrap(), CONFIG);

    // The listing itself never answered.
    hub.stall("*");
    let started = std::time::Instant::now();
    let err = client.snapshot(&repo, "main").unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("o/slow at revision main")
            && text.contains("did not answer in time")
            && text.contains("HF_HUB_OFFLINE=1"),
        "{text}"
    );
}

#[test]
fn processes_downloading_the_same_file_wait_for_each_other() {
    let hub = FakeHub::start();
    model(&hub, "o/shared");
    let cache = tempfile::tempdir().unwrap();
    let repo = Repo::model("o/shared").unwrap();
    let got: Vec<std::path::PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let client = Hub::new(&options(&hub, cache.path())).unwrap();
                    let snap = client.snapshot(&repo, "main").unwrap();
                    client.get(&snap, "unet/weights.bin").unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for path in &got {
        assert_eq!(std::fs::read(path).unwrap(), weights());
    }
    let root = cache.path().join("models--o--shared");
    let blobs: Vec<String> = std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs, [hub_server::sha256(&weights())], "{blobs:?}");
    // The lock lives where huggingface_hub keeps its own.
    assert!(cache
        .path()
        .join(".locks/models--o--shared")
        .join(format!("{}.lock", hub_server::sha256(&weights())))
        .is_file());
}

/// A Hub that lies in its listing cannot reach outside the cache through a hash, move a pinned
/// commit, or cost a sound cached blob.
#[test]
fn a_lying_listing_is_refused_and_spares_the_cache() {
    let hub = FakeHub::start();
    let commit = model(&hub, "o/liar");
    let cache = tempfile::tempdir().unwrap();
    let client = Hub::new(&options(&hub, cache.path())).unwrap();
    let repo = Repo::model("o/liar").unwrap();
    let good = hub_server::sha256(&weights());
    let snap = client.snapshot(&repo, "main").unwrap();
    let bin = client.get(&snap, "unet/weights.bin").unwrap();

    // Hashes are file names in the cache: a path instead of one is refused with the listing,
    // and nothing is read, written or deleted where it points.
    let victims = tempfile::tempdir().unwrap();
    let victim = victims.path().join("v");
    std::fs::write(victim.with_extension("part"), b"precious").unwrap();
    for (field, lie) in [
        (good.clone(), victim.display().to_string()),
        (good.clone(), "../../../../x".to_string()),
        (hub_server::git_sha1(CONFIG), victim.display().to_string()),
    ] {
        let lie2 = lie.clone();
        let field2 = field.clone();
        hub.rewrite_listings(move |json| json.replace(&field2, &lie2));
        let err = client.snapshot(&repo, "main").unwrap_err().to_string();
        assert!(err.contains("hex digits") && err.contains(&lie), "{err}");
        hub.heal();
    }
    assert_eq!(
        std::fs::read(victim.with_extension("part")).unwrap(),
        b"precious"
    );
    assert!(!victim.with_extension("lock").exists());

    // A commit asked for by its id is the commit answered for.
    let other = "f".repeat(40);
    let c = commit.clone();
    hub.rewrite_listings(move |json| json.replace(&c, &"f".repeat(40)));
    let err = client.snapshot(&repo, &commit).unwrap_err().to_string();
    assert!(
        err.contains("another commit") && err.contains(&other),
        "{err}"
    );
    hub.heal();

    // A listing that gives a cached file another hash: the download of what it names fails, and
    // the cached blob, which still matches its own name, is kept for every commit linking it.
    let zeros = "0".repeat(64);
    let g = good.clone();
    let z = zeros.clone();
    hub.rewrite_listings(move |json| json.replace(&g, &z));
    let lying = client.snapshot(&repo, "main").unwrap();
    let err = client.get(&lying, "unet/weights.bin").unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
    let blob = cache.path().join("models--o--liar/blobs").join(&good);
    assert_eq!(std::fs::read(&blob).unwrap(), weights());
    hub.heal();
    let snap = client.snapshot(&repo, "main").unwrap();
    assert_eq!(client.get(&snap, "unet/weights.bin").unwrap(), bin);
    assert_eq!(std::fs::read(&bin).unwrap(), weights());
}
