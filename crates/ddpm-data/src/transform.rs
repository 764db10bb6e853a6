//! The image transforms: to [0, 1], center crop, resize, horizontal flip, to [-1, 1], and back.
//!
//! Images are cached as `u8` in (c, h, w) layout at the target size; the loader turns them into
//! `f32` in [-1, 1] with [`write_signed_chw`], flipping on the fly. [`signed_to_u8`] is the inverse
//! used to save pictures.

use std::sync::OnceLock;

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Pixel, RgbImage};

/// The image side used when neither the data set nor the configuration fixes one.
pub const DEFAULT_IMAGE_SIZE: usize = 32;

/// The filter used for resizing: bicubic (Catmull-Rom); the `image` crate widens its support when
/// downscaling, which antialiases.
pub const RESIZE_FILTER: FilterType = FilterType::CatmullRom;

/// Maps a `u8` pixel to [0, 1].
pub fn u8_to_unit(v: u8) -> f32 {
    f32::from(v) / 255.0
}

/// Maps [0, 1] to [-1, 1].
pub fn unit_to_signed(x: f32) -> f32 {
    x * 2.0 - 1.0
}

/// Maps a `u8` pixel to [-1, 1] (0 to -1, 255 to 1).
pub fn u8_to_signed(v: u8) -> f32 {
    unit_to_signed(u8_to_unit(v))
}

/// The inverse transform for saving: clamps to [-1, 1], maps to [0, 255] and rounds (NaN gives 0).
pub fn signed_to_u8(x: f32) -> u8 {
    let unit = (x.clamp(-1.0, 1.0) + 1.0) * 0.5;
    // The clamp keeps the product in [0, 255]; `as` maps NaN to 0.
    (unit * 255.0).round() as u8
}

fn signed_lut() -> &'static [f32; 256] {
    static LUT: OnceLock<[f32; 256]> = OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|v| u8_to_signed(v as u8)))
}

/// Crops the largest centered square out of an image (a copy; square images are copied as is).
pub fn center_crop<P>(img: &ImageBuffer<P, Vec<u8>>) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    let side = w.min(h);
    imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image()
}

/// Center-crops an image to a square and resizes it to `size` x `size` with [`RESIZE_FILTER`].
pub fn resize_square<P>(img: &ImageBuffer<P, Vec<u8>>, size: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    let square = if w == h { None } else { Some(center_crop(img)) };
    let square = square.as_ref().unwrap_or(img);
    if square.width() == size {
        square.clone()
    } else {
        imageops::resize(square, size, size, RESIZE_FILTER)
    }
}

/// Reverses every row of an image stored as (c, h, w): a horizontal flip.
pub fn hflip_chw<T>(data: &mut [T], width: usize) {
    if width == 0 {
        return;
    }
    for row in data.chunks_exact_mut(width) {
        row.reverse();
    }
}

/// Converts an interleaved RGB image to planar (c, h, w) bytes.
pub fn rgb_to_chw(img: &RgbImage) -> Vec<u8> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        out[i] = px[0];
        out[plane + i] = px[1];
        out[2 * plane + i] = px[2];
    }
    out
}

/// Converts planar (c, h, w) RGB bytes to an interleaved image; `None` if the length is wrong.
pub fn chw_to_rgb(data: &[u8], width: u32, height: u32) -> Option<RgbImage> {
    let plane = (width * height) as usize;
    if data.len() != 3 * plane {
        return None;
    }
    let mut interleaved = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        interleaved.extend_from_slice(&[data[i], data[plane + i], data[2 * plane + i]]);
    }
    RgbImage::from_raw(width, height, interleaved)
}

/// Writes a (c, h, w) `u8` image into `out` as `f32` in [-1, 1], flipped horizontally if `flip`.
///
/// `src` and `out` must have the same length, a multiple of `width`.
pub fn write_signed_chw(src: &[u8], width: usize, flip: bool, out: &mut [f32]) {
    debug_assert_eq!(src.len(), out.len());
    let lut = signed_lut();
    if !flip || width == 0 {
        for (o, &v) in out.iter_mut().zip(src) {
            *o = lut[v as usize];
        }
        return;
    }
    for (orow, srow) in out.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
        for (o, &v) in orow.iter_mut().zip(srow.iter().rev()) {
            *o = lut[v as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb};

    #[test]
    fn signed_round_trip_is_exact_for_every_byte() {
        for v in 0..=255u8 {
            let x = u8_to_signed(v);
            assert!((-1.0..=1.0).contains(&x));
            assert_eq!(signed_to_u8(x), v);
        }
        assert_eq!(u8_to_signed(0), -1.0);
        assert_eq!(u8_to_signed(255), 1.0);
        assert_eq!(u8_to_unit(51), 0.2);
    }

    #[test]
    fn inverse_clamps_and_rounds() {
        assert_eq!(signed_to_u8(-3.0), 0);
        assert_eq!(signed_to_u8(7.5), 255);
        assert_eq!(signed_to_u8(f32::NAN), 0);
        // 0.0 maps to 127.5, which rounds half away from zero to 128.
        assert_eq!(signed_to_u8(0.0), 128);
        // Just below the midpoint between 100 and 101 rounds down.
        let x = unit_to_signed(100.49 / 255.0);
        assert_eq!(signed_to_u8(x), 100);
    }

    #[test]
    fn center_crop_keeps_the_middle_of_wide_and_tall_images() {
        // 40x20: columns 10..30 are green, the rest red.
        let wide = RgbImage::from_fn(40, 20, |x, _| {
            if (10..30).contains(&x) {
                Rgb([0, 255, 0])
            } else {
                Rgb([255, 0, 0])
            }
        });
        let c = center_crop(&wide);
        assert_eq!(c.dimensions(), (20, 20));
        assert!(c.pixels().all(|p| *p == Rgb([0, 255, 0])));

        // 3x8 tall: rows 2..5 hold the value 9 at the centered crop's rows (8-3)/2 = 2..5.
        let tall = GrayImage::from_fn(3, 8, |_, y| Luma([y as u8]));
        let c = center_crop(&tall);
        assert_eq!(c.dimensions(), (3, 3));
        assert_eq!(c.get_pixel(0, 0)[0], 2);
        assert_eq!(c.get_pixel(2, 2)[0], 4);
    }

    #[test]
    fn resize_preserves_constants_and_antialiases_when_downscaling() {
        let flat = RgbImage::from_pixel(128, 96, Rgb([10, 200, 77]));
        let r = resize_square(&flat, 32);
        assert_eq!(r.dimensions(), (32, 32));
        assert!(r.pixels().all(|p| *p == Rgb([10, 200, 77])));

        // A one-pixel checkerboard of 0/255 downscaled 4x: an antialiasing filter averages it to
        // mid-grey everywhere (away from the borders), where point sampling would keep 0 or 255.
        let checker = GrayImage::from_fn(64, 64, |x, y| {
            Luma([if (x + y) % 2 == 0 { 0 } else { 255 }])
        });
        let small = resize_square(&checker, 16);
        for y in 2..14 {
            for x in 2..14 {
                let v = small.get_pixel(x, y)[0];
                assert!((120..=135).contains(&v), "pixel ({x},{y}) = {v} is aliased");
            }
        }
    }

    #[test]
    fn flips_reverse_rows_and_compose_to_identity() {
        let mut data: Vec<u8> = (0..12).collect(); // (c=2, h=2, w=3)
        hflip_chw(&mut data, 3);
        assert_eq!(data, vec![2, 1, 0, 5, 4, 3, 8, 7, 6, 11, 10, 9]);
        hflip_chw(&mut data, 3);
        assert_eq!(data, (0..12).collect::<Vec<u8>>());

        let src: Vec<u8> = vec![0, 255, 51, 102];
        let mut out = vec![0f32; 4];
        write_signed_chw(&src, 2, true, &mut out);
        assert_eq!(out, vec![1.0, -1.0, u8_to_signed(102), u8_to_signed(51)]);
        write_signed_chw(&src, 2, false, &mut out);
        assert_eq!(out, vec![-1.0, 1.0, u8_to_signed(51), u8_to_signed(102)]);
    }

    #[test]
    fn planar_and_interleaved_round_trip() {
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([x as u8, y as u8, (x + y) as u8 * 10]));
        let chw = rgb_to_chw(&img);
        assert_eq!(&chw[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&chw[6..12], &[0, 0, 0, 1, 1, 1]);
        assert_eq!(chw_to_rgb(&chw, 3, 2).unwrap(), img);
        assert!(chw_to_rgb(&chw[1..], 3, 2).is_none());
    }
}
