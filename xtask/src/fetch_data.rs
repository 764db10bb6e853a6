//! `cargo xtask fetch-data`: a thin command line over `ddpm_data::fetch`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddpm_data::fetch::{self, FetchOptions, Source, MIRROR_ENV};
use ddpm_data::DatasetSpec;

/// Which data sets to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Which {
    /// MNIST's four IDX files (data/mnist/*.gz).
    Mnist,
    /// Fashion-MNIST's four IDX files (data/fashion-mnist/*.gz).
    FashionMnist,
    /// CIFAR-10's binary batches (data/cifar10/cifar-10-batches-bin/).
    Cifar10,
    /// The 5-class Flowers set (data/flowers/<class>/).
    Flowers,
    /// All four.
    All,
}

/// Arguments of `fetch-data`.
#[derive(Args, Debug)]
pub struct FetchDataArgs {
    /// The data set to fetch.
    #[arg(value_enum)]
    dataset: Which,
    /// The data directory to place the data sets in.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Fetch from a mirror instead of upstream: a directory or a base URL laid out like the data
    /// directory (mnist/, fashion-mnist/, cifar10/, flowers/). Defaults to $DDPM_DATA_MIRROR when
    /// it is set.
    #[arg(long, value_name = "DIR_OR_URL")]
    from: Option<String>,
    /// How many times a failed download is retried (each retry resumes where it stopped).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Another Flowers archive (a .tar.gz/.tgz of class folders, URL or path) instead of the
    /// default, TensorFlow's flower_photos.tgz; needs --flowers-sha256.
    #[arg(long, value_name = "URL_OR_PATH")]
    flowers_url: Option<String>,
    /// The SHA-256 of the Flowers archive (the default one's is pinned; another needs this).
    #[arg(long, value_name = "HEX")]
    flowers_sha256: Option<String>,
    /// Do not draw progress bars.
    #[arg(long)]
    no_progress: bool,
}

/// Runs `fetch-data`: every requested data set is attempted; fails if any could not be fetched.
pub fn run(args: FetchDataArgs) -> anyhow::Result<()> {
    let source = match &args.from {
        Some(from) => Source::parse(from),
        None => crate::mirror_from_env().unwrap_or(Source::Upstream),
    };
    if args.from.is_none() && source.is_mirror() {
        eprintln!("using {source} (from {MIRROR_ENV})");
    }
    let opts = FetchOptions {
        source,
        retries: args.retries,
        progress: !args.no_progress,
        flowers_url: args.flowers_url.clone(),
        flowers_sha256: args.flowers_sha256.clone(),
        roots: crate::net_env::trusted_roots(),
        proxy: crate::net_env::proxy(),
        ..FetchOptions::new(&args.data_dir)
    };
    let specs = match args.dataset {
        Which::Mnist => vec![DatasetSpec::Mnist],
        Which::FashionMnist => vec![DatasetSpec::FashionMnist],
        Which::Cifar10 => vec![DatasetSpec::Cifar10],
        Which::Flowers => vec![DatasetSpec::Flowers],
        Which::All => vec![
            DatasetSpec::Mnist,
            DatasetSpec::FashionMnist,
            DatasetSpec::Cifar10,
            DatasetSpec::Flowers,
        ],
    };
    let mut failed = Vec::new();
    for spec in &specs {
        let result = fetch::fetch(spec, &opts).with_context(|| {
            format!(
                "fetching {spec} from {} into {}",
                opts.source,
                args.data_dir.display()
            )
        });
        match result {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("error: {e:#}");
                failed.push(spec.to_string());
            }
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 if specs.len() == 1 => bail!("{} could not be fetched (see above)", failed[0]),
        _ => bail!(
            "{} of {} data sets could not be fetched: {} (see above)",
            failed.len(),
            specs.len(),
            failed.join(", ")
        ),
    }
}
