//! Fetching Flowers from an archive over HTTP, without the network: a server on 127.0.0.1 serves
//! small `.tgz` archives made here in the layout of TensorFlow's `flower_photos.tgz`
//! (`flower_photos/<class>/*.jpg` and `flower_photos/LICENSE.txt`), good, corrupted or hostile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "support/file_server.rs"]
mod file_server;
use file_server::Server;

use ddpm_data::fetch::{
    fetch, is_fetched, FetchOptions, FetchOutcome, FLOWERS_CLASSES, FLOWERS_SHA256, FLOWERS_SIZE,
    FLOWERS_URL, FLOWERS_URLS, MARKER,
};
use ddpm_data::{DataConfig, DataError, Dataset, DatasetSpec, Split};
use sha2::{Digest, Sha256};

/// The classes of the archives made here (those of the real archive).
const CLASSES: [&str; 5] = ["daisy", "dandelion", "roses", "sunflowers", "tulips"];

/// A tiny JPEG of one colour.
fn jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 30) as u8, (y * 30) as u8])
    });
    let mut out = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut out),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    out
}

/// One entry of a test archive. Names are written into the header as they are, so that entries
/// `tar::Builder` would refuse (`..`, absolute paths) can be made.
enum Entry {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, String),
}

fn tgz(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, data, kind, link): (&str, &[u8], _, &str) = match entry {
            Entry::File(name, data) => (name, data, tar::EntryType::Regular, ""),
            Entry::Dir(name) => (name, b"", tar::EntryType::Directory, ""),
            Entry::Symlink(name, target) => (name, b"", tar::EntryType::Symlink, target),
        };
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// The entries of a small `flower_photos.tgz`: class `i` holds `i + 2` images.
fn flower_entries() -> Vec<Entry> {
    let mut entries = vec![
        Entry::Dir("flower_photos/".into()),
        Entry::File(
            "flower_photos/LICENSE.txt".into(),
            b"All images in this archive are licensed under the Creative Commons By-Attribution \
              License.\n"
                .to_vec(),
        ),
    ];
    for (i, class) in CLASSES.iter().enumerate() {
        entries.push(Entry::Dir(format!("flower_photos/{class}/")));
        for k in 0..i + 2 {
            entries.push(Entry::File(
                format!("flower_photos/{class}/{k:03}.jpg"),
                jpeg((10 * i + k) as u8),
            ));
        }
    }
    entries
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn options(data: &Path, url: String, sha256: Option<String>) -> FetchOptions {
    FetchOptions {
        progress: false,
        retries: 1,
        backoff: Duration::from_millis(1),
        timeout: Duration::from_secs(10),
        flowers_url: Some(url),
        flowers_sha256: sha256,
        ..FetchOptions::new(data)
    }
}

/// The names in a directory, sorted (hidden ones included).
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Every path under `dir` (not following links), with whether it is a symbolic link.
fn walk(dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push((path.clone(), meta.file_type().is_symlink()));
        if meta.is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

#[test]
fn the_default_source_is_tensorflows_pinned_archive() {
    assert_eq!(
        FLOWERS_URL,
        "http://download.tensorflow.org/example_images/flower_photos.tgz"
    );
    assert_eq!(FLOWERS_URLS[0], FLOWERS_URL);
    assert_eq!(
        FLOWERS_URLS[1],
        "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
    );
    assert_eq!(FLOWERS_SIZE, 228_813_984);
    assert_eq!(
        FLOWERS_SHA256,
        "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
    );
    assert_eq!(
        FLOWERS_CLASSES,
        [
            ("daisy", 633),
            ("dandelion", 898),
            ("roses", 641),
            ("sunflowers", 699),
            ("tulips", 799)
        ]
    );
    assert_eq!(FLOWERS_CLASSES.iter().map(|c| c.1).sum::<usize>(), 3_670);
}

#[test]
fn a_good_archive_is_fetched_into_class_folders_and_a_second_fetch_is_a_no_op() {
    let archive = tgz(&flower_entries());
    let sha = sha256_hex(&archive);
    let server = Server::start(HashMap::from([("flower_photos.tgz".to_string(), archive)]));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let opts = options(&data, server.url("flower_photos.tgz"), Some(sha));

    let report = fetch(&DatasetSpec::Flowers, &opts).unwrap();
    assert_eq!(report.outcome, FetchOutcome::Fetched);
    assert_eq!(report.files, 20 + 1, "20 images and the licence");
    let flowers = data.join("flowers");
    let mut expected: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    expected.extend([MARKER.to_string(), "LICENSE.txt".to_string()]);
    expected.sort();
    assert_eq!(names(&flowers), expected, "the top folder is stripped");
    assert_eq!(
        names(&data),
        vec!["flowers"],
        "no staging directory is left"
    );
    for (i, class) in CLASSES.iter().enumerate() {
        assert_eq!(names(&flowers.join(class)).len(), i + 2, "{class}");
    }
    assert!(
        report.notes.iter().any(|n| n.contains("daisy 2")),
        "{report}"
    );
    assert!(is_fetched(&DatasetSpec::Flowers, &data));
    let cfg = DataConfig {
        image_size: Some(8),
        threads: Some(1),
        ..DataConfig::with_root(&data)
    };
    let all = Dataset::open(&DatasetSpec::Flowers, &cfg, Split::All).unwrap();
    assert_eq!(
        (all.len(), all.class_names()),
        (20, &CLASSES.map(String::from)[..])
    );

    // A second fetch only checks the marker: no request reaches the server.
    let again = fetch(&DatasetSpec::Flowers, &opts).unwrap();
    assert_eq!(again.outcome, FetchOutcome::AlreadyPresent);
    assert_eq!(server.requests(), vec!["/flower_photos.tgz"]);
}

#[test]
fn a_corrupted_archive_is_refused_naming_the_checksum_and_nothing_is_placed() {
    let good = tgz(&flower_entries());
    let sha = sha256_hex(&good);
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    let server = Server::start(HashMap::from([("flower_photos.tgz".to_string(), bad)]));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let err = fetch(
        &DatasetSpec::Flowers,
        &options(&data, server.url("flower_photos.tgz"), Some(sha.clone())),
    )
    .unwrap_err();
    match &err {
        DataError::ChecksumMismatch {
            file,
            algorithm,
            expected,
            ..
        } => {
            assert_eq!(file, "flowers/flower_photos.tgz");
            assert_eq!((*algorithm, expected.as_str()), ("sha256", sha.as_str()));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(
        err.to_string().contains("sha256 checksum mismatch"),
        "{err}"
    );
    assert_eq!(names(&data), Vec::<String>::new(), "nothing is placed");
    assert!(!is_fetched(&DatasetSpec::Flowers, &data));

    // The pinned checksum implies the pinned size: a file of another size is refused as soon as
    // the server announces its length.
    let err = fetch(
        &DatasetSpec::Flowers,
        &options(
            &data,
            server.url("flower_photos.tgz"),
            Some(FLOWERS_SHA256.to_string()),
        ),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DataError::SizeMismatch {
                expected: FLOWERS_SIZE,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(names(&data), Vec::<String>::new(), "nothing is placed");

    // Another archive without a checksum is not fetched at all.
    let requests = server.requests().len();
    let err = fetch(
        &DatasetSpec::Flowers,
        &options(&data, server.url("flower_photos.tgz"), None),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::NoChecksum { .. }), "{err}");
    assert_eq!(server.requests().len(), requests);
}

#[test]
fn hostile_entries_are_refused_or_left_out_and_nothing_is_written_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let absolute = outside.join("absolute.jpg");
    let absolute_name = absolute.display().to_string();
    assert!(
        absolute_name.len() < 100,
        "{absolute_name} fits a tar header"
    );
    let with = |extra: Entry| {
        let mut entries = flower_entries();
        entries.insert(3, extra);
        tgz(&entries)
    };
    let archives = HashMap::from([
        (
            "parent.tgz".to_string(),
            with(Entry::File("../evil.jpg".into(), jpeg(1))),
        ),
        (
            "nested-parent.tgz".to_string(),
            with(Entry::File(
                "flower_photos/daisy/../../../evil.jpg".into(),
                jpeg(2),
            )),
        ),
        (
            "absolute.tgz".to_string(),
            with(Entry::File(absolute_name.clone(), jpeg(3))),
        ),
    ]);
    let shas: HashMap<String, String> = archives
        .iter()
        .map(|(name, bytes)| (name.clone(), sha256_hex(bytes)))
        .collect();
    let server = Server::start(archives);

    for (name, entry, why) in [
        ("parent.tgz", "../evil.jpg", "climbs out"),
        (
            "nested-parent.tgz",
            "flower_photos/daisy/../../../evil.jpg",
            "climbs out",
        ),
        ("absolute.tgz", absolute_name.as_str(), "absolute"),
    ] {
        let data = tmp.path().join("data");
        let err = fetch(
            &DatasetSpec::Flowers,
            &options(&data, server.url(name), Some(shas[name].clone())),
        )
        .unwrap_err();
        assert!(
            matches!(&err, DataError::ArchiveEntry { entry: e, reason, .. }
                if e == entry && reason.contains(why)),
            "{name}: {err}"
        );
        assert!(err
            .to_string()
            .contains("nothing from the archive was placed"));
        assert_eq!(names(&data), Vec::<String>::new(), "{name}: nothing placed");
        assert_eq!(names(tmp.path()), vec!["data", "outside"], "{name}");
        assert_eq!(names(&outside), Vec::<String>::new(), "{name}");
    }

    // Links are never created: the archive is placed without them.
    let linked = with(Entry::Symlink(
        "flower_photos/daisy/passwd.jpg".into(),
        "/etc/passwd".into(),
    ));
    let mut entries = flower_entries();
    entries.push(Entry::Symlink(
        "flower_photos/escape".into(),
        outside.display().to_string(),
    ));
    entries.push(Entry::File(
        "flower_photos/escape/written-through-link.jpg".into(),
        jpeg(4),
    ));
    let through = tgz(&entries);
    let server = Server::start(HashMap::from([
        ("linked.tgz".to_string(), linked.clone()),
        ("through.tgz".to_string(), through.clone()),
    ]));
    for (name, bytes) in [("linked.tgz", &linked), ("through.tgz", &through)] {
        let data = tmp.path().join(name.replace(".tgz", ""));
        let report = fetch(
            &DatasetSpec::Flowers,
            &options(&data, server.url(name), Some(sha256_hex(bytes))),
        )
        .unwrap();
        assert!(
            report.notes.iter().any(|n| n.contains("not extracted")),
            "{report}"
        );
        let placed = walk(&data);
        assert!(placed.iter().all(|(_, link)| !link), "{placed:?}");
        assert!(!data.join("flowers/daisy/passwd.jpg").exists());
        assert_eq!(names(&outside), Vec::<String>::new(), "{name}");
        let index = ddpm_data::folder::scan(&data.join("flowers")).unwrap();
        let counts: HashMap<&str, usize> = index
            .classes
            .iter()
            .map(String::as_str)
            .zip(index.class_counts())
            .collect();
        for (i, class) in CLASSES.iter().enumerate() {
            assert_eq!(counts[class], i + 2, "{name}: {class}");
        }
    }
    // The file under the skipped link landed in a plain folder inside the data set.
    let escaped = tmp
        .path()
        .join("through/flowers/escape/written-through-link.jpg");
    assert!(std::fs::symlink_metadata(&escaped).unwrap().is_file());
}
