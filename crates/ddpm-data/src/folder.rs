//! Image folders: JPEG, PNG or GIF images, either in one sub-folder per class (Flowers is one) or
//! all directly in the folder (one class, named after the folder).
//!
//! Classes are the sub-folders in byte order of their names (hidden ones skipped); files are the
//! images in each, in byte order of their names; other files are ignored. A folder that holds
//! images directly and no sub-folder with images is *flat*: its images form one class named
//! after the folder. A folder with images both directly in it and in sub-folders is an error
//! naming the folder: it is not clear which layout was meant.
//!
//! Folders have no canonical split, so a fixed per-class hold-out is used, set by the fraction
//! `f` = [`crate::DataConfig::test_fraction`] (default [`DEFAULT_TEST_FRACTION`] = 0.1): within
//! each class, in sorted order, the file at position `p` (counting from 0) is in the test split
//! when `floor((p + 1) f) > floor(p f)`, so that `floor(n f)` of a class's `n` files are held out,
//! evenly spread. For `f = 0.1` that is every 10th file (positions 9, 19, 29, ...); for `f = 0`
//! every file is in the training split and the test split is empty. For the mirror's 4,317-image
//! Flowers that is 430 test images (daisy 76, dandelion 105, rose 78, sunflower 73, tulip 98) and
//! 3,887 training images; for TensorFlow's 3,670-image `flower_photos` 364 test images (daisy 63,
//! dandelion 89, roses 64, sunflowers 69, tulips 79) and 3,306 training images. The split depends
//! only on file names (and `f`), so it does not change when a corrupt file is skipped.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use image::{ImageFormat, ImageReader};

use crate::error::{DataError, Result};
use crate::spec::Split;
use crate::transform;

/// The file extensions (compared case-insensitively) read as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "gif"];
/// One file in this many per class is held out for the test split by default (see the module
/// doc): the hold-out of [`DEFAULT_TEST_FRACTION`].
pub const HOLDOUT_EVERY: usize = 10;
/// The default share of each class held out for the test split (one file in [`HOLDOUT_EVERY`]).
pub const DEFAULT_TEST_FRACTION: f64 = 0.1;
/// Images up to this many decoded bytes (RGBA) are decoded whatever their file size.
const MAX_DECODED_ANY: u64 = 64 << 20;
/// Above [`MAX_DECODED_ANY`], the most decoded bytes per file byte believed: GIF's LZW expands at
/// most about 2,700 times, deflate (PNG) 1,032 times, JPEG less.
const MAX_EXPANSION: u64 = 4096;

/// The classes and image files of a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderIndex {
    /// The folder.
    pub root: PathBuf,
    /// The class names (sub-folder names, or the folder's own name for a flat folder), in label
    /// order.
    pub classes: Vec<String>,
    /// Every image file with its label, class by class, sorted.
    pub files: Vec<(PathBuf, u32)>,
    /// Whether the images lie directly in the folder (one class) rather than in class
    /// sub-folders.
    pub flat: bool,
}

impl FolderIndex {
    /// The number of files of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, label) in &self.files {
            counts[*label as usize] += 1;
        }
        counts
    }

    /// The files of a split with the default hold-out ([`DEFAULT_TEST_FRACTION`]), keeping their
    /// order.
    pub fn split(&self, split: Split) -> Vec<(PathBuf, u32)> {
        self.split_with(split, DEFAULT_TEST_FRACTION)
    }

    /// The files of a split when `test_fraction` of each class is held out (see the module doc),
    /// keeping their order. A fraction outside [0, 1) is clamped into it.
    pub fn split_with(&self, split: Split, test_fraction: f64) -> Vec<(PathBuf, u32)> {
        let mut position = vec![0usize; self.classes.len()];
        self.files
            .iter()
            .filter(|(_, label)| {
                let p = &mut position[*label as usize];
                let held_out = is_held_out_at(*p, test_fraction);
                *p += 1;
                match split {
                    Split::Train => !held_out,
                    Split::Test => held_out,
                    Split::All => true,
                }
            })
            .cloned()
            .collect()
    }

    /// The number of (training, test) files when `test_fraction` of each class is held out.
    pub fn split_counts(&self, test_fraction: f64) -> (usize, usize) {
        let test: usize = self
            .class_counts()
            .iter()
            .map(|&n| held_out_count(n, test_fraction))
            .sum();
        (self.files.len() - test, test)
    }
}

/// Whether the file at this 0-based position within its (sorted) class is in the test split of
/// the default hold-out (every [`HOLDOUT_EVERY`]th file).
pub fn is_held_out(position_in_class: usize) -> bool {
    position_in_class % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
}

/// Whether the file at this 0-based position within its (sorted) class is in the test split when
/// `test_fraction` of each class is held out: `floor((p + 1) f) > floor(p f)`. A fraction outside
/// [0, 1) (or NaN) is clamped into it.
pub fn is_held_out_at(position_in_class: usize, test_fraction: f64) -> bool {
    held_out_count(position_in_class + 1, test_fraction)
        > held_out_count(position_in_class, test_fraction)
}

/// How many of the first `n` files of a class are held out: `floor(n f)`, computed so that a
/// decimal fraction such as 0.1 or 0.57 gives the exact count (a tiny margin absorbs the rounding
/// of `n * f`).
fn held_out_count(n: usize, test_fraction: f64) -> usize {
    let f = if test_fraction.is_nan() {
        0.0
    } else {
        test_fraction.clamp(0.0, 1.0)
    };
    (n as f64 * f + 1e-9).floor() as usize
}

/// Checks a test fraction: finite and in [0, 1).
pub fn check_test_fraction(test_fraction: f64) -> Result<()> {
    if (0.0..1.0).contains(&test_fraction) {
        Ok(())
    } else {
        Err(DataError::Config(format!(
            "test_fraction {test_fraction} is outside [0, 1): it is the share of each class held \
             out for the test split (0 keeps every image for training, default 0.1)"
        )))
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(DataError::io(dir))? {
        let entry = entry.map_err(DataError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, so linked class folders and images work.
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The name of a flat folder's one class: the folder's own name (resolved for `.` and the like).
fn folder_name(root: &Path) -> String {
    root.file_name()
        .map(|n| n.to_owned())
        .or_else(|| {
            std::fs::canonicalize(root)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_owned()))
        })
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".to_string())
}

/// Lists the classes and image files of a folder: class sub-folders, or images directly in it
/// (one class named after the folder); both at once is an error naming the folder.
pub fn scan(root: &Path) -> Result<FolderIndex> {
    if !root.is_dir() {
        return Err(DataError::MissingFile {
            path: root.into(),
            hint: "expected a folder of images, or one with a sub-folder of images per class \
                   (for Flowers run `cargo xtask fetch-data flowers`)"
                .to_string(),
        });
    }
    let entries = sorted_entries(root)?;
    let top_images: Vec<PathBuf> = entries
        .iter()
        .filter(|(_, path, is_dir)| !is_dir && is_image(path))
        .map(|(_, path, _)| path.clone())
        .collect();
    let mut index = FolderIndex {
        root: root.into(),
        classes: Vec::new(),
        files: Vec::new(),
        flat: false,
    };
    let mut class_dirs_with_images = Vec::new();
    for (name, class_dir, is_dir) in &entries {
        if !is_dir {
            continue;
        }
        let label = index.classes.len() as u32;
        index.classes.push(name.clone());
        let before = index.files.len();
        for (_, file, is_dir) in sorted_entries(class_dir)? {
            if !is_dir && is_image(&file) {
                index.files.push((file, label));
            }
        }
        if index.files.len() > before {
            class_dirs_with_images.push(name.clone());
        }
    }
    if !top_images.is_empty() {
        if !class_dirs_with_images.is_empty() {
            return Err(DataError::MixedLayout {
                path: root.into(),
                top_level: top_images.len(),
                class_folders: class_dirs_with_images,
            });
        }
        // A flat folder: one class; sub-folders without images are ignored.
        return Ok(FolderIndex {
            root: root.into(),
            classes: vec![folder_name(root)],
            files: top_images.into_iter().map(|p| (p, 0)).collect(),
            flat: true,
        });
    }
    if index.files.is_empty() {
        return Err(DataError::Empty {
            path: root.into(),
            reason: format!(
                "no .jpg, .jpeg, .png or .gif files in it or in its {} sub-folders",
                index.classes.len()
            ),
        });
    }
    Ok(index)
}

/// Whether a directory directly holds at least one image file.
pub(crate) fn scan_class_has_images(dir: &Path) -> Result<bool> {
    Ok(sorted_entries(dir)?
        .iter()
        .any(|(_, path, is_dir)| !is_dir && is_image(path)))
}

/// Reads and decodes one image file, center-crops it to a square and resizes it to `size`;
/// returns its (3, size, size) RGB bytes.
pub fn load_image(path: &Path, size: u32) -> Result<Vec<u8>> {
    let bytes = crate::regular::read(
        path,
        "remove it from the folder or put an image file in its place",
    )?;
    decode_image(bytes, path, size)
}

/// Decodes the bytes of a JPEG, PNG or GIF file like [`load_image`]; `path` only names the file
/// in errors.
pub fn decode_image(bytes: Vec<u8>, path: &Path, size: u32) -> Result<Vec<u8>> {
    let decode_err = |source| DataError::Decode {
        path: path.into(),
        source,
    };
    // A header may lie about the image's size: refuse sizes that no JPEG, PNG or GIF of this
    // many bytes can hold before the decoder allocates for them.
    let (w, h) = ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(image::ImageError::IoError(e)))?
        .into_dimensions()
        .map_err(decode_err)?;
    let decoded = u64::from(w) * u64::from(h) * 4;
    if decoded > MAX_DECODED_ANY && decoded > MAX_EXPANSION * bytes.len() as u64 {
        return Err(DataError::BadHeader {
            path: path.into(),
            reason: format!(
                "the header claims {w}x{h} pixels, more than a {}-byte file can encode",
                bytes.len()
            ),
        });
    }
    // Decoders fill in whatever a cut-short file lacks (JPEG) or stop early without a word (a PNG
    // without its IEND chunk): check that the file runs to its format's end marker before decoding
    // (a file too short to hold its header has already failed above).
    if let Err(reason) = check_image_complete(&bytes) {
        return Err(DataError::TruncatedImage {
            path: path.into(),
            reason,
        });
    }
    let image = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(image::ImageError::IoError(e)))?
        .decode()
        .map_err(|e| match e {
            // The decoder's own cap ("Memory limit exceeded" alone reads as the machine's).
            image::ImageError::Limits(_) => DataError::BadHeader {
                path: path.into(),
                reason: format!(
                    "the image is {w}x{h} pixels, more than the image decoder's 512 MiB limit \
                     allows: downscale it (to skip such files, set `skip_corrupt = true` under \
                     `[data]` in the config)"
                ),
            },
            e => decode_err(e),
        })?;
    let rgb = image.to_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(DataError::Empty {
            path: path.into(),
            reason: "the image has no pixels".to_string(),
        });
    }
    Ok(transform::rgb_to_chw(&transform::resize_square(&rgb, size)))
}

/// Checks that the bytes of a JPEG, PNG or GIF file are complete: that they hold every segment,
/// chunk or block they start and reach the format's end marker (JPEG's end-of-image `FF D9`,
/// PNG's `IEND` chunk, GIF's trailer `3B`); the reason when they do not. Bytes after the end
/// marker are allowed; other formats are left to the decoder.
pub fn check_image_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => check_jpeg_complete(bytes),
        Ok(ImageFormat::Png) => check_png_complete(bytes),
        Ok(ImageFormat::Gif) => check_gif_complete(bytes),
        _ => Ok(()),
    }
}

fn cut_short(len: usize, what: &str, at: usize, end: &str) -> std::result::Result<(), String> {
    Err(format!(
        "the file ends ({len} bytes) {what} at byte {at}, before the {end}: it is cut short (an \
         interrupted copy or download?)"
    ))
}

/// PNG: the 8-byte signature, then chunks of (length, type, data, CRC) up to `IEND`.
fn check_png_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let len = bytes.len();
    let mut pos = 8;
    loop {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return cut_short(len, "inside a chunk header", pos, "PNG IEND chunk");
        };
        let data = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = pos.saturating_add(12).saturating_add(data);
        if end > len {
            let name = String::from_utf8_lossy(&head[4..8]).into_owned();
            return cut_short(
                len,
                &format!("inside chunk {name:?} ({data} bytes)"),
                pos,
                "PNG IEND chunk",
            );
        }
        if &head[4..8] == b"IEND" {
            return Ok(());
        }
        pos = end;
    }
}

/// GIF: header, logical screen descriptor and global colour table, then extension and image
/// blocks (each a chain of sub-blocks ended by a zero length) up to the trailer `3B`.
fn check_gif_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    const END: &str = "GIF trailer";
    let len = bytes.len();
    let table = |packed: u8| {
        if packed & 0x80 != 0 {
            3usize << ((packed & 7) + 1)
        } else {
            0
        }
    };
    let Some(&packed) = bytes.get(10) else {
        return cut_short(len, "inside the header", 0, END);
    };
    let mut pos = 13 + table(packed);
    // Skips a chain of sub-blocks starting at `pos`; the position after its zero terminator.
    let sub_blocks = |mut pos: usize| -> std::result::Result<usize, usize> {
        loop {
            match bytes.get(pos) {
                None => return Err(pos),
                Some(0) => return Ok(pos + 1),
                Some(&n) => pos += 1 + usize::from(n),
            }
        }
    };
    loop {
        match bytes.get(pos) {
            None => return cut_short(len, "between blocks", pos, END),
            Some(0x3B) => return Ok(()),
            Some(0x21) => {
                pos = sub_blocks(pos + 2)
                    .or_else(|at| cut_short(len, "inside an extension block", at, END).map(|_| 0))?
            }
            Some(0x2C) => {
                let Some(&packed) = bytes.get(pos + 9) else {
                    return cut_short(len, "inside an image descriptor", pos, END);
                };
                // Descriptor (10 bytes), local colour table, LZW code size, then the data.
                let data = pos + 10 + table(packed) + 1;
                pos = sub_blocks(data)
                    .or_else(|at| cut_short(len, "inside the image data", at, END).map(|_| 0))?
            }
            Some(&other) => {
                return Err(format!(
                    "unexpected byte {other:#04x} at byte {pos} where a GIF block should start"
                ))
            }
        }
    }
}

/// Checks that the bytes of a JPEG file hold every segment they start and reach the end-of-image
/// marker (`FF D9`); the reason when they do not. Bytes after the marker are allowed.
///
/// The walk follows the marker segments (each with its 2-byte length) and, after each start of
/// scan, the entropy-coded data up to the next marker (`FF 00` is a stuffed byte, `FF D0`..`FF D7`
/// restart markers, `FF FF` fill), so a file cut anywhere before its end-of-image marker is caught.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let len = bytes.len();
    let cut = |what: &str, at: usize| cut_short(len, what, at, "JPEG end-of-image marker");
    if len < 2 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return Err("no JPEG start-of-image marker (FF D8)".to_string());
    }
    let mut pos = 2;
    loop {
        // Find the next marker: decoders skip stray bytes before it, and so do we.
        while pos < len && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < len && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return cut("while looking for the next marker", pos);
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length: TEM, RSTn, SOI, and a stuffed zero.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return cut(
                &format!("inside the length of segment FF {marker:02X}"),
                pos,
            );
        };
        let seg = usize::from(u16::from_be_bytes([hi, lo]));
        if seg < 2 {
            return Err(format!(
                "segment FF {marker:02X} at byte {} declares a length of {seg}",
                pos - 2
            ));
        }
        if pos + seg > len {
            return cut(
                &format!("inside segment FF {marker:02X} ({seg} bytes)"),
                pos - 2,
            );
        }
        pos += seg;
        if marker == 0xDA {
            // Entropy-coded data up to the next marker that is not a restart or stuffing.
            loop {
                while pos < len && bytes[pos] != 0xFF {
                    pos += 1;
                }
                let Some(&next) = bytes.get(pos + 1) else {
                    return cut("inside the compressed image data", pos);
                };
                match next {
                    0x00 | 0xD0..=0xD7 => pos += 2,
                    0xFF => pos += 1,
                    _ => break,
                }
            }
        }
    }
}

/// Runs `f(i)` for `i` in `0..n` on `threads` threads, returning the results in order.
///
/// Stops handing out work after the first `Err` when `stop_on_error` is set (later items then
/// hold `None`).
pub(crate) fn parallel_map<T, F>(
    n: usize,
    threads: usize,
    stop_on_error: bool,
    f: F,
) -> Vec<Option<Result<T>>>
where
    T: Send,
    F: Fn(usize) -> Result<T> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = threads.clamp(1, n.max(1));
    let mut results: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    let parts: Vec<Vec<(usize, Result<T>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        if stop_on_error && failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let r = f(i);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for (i, r) in parts.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
}

/// Decoded images of a folder split: pixels at the target size, labels, and skipped files.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// (3, size, size) bytes per image, concatenated.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Files that could not be decoded and were skipped (only with `skip_corrupt`).
    pub skipped: Vec<PathBuf>,
}

/// Decodes files in parallel to `size` x `size` RGB.
///
/// A file that cannot be read or decoded is an error naming it, unless `skip_corrupt` is set: then
/// it is logged with `tracing::warn!`, left out and listed in [`Decoded::skipped`].
pub fn decode_all(
    files: &[(PathBuf, u32)],
    size: u32,
    threads: usize,
    skip_corrupt: bool,
) -> Result<Decoded> {
    let results = parallel_map(files.len(), threads, !skip_corrupt, |i| {
        load_image(&files[i].0, size)
    });
    let image_len = 3 * (size as usize).pow(2);
    let mut out = Decoded {
        pixels: Vec::with_capacity(files.len() * image_len),
        ..Decoded::default()
    };
    let mut first_error = None;
    for ((path, label), result) in files.iter().zip(results) {
        match result {
            Some(Ok(pixels)) => {
                out.pixels.extend_from_slice(&pixels);
                out.labels.push(*label);
            }
            Some(Err(e)) if skip_corrupt => {
                tracing::warn!(file = %path.display(), error = %e.chain(), "skipping unreadable image");
                out.skipped.push(path.clone());
            }
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if !out.skipped.is_empty() {
        tracing::warn!(skipped = out.skipped.len(), "skipped unreadable images");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn make_folder(dir: &Path, classes: &[(&str, usize)]) {
        for (class, n) in classes {
            let cdir = dir.join(class);
            std::fs::create_dir_all(&cdir).unwrap();
            for i in 0..*n {
                let img = RgbImage::from_pixel(8, 6, Rgb([i as u8, 0, 0]));
                img.save(cdir.join(format!("img{i:02}.png"))).unwrap();
            }
        }
    }

    #[test]
    fn scan_sorts_classes_and_files_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path(), &[("b", 3), ("a", 2)]);
        std::fs::write(dir.path().join("a/notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("SHA256SUMS"), "x").unwrap();
        std::fs::create_dir(dir.path().join(".hidden")).unwrap();
        let index = scan(dir.path()).unwrap();
        assert_eq!(index.classes, vec!["a", "b"]);
        assert_eq!(index.class_counts(), vec![2, 3]);
        assert!(index.files[0].0.ends_with("a/img00.png"));
        assert_eq!(index.files[4].1, 1);
    }

    #[test]
    fn holdout_takes_every_tenth_file_per_class() {
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path(), &[("a", 25), ("b", 9)]);
        let index = scan(dir.path()).unwrap();
        let test = index.split(Split::Test);
        let names: Vec<String> = test
            .iter()
            .map(|(p, _)| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["a/img09.png", "a/img19.png"]);
        assert_eq!(index.split(Split::Train).len(), 32);
        assert_eq!(index.split(Split::All).len(), 34);
    }

    #[test]
    fn empty_or_missing_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            scan(&dir.path().join("nope")),
            Err(DataError::MissingFile { .. })
        ));
        std::fs::create_dir(dir.path().join("a")).unwrap();
        assert!(matches!(scan(dir.path()), Err(DataError::Empty { .. })));
    }

    #[test]
    fn corrupt_files_stop_with_their_name_or_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path(), &[("a", 3)]);
        let bad = dir.path().join("a/img01.png");
        // A PNG signature followed by garbage, and a JPEG that is cut short.
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\n garbage").unwrap();
        let truncated = dir.path().join("a/img02.jpg");
        let mut jpeg = Vec::new();
        RgbImage::from_pixel(16, 16, Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        std::fs::write(&truncated, &jpeg[..jpeg.len() / 3]).unwrap();
        let index = scan(dir.path()).unwrap();
        assert_eq!(index.files.len(), 4);
        let err = decode_all(&index.files, 4, 2, false).unwrap_err();
        match &err {
            DataError::Decode { path, .. } => assert_eq!(path, &bad),
            other => panic!("expected Decode, got {other:?}"),
        }
        assert!(err.to_string().contains("img01.png"));
        let ok = decode_all(&index.files, 4, 2, true).unwrap();
        assert_eq!(ok.labels.len(), 2);
        assert_eq!(ok.skipped, vec![bad, truncated]);
        assert_eq!(ok.pixels.len(), 2 * 3 * 16);
    }

    /// A 64x64 JPEG of noise (a few KB, so that a cut leaves part of its compressed data).
    fn noisy_jpeg() -> Vec<u8> {
        let mut state = 12345u32;
        let img = RgbImage::from_fn(64, 64, |_, _| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let [a, b, c, _] = state.to_le_bytes();
            Rgb([a, b, c])
        });
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        jpeg
    }

    #[test]
    fn truncated_jpegs_are_errors_naming_the_file_or_are_skipped() {
        let jpeg = noisy_jpeg();
        assert!(jpeg.len() > 3000, "{} bytes", jpeg.len());
        assert_eq!(check_image_complete(&jpeg), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.jpg");
        std::fs::write(&good, &jpeg).unwrap();
        assert_eq!(load_image(&good, 8).unwrap().len(), 3 * 64);
        // Bytes after the end-of-image marker are allowed.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"trailer");
        let path = dir.path().join("trailing.jpg");
        std::fs::write(&path, &trailing).unwrap();
        assert!(load_image(&path, 8).is_ok());
        let n = jpeg.len();
        for cut in [
            3,
            100,
            700,
            800,
            900,
            1000,
            1030,
            n / 2,
            n - 100,
            n - 2,
            n - 1,
        ] {
            let path = dir.path().join(format!("cut{cut}.jpg"));
            std::fs::write(&path, &jpeg[..cut]).unwrap();
            match load_image(&path, 8) {
                Err(e @ DataError::TruncatedImage { .. }) => {
                    assert!(e.to_string().contains(&format!("cut{cut}.jpg")), "{e}")
                }
                // Too short for a header: the decoder says so.
                Err(DataError::Decode { .. }) if cut <= 100 => {}
                other => panic!("{cut} of {n} bytes: expected TruncatedImage, got {other:?}"),
            }
        }
        // In a folder: the load stops with the file's name, or skips and counts it.
        let folder = dir.path().join("set");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("a.jpg"), &jpeg).unwrap();
        std::fs::write(folder.join("b.jpg"), &jpeg[..1030]).unwrap();
        let index = scan(&folder).unwrap();
        let err = decode_all(&index.files, 8, 2, false).unwrap_err();
        assert!(
            matches!(&err, DataError::TruncatedImage { path, .. } if path.ends_with("b.jpg")),
            "{err}"
        );
        let ok = decode_all(&index.files, 8, 2, true).unwrap();
        assert_eq!((ok.labels.len(), ok.skipped.len()), (1, 1));
    }

    #[test]
    fn truncated_pngs_and_gifs_are_errors() {
        let jpeg = noisy_jpeg();
        let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        let dir = tempfile::tempdir().unwrap();
        for format in [image::ImageFormat::Png, image::ImageFormat::Gif] {
            let mut bytes = Vec::new();
            let encoded = if format == image::ImageFormat::Gif {
                image::DynamicImage::ImageRgb8(img.clone())
                    .to_rgba8()
                    .into()
            } else {
                image::DynamicImage::ImageRgb8(img.clone())
            };
            encoded
                .write_to(&mut Cursor::new(&mut bytes), format)
                .unwrap();
            assert_eq!(check_image_complete(&bytes), Ok(()), "{format:?}");
            let n = bytes.len();
            let mut decoded = Vec::new();
            for cut in [7, 12, 20, 700, 1030, n / 2, n - 20, n - 2, n - 1] {
                let path = dir
                    .path()
                    .join(format!("cut{cut}.{}", format.extensions_str()[0]));
                std::fs::write(&path, &bytes[..cut]).unwrap();
                match load_image(&path, 8) {
                    Err(e) => assert!(e.to_string().contains(&format!("cut{cut}")), "{e}"),
                    Ok(_) => decoded.push(cut),
                }
            }
            assert!(
                decoded.is_empty(),
                "{format:?} of {n} bytes cut at {decoded:?} decoded"
            );
            bytes.extend_from_slice(b"trailer");
            assert_eq!(check_image_complete(&bytes), Ok(()), "{format:?}");
        }
    }

    #[test]
    fn flat_folders_are_one_class_and_mixed_layouts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let flat = dir.path().join("cats");
        std::fs::create_dir(&flat).unwrap();
        for i in 0..12 {
            RgbImage::from_pixel(4, 4, Rgb([i, 0, 0]))
                .save(flat.join(format!("{i:02}.png")))
                .unwrap();
        }
        std::fs::write(flat.join("notes.txt"), "x").unwrap();
        std::fs::create_dir(flat.join("empty")).unwrap();
        let index = scan(&flat).unwrap();
        assert!(index.flat);
        assert_eq!(index.classes, vec!["cats"]);
        assert_eq!(index.files.len(), 12);
        assert_eq!(index.split(Split::Test).len(), 1);
        // A folder given as `.`-like path is named after what it resolves to.
        let index = scan(&flat.join("empty/..")).unwrap();
        assert_eq!(index.classes.len(), 1);

        make_folder(&flat, &[("kittens", 2)]);
        let err = scan(&flat).unwrap_err();
        assert!(matches!(err, DataError::MixedLayout { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("cats") && text.contains("kittens"), "{text}");
    }

    #[test]
    fn test_fractions_hold_out_floor_n_f_per_class_spread_evenly() {
        // 0.1 is the every-10th hold-out.
        for p in 0..1000 {
            assert_eq!(is_held_out_at(p, 0.1), is_held_out(p), "position {p}");
            assert!(!is_held_out_at(p, 0.0));
        }
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path(), &[("a", 25), ("b", 9)]);
        let index = scan(dir.path()).unwrap();
        assert_eq!(index.split_with(Split::Test, 0.1), index.split(Split::Test));
        assert_eq!(index.split_counts(0.1), (32, 2));
        assert_eq!(index.split_counts(0.0), (34, 0));
        assert!(index.split_with(Split::Test, 0.0).is_empty());
        assert_eq!(index.split_with(Split::Train, 0.0).len(), 34);
        // floor(25 / 4) + floor(9 / 4) = 6 + 2; positions 3, 7, 11, ...
        assert_eq!(index.split_counts(0.25), (26, 8));
        let test = index.split_with(Split::Test, 0.25);
        assert!(test[0].0.ends_with("a/img03.png") && test[1].0.ends_with("a/img07.png"));
        // Decimal fractions give exact counts although n * f rounds below the integer.
        for (n, f, held) in [
            (100, 0.57, 57),
            (100, 0.29, 29),
            (1000, 0.3, 300),
            (7, 0.5, 3),
        ] {
            assert_eq!(held_out_count(n, f), held, "{n} * {f}");
            assert_eq!((0..n).filter(|&p| is_held_out_at(p, f)).count(), held);
        }
        assert!(check_test_fraction(0.0).is_ok() && check_test_fraction(0.99).is_ok());
        for bad in [1.0, -0.1, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                check_test_fraction(bad),
                Err(DataError::Config(_))
            ));
        }
    }

    #[test]
    fn images_are_cropped_and_resized_to_rgb_planes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        // 12x6 grey image: the centered 6x6 crop is the value 200, the sides 0.
        image::GrayImage::from_fn(12, 6, |x, _| {
            image::Luma([if (3..9).contains(&x) { 200 } else { 0 }])
        })
        .save(&path)
        .unwrap();
        let px = load_image(&path, 3).unwrap();
        assert_eq!(px, vec![200; 27]);
    }

    /// A FIFO named like an image is refused by name before it is opened (which would block),
    /// like a dangling symlink, and skipped with `skip_corrupt`.
    #[cfg(unix)]
    #[test]
    fn a_fifo_named_like_an_image_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path(), &[("a", 3)]);
        let fifo = dir.path().join("a/zz.png");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let index = scan(dir.path()).unwrap();
        assert_eq!(index.files.len(), 4);
        let e = decode_all(&index.files, 4, 2, false).unwrap_err();
        let chain = e.chain();
        assert!(chain.contains("zz.png"), "{chain}");
        assert!(
            chain.contains("a FIFO (named pipe), not a regular file"),
            "{chain}"
        );
        let decoded = decode_all(&index.files, 4, 2, true).unwrap();
        assert_eq!(decoded.skipped, vec![fifo]);
        assert_eq!(decoded.labels.len(), 3);
    }

    /// A PNG whose 12000x12000 pixels pass the size-per-byte check (a 150 KB ancillary chunk)
    /// but not the decoder's 512 MiB cap: the error gives the size and what to do, not the
    /// decoder's bare "Memory limit exceeded".
    #[test]
    fn an_image_above_the_decoders_limit_is_named_with_its_size() {
        fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            let mut out = (data.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&crc.sum().to_be_bytes());
            out
        }
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&12000u32.to_be_bytes());
        ihdr.extend_from_slice(&12000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"zzZz", &vec![0; 150_000]));
        png.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(chunk(b"IEND", &[]));
        let err = decode_image(png, Path::new("big.png"), 8).unwrap_err();
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("12000x12000") && text.contains("downscale"),
            "{text}"
        );
    }

    #[test]
    fn parallel_map_keeps_order() {
        let r = parallel_map(100, 3, false, |i| Ok(i * 2));
        let v: Vec<usize> = r.into_iter().map(|x| x.unwrap().unwrap()).collect();
        assert_eq!(v, (0..100).map(|i| i * 2).collect::<Vec<_>>());
    }
}
