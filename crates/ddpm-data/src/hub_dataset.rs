//! Image data sets on the Hugging Face Hub, stored as parquet: `hf:OWNER/NAME[@REVISION][:SPLIT]`.
//!
//! The files of a split are found in the repository's listing at the revision (default `main`)
//! in the layouts the Hub uses:
//!
//! - `[DIR/]SPLIT-NNNNN-of-NNNNN.parquet` or `[DIR/]SPLIT.parquet`, what `push_to_hub` writes,
//!   with `DIR` = `data` (one configuration) or the configuration's name (`ylecun/mnist` has
//!   `mnist/train-00000-of-00001.parquet`, `uoft-cs/cifar10` `plain_text/...`);
//! - `CONFIG/SPLIT/NNNN.parquet` (also `CONFIG/partial-SPLIT/...`), the layout of the Hub's own
//!   conversion, on the `refs/convert/parquet` branch.
//!
//! Without a revision, a repository with no parquet file on `main` is read from
//! `refs/convert/parquet`, where the Hub keeps parquet copies of the data sets it can convert.
//! `SPLIT` (default `train`) may name a configuration too, `CONFIG/SPLIT`, and must when several
//! configurations have the split. Other layouts are refused, naming what was found.
//!
//! Each row's image is the first column that is a struct with a binary `bytes` field (how the
//! `datasets` library writes its `Image` feature: `{bytes, path}`), or else a binary column;
//! columns named `image` or `img` are preferred. The label is the `label` (or `labels`,
//! `fine_label`, `class`, `target`) column when there is one, an integer or a string; class names
//! come from the `ClassLabel` names `datasets` stores in the file's `huggingface` metadata, else
//! they are the label values. Without a label column (or with negative labels, as unlabelled test
//! splits have) every image is in one class named after the repository.
//!
//! Images are decoded by [`crate::folder::decode_image`], exactly as files in an image folder
//! (centre crop, antialiased resize), and a row that cannot be decoded, or has no image, is
//! treated like a bad file in a folder: an error naming the parquet file and the row, or, with
//! `skip_corrupt`, skipped, logged and counted ([`crate::Dataset::skipped`]). A split whose
//! images are all greyscale gives 1-channel images, others RGB.
//!
//! The revision is resolved to a commit once, when a run starts ([`pin`]): the run's config
//! stores `hf:OWNER/NAME@COMMIT:SPLIT`, so `--resume` reads the same files even when the branch
//! has moved. Files are downloaded and verified through [`crate::hub`].
//!
//! The `parquet` crate reads the files (row by row, without Arrow), not `candle-datasets`: the
//! latter only lists `refs/convert/parquet`, downloads without a revision of our choosing,
//! an offline mode or checksums, returns raw readers (the image column and class names would
//! still be ours to decode), and brings a tokenizer library and a second, asynchronous Hub
//! client with it. See docs/data.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::error::{DataError, Result};
use crate::folder::{decode_image, parallel_map};
use crate::hub::{Hub, HubOptions, Repo, Snapshot};
use crate::spec::{DataConfig, Split};

/// The Hub split read for training when the spec names none.
pub const DEFAULT_SPLIT: &str = "train";
/// The Hub split read for [`Split::Test`].
pub const TEST_SPLIT: &str = "test";
/// The branch where the Hub keeps its parquet conversion of a data set.
pub const CONVERTED_REVISION: &str = "refs/convert/parquet";
/// The revision read when the spec names none.
pub const DEFAULT_REVISION: &str = "main";
/// Names of label columns, in order of preference.
pub const LABEL_COLUMNS: [&str; 6] = ["label", "labels", "fine_label", "class", "target", "y"];
/// Names preferred for the image column.
pub const IMAGE_COLUMNS: [&str; 3] = ["image", "img", "images"];

/// A Hub data set: `hf:OWNER/NAME[@REVISION][:SPLIT]` without its `hf:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubSpec {
    /// The repository id, `OWNER/NAME`.
    pub repo: String,
    /// The branch, tag or commit; `None` reads `main` (or `refs/convert/parquet`, see the module
    /// doc). A run stores the commit here.
    pub revision: Option<String>,
    /// The split read for training, `SPLIT` or `CONFIG/SPLIT`; `None` is [`DEFAULT_SPLIT`].
    pub split: Option<String>,
}

impl HubSpec {
    /// Parses `OWNER/NAME[@REVISION][:SPLIT]`.
    pub fn parse(text: &str) -> Result<HubSpec> {
        let bad = |reason: String| DataError::BadSpec {
            spec: format!("hf:{text}"),
            reason,
        };
        let (repo_rev, split) = match text.split_once(':') {
            Some((a, s)) => (a, Some(s)),
            None => (text, None),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (repo_rev, None),
        };
        let repo = repo.trim();
        if !repo.contains('/') {
            return Err(bad(
                "expected hf:OWNER/NAME[@REVISION][:SPLIT], such as hf:ylecun/mnist or \
                 hf:uoft-cs/cifar10:test"
                    .to_string(),
            ));
        }
        Repo::dataset(repo).map_err(|e| bad(e.to_string()))?;
        if let Some(rev) = revision {
            if rev.is_empty() {
                return Err(bad("the revision after @ is empty".to_string()));
            }
        }
        if let Some(s) = split {
            let parts: Vec<&str> = s.split('/').collect();
            let part_ok = |p: &str| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && p != "."
                    && p != ".."
            };
            if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
                return Err(bad(format!(
                    "the split {s:?} is not SPLIT or CONFIG/SPLIT (letters, digits, '-', '_', '.')"
                )));
            }
        }
        Ok(HubSpec {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
            split: split.map(str::to_string),
        })
    }

    /// The repository.
    pub fn hub_repo(&self) -> Result<Repo> {
        Repo::dataset(&self.repo)
    }

    /// The training split: [`HubSpec::split`] or [`DEFAULT_SPLIT`].
    pub fn split_or_default(&self) -> &str {
        self.split.as_deref().unwrap_or(DEFAULT_SPLIT)
    }

    /// Whether the revision is a commit id (the spec is pinned).
    pub fn is_pinned(&self) -> bool {
        self.revision.as_deref().is_some_and(crate::hub::is_commit)
    }
}

impl fmt::Display for HubSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repo)?;
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        if let Some(split) = &self.split {
            write!(f, ":{split}")?;
        }
        Ok(())
    }
}

/// The snapshot a spec reads: its revision, or `main` falling back to
/// [`CONVERTED_REVISION`] when `main` holds no parquet file.
fn resolve(hub: &Hub, spec: &HubSpec) -> Result<Snapshot> {
    let repo = spec.hub_repo()?;
    if let Some(rev) = &spec.revision {
        return hub.snapshot(&repo, rev);
    }
    let main = hub.snapshot(&repo, DEFAULT_REVISION)?;
    if main.files.iter().any(|f| is_parquet(&f.path)) {
        return Ok(main);
    }
    match hub.snapshot(&repo, CONVERTED_REVISION) {
        Ok(converted) if converted.files.iter().any(|f| is_parquet(&f.path)) => {
            tracing::info!(repo = %repo, commit = %converted.commit, "no parquet files on main: reading the Hub's parquet conversion ({CONVERTED_REVISION})");
            Ok(converted)
        }
        _ => Ok(main),
    }
}

/// The spec with its revision resolved to a commit (see the module doc), so that a run reads
/// the same files whenever it resumes. A pinned spec is returned as it is, without contacting
/// the Hub.
pub fn pin(spec: &HubSpec, options: &HubOptions) -> Result<HubSpec> {
    if spec.is_pinned() {
        return Ok(spec.clone());
    }
    let snapshot = resolve(&Hub::new(options)?, spec)?;
    tracing::info!(dataset = %spec, commit = %snapshot.commit, "resolved the Hub revision");
    Ok(HubSpec {
        revision: Some(snapshot.commit),
        ..spec.clone()
    })
}

fn is_parquet(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".parquet")
}

/// Where a parquet file belongs: (configuration, split), from its path (see the module doc).
fn split_of(path: &str) -> Option<(Option<String>, String)> {
    if !is_parquet(path) {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    let file = parts.last()?;
    let stem = &file[..file.len() - ".parquet".len()];
    let dirs = &parts[..parts.len() - 1];
    if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
        // CONFIG/SPLIT/NNNN.parquet (the Hub's conversion).
        let (split_dir, config) = dirs.split_last()?;
        let split = split_dir.strip_prefix("partial-").unwrap_or(split_dir);
        let config = (!config.is_empty()).then(|| config.join("/"));
        return Some((config, split.to_string()));
    }
    // [DIR/]SPLIT-NNNNN-of-NNNNN.parquet or [DIR/]SPLIT.parquet.
    let split = stem.split('-').next().filter(|s| !s.is_empty())?;
    let config = match dirs {
        [] | ["data"] => None,
        dirs => Some(dirs.join("/")),
    };
    Some((config, split.to_string()))
}

/// The parquet files of a split, in path order; an error naming the splits found otherwise.
pub fn split_files(snapshot: &Snapshot, split: &str) -> Result<Vec<String>> {
    let label = format!("{}@{}", snapshot.repo.id, snapshot.commit);
    let mut by_split: BTreeMap<(Option<String>, String), Vec<String>> = BTreeMap::new();
    for f in &snapshot.files {
        if let Some(key) = split_of(&f.path) {
            by_split.entry(key).or_default().push(f.path.clone());
        }
    }
    if by_split.is_empty() {
        let shown: Vec<&str> = snapshot
            .files
            .iter()
            .take(8)
            .map(|f| f.path.as_str())
            .collect();
        let found = if shown.is_empty() {
            "no files".to_string()
        } else {
            format!(
                "{} files ({}{})",
                snapshot.files.len(),
                shown.join(", "),
                if snapshot.files.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            )
        };
        let hint = if snapshot.offline {
            " (offline: only the cached files are known; run once online)".to_string()
        } else if snapshot.revision != CONVERTED_REVISION {
            format!(
                "; if the Hub converted it, its parquet copy is read with @{CONVERTED_REVISION}"
            )
        } else {
            String::new()
        };
        return Err(DataError::HubDataset {
            repo: label,
            reason: format!(
                "no parquet files: found {found}; only data sets stored as parquet \
                 (data/SPLIT-*.parquet, CONFIG/SPLIT-*.parquet or CONFIG/SPLIT/*.parquet) \
                 are read{hint}"
            ),
        });
    }
    let (want_config, want_split) = match split.split_once('/') {
        Some((c, s)) => (Some(c), s),
        None => (None, split),
    };
    let matching: Vec<(&Option<String>, &Vec<String>)> = by_split
        .iter()
        .filter(|((config, s), _)| {
            s == want_split && want_config.is_none_or(|w| config.as_deref() == Some(w))
        })
        .map(|((config, _), files)| (config, files))
        .collect();
    let show_key = |config: &Option<String>, s: &str| match config {
        Some(c) => format!("{c}/{s}"),
        None => s.to_string(),
    };
    match matching.as_slice() {
        [(_, files)] => {
            let mut files = (*files).clone();
            files.sort();
            Ok(files)
        }
        [] => {
            let available: BTreeSet<String> =
                by_split.keys().map(|(c, s)| show_key(c, s)).collect();
            let offline = if snapshot.offline {
                " (offline: only the cached files are known)"
            } else {
                ""
            };
            Err(DataError::HubDataset {
                repo: label,
                reason: format!(
                    "no split {split:?}; the splits found are {}{offline}: name one with \
                     hf:{}:SPLIT",
                    available.into_iter().collect::<Vec<_>>().join(", "),
                    snapshot.repo.id
                ),
            })
        }
        several => Err(DataError::HubDataset {
            repo: label,
            reason: format!(
                "the split {split:?} exists in several configurations ({}): name one with \
                 hf:{}:CONFIG/{want_split}",
                several
                    .iter()
                    .map(|(c, _)| show_key(c, want_split))
                    .collect::<Vec<_>>()
                    .join(", "),
                snapshot.repo.id
            ),
        }),
    }
}

/// The images of a split of a Hub data set, decoded.
#[derive(Debug, Clone, Default)]
pub struct HubImages {
    /// 1 (every image greyscale) or 3.
    pub channels: usize,
    /// (channels, size, size) bytes per image, concatenated.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// The class names, in label order.
    pub class_names: Vec<String>,
    /// Rows that could not be decoded and were skipped (`FILE[row N]`; only with
    /// `skip_corrupt`).
    pub skipped: Vec<PathBuf>,
    /// The commit read.
    pub commit: String,
}

/// One row as read from a file: the image's bytes (or why there are none) and its raw label.
struct RawRow {
    name: PathBuf,
    image: std::result::Result<Vec<u8>, String>,
    label: Label,
}

#[derive(Clone, PartialEq)]
enum Label {
    None,
    Int(i64),
    Str(String),
}

/// Loads a split of a Hub data set at side `size` (see the module doc): [`Split::Train`] is the
/// spec's split, [`Split::Test`] the `test` split, [`Split::All`] both.
pub fn load(
    spec: &HubSpec,
    cfg: &DataConfig,
    split: Split,
    size: usize,
    options: &HubOptions,
) -> Result<HubImages> {
    load_first(spec, cfg, split, size, options, None)
}

/// Like [`load`], keeping only the first `limit` rows (all with `None`): the parquet files after
/// the one that completes them are not downloaded, and class names taken from string labels are
/// those of the rows kept.
pub fn load_first(
    spec: &HubSpec,
    cfg: &DataConfig,
    split: Split,
    size: usize,
    options: &HubOptions,
    limit: Option<usize>,
) -> Result<HubImages> {
    let hub = Hub::new(options)?;
    let snapshot = resolve(&hub, spec)?;
    let splits: Vec<&str> = match split {
        Split::Train => vec![spec.split_or_default()],
        Split::Test => vec![TEST_SPLIT],
        Split::All => {
            if spec.split_or_default() == TEST_SPLIT {
                vec![TEST_SPLIT]
            } else {
                vec![spec.split_or_default(), TEST_SPLIT]
            }
        }
    };
    let mut files = Vec::new();
    for s in splits {
        files.extend(split_files(&snapshot, s)?);
    }
    let label = format!("{}@{}", snapshot.repo.id, &snapshot.commit[..12]);
    let mut rows = Vec::new();
    let mut class_names: Option<Vec<String>> = None;
    for file in &files {
        if limit.is_some_and(|l| rows.len() >= l) {
            break;
        }
        let local = hub.get(&snapshot, file)?;
        let shown = PathBuf::from(format!("{label}/{file}"));
        let (file_rows, names) = read_parquet(&local, &shown)?;
        if class_names.is_none() {
            class_names = names;
        }
        rows.extend(file_rows);
    }
    if let Some(limit) = limit {
        rows.truncate(limit);
    }
    tracing::info!(dataset = %spec, commit = %snapshot.commit, files = files.len(), rows = rows.len(), "read the parquet files of the Hub data set");
    decode_rows(rows, class_names, cfg, size, &snapshot)
}

/// Labels to class indices and names; `None` when the rows carry no usable label.
/// Rows of which only some carry a label, or labels that mix integers and strings, are read
/// as one class with a warning naming the first row without a usable label.
fn labels_of(rows: &[RawRow], names: Option<Vec<String>>) -> Option<(Vec<u32>, Vec<String>)> {
    if let Some(row) = rows.iter().find(|r| r.label == Label::None) {
        if rows.iter().any(|r| r.label != Label::None) {
            tracing::warn!(
                row = %row.name.display(),
                "a row has no label (null, or not an integer or a string) while others have one: \
                 the images are read as one class"
            );
        }
        return None;
    }
    if rows.iter().all(|r| matches!(r.label, Label::Int(_))) {
        let values: Vec<i64> = rows
            .iter()
            .map(|r| match r.label {
                Label::Int(v) => v,
                _ => unreachable!(),
            })
            .collect();
        if values.iter().any(|v| !(0..1 << 20).contains(v)) {
            tracing::warn!("negative or huge labels: the images are read as one class");
            return None;
        }
        let max = values.iter().copied().max().unwrap_or(0) as usize;
        let names = match names {
            Some(n) if n.len() > max => n,
            _ => (0..=max).map(|i| i.to_string()).collect(),
        };
        return Some((values.into_iter().map(|v| v as u32).collect(), names));
    }
    if rows.iter().all(|r| matches!(r.label, Label::Str(_))) {
        let names: BTreeSet<&str> = rows
            .iter()
            .filter_map(|r| match &r.label {
                Label::Str(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        let names: Vec<String> = names.into_iter().map(str::to_string).collect();
        let labels = rows
            .iter()
            .map(|r| match &r.label {
                Label::Str(s) => names.binary_search(s).unwrap_or(0) as u32,
                _ => 0,
            })
            .collect();
        return Some((labels, names));
    }
    tracing::warn!("the label column mixes integers and strings: the images are read as one class");
    None
}

fn decode_rows(
    rows: Vec<RawRow>,
    names: Option<Vec<String>>,
    cfg: &DataConfig,
    size: usize,
    snapshot: &Snapshot,
) -> Result<HubImages> {
    let (labels, class_names) = labels_of(&rows, names)
        .unwrap_or_else(|| (vec![0; rows.len()], vec![snapshot.repo.id.clone()]));
    let results = parallel_map(rows.len(), cfg.thread_count(), !cfg.skip_corrupt, |i| {
        let row = &rows[i];
        let bytes = match &row.image {
            Ok(bytes) => bytes.clone(),
            Err(reason) => {
                return Err(DataError::Empty {
                    path: row.name.clone(),
                    reason: format!(
                        "{reason} (to skip such rows, set `skip_corrupt = true` under `[data]` in \
                         the config)"
                    ),
                })
            }
        };
        let grey = is_grey(&bytes);
        decode_image(bytes, &row.name, size as u32).map(|px| (px, grey))
    });
    let mut out = HubImages {
        commit: snapshot.commit.clone(),
        class_names,
        ..HubImages::default()
    };
    let mut decoded = Vec::with_capacity(rows.len());
    let mut first_error = None;
    for ((row, label), result) in rows.iter().zip(&labels).zip(results) {
        match result {
            Some(Ok((px, grey))) => decoded.push((px, grey, *label)),
            Some(Err(e)) if cfg.skip_corrupt => {
                tracing::warn!(row = %row.name.display(), error = %e.chain(), "skipping unreadable image");
                out.skipped.push(row.name.clone());
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
    if decoded.is_empty() {
        return Err(DataError::HubDataset {
            repo: snapshot.label(),
            reason: "no readable image in the split".to_string(),
        });
    }
    if !out.skipped.is_empty() {
        tracing::warn!(skipped = out.skipped.len(), "skipped unreadable images");
    }
    let grey = decoded.iter().all(|(_, g, _)| *g);
    out.channels = if grey { 1 } else { 3 };
    let plane = size * size;
    for (px, _, label) in decoded {
        // A greyscale image decodes to three equal planes: keep one.
        out.pixels
            .extend_from_slice(if grey { &px[..plane] } else { &px[..] });
        out.labels.push(label);
    }
    Ok(out)
}

/// Whether an encoded image is greyscale (its header says so; `false` when it cannot be read).
fn is_grey(bytes: &[u8]) -> bool {
    use image::ImageDecoder as _;
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_decoder().ok())
        .is_some_and(|d| {
            matches!(
                d.color_type(),
                image::ColorType::L8
                    | image::ColorType::L16
                    | image::ColorType::La8
                    | image::ColorType::La16
            )
        })
}

/// The image column's index and whether it is a `{bytes, path}` struct, and the label column's
/// index, from a file's schema.
fn columns(fields: &[parquet::schema::types::TypePtr]) -> (Option<(usize, bool)>, Option<usize>) {
    use parquet::basic::{ConvertedType, LogicalType, Type as Physical};
    let is_binary = |t: &parquet::schema::types::Type| {
        t.is_primitive()
            && t.get_physical_type() == Physical::BYTE_ARRAY
            && !matches!(t.get_basic_info().converted_type(), ConvertedType::UTF8)
            && !matches!(
                t.get_basic_info().logical_type_ref(),
                Some(LogicalType::String)
            )
    };
    let image_like = |t: &parquet::schema::types::Type| -> Option<bool> {
        if t.is_group() {
            t.get_fields()
                .iter()
                .any(|c| c.name() == "bytes" && is_binary(c))
                .then_some(true)
        } else {
            is_binary(t).then_some(false)
        }
    };
    let candidates: Vec<(usize, bool, &str)> = fields
        .iter()
        .enumerate()
        .filter_map(|(i, f)| image_like(f).map(|s| (i, s, f.name())))
        .collect();
    let image = candidates
        .iter()
        .find(|(_, _, n)| IMAGE_COLUMNS.contains(&n.to_ascii_lowercase().as_str()))
        .or_else(|| candidates.iter().find(|(_, s, _)| *s))
        .or_else(|| candidates.first())
        .map(|&(i, s, _)| (i, s));
    let label = LABEL_COLUMNS.iter().find_map(|want| {
        fields
            .iter()
            .position(|f| f.name().eq_ignore_ascii_case(want) && f.is_primitive())
    });
    (image, label)
}

/// The `ClassLabel` names of `column` in the `huggingface` metadata `datasets` writes.
fn class_names(
    metadata: &parquet::file::metadata::FileMetaData,
    column: &str,
) -> Option<Vec<String>> {
    let kv = metadata.key_value_metadata()?;
    let value = kv
        .iter()
        .find(|kv| kv.key == "huggingface")?
        .value
        .as_ref()?;
    let json: serde_json::Value = serde_json::from_str(value).ok()?;
    let names = json
        .get("info")?
        .get("features")?
        .get(column)?
        .get("names")?;
    names
        .as_array()?
        .iter()
        .map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// Reads the image bytes and labels of every row of a parquet file; `shown` names it in errors
/// (and, with the row number, each row). A reader that panics on a damaged file is an error too.
fn read_parquet(local: &Path, shown: &Path) -> Result<(Vec<RawRow>, Option<Vec<String>>)> {
    let read = || -> Result<(Vec<RawRow>, Option<Vec<String>>)> {
        let bad = |reason: String| DataError::Parquet {
            path: shown.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(local).map_err(DataError::io(local))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
        let meta = reader.metadata().file_metadata();
        let root = meta.schema_descr().root_schema();
        let fields = root.get_fields();
        let (image, label) = columns(fields);
        let Some((image_col, is_struct)) = image else {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            return Err(bad(format!(
                "no image column: expected a struct column with binary `bytes` (the datasets \
                 library's Image feature) or a binary column; the columns are {}",
                names.join(", ")
            )));
        };
        let label_name = label.map(|i| fields[i].name().to_string());
        let names = label_name.as_deref().and_then(|n| class_names(meta, n));
        let mut rows = Vec::new();
        let iter = reader
            .get_row_iter(None)
            .map_err(|e| bad(format!("cannot read its rows: {e}")))?;
        for (i, row) in iter.enumerate() {
            let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
            let columns: Vec<&Field> = row.get_column_iter().map(|(_, f)| f).collect();
            let image = match columns.get(image_col) {
                Some(Field::Group(inner)) if is_struct => inner
                    .get_column_iter()
                    .find(|(n, _)| n.as_str() == "bytes")
                    .and_then(|(_, f)| match f {
                        Field::Bytes(b) => Some(b.data().to_vec()),
                        _ => None,
                    })
                    .ok_or_else(|| "the row's image has no bytes (null)".to_string()),
                Some(Field::Bytes(b)) => Ok(b.data().to_vec()),
                _ => Err("the row has no image (null)".to_string()),
            };
            let label = match label.and_then(|l| columns.get(l).copied()) {
                Some(Field::Byte(v)) => Label::Int(i64::from(*v)),
                Some(Field::Short(v)) => Label::Int(i64::from(*v)),
                Some(Field::Int(v)) => Label::Int(i64::from(*v)),
                Some(Field::Long(v)) => Label::Int(*v),
                Some(Field::UByte(v)) => Label::Int(i64::from(*v)),
                Some(Field::UShort(v)) => Label::Int(i64::from(*v)),
                Some(Field::UInt(v)) => Label::Int(i64::from(*v)),
                Some(Field::ULong(v)) => i64::try_from(*v).map_or(Label::None, Label::Int),
                Some(Field::Bool(v)) => Label::Int(i64::from(*v)),
                Some(Field::Str(s)) => Label::Str(s.clone()),
                _ => Label::None,
            };
            rows.push(RawRow {
                name: PathBuf::from(format!("{}[row {i}]", shown.display())),
                image,
                label,
            });
        }
        Ok((rows, names))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(result) => result,
        Err(_) => Err(DataError::Parquet {
            path: shown.to_path_buf(),
            reason: "the parquet reader failed on it (a damaged file?)".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for (text, repo, rev, split) in [
            ("ylecun/mnist", "ylecun/mnist", None, None),
            (
                "uoft-cs/cifar10:test",
                "uoft-cs/cifar10",
                None,
                Some("test"),
            ),
            ("o/n@v1.0", "o/n", Some("v1.0"), None),
            (
                "o/n@refs/convert/parquet:plain_text/train",
                "o/n",
                Some("refs/convert/parquet"),
                Some("plain_text/train"),
            ),
        ] {
            let spec = HubSpec::parse(text).unwrap();
            assert_eq!(spec.repo, repo);
            assert_eq!(spec.revision.as_deref(), rev);
            assert_eq!(spec.split.as_deref(), split);
            assert_eq!(spec.to_string(), text);
        }
        for bad in [
            "",
            "mnist",
            "o/n@",
            "o/n:",
            "a/b/c",
            "o/n:a/b/c",
            "o/n:..",
            "../x/y",
        ] {
            assert!(HubSpec::parse(bad).is_err(), "{bad:?}");
        }
        let pinned = HubSpec::parse(&format!("o/n@{}", "ab".repeat(20))).unwrap();
        assert!(pinned.is_pinned() && !HubSpec::parse("o/n@main").unwrap().is_pinned());
        assert_eq!(HubSpec::parse("o/n").unwrap().split_or_default(), "train");
    }

    #[test]
    fn splits_come_from_the_hub_layouts() {
        for (path, config, split) in [
            ("data/train-00000-of-00001.parquet", None, "train"),
            ("data/test.parquet", None, "test"),
            ("train.parquet", None, "train"),
            ("mnist/train-00000-of-00001.parquet", Some("mnist"), "train"),
            (
                "plain_text/test-00000-of-00001.parquet",
                Some("plain_text"),
                "test",
            ),
            ("default/train/0000.parquet", Some("default"), "train"),
            (
                "default/partial-train/0001.parquet",
                Some("default"),
                "train",
            ),
            ("train/0000.parquet", None, "train"),
        ] {
            assert_eq!(
                split_of(path),
                Some((config.map(str::to_string), split.to_string())),
                "{path}"
            );
        }
        assert_eq!(split_of("README.md"), None);
        assert_eq!(split_of("0000.parquet"), None);
    }
}
