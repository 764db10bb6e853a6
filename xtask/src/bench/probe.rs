//! What the report and the workers read of the machine: the CPU, its load, the versions of
//! candle, rustc and ddpm-rs, the clock, and this process's peak memory.

use std::fmt::Write as _;
use std::process::Command;

use super::workspace_root;

/// Peak resident set size of this process (VmHWM), in KiB.
pub(super) fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The 1-minute load average, from /proc/loadavg.
pub(super) fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
}

/// The CPU's model name, clock and vector extensions, from /proc/cpuinfo.
pub(super) fn cpu_model() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return "unknown".into();
    };
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut s = field("model name").unwrap_or_else(|| "unknown".into());
    if let Some(mhz) = field("cpu MHz").and_then(|v| v.parse::<f64>().ok()) {
        let _ = write!(s, ", {mhz:.0} MHz");
    }
    let flags = field("flags").unwrap_or_default();
    let known = [
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("avx512f", "AVX-512F"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("avx512_fp16", "AVX-512 FP16"),
        ("amx_bf16", "AMX-BF16"),
    ];
    let have: Vec<&str> = known
        .iter()
        .filter(|(flag, _)| flags.split_whitespace().any(|f| f == *flag))
        .map(|(_, name)| *name)
        .collect();
    if !have.is_empty() {
        let _ = write!(s, "; {}", have.join(", "));
    }
    s
}

pub(super) fn cpu_count() -> Option<usize> {
    let c = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    Some(c.lines().filter(|l| l.starts_with("processor")).count())
}

pub(super) fn candle_version() -> String {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"candle-core\"" {
            if let Some(v) = lines
                .next()
                .and_then(|v| v.trim().strip_prefix("version = "))
            {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "unknown".into()
}

pub(super) fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc unknown".into())
}

pub(super) fn ddpm_version() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut v = format!("{} (release build)", env!("CARGO_PKG_VERSION"));
    if let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) {
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        let _ = write!(
            v,
            ", commit {commit}{}",
            if dirty {
                " with uncommitted changes"
            } else {
                ""
            }
        );
    }
    v
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
pub(super) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_time(secs)
}

/// `secs` after the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
fn utc_time(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_of_known_instants() {
        assert_eq!(utc_time(0), "1970-01-01 00:00 UTC");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc_time(1_709_210_096), "2024-02-29 12:34 UTC");
    }
}
