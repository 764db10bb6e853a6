//! Checkpoints: one safetensors file (model, EMA and optimizer tensors) plus a small JSON file
//! (step, RNG state, data-loader position, full config) per saved step, in
//! `RUN_DIR/checkpoints/`.
//!
//! Both files are written atomically (temporary file, fsync, rename), the JSON last: a checkpoint
//! exists once its JSON does, so a crash or `kill -9` at any moment leaves every earlier
//! checkpoint loadable and never a half-written one that looks complete.
//!
//! Every checkpoint verifies itself ([`load`]): the JSON records the size and SHA-256 of the
//! tensors file, the run id and the SHA-256 of the config; the tensors file's metadata records
//! the step, the run id, the config's SHA-256 and the SHA-256 of the JSON's other fields. A
//! damaged, replaced or edited file is refused with an error naming the file and what differs,
//! and so is a checkpoint holding a NaN or an infinity (none is ever written: [`save`] refuses
//! non-finite tensors). Checkpoints written before these records existed load with a warning
//! naming what cannot be verified. The metadata keys are sorted, so identical states give
//! byte-identical files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_data::LoaderPosition;
use ddpm_fs::{check_regular_file, read_regular_file, write_atomic, MAX_TEXT_BYTES};
use ddpm_schedule::{Objective, ScheduleConfig};
use ddpm_unet::weights::read_safetensors;
use ddpm_unet::{DiffusionModel, KernelPolicy, ModelConfig};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use crate::precision::LossScaler;
use crate::{Result, TrainError};

/// Format tag of the JSON metadata file.
pub const CHECKPOINT_FORMAT: &str = "ddpm-rs/checkpoint/v1";
/// Tensor-name prefix of the raw model weights in a checkpoint.
pub const MODEL_PREFIX: &str = "model.";
/// Tensor-name prefix of the EMA weights in a checkpoint.
pub const EMA_PREFIX: &str = "ema.";
/// Tensor-name prefix of the optimizer moments in a checkpoint.
pub const OPTIM_PREFIX: &str = "optim.";
/// Tensors-file metadata key of the run's kernel policy (compact JSON of a [`KernelPolicy`]),
/// also in the JSON's config: a weights-only reader of the tensors file sees what it ran on.
pub const KERNELS_KEY: &str = "ddpm.kernels";
/// Tensors-file metadata key of the checkpoint's step.
pub const STEP_KEY: &str = "ddpm.step";
/// Tensors-file metadata key of the run id ([`run_id_for`]).
pub const RUN_ID_KEY: &str = "ddpm.run_id";
/// Tensors-file metadata key of the SHA-256 of the run's config ([`config_sha256`]).
pub const CONFIG_SHA_KEY: &str = "ddpm.config_sha256";
/// Tensors-file metadata key of the SHA-256 of the JSON's fields other than those describing
/// the tensors file (step, RNG, data position, config, loss scaler, ...).
pub const META_SHA_KEY: &str = "ddpm.meta_sha256";
/// The JSON keys that describe the tensors file, left out of [`META_SHA_KEY`]'s hash.
const TENSORS_FILE_KEYS: [&str; 3] = ["tensors_file", "tensors_bytes", "tensors_sha256"];
/// The folder (in `RUN_DIR/checkpoints/`) that checkpoints a resume passes over are moved to.
pub const SET_ASIDE_DIR: &str = "set-aside";

/// The JSON half of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// Optimizer steps completed.
    pub step: usize,
    /// The training RNG (timesteps, noise, dropout) after `step` steps.
    pub rng: ChaCha8Rng,
    /// Where the data loader stands after `step` steps.
    pub loader: LoaderPosition,
    /// The run's full configuration.
    pub config: TrainConfig,
    /// File name of the tensors, beside this file.
    pub tensors_file: String,
    /// Its size in bytes, to detect truncation before parsing.
    pub tensors_bytes: u64,
    /// The f16 loss scaler's state (unused in f32 and bf16 runs).
    #[serde(default)]
    pub loss_scaler: LossScaler,
    /// With several ranks: where each rank's training RNG stands (ChaCha word positions, index =
    /// rank). Every rank draws from the seed of [`CheckpointMeta::rng`] on its own stream (its
    /// rank); with these a resumed run of the same world size draws what an uninterrupted one
    /// would. Empty for a single process (and in checkpoints older than this field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_word_pos: Vec<u128>,
}

impl CheckpointMeta {
    /// The training RNG of `rank` in a world of `size` after this checkpoint's step, and
    /// whether it is exactly the one an uninterrupted run would have: rank 0's is
    /// [`CheckpointMeta::rng`]; another rank's is that seed on its own stream, at its word
    /// position in [`CheckpointMeta::rank_word_pos`] when the checkpoint has one for this world
    /// size, else at rank 0's position (a valid stream, not the uninterrupted one).
    pub fn rank_rng(&self, rank: usize, size: usize) -> (ChaCha8Rng, bool) {
        let mut rng = self.rng.clone();
        if rank == 0 {
            return (rng, true);
        }
        rng.set_stream(rank as u64);
        match self.rank_word_pos.get(rank) {
            Some(&pos) if self.rank_word_pos.len() == size => {
                rng.set_word_pos(pos);
                (rng, true)
            }
            _ => (rng, false),
        }
    }
}

/// What a checkpoint's JSON records to verify itself and its tensors file (stored beside the
/// fields of [`CheckpointMeta`] in the same JSON object). Every field is `None` in checkpoints
/// written before these records existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Integrity {
    /// The run the checkpoint belongs to ([`run_id_for`]), also in the tensors file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// SHA-256 of the JSON's `config` ([`config_sha256`]), also in the tensors file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// SHA-256 of the whole tensors file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors_sha256: Option<String>,
}

/// The JSON file of a checkpoint: its metadata and its integrity records in one object.
#[derive(Serialize)]
struct StoredMeta<'a> {
    #[serde(flatten)]
    meta: &'a CheckpointMeta,
    #[serde(flatten)]
    integrity: &'a Integrity,
}

/// SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of a JSON value in compact form. Values parsed from our own JSON text compare
/// whatever the pretty-printing, and fields a later version adds do not change the hash of a
/// file written before them.
fn value_sha256(value: &serde_json::Value) -> String {
    sha256_hex(serde_json::to_string(value).unwrap_or_default().as_bytes())
}

/// `value` as the JSON value its text parses to (what a reader of the file sees).
fn as_json_value<T: Serialize>(value: &T) -> Result<serde_json::Value> {
    let text = serde_json::to_vec(value).map_err(|e| TrainError::Other(e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| TrainError::Other(e.to_string()))
}

/// The SHA-256 of a run's configuration as a checkpoint records it.
pub fn config_sha256(config: &TrainConfig) -> Result<String> {
    Ok(value_sha256(&as_json_value(config)?))
}

/// The SHA-256 of a checkpoint JSON's fields other than [`TENSORS_FILE_KEYS`].
fn meta_sha256_of(json: &serde_json::Value) -> String {
    let mut json = json.clone();
    if let Some(map) = json.as_object_mut() {
        for key in TENSORS_FILE_KEYS {
            map.remove(key);
        }
    }
    value_sha256(&json)
}

/// The id of a run started with `config`: the first 16 bytes of its config's SHA-256, in hex.
/// It stays with the run when a resume changes the config. Two runs of the same configuration
/// share it (and on the CPU write byte-identical checkpoints); runs of different ones never do.
pub fn run_id_for(config: &TrainConfig) -> Result<String> {
    Ok(config_sha256(config)?[..32].to_string())
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The JSON metadata.
    pub meta: CheckpointMeta,
    /// Where the JSON was read from.
    pub path: PathBuf,
    /// All tensors, with their prefixes.
    pub tensors: HashMap<String, Tensor>,
    /// The integrity records of its JSON (all `None` in a checkpoint older than them).
    pub integrity: Integrity,
}

impl Checkpoint {
    /// The tensors under `prefix`, with the prefix removed.
    pub fn section(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
            .collect()
    }
}

/// The checkpoint directory of a run.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn stem(step: usize) -> String {
    format!("ckpt-{step:08}")
}

/// The JSON file of the checkpoint of `step` in the run `run_dir`.
pub fn json_path(run_dir: &Path, step: usize) -> PathBuf {
    checkpoint_dir(run_dir).join(format!("{}.json", stem(step)))
}

/// Writes an image as PNG atomically.
pub fn write_png_atomic(img: &image::RgbImage, path: &Path) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Serializes named tensors and metadata into safetensors bytes with the metadata keys sorted
/// (safetensors writes its metadata map in hash order, which changes from run to run), so that
/// identical tensors and metadata always give identical bytes. The tensors are laid out as
/// safetensors lays them out (wider dtypes first, then by name).
pub fn to_sorted_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    use safetensors::tensor::{TensorInfo, View};
    let json = |e: serde_json::Error| TrainError::Other(format!("serializing a checkpoint: {e}"));
    let mut entries: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    entries.sort_by(|(an, at), (bn, bt)| View::dtype(bt).cmp(&View::dtype(at)).then(an.cmp(bn)));
    let mut header = format!(
        "{{\"__metadata__\":{}",
        serde_json::to_string(metadata).map_err(json)?
    );
    let mut offset = 0;
    for (name, t) in &entries {
        let len = t.data_len();
        let info = TensorInfo {
            dtype: View::dtype(t),
            shape: t.dims().to_vec(),
            data_offsets: (offset, offset + len),
        };
        offset += len;
        header.push(',');
        header.push_str(&serde_json::to_string(name).map_err(json)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(json)?);
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header);
    for (_, t) in &entries {
        out.extend_from_slice(&View::data(t));
    }
    Ok(out)
}

/// The tensors of a safetensors file that hold NaN or infinite values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFiniteTensors {
    /// The first of them by name.
    pub first: String,
    /// Its non-finite values.
    pub count: usize,
    /// All its values.
    pub len: usize,
    /// How many tensors hold non-finite values.
    pub tensors: usize,
    /// Their sections (`model.*`, `ema.*`, `optim.m.*`, `optim.v.*` or the first name part).
    pub sections: Vec<String>,
}

impl fmt::Display for NonFiniteTensors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tensor{} hold{} NaN or infinite values ({}), the first `{}` ({} of {} values)",
            self.tensors,
            if self.tensors == 1 { "" } else { "s" },
            if self.tensors == 1 { "s" } else { "" },
            self.sections.join(", "),
            self.first,
            self.count,
            self.len
        )
    }
}

/// The section of a tensor name, as said in messages: `model.*`, `optim.v.*`, ...
fn section_of(name: &str) -> String {
    for prefix in [MODEL_PREFIX, EMA_PREFIX, "optim.m.", "optim.v."] {
        if name.starts_with(prefix) {
            return format!("{prefix}*");
        }
    }
    match name.split_once('.') {
        Some((head, _)) => format!("{head}.*"),
        None => name.to_string(),
    }
}

/// Counts the non-finite values of one tensor's little-endian bytes: a value is NaN or
/// infinite exactly when all its exponent bits are set.
fn count_non_finite(dtype: safetensors::Dtype, data: &[u8]) -> usize {
    use safetensors::Dtype;
    fn count<const N: usize>(data: &[u8], mask: u64) -> usize {
        data.chunks_exact(N)
            .filter(|c| {
                let mut b = [0u8; 8];
                b[..N].copy_from_slice(c);
                u64::from_le_bytes(b) & mask == mask
            })
            .count()
    }
    match dtype {
        Dtype::F64 => count::<8>(data, 0x7FF0_0000_0000_0000),
        Dtype::F32 => count::<4>(data, 0x7F80_0000),
        Dtype::F16 => count::<2>(data, 0x7C00),
        Dtype::BF16 => count::<2>(data, 0x7F80),
        _ => 0,
    }
}

/// The non-finite values of the tensors in safetensors `bytes` (`None` when all are finite);
/// an error when the bytes are not a safetensors file.
pub fn find_non_finite(
    bytes: &[u8],
) -> std::result::Result<Option<NonFiniteTensors>, safetensors::SafeTensorError> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut found: Option<NonFiniteTensors> = None;
    for (name, view) in views {
        let bad = count_non_finite(view.dtype(), view.data());
        if bad == 0 {
            continue;
        }
        let section = section_of(&name);
        match found.as_mut() {
            Some(f) => {
                f.tensors += 1;
                if !f.sections.contains(&section) {
                    f.sections.push(section);
                }
            }
            None => {
                let len = view.shape().iter().product();
                found = Some(NonFiniteTensors {
                    first: name,
                    count: bad,
                    len,
                    tensors: 1,
                    sections: vec![section],
                });
            }
        }
    }
    Ok(found)
}

/// Writes the checkpoint of `meta.step`: the tensors (each map's names get its prefix) and the
/// JSON, with the integrity records of run `run_id`. Tensors holding a NaN or an infinity are
/// refused ([`TrainError::NonFiniteCheckpoint`]) before anything is written.
pub fn save(
    run_dir: &Path,
    meta: &CheckpointMeta,
    run_id: &str,
    sections: &[(&str, &BTreeMap<String, Tensor>)],
    model_config: &ModelConfig,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir);
    let mut all = BTreeMap::new();
    for (prefix, map) in sections {
        for (k, t) in map.iter() {
            all.insert(format!("{prefix}{k}"), t.clone());
        }
    }
    let mut meta = meta.clone();
    meta.tensors_file = format!("{}.safetensors", stem(meta.step));
    meta.tensors_bytes = 0;
    let mut integrity = Integrity {
        run_id: Some(run_id.to_string()),
        config_sha256: Some(config_sha256(&meta.config)?),
        tensors_sha256: None,
    };
    let meta_sha = meta_sha256_of(&as_json_value(&StoredMeta {
        meta: &meta,
        integrity: &integrity,
    })?);
    let metadata = BTreeMap::from([
        (
            ddpm_unet::model::FORMAT_METADATA_KEY.to_string(),
            CHECKPOINT_FORMAT.to_string(),
        ),
        (
            ddpm_unet::model::CONFIG_METADATA_KEY.to_string(),
            compact(model_config)?,
        ),
        (
            "ddpm.schedule_config".to_string(),
            compact(&meta.config.schedule)?,
        ),
        (
            "ddpm.objective".to_string(),
            compact(&meta.config.objective)?,
        ),
        (KERNELS_KEY.to_string(), compact(&meta.config.kernels)?),
        (STEP_KEY.to_string(), meta.step.to_string()),
        (RUN_ID_KEY.to_string(), run_id.to_string()),
        (
            CONFIG_SHA_KEY.to_string(),
            integrity.config_sha256.clone().unwrap_or_default(),
        ),
        (META_SHA_KEY.to_string(), meta_sha),
    ]);
    let bytes = to_sorted_safetensors(&all, &metadata)?;
    // Nothing non-finite is ever placed: a checkpoint must be a state to go back to.
    if let Some(found) = find_non_finite(&bytes).map_err(|e| TrainError::Other(e.to_string()))? {
        return Err(TrainError::NonFiniteCheckpoint {
            step: meta.step,
            found,
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, "creating", e))?;
    let tensors_path = dir.join(&meta.tensors_file);
    write_atomic(&tensors_path, &bytes)
        .map_err(|e| TrainError::io(&tensors_path, "writing checkpoint", e))?;
    meta.tensors_bytes = bytes.len() as u64;
    integrity.tensors_sha256 = Some(sha256_hex(&bytes));
    let json = serde_json::to_vec_pretty(&StoredMeta {
        meta: &meta,
        integrity: &integrity,
    })
    .map_err(|e| TrainError::Other(e.to_string()))?;
    let json_path = json_path(run_dir, meta.step);
    write_atomic(&json_path, &json)
        .map_err(|e| TrainError::io(&json_path, "writing checkpoint", e))?;
    Ok(json_path)
}

/// Compact JSON of a value, for the tensors file's metadata.
fn compact<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| TrainError::Other(e.to_string()))
}

/// The complete checkpoints of a run (those whose JSON exists), as `(step, json path)` sorted by
/// step.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoint_dir(run_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(&dir, "listing", e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(&dir, "listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("ckpt-")
            .and_then(|s| s.strip_suffix(".json"))
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes all but the newest `keep` checkpoints, and tensors files whose JSON is gone (left by
/// a process killed between writing a checkpoint's two files, or while pruning). Call it only
/// while holding the run's [`crate::lock::RunLock`], right after a save.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir)?;
    let n = all.len().saturating_sub(keep);
    let dir = checkpoint_dir(run_dir);
    for (step, json) in all.iter().take(n) {
        // JSON first: a checkpoint without JSON no longer counts, whatever happens next.
        std::fs::remove_file(json).map_err(|e| TrainError::io(json, "removing", e))?;
        let _ = std::fs::remove_file(dir.join(format!("{}.safetensors", stem(*step))));
    }
    let kept: Vec<usize> = all.iter().skip(n).map(|(step, _)| *step).collect();
    remove_orphans(&dir, &kept);
    Ok(())
}

/// Deletes the tensors files whose JSON is gone: left by a process killed between writing a
/// checkpoint's two files, or between removing them while pruning. Resuming calls it (under the
/// run's lock, before anything else is written): a run killed while pruning after its last
/// checkpoint is never pruned again, since its resume has no step left to save.
pub fn remove_orphan_tensors(run_dir: &Path) -> Result<()> {
    let complete: Vec<usize> = list(run_dir)?.iter().map(|(step, _)| *step).collect();
    remove_orphans(&checkpoint_dir(run_dir), &complete);
    Ok(())
}

/// Deletes the `ckpt-N.safetensors` files in `dir` whose step is not in `kept`.
fn remove_orphans(dir: &Path, kept: &[usize]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = name
            .strip_prefix("ckpt-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.parse::<usize>().ok())
            .is_some_and(|step| !kept.contains(&step));
        if orphan {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!(file = %entry.path().display(), "removed orphan tensors"),
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), "cannot remove orphan tensors: {e}")
                }
            }
        }
    }
}

/// Moves both files of the checkpoint of `step` into `RUN_DIR/checkpoints/set-aside/` (a name
/// already there gets a `.N` suffix), so that a run can continue from an older checkpoint
/// without deleting the newer one. The tensors file goes first: a kill in between leaves a JSON
/// whose tensors are missing, which loading reports, never an orphan that pruning deletes.
/// Returns where the JSON went.
pub fn set_aside(run_dir: &Path, step: usize) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir);
    let to = dir.join(SET_ASIDE_DIR);
    std::fs::create_dir_all(&to).map_err(|e| TrainError::io(&to, "creating", e))?;
    let free = |name: &str| {
        let mut path = to.join(name);
        let mut n = 1;
        while path.exists() {
            n += 1;
            path = to.join(format!("{name}.{n}"));
        }
        path
    };
    let mut json_to = to.clone();
    for ext in ["safetensors", "json"] {
        let name = format!("{}.{ext}", stem(step));
        let from = dir.join(&name);
        if !from.exists() {
            continue;
        }
        let dest = free(&name);
        std::fs::rename(&from, &dest).map_err(|e| TrainError::io(&from, "moving", e))?;
        json_to = dest;
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(json_to)
}

/// Parses the JSON half of a checkpoint and checks its format tag; `json_path` only names the
/// file in errors.
pub fn parse_meta(bytes: &[u8], json_path: &Path) -> Result<CheckpointMeta> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: Some(json_path.to_path_buf()),
        reason,
    };
    let meta: CheckpointMeta = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("the metadata is not valid checkpoint JSON ({e}); delete this checkpoint to resume from the previous one")))?;
    if meta.format != CHECKPOINT_FORMAT {
        return Err(bad(format!(
            "unknown format `{}` (expected `{CHECKPOINT_FORMAT}`)",
            meta.format
        )));
    }
    // The tensors live beside the JSON: a name that leads elsewhere is not ours.
    let plain = Path::new(&meta.tensors_file)
        .file_name()
        .is_some_and(|n| n == meta.tensors_file.as_str());
    if !plain {
        return Err(bad(format!(
            "`tensors_file` must name a file beside the JSON, got `{}`",
            meta.tensors_file
        )));
    }
    Ok(meta)
}

/// Parses the integrity records of a checkpoint's JSON (all `None` in an old checkpoint).
pub fn parse_integrity(bytes: &[u8], json_path: &Path) -> Result<Integrity> {
    serde_json::from_slice(bytes).map_err(|e| TrainError::Checkpoint {
        path: Some(json_path.to_path_buf()),
        reason: format!("its integrity records are invalid ({e})"),
    })
}

/// A file name for messages: the last component of `path`.
fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Checks a checkpoint's tensors file (`bytes`, at `tensors_path`) against its JSON (`json`,
/// parsed into `meta` and `integrity`): the SHA-256, the step, the run id, the config's and
/// the JSON's hashes, and that every value is finite. Returns what could not be verified (an
/// old checkpoint without records), empty when everything was.
fn verify(
    json: &[u8],
    meta: &CheckpointMeta,
    integrity: &Integrity,
    bytes: &[u8],
    json_path: &Path,
    tensors_path: &Path,
) -> Result<Vec<&'static str>> {
    let (jname, tname) = (name_of(json_path), name_of(tensors_path));
    let on_tensors = |reason: String| TrainError::Checkpoint {
        path: Some(tensors_path.to_path_buf()),
        reason,
    };
    let on_json = |reason: String| TrainError::Checkpoint {
        path: Some(json_path.to_path_buf()),
        reason,
    };
    let sha_ok = integrity
        .tensors_sha256
        .as_ref()
        .map(|h| *h == sha256_hex(bytes));
    let header = safetensors::SafeTensors::read_metadata(bytes)
        .map(|(_, m)| m.metadata().clone().unwrap_or_default());
    if let Ok(header) = &header {
        // The identity of the tensors first: a file from elsewhere is named as such.
        if let Some(step) = header.get(STEP_KEY) {
            if *step != meta.step.to_string() {
                return Err(on_tensors(format!(
                    "holds the tensors of step {step}, but {jname} is the checkpoint of step {} \
                     (the tensors file was replaced by another checkpoint's, or the JSON's step \
                     edited): put back the right file or use an older checkpoint",
                    meta.step
                )));
            }
        }
        match (header.get(RUN_ID_KEY), &integrity.run_id) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                return Err(on_tensors(format!(
                    "belongs to another run (run id {theirs}; {jname} is of run {ours}): put \
                     back this run's file or use an older checkpoint"
                )));
            }
            (Some(_), None) => {
                return Err(on_json(format!(
                    "records no run id or checksums, but its tensors file {tname} does: the \
                     JSON was replaced by an older one or edited; use an older checkpoint"
                )));
            }
            (None, Some(_)) => {
                return Err(on_tensors(format!(
                    "records no run id, but {jname} does: the tensors file was replaced by one \
                     of an older ddpm; put back this run's file or use an older checkpoint"
                )));
            }
            _ => {}
        }
    }
    if sha_ok == Some(false) {
        return Err(on_tensors(format!(
            "its content does not match the SHA-256 recorded in {jname} (damaged on disk, or \
             replaced): use an older checkpoint"
        )));
    }
    let header = header.map_err(|e| {
        on_tensors(format!(
            "not a valid safetensors file (truncated or corrupt?): {e}"
        ))
    })?;
    let mut unverified = Vec::new();
    if integrity.tensors_sha256.is_none() {
        unverified.push("content");
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| on_json(format!("is not valid JSON ({e})")))?;
    let config_sha = value_sha256(value.get("config").unwrap_or(&serde_json::Value::Null));
    match &integrity.config_sha256 {
        Some(recorded) if *recorded != config_sha => {
            return Err(on_json(
                "its `config` was edited after the checkpoint was written (its SHA-256 differs \
                 from the one recorded): undo the edit (change settings with `config.toml` or \
                 the resume options instead) or use an older checkpoint"
                    .into(),
            ));
        }
        Some(recorded) => {
            if header.get(CONFIG_SHA_KEY) != Some(recorded) {
                return Err(on_tensors(format!(
                    "was written with another configuration than {jname} records (config \
                     SHA-256 {} vs {recorded}): put back the right file or use an older \
                     checkpoint",
                    header.get(CONFIG_SHA_KEY).map_or("missing", String::as_str)
                )));
            }
        }
        None => unverified.push("config"),
    }
    match header.get(META_SHA_KEY) {
        Some(recorded) if *recorded != meta_sha256_of(&value) => {
            return Err(on_json(format!(
                "was edited after the checkpoint was written: its training state (RNG, data \
                 position, loss scale, ...) differs from the one recorded with {tname}; use \
                 an older checkpoint"
            )));
        }
        Some(_) => {}
        None => unverified.push("RNG and data position"),
    }
    if integrity.run_id.is_none() {
        unverified.push("run");
    }
    if let Some(found) =
        find_non_finite(bytes).map_err(|e| on_tensors(format!("cannot be read: {e}")))?
    {
        return Err(on_tensors(format!(
            "{found}: its weights cannot be used (written before ddpm refused non-finite \
             checkpoints, or damaged); use an older checkpoint"
        )));
    }
    Ok(unverified)
}

/// Loads the checkpoint whose JSON is at `json_path`, verifying the tensors file against it
/// (size, SHA-256, step, run id, config and state hashes) and that every value is finite. A
/// checkpoint written before these records existed loads with a warning naming what could not
/// be verified.
pub fn load(json_path: &Path, device: &Device) -> Result<Checkpoint> {
    let text = read_regular_file(json_path, MAX_TEXT_BYTES)
        .map_err(|e| TrainError::io(json_path, "reading checkpoint", e))?;
    let meta = parse_meta(&text, json_path)?;
    let integrity = parse_integrity(&text, json_path)?;
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let tensors_path = dir.join(&meta.tensors_file);
    let size = match check_regular_file(&tensors_path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TrainError::Checkpoint {
                path: Some(json_path.to_path_buf()),
                reason: format!(
                    "its tensors file {} is missing (deleted?), so this checkpoint cannot be \
                     used; use an older checkpoint",
                    tensors_path.display()
                ),
            });
        }
        Err(e) => return Err(TrainError::io(&tensors_path, "reading checkpoint", e)),
    };
    if size != meta.tensors_bytes {
        return Err(TrainError::Checkpoint {
            path: Some(tensors_path),
            reason: format!(
                "is {size} bytes but was written with {} (truncated or corrupted on disk); \
                 delete it and its .json to resume from the previous checkpoint",
                meta.tensors_bytes
            ),
        });
    }
    let bytes = read_regular_file(&tensors_path, meta.tensors_bytes)
        .map_err(|e| TrainError::io(&tensors_path, "reading checkpoint", e))?;
    let unverified = verify(&text, &meta, &integrity, &bytes, json_path, &tensors_path)?;
    if !unverified.is_empty() {
        tracing::warn!(
            "checkpoint {} was written before checkpoints recorded checksums and run ids: its \
             {} cannot be verified (its size, step and finite values were checked)",
            json_path.display(),
            match unverified.split_last() {
                Some((last, [])) => last.to_string(),
                Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                None => String::new(),
            }
        );
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        TrainError::Checkpoint {
            path: Some(tensors_path.clone()),
            reason: format!("cannot decode tensors: {e}"),
        }
    })?;
    Ok(Checkpoint {
        meta,
        path: json_path.to_path_buf(),
        tensors,
        integrity,
    })
}

/// Loads the newest complete checkpoint of a run; see [`select`] to fall back on an older one.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Checkpoint> {
    Ok(select(run_dir, ResumeFrom::Newest, device)?.checkpoint)
}

/// Which checkpoint of a run to continue from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumeFrom {
    /// The newest; if it fails verification, an error that names the newest one that verifies.
    #[default]
    Newest,
    /// The checkpoint of this step.
    Step(usize),
    /// The newest one that verifies (newer ones are passed over).
    NewestIntact,
}

/// A newer checkpoint passed over by [`select`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedOver {
    /// Its step.
    pub step: usize,
    /// Why (its verification error), or that an older step was asked for.
    pub reason: String,
}

/// The checkpoint chosen by [`select`], and the newer ones it passed over (to be set aside with
/// [`set_aside`] before the run writes again).
#[derive(Debug)]
pub struct Selected {
    /// The verified checkpoint.
    pub checkpoint: Checkpoint,
    /// The newer checkpoints, oldest first.
    pub newer: Vec<PassedOver>,
}

/// The newest checkpoint of a run fails verification (the error of [`select`] and
/// [`load_model`]): what is wrong and which checkpoint does verify.
#[derive(Debug, Clone)]
pub struct DamagedCheckpoint {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The step of the checkpoint that fails.
    pub step: usize,
    /// Its verification error, one line.
    pub error: String,
    /// The newest checkpoint that verifies: its step and JSON file.
    pub intact: Option<(usize, PathBuf)>,
}

impl fmt::Display for DamagedCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checkpoint step {} of {} is damaged ({}); ",
            self.step,
            self.run_dir.display(),
            self.error
        )?;
        match &self.intact {
            Some((step, _)) => write!(f, "the newest intact one is step {step}"),
            None => write!(f, "no older checkpoint of the run verifies either"),
        }
    }
}

/// The run id of the run started in `run_dir`: that of the last `start` event of its
/// `history.jsonl`, when it has one (lines that do not parse, a torn one, are passed over).
fn started_run_id(run_dir: &Path) -> Option<String> {
    let path = run_dir.join(crate::resume::HISTORY_FILE);
    let bytes = read_regular_file(&path, MAX_TEXT_BYTES).ok()?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<crate::resume::HistoryEvent>(l).ok())
        .find(|e| e.event == "start")
        .map(|e| e.run_id)
}

/// [`load`], and the checkpoint must be of the run `run` (the run id its directory's history
/// records, when known): one copied in from another run's directory is refused by name.
fn load_of_run(json: &Path, device: &Device, run: Option<&str>) -> Result<Checkpoint> {
    let ckpt = load(json, device)?;
    if let (Some(ours), Some(theirs)) = (run, ckpt.integrity.run_id.as_deref()) {
        if ours != theirs {
            return Err(TrainError::Checkpoint {
                path: Some(json.to_path_buf()),
                reason: format!(
                    "belongs to another run (run id {theirs}; this directory's {} records run \
                     {ours}): it was copied in from another run's checkpoints; move it out of \
                     this run's checkpoints/ or use an older checkpoint",
                    crate::resume::HISTORY_FILE
                ),
            });
        }
    }
    Ok(ckpt)
}

/// The newest checkpoint at or before `newest` of `all` that loads (and is of the run `run`),
/// and the errors of those after it.
fn newest_loadable(
    all: &[(usize, PathBuf)],
    device: &Device,
    run: Option<&str>,
) -> (Option<Checkpoint>, Vec<PassedOver>) {
    let mut failed = Vec::new();
    for (step, json) in all.iter().rev() {
        match load_of_run(json, device, run) {
            Ok(ckpt) => {
                failed.reverse();
                return (Some(ckpt), failed);
            }
            Err(e) => failed.push(PassedOver {
                step: *step,
                reason: e.to_string(),
            }),
        }
    }
    failed.reverse();
    (None, failed)
}

/// Chooses and loads (verified) the checkpoint of `run_dir` to continue from. A newest
/// checkpoint that fails verification is never passed over silently: with
/// [`ResumeFrom::Newest`] it is an error naming the newest one that verifies.
pub fn select(run_dir: &Path, from: ResumeFrom, device: &Device) -> Result<Selected> {
    let all = list(run_dir)?;
    let run = started_run_id(run_dir);
    let run = run.as_deref();
    let Some((newest, newest_json)) = all.last().cloned() else {
        return Err(TrainError::Checkpoint {
            path: Some(checkpoint_dir(run_dir)),
            reason:
                "holds no complete checkpoint (is this a run directory written by `ddpm train`?)"
                    .into(),
        });
    };
    match from {
        ResumeFrom::Newest => match load_of_run(&newest_json, device, run) {
            Ok(checkpoint) => Ok(Selected {
                checkpoint,
                newer: Vec::new(),
            }),
            Err(e) => {
                let (intact, _) = newest_loadable(&all[..all.len() - 1], device, run);
                Err(TrainError::Damaged(Box::new(DamagedCheckpoint {
                    run_dir: run_dir.to_path_buf(),
                    step: newest,
                    error: e.to_string(),
                    intact: intact.map(|c| (c.meta.step, c.path)),
                })))
            }
        },
        ResumeFrom::Step(step) => {
            let Some(pos) = all.iter().position(|(s, _)| *s == step) else {
                let have: Vec<String> = all.iter().map(|(s, _)| s.to_string()).collect();
                return Err(TrainError::Checkpoint {
                    path: Some(checkpoint_dir(run_dir)),
                    reason: format!(
                        "holds no checkpoint of step {step} (it has steps {})",
                        have.join(", ")
                    ),
                });
            };
            let checkpoint = load_of_run(&all[pos].1, device, run)?;
            let newer = all[pos + 1..]
                .iter()
                .map(|(s, json)| PassedOver {
                    step: *s,
                    reason: match load_of_run(json, device, run) {
                        Ok(_) => format!("an older step ({step}) was chosen to resume from"),
                        Err(e) => e.to_string(),
                    },
                })
                .collect();
            Ok(Selected { checkpoint, newer })
        }
        ResumeFrom::NewestIntact => match newest_loadable(&all, device, run) {
            (Some(checkpoint), newer) => Ok(Selected { checkpoint, newer }),
            (None, failed) => Err(TrainError::Damaged(Box::new(DamagedCheckpoint {
                run_dir: run_dir.to_path_buf(),
                step: newest,
                error: failed.last().map(|f| f.reason.clone()).unwrap_or_default(),
                intact: None,
            }))),
        },
    }
}

/// Which weights of a checkpoint to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsKind {
    /// The exponential moving average of the weights (what sampling and evaluation use).
    #[default]
    Ema,
    /// The raw trained weights.
    Raw,
}

impl WeightsKind {
    /// The tensor-name prefix of these weights in a checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Ema => EMA_PREFIX,
            Self::Raw => MODEL_PREFIX,
        }
    }

    /// `"ema"` or `"raw"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ema => "ema",
            Self::Raw => "raw",
        }
    }
}

/// A model ready for sampling or evaluation, with what is needed to use it.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network with the chosen weights (F32).
    pub model: DiffusionModel,
    /// The noise schedule it was trained with.
    pub schedule: ScheduleConfig,
    /// What the network predicts.
    pub objective: Objective,
    /// The training step of the weights, when known.
    pub step: Option<usize>,
    /// The run's full configuration, when loaded from a checkpoint.
    pub config: Option<TrainConfig>,
    /// The kernel policy the weights were trained under (the run's `[kernels]`, or a weights
    /// file's [`KERNELS_KEY`]; the default when it records none), which the model runs under
    /// ([`DiffusionModel::with_kernel_policy`]).
    pub kernels: KernelPolicy,
    /// The file the weights were read from (a checkpoint's JSON or a weights file).
    pub source: PathBuf,
    /// Which weights were loaded.
    pub weights: WeightsKind,
}

/// Finds and loads a model: `path` is a run directory (its newest checkpoint), a checkpoint's
/// `.json` or `.safetensors`, or a weights file written by [`DiffusionModel::save`] (then the
/// schedule and objective come from its metadata, defaulting to the linear 1000-step schedule and
/// eps). `weights` picks the EMA or the raw weights of a checkpoint.
pub fn load_model(path: &Path, weights: WeightsKind, device: &Device) -> Result<LoadedModel> {
    let prefix = weights.prefix();
    let json = if path.is_dir() {
        None
    } else if path.extension().is_some_and(|e| e == "json") {
        Some(path.to_path_buf())
    } else {
        let sibling = path.with_extension("json");
        sibling.exists().then_some(sibling)
    };
    let ckpt = match json {
        // A run directory: its newest checkpoint, verified (an error names the newest intact
        // one when it fails).
        None if path.is_dir() => Some(select(path, ResumeFrom::Newest, device)?.checkpoint),
        None => None,
        Some(json) => Some(load(&json, device)?),
    };
    if let Some(ckpt) = ckpt {
        let kernels = ckpt.meta.config.kernels;
        let model = DiffusionModel::from_tensors(
            &ckpt.meta.config.model,
            &ckpt.section(prefix),
            device,
            DType::F32,
            &ckpt.path,
        )?
        .with_kernel_policy(kernels);
        tracing::info!(checkpoint = %ckpt.path.display(), step = ckpt.meta.step, weights = weights.name(), "model loaded");
        return Ok(LoadedModel {
            model,
            schedule: ckpt.meta.config.schedule,
            objective: ckpt.meta.config.objective,
            step: Some(ckpt.meta.step),
            config: Some(ckpt.meta.config),
            kernels,
            source: ckpt.path,
            weights,
        });
    }
    // A plain weights file written by DiffusionModel::save (eps objective, default schedule
    // unless its metadata says otherwise).
    let file = read_safetensors(path, device)?;
    let bytes = read_regular_file(path, u64::MAX)
        .map_err(|e| TrainError::io(path, "reading weights", e))?;
    if let Some(found) = find_non_finite(&bytes).map_err(|e| TrainError::Checkpoint {
        path: Some(path.to_path_buf()),
        reason: format!("cannot be read: {e}"),
    })? {
        return Err(TrainError::Checkpoint {
            path: Some(path.to_path_buf()),
            reason: format!("{found}: these weights cannot be used"),
        });
    }
    let config = ddpm_unet::model::config_from_metadata(&file.metadata, path)?;
    let tensors: HashMap<String, Tensor> = if file.tensors.keys().any(|k| k.starts_with(prefix)) {
        file.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
            .collect()
    } else {
        file.tensors
    };
    let bad = |what: &str, e: serde_json::Error| TrainError::Checkpoint {
        path: Some(path.to_path_buf()),
        reason: format!("the {what} in the file's metadata is invalid: {e}"),
    };
    let kernels = match file.metadata.get(KERNELS_KEY) {
        Some(s) => serde_json::from_str(s).map_err(|e| bad("kernel policy", e))?,
        None => KernelPolicy::default(),
    };
    let model = DiffusionModel::from_tensors(&config, &tensors, device, DType::F32, path)?
        .with_kernel_policy(kernels);
    let schedule: ScheduleConfig = match file.metadata.get("ddpm.schedule_config") {
        Some(s) => serde_json::from_str(s).map_err(|e| bad("schedule config", e))?,
        None => ScheduleConfig::default(),
    };
    // A schedule that cannot be built (0 timesteps, betas out of range) is the file's fault:
    // said here with its key, not later by whichever command first builds it.
    schedule.betas().map_err(|e| TrainError::Checkpoint {
        path: Some(path.to_path_buf()),
        reason: format!(
            "the schedule config in the file's metadata (ddpm.schedule_config) is invalid: {e}"
        ),
    })?;
    let objective = match file.metadata.get("ddpm.objective") {
        Some(s) => serde_json::from_str(s).map_err(|e| bad("objective", e))?,
        None => Objective::Eps,
    };
    let step = file.metadata.get("ddpm.step").and_then(|s| s.parse().ok());
    tracing::info!(weights_file = %path.display(), "model loaded");
    Ok(LoadedModel {
        model,
        schedule,
        objective,
        step,
        config: None,
        kernels,
        source: path.to_path_buf(),
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// A checkpoint's metadata with rank 0's RNG `lead` and the ranks' `word_pos`.
    fn meta(lead: ChaCha8Rng, word_pos: Vec<u128>) -> CheckpointMeta {
        CheckpointMeta {
            format: CHECKPOINT_FORMAT.to_string(),
            step: 1,
            rng: lead,
            loader: LoaderPosition::default(),
            config: TrainConfig::default(),
            tensors_file: String::new(),
            tensors_bytes: 0,
            loss_scaler: LossScaler::default(),
            rank_word_pos: word_pos,
        }
    }

    /// Ranks drawing different amounts (not whole ChaCha blocks) from their own streams: each
    /// rank's RNG rebuilt from rank 0's state and the word positions continues exactly as the
    /// live one does.
    #[test]
    fn rank_rngs_resume_exactly_from_word_positions() {
        let size = 3;
        let mut live: Vec<ChaCha8Rng> = (0..size)
            .map(|r| {
                let mut rng = ChaCha8Rng::seed_from_u64(42);
                rng.set_stream(r as u64);
                rng
            })
            .collect();
        for (r, rng) in live.iter_mut().enumerate() {
            for _ in 0..(37 + 101 * r) {
                rng.next_u32();
            }
            rng.next_u64();
        }
        let pos: Vec<u128> = live.iter().map(|r| r.get_word_pos()).collect();
        assert!(
            pos[1] != pos[2],
            "the test needs ranks at different positions"
        );
        let saved = meta(live_lead(42, pos[0]), pos.clone());
        for (r, rng) in live.iter_mut().enumerate() {
            let (mut rebuilt, exact) = saved.rank_rng(r, size);
            assert!(exact, "rank {r}");
            for _ in 0..100 {
                assert_eq!(rebuilt.next_u64(), rng.next_u64(), "rank {r}");
            }
        }
        // Another world size: rank 0's position on the rank's own stream, flagged inexact.
        let (other, exact) = saved.rank_rng(1, 2);
        assert!(!exact);
        assert_eq!((other.get_stream(), other.get_word_pos()), (1, pos[0]));
        // A single process has no positions: its RNG is the checkpoint's.
        let (single, exact) = meta(live_lead(42, pos[0]), Vec::new()).rank_rng(0, 1);
        assert!(exact && single == live_lead(42, pos[0]));
    }

    /// Rank 0's RNG at word position `pos`.
    fn live_lead(seed: u64, pos: u128) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos(pos);
        rng
    }

    /// A run directory with checkpoints of `steps` (tensors depending on the step and `seed`),
    /// written by [`save`]; returns its path.
    fn write_run(dir: &Path, steps: &[usize], seed: u64) -> PathBuf {
        let config = TrainConfig {
            seed,
            ..TrainConfig::default()
        };
        let run_id = run_id_for(&config).expect("run id");
        for &step in steps {
            let v = |k: f32| {
                Tensor::new(&[k, step as f32, seed as f32 + 0.5], &Device::Cpu).expect("tensor")
            };
            let (w, e, m, vv) = (
                BTreeMap::from([("w".to_string(), v(1.0))]),
                BTreeMap::from([("w".to_string(), v(2.0))]),
                BTreeMap::from([("m.w".to_string(), v(3.0))]),
                BTreeMap::from([("v.w".to_string(), v(4.0))]),
            );
            let mut m_all = m.clone();
            m_all.extend(vv);
            let mut meta = meta(ChaCha8Rng::seed_from_u64(seed), Vec::new());
            meta.step = step;
            meta.config = config.clone();
            save(
                dir,
                &meta,
                &run_id,
                &[(MODEL_PREFIX, &w), (EMA_PREFIX, &e), (OPTIM_PREFIX, &m_all)],
                &config.model,
            )
            .expect("saved");
        }
        dir.to_path_buf()
    }

    fn tensors_path(run: &Path, step: usize) -> PathBuf {
        checkpoint_dir(run).join(format!("{}.safetensors", stem(step)))
    }

    fn load_err(json: &Path) -> String {
        load(json, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "loaded".into())
    }

    /// A process killed while pruning after its last checkpoint leaves the tensors of a
    /// checkpoint whose JSON it had removed; `remove_orphan_tensors` (run by every resume)
    /// deletes exactly those, and every complete checkpoint still loads.
    #[test]
    fn orphan_tensors_are_removed_and_complete_checkpoints_kept() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = write_run(dir.path(), &[2, 4, 6, 8], 0);
        // Killed between the JSON and the tensors of step 2 (pruning), and after the tensors of
        // step 10 were written but before its JSON.
        std::fs::remove_file(json_path(&run, 2))?;
        std::fs::copy(tensors_path(&run, 8), tensors_path(&run, 10))?;
        remove_orphan_tensors(&run)?;
        assert!(!tensors_path(&run, 2).exists() && !tensors_path(&run, 10).exists());
        let steps: Vec<usize> = list(&run)?.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [4, 6, 8]);
        for step in steps {
            assert!(tensors_path(&run, step).exists());
            assert_eq!(load_err(&json_path(&run, step)), "loaded");
        }
        Ok(())
    }

    /// Identical states give identical files, with the metadata keys sorted; the records
    /// round-trip and the checkpoint loads.
    #[test]
    fn identical_states_write_identical_verified_files() -> Result<()> {
        let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (a, b) = (write_run(a.path(), &[3], 0), write_run(b.path(), &[3], 0));
        for name in ["ckpt-00000003.json", "ckpt-00000003.safetensors"] {
            let (x, y) = (
                std::fs::read(checkpoint_dir(&a).join(name))?,
                std::fs::read(checkpoint_dir(&b).join(name))?,
            );
            assert!(x == y, "{name} differs between identical states");
        }
        let bytes = std::fs::read(tensors_path(&a, 3))?;
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
        let text = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8");
        let keys: Vec<&str> = header["__metadata__"]
            .as_object()
            .expect("metadata")
            .keys()
            .map(String::as_str)
            .collect();
        let mut positions: Vec<usize> = keys
            .iter()
            .map(|k| text.find(&format!("\"{k}\"")).expect("key in header"))
            .collect();
        let written = positions.clone();
        positions.sort();
        assert_eq!(written, positions, "metadata keys not in sorted order");
        assert_eq!(header["__metadata__"][STEP_KEY], "3");
        // The run's kernel policy is recorded.
        let kernels = header["__metadata__"][KERNELS_KEY]
            .as_str()
            .expect("kernels");
        let recorded: KernelPolicy = serde_json::from_str(kernels)?;
        assert_eq!(recorded, TrainConfig::default().kernels);
        let ckpt = load(&json_path(&a, 3), &Device::Cpu)?;
        assert_eq!(ckpt.meta.step, 3);
        assert_eq!(ckpt.integrity.tensors_sha256, Some(sha256_hex(&bytes)));
        assert_eq!(
            ckpt.integrity.run_id,
            Some(run_id_for(&ckpt.meta.config)?),
            "run id"
        );
        assert_eq!(
            ckpt.section("optim.v.")["w"].to_vec1::<f32>()?,
            [4.0, 3.0, 0.5]
        );
        // An empty tensor map still makes a valid file.
        let empty = to_sorted_safetensors(
            &BTreeMap::new(),
            &BTreeMap::from([("k".into(), "v".into())]),
        )?;
        let (_, m) = safetensors::SafeTensors::read_metadata(&empty).expect("valid");
        assert_eq!(
            m.metadata()
                .as_ref()
                .and_then(|m| m.get("k"))
                .map(String::as_str),
            Some("v")
        );
        Ok(())
    }

    /// The sorted writer lays out the tensors exactly as safetensors does (mixed dtypes): the
    /// same data bytes after the header, the same tensors; only the metadata's order differs.
    #[test]
    fn sorted_files_hold_what_safetensors_writes() -> Result<()> {
        let dev = Device::Cpu;
        let tensors = BTreeMap::from([
            ("b".to_string(), Tensor::new(&[1.5f32, -2.0, 3.25], &dev)?),
            (
                "a".to_string(),
                Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0]], &dev)?,
            ),
            (
                "c".to_string(),
                Tensor::new(&[1.0f32, 2.0], &dev)?.to_dtype(DType::BF16)?,
            ),
            ("d".to_string(), Tensor::new(&[7u8, 8, 9], &dev)?),
        ]);
        let metadata =
            BTreeMap::from([("z".to_string(), "1".to_string()), ("y".into(), "2".into())]);
        let ours = to_sorted_safetensors(&tensors, &metadata)?;
        let theirs = safetensors::serialize(
            tensors.iter().map(|(k, t)| (k.clone(), t.clone())),
            Some(metadata.clone().into_iter().collect()),
        )
        .expect("serialize");
        let body = |b: &[u8]| {
            let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
            b[8 + n..].to_vec()
        };
        assert_eq!(body(&ours), body(&theirs));
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&ours).expect("ours"),
            safetensors::SafeTensors::deserialize(&theirs).expect("theirs"),
        );
        let mut names = a.names();
        names.sort();
        assert_eq!(names, ["a", "b", "c", "d"]);
        for name in names {
            let (x, y) = (
                a.tensor(name).expect("ours"),
                b.tensor(name).expect("theirs"),
            );
            assert_eq!(
                (x.dtype(), x.shape(), x.data()),
                (y.dtype(), y.shape(), y.data())
            );
        }
        let (_, m) = safetensors::SafeTensors::read_metadata(&ours).expect("header");
        assert_eq!(m.metadata().clone(), Some(metadata.into_iter().collect()));
        Ok(())
    }

    /// Every kind of damage or substitution is refused, naming the file and what differs.
    #[test]
    fn damaged_replaced_and_edited_checkpoints_are_refused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = write_run(&tmp.path().join("run"), &[2, 4], 0);
        let other = write_run(&tmp.path().join("other"), &[4], 1);
        let (json, tensors) = (json_path(&run, 4), tensors_path(&run, 4));
        let (good_json, good_tensors) = (std::fs::read(&json)?, std::fs::read(&tensors)?);
        let restore = || -> Result<()> {
            std::fs::write(&json, &good_json)?;
            std::fs::write(&tensors, &good_tensors)?;
            Ok(())
        };
        // 8 bytes flipped in the tensor data (the file's last bytes: the v moments).
        let mut flipped = good_tensors.clone();
        let at = flipped.len() - 8;
        for b in &mut flipped[at..] {
            *b ^= 0x5a;
        }
        std::fs::write(&tensors, &flipped)?;
        let e = load_err(&json);
        assert!(
            e.contains("ckpt-00000004.safetensors") && e.contains("SHA-256"),
            "{e}"
        );
        // The tensors of step 2 (same size) in place of step 4's.
        std::fs::copy(tensors_path(&run, 2), &tensors)?;
        let e = load_err(&json);
        assert!(e.contains("holds the tensors of step 2"), "{e}");
        // Another run's tensors of the same step.
        std::fs::copy(tensors_path(&other, 4), &tensors)?;
        let e = load_err(&json);
        assert!(e.contains("belongs to another run"), "{e}");
        restore()?;
        // The JSON's step, its config and its RNG edited.
        let text = String::from_utf8(good_json.clone()).expect("utf-8");
        for (from, to, says) in [
            (
                "\"step\": 4",
                "\"step\": 100",
                "is the checkpoint of step 100",
            ),
            (
                "\"ema_decay\": 0.995",
                "\"ema_decay\": 0.99",
                "`config` was edited",
            ),
            ("\"stream\": 0", "\"stream\": 1", "was edited after"),
        ] {
            assert!(text.contains(from), "{from} not in the JSON");
            std::fs::write(&json, text.replacen(from, to, 1))?;
            let e = load_err(&json);
            assert!(
                e.contains(says) && e.contains("ckpt-00000004"),
                "{from}: {e}"
            );
        }
        restore()?;
        // The tensors file deleted.
        std::fs::remove_file(&tensors)?;
        let e = load_err(&json);
        assert!(e.contains("is missing"), "{e}");
        restore()?;
        load(&json, &Device::Cpu)?;
        Ok(())
    }

    /// A checkpoint written before the records loads (with a warning), unless it holds
    /// non-finite values; non-finite tensors are never written.
    #[test]
    fn old_checkpoints_load_and_non_finite_ones_are_refused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = write_run(tmp.path(), &[2], 0);
        let (json, tensors) = (json_path(&run, 2), tensors_path(&run, 2));
        // As the previous version wrote it: no integrity fields, no run id or hashes in the
        // metadata.
        let meta = parse_meta(&std::fs::read(&json)?, &json)?;
        let ckpt = load(&json, &Device::Cpu)?;
        let mut all: BTreeMap<String, Tensor> = ckpt.tensors.into_iter().collect();
        let old_meta = BTreeMap::from([(STEP_KEY.to_string(), "2".to_string())]);
        let write_old = |all: &BTreeMap<String, Tensor>| -> Result<()> {
            let bytes = to_sorted_safetensors(all, &old_meta)?;
            std::fs::write(&tensors, &bytes)?;
            let mut meta = meta.clone();
            meta.tensors_bytes = bytes.len() as u64;
            std::fs::write(&json, serde_json::to_vec_pretty(&meta)?)?;
            Ok(())
        };
        write_old(&all)?;
        let old = load(&json, &Device::Cpu)?;
        assert_eq!(old.integrity, Integrity::default());
        let nan = Tensor::new(&[1.0f32, f32::NAN, f32::INFINITY], &Device::Cpu)?;
        all.insert("ema.w".into(), nan.clone());
        write_old(&all)?;
        let e = load_err(&json);
        assert!(
            e.contains("`ema.w` (2 of 3 values)") && e.contains("ema.*"),
            "{e}"
        );
        let e = load_model(&run, WeightsKind::Raw, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("NaN or infinite"), "{e}");
        // save refuses a non-finite state and writes nothing.
        let fresh = tmp.path().join("fresh");
        let w = BTreeMap::from([("w".to_string(), nan)]);
        let mut meta = meta.clone();
        meta.step = 9;
        match save(
            &fresh,
            &meta,
            "id",
            &[(MODEL_PREFIX, &w)],
            &meta.config.model,
        ) {
            Err(TrainError::NonFiniteCheckpoint { step: 9, found }) => {
                assert_eq!(
                    (found.first.as_str(), found.count, found.len),
                    ("model.w", 2, 3)
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(list(&fresh)?.is_empty() && !tensors_path(&fresh, 9).exists());
        Ok(())
    }

    /// Exponent-all-ones values are found in every float dtype, and only those.
    #[test]
    fn non_finite_values_are_counted_in_every_float_dtype() {
        use safetensors::Dtype;
        let f32s: Vec<u8> = [
            1.0f32,
            f32::NAN,
            -f32::INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
        ]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
        assert_eq!(count_non_finite(Dtype::F32, &f32s), 2);
        let f64s: Vec<u8> = [f64::NAN, 0.0, f64::MAX, f64::INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(Dtype::F64, &f64s), 2);
        // f16: 0x7C00 = inf, 0x7E00 = NaN, 0x7BFF = 65504 (max); bf16: 0x7F80 = inf, 0x7FC0 = NaN.
        let halves = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert_eq!(
            count_non_finite(Dtype::F16, &halves(&[0x7C00, 0x7E00, 0x7BFF, 0xFC00])),
            3
        );
        assert_eq!(
            count_non_finite(Dtype::BF16, &halves(&[0x7F80, 0x7FC0, 0x7F7F, 0x3F80])),
            2
        );
        assert_eq!(count_non_finite(Dtype::U8, &[255; 4]), 0);
    }

    /// A damaged newest checkpoint names the newest intact one; asking for it (or for the
    /// newest intact) passes over the newer ones.
    #[test]
    fn selection_names_and_takes_the_newest_intact_checkpoint() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = write_run(tmp.path(), &[2, 4, 6], 0);
        std::fs::remove_file(tensors_path(&run, 6))?;
        match select(&run, ResumeFrom::Newest, &Device::Cpu) {
            Err(TrainError::Damaged(d)) => {
                assert_eq!((d.step, d.intact.as_ref().map(|i| i.0)), (6, Some(4)));
                assert!(
                    d.to_string().contains("the newest intact one is step 4"),
                    "{d}"
                );
            }
            other => panic!("expected a damaged checkpoint, got {other:?}"),
        }
        let s = select(&run, ResumeFrom::NewestIntact, &Device::Cpu)?;
        assert_eq!(s.checkpoint.meta.step, 4);
        assert_eq!(s.newer.iter().map(|p| p.step).collect::<Vec<_>>(), [6]);
        let s = select(&run, ResumeFrom::Step(2), &Device::Cpu)?;
        assert_eq!(s.newer.iter().map(|p| p.step).collect::<Vec<_>>(), [4, 6]);
        assert!(s.newer[0].reason.contains("older step"), "{:?}", s.newer);
        let e = select(&run, ResumeFrom::Step(3), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("no checkpoint of step 3 (it has steps 2, 4, 6)"),
            "{e}"
        );
        // Setting aside moves both files (the missing one is skipped) out of the listing.
        let moved = set_aside(&run, 6)?;
        assert!(moved.ends_with("set-aside/ckpt-00000006.json") && moved.exists());
        assert_eq!(list(&run)?.len(), 2);
        Ok(())
    }

    /// A whole checkpoint (JSON and tensors) copied in from another run verifies on its own;
    /// the run id of the directory's `history.jsonl` names it as another run's, and the newest
    /// checkpoint of the run itself is the intact one.
    #[test]
    fn a_checkpoint_copied_in_from_another_run_is_refused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let ours = write_run(&tmp.path().join("ours"), &[2, 4], 0);
        let theirs = write_run(&tmp.path().join("theirs"), &[6], 1);
        for ext in ["json", "safetensors"] {
            let name = format!("{}.{ext}", stem(6));
            std::fs::copy(
                checkpoint_dir(&theirs).join(&name),
                checkpoint_dir(&ours).join(&name),
            )?;
        }
        // Without a history the run is not known: the copy is taken (as before histories).
        assert_eq!(
            select(&ours, ResumeFrom::Newest, &Device::Cpu)?
                .checkpoint
                .meta
                .step,
            6
        );
        let start = crate::resume::HistoryEvent {
            event: "start".into(),
            step: 0,
            run_id: run_id_for(&TrainConfig {
                seed: 0,
                ..TrainConfig::default()
            })?,
            checkpoint: None,
            changes: Vec::new(),
            set_aside: Vec::new(),
        };
        crate::resume::append_history(&ours, &start)?;
        // A torn last line is passed over.
        let history = ours.join(crate::resume::HISTORY_FILE);
        let mut text = std::fs::read_to_string(&history)?;
        text.push_str("{\"event\":\"sta");
        std::fs::write(&history, text)?;
        match select(&ours, ResumeFrom::Newest, &Device::Cpu) {
            Err(TrainError::Damaged(d)) => {
                assert_eq!((d.step, d.intact.as_ref().map(|i| i.0)), (6, Some(4)));
                assert!(d.error.contains("belongs to another run"), "{d}");
            }
            other => panic!("expected a foreign checkpoint, got {other:?}"),
        }
        let s = select(&ours, ResumeFrom::NewestIntact, &Device::Cpu)?;
        assert_eq!(s.checkpoint.meta.step, 4);
        assert_eq!(s.newer.iter().map(|p| p.step).collect::<Vec<_>>(), [6]);
        Ok(())
    }

    /// Word positions past 2^64 survive the checkpoint's JSON.
    #[test]
    fn word_positions_round_trip_through_json() {
        let pos: Vec<u128> = vec![0, 17, u64::MAX as u128 + 5, (1u128 << 68) - 1];
        let json = serde_json::to_string(&pos).expect("serialize");
        let back: Vec<u128> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, pos);
    }
}
