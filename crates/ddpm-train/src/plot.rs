//! A small, dependency-free loss-curve plot written as PNG: raw losses as faint points, a
//! smoothed curve, log-scaled y axis with labelled ticks, and labelled step ticks.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Result, TrainError};

const W: u32 = 720;
const H: u32 = 420;
const LEFT: u32 = 70;
const RIGHT: u32 = 20;
const TOP: u32 = 30;
const BOTTOM: u32 = 45;

/// 3x5 bitmap glyphs for the characters the axes need.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'e' => [0b111, 0b101, 0b111, 0b100, 0b111],
        'k' => [0b101, 0b110, 0b100, 0b110, 0b101],
        's' => [0b111, 0b100, 0b111, 0b001, 0b111],
        't' => [0b010, 0b111, 0b010, 0b010, 0b011],
        'p' => [0b111, 0b101, 0b111, 0b100, 0b100],
        'l' => [0b100, 0b100, 0b100, 0b100, 0b111],
        'o' => [0b000, 0b111, 0b101, 0b101, 0b111],
        'g' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '(' => [0b001, 0b010, 0b010, 0b010, 0b001],
        ')' => [0b100, 0b010, 0b010, 0b010, 0b100],
        _ => return None,
    })
}

fn text(img: &mut RgbImage, s: &str, x: i64, y: i64, scale: i64, color: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let Some(g) = glyph(c) else { continue };
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                x + (i as i64 * 4 + col) * scale + dx,
                                y + row as i64 * scale + dy,
                                color,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let f = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * f, y0 + (y1 - y0) * f);
        put(img, x.round() as i64, y.round() as i64, c);
        put(img, x.round() as i64, y.round() as i64 + 1, c);
    }
}

fn fmt_value(v: f64) -> String {
    if (1e-2..1e3).contains(&v) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// Renders `(step, loss)` points to a PNG at `path` (written atomically). Non-finite or
/// non-positive losses are skipped.
pub fn write_loss_curve(points: &[(usize, f64)], path: &Path) -> Result<()> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .map(|&(s, l)| (s as f64, l.log10()))
        .collect();
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let black = Rgb([0, 0, 0]);
    let grey = Rgb([215, 215, 215]);
    text(&mut img, "loss (log)", LEFT as i64, 8, 2, black);
    text(
        &mut img,
        "step",
        (W / 2) as i64 - 16,
        (H - 14) as i64,
        2,
        black,
    );
    if !pts.is_empty() {
        let (xmin, xmax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (ymin, ymax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
        let (ylo, yhi) = (ymin.floor().min(ymax - 0.1), ymax.ceil().max(ymin + 0.1));
        let xspan = (xmax - xmin).max(1.0);
        let px = |x: f64| LEFT as f64 + (x - xmin) / xspan * pw;
        let py = |y: f64| TOP as f64 + (1.0 - (y - ylo) / (yhi - ylo)) * ph;
        // Y ticks at 1, 2, 5 x 10^k.
        let mut k = ylo.floor() as i32;
        while (k as f64) <= yhi {
            for m in [1.0f64, 2.0, 5.0] {
                let v = m * 10f64.powi(k);
                let y = v.log10();
                if y >= ylo && y <= yhi {
                    let yy = py(y);
                    line(&mut img, (LEFT as f64, yy), (LEFT as f64 + pw, yy), grey);
                    text(&mut img, &fmt_value(v), 4, yy as i64 - 5, 2, black);
                }
            }
            k += 1;
        }
        // X ticks: about six round numbers.
        let raw = xspan / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let tick = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|t| *t >= raw)
            .unwrap_or(10.0 * mag);
        let mut xv = (xmin / tick).ceil() * tick;
        while xv <= xmax {
            let xx = px(xv);
            line(&mut img, (xx, TOP as f64), (xx, TOP as f64 + ph), grey);
            let label = if xv >= 10_000.0 && xv % 1000.0 == 0.0 {
                format!("{}k", xv as u64 / 1000)
            } else {
                format!("{}", xv as u64)
            };
            text(
                &mut img,
                &label,
                xx as i64 - 6,
                (H - BOTTOM + 6) as i64,
                2,
                black,
            );
            xv += tick;
        }
        for &(x, y) in &pts {
            put(&mut img, px(x) as i64, py(y) as i64, Rgb([150, 170, 230]));
        }
        // Smoothed curve: EMA of log-loss with a window of about 2% of the points.
        let alpha = 1.0 / (pts.len() as f64 / 50.0).max(1.0);
        let mut s = pts[0].1;
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &pts {
            s += alpha * (y - s);
            let p = (px(x), py(s));
            if let Some(q) = prev {
                line(&mut img, q, p, Rgb([200, 40, 40]));
            }
            prev = Some(p);
        }
    }
    let axes = [
        ((LEFT as f64, TOP as f64), (LEFT as f64, TOP as f64 + ph)),
        (
            (LEFT as f64, TOP as f64 + ph),
            (LEFT as f64 + pw, TOP as f64 + ph),
        ),
    ];
    for (a, b) in axes {
        line(&mut img, a, b, black);
    }
    crate::checkpoint::write_png_atomic(&img, path)
        .map_err(|e| TrainError::io(path, "writing the loss curve", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_curve_that_falls() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::io(Path::new("tmp"), "tmp", e))?;
        let path = dir.path().join("loss.png");
        let pts: Vec<(usize, f64)> = (1..500).map(|s| (s, 1.0 / (s as f64).sqrt())).collect();
        write_loss_curve(&pts, &path)?;
        let img = image::open(&path)
            .map_err(|e| TrainError::Other(e.to_string()))?
            .to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        // The red smoothed curve is high on the left and low on the right.
        let red_rows = |x0: u32, x1: u32| -> Vec<u32> {
            (x0..x1)
                .flat_map(|x| (0..H).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == [200, 40, 40])
                .map(|(_, y)| y)
                .collect()
        };
        let left = red_rows(LEFT + 5, LEFT + 40);
        let right = red_rows(W - RIGHT - 40, W - RIGHT - 5);
        assert!(!left.is_empty() && !right.is_empty());
        let mean = |v: &[u32]| v.iter().map(|&y| y as f64).sum::<f64>() / v.len() as f64;
        assert!(mean(&left) < mean(&right), "image y grows downwards");
        Ok(())
    }
}
