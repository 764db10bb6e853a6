//! Image folders: one sub-folder per class, JPEG, PNG or GIF images inside (Flowers is one).
//!
//! Classes are the sub-folders in byte order of their names (hidden ones skipped); files are the
//! images in each, in byte order of their names; other files are ignored.
//!
//! Folders have no canonical split, so a fixed per-class hold-out is used: within each class, in
//! sorted order, every [`HOLDOUT_EVERY`]th file (positions 9, 19, 29, ... counting from 0) is in
//! the test split and all others in the training split. For Flowers that is 430 test images
//! (daisy 76, dandelion 105, rose 78, sunflower 73, tulip 98) and 3,887 training images. The split
//! depends only on file names, so it does not change when a corrupt file is skipped.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use image::ImageReader;

use crate::error::{DataError, Result};
use crate::spec::Split;
use crate::transform;

/// The file extensions (compared case-insensitively) read as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "gif"];
/// One file in this many per class is held out for the test split (see the module doc).
pub const HOLDOUT_EVERY: usize = 10;
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
    /// The class names (sub-folder names), in label order.
    pub classes: Vec<String>,
    /// Every image file with its label, class by class, sorted.
    pub files: Vec<(PathBuf, u32)>,
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

    /// The files of a split (see the module doc), keeping their order.
    pub fn split(&self, split: Split) -> Vec<(PathBuf, u32)> {
        let mut position = vec![0usize; self.classes.len()];
        self.files
            .iter()
            .filter(|(_, label)| {
                let p = &mut position[*label as usize];
                let held_out = is_held_out(*p);
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
}

/// Whether the file at this 0-based position within its (sorted) class is in the test split.
pub fn is_held_out(position_in_class: usize) -> bool {
    position_in_class % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
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

/// Lists the classes and image files of a folder.
pub fn scan(root: &Path) -> Result<FolderIndex> {
    if !root.is_dir() {
        return Err(DataError::MissingFile {
            path: root.into(),
            hint: "expected a folder with one sub-folder of images per class (for Flowers run \
                   `cargo xtask fetch-data flowers`)"
                .to_string(),
        });
    }
    let mut index = FolderIndex {
        root: root.into(),
        classes: Vec::new(),
        files: Vec::new(),
    };
    for (name, class_dir, is_dir) in sorted_entries(root)? {
        if !is_dir {
            continue;
        }
        let label = index.classes.len() as u32;
        index.classes.push(name);
        for (_, file, is_dir) in sorted_entries(&class_dir)? {
            if !is_dir && is_image(&file) {
                index.files.push((file, label));
            }
        }
    }
    if index.files.is_empty() {
        return Err(DataError::Empty {
            path: root.into(),
            reason: format!(
                "{} class folders, none holding .jpg, .jpeg, .png or .gif files",
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
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
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
    let image = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(image::ImageError::IoError(e)))?
        .decode()
        .map_err(decode_err)?;
    let rgb = image.to_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(DataError::Empty {
            path: path.into(),
            reason: "the image has no pixels".to_string(),
        });
    }
    Ok(transform::rgb_to_chw(&transform::resize_square(&rgb, size)))
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

    #[test]
    fn parallel_map_keeps_order() {
        let r = parallel_map(100, 3, false, |i| Ok(i * 2));
        let v: Vec<usize> = r.into_iter().map(|x| x.unwrap().unwrap()).collect();
        assert_eq!(v, (0..100).map(|i| i * 2).collect::<Vec<_>>());
    }
}
