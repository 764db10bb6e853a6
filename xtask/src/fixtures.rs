//! `cargo xtask make-fixtures`: writes the small committed test fixtures of
//! `crates/ddpm-data/fixtures/` from the real data sets, so that `cargo test` needs no download.
//!
//! - `mnist/images.idx3.gz`, `mnist/labels.idx1.gz`: the first [`MNIST_PER_DIGIT`] images of each
//!   digit of MNIST's t10k (test) split, in the order they have there, as gzip-compressed IDX
//!   files (the format of the originals). The names avoid MNIST's own file names so that the
//!   fixtures are never mistaken for the data set; tests copy them into place under those names.
//! - `flowers/<class>/*.jpg`: the first [`FLOWERS_PER_CLASS`] files (sorted by name) of each class
//!   of the 5-class Flowers set, copied byte for byte.
//!
//! The source is a directory in the mirror layout (`mnist/t10k-*.gz`, `flowers/<class>/`), for
//! example one filled by `cargo xtask fetch-data mnist flowers`, or `$DDPM_DATA_MIRROR`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use clap::Args;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// MNIST images kept per digit.
pub const MNIST_PER_DIGIT: usize = 50;
/// Flowers images kept per class.
pub const FLOWERS_PER_CLASS: usize = 10;

/// Arguments of `make-fixtures`.
#[derive(Args, Debug)]
pub struct MakeFixturesArgs {
    /// The real data in the mirror layout (mnist/t10k-*.gz, flowers/<class>/); defaults to
    /// $DDPM_DATA_MIRROR.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// Where to write the fixtures.
    #[arg(long, default_value = "crates/ddpm-data/fixtures")]
    out: PathBuf,
}

/// Runs `make-fixtures`.
pub fn run(args: MakeFixturesArgs) -> anyhow::Result<()> {
    let from = match args.from {
        Some(dir) => dir,
        None => match std::env::var_os(ddpm_data::fetch::MIRROR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => bail!(
                "no source: pass --from DIR (a directory with mnist/ and flowers/, e.g. one filled \
                 by `cargo xtask fetch-data mnist` and `fetch-data flowers`) or set DDPM_DATA_MIRROR"
            ),
        },
    };
    let mut sums = Vec::new();
    sums.extend(mnist(&from.join("mnist"), &args.out.join("mnist"))?);
    sums.extend(flowers(&from.join("flowers"), &args.out.join("flowers"))?);
    let mut text = String::new();
    for (path, sum) in &sums {
        text.push_str(&format!("{sum}  {path}\n"));
    }
    std::fs::write(args.out.join("SHA256SUMS"), text)?;
    let bytes: u64 = sums
        .iter()
        .map(|(p, _)| std::fs::metadata(args.out.join(p)).map_or(0, |m| m.len()))
        .sum();
    println!(
        "wrote {} fixture files ({:.0} KB) to {} from {}",
        sums.len(),
        bytes as f64 / 1e3,
        args.out.display(),
        from.display()
    );
    Ok(())
}

fn gunzip(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut out)
        .with_context(|| format!("decompressing {}", path.display()))?;
    Ok(out)
}

/// Gzip with a fixed header (no file name, no time), so the same input gives the same bytes.
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

fn be32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn mnist(src: &Path, out: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let images = gunzip(&src.join("t10k-images-idx3-ubyte.gz"))?;
    let labels = gunzip(&src.join("t10k-labels-idx1-ubyte.gz"))?;
    ensure!(
        images.len() > 16
            && be32(&images, 0) == 0x803
            && labels.len() > 8
            && be32(&labels, 0) == 0x801,
        "{} does not hold MNIST's t10k IDX files",
        src.display()
    );
    let (n, rows, cols) = (be32(&images, 4), be32(&images, 8), be32(&images, 12));
    ensure!(
        be32(&labels, 4) == n && images.len() == 16 + n * rows * cols,
        "inconsistent IDX files in {}",
        src.display()
    );
    let mut per_digit = [0usize; 10];
    let (mut pixels, mut kept) = (Vec::new(), Vec::new());
    for i in 0..n {
        let label = labels[8 + i];
        if per_digit[label as usize] < MNIST_PER_DIGIT {
            per_digit[label as usize] += 1;
            kept.push(label);
            pixels.extend_from_slice(&images[16 + i * rows * cols..16 + (i + 1) * rows * cols]);
        }
    }
    let count = kept.len() as u32;
    let mut idx3 = Vec::new();
    for v in [0x803, count, rows as u32, cols as u32] {
        idx3.extend_from_slice(&v.to_be_bytes());
    }
    idx3.extend_from_slice(&pixels);
    let mut idx1 = Vec::new();
    for v in [0x801, count] {
        idx1.extend_from_slice(&v.to_be_bytes());
    }
    idx1.extend_from_slice(&kept);
    std::fs::create_dir_all(out)?;
    let mut sums = Vec::new();
    for (name, raw) in [("images.idx3.gz", idx3), ("labels.idx1.gz", idx1)] {
        let gz = gzip(&raw)?;
        std::fs::write(out.join(name), &gz)?;
        sums.push((format!("mnist/{name}"), sha256(&gz)));
    }
    Ok(sums)
}

fn flowers(src: &Path, out: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut classes: Vec<_> = std::fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    ensure!(
        !classes.is_empty(),
        "{} has no class folders",
        src.display()
    );
    let mut sums = Vec::new();
    for class in classes {
        let mut files: Vec<_> = std::fs::read_dir(src.join(&class))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.to_ascii_lowercase().ends_with(".jpg"))
            .collect();
        files.sort();
        std::fs::create_dir_all(out.join(&class))?;
        for name in files.into_iter().take(FLOWERS_PER_CLASS) {
            let bytes = std::fs::read(src.join(&class).join(&name))?;
            std::fs::write(out.join(&class).join(&name), &bytes)?;
            sums.push((format!("flowers/{class}/{name}"), sha256(&bytes)));
        }
    }
    Ok(sums)
}
