//! Fashion-MNIST without the network: small IDX files written here in its layout (MNIST's file
//! names, in `fashion-mnist/`) are used as hand-placed data, and a server on 127.0.0.1 (or a mirror
//! directory) serving them is refused, because they cannot match the pinned checksums.
//!
//! A good download is not tested here: the fetch accepts only the publisher's four files (their
//! md5 sums are pinned, from a mirror too), and those are neither in the repository nor in our
//! data mirror, so no offline test can serve them. The code path is MNIST's (`fetch_idx`), whose
//! good, resumed and interrupted downloads the real-data suite tests with the real MNIST files
//! (tests/fetch.rs).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

#[path = "support/file_server.rs"]
mod file_server;
use file_server::Server;

use ddpm_data::fetch::{
    fetch, is_fetched, is_hand_placed, FetchOptions, Source, FASHION_MNIST_FILES,
    FASHION_MNIST_URLS,
};
use ddpm_data::mnist::{
    FASHION_MNIST_CLASSES, IMAGES_MAGIC, LABELS_MAGIC, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES,
    TRAIN_LABELS,
};
use ddpm_data::{DataConfig, DataError, Dataset, DatasetSpec, Split};

/// An IDX file: magic number, big-endian dimensions, payload.
fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The four gzipped files of a small Fashion-MNIST: `train` and `test` 28x28 images whose
/// pixels all equal their label (`i % 10` for image `i`), by file name.
fn small_set(train: usize, test: usize) -> Vec<(String, Vec<u8>)> {
    let pair = |n: usize| {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let pixels: Vec<u8> = labels
            .iter()
            .flat_map(|&l| std::iter::repeat_n(l, 28 * 28))
            .collect();
        (
            gz(&idx(IMAGES_MAGIC, &[n as u32, 28, 28], &pixels)),
            gz(&idx(LABELS_MAGIC, &[n as u32], &labels)),
        )
    };
    let (train_images, train_labels) = pair(train);
    let (test_images, test_labels) = pair(test);
    vec![
        (format!("{TEST_IMAGES}.gz"), test_images),
        (format!("{TEST_LABELS}.gz"), test_labels),
        (format!("{TRAIN_IMAGES}.gz"), train_images),
        (format!("{TRAIN_LABELS}.gz"), train_labels),
    ]
}

fn place(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The names in a directory, sorted (hidden ones included); none when it does not exist.
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

fn options(data: &Path, source: Source) -> FetchOptions {
    FetchOptions {
        source,
        progress: false,
        retries: 1,
        backoff: Duration::from_millis(1),
        timeout: Duration::from_secs(10),
        ..FetchOptions::new(data)
    }
}

#[test]
fn the_pinned_files_and_sources_are_the_publishers() {
    assert_eq!(
        FASHION_MNIST_FILES,
        [
            (
                "t10k-images-idx3-ubyte.gz",
                "bef4ecab320f06d8554ea6380940ec79"
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "bb300cfdad3c16e7a12a480ee83cd310"
            ),
            (
                "train-images-idx3-ubyte.gz",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "25c81989df183df01b3e8a0aad5dffbe"
            ),
        ]
    );
    assert_eq!(
        FASHION_MNIST_URLS,
        [
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ]
    );
    assert_eq!(
        FASHION_MNIST_CLASSES,
        [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot"
        ]
    );
    let spec: DatasetSpec = "fashion-mnist".parse().unwrap();
    assert_eq!(spec, DatasetSpec::FashionMnist);
    assert_eq!(spec.to_string(), "fashion-mnist");
}

#[test]
fn hand_placed_idx_files_are_used_as_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let spec = DatasetSpec::FashionMnist;
    assert!(!is_fetched(&spec, &data));
    let cfg = DataConfig {
        threads: Some(1),
        ..DataConfig::with_root(&data)
    };
    let err = Dataset::open(&spec, &cfg, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
    assert!(
        err.to_string().contains("fetch-data fashion-mnist"),
        "{err}"
    );

    place(&data.join("fashion-mnist"), &small_set(12, 5));
    assert!(is_hand_placed(&spec, &data.join("fashion-mnist")));
    assert!(is_fetched(&spec, &data));
    assert!(
        !is_fetched(&DatasetSpec::Mnist, &data),
        "Fashion-MNIST is not MNIST"
    );

    let train = Dataset::open(&spec, &cfg, Split::Train).unwrap();
    let test = Dataset::open(&spec, &cfg, Split::Test).unwrap();
    assert_eq!(
        (train.len(), train.channels(), train.image_size()),
        (12, 1, 28)
    );
    assert_eq!(test.len(), 5);
    assert_eq!(
        train.class_names(),
        &FASHION_MNIST_CLASSES.map(String::from)[..]
    );
    assert!(train.flip(), "clothes are flipped by default");
    // Image 3 has label 3 (Dress) and every pixel 3.
    assert!(train.image_u8(3).unwrap().iter().all(|&p| p == 3));

    // Resized like MNIST (the LearnOpenCV recipe trains at 32x32).
    let at_32 = DataConfig {
        image_size: Some(32),
        ..cfg.clone()
    };
    let big = Dataset::open(&spec, &at_32, Split::Train).unwrap();
    assert_eq!((big.len(), big.image_size()), (12, 32));
}

#[test]
fn files_that_cannot_match_the_pinned_checksums_are_refused_naming_the_file() {
    let files = small_set(4, 4);
    let first = format!("fashion-mnist/{TEST_IMAGES}.gz");

    // Over HTTP, from a mirror URL laid out as `<mirror>/fashion-mnist/`.
    let served: HashMap<String, Vec<u8>> = files
        .iter()
        .map(|(name, bytes)| (format!("fashion-mnist/{name}"), bytes.clone()))
        .collect();
    let server = Server::start(served);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let err = fetch(
        &DatasetSpec::FashionMnist,
        &options(&data, Source::Url(server.base.clone())),
    )
    .unwrap_err();
    match &err {
        DataError::ChecksumMismatch {
            file,
            algorithm,
            expected,
            ..
        } => {
            assert_eq!(file, &first);
            assert_eq!(
                (*algorithm, expected.as_str()),
                ("md5", "bef4ecab320f06d8554ea6380940ec79")
            );
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&first), "{err}");
    // The server saw the mirror's checksum list asked for, then the first file; nothing more.
    let requests = server.requests();
    assert_eq!(requests.last(), Some(&format!("/{first}")), "{requests:?}");
    assert!(names(&data).is_empty(), "left behind: {:?}", names(&data));
    assert!(!is_fetched(&DatasetSpec::FashionMnist, &data));

    // From a mirror directory: the same refusal.
    let mirror = tmp.path().join("mirror");
    place(&mirror.join("fashion-mnist"), &files);
    let err = fetch(
        &DatasetSpec::FashionMnist,
        &options(&data, Source::Dir(mirror)),
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::ChecksumMismatch { file, .. } if *file == first),
        "{err}"
    );
    assert!(names(&data).is_empty(), "left behind: {:?}", names(&data));
}
