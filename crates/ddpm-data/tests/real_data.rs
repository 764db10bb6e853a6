//! Readers, transforms and the loader on the real MNIST test split and Flowers set in
//! `../shared/data`, and CIFAR-10 batches written here in the exact binary format.

use std::io::Read;
use std::path::PathBuf;

use ddpm_data::{
    cifar, folder, transform, DataConfig, DataError, Dataset, DatasetSpec, Loader, Split,
};

fn shared() -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"));
    assert!(
        path.is_dir(),
        "the real data sets are expected in {}",
        path.display()
    );
    path
}

fn config() -> DataConfig {
    DataConfig::with_root(shared())
}

/// Decompresses a file independently of the crate's reader.
fn gunzip(path: PathBuf) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn mnist_test_split_counts_labels_and_pixels() {
    let ds = Dataset::open(&DatasetSpec::Mnist, &config(), Split::All).unwrap();
    assert_eq!(ds.len(), 10_000);
    assert_eq!(
        (ds.channels(), ds.image_size(), ds.num_classes()),
        (1, 28, 10)
    );
    assert!(!ds.flip(), "MNIST is not flipped by default");
    let mut histogram = [0usize; 10];
    for &l in ds.labels() {
        histogram[l as usize] += 1;
    }
    assert_eq!(
        histogram,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );

    // Independent decode: gunzip, then the IDX layout by hand. Images: a 16-byte header (magic,
    // count, rows, cols), then 784 bytes per image, row-major. Labels: an 8-byte header.
    let images = gunzip(shared().join("mnist/t10k-images-idx3-ubyte.gz"));
    let labels = gunzip(shared().join("mnist/t10k-labels-idx1-ubyte.gz"));
    assert_eq!(images.len(), 16 + 10_000 * 784);
    // Image 0 is a 7; its pixel at row 10, column 20 lies on the down stroke (value 254, as
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
    let (i, r, c) = (9_999usize, 14usize, 13usize);
    assert_eq!(
        ds.image_u8(i).unwrap()[r * 28 + c],
        images[16 + i * 784 + r * 28 + c]
    );
    assert_eq!(ds.labels()[i], u32::from(labels[8 + i]));
}

#[test]
fn mnist_without_training_files_holds_out_the_last_2000() {
    let all = Dataset::open(&DatasetSpec::Mnist, &config(), Split::All).unwrap();
    let train = Dataset::open(&DatasetSpec::Mnist, &config(), Split::Train).unwrap();
    let test = Dataset::open(&DatasetSpec::Mnist, &config(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (8_000, 2_000));
    assert_eq!(train.image_u8(0).unwrap(), all.image_u8(0).unwrap());
    assert_eq!(train.image_u8(7_999).unwrap(), all.image_u8(7_999).unwrap());
    assert_eq!(test.image_u8(0).unwrap(), all.image_u8(8_000).unwrap());
    assert_eq!(test.labels(), &all.labels()[8_000..]);

    // Resizing on request: 28 -> 32, values stay in range.
    let cfg = DataConfig {
        image_size: Some(32),
        ..config()
    };
    let resized = Dataset::open(&DatasetSpec::Mnist, &cfg, Split::Test).unwrap();
    assert_eq!((resized.len(), resized.image_size()), (2_000, 32));
    let img = resized.image(0).unwrap();
    assert_eq!(img.len(), 32 * 32);
    assert!(img.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn flowers_class_counts_and_fixed_holdout() {
    let index = folder::scan(&shared().join("flowers")).unwrap();
    assert_eq!(
        index.classes,
        vec!["daisy", "dandelion", "rose", "sunflower", "tulip"]
    );
    assert_eq!(index.class_counts(), vec![764, 1052, 784, 733, 984]);
    assert_eq!(index.files.len(), 4_317);
    let test = index.split(Split::Test);
    let train = index.split(Split::Train);
    assert_eq!(test.len(), 76 + 105 + 78 + 73 + 98);
    assert_eq!(train.len() + test.len(), 4_317);
    assert!(test.iter().all(|f| !train.contains(f)));
}

#[test]
fn flowers_decode_all_4317_images_at_32_and_batch_them() {
    let spec = DatasetSpec::Folder(shared().join("flowers"));
    let ds = Dataset::open(&spec, &config(), Split::All).unwrap();
    assert_eq!(ds.len(), 4_317);
    assert_eq!(ds.skipped_count(), 0);
    assert_eq!(
        (ds.channels(), ds.image_size(), ds.num_classes()),
        (3, 32, 5)
    );
    assert!(ds.flip(), "natural images are flipped by default");
    let mut counts = [0usize; 5];
    for &l in ds.labels() {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [764, 1052, 784, 733, 984]);

    let mut loader = Loader::new(ds, 128, 3, true, 2).unwrap();
    assert_eq!(loader.batches_per_epoch(), 33);
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
fn flowers_images_at_native_size_match_an_independent_decode() {
    // The Flowers copies are 128x128, so at image_size 128 no resize happens and the cached planes
    // must equal the JPEG decoded directly.
    let cfg = DataConfig {
        image_size: Some(128),
        ..config()
    };
    let ds = Dataset::open(&DatasetSpec::Flowers, &cfg, Split::Test).unwrap();
    assert_eq!(ds.len(), 430);
    let index = folder::scan(&shared().join("flowers")).unwrap();
    let (path, label) = &index.split(Split::Test)[100];
    let direct = image::open(path).unwrap().to_rgb8();
    assert_eq!(direct.dimensions(), (128, 128));
    let planes = ds.image_u8(100).unwrap();
    assert_eq!(ds.labels()[100], *label);
    for (x, y) in [(0u32, 0u32), (64, 64), (127, 5), (3, 120)] {
        let px = direct.get_pixel(x, y);
        let i = (y * 128 + x) as usize;
        assert_eq!(
            [planes[i], planes[16_384 + i], planes[32_768 + i]],
            px.0,
            "pixel ({x},{y})"
        );
    }
    // Downscaled to 32 the image is the antialiased bicubic resize of the same decode.
    let small = transform::resize_square(&direct, 32);
    let ds32 = Dataset::open(&DatasetSpec::Flowers, &config(), Split::Test).unwrap();
    assert_eq!(
        ds32.image_u8(100).unwrap(),
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
fn truncated_and_corrupt_mnist_copies_give_the_right_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    let images = std::fs::read(shared().join("mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let labels = std::fs::read(shared().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
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
    let raw = gunzip(shared().join("mnist/t10k-images-idx3-ubyte.gz"));
    std::fs::remove_file(mnist.join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(
        mnist.join("t10k-images-idx3-ubyte"),
        &raw[..raw.len() - 784],
    )
    .unwrap();
    match open() {
        Err(e @ DataError::Truncated { .. }) => {
            assert!(e.to_string().contains("t10k-images-idx3-ubyte"), "{e}");
            assert!(matches!(
                e,
                DataError::Truncated {
                    expected: 7_840_016,
                    found: 7_839_232,
                    ..
                }
            ));
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
    bad[4..8].copy_from_slice(&9_999u32.to_be_bytes());
    std::fs::write(mnist.join("t10k-images-idx3-ubyte"), &bad).unwrap();
    assert!(matches!(
        open(),
        Err(DataError::CountMismatch {
            images: 9_999,
            labels: 10_000,
            ..
        })
    ));
}

#[test]
fn corrupt_images_in_a_folder_stop_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    for class in ["daisy", "tulip"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        let index = folder::scan(&shared().join("flowers")).unwrap();
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
