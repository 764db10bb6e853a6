//! Readers, transforms and the loader on real images: the committed fixtures (500 MNIST test
//! images, 50 Flowers JPEGs; `crates/ddpm-data/fixtures`), CIFAR-10 batches written here in the
//! exact binary format, and, in the real-data suite (`cargo xtask test-real`, tests marked
//! `#[ignore]`), the whole MNIST and Flowers sets fetched through the verified fetch path.

use std::io::Read;
use std::path::{Path, PathBuf};

use ddpm_data::{
    cifar, folder, transform, DataConfig, DataError, Dataset, DatasetSpec, Loader, Split,
};

/// The fetched real data sets (`DDPM_REAL_DATA`, set by `cargo xtask test-real`); fails with one
/// line saying how to get them.
fn real() -> PathBuf {
    match std::env::var_os("DDPM_REAL_DATA") {
        Some(dir) if Path::new(&dir).join("mnist").is_dir() => PathBuf::from(dir),
        _ => panic!(
            "this test reads the real data sets: run it with `cargo xtask test-real` (fetches \
             MNIST and Flowers into data/; offline: set DDPM_DATA_MIRROR=DIR to a mirror)"
        ),
    }
}

/// The committed fixtures.
fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures"))
}

/// The gzip-compressed t10k image and label files: the fixture's, or the real ones.
fn fixture_mnist() -> (PathBuf, PathBuf) {
    let m = fixtures().join("mnist");
    (m.join("images.idx3.gz"), m.join("labels.idx1.gz"))
}

fn real_mnist() -> (PathBuf, PathBuf) {
    let m = real().join("mnist");
    (
        m.join("t10k-images-idx3-ubyte.gz"),
        m.join("t10k-labels-idx1-ubyte.gz"),
    )
}

/// A data root whose `mnist/` holds only the given t10k pair, under MNIST's names (so the reader
/// serves the fixed hold-out of them, whatever else the source has).
fn t10k_root((images, labels): &(PathBuf, PathBuf)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    std::fs::copy(images, mnist.join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::copy(labels, mnist.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    dir
}

/// Decompresses a file independently of the crate's reader.
fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The label histogram of an IDX label file, counted by hand (8-byte header, one byte a label).
fn label_histogram(labels: &[u8]) -> [usize; 10] {
    let mut h = [0usize; 10];
    for &l in &labels[8..] {
        h[l as usize] += 1;
    }
    h
}

#[test]
fn mnist_fixture_counts_labels_and_pixels() {
    let (n, histogram) = check_mnist_t10k(&fixture_mnist());
    // The fixture is the first 50 images of each digit of t10k (`cargo xtask make-fixtures`).
    assert_eq!((n, histogram), (500, [50; 10]));
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn mnist_test_split_counts_labels_and_pixels() {
    let (n, histogram) = check_mnist_t10k(&real_mnist());
    assert_eq!(n, 10_000);
    assert_eq!(
        histogram,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
}

/// Opens the t10k pair through the reader and compares it with an independent decode; returns
/// the image count and the reader's label histogram.
fn check_mnist_t10k(files: &(PathBuf, PathBuf)) -> (usize, [usize; 10]) {
    let root = t10k_root(files);
    let config = DataConfig::with_root(root.path());
    let ds = Dataset::open(&DatasetSpec::Mnist, &config, Split::All).unwrap();
    assert_eq!(
        (ds.channels(), ds.image_size(), ds.num_classes()),
        (1, 28, 10)
    );
    assert!(!ds.flip(), "MNIST is not flipped by default");
    let mut histogram = [0usize; 10];
    for &l in ds.labels() {
        histogram[l as usize] += 1;
    }

    // Independent decode: gunzip, then the IDX layout by hand. Images: a 16-byte header (magic,
    // count, rows, cols), then 784 bytes per image, row-major. Labels: an 8-byte header.
    let images = gunzip(&files.0);
    let labels = gunzip(&files.1);
    let n = ds.len();
    assert_eq!(images.len(), 16 + n * 784);
    assert_eq!(label_histogram(&labels), histogram);
    // Image 0 (of t10k, and so of the fixture) is a 7; its pixel at row 10, column 20 lies on the
    // down stroke (value 254, as
    // `python3 -c "import gzip; print(gzip.open(F).read()[16 + 10 * 28 + 20])"` also prints).
    let (i, r, c) = (0usize, 10usize, 20usize);
    let offset = 16 + i * 784 + r * 28 + c;
    assert_eq!(labels[8 + i], 7);
    assert_eq!(ds.labels()[i], 7);
    let byte = images[offset];
    assert_eq!(byte, 254, "the known pixel of image 0");
    assert_eq!(ds.image_u8(i).unwrap()[r * 28 + c], byte);
    assert_eq!(
        ds.image(i).unwrap()[r * 28 + c],
        byte as f32 / 255.0 * 2.0 - 1.0
    );
    // A pixel of the last image too.
    let (i, r, c) = (n - 1, 14usize, 13usize);
    assert_eq!(
        ds.image_u8(i).unwrap()[r * 28 + c],
        images[16 + i * 784 + r * 28 + c]
    );
    assert_eq!(ds.labels()[i], u32::from(labels[8 + i]));
    (n, histogram)
}

#[test]
fn mnist_fixture_without_training_files_holds_out_the_last_fifth() {
    check_mnist_holdout(&fixture_mnist(), 400, 100);
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn mnist_without_training_files_holds_out_the_last_2000() {
    check_mnist_holdout(&real_mnist(), 8_000, 2_000);
}

fn check_mnist_holdout(files: &(PathBuf, PathBuf), n_train: usize, n_test: usize) {
    let root = t10k_root(files);
    let config = || DataConfig::with_root(root.path());
    let all = Dataset::open(&DatasetSpec::Mnist, &config(), Split::All).unwrap();
    let train = Dataset::open(&DatasetSpec::Mnist, &config(), Split::Train).unwrap();
    let test = Dataset::open(&DatasetSpec::Mnist, &config(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (n_train, n_test));
    assert_eq!(train.image_u8(0).unwrap(), all.image_u8(0).unwrap());
    let last = n_train - 1;
    assert_eq!(train.image_u8(last).unwrap(), all.image_u8(last).unwrap());
    assert_eq!(test.image_u8(0).unwrap(), all.image_u8(n_train).unwrap());
    assert_eq!(test.labels(), &all.labels()[n_train..]);

    // Resizing on request: 28 -> 32, values stay in range.
    let cfg = DataConfig {
        image_size: Some(32),
        ..config()
    };
    let resized = Dataset::open(&DatasetSpec::Mnist, &cfg, Split::Test).unwrap();
    assert_eq!((resized.len(), resized.image_size()), (n_test, 32));
    let img = resized.image(0).unwrap();
    assert_eq!(img.len(), 32 * 32);
    assert!(img.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn mnist_training_files_when_fetched_from_upstream() {
    // Upstream MNIST has the 60,000-image training split; our mirror has only t10k (then the
    // hold-out above applies, and the loader is checked on it there).
    let mnist = real().join("mnist");
    if !mnist.join("train-images-idx3-ubyte.gz").is_file() {
        assert!(
            !mnist.join("train-labels-idx1-ubyte.gz").exists(),
            "train labels without train images in {}",
            mnist.display()
        );
        eprintln!("the real MNIST here is the t10k split only: no training files to check");
        return;
    }
    let config = DataConfig::with_root(real());
    let train = Dataset::open(&DatasetSpec::Mnist, &config, Split::Train).unwrap();
    let test = Dataset::open(&DatasetSpec::Mnist, &config, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    let labels = gunzip(&mnist.join("train-labels-idx1-ubyte.gz"));
    let mut histogram = [0usize; 10];
    for &l in train.labels() {
        histogram[l as usize] += 1;
    }
    assert_eq!(histogram, label_histogram(&labels));
    assert_eq!(
        histogram,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
}

/// The Flowers sets we know: the 4,317-image "Flowers Recognition" set (our mirror, 128x128
/// copies) and TensorFlow's `flower_photos` (the default upstream archive, 3,670 images).
fn known_flowers(classes: &[String]) -> Vec<usize> {
    let names: Vec<&str> = classes.iter().map(String::as_str).collect();
    match names.as_slice() {
        ["daisy", "dandelion", "rose", "sunflower", "tulip"] => vec![764, 1052, 784, 733, 984],
        ["daisy", "dandelion", "roses", "sunflowers", "tulips"] => vec![633, 898, 641, 699, 799],
        other => panic!("not a Flowers set we know: classes {other:?}"),
    }
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn flowers_class_counts_and_fixed_holdout() {
    let index = folder::scan(&real().join("flowers")).unwrap();
    let counts = known_flowers(&index.classes);
    assert_eq!(index.class_counts(), counts);
    let total: usize = counts.iter().sum();
    assert_eq!(index.files.len(), total);
    let test = index.split(Split::Test);
    let train = index.split(Split::Train);
    // Every 10th file of each class (positions 9, 19, ...): for the 4,317-image set 76 + 105 +
    // 78 + 73 + 98.
    let held_out: usize = counts.iter().map(|n| n / 10).sum();
    assert_eq!(test.len(), held_out);
    assert_eq!(train.len() + test.len(), total);
    assert!(test.iter().all(|f| !train.contains(f)));
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn flowers_decode_all_images_at_32_and_batch_them() {
    let spec = DatasetSpec::Folder(real().join("flowers"));
    let ds = Dataset::open(&spec, &DataConfig::with_root(real()), Split::All).unwrap();
    let index = folder::scan(&real().join("flowers")).unwrap();
    let expected = known_flowers(&index.classes);
    let total: usize = expected.iter().sum();
    assert_eq!(ds.len(), total);
    assert_eq!(ds.skipped_count(), 0);
    assert_eq!(
        (ds.channels(), ds.image_size(), ds.num_classes()),
        (3, 32, 5)
    );
    assert!(ds.flip(), "natural images are flipped by default");
    let mut counts = vec![0usize; 5];
    for &l in ds.labels() {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, expected);

    let mut loader = Loader::new(ds, 128, 3, true, 2).unwrap();
    assert_eq!(loader.batches_per_epoch(), total / 128);
    let batch = loader.next_batch().unwrap();
    assert_eq!(batch.images.dims(), &[128, 3, 32, 32]);
    let min = batch.images.min_all().unwrap().to_scalar::<f32>().unwrap();
    let max = batch.images.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        (-1.0..-0.5).contains(&min) && (0.5..=1.0).contains(&max),
        "{min} {max}"
    );
}

#[test]
fn flowers_fixture_images_match_an_independent_decode() {
    // 10 images a class, so the test split is image 9 of each: 5 images.
    check_flowers_decode(&fixtures().join("flowers"), 5, 3);
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn flowers_images_match_an_independent_decode() {
    let root = real().join("flowers");
    let index = folder::scan(&root).unwrap();
    let held_out: usize = known_flowers(&index.classes).iter().map(|n| n / 10).sum();
    check_flowers_decode(&root, held_out, 100);
}

/// Image `k` of the test split of the Flowers folder `root` (which has `n_test` test images)
/// equals the JPEG decoded directly: exactly at its native size when it is square, and as the
/// antialiased bicubic resize of the same decode at 32.
fn check_flowers_decode(root: &Path, n_test: usize, k: usize) {
    let spec = DatasetSpec::Folder(root.to_path_buf());
    let index = folder::scan(root).unwrap();
    let (path, label) = &index.split(Split::Test)[k];
    let direct = image::open(path).unwrap().to_rgb8();
    let (w, h) = direct.dimensions();
    if w == h {
        // No resize happens at the native size: the cached planes are the decode itself.
        let side = w as usize;
        let cfg = DataConfig {
            image_size: Some(side),
            ..DataConfig::with_root(root)
        };
        let ds = Dataset::open(&spec, &cfg, Split::Test).unwrap();
        assert_eq!(ds.len(), n_test);
        let planes = ds.image_u8(k).unwrap();
        assert_eq!(ds.labels()[k], *label);
        let plane = side * side;
        for (x, y) in [(0u32, 0u32), (w / 2, h / 2), (w - 1, 5), (3, h - 8)] {
            let px = direct.get_pixel(x, y);
            let i = y as usize * side + x as usize;
            assert_eq!(
                [planes[i], planes[plane + i], planes[2 * plane + i]],
                px.0,
                "pixel ({x},{y})"
            );
        }
    }
    // Downscaled to 32 the image is the antialiased bicubic resize of the same decode.
    let small = transform::resize_square(&direct, 32);
    let ds32 = Dataset::open(&spec, &DataConfig::with_root(root), Split::Test).unwrap();
    assert_eq!(ds32.len(), n_test);
    assert_eq!(ds32.labels()[k], *label);
    assert_eq!(
        ds32.image_u8(k).unwrap(),
        transform::rgb_to_chw(&small).as_slice()
    );
}

#[test]
fn cifar10_batches_in_the_canonical_format() {
    let dir = tempfile::tempdir().unwrap();
    let batch_dir = dir.path().join("cifar10").join(cifar::BATCH_DIR);
    std::fs::create_dir_all(&batch_dir).unwrap();
    // A full-size test batch (10,000 records) and small training batches.
    let image = |k: usize| -> Vec<u8> {
        (0..cifar::IMAGE_LEN)
            .map(|j| ((j * 31 + k * 7) % 256) as u8)
            .collect()
    };
    let test_labels: Vec<u8> = (0..10_000).map(|k| (k % 10) as u8).collect();
    let test_pixels: Vec<u8> = (0..10_000).flat_map(image).collect();
    cifar::write_batch(
        &batch_dir.join(cifar::TEST_FILE),
        &test_labels,
        &test_pixels,
    )
    .unwrap();
    for (b, name) in cifar::TRAIN_FILES.iter().enumerate() {
        let labels: Vec<u8> = (0..3).map(|k| ((b + k) % 10) as u8).collect();
        let pixels: Vec<u8> = (0..3).flat_map(|k| image(100 * b + k)).collect();
        cifar::write_batch(&batch_dir.join(name), &labels, &pixels).unwrap();
    }
    let cfg = DataConfig::with_root(dir.path());
    let test = Dataset::open(&DatasetSpec::Cifar10, &cfg, Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!((test.channels(), test.image_size()), (3, 32));
    assert_eq!(test.class_names()[3], "cat");
    assert!(test.flip());
    // Record 1234 on disk: label byte at 1234 * 3073, then R, G, B planes; G(5, 7) is at
    // 1 + 1024 + 5 * 32 + 7 within the record.
    let raw = std::fs::read(batch_dir.join(cifar::TEST_FILE)).unwrap();
    let rec = 1234 * 3073;
    assert_eq!(test.labels()[1234], u32::from(raw[rec]));
    assert_eq!(
        test.image_u8(1234).unwrap()[1024 + 5 * 32 + 7],
        raw[rec + 1 + 1024 + 5 * 32 + 7]
    );

    let train = Dataset::open(&DatasetSpec::Cifar10, &cfg, Split::Train).unwrap();
    assert_eq!(train.len(), 15);
    assert_eq!(train.image_u8(4).unwrap(), image(101).as_slice());
    let cfg16 = DataConfig {
        image_size: Some(16),
        flip: Some(false),
        ..cfg.clone()
    };
    let small = Dataset::open(&DatasetSpec::Cifar10, &cfg16, Split::Train).unwrap();
    assert_eq!(
        (
            small.image_size(),
            small.image(0).unwrap().len(),
            small.flip()
        ),
        (16, 768, false)
    );

    // Truncated and corrupted variants.
    let path = batch_dir.join(cifar::TRAIN_FILES[1]);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    match Dataset::open(&DatasetSpec::Cifar10, &cfg, Split::Train) {
        Err(e @ DataError::RecordLength { .. }) => {
            assert!(e.to_string().contains("data_batch_2.bin"))
        }
        other => panic!("expected RecordLength, got {other:?}"),
    }
    let mut bad = good.clone();
    bad[3073] = 77;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        Dataset::open(&DatasetSpec::Cifar10, &cfg, Split::Train),
        Err(DataError::BadLabel {
            index: 1,
            label: 77,
            ..
        })
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        Dataset::open(&DatasetSpec::Cifar10, &cfg, Split::Train),
        Err(DataError::MissingFile { .. })
    ));
}

#[test]
fn truncated_and_corrupt_mnist_fixture_copies_give_the_right_errors() {
    check_truncated_and_corrupt(&fixture_mnist(), 500);
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn truncated_and_corrupt_mnist_copies_give_the_right_errors() {
    check_truncated_and_corrupt(&real_mnist(), 10_000);
}

/// Damaged copies of the `n`-image t10k pair `files`: each damage gives its own error.
fn check_truncated_and_corrupt(files: &(PathBuf, PathBuf), n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    let images = std::fs::read(&files.0).unwrap();
    let labels = std::fs::read(&files.1).unwrap();
    let cfg = DataConfig::with_root(dir.path());
    let open = || Dataset::open(&DatasetSpec::Mnist, &cfg, Split::Test);

    std::fs::write(mnist.join("t10k-labels-idx1-ubyte.gz"), &labels).unwrap();
    assert!(
        matches!(open(), Err(DataError::MissingFile { path, .. }) if path.ends_with("t10k-images-idx3-ubyte.gz"))
    );

    // A gzip stream cut in half.
    std::fs::write(
        mnist.join("t10k-images-idx3-ubyte.gz"),
        &images[..images.len() / 2],
    )
    .unwrap();
    assert!(matches!(open(), Err(DataError::Gzip { .. })));

    // Decompressed, then cut: a whole IDX file that is too short for its header.
    let raw = gunzip(&files.0);
    std::fs::remove_file(mnist.join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(
        mnist.join("t10k-images-idx3-ubyte"),
        &raw[..raw.len() - 784],
    )
    .unwrap();
    match open() {
        Err(e @ DataError::Truncated { .. }) => {
            assert!(e.to_string().contains("t10k-images-idx3-ubyte"), "{e}");
            // 16 header bytes and 784 per image; one image short.
            let expected = 16 + 784 * n as u64;
            assert!(
                matches!(e, DataError::Truncated { expected: x, found: f, .. } if x == expected && f == expected - 784),
                "{e:?}"
            );
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Wrong magic number.
    let mut bad = raw.clone();
    bad[3] = 0x01;
    std::fs::write(mnist.join("t10k-images-idx3-ubyte"), &bad).unwrap();
    assert!(matches!(
        open(),
        Err(DataError::BadMagic { found: 0x0801, .. })
    ));
    // A count that disagrees with the labels.
    let mut bad = raw[..raw.len() - 784].to_vec();
    bad[4..8].copy_from_slice(&(n as u32 - 1).to_be_bytes());
    std::fs::write(mnist.join("t10k-images-idx3-ubyte"), &bad).unwrap();
    let found = open();
    assert!(
        matches!(found, Err(DataError::CountMismatch { images, labels, .. }) if images == n - 1 && labels == n),
        "{found:?}"
    );
}

#[test]
fn corrupt_images_in_a_folder_stop_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    for class in ["daisy", "tulip"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        let index = folder::scan(&fixtures().join("flowers")).unwrap();
        for (path, _) in index
            .files
            .iter()
            .filter(|(p, _)| p.parent().unwrap().ends_with(class))
            .take(4)
        {
            std::fs::copy(path, root.join(class).join(path.file_name().unwrap())).unwrap();
        }
    }
    let bad = root.join("tulip/zz_broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 definitely not a jpeg").unwrap();
    let spec = DatasetSpec::Folder(root.clone());
    let config = || DataConfig::with_root(dir.path());
    let err = Dataset::open(&spec, &config(), Split::All).unwrap_err();
    assert!(
        matches!(&err, DataError::Decode { path, .. } if path == &bad),
        "{err}"
    );
    assert!(err.to_string().contains("zz_broken.jpg"));
    let cfg = DataConfig {
        skip_corrupt: true,
        ..config()
    };
    let ds = Dataset::open(&spec, &cfg, Split::All).unwrap();
    assert_eq!((ds.len(), ds.skipped_count()), (8, 1));
    assert_eq!(ds.skipped(), &[bad]);
}
