//! Hub data sets (`hf:OWNER/NAME[@REVISION][:SPLIT]`) served by the loopback fake Hub: parquet
//! files made here, found by split, decoded like image folders, pinned to a commit, read
//! offline from the cache, refused when corrupt, and bad rows handled like bad files.

#[path = "support/hub_options.rs"]
mod hub_options;
#[path = "support/hub_parquet.rs"]
mod hub_parquet;
#[path = "support/hub_server.rs"]
mod hub_server;

use std::path::Path;

use ddpm_data::hub_dataset::{self, HubSpec};
use ddpm_data::{DataConfig, DataError, Dataset, DatasetSpec, Loader, Split};
use hub_options::{offline, options};
use hub_parquet::{colour, parquet_file, png, tiny_rows, Row};
use hub_server::{FakeHub, HubFile, Kind};

const NAMES: [&str; 4] = ["cat", "dog", "eel", "fox"];
const TRAIN: &str = "data/train-00000-of-00001.parquet";
const TEST: &str = "data/test-00000-of-00001.parquet";

/// `test/tiny`: 20 training and 4 test images of 4 classes, as `push_to_hub` lays them out.
fn tiny(hub: &FakeHub) -> String {
    hub.publish(
        Kind::Dataset,
        "test/tiny",
        "main",
        vec![
            HubFile::git("README.md", "---\nlicense: mit\n---\n"),
            HubFile::lfs(TRAIN, parquet_file(&tiny_rows(20, 4, false), Some(&NAMES))),
            HubFile::lfs(TEST, parquet_file(&tiny_rows(4, 4, false), Some(&NAMES))),
        ],
    )
}

fn spec(text: &str) -> HubSpec {
    match text.parse::<DatasetSpec>().unwrap() {
        DatasetSpec::Hub(h) => h,
        other => panic!("{other:?}"),
    }
}

fn cfg() -> DataConfig {
    DataConfig {
        threads: Some(2),
        ..DataConfig::default()
    }
}

#[test]
fn a_split_is_read_decoded_and_batched_like_a_folder() {
    let hub = FakeHub::start();
    let commit = tiny(&hub);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let images = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Train, 4, &opts).unwrap();
    assert_eq!(images.commit, commit);
    assert_eq!((images.channels, images.labels.len()), (3, 20));
    assert_eq!(images.class_names, NAMES);
    assert_eq!(images.labels, (0..20).map(|i| i % 4).collect::<Vec<u32>>());
    // Solid colours survive the crop and resize: every pixel of image i is colour(i).
    for (i, img) in images.pixels.chunks_exact(3 * 16).enumerate() {
        for (c, plane) in img.chunks_exact(16).enumerate() {
            let want = colour(i)[c] as i32;
            assert!(
                plane.iter().all(|&v| (v as i32 - want).abs() <= 1),
                "image {i} channel {c}: {plane:?} vs {want}"
            );
        }
    }
    let test = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Test, 4, &opts).unwrap();
    assert_eq!(test.labels.len(), 4);
    let all = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::All, 4, &opts).unwrap();
    assert_eq!(all.labels.len(), 24);
    // The first rows only (what `ddpm forward` draws): those of the whole split.
    let first = hub_dataset::load_first(
        &spec("hf:test/tiny"),
        &cfg(),
        Split::Train,
        4,
        &opts,
        Some(3),
    )
    .unwrap();
    assert_eq!(first.labels, images.labels[..3]);
    assert_eq!(first.pixels, images.pixels[..3 * 3 * 16]);
    let named =
        hub_dataset::load(&spec("hf:test/tiny:test"), &cfg(), Split::Train, 4, &opts).unwrap();
    assert_eq!(named.pixels, test.pixels);

    // Through Dataset::open with the installed options, then the loader.
    ddpm_data::hub::install(opts.clone());
    let cfg = DataConfig {
        image_size: Some(8),
        ..cfg()
    };
    let ds = Dataset::open(&"hf:test/tiny".parse().unwrap(), &cfg, Split::Train).unwrap();
    assert_eq!((ds.len(), ds.channels(), ds.image_size()), (20, 3, 8));
    assert_eq!(ds.name(), "hf:test/tiny (train)");
    let mut loader = Loader::new(ds, 8, 1, true, 1).unwrap();
    assert_eq!(loader.next_batch().unwrap().images.dims(), &[8, 3, 8, 8]);
}

#[test]
fn pinned_specs_keep_reading_their_commit_and_offline_mode_reads_the_cache() {
    let hub = FakeHub::start();
    let first = tiny(&hub);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let pinned = hub_dataset::pin(&spec("hf:test/tiny:train"), &opts).unwrap();
    assert_eq!(pinned.revision.as_deref(), Some(first.as_str()));
    assert_eq!(pinned.to_string(), format!("test/tiny@{first}:train"));
    assert!(pinned.is_pinned());
    let before = hub_dataset::load(&pinned, &cfg(), Split::Train, 4, &opts).unwrap();

    // main moves on: the pinned spec still reads the first commit, an unpinned one the new.
    hub.publish(
        Kind::Dataset,
        "test/tiny",
        "main",
        vec![HubFile::lfs(
            TRAIN,
            parquet_file(&tiny_rows(6, 2, false), None),
        )],
    );
    let again = hub_dataset::load(&pinned, &cfg(), Split::Train, 4, &opts).unwrap();
    assert_eq!(
        (again.pixels, again.commit),
        (before.pixels.clone(), first.clone())
    );
    let moved = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Train, 4, &opts).unwrap();
    assert_eq!(moved.labels.len(), 6);
    assert_eq!(moved.class_names, ["0", "1"]);

    // Offline, on the filled cache, with the Hub down: the same images, no request.
    hub.set_down(true);
    let count = hub.request_count();
    let off = hub_dataset::load(&pinned, &cfg(), Split::Train, 4, &offline(cache.path())).unwrap();
    assert_eq!(off.pixels, before.pixels);
    assert_eq!(off.class_names, NAMES);
    // The branch resolves through refs/main to the newest commit cached.
    let off_main = hub_dataset::load(
        &spec("hf:test/tiny"),
        &cfg(),
        Split::Train,
        4,
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(off_main.labels.len(), 6);
    assert_eq!(hub.request_count(), count);
    // A split never downloaded is not in the cache: the error says offline and what is there.
    let err = hub_dataset::load(&pinned, &cfg(), Split::Test, 4, &offline(cache.path()));
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("no split \"test\"") && err.contains("offline"),
        "{err}"
    );
    let err = hub_dataset::load(
        &spec("hf:test/other"),
        &cfg(),
        Split::Train,
        4,
        &offline(cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::HubOffline { .. }), "{err}");
    // A pinned spec is not resolved again.
    assert_eq!(
        hub_dataset::pin(&pinned, &offline(cache.path())).unwrap(),
        pinned
    );
}

#[test]
fn corrupt_or_resized_files_are_refused() {
    let hub = FakeHub::start();
    tiny(&hub);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    hub.corrupt(TRAIN);
    let err = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains(TRAIN), "{err}");
    hub.heal();
    hub.resize(TRAIN, -10);
    let err = hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");
    hub.heal();
    assert!(hub_dataset::load(&spec("hf:test/tiny"), &cfg(), Split::Train, 4, &opts).is_ok());
}

#[test]
fn missing_splits_and_other_layouts_are_refused_naming_what_was_found() {
    let hub = FakeHub::start();
    tiny(&hub);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let err = hub_dataset::load(
        &spec("hf:test/tiny:validation"),
        &cfg(),
        Split::Train,
        4,
        &opts,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DataError::HubDataset { .. }), "{text}");
    assert!(
        text.contains("no split \"validation\"") && text.contains("test, train"),
        "{text}"
    );

    // A repository of loose images, with no parquet conversion: refused, naming its files.
    hub.publish(
        Kind::Dataset,
        "test/loose",
        "main",
        vec![
            HubFile::lfs("images/0.png", png(4, 4, [1, 2, 3], false)),
            HubFile::git("README.md", "x"),
        ],
    );
    let err =
        hub_dataset::load(&spec("hf:test/loose"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no parquet files") && text.contains("images/0.png"),
        "{text}"
    );
    assert!(text.contains("refs/convert/parquet"), "{text}");

    // With the Hub's conversion on refs/convert/parquet, that is read instead.
    let converted = hub.publish(
        Kind::Dataset,
        "test/loose",
        "refs/convert/parquet",
        vec![HubFile::lfs(
            "default/train/0000.parquet",
            parquet_file(&tiny_rows(5, 1, false), None),
        )],
    );
    let images = hub_dataset::load(&spec("hf:test/loose"), &cfg(), Split::Train, 4, &opts).unwrap();
    assert_eq!(
        (images.labels.len(), images.commit.as_str()),
        (5, converted.as_str())
    );
    let pinned = hub_dataset::pin(&spec("hf:test/loose"), &opts).unwrap();
    assert_eq!(pinned.revision.as_deref(), Some(converted.as_str()));

    // Two configurations with a train split: one must be named.
    hub.publish(
        Kind::Dataset,
        "test/configs",
        "main",
        vec![
            HubFile::lfs(
                "small/train-00000-of-00001.parquet",
                parquet_file(&tiny_rows(3, 1, false), None),
            ),
            HubFile::lfs(
                "large/train-00000-of-00001.parquet",
                parquet_file(&tiny_rows(7, 1, false), None),
            ),
        ],
    );
    let err =
        hub_dataset::load(&spec("hf:test/configs"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("large/train, small/train") && text.contains("CONFIG/train"),
        "{text}"
    );
    let large = hub_dataset::load(
        &spec("hf:test/configs:large/train"),
        &cfg(),
        Split::Train,
        4,
        &opts,
    )
    .unwrap();
    assert_eq!(large.labels.len(), 7);
}

#[test]
fn bad_rows_stop_the_load_with_their_name_or_are_skipped_and_counted() {
    let hub = FakeHub::start();
    let mut rows = tiny_rows(20, 4, false);
    rows[3].bytes = Some(b"\x89PNG\r\n\x1a\n not a png".to_vec());
    rows[7] = Row {
        bytes: None,
        label: 3,
    };
    hub.publish(
        Kind::Dataset,
        "test/bad",
        "main",
        vec![HubFile::lfs(TRAIN, parquet_file(&rows, Some(&NAMES)))],
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let err = hub_dataset::load(&spec("hf:test/bad"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DataError::Decode { .. }), "{text}");
    assert!(
        text.contains(TRAIN) && text.contains("[row 3]") && text.contains("skip_corrupt"),
        "{text}"
    );

    let skip = DataConfig {
        skip_corrupt: true,
        ..cfg()
    };
    let images = hub_dataset::load(&spec("hf:test/bad"), &skip, Split::Train, 4, &opts).unwrap();
    assert_eq!(images.labels.len(), 18);
    let skipped: Vec<String> = images
        .skipped
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(skipped.len(), 2);
    assert!(
        skipped[0].ends_with("[row 3]") && skipped[1].ends_with("[row 7]"),
        "{skipped:?}"
    );
    // The labels of the rows kept stay with their images.
    let mut want: Vec<u32> = (0..20).map(|i| i % 4).collect();
    want.remove(7);
    want.remove(3);
    assert_eq!(images.labels, want);

    // A file that is no parquet at all is an error naming it.
    hub.publish(
        Kind::Dataset,
        "test/notparquet",
        "main",
        vec![HubFile::lfs(TRAIN, b"PAR1 but not really".to_vec())],
    );
    let err =
        hub_dataset::load(&spec("hf:test/notparquet"), &cfg(), Split::Train, 4, &opts).unwrap_err();
    assert!(matches!(err, DataError::Parquet { .. }), "{err}");
    assert!(err.to_string().contains(TRAIN), "{err}");
}

#[test]
fn greyscale_sets_are_one_channel() {
    let hub = FakeHub::start();
    hub.publish(
        Kind::Dataset,
        "test/grey",
        "main",
        vec![HubFile::lfs(
            "mnist/train-00000-of-00001.parquet",
            parquet_file(&tiny_rows(10, 10, true), None),
        )],
    );
    let cache = tempfile::tempdir().unwrap();
    let images = hub_dataset::load(
        &spec("hf:test/grey"),
        &cfg(),
        Split::Train,
        4,
        &options(&hub, cache.path()),
    )
    .unwrap();
    assert_eq!((images.channels, images.pixels.len()), (1, 10 * 16));
    assert_eq!(images.pixels[16], colour(1)[0]);
    assert_eq!(images.class_names.len(), 10);
}

/// The parquet files of tests/fixtures/hub, written by Python's `datasets` and `pyarrow`
/// (make.py there): the reader takes what those libraries write, compressed or not.
#[test]
fn files_written_by_datasets_and_pyarrow_are_read() {
    let fixture = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hub")
                .join(name),
        )
        .unwrap()
    };
    // make.py's colours, and PIL's greyscale of one.
    let colour = |i: i32| [i * 40 % 256, 255 - i * 30, 7 * i];
    let luma = |[r, g, b]: [i32; 3]| (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    let check = |images: &hub_dataset::HubImages, want: &[[i32; 3]], tolerance: i32| {
        assert_eq!(images.labels.len(), want.len());
        for (i, img) in images.pixels.chunks_exact(3 * 16).enumerate() {
            for (c, plane) in img.chunks_exact(16).enumerate() {
                assert!(
                    plane
                        .iter()
                        .all(|&v| (v as i32 - want[i][c]).abs() <= tolerance),
                    "image {i} channel {c}: {plane:?} vs {}",
                    want[i][c]
                );
            }
        }
    };
    let hub = FakeHub::start();
    hub.publish(
        Kind::Dataset,
        "test/datasets",
        "main",
        vec![HubFile::lfs(TRAIN, fixture("datasets-tiny.parquet"))],
    );
    hub.publish(
        Kind::Dataset,
        "test/zstd",
        "refs/convert/parquet",
        vec![HubFile::lfs(
            "default/train/0000.parquet",
            fixture("pyarrow-zstd.parquet"),
        )],
    );
    hub.publish(
        Kind::Dataset,
        "test/snappy",
        "main",
        vec![HubFile::lfs(
            "train.parquet",
            fixture("pyarrow-snappy.parquet"),
        )],
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let load = |text: &str| hub_dataset::load(&spec(text), &cfg(), Split::Train, 4, &opts).unwrap();

    let tiny = load("hf:test/datasets");
    check(&tiny, &(0..6).map(colour).collect::<Vec<_>>(), 0);
    assert_eq!(tiny.class_names, ["x", "y", "z"]);
    assert_eq!(tiny.labels, [0, 1, 2, 0, 1, 2]);

    // A JPEG, a greyscale PNG (RGB from its grey), an RGBA PNG and two PNGs; string labels.
    let g = luma(colour(1));
    let want = [colour(0), [g, g, g], colour(2), colour(3), colour(4)];
    let zstd = load("hf:test/zstd@refs/convert/parquet");
    check(&zstd, &want, 3);
    assert_eq!(zstd.class_names, ["cat", "dog", "eel"]);
    assert_eq!(zstd.labels, [1, 0, 1, 2, 0]);
    let snappy = load("hf:test/snappy");
    check(&snappy, &want, 3);
    assert_eq!(snappy.class_names, ["0", "1", "2"]);
    assert_eq!(snappy.labels, [1, 0, 1, 2, 0]);
}
