//! Saving images: tensors in [-1, 1] back to `u8` pictures and PNG grids, written whole or
//! not at all ([`write_atomic`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};

use crate::error::{DataError, Result};
use crate::transform::signed_to_u8;

/// Pixels of background between and around the images of a grid.
pub const GRID_PADDING: u32 = 2;

/// Converts images in [-1, 1] of shape (b, c, h, w) or (c, h, w), c = 1 or 3, on any device and
/// of any float dtype, to RGB pictures through the inverse transform ([`signed_to_u8`]).
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = match images.rank() {
        3 => images.unsqueeze(0)?,
        4 => images.clone(),
        _ => return Err(DataError::BadShape(images.dims().to_vec())),
    };
    let (b, c, h, w) = images.dims4()?;
    if !(c == 1 || c == 3) || h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
        return Err(DataError::BadShape(images.dims().to_vec()));
    }
    let values: Vec<f32> = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let plane = h * w;
    Ok(values
        .chunks_exact(c * plane)
        .take(b)
        .map(|img| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let i = y as usize * w + x as usize;
                let v = |ch: usize| signed_to_u8(img[ch * plane + i]);
                if c == 1 {
                    Rgb([v(0); 3])
                } else {
                    Rgb([v(0), v(1), v(2)])
                }
            })
        })
        .collect())
}

/// Lays images in [-1, 1] out in a grid of `nrow` images per row (like torchvision's
/// `make_grid`), with [`GRID_PADDING`] black pixels around each.
pub fn image_grid(images: &Tensor, nrow: usize) -> Result<RgbImage> {
    if nrow == 0 {
        return Err(DataError::Config(
            "a grid needs at least 1 image per row".to_string(),
        ));
    }
    let pictures = tensor_to_images(images)?;
    let Some(first) = pictures.first() else {
        return Err(DataError::BadShape(images.dims().to_vec()));
    };
    let (w, h) = first.dimensions();
    let cols = nrow.min(pictures.len()) as u32;
    let rows = pictures.len().div_ceil(nrow) as u32;
    let p = GRID_PADDING;
    let mut grid = RgbImage::new(cols * (w + p) + p, rows * (h + p) + p);
    for (k, picture) in pictures.iter().enumerate() {
        let (col, row) = ((k % nrow) as u32, (k / nrow) as u32);
        image::imageops::replace(
            &mut grid,
            picture,
            i64::from(p + col * (w + p)),
            i64::from(p + row * (h + p)),
        );
    }
    Ok(grid)
}

/// Writes images in [-1, 1] (shape (b, c, h, w)) as a PNG grid of `nrow` images per row,
/// creating the parent directory if needed.
pub fn save_image_grid(images: &Tensor, nrow: usize, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let grid = image_grid(images, nrow)?;
    save_png(&grid, path)
}

/// Writes one image in [-1, 1] (shape (c, h, w)) as a PNG, creating the parent directory.
pub fn save_image(image: &Tensor, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if image.rank() != 3 {
        return Err(DataError::BadShape(image.dims().to_vec()));
    }
    let picture = tensor_to_images(image)?.remove(0);
    save_png(&picture, path)
}

fn save_png(picture: &RgbImage, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    let bytes = encode(picture, image::ImageFormat::Png, path)?;
    write_atomic(path, &bytes).map_err(DataError::io(path))
}

/// `picture` encoded as `format` in memory (`path`, the file it is for, names it in errors).
pub fn encode(picture: &RgbImage, format: image::ImageFormat, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .map_err(|source| DataError::Encode {
            path: path.into(),
            source,
        })?;
    Ok(bytes)
}

pub use ddpm_fs::{check_output, write_atomic};

/// A name beside `path` that no other process or call uses ([`ddpm_fs::temporary_name`]).
pub(crate) fn unique_sibling(path: &Path) -> PathBuf {
    path.with_file_name(ddpm_fs::temporary_name(std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::u8_to_signed;

    #[test]
    fn grids_place_images_row_by_row_and_round_trip_bytes() {
        // Three 1-channel 2x3 images (h=2, w=3) whose pixels are 10*k + i.
        let values: Vec<f32> = (0..3)
            .flat_map(|k| (0..6).map(move |i| u8_to_signed((10 * k + i) as u8)))
            .collect();
        let t = Tensor::from_vec(values, (3, 1, 2, 3), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/grid.png");
        save_image_grid(&t, 2, &path).unwrap();
        let grid = image::open(&path).unwrap().to_rgb8();
        // 2 columns, 2 rows: width 2*(3+2)+2, height 2*(2+2)+2.
        assert_eq!(grid.dimensions(), (12, 10));
        let at = |x, y| grid.get_pixel(x, y)[0];
        assert_eq!(at(2, 2), 0); // image 0, pixel (0, 0)
        assert_eq!(at(4, 3), 5); // image 0, pixel (row 1, col 2)
        assert_eq!(at(7, 2), 10); // image 1 starts at x = 2 + 5
        assert_eq!(at(2 + 1, 6 + 1), 24); // image 2 on the second row
        assert_eq!(at(9, 7), 0); // the empty fourth cell stays black
        assert_eq!(at(0, 0), 0); // padding
        assert_eq!(grid.get_pixel(4, 3), &Rgb([5, 5, 5]));
    }

    #[test]
    fn colour_images_clamp_and_keep_channels() {
        let mut v = vec![0f32; 3 * 4];
        v[0] = 5.0; // red plane, clamped to 255
        v[4] = -1.0; // green plane
        v[8] = 0.0; // blue plane, 127.5 rounds to 128
        let t = Tensor::from_vec(v, (3, 2, 2), &Device::Cpu).unwrap();
        let pics = tensor_to_images(&t).unwrap();
        assert_eq!(pics[0].get_pixel(0, 0), &Rgb([255, 0, 128]));
        let dir = tempfile::tempdir().unwrap();
        save_image(&t, dir.path().join("one.png")).unwrap();
        assert_eq!(
            image::open(dir.path().join("one.png")).unwrap().to_rgb8(),
            pics[0]
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = Tensor::zeros((2, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(tensor_to_images(&t), Err(DataError::BadShape(_))));
        let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(image_grid(&t, 2), Err(DataError::BadShape(_))));
        let t = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(image_grid(&t, 0).is_err());
        let t = Tensor::zeros((0, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(image_grid(&t, 2).is_err());
    }
}
