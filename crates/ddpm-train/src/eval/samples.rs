//! Samples from files, for `ddpm eval --samples`: a folder of images (ours or another tool's) or
//! one grid image as our grid writer lays it out, turned into a batch of images of a data set's
//! channels and size, and scored with the tool's classifier ([`super::recognisable`]).
//!
//! **A folder**: every `.png`, `.jpg` and `.jpeg` file directly in it (not in sub-folders), in
//! sorted file-name order; other files are skipped (and counted in a note). **A grid**: the
//! layout of [`ddpm_data::image_io::image_grid`] (and of torchvision's `make_grid` with its
//! defaults): square cells of side `H` in columns and rows, [`GRID_PADDING`] pixels of
//! background before, between and after them, so a grid of `cols x rows` cells is
//! `cols (H + p) + p` pixels wide and `rows (H + p) + p` high. Cells are read row by row; empty
//! cells at the end of the last row (every value at most [`EMPTY_LEVEL`], what the writer leaves
//! when the count does not fill the row) are dropped and counted in a note, unless a count is
//! given.
//!
//! **Channels**: RGB images become gray, for a 1-channel data set, by ITU-R 601 luma
//! (`(299 R + 587 G + 114 B) / 1000`, rounded: what PIL's `convert("L")` does; the gray RGB our
//! grid writer stores comes back exactly); gray images are repeated into 3 channels for an RGB
//! data set; alpha is dropped. **Size**: images (or grid cells) of another size are center-cropped
//! to a square and resized to the data set's size with the data sets' own filter (Catmull-Rom),
//! with a note saying so, unless `strict_size` is set: then they are an error.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ddpm_data::folder::check_image_complete;
use ddpm_data::image_io::GRID_PADDING;
use ddpm_data::transform::{resize_square, u8_to_signed};
use image::{ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// A grid cell whose every value is at most this level counts as empty (background).
pub const EMPTY_LEVEL: u8 = 8;
/// The largest image accepted, in pixels (a grid of 10,000 MNIST cells is about 9 megapixels).
pub const MAX_PIXELS: u64 = 1 << 28;
/// File extensions read from a folder (case-insensitive).
pub const SAMPLE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// How to read samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleLoadOptions {
    /// Channels of the data set (1 or 3).
    pub channels: usize,
    /// Side of the data set's images.
    pub image_size: usize,
    /// Side of a grid cell (default: `image_size`).
    pub grid_cell: Option<usize>,
    /// Pixels of padding around the cells of a grid.
    pub grid_padding: usize,
    /// Take the first `n` cells of a grid (default: all but empty trailing cells).
    pub grid_count: Option<usize>,
    /// Refuse images of another size instead of resizing them.
    pub strict_size: bool,
}

impl SampleLoadOptions {
    /// Options for a data set's channels and image size, with the defaults otherwise.
    pub fn new(channels: usize, image_size: usize) -> Self {
        Self {
            channels,
            image_size,
            grid_cell: None,
            grid_padding: GRID_PADDING as usize,
            grid_count: None,
            strict_size: false,
        }
    }
}

/// Where the samples came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SampleSource {
    /// A folder of images.
    Folder {
        /// Image files read.
        files: usize,
        /// Other files skipped.
        skipped: usize,
    },
    /// One grid image.
    Grid {
        /// Width of the grid image.
        width: usize,
        /// Its height.
        height: usize,
        /// Side of a cell.
        cell: usize,
        /// Padding pixels.
        padding: usize,
        /// Cells per row.
        columns: usize,
        /// Rows of cells.
        rows: usize,
        /// Empty trailing cells dropped.
        empty_cells_dropped: usize,
    },
}

/// Samples read from files.
#[derive(Debug, Clone)]
pub struct LoadedSamples {
    /// The images, `(n, channels, size, size)` in [-1, 1] on the CPU.
    pub images: Tensor,
    /// Where they came from.
    pub source: SampleSource,
    /// Images (or cells) resized to the data set's size.
    pub resized: usize,
    /// Images converted to the data set's channels.
    pub converted: usize,
    /// What was done to them that a reader of the numbers should know.
    pub notes: Vec<String>,
}

fn err(msg: String) -> TrainError {
    TrainError::Other(msg)
}

/// Decodes one image file to RGB, refusing files cut short or claiming absurd sizes.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = ddpm_fs::read_regular_file(path, u64::MAX)
        .map_err(|e| TrainError::io(path, "reading", e))?;
    let bad = |why: String| err(format!("{}: {why}", path.display()));
    let (w, h) = ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot be read as an image ({e})")))?
        .into_dimensions()
        .map_err(|e| bad(format!("is not a readable image ({e})")))?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS || w == 0 || h == 0 {
        return Err(bad(format!(
            "is {w}x{h} pixels: not an image of samples this program reads"
        )));
    }
    check_image_complete(&bytes).map_err(bad)?;
    let image = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot be read as an image ({e})")))?
        .decode()
        .map_err(|e| bad(format!("is not a readable image ({e})")))?;
    Ok(image.to_rgb8())
}

/// ITU-R 601 luma of an RGB pixel, rounded.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    let v = 299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b);
    ((v + 500) / 1000) as u8
}

/// Whether an RGB image has any pixel whose channels differ.
fn is_colour(img: &RgbImage) -> bool {
    img.pixels().any(|p| p.0[0] != p.0[1] || p.0[1] != p.0[2])
}

/// Appends the `(channels, s, s)` values in [-1, 1] of a square RGB image of side `s` to `out`.
fn push_chw(img: &RgbImage, channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend(
            img.pixels()
                .map(|p| u8_to_signed(luma(p.0[0], p.0[1], p.0[2]))),
        );
    } else {
        for c in 0..3 {
            out.extend(img.pixels().map(|p| u8_to_signed(p.0[c])));
        }
    }
}

/// Brings one image to the data set's square size (or refuses), counting what was done.
struct Converter<'a> {
    opts: &'a SampleLoadOptions,
    resized: usize,
    converted: usize,
    first_resized: Option<(String, u32, u32)>,
    values: Vec<f32>,
    count: usize,
}

impl<'a> Converter<'a> {
    fn new(opts: &'a SampleLoadOptions) -> Self {
        Self {
            opts,
            resized: 0,
            converted: 0,
            first_resized: None,
            values: Vec::new(),
            count: 0,
        }
    }

    fn push(&mut self, img: &RgbImage, what: &dyn Fn() -> String) -> Result<()> {
        let s = self.opts.image_size as u32;
        let (w, h) = img.dimensions();
        let sized;
        let img = if (w, h) == (s, s) {
            img
        } else {
            if self.opts.strict_size {
                return Err(err(format!(
                    "{} is {w}x{h} pixels, not the data set's {s}x{s} (--strict-size): resize \
                     the samples, or drop --strict-size to have them resized",
                    what()
                )));
            }
            self.resized += 1;
            self.first_resized.get_or_insert_with(|| (what(), w, h));
            sized = resize_square(img, s);
            &sized
        };
        let colour = is_colour(img);
        if (self.opts.channels == 1 && colour) || self.opts.channels == 3 && !colour {
            self.converted += 1;
        }
        push_chw(img, self.opts.channels, &mut self.values);
        self.count += 1;
        Ok(())
    }

    fn finish(self, source: SampleSource, mut notes: Vec<String>) -> Result<LoadedSamples> {
        let (c, s) = (self.opts.channels, self.opts.image_size);
        if let Some((what, w, h)) = &self.first_resized {
            notes.push(format!(
                "{} of {} images were not {s}x{s} and were center-cropped and resized to it \
                 (the first: {what}, {w}x{h}); pass --strict-size to refuse them",
                self.resized, self.count
            ));
        }
        if self.converted > 0 {
            notes.push(if c == 1 {
                format!(
                    "{} of {} images were in colour and were converted to gray (ITU-R 601 luma)",
                    self.converted, self.count
                )
            } else {
                format!(
                    "{} of {} images were gray and were repeated into 3 channels",
                    self.converted, self.count
                )
            });
        }
        let images = Tensor::from_vec(self.values, (self.count, c, s, s), &Device::Cpu)?;
        Ok(LoadedSamples {
            images,
            source,
            resized: self.resized,
            converted: self.converted,
            notes,
        })
    }
}

/// The image files of a folder (not its sub-folders) in sorted name order, and how many other
/// files it holds.
pub fn sample_files(dir: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, "reading the folder", e))?;
    let mut files = Vec::new();
    let mut skipped = 0;
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(dir, "reading the folder", e))?;
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| SAMPLE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
        if is_image {
            files.push(path);
        } else {
            skipped += 1;
        }
    }
    files.sort();
    Ok((files, skipped))
}

/// Reads the images of a folder ([`sample_files`]).
pub fn load_folder(dir: &Path, opts: &SampleLoadOptions) -> Result<LoadedSamples> {
    let (files, skipped) = sample_files(dir)?;
    if files.is_empty() {
        return Err(err(format!(
            "{} holds no .png, .jpg or .jpeg image: put the samples there, or pass a grid image",
            dir.display()
        )));
    }
    let mut conv = Converter::new(opts);
    for f in &files {
        let img = decode_rgb(f)?;
        conv.push(&img, &|| f.display().to_string())?;
    }
    let mut notes = Vec::new();
    if skipped > 0 {
        notes.push(format!(
            "{skipped} files of {} that are not .png, .jpg or .jpeg were skipped",
            dir.display()
        ));
    }
    conv.finish(
        SampleSource::Folder {
            files: files.len(),
            skipped,
        },
        notes,
    )
}

/// The cells of a grid `width x height` with padding `p`: `(columns, rows)` of cells of side
/// `cell`, or `None` when the size is not `n (cell + p) + p` in both directions.
pub fn grid_shape(width: usize, height: usize, cell: usize, p: usize) -> Option<(usize, usize)> {
    let pitch = cell + p;
    let fits = |len: usize| {
        (len > p && cell > 0 && (len - p).is_multiple_of(pitch)).then(|| (len - p) / pitch)
    };
    Some((fits(width)?, fits(height)?))
}

/// Cell sides from 4 up that fit a grid of this size and padding, smallest first.
fn fitting_cells(width: usize, height: usize, p: usize) -> Vec<usize> {
    (4..=width.min(height))
        .filter(|&c| grid_shape(width, height, c, p).is_some())
        .collect()
}

/// The most cells [`split_grid`] takes from one grid image (each becomes an image in memory): far
/// above any sample grid, and a bound on what a mistyped `--grid-cell 1` asks for.
pub const MAX_GRID_CELLS: usize = 1 << 18;

/// Splits a grid image into its cells ([`grid_shape`]), row by row, dropping empty trailing
/// cells of the last row unless `opts.grid_count` says how many to take.
pub fn split_grid(grid: &RgbImage, name: &str, opts: &SampleLoadOptions) -> Result<LoadedSamples> {
    let (w, h) = (grid.width() as usize, grid.height() as usize);
    let p = opts.grid_padding;
    let cell = opts.grid_cell.unwrap_or(opts.image_size);
    if cell == 0 {
        return Err(err(
            "--grid-cell must be at least 1 (the side of one image)".into(),
        ));
    }
    let Some((cols, rows)) = grid_shape(w, h, cell, p) else {
        let pitch = cell + p;
        let fits: Vec<String> = fitting_cells(w, h, p)
            .iter()
            .take(4)
            .map(|c| c.to_string())
            .collect();
        let hint = if fits.is_empty() {
            format!("no cell side fits it with {p}-pixel padding")
        } else {
            format!("cells of side {} would fit (--grid-cell)", fits.join(", "))
        };
        let why = if w <= p || h <= p {
            format!("it is no wider or taller than the {p}-pixel padding itself")
        } else {
            format!(
                "width and height minus {p} must be positive multiples of {pitch}; {} and {} \
                 are not both",
                w - p,
                h - p
            )
        };
        return Err(err(format!(
            "{name} is {w}x{h} pixels, not a grid of {cell}x{cell} cells with {p}-pixel padding \
             ({why}): {hint}, or pass a folder of single images"
        )));
    };
    if cols.saturating_mul(rows) > MAX_GRID_CELLS {
        return Err(err(format!(
            "{name} would split into {cols}x{rows} cells of {cell}x{cell} pixels, more than the \
             {MAX_GRID_CELLS} a grid may hold: check --grid-cell and --grid-padding, or pass a \
             folder of single images"
        )));
    }
    let pitch = cell + p;
    let crop = |k: usize| {
        let (col, row) = (k % cols, k / cols);
        image::imageops::crop_imm(
            grid,
            (p + col * pitch) as u32,
            (p + row * pitch) as u32,
            cell as u32,
            cell as u32,
        )
        .to_image()
    };
    let total = cols * rows;
    let mut notes = Vec::new();
    let (n, dropped) = match opts.grid_count {
        Some(n) if n == 0 || n > total => {
            return Err(err(format!(
                "--grid-count {n}: {name} holds {total} cells ({cols} columns x {rows} rows of \
                 {cell}x{cell}); pass 1..={total}"
            )))
        }
        Some(n) => (n, 0),
        None => {
            let mut n = total;
            while n > total - cols + 1
                && crop(n - 1)
                    .pixels()
                    .all(|px| px.0.iter().all(|&v| v <= EMPTY_LEVEL))
            {
                n -= 1;
            }
            if n < total {
                notes.push(format!(
                    "the last {} cells of the grid's last row are empty (every value <= \
                     {EMPTY_LEVEL}) and were dropped; pass --grid-count {total} to keep them",
                    total - n
                ));
            }
            (n, total - n)
        }
    };
    let mut conv = Converter::new(opts);
    for k in 0..n {
        conv.push(&crop(k), &|| format!("the {cell}x{cell} cells of {name}"))?;
    }
    conv.finish(
        SampleSource::Grid {
            width: w,
            height: h,
            cell,
            padding: p,
            columns: cols,
            rows,
            empty_cells_dropped: dropped,
        },
        notes,
    )
}

/// Reads samples from `path`: a folder ([`load_folder`]) or a grid image ([`split_grid`]).
pub fn load_samples(path: &Path, opts: &SampleLoadOptions) -> Result<LoadedSamples> {
    if !(opts.channels == 1 || opts.channels == 3) || opts.image_size == 0 {
        return Err(err(format!(
            "samples can be read for 1- or 3-channel data of a positive size, not {} channels \
             of side {}",
            opts.channels, opts.image_size
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| TrainError::io(path, "reading", e))?;
    if meta.is_dir() {
        load_folder(path, opts)
    } else {
        split_grid(&decode_rgb(path)?, &path.display().to_string(), opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_data::image_io::image_grid;

    /// `n` gray 1-channel `s x s` images whose pixel (y, x) of image i is `(i * 7 + y * s + x) %
    /// 256`, in [-1, 1].
    fn numbered(n: usize, s: usize) -> (Tensor, Vec<u8>) {
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (0..s * s).map(move |j| ((i * 7 + j + 1) % 256) as u8))
            .collect();
        let t = Tensor::from_vec(
            bytes.iter().map(|&v| u8_to_signed(v)).collect::<Vec<f32>>(),
            (n, 1, s, s),
            &Device::Cpu,
        )
        .expect("t");
        (t, bytes)
    }

    fn to_u8(t: &Tensor) -> Vec<u8> {
        t.flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("v")
            .iter()
            .map(|&v| ddpm_data::transform::signed_to_u8(v))
            .collect()
    }

    #[test]
    fn luma_is_pil_s_and_exact_on_gray() {
        for v in [0u8, 1, 127, 128, 254, 255] {
            assert_eq!(luma(v, v, v), v);
        }
        // 0.299 * 255 = 76.245 -> 76; 0.587 * 255 = 149.685 -> 150; 0.114 * 255 = 29.07 -> 29.
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    /// A 600x600 image read as cells of 1 pixel (360,000 of them; a 4000x4000 one aborted on a
    /// 6.5 GB allocation), a cell of 0 and a 1x1 grid: each one clear error.
    #[test]
    fn grids_that_split_into_too_many_or_no_cells_are_refused() {
        let opts = |cell: usize, padding: usize| SampleLoadOptions {
            grid_cell: Some(cell),
            grid_padding: padding,
            ..SampleLoadOptions::new(3, 28)
        };
        let big = RgbImage::new(600, 600);
        let e = split_grid(&big, "big.png", &opts(1, 0)).expect_err("too many cells");
        assert!(e.to_string().contains("600x600 cells of 1x1 pixels"), "{e}");
        let e = split_grid(&big, "big.png", &opts(0, 0)).expect_err("cell 0");
        assert!(
            e.to_string().contains("--grid-cell must be at least 1"),
            "{e}"
        );
        let e = split_grid(&RgbImage::new(1, 1), "one.png", &opts(28, 2)).expect_err("1x1");
        assert!(
            e.to_string()
                .contains("no wider or taller than the 2-pixel padding"),
            "{e}"
        );
        assert!(split_grid(&RgbImage::new(62, 32), "two.png", &opts(28, 2)).is_ok());
    }

    #[test]
    fn grid_shapes_follow_the_writer() {
        // 10 cells of 28 with nrow = 4: 4 columns, 3 rows: 4 * 30 + 2 by 3 * 30 + 2.
        assert_eq!(grid_shape(122, 92, 28, 2), Some((4, 3)));
        assert_eq!(grid_shape(121, 92, 28, 2), None);
        assert_eq!(grid_shape(2, 92, 28, 2), None);
        assert_eq!(grid_shape(32, 32, 32, 0), Some((1, 1)));
        // Cell sides c with c + 2 dividing both 120 and 90 (so 30): 4, 8, 13, 28.
        assert_eq!(fitting_cells(122, 92, 2), vec![4, 8, 13, 28]);
    }

    #[test]
    fn grids_of_the_writer_split_back_into_their_images() {
        let opts = SampleLoadOptions::new(1, 6);
        for n in [1usize, 2, 4, 5, 9, 10, 16] {
            let (t, bytes) = numbered(n, 6);
            let nrow = (n as f64).sqrt().ceil() as usize;
            let grid = image_grid(&t, nrow).expect("grid");
            let got = split_grid(&grid, "g", &opts).expect("split");
            assert_eq!(got.images.dims(), &[n, 1, 6, 6], "n = {n}");
            assert_eq!(to_u8(&got.images), bytes, "n = {n}");
            assert_eq!((got.resized, got.converted), (0, 0));
            let SampleSource::Grid {
                columns,
                rows,
                empty_cells_dropped,
                ..
            } = got.source
            else {
                panic!("not a grid")
            };
            assert_eq!((columns, rows), (nrow.min(n), n.div_ceil(nrow)));
            assert_eq!(empty_cells_dropped, columns * rows - n);
            assert_eq!(got.notes.is_empty(), columns * rows == n, "{:?}", got.notes);
        }
        // --grid-count keeps empty cells, and is checked.
        let (t, _) = numbered(10, 6);
        let grid = image_grid(&t, 4).expect("grid");
        let all = SampleLoadOptions {
            grid_count: Some(12),
            ..opts.clone()
        };
        assert_eq!(
            split_grid(&grid, "g", &all)
                .expect("12")
                .images
                .dim(0)
                .expect("n"),
            12
        );
        let over = SampleLoadOptions {
            grid_count: Some(13),
            ..opts.clone()
        };
        let e = split_grid(&grid, "g", &over).expect_err("13").to_string();
        assert!(
            e.contains("12 cells") && e.contains("4 columns x 3 rows"),
            "{e}"
        );
    }

    #[test]
    fn grids_of_other_geometry_are_refused_with_the_numbers() {
        let (t, _) = numbered(4, 8);
        let grid = image_grid(&t, 2).expect("grid"); // 2 * 10 + 2 = 22 square
        let e = split_grid(&grid, "g.png", &SampleLoadOptions::new(1, 6))
            .expect_err("6 does not fit")
            .to_string();
        assert!(
            e.contains("g.png is 22x22 pixels")
                && e.contains("multiples of 8")
                && e.contains("side 8, 18"),
            "{e}"
        );
        // The right cell side splits it, resizing each cell to the data set's size.
        let opts = SampleLoadOptions {
            grid_cell: Some(8),
            ..SampleLoadOptions::new(1, 6)
        };
        let got = split_grid(&grid, "g.png", &opts).expect("cell 8");
        assert_eq!(got.images.dims(), &[4, 1, 6, 6]);
        assert_eq!(got.resized, 4);
        assert!(
            got.notes[0].contains("4 of 4 images were not 6x6"),
            "{:?}",
            got.notes
        );
        let strict = SampleLoadOptions {
            strict_size: true,
            ..opts
        };
        let e = split_grid(&grid, "g.png", &strict)
            .expect_err("strict")
            .to_string();
        assert!(e.contains("8x8") && e.contains("--strict-size"), "{e}");
    }

    #[test]
    fn folders_are_read_in_name_order_and_converted() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        // b.png red, a.png gray 50, c.png gray 200 at 8x8; notes.txt and sub/ are skipped.
        RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 0]))
            .save(d.join("b.png"))
            .expect("b");
        RgbImage::from_pixel(4, 4, image::Rgb([50, 50, 50]))
            .save(d.join("a.png"))
            .expect("a");
        image::GrayImage::from_pixel(8, 8, image::Luma([200]))
            .save(d.join("c.png"))
            .expect("c");
        std::fs::write(d.join("notes.txt"), "x").expect("txt");
        std::fs::create_dir(d.join("sub")).expect("sub");
        let got = load_samples(d, &SampleLoadOptions::new(1, 4)).expect("folder");
        assert_eq!(got.images.dims(), &[3, 1, 4, 4]);
        let v = to_u8(&got.images);
        assert!(v[..16].iter().all(|&x| x == 50));
        assert!(v[16..32].iter().all(|&x| x == 76));
        assert!(v[32..].iter().all(|&x| x == 200), "{:?}", &v[32..]);
        assert_eq!(
            got.source,
            SampleSource::Folder {
                files: 3,
                skipped: 1
            }
        );
        assert_eq!((got.resized, got.converted), (1, 1));
        assert_eq!(got.notes.len(), 3, "{:?}", got.notes);
        // Into RGB: the gray ones are repeated.
        let rgb = load_samples(d, &SampleLoadOptions::new(3, 4)).expect("rgb");
        assert_eq!(rgb.images.dims(), &[3, 3, 4, 4]);
        let v = to_u8(&rgb.images);
        assert!(v[48..64].iter().all(|&x| x == 255) && v[64..96].iter().all(|&x| x == 0));
        assert_eq!(rgb.converted, 2);
        // Strict: the 8x8 one is named.
        let strict = SampleLoadOptions {
            strict_size: true,
            ..SampleLoadOptions::new(1, 4)
        };
        let e = load_samples(d, &strict).expect_err("strict").to_string();
        assert!(e.contains("c.png is 8x8"), "{e}");
        // An unreadable file is named.
        std::fs::write(d.join("d.png"), b"not a png").expect("junk");
        let e = load_samples(d, &SampleLoadOptions::new(1, 4))
            .expect_err("junk")
            .to_string();
        assert!(e.contains("d.png"), "{e}");
        // An empty folder says so.
        let empty = d.join("sub");
        let e = load_samples(&empty, &SampleLoadOptions::new(1, 4))
            .expect_err("empty")
            .to_string();
        assert!(e.contains("no .png"), "{e}");
    }
}
