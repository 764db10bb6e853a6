//! `cargo xtask test-real`: the real-data suite. Fetches MNIST and Flowers into the data
//! directory through the same verified fetch path users have (`$DDPM_DATA_MIRROR` or `--from`
//! when given, else the data sets' public sources), then runs every test marked
//! `#[ignore = "real data ..."]` with `DDPM_REAL_DATA` pointing at that directory.
//!
//! Without the data and without a network it stops with one line saying how to get the data:
//! the suite never passes without having run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ddpm_data::fetch::{self, FetchOptions, Source, MIRROR_ENV};
use ddpm_data::DatasetSpec;
use sha2::{Digest, Sha256};

/// The environment variable through which the real-data tests find the fetched data sets.
pub const REAL_DATA_ENV: &str = "DDPM_REAL_DATA";
/// Name prefix of the ignored tests that are steps of a parity script, not real-data tests.
const PARITY_PREFIX: &str = "parity_";

/// Arguments of `test-real`.
#[derive(Args, Debug)]
pub struct TestRealArgs {
    /// The data directory the data sets are fetched into (and read from).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Fetch from a mirror (a directory or base URL laid out like the data directory) instead of
    /// upstream. Defaults to $DDPM_DATA_MIRROR when it is set.
    #[arg(long, value_name = "DIR_OR_URL")]
    from: Option<String>,
    /// Further arguments for the test binaries (after `--ignored`), e.g. a test name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Runs `test-real`.
pub fn run(args: TestRealArgs) -> anyhow::Result<()> {
    let source = match &args.from {
        Some(from) => Source::parse(from),
        None => crate::mirror_from_env().unwrap_or(Source::Upstream),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let opts = FetchOptions {
        source: source.clone(),
        progress: false,
        roots: crate::net_env::trusted_roots(),
        proxy: crate::net_env::proxy(),
        ..FetchOptions::new(&data_dir)
    };
    for spec in [DatasetSpec::Mnist, DatasetSpec::Flowers] {
        match fetch::fetch(&spec, &opts) {
            Ok(report) => eprintln!("{report}"),
            Err(e) => bail!(
                "the real-data suite needs MNIST and Flowers, and fetching {spec} from {source} \
                 failed ({e}): run it on a machine with network access, or set {MIRROR_ENV} \
                 (or pass --from) to a directory holding mnist/ and flowers/ (see data/README.md)"
            ),
        }
    }
    write_mirror_sums(&data_dir)?;
    eprintln!(
        "running the real-data tests (cargo test --release --workspace -- --ignored --skip {PARITY_PREFIX}) on {}",
        data_dir.display()
    );
    let status = crate::cargo()
        .args(["test", "--release", "--workspace", "--", "--ignored"])
        // Ignored tests that are not real-data tests are named `parity_*`: they are steps of the
        // Python parity scripts (bench/parity/), which run them with their own inputs.
        .args(["--skip", PARITY_PREFIX])
        .args(&args.test_args)
        .env(REAL_DATA_ENV, &data_dir)
        .status()
        .context("starting cargo test")?;
    if !status.success() {
        bail!("the real-data suite failed ({status})");
    }
    Ok(())
}

/// Writes `mnist/SHA256SUMS` and `flowers/SHA256SUMS` (as a mirror lists its files) where they
/// are missing, so the fetched directory also serves as a mirror to the tests that fetch from one.
fn write_mirror_sums(data_dir: &Path) -> anyhow::Result<()> {
    let mnist = data_dir.join("mnist");
    let mnist_files = ddpm_data::fetch::MNIST_FILES
        .iter()
        .map(|(name, _)| mnist.join(name))
        .filter(|p| p.is_file())
        .collect();
    write_sums(&mnist, mnist_files)?;
    let flowers = data_dir.join("flowers");
    let index = ddpm_data::folder::scan(&flowers)
        .with_context(|| format!("scanning {}", flowers.display()))?;
    write_sums(&flowers, index.files.into_iter().map(|(p, _)| p).collect())
}

/// Writes `dir/SHA256SUMS` listing `files` (paths under `dir`), unless it exists.
fn write_sums(dir: &Path, files: Vec<PathBuf>) -> anyhow::Result<()> {
    let sums = dir.join("SHA256SUMS");
    if sums.exists() {
        return Ok(());
    }
    let mut text = String::new();
    for path in &files {
        let rel = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        text.push_str(&format!(
            "{}  ./{rel}\n",
            hex::encode(Sha256::digest(&bytes))
        ));
    }
    std::fs::write(&sums, text).with_context(|| format!("writing {}", sums.display()))?;
    Ok(())
}
