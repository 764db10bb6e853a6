//! CIFAR-10 in its canonical binary format.
//!
//! `cifar-10-batches-bin/` holds `data_batch_1.bin` .. `data_batch_5.bin` (the training split)
//! and `test_batch.bin` (the test split). Each file is a sequence of 3,073-byte records (10,000 in
//! the canonical files): one label byte (0-9) followed by the 32x32 image as three 1,024-byte
//! planes, red, green then blue, each row-major.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::spec::Split;

/// The side of a CIFAR-10 image.
pub const SIDE: usize = 32;
/// The bytes of one image (3 planes of 32x32).
pub const IMAGE_LEN: usize = 3 * SIDE * SIDE;
/// The bytes of one record: a label byte and an image.
pub const RECORD_LEN: usize = 1 + IMAGE_LEN;
/// The directory the batches live in, inside the data set's directory.
pub const BATCH_DIR: &str = "cifar-10-batches-bin";
/// The training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// The class names, in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The records of one or more batch files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CifarBatch {
    /// One label (0-9) per image.
    pub labels: Vec<u8>,
    /// The images, each [`IMAGE_LEN`] bytes in (c, h, w) order.
    pub pixels: Vec<u8>,
}

impl CifarBatch {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Reads one batch file, checking its length and labels.
pub fn read_batch(path: &Path) -> Result<CifarBatch> {
    let len = std::fs::metadata(path).map_err(DataError::io(path))?.len();
    check_len(path, len)?;
    let bytes = crate::regular::read(
        path,
        "replace it with the data set's file (`cargo xtask fetch-data cifar10`)",
    )?;
    parse_batch(&bytes, path)
}

/// Parses the bytes of one batch file, checking its length and labels; `path` only names the
/// file in errors.
pub fn parse_batch(bytes: &[u8], path: &Path) -> Result<CifarBatch> {
    check_len(path, bytes.len() as u64)?;
    let n = bytes.len() / RECORD_LEN;
    let mut batch = CifarBatch {
        labels: Vec::with_capacity(n),
        pixels: Vec::with_capacity(n * IMAGE_LEN),
    };
    for (index, record) in bytes.chunks_exact(RECORD_LEN).enumerate() {
        let label = record[0];
        if label as usize >= CLASS_NAMES.len() {
            return Err(DataError::BadLabel {
                path: path.into(),
                index,
                label: label.into(),
                classes: CLASS_NAMES.len(),
            });
        }
        batch.labels.push(label);
        batch.pixels.extend_from_slice(&record[1..]);
    }
    if n != 10_000 {
        tracing::debug!(file = %path.display(), records = n, "CIFAR-10 batch is not the canonical 10,000 records");
    }
    Ok(batch)
}

fn check_len(path: &Path, len: u64) -> Result<()> {
    if len == 0 || !len.is_multiple_of(RECORD_LEN as u64) {
        return Err(DataError::RecordLength {
            path: path.into(),
            len,
            record: RECORD_LEN as u64,
        });
    }
    Ok(())
}

/// Writes labels and (c, h, w) images as a batch file in exactly the canonical format.
///
/// Used by tests and to convert other data to CIFAR-10's layout.
pub fn write_batch(path: &Path, labels: &[u8], pixels: &[u8]) -> Result<()> {
    if pixels.len() != labels.len() * IMAGE_LEN {
        return Err(DataError::Config(format!(
            "{} labels need {} pixel bytes, got {}",
            labels.len(),
            labels.len() * IMAGE_LEN,
            pixels.len()
        )));
    }
    let mut out = Vec::with_capacity(labels.len() * RECORD_LEN);
    for (label, image) in labels.iter().zip(pixels.chunks_exact(IMAGE_LEN)) {
        out.push(*label);
        out.extend_from_slice(image);
    }
    std::fs::write(path, out).map_err(DataError::io(path))
}

/// The batch files of a split, inside `batch_dir`.
pub fn split_files(batch_dir: &Path, split: Split) -> Vec<PathBuf> {
    let names: Vec<&str> = match split {
        Split::Train => TRAIN_FILES.to_vec(),
        Split::Test => vec![TEST_FILE],
        Split::All => TRAIN_FILES.iter().copied().chain([TEST_FILE]).collect(),
    };
    names.into_iter().map(|n| batch_dir.join(n)).collect()
}

/// Loads a split from a data set directory holding [`BATCH_DIR`].
pub fn load(dir: &Path, split: Split) -> Result<CifarBatch> {
    let batch_dir = dir.join(BATCH_DIR);
    let files = split_files(&batch_dir, split);
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(DataError::MissingFile {
            path: missing.clone(),
            hint: "run `cargo xtask fetch-data cifar10` (it extracts cifar-10-binary.tar.gz there)"
                .to_string(),
        });
    }
    let mut all = CifarBatch::default();
    for file in &files {
        let batch = read_batch(file)?;
        all.labels.extend_from_slice(&batch.labels);
        all.pixels.extend_from_slice(&batch.pixels);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
        let labels = (0..n).map(|i| ((i + seed as usize) % 10) as u8).collect();
        let pixels = (0..n * IMAGE_LEN)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect();
        (labels, pixels)
    }

    #[test]
    fn written_batches_read_back_record_for_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        let (labels, pixels) = records(3, 1);
        write_batch(&path, &labels, &pixels).unwrap();
        // The layout on disk is label byte, then the R, G, B planes.
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(raw.len(), 3 * RECORD_LEN);
        assert_eq!(raw[RECORD_LEN], labels[1]);
        assert_eq!(raw[RECORD_LEN + 1 + 1024 + 5], pixels[IMAGE_LEN + 1024 + 5]);
        let batch = read_batch(&path).unwrap();
        assert_eq!(batch.labels, labels);
        assert_eq!(batch.pixels, pixels);
    }

    #[test]
    fn bad_lengths_and_labels_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        let (mut labels, pixels) = records(2, 0);
        write_batch(&path, &labels, &pixels).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            read_batch(&path),
            Err(DataError::RecordLength { len, record: 3073, .. }) if len == 2 * 3073 - 1
        ));
        std::fs::write(&path, []).unwrap();
        assert!(matches!(
            read_batch(&path),
            Err(DataError::RecordLength { len: 0, .. })
        ));
        labels[1] = 200;
        write_batch(&path, &labels, &pixels).unwrap();
        assert!(matches!(
            read_batch(&path),
            Err(DataError::BadLabel {
                index: 1,
                label: 200,
                ..
            })
        ));
        assert!(matches!(
            read_batch(&dir.path().join("none.bin")),
            Err(DataError::Io { .. })
        ));
        assert!(write_batch(&path, &labels, &pixels[1..]).is_err());
    }

    #[test]
    fn splits_use_the_canonical_files_and_name_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let batch_dir = dir.path().join(BATCH_DIR);
        std::fs::create_dir(&batch_dir).unwrap();
        for (i, name) in TRAIN_FILES.iter().enumerate() {
            let (l, p) = records(i + 1, i as u8);
            write_batch(&batch_dir.join(name), &l, &p).unwrap();
        }
        assert!(matches!(
            load(dir.path(), Split::Test),
            Err(DataError::MissingFile { path, .. }) if path.ends_with(TEST_FILE)
        ));
        let (l, p) = records(4, 9);
        write_batch(&batch_dir.join(TEST_FILE), &l, &p).unwrap();
        let train = load(dir.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 1 + 2 + 3 + 4 + 5);
        // Files are concatenated in order: the second file's first record is record 1.
        assert_eq!(train.labels[1], records(2, 1).0[0]);
        assert_eq!(load(dir.path(), Split::Test).unwrap().labels, l);
        assert_eq!(load(dir.path(), Split::All).unwrap().len(), 15 + 4);
        std::fs::remove_file(batch_dir.join(TRAIN_FILES[2])).unwrap();
        let err = load(dir.path(), Split::Train).unwrap_err();
        assert!(err.to_string().contains("data_batch_3.bin"), "{err}");
    }
}
