//! Tests of the archive paths that need a checksum other than the pinned one.

use super::*;
use std::io::Write;

fn tar_gz(path: &Path, files: &[(String, Vec<u8>)]) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut builder = tar::Builder::new(gz);
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder
        .into_inner()
        .unwrap()
        .finish()
        .unwrap()
        .flush()
        .unwrap();
}

fn md5_of(path: &Path) -> String {
    checksum::digest_file(path, true, false)
        .unwrap()
        .md5
        .unwrap()
}

fn quiet(data_dir: &Path) -> FetchOptions {
    FetchOptions {
        progress: false,
        backoff: Duration::from_millis(1),
        ..FetchOptions::new(data_dir)
    }
}

#[test]
fn cifar_archives_are_extracted_into_the_canonical_layout() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join(CIFAR10_ARCHIVE);
    let mut files: Vec<(String, Vec<u8>)> = cifar::TRAIN_FILES
        .iter()
        .chain([&cifar::TEST_FILE])
        .enumerate()
        .map(|(i, name)| {
            let mut record = vec![i as u8; cifar::RECORD_LEN];
            record[0] = (i % 10) as u8;
            (format!("{}/{name}", cifar::BATCH_DIR), record.repeat(2))
        })
        .collect();
    files.push((
        format!("{}/batches.meta.txt", cifar::BATCH_DIR),
        b"airplane\n".to_vec(),
    ));
    tar_gz(&archive, &files);
    let data = dir.path().join("data");
    let opts = quiet(&data);
    let expected = vec![Checksum::Md5(md5_of(&archive))];
    let report = fetch_cifar_archive(
        &opts,
        vec![Location::Path(archive.clone())],
        expected.clone(),
    )
    .unwrap();
    assert_eq!(report.outcome, FetchOutcome::Fetched);
    assert_eq!(report.files, 7);
    let batch = cifar::read_batch(
        &data
            .join("cifar10")
            .join(cifar::BATCH_DIR)
            .join("data_batch_3.bin"),
    )
    .unwrap();
    assert_eq!(batch.labels, vec![2, 2]);
    let ds = crate::Dataset::open(
        &DatasetSpec::Cifar10,
        &crate::DataConfig::with_root(&data),
        crate::Split::Test,
    )
    .unwrap();
    assert_eq!(ds.len(), 2);
    // Only the placed data set is left in the data directory.
    let names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["cifar10"]);
    assert!(is_fetched(&DatasetSpec::Cifar10, &data));
    // A second run is a no-op.
    let again =
        fetch_cifar_archive(&opts, vec![Location::Path(archive.clone())], expected).unwrap();
    assert_eq!(again.outcome, FetchOutcome::AlreadyPresent);

    // An archive without the batches is refused and nothing is placed.
    let other = dir.path().join("other.tar.gz");
    tar_gz(&other, &[("README".to_string(), b"hello".to_vec())]);
    let data2 = dir.path().join("data2");
    let err = fetch_cifar_archive(
        &quiet(&data2),
        vec![Location::Path(other.clone())],
        vec![Checksum::Md5(md5_of(&other))],
    )
    .unwrap_err();
    assert!(matches!(err, DataError::ArchiveLayout { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&data2).unwrap().count(), 0);
}

#[test]
fn flowers_archives_need_a_checksum_and_land_as_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let unpinned = FetchOptions {
        flowers_url: Some("http://127.0.0.1:9/other.tgz".to_string()),
        ..quiet(&data)
    };
    let err = fetch(&DatasetSpec::Flowers, &unpinned).unwrap_err();
    assert!(matches!(err, DataError::NoChecksum { .. }), "{err}");
    assert!(!data.exists(), "nothing is created without a checksum");

    let mut png = Vec::new();
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let archive = dir.path().join("my_flowers.tgz");
    tar_gz(
        &archive,
        &[
            ("flower_photos/LICENSE.txt".to_string(), b"cc-by".to_vec()),
            ("flower_photos/daisy/a.png".to_string(), png.clone()),
            ("flower_photos/roses/b.png".to_string(), png.clone()),
            ("flower_photos/roses/c.png".to_string(), png),
        ],
    );
    let sha = checksum::digest_file(&archive, false, true)
        .unwrap()
        .sha256
        .unwrap();
    let opts = FetchOptions {
        flowers_url: Some(archive.display().to_string()),
        flowers_sha256: Some(sha.to_uppercase()),
        ..quiet(&data)
    };
    let report = fetch(&DatasetSpec::Flowers, &opts).unwrap();
    assert_eq!(report.files, 4, "three images and the licence");
    assert_eq!(
        std::fs::read(data.join("flowers/LICENSE.txt")).unwrap(),
        b"cc-by"
    );
    let index = folder::scan(&data.join("flowers")).unwrap();
    assert_eq!(index.classes, vec!["daisy", "roses"]);
    assert_eq!(index.class_counts(), vec![1, 2]);

    let wrong = FetchOptions {
        flowers_sha256: Some("0".repeat(64)),
        data_dir: dir.path().join("data3"),
        ..opts
    };
    let err = fetch(&DatasetSpec::Flowers, &wrong).unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("data3")).unwrap().count(),
        0
    );
}

#[test]
fn sources_parse_from_text() {
    assert_eq!(
        Source::parse("http://h:1/x"),
        Source::Url("http://h:1/x".into())
    );
    assert_eq!(
        Source::parse("../mirror/data"),
        Source::Dir("../mirror/data".into())
    );
    assert_eq!(Source::parse("file:///m"), Source::Dir("/m".into()));
    assert_eq!(
        Source::Url("http://h/".into()).locate("flowers", "rose/a b.jpg"),
        Some(Location::Url("http://h/flowers/rose/a%20b.jpg".into()))
    );
    assert!(is_fetched(
        &DatasetSpec::Folder(std::env::temp_dir()),
        Path::new("nowhere")
    ));
    assert!(matches!(
        fetch(&DatasetSpec::Folder("x".into()), &FetchOptions::new("d")),
        Err(DataError::NotFetchable(_))
    ));
}

#[test]
fn the_default_flowers_archive_is_pinned() {
    assert_eq!(
        FLOWERS_URL,
        "http://download.tensorflow.org/example_images/flower_photos.tgz"
    );
    assert_eq!(FLOWERS_URLS[0], FLOWERS_URL);
    assert!(FLOWERS_URLS[1].ends_with("/download.tensorflow.org/example_images/flower_photos.tgz"));
    assert_eq!(FLOWERS_SIZE, 228_813_984);
    assert_eq!(
        FLOWERS_SHA256,
        "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
    );
    assert_eq!(FLOWERS_CLASSES.iter().map(|c| c.1).sum::<usize>(), 3_670);

    let opts = quiet(Path::new("d"));
    let default = flowers_archive(&opts).unwrap();
    assert_eq!(
        default,
        FlowersArchive {
            locations: FLOWERS_URLS
                .iter()
                .map(|u| Location::Url(u.to_string()))
                .collect(),
            sha256: FLOWERS_SHA256.to_string(),
            size: Some(FLOWERS_SIZE),
        }
    );
    // A pinned URL alone keeps the pinned checksum and size.
    let one = FetchOptions {
        flowers_url: Some(FLOWERS_URLS[1].to_string()),
        ..opts.clone()
    };
    let one = flowers_archive(&one).unwrap();
    assert_eq!((one.locations.len(), one.size), (1, Some(FLOWERS_SIZE)));
    // Another archive with its checksum: no size is pinned; the checksum is lowercased.
    let other = FetchOptions {
        flowers_url: Some("/some/flowers.tgz".to_string()),
        flowers_sha256: Some("AB".repeat(32)),
        ..opts.clone()
    };
    let other = flowers_archive(&other).unwrap();
    assert_eq!(
        other,
        FlowersArchive {
            locations: vec![Location::Path("/some/flowers.tgz".into())],
            sha256: "ab".repeat(32),
            size: None,
        }
    );
    let bad = FetchOptions {
        flowers_sha256: Some("xyz".to_string()),
        ..opts
    };
    assert!(matches!(flowers_archive(&bad), Err(DataError::Config(_))));
}
