//! Checkpoints: one safetensors file (model, EMA and optimizer tensors) plus a small JSON file
//! (step, RNG state, data-loader position, full config) per saved step, in
//! `RUN_DIR/checkpoints/`.
//!
//! Both files are written atomically (temporary file, fsync, rename), the JSON last: a checkpoint
//! exists once its JSON does, so a crash or `kill -9` at any moment leaves every earlier
//! checkpoint loadable and never a half-written one that looks complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_data::LoaderPosition;
use ddpm_schedule::{Objective, ScheduleConfig};
use ddpm_unet::weights::{read_safetensors, to_safetensors_bytes, write_atomic};
use ddpm_unet::{DiffusionModel, ModelConfig};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The JSON metadata.
    pub meta: CheckpointMeta,
    /// Where the JSON was read from.
    pub path: PathBuf,
    /// All tensors, with their prefixes.
    pub tensors: HashMap<String, Tensor>,
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

/// Writes the checkpoint of `step`: the tensors (each map's names get its prefix) and the JSON.
pub fn save(
    run_dir: &Path,
    meta: &CheckpointMeta,
    sections: &[(&str, &BTreeMap<String, Tensor>)],
    model_config: &ModelConfig,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, "creating", e))?;
    let mut all = BTreeMap::new();
    for (prefix, map) in sections {
        for (k, t) in map.iter() {
            all.insert(format!("{prefix}{k}"), t.clone());
        }
    }
    let model_json =
        serde_json::to_string(model_config).map_err(|e| TrainError::Other(e.to_string()))?;
    let schedule_json = serde_json::to_string(&meta.config.schedule)
        .map_err(|e| TrainError::Other(e.to_string()))?;
    let objective_json = serde_json::to_string(&meta.config.objective)
        .map_err(|e| TrainError::Other(e.to_string()))?;
    let metadata = HashMap::from([
        (
            ddpm_unet::model::FORMAT_METADATA_KEY.to_string(),
            CHECKPOINT_FORMAT.to_string(),
        ),
        (
            ddpm_unet::model::CONFIG_METADATA_KEY.to_string(),
            model_json,
        ),
        ("ddpm.schedule_config".to_string(), schedule_json),
        ("ddpm.objective".to_string(), objective_json),
        ("ddpm.step".to_string(), meta.step.to_string()),
    ]);
    let bytes = to_safetensors_bytes(&all, metadata)?;
    let tensors_path = dir.join(format!("{}.safetensors", stem(meta.step)));
    write_atomic(&tensors_path, &bytes)
        .map_err(|e| TrainError::io(&tensors_path, "writing checkpoint", e))?;
    let mut meta = meta.clone();
    meta.tensors_file = format!("{}.safetensors", stem(meta.step));
    meta.tensors_bytes = bytes.len() as u64;
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| TrainError::Other(e.to_string()))?;
    let json_path = json_path(run_dir, meta.step);
    write_atomic(&json_path, &json)
        .map_err(|e| TrainError::io(&json_path, "writing checkpoint", e))?;
    Ok(json_path)
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
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = name
                .strip_prefix("ckpt-")
                .and_then(|s| s.strip_suffix(".safetensors"))
                .and_then(|s| s.parse::<usize>().ok())
                .is_some_and(|step| !kept.contains(&step));
            if orphan {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
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

/// Loads the checkpoint whose JSON is at `json_path`, checking the tensors file against it.
pub fn load(json_path: &Path, device: &Device) -> Result<Checkpoint> {
    let text =
        std::fs::read(json_path).map_err(|e| TrainError::io(json_path, "reading checkpoint", e))?;
    let meta = parse_meta(&text, json_path)?;
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let tensors_path = dir.join(&meta.tensors_file);
    let size = std::fs::metadata(&tensors_path)
        .map_err(|e| TrainError::io(&tensors_path, "reading checkpoint", e))?
        .len();
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
    let file = read_safetensors(&tensors_path, device)?;
    Ok(Checkpoint {
        meta,
        path: json_path.to_path_buf(),
        tensors: file.tensors,
    })
}

/// Loads the newest complete checkpoint of a run.
pub fn load_latest(run_dir: &Path, device: &Device) -> Result<Checkpoint> {
    let all = list(run_dir)?;
    let Some((_, json)) = all.last() else {
        return Err(TrainError::Checkpoint {
            path: Some(checkpoint_dir(run_dir)),
            reason:
                "holds no complete checkpoint (is this a run directory written by `ddpm train`?)"
                    .into(),
        });
    };
    load(json, device)
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
        let all = list(path)?;
        Some(
            all.last()
                .map(|(_, p)| p.clone())
                .ok_or_else(|| TrainError::Checkpoint {
                    path: Some(path.to_path_buf()),
                    reason: "holds no checkpoint (is it a run directory of `ddpm train`?)".into(),
                })?,
        )
    } else if path.extension().is_some_and(|e| e == "json") {
        Some(path.to_path_buf())
    } else {
        let sibling = path.with_extension("json");
        sibling.exists().then_some(sibling)
    };
    if let Some(json) = json {
        let ckpt = load(&json, device)?;
        let model = DiffusionModel::from_tensors(
            &ckpt.meta.config.model,
            &ckpt.section(prefix),
            device,
            DType::F32,
            &ckpt.path,
        )?;
        tracing::info!(checkpoint = %ckpt.path.display(), step = ckpt.meta.step, weights = weights.name(), "model loaded");
        return Ok(LoadedModel {
            model,
            schedule: ckpt.meta.config.schedule,
            objective: ckpt.meta.config.objective,
            step: Some(ckpt.meta.step),
            config: Some(ckpt.meta.config),
            source: ckpt.path,
            weights,
        });
    }
    // A plain weights file written by DiffusionModel::save (eps objective, default schedule
    // unless its metadata says otherwise).
    let file = read_safetensors(path, device)?;
    let config = ddpm_unet::model::config_from_metadata(&file.metadata, path)?;
    let tensors: HashMap<String, Tensor> = if file.tensors.keys().any(|k| k.starts_with(prefix)) {
        file.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone())))
            .collect()
    } else {
        file.tensors
    };
    let model = DiffusionModel::from_tensors(&config, &tensors, device, DType::F32, path)?;
    let bad = |what: &str, e: serde_json::Error| TrainError::Checkpoint {
        path: Some(path.to_path_buf()),
        reason: format!("the {what} in the file's metadata is invalid: {e}"),
    };
    let schedule = match file.metadata.get("ddpm.schedule_config") {
        Some(s) => serde_json::from_str(s).map_err(|e| bad("schedule config", e))?,
        None => ScheduleConfig::default(),
    };
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
        source: path.to_path_buf(),
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

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

    /// Word positions past 2^64 survive the checkpoint's JSON.
    #[test]
    fn word_positions_round_trip_through_json() {
        let pos: Vec<u128> = vec![0, 17, u64::MAX as u128 + 5, (1u128 << 68) - 1];
        let json = serde_json::to_string(&pos).expect("serialize");
        let back: Vec<u128> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, pos);
    }
}
