//! What to load: the data set, the split and the configuration of the transforms.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::hub_dataset::HubSpec;

/// A data set: one of the canonical ones, or a user's folder of images.
///
/// Parses from and serializes to the strings `mnist`, `fashion-mnist`, `cifar10`, `flowers`,
/// `folder:PATH` and `hf:OWNER/NAME[@REVISION][:SPLIT]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DatasetSpec {
    /// MNIST handwritten digits (28x28 grey), IDX files in `<root>/mnist/`.
    Mnist,
    /// Fashion-MNIST (Zalando's 28x28 grey clothing images in MNIST's IDX layout), IDX files in
    /// `<root>/fashion-mnist/`.
    FashionMnist,
    /// CIFAR-10 (32x32 RGB), binary batches in `<root>/cifar10/cifar-10-batches-bin/`.
    Cifar10,
    /// The 5-class Flowers set, class folders in `<root>/flowers/`.
    Flowers,
    /// A folder with one sub-folder of JPEG/PNG/GIF images per class.
    Folder(PathBuf),
    /// An image data set on the Hugging Face Hub, stored as parquet files
    /// (`hf:OWNER/NAME[@REVISION][:SPLIT]`; see [`crate::hub_dataset`]).
    Hub(HubSpec),
}

impl DatasetSpec {
    /// The short name: `mnist`, `fashion-mnist`, `cifar10`, `flowers`, `folder` or `hf`.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetSpec::Mnist => "mnist",
            DatasetSpec::FashionMnist => "fashion-mnist",
            DatasetSpec::Cifar10 => "cifar10",
            DatasetSpec::Flowers => "flowers",
            DatasetSpec::Folder(_) => "folder",
            DatasetSpec::Hub(_) => "hf",
        }
    }

    /// The directory the data set lives in, given the data root (a folder is its own path; a
    /// Hub data set lives in the Hub's cache, and this is `<root>/hf`, which nothing uses).
    pub fn dir(&self, root: &Path) -> PathBuf {
        match self {
            DatasetSpec::Folder(path) => path.clone(),
            other => root.join(other.name()),
        }
    }

    /// Whether random horizontal flips are on by default: yes for natural images and clothes
    /// (a mirrored shirt is a shirt), no for digits.
    pub fn default_flip(&self) -> bool {
        !matches!(self, DatasetSpec::Mnist)
    }

    /// The channels of the data set's images: 1 for the grey IDX sets (MNIST, Fashion-MNIST),
    /// 3 for the others (image folders are decoded as RGB).
    pub fn channels(&self) -> usize {
        match self {
            DatasetSpec::Mnist | DatasetSpec::FashionMnist => 1,
            _ => 3,
        }
    }

    /// The native image side of the data set, if it has one (MNIST and Fashion-MNIST 28,
    /// CIFAR-10 32).
    pub fn native_size(&self) -> Option<usize> {
        match self {
            DatasetSpec::Mnist | DatasetSpec::FashionMnist => Some(28),
            DatasetSpec::Cifar10 => Some(32),
            _ => None,
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "mnist" => Ok(DatasetSpec::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetSpec::FashionMnist),
            "cifar10" | "cifar-10" | "cifar" => Ok(DatasetSpec::Cifar10),
            "flowers" => Ok(DatasetSpec::Flowers),
            _ => match s.trim().split_once(':') {
                Some((kind, path)) if kind.eq_ignore_ascii_case("folder") && !path.is_empty() => {
                    Ok(DatasetSpec::Folder(PathBuf::from(path)))
                }
                Some((kind, rest)) if kind.eq_ignore_ascii_case("hf") => {
                    Ok(DatasetSpec::Hub(HubSpec::parse(rest)?))
                }
                _ => Err(DataError::BadSpec {
                    spec: s.to_string(),
                    reason: "expected mnist, fashion-mnist, cifar10, flowers, folder:PATH or \
                             hf:OWNER/NAME[@REVISION][:SPLIT]"
                        .to_string(),
                }),
            },
        }
    }
}

impl TryFrom<String> for DatasetSpec {
    type Error = DataError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DatasetSpec> for String {
    fn from(spec: DatasetSpec) -> String {
        spec.to_string()
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Folder(path) => write!(f, "folder:{}", path.display()),
            DatasetSpec::Hub(hub) => write!(f, "hf:{hub}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Which part of a data set to load.
///
/// MNIST and CIFAR-10 use their canonical splits. Where a data set has none, a fixed hold-out is
/// used: see [`crate::folder`] (and [`DataConfig::test_fraction`]) for image folders and
/// [`crate::mnist`] for MNIST when only its t10k files are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    #[default]
    Train,
    /// The held-out test split.
    Test,
    /// Everything available (train and test together).
    All,
}

impl FromStr for Split {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            "all" => Ok(Split::All),
            _ => Err(DataError::Config(format!(
                "unknown split {s:?}: expected train, test or all"
            ))),
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
            Split::All => "all",
        })
    }
}

/// How to read and transform a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The data root holding `mnist/`, `fashion-mnist/`, `cifar10/` and `flowers/` (default
    /// `data`).
    pub root: PathBuf,
    /// The side of the square images produced; `None` keeps MNIST at 28 and CIFAR-10 at 32, and
    /// resizes image folders to [`crate::transform::DEFAULT_IMAGE_SIZE`].
    pub image_size: Option<usize>,
    /// Random horizontal flips; `None` uses the data set's default ([`DatasetSpec::default_flip`]).
    pub flip: Option<bool>,
    /// Skip images that cannot be decoded (each is logged and counted) instead of stopping.
    pub skip_corrupt: bool,
    /// Threads used to decode and resize images when a data set is opened; `None` uses all cores.
    pub threads: Option<usize>,
    /// The share of each class of an image folder (Flowers included) held out for the test split,
    /// in [0, 1); default [`crate::folder::DEFAULT_TEST_FRACTION`] (0.1: every 10th file). 0 puts
    /// every image in the training split and leaves the test split empty. See [`crate::folder`].
    pub test_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            root: PathBuf::from("data"),
            image_size: None,
            flip: None,
            skip_corrupt: false,
            threads: None,
            test_fraction: crate::folder::DEFAULT_TEST_FRACTION,
        }
    }
}

impl DataConfig {
    /// A default configuration reading from the given data root.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        DataConfig {
            root: root.into(),
            ..DataConfig::default()
        }
    }

    /// The number of decode threads to use.
    pub(crate) fn thread_count(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_round_trip() {
        for (text, spec) in [
            ("mnist", DatasetSpec::Mnist),
            ("fashion-mnist", DatasetSpec::FashionMnist),
            ("cifar10", DatasetSpec::Cifar10),
            ("flowers", DatasetSpec::Flowers),
            (
                "folder:/tmp/my images",
                DatasetSpec::Folder("/tmp/my images".into()),
            ),
        ] {
            let parsed: DatasetSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            "CIFAR-10".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::Cifar10
        );
        assert!(matches!(
            "imagenet".parse::<DatasetSpec>(),
            Err(DataError::BadSpec { .. })
        ));
        assert!("folder:".parse::<DatasetSpec>().is_err());
    }

    #[test]
    fn specs_and_config_serialize_as_strings() {
        let json = serde_json::to_string(&DatasetSpec::Folder("a/b".into())).unwrap();
        assert_eq!(json, "\"folder:a/b\"");
        let back: DatasetSpec = serde_json::from_str("\"flowers\"").unwrap();
        assert_eq!(back, DatasetSpec::Flowers);
        assert!(serde_json::from_str::<DatasetSpec>("\"nope\"").is_err());

        let cfg: DataConfig = serde_json::from_str(r#"{"image_size": 64}"#).unwrap();
        assert_eq!(cfg.image_size, Some(64));
        assert_eq!(cfg.root, PathBuf::from("data"));
        assert!(!cfg.skip_corrupt);
        assert_eq!(cfg.test_fraction, crate::folder::DEFAULT_TEST_FRACTION);
        let cfg: DataConfig = serde_json::from_str(r#"{"test_fraction": 0.0}"#).unwrap();
        assert_eq!(cfg.test_fraction, 0.0);
    }

    #[test]
    fn defaults_follow_the_data_set() {
        assert!(!DatasetSpec::Mnist.default_flip());
        assert!(DatasetSpec::FashionMnist.default_flip());
        assert_eq!(DatasetSpec::FashionMnist.native_size(), Some(28));
        assert_eq!(
            (
                DatasetSpec::Mnist.channels(),
                DatasetSpec::FashionMnist.channels()
            ),
            (1, 1)
        );
        assert_eq!(DatasetSpec::Cifar10.channels(), 3);
        assert_eq!(
            "Fashion_MNIST".parse::<DatasetSpec>().unwrap(),
            DatasetSpec::FashionMnist
        );
        assert_eq!(
            DatasetSpec::FashionMnist.dir(Path::new("data")),
            PathBuf::from("data/fashion-mnist")
        );
        assert!(DatasetSpec::Cifar10.default_flip());
        assert!(DatasetSpec::Flowers.default_flip());
        assert_eq!(DatasetSpec::Mnist.native_size(), Some(28));
        assert_eq!(
            DatasetSpec::Cifar10.dir(Path::new("data")),
            PathBuf::from("data/cifar10")
        );
        assert_eq!("Test".parse::<Split>().unwrap(), Split::Test);
        assert!("val".parse::<Split>().is_err());
    }
}
