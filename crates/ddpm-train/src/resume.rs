//! Resuming a run: which checkpoint it continues from ([`ResumeFrom`]), which settings it may
//! change ([`SAFE_KEYS`], asked for as [`SafeChanges`] or by editing `RUN_DIR/config.toml`),
//! and the run's history (`RUN_DIR/history.jsonl`, one line per start and resume saying what
//! changed and which checkpoints were set aside).
//!
//! A resumed run continues the checkpoint's configuration. An edit of `config.toml` is never
//! ignored: a safe key's new value is used (and logged), any other key is refused by name.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use ddpm_data::DatasetSpec;
use ddpm_fs::read_regular_text;
use serde::{Deserialize, Serialize};

pub use crate::checkpoint::{PassedOver, ResumeFrom};
use crate::config::TrainConfig;
use crate::{Result, TrainError};

/// The keys of [`TrainConfig`] (dotted TOML paths; a table stands for all keys under it) that a
/// resumed run may change: none changes what the checkpointed weights, moments, RNG or data
/// position mean (`kernels` changes only which implementation computes the same ops: results
/// agree up to float rounding, so a resume with another policy is no longer bit-exact).
pub const SAFE_KEYS: [&str; 17] = [
    "steps",
    "optimizer.lr",
    "optimizer.lr_schedule",
    "optimizer.min_lr",
    "warmup_steps",
    "grad_clip",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_num",
    "sample_seed",
    "sampler",
    "log_every",
    "workers",
    "data.root",
    "data.threads",
    "kernels",
];

/// The run's history file, in the run directory.
pub const HISTORY_FILE: &str = "history.jsonl";

/// How to resume a run.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Which checkpoint to continue from.
    pub from: ResumeFrom,
    /// Settings to change (applied after `config.toml`'s edits).
    pub changes: SafeChanges,
}

/// New values for some of the [`SAFE_KEYS`] (`None`: keep the run's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SafeChanges {
    /// Total optimizer steps.
    pub steps: Option<usize>,
    /// Peak learning rate (`optimizer.lr`).
    pub lr: Option<f64>,
    /// The learning-rate schedule after the warm-up (`optimizer.lr_schedule`).
    pub lr_schedule: Option<crate::optim::LrSchedule>,
    /// The floor a decaying schedule reaches at the final step (`optimizer.min_lr`).
    pub min_lr: Option<f64>,
    /// Steps of linear warm-up (counted from step 0 of the run).
    pub warmup_steps: Option<usize>,
    /// Maximum global gradient norm (0 disables clipping).
    pub grad_clip: Option<f64>,
    /// Checkpoint interval.
    pub checkpoint_every: Option<usize>,
    /// Sample-grid interval (0: never).
    pub sample_every: Option<usize>,
    /// Metrics interval.
    pub log_every: Option<usize>,
    /// Where the data sets are (`data.root`).
    pub data_root: Option<PathBuf>,
    /// The data set (`dataset`): only a run on an image folder may change it, to another image
    /// folder (the same images moved elsewhere); naming the run's own data set changes nothing.
    pub dataset: Option<DatasetSpec>,
}

/// One setting a resume changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The dotted TOML key.
    pub key: String,
    /// The value in the checkpoint (TOML), or `(none)`.
    pub from: String,
    /// The new value (TOML), or `(none)`.
    pub to: String,
    /// `config.toml` (an edit of the file) or `option` (asked for by the caller).
    pub by: String,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// `start` or `resume`.
    pub event: String,
    /// The step the run starts or continues from.
    pub step: usize,
    /// The run id ([`crate::checkpoint::run_id_for`]).
    pub run_id: String,
    /// The checkpoint continued from (file name), for a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Settings changed by this resume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Newer checkpoints moved to `checkpoints/set-aside/`, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set_aside: Vec<PassedOver>,
}

/// Appends `event` to the run's `history.jsonl`, on a line of its own (after a torn last line,
/// which a crash or a full disk can leave, it starts a new one).
pub fn append_history(run_dir: &Path, event: &HistoryEvent) -> Result<()> {
    let path = run_dir.join(HISTORY_FILE);
    let mut line = serde_json::to_string(event).map_err(|e| TrainError::Other(e.to_string()))?;
    line.push('\n');
    ddpm_fs::check_writable_file(&path)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&path)
        })
        .and_then(|mut f| {
            if !ends_in_newline(&mut f)? {
                line.insert(0, '\n');
            }
            f.write_all(line.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| TrainError::io(&path, "appending to", e))
}

/// Whether `file` is empty or its last byte is a newline.
fn ends_in_newline(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// The events of the run's `history.jsonl` (empty when there is none).
pub fn read_history(run_dir: &Path) -> Result<Vec<HistoryEvent>> {
    let path = run_dir.join(HISTORY_FILE);
    let text = match read_regular_text(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(&path, "reading", e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::Other(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// Reads a run's `config.toml` (`None` when it is missing), with an error of one line.
pub fn read_config_file(path: &Path) -> Result<Option<TrainConfig>> {
    let text = match read_regular_text(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(path, "reading", e)),
    };
    toml::from_str(&text).map(Some).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        TrainError::Config(format!(
            "{}{}: {}; fix the file, or delete it to continue with the checkpoint's \
             configuration",
            path.display(),
            line.map(|l| format!(" line {l}")).unwrap_or_default(),
            e.message().trim()
        ))
    })
}

/// The config as dotted TOML keys and their values.
fn flatten(config: &TrainConfig) -> Result<BTreeMap<String, toml::Value>> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let value = toml::Value::try_from(config)
        .map_err(|e| TrainError::Config(format!("cannot write TOML: {e}")))?;
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    Ok(out)
}

/// The entry of [`SAFE_KEYS`] that covers `key`, if any.
fn safe_entry(key: &str) -> Option<&'static str> {
    SAFE_KEYS.into_iter().find(|p| {
        key == *p
            || key
                .strip_prefix(*p)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Copies the setting `entry` (one of [`SAFE_KEYS`]) from `from` into `to`.
fn copy_setting(to: &mut TrainConfig, from: &TrainConfig, entry: &str) {
    match entry {
        "steps" => to.steps = from.steps,
        "optimizer.lr" => to.optimizer.lr = from.optimizer.lr,
        "optimizer.lr_schedule" => to.optimizer.lr_schedule = from.optimizer.lr_schedule,
        "optimizer.min_lr" => to.optimizer.min_lr = from.optimizer.min_lr,
        "warmup_steps" => to.warmup_steps = from.warmup_steps,
        "grad_clip" => to.grad_clip = from.grad_clip,
        "checkpoint_every" => to.checkpoint_every = from.checkpoint_every,
        "keep_checkpoints" => to.keep_checkpoints = from.keep_checkpoints,
        "sample_every" => to.sample_every = from.sample_every,
        "sample_num" => to.sample_num = from.sample_num,
        "sample_seed" => to.sample_seed = from.sample_seed,
        "sampler" => to.sampler = from.sampler,
        "log_every" => to.log_every = from.log_every,
        "workers" => to.workers = from.workers,
        "data.root" => to.data.root = from.data.root.clone(),
        "data.threads" => to.data.threads = from.data.threads,
        "kernels" => to.kernels = from.kernels,
        _ => {}
    }
}

fn shown(v: Option<&toml::Value>) -> String {
    v.map_or_else(|| "(none)".to_string(), |v| v.to_string())
}

/// The configuration a run resumed from a checkpoint of `step` with configuration
/// `checkpoint` continues with, and what changed: first the keys `config.toml` (`file`, with
/// its path) changes, then `changes`. A changed key outside [`SAFE_KEYS`] in the file is an
/// error naming it.
pub fn resumed_config(
    checkpoint: &TrainConfig,
    step: usize,
    file: Option<(&Path, &TrainConfig)>,
    changes: &SafeChanges,
) -> Result<(TrainConfig, Vec<Change>)> {
    let mut config = checkpoint.clone();
    let mut out = Vec::new();
    if let Some((path, file)) = file {
        let (ours, theirs) = (flatten(checkpoint)?, flatten(file)?);
        let keys: BTreeSet<&String> = ours
            .keys()
            .chain(theirs.keys())
            .filter(|k| ours.get(*k) != theirs.get(*k))
            .collect();
        let refused: Vec<String> = keys
            .iter()
            .filter(|k| safe_entry(k).is_none())
            .map(|k| {
                format!(
                    "`{k}` ({} -> {})",
                    shown(ours.get(*k)),
                    shown(theirs.get(*k))
                )
            })
            .collect();
        if !refused.is_empty() {
            return Err(TrainError::Config(format!(
                "{} changes {} from the run's checkpoint of step {step}, which a resumed run \
                 cannot change (the checkpointed state depends on it); a resume may change only \
                 {}: undo the edit, or train a new run with this config",
                path.display(),
                refused.join(", "),
                SAFE_KEYS.join(", ")
            )));
        }
        let mut entries = BTreeSet::new();
        for key in keys {
            entries.extend(safe_entry(key));
            out.push(Change {
                key: key.clone(),
                from: shown(ours.get(key)),
                to: shown(theirs.get(key)),
                by: "config.toml".into(),
            });
        }
        for entry in entries {
            copy_setting(&mut config, file, entry);
        }
    }
    let mut asked = config.clone();
    let c = changes;
    if let Some(v) = c.steps {
        asked.steps = v;
    }
    if asked.steps < step {
        return Err(TrainError::Config(format!(
            "{} {} is fewer than the {step} steps the run has already trained: give more than \
             {step} to train further (a resume never goes back; `--from-step` picks an older \
             checkpoint)",
            if c.steps.is_some() {
                "--steps"
            } else {
                "`steps` in config.toml"
            },
            asked.steps
        )));
    }
    if let Some(v) = c.lr {
        asked.optimizer.lr = v;
    }
    if let Some(v) = c.lr_schedule {
        asked.optimizer.lr_schedule = v;
    }
    if let Some(v) = c.min_lr {
        asked.optimizer.min_lr = v;
    }
    if let Some(v) = c.warmup_steps {
        asked.warmup_steps = v;
    }
    if let Some(v) = c.grad_clip {
        asked.grad_clip = v;
    }
    if let Some(v) = c.checkpoint_every {
        asked.checkpoint_every = v;
    }
    if let Some(v) = c.sample_every {
        asked.sample_every = v;
    }
    if let Some(v) = c.log_every {
        asked.log_every = v;
    }
    if let Some(v) = &c.data_root {
        asked.data.root = v.clone();
    }
    if let Some(d) = &c.dataset {
        match (&asked.dataset, d) {
            (DatasetSpec::Folder(_), DatasetSpec::Folder(_)) => asked.dataset = d.clone(),
            (ours, theirs) if ours == theirs => {}
            (ours, theirs) => {
                return Err(TrainError::Config(format!(
                    "the run trains on {ours}, so a resume cannot switch it to {theirs}: a \
                     resume may only move an image folder (folder:PATH for a run on folder:PATH) \
                     or the data root (`data.root`); train a new run for another data set"
                )))
            }
        }
    }
    out.extend(changes_between(&config, &asked)?);
    Ok((asked, out))
}

/// The keys whose values differ from `before` in `after`, as changes asked for by the caller.
pub(crate) fn changes_between(before: &TrainConfig, after: &TrainConfig) -> Result<Vec<Change>> {
    let (before, after) = (flatten(before)?, flatten(after)?);
    Ok(after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(*value))
        .map(|(key, value)| Change {
            key: key.clone(),
            from: shown(before.get(key)),
            to: value.to_string(),
            by: "option".into(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event appended after a torn last line (a crash or a full disk mid-append) goes on a
    /// line of its own, so it stays readable.
    #[test]
    fn an_event_after_a_torn_line_starts_a_new_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::Other(e.to_string()))?;
        let event = |step| HistoryEvent {
            event: "resume".into(),
            step,
            run_id: "r".into(),
            checkpoint: None,
            changes: Vec::new(),
            set_aside: Vec::new(),
        };
        append_history(dir.path(), &event(1))?;
        let path = dir.path().join(HISTORY_FILE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, "opening", e))?;
        f.write_all(b"{\"event\":\"res")
            .map_err(|e| TrainError::io(&path, "writing", e))?;
        append_history(dir.path(), &event(2))?;
        let text =
            std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, "reading", e))?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let last: HistoryEvent =
            serde_json::from_str(lines[2]).map_err(|e| TrainError::Other(e.to_string()))?;
        assert_eq!(last, event(2));
        Ok(())
    }

    /// A kernel policy changed by the caller (a binary's kernel variables, through
    /// `ResumePlan::set_kernels`) is a change of the safe key `kernels`, reported per field.
    #[test]
    fn a_changed_kernel_policy_is_reported_as_an_option() -> Result<()> {
        let before = TrainConfig::default();
        let mut after = before.clone();
        after.kernels.backend = ddpm_unet::policy::Backend::Candle;
        let changes = changes_between(&before, &after)?;
        assert_eq!(
            changes,
            [Change {
                key: "kernels.backend".into(),
                from: "\"ours\"".into(),
                to: "\"candle\"".into(),
                by: "option".into(),
            }]
        );
        assert!(safe_entry("kernels.backend").is_some());
        assert!(changes_between(&before, &before)?.is_empty());
        Ok(())
    }

    /// Every safe key, changed in a config file, is taken over and reported; the result then
    /// equals the file.
    #[test]
    fn every_safe_key_of_the_file_is_honoured() -> Result<()> {
        let ckpt = TrainConfig::default();
        let mut file = ckpt.clone();
        file.steps += 1;
        file.optimizer.lr *= 0.5;
        file.optimizer.lr_schedule = crate::optim::LrSchedule::Cosine;
        file.optimizer.min_lr = 1e-5;
        file.warmup_steps += 1;
        file.grad_clip += 1.0;
        file.checkpoint_every += 1;
        file.keep_checkpoints += 1;
        file.sample_every += 1;
        file.sample_num += 1;
        file.sample_seed += 1;
        file.sampler = ddpm_schedule::SamplerConfig::Ddim {
            steps: Some(7),
            eta: 0.5,
            clip_x0: false,
        };
        file.log_every += 1;
        file.workers += 1;
        file.data.root = "elsewhere".into();
        file.data.threads = Some(3);
        file.kernels.winograd = false;
        let path = Path::new("run/config.toml");
        let (config, changes) =
            resumed_config(&ckpt, 5, Some((path, &file)), &SafeChanges::default())?;
        assert_eq!(config, file);
        let entries: BTreeSet<&str> = changes.iter().filter_map(|c| safe_entry(&c.key)).collect();
        assert_eq!(entries.len(), SAFE_KEYS.len(), "{changes:?}");
        assert!(changes.iter().all(|c| c.by == "config.toml"));
        Ok(())
    }

    /// A changed key outside the safe ones is refused by name; an unchanged file changes
    /// nothing; options apply after the file and are reported as options.
    #[test]
    fn unsafe_edits_are_refused_and_options_apply_last() -> Result<()> {
        let ckpt = TrainConfig::default();
        let path = Path::new("run/config.toml");
        let mut file = ckpt.clone();
        file.batch_size = 16;
        file.optimizer.lr = 0.5;
        let err = resumed_config(&ckpt, 5, Some((path, &file)), &SafeChanges::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let expected = format!("`batch_size` ({} -> 16)", ckpt.batch_size);
        assert!(err.contains(&expected), "{err}");
        assert!(err.contains("run/config.toml"), "{err}");
        assert!(!err.contains("optimizer.lr`"), "{err}");
        let (same, none) = resumed_config(&ckpt, 5, Some((path, &ckpt)), &SafeChanges::default())?;
        assert_eq!((same, none.len()), (ckpt.clone(), 0));
        file.batch_size = ckpt.batch_size;
        let asked = SafeChanges {
            lr: Some(0.01),
            grad_clip: Some(0.0),
            ..SafeChanges::default()
        };
        let (config, changes) = resumed_config(&ckpt, 5, Some((path, &file)), &asked)?;
        assert_eq!((config.optimizer.lr, config.grad_clip), (0.01, 0.0));
        let by: Vec<(&str, &str, &str)> = changes
            .iter()
            .map(|c| (c.key.as_str(), c.to.as_str(), c.by.as_str()))
            .collect();
        assert_eq!(
            by,
            [
                ("optimizer.lr", "0.5", "config.toml"),
                ("grad_clip", "0.0", "option"),
                ("optimizer.lr", "0.01", "option"),
            ]
        );
        Ok(())
    }

    /// A total below the checkpoint's step would train nothing and record a smaller total: it
    /// is refused, by the flag or by config.toml; the step itself (a finished run) is allowed.
    #[test]
    fn fewer_steps_than_trained_are_refused() -> Result<()> {
        let ckpt = TrainConfig {
            steps: 10,
            ..TrainConfig::default()
        };
        let by_flag = SafeChanges {
            steps: Some(3),
            ..SafeChanges::default()
        };
        let e = resumed_config(&ckpt, 5, None, &by_flag).expect_err("3 < 5");
        assert!(
            e.to_string()
                .contains("--steps 3 is fewer than the 5 steps"),
            "{e}"
        );
        let edited = TrainConfig {
            steps: 4,
            ..ckpt.clone()
        };
        let e = resumed_config(
            &ckpt,
            5,
            Some((Path::new("config.toml"), &edited)),
            &SafeChanges::default(),
        )
        .expect_err("4 < 5");
        assert!(e.to_string().contains("`steps` in config.toml 4"), "{e}");
        let same = SafeChanges {
            steps: Some(5),
            ..SafeChanges::default()
        };
        assert_eq!(resumed_config(&ckpt, 5, None, &same)?.0.steps, 5);
        Ok(())
    }

    /// A run on an image folder may be pointed at the folder's new path (recorded as a change);
    /// its own data set again changes nothing; another kind of data set is refused by name.
    #[test]
    fn an_image_folder_may_move_but_the_data_set_stays() -> Result<()> {
        let ckpt = TrainConfig {
            dataset: DatasetSpec::Folder("/old/imgs".into()),
            ..TrainConfig::default()
        };
        let moved = |d: DatasetSpec| SafeChanges {
            dataset: Some(d),
            ..SafeChanges::default()
        };
        let new = DatasetSpec::Folder("/new/imgs".into());
        let (config, changes) = resumed_config(&ckpt, 3, None, &moved(new.clone()))?;
        assert_eq!(config.dataset, new);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].key.as_str(), changes[0].by.as_str()),
            ("dataset", "option")
        );
        let (same, none) = resumed_config(&ckpt, 3, None, &moved(ckpt.dataset.clone()))?;
        assert_eq!((same, none.len()), (ckpt.clone(), 0));
        let err = resumed_config(&ckpt, 3, None, &moved(DatasetSpec::Mnist))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("cannot switch it to mnist"), "{err}");
        Ok(())
    }
}
