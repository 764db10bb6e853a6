//! MNIST in its canonical IDX format, gzip-compressed or not, and Fashion-MNIST, which has the
//! same files, sizes and splits (read by the same functions; [`FASHION_MNIST_CLASSES`] names its
//! classes).
//!
//! The files are `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
//! and `t10k-labels-idx1-ubyte`, each optionally with a `.gz` suffix. The canonical split is
//! train-* (60,000 images) for training and t10k-* (10,000) for testing.
//!
//! When only the t10k files are present (as on a mirror that holds just the test split), a fixed
//! hold-out of them is used: the last fifth (the last 2,000 of the 10,000 images) is the test
//! split and the rest (the first 8,000) the training split; a warning says the training split is
//! absent.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{DataError, Result};
use crate::spec::Split;

/// The magic number of an IDX file of `u8` with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// The magic number of an IDX file of `u8` with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The stem of the training images file.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// The stem of the training labels file.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// The stem of the test images file.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// The stem of the test labels file.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
/// The number of classes (ten digits; ten kinds of clothing in Fashion-MNIST).
pub const NUM_CLASSES: usize = 10;
/// Fashion-MNIST's class names, by label (Zalando's README).
pub const FASHION_MNIST_CLASSES: [&str; NUM_CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
/// When only the t10k files exist, one image in this many (the last ones) is held out for test.
pub const HOLDOUT_FRACTION: usize = 5;

/// Capacity reserved up front when decompressing; larger payloads grow as data actually arrives,
/// so a header claiming a huge count never causes a huge allocation.
const MAX_PREALLOC: usize = 64 << 20;

/// The images of an IDX image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// The number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count * rows * cols` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

/// Reads an IDX image file (`u8`, 3 dimensions), gzip-compressed or not.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let raw = crate::regular::read(
        path,
        "replace it with the data set's file (`cargo xtask fetch-data mnist`)",
    )?;
    parse_images(&raw, path)
}

/// Parses the bytes of an IDX image file (`u8`, 3 dimensions), gzip-compressed or not; `path`
/// only names the file in errors.
pub fn parse_images(raw: &[u8], path: &Path) -> Result<IdxImages> {
    let (dims, pixels) = parse_idx(raw, path, IMAGES_MAGIC, "IDX images (u8, 3 dimensions)")?;
    if dims[1] == 0 || dims[2] == 0 {
        return Err(DataError::BadHeader {
            path: path.into(),
            reason: format!("images of {}x{} pixels", dims[1], dims[2]),
        });
    }
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an IDX label file (`u8`, 1 dimension), gzip-compressed or not.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let raw = crate::regular::read(
        path,
        "replace it with the data set's file (`cargo xtask fetch-data mnist`)",
    )?;
    parse_labels(&raw, path)
}

/// Parses the bytes of an IDX label file (`u8`, 1 dimension), gzip-compressed or not; `path`
/// only names the file in errors.
pub fn parse_labels(raw: &[u8], path: &Path) -> Result<Vec<u8>> {
    let (_, labels) = parse_idx(raw, path, LABELS_MAGIC, "IDX labels (u8, 1 dimension)")?;
    Ok(labels)
}

/// Finds `dir/stem` or `dir/stem.gz`, preferring the uncompressed file.
pub fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

fn parse_idx(
    raw: &[u8],
    path: &Path,
    magic: u32,
    what: &'static str,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    let truncated = |found: usize| DataError::Truncated {
        path: path.into(),
        expected: header_len as u64,
        found: found as u64,
    };
    if raw.starts_with(&[0x1f, 0x8b]) {
        let gz_err = |source| DataError::Gzip {
            path: path.into(),
            source,
        };
        let mut decoder = GzDecoder::new(raw);
        let mut header = vec![0u8; header_len];
        let got = read_fully(&mut decoder, &mut header).map_err(gz_err)?;
        if got < header_len {
            check_magic(path, &header[..got], magic, what)?;
            return Err(truncated(got));
        }
        let (dims, payload) = parse_header(path, &header, magic, what)?;
        let mut data = Vec::with_capacity(payload.min(MAX_PREALLOC));
        // Reading one byte past the payload detects trailing data; reading on to the end of the
        // stream makes the decoder check the gzip CRC.
        (&mut decoder)
            .take(payload as u64 + 1)
            .read_to_end(&mut data)
            .map_err(gz_err)?;
        check_payload_len(path, header_len, payload, data.len())?;
        Ok((dims, data))
    } else {
        if raw.len() < header_len {
            check_magic(path, raw, magic, what)?;
            return Err(truncated(raw.len()));
        }
        let (dims, payload) = parse_header(path, &raw[..header_len], magic, what)?;
        check_payload_len(path, header_len, payload, raw.len() - header_len)?;
        Ok((dims, raw[header_len..].to_vec()))
    }
}

fn check_payload_len(path: &Path, header_len: usize, payload: usize, found: usize) -> Result<()> {
    let expected = (header_len + payload) as u64;
    let found = (header_len + found) as u64;
    match found.cmp(&expected) {
        std::cmp::Ordering::Less => Err(DataError::Truncated {
            path: path.into(),
            expected,
            found,
        }),
        std::cmp::Ordering::Greater => Err(DataError::TrailingData {
            path: path.into(),
            expected,
            found,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Checks the magic number when at least its 4 bytes are there (a short file with the wrong magic
/// number is reported as the wrong kind of file, not as a truncated one).
fn check_magic(path: &Path, bytes: &[u8], magic: u32, what: &'static str) -> Result<()> {
    match bytes.get(..4) {
        Some(b) if u32::from_be_bytes([b[0], b[1], b[2], b[3]]) != magic => {
            Err(DataError::BadMagic {
                path: path.into(),
                expected: magic,
                found: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                what,
            })
        }
        _ => Ok(()),
    }
}

/// Parses the magic number and dimensions; returns the dimensions and the payload length.
fn parse_header(
    path: &Path,
    header: &[u8],
    magic: u32,
    what: &'static str,
) -> Result<(Vec<usize>, usize)> {
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let found = word(0);
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.into(),
            expected: magic,
            found,
            what,
        });
    }
    let dims: Vec<usize> = (1..header.len() / 4)
        .map(|i| word(4 * i) as usize)
        .collect();
    let payload = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&p| p <= isize::MAX as usize)
        .ok_or_else(|| DataError::BadHeader {
            path: path.into(),
            reason: format!("dimensions {dims:?} overflow"),
        })?;
    Ok((dims, payload))
}

/// Reads until `buf` is full or the stream ends; returns the number of bytes read.
fn read_fully(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads an image file and its label file and checks that they agree.
pub fn read_pair(images_path: &Path, labels_path: &Path) -> Result<(IdxImages, Vec<u8>)> {
    let images = read_images(images_path)?;
    let labels = read_labels(labels_path)?;
    if images.count != labels.len() {
        return Err(DataError::CountMismatch {
            images_path: images_path.into(),
            images: images.count,
            labels_path: labels_path.into(),
            labels: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= NUM_CLASSES)
    {
        return Err(DataError::BadLabel {
            path: labels_path.into(),
            index,
            label: label.into(),
            classes: NUM_CLASSES,
        });
    }
    Ok((images, labels))
}

/// Loads a split of MNIST from `dir` (see the module doc for the splits).
pub fn load(dir: &Path, split: Split) -> Result<(IdxImages, Vec<u8>)> {
    load_as(dir, split, "mnist")
}

/// Loads a split of an IDX data set in MNIST's layout (MNIST, Fashion-MNIST) from `dir`; `name`
/// (`mnist`, `fashion-mnist`) names the data set in warnings and errors.
pub fn load_as(dir: &Path, split: Split, name: &str) -> Result<(IdxImages, Vec<u8>)> {
    let absent = |dir: &Path, stem: &str| missing(dir, stem, name);
    let pair = |images: &str, labels: &str| -> Result<Option<(IdxImages, Vec<u8>)>> {
        match (find_file(dir, images), find_file(dir, labels)) {
            (Some(i), Some(l)) => read_pair(&i, &l).map(Some),
            (None, None) => Ok(None),
            (Some(_), None) => Err(absent(dir, labels)),
            (None, Some(_)) => Err(absent(dir, images)),
        }
    };
    let test = || pair(TEST_IMAGES, TEST_LABELS)?.ok_or_else(|| absent(dir, TEST_IMAGES));
    let train_present =
        find_file(dir, TRAIN_IMAGES).is_some() || find_file(dir, TRAIN_LABELS).is_some();
    if train_present {
        let train = || pair(TRAIN_IMAGES, TRAIN_LABELS)?.ok_or_else(|| absent(dir, TRAIN_IMAGES));
        return match split {
            Split::Test => test(),
            Split::Train => train(),
            Split::All => {
                let (mut images, mut labels) = train()?;
                let (test_images, test_labels) = test()?;
                if (images.rows, images.cols) != (test_images.rows, test_images.cols) {
                    return Err(DataError::BadHeader {
                        path: dir.join(TEST_IMAGES),
                        reason: format!(
                            "t10k images are {}x{} but train images {}x{}",
                            test_images.rows, test_images.cols, images.rows, images.cols
                        ),
                    });
                }
                images.count += test_images.count;
                images.pixels.extend_from_slice(&test_images.pixels);
                labels.extend_from_slice(&test_labels);
                Ok((images, labels))
            }
        };
    }
    let (images, labels) = test()?;
    let n = images.count;
    let cut = n - n / HOLDOUT_FRACTION;
    let range = match split {
        Split::Train => {
            tracing::warn!(
                dir = %dir.display(),
                "{name}: training split (train-*) absent: training on the first {cut} of the {n} \
                 t10k images; the last {} are the test split",
                n - cut
            );
            0..cut
        }
        Split::Test => cut..n,
        Split::All => 0..n,
    };
    let px = images.rows * images.cols;
    Ok((
        IdxImages {
            count: range.len(),
            rows: images.rows,
            cols: images.cols,
            pixels: images.pixels[range.start * px..range.end * px].to_vec(),
        },
        labels[range].to_vec(),
    ))
}

fn missing(dir: &Path, stem: &str, name: &str) -> DataError {
    DataError::MissingFile {
        path: dir.join(format!("{stem}.gz")),
        hint: format!(
            "run `cargo xtask fetch-data {name}` (or place the IDX file there, gzipped or not)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_raw_and_gzipped_files_alike() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        let bytes = idx(IMAGES_MAGIC, &[2, 3, 4], &pixels);
        let raw = read_images(&write(dir.path(), "a", &bytes)).unwrap();
        let zipped = read_images(&write(dir.path(), "a.gz", &gz(&bytes))).unwrap();
        assert_eq!(raw, zipped);
        assert_eq!((raw.count, raw.rows, raw.cols), (2, 3, 4));
        assert_eq!(raw.pixels, pixels);
    }

    #[test]
    fn bad_magic_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        // A label file where an image file is expected.
        let path = write(dir.path(), "x", &idx(LABELS_MAGIC, &[3], &[1, 2, 3]));
        match read_images(&path) {
            Err(DataError::BadMagic {
                expected, found, ..
            }) => {
                assert_eq!((expected, found), (IMAGES_MAGIC, LABELS_MAGIC));
            }
            other => panic!("expected BadMagic, got {other:?}"),
        }
        let err = read_images(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn truncated_and_oversized_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx(IMAGES_MAGIC, &[2, 2, 2], &[7; 8]);
        let short = write(dir.path(), "short", &bytes[..bytes.len() - 1]);
        assert!(matches!(
            read_images(&short),
            Err(DataError::Truncated {
                expected: 24,
                found: 23,
                ..
            })
        ));
        let short_gz = write(dir.path(), "short.gz", &gz(&bytes[..bytes.len() - 3]));
        assert!(matches!(
            read_images(&short_gz),
            Err(DataError::Truncated {
                expected: 24,
                found: 21,
                ..
            })
        ));
        let header_only = write(dir.path(), "hdr", &bytes[..10]);
        assert!(matches!(
            read_images(&header_only),
            Err(DataError::Truncated { .. })
        ));
        let mut long = bytes.clone();
        long.push(0);
        let long = write(dir.path(), "long", &long);
        assert!(matches!(
            read_images(&long),
            Err(DataError::TrailingData { .. })
        ));
    }

    #[test]
    fn a_huge_declared_count_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        // 4 billion images of 64k x 64k would overflow; 4 billion 28x28 images (3 TB) would not
        // overflow but must fail on the file's length without reserving memory for them.
        let overflow = write(
            dir.path(),
            "o",
            &idx(IMAGES_MAGIC, &[u32::MAX, 65535, 65535], &[]),
        );
        assert!(matches!(
            read_images(&overflow),
            Err(DataError::BadHeader { .. })
        ));
        let huge = idx(IMAGES_MAGIC, &[u32::MAX, 28, 28], &[0; 100]);
        let raw = write(dir.path(), "h", &huge);
        assert!(matches!(
            read_images(&raw),
            Err(DataError::Truncated { .. })
        ));
        let zipped = write(dir.path(), "h.gz", &gz(&huge));
        assert!(matches!(
            read_images(&zipped),
            Err(DataError::Truncated { .. })
        ));
    }

    #[test]
    fn corrupt_gzip_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = gz(&idx(LABELS_MAGIC, &[1000], &[3; 1000]));
        let n = bytes.len();
        // Cut the stream in the middle of the deflate data.
        let cut = write(dir.path(), "cut.gz", &bytes[..n / 2]);
        assert!(matches!(
            read_labels(&cut),
            Err(DataError::Gzip { .. }) | Err(DataError::Truncated { .. })
        ));
        // Damage the CRC in the trailer.
        bytes[n - 6] ^= 0xff;
        let crc = write(dir.path(), "crc.gz", &bytes);
        assert!(matches!(read_labels(&crc), Err(DataError::Gzip { .. })));
    }

    #[test]
    fn pairs_must_agree_and_labels_must_be_digits() {
        let dir = tempfile::tempdir().unwrap();
        let images = write(dir.path(), "i", &idx(IMAGES_MAGIC, &[2, 1, 1], &[0, 1]));
        let three = write(dir.path(), "l3", &idx(LABELS_MAGIC, &[3], &[0, 1, 2]));
        assert!(matches!(
            read_pair(&images, &three),
            Err(DataError::CountMismatch { .. })
        ));
        let bad = write(dir.path(), "lb", &idx(LABELS_MAGIC, &[2], &[0, 10]));
        assert!(matches!(
            read_pair(&images, &bad),
            Err(DataError::BadLabel {
                index: 1,
                label: 10,
                ..
            })
        ));
    }

    #[test]
    fn test_only_directories_use_the_fixed_holdout() {
        let dir = tempfile::tempdir().unwrap();
        let n = 10u8;
        let pixels: Vec<u8> = (0..n).collect();
        let labels: Vec<u8> = (0..n).map(|i| i % 10).collect();
        write(
            dir.path(),
            "t10k-images-idx3-ubyte.gz",
            &gz(&idx(IMAGES_MAGIC, &[n.into(), 1, 1], &pixels)),
        );
        write(
            dir.path(),
            "t10k-labels-idx1-ubyte",
            &idx(LABELS_MAGIC, &[n.into()], &labels),
        );
        let (train, _) = load(dir.path(), Split::Train).unwrap();
        let (test, test_labels) = load(dir.path(), Split::Test).unwrap();
        let (all, _) = load(dir.path(), Split::All).unwrap();
        assert_eq!(train.pixels, (0..8).collect::<Vec<u8>>());
        assert_eq!(test.pixels, vec![8, 9]);
        assert_eq!(test_labels, vec![8, 9]);
        assert_eq!(all.count, 10);

        // With the training files present the canonical split is used.
        write(
            dir.path(),
            "train-images-idx3-ubyte",
            &idx(IMAGES_MAGIC, &[3, 1, 1], &[100, 101, 102]),
        );
        write(
            dir.path(),
            "train-labels-idx1-ubyte",
            &idx(LABELS_MAGIC, &[3], &[1, 2, 3]),
        );
        assert_eq!(
            load(dir.path(), Split::Train).unwrap().0.pixels,
            vec![100, 101, 102]
        );
        assert_eq!(load(dir.path(), Split::Test).unwrap().0.count, 10);
        assert_eq!(load(dir.path(), Split::All).unwrap().0.count, 13);

        // Half a pair is an error naming the missing half.
        std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        match load(dir.path(), Split::Train) {
            Err(DataError::MissingFile { path, .. }) => {
                assert!(path.ends_with("train-labels-idx1-ubyte.gz"))
            }
            other => panic!("expected MissingFile, got {other:?}"),
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(empty.path(), Split::Test),
            Err(DataError::MissingFile { .. })
        ));
    }
}
