//! The metrics file of a run: one JSON object per line.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimizer steps completed.
    pub step: usize,
    /// Mean training loss over the steps since the previous line.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Global gradient norm (before clipping) of the last step.
    pub grad_norm: f64,
    /// Training throughput since the previous line.
    pub images_per_sec: f64,
}

/// Appends a line to the metrics file.
pub fn append(path: &Path, line: &MetricsLine) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, "opening metrics file", e))?;
    let mut text = serde_json::to_string(line).map_err(|e| TrainError::Other(e.to_string()))?;
    text.push('\n');
    f.write_all(text.as_bytes())
        .map_err(|e| TrainError::io(path, "writing metrics file", e))
}

/// Reads the metrics file (missing: empty); unparsable lines (a torn last line after a crash)
/// are skipped.
pub fn read(path: &Path) -> Result<Vec<MetricsLine>> {
    // Not capped (a long run's file grows), but never a FIFO or device.
    let text = ddpm_fs::check_regular_file(path).and_then(|_| std::fs::read_to_string(path));
    match text {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(TrainError::io(path, "reading metrics file", e)),
    }
}

/// Keeps only the lines up to and including `step` (used on resume, so the file matches the
/// checkpoint the run continues from).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let kept: Vec<MetricsLine> = read(path)?.into_iter().filter(|l| l.step <= step).collect();
    let mut text = String::new();
    for l in &kept {
        text.push_str(&serde_json::to_string(l).map_err(|e| TrainError::Other(e.to_string()))?);
        text.push('\n');
    }
    ddpm_fs::write_atomic(path, text.as_bytes())
        .map_err(|e| TrainError::io(path, "rewriting metrics file", e))
}
