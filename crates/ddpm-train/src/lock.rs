//! The run-directory lock: one live `ddpm train` per run directory.
//!
//! A run holds `RUN_DIR/.lock`, a small text file naming its process (`pid` and, on Linux, the
//! process's start time, so a recycled pid is not mistaken for the owner). The file is created
//! atomically with its content (written to a temporary file, then hard-linked into place), so
//! another process never reads a half-written lock. A second run into the same directory fails
//! with [`LockError::Busy`] naming the owner's pid; a lock left behind by a process that no longer
//! exists (a `kill -9`, a power cut) is taken over with a warning, and the temporary files that
//! process left half-written (`.ddpm-PID-N.tmp`) are removed. Taking over is done under an OS file
//! lock on `RUN_DIR/.lock.takeover` (made only then), and the lock file is read again under it,
//! so two processes that both found the same stale lock cannot both take it: the second finds
//! the first one's live lock. The lock is released when the [`RunLock`] is dropped.

use std::path::{Path, PathBuf};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// The largest lock file read (one is a few bytes).
const MAX_LOCK_BYTES: u64 = 4096;

/// The file whose OS lock serializes the taking over of a stale lock.
const TAKEOVER_FILE: &str = ".lock.takeover";

/// Why a run directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error(
        "run directory {} is in use by another `ddpm train` (pid {pid}, lock file {}): wait for \
         it to finish or stop it, or choose another output directory",
        run_dir.display(),
        lock_file.display()
    )]
    Busy {
        /// The run directory.
        run_dir: PathBuf,
        /// The lock file.
        lock_file: PathBuf,
        /// The pid of the process holding it.
        pid: u32,
    },
    /// The lock file could not be created, read or replaced.
    #[error("locking run directory {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Who holds a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: u32,
    /// The process's start time in clock ticks since boot (Linux), to tell a recycled pid apart.
    start: Option<u64>,
}

impl Owner {
    fn current() -> Self {
        let pid = std::process::id();
        Owner {
            pid,
            start: process_start(pid),
        }
    }

    fn to_text(self) -> String {
        match self.start {
            Some(s) => format!("pid {}\nstart {s}\n", self.pid),
            None => format!("pid {}\n", self.pid),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut pid = None;
        let mut start = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("start", v)) => start = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(Owner { pid: pid?, start })
    }

    /// Whether the process that wrote the lock is still running.
    fn is_alive(self) -> bool {
        match process_state(self.pid) {
            ProcessState::Gone => false,
            ProcessState::Running { start } => match (self.start, start) {
                // The pid was recycled by a process started at another time.
                (Some(a), Some(b)) => a == b,
                _ => true,
            },
            // Without /proc (not Linux) a lock is only taken over when its pid is our own.
            ProcessState::Unknown => self.pid != std::process::id(),
        }
    }
}

enum ProcessState {
    Gone,
    Running { start: Option<u64> },
    Unknown,
}

/// The state of `pid` from `/proc/PID/stat`: a zombie (killed, not yet reaped) counts as gone.
fn process_state(pid: u32) -> ProcessState {
    if !Path::new("/proc/self/stat").exists() {
        return ProcessState::Unknown;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The command name (field 2) is in parentheses and may hold spaces: parse after it.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
                return ProcessState::Gone;
            }
            // Field 22 of stat is the start time; `fields` starts at field 3.
            ProcessState::Running {
                start: fields.get(19).and_then(|s| s.parse().ok()),
            }
        }
        Err(_) => ProcessState::Gone,
    }
}

fn process_start(pid: u32) -> Option<u64> {
    match process_state(pid) {
        ProcessState::Running { start } => start,
        _ => None,
    }
}

/// The lock on a run directory, held while this value lives.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    owner: Owner,
}

impl RunLock {
    /// Locks `run_dir` (which must exist) for this process. A process that already holds the
    /// lock gets it again (the first of its locks to be dropped releases it).
    ///
    /// Fails with [`LockError::Busy`] when another live process holds it; takes over (with a
    /// warning) a lock whose process is gone, removing that process's leftover temporary files.
    pub fn acquire(run_dir: &Path) -> Result<Self, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let owner = Owner::current();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        // Not a temporary name of `ddpm_fs`: a dead process with our pid had its leftovers removed below.
        let tmp = run_dir.join(format!(".lock.pending-{}", owner.pid));
        std::fs::write(&tmp, owner.to_text()).map_err(io(&tmp))?;
        // Held from the first stale lock found on: only one process takes over at a time.
        let mut takeover: Option<std::fs::File> = None;
        // A few rounds: a stale lock removed by us may be retaken by a racing process.
        let result = (|| {
            for _ in 0..4 {
                match std::fs::hard_link(&tmp, &path) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(&path)(e)),
                }
                // A lock is a few bytes; a FIFO or device there would block or never end.
                let text = match ddpm_fs::read_regular_file(&path, MAX_LOCK_BYTES) {
                    Ok(t) => String::from_utf8_lossy(&t).into_owned(),
                    // Released between our link and our read: try again.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(&path)(e)),
                };
                match Owner::parse(&text) {
                    Some(holder) if holder == owner => return Ok(()),
                    Some(holder) if holder.is_alive() => {
                        return Err(LockError::Busy {
                            run_dir: run_dir.to_path_buf(),
                            lock_file: path.clone(),
                            pid: holder.pid,
                        })
                    }
                    _ if takeover.is_none() => {
                        // Judge it again under the takeover lock: another process may have taken
                        // it over since it was read.
                        let guard = run_dir.join(TAKEOVER_FILE);
                        ddpm_fs::check_writable_file(&guard).map_err(io(&guard))?;
                        let file = std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(&guard)
                            .map_err(io(&guard))?;
                        file.lock().map_err(io(&guard))?;
                        takeover = Some(file);
                        continue;
                    }
                    stale => {
                        let who = stale.map_or("an unreadable lock".to_string(), |h| {
                            format!("pid {}, no longer running", h.pid)
                        });
                        tracing::warn!(
                            lock = %path.display(),
                            "taking over the stale lock of run directory {} ({who})",
                            run_dir.display()
                        );
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(io(&path)(e)),
                        }
                        if let Some(dead) = stale {
                            remove_leftovers(run_dir, dead.pid);
                        }
                    }
                }
            }
            Err(io(&path)(std::io::Error::other(
                "the lock changed hands repeatedly while it was being taken",
            )))
        })();
        // Releases the takeover lock (closing the file unlocks it).
        drop(takeover);
        let _ = std::fs::remove_file(&tmp);
        result.map(|()| RunLock { path, owner })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Only remove the file if it is still ours (a user may have deleted and retaken it).
        let ours = ddpm_fs::read_regular_file(&self.path, MAX_LOCK_BYTES)
            .ok()
            .and_then(|t| Owner::parse(&String::from_utf8_lossy(&t)))
            .is_some_and(|o| o == self.owner);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the half-written temporary files ([`ddpm_fs::temporary_name`]) a dead process left in the run
/// directory and its `checkpoints/` and `samples/` folders.
fn remove_leftovers(run_dir: &Path, pid: u32) {
    for dir in [
        run_dir.to_path_buf(),
        run_dir.join("checkpoints"),
        run_dir.join("samples"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ddpm_fs::is_temporary_of(&name, pid) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::debug!(file = %entry.path().display(), "removed leftover"),
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), "cannot remove leftover: {e}")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_names_the_owner() {
        let dir = tempfile::tempdir().expect("tmp");
        let lock = RunLock::acquire(dir.path()).expect("first lock");
        assert!(lock.path().exists());
        // The same process asking again gets it (it is the owner).
        drop(RunLock::acquire(dir.path()).expect("owner relocks"));
        // A live other process (pid 1 always runs) holds it: busy, naming the pid.
        let init = Owner {
            pid: 1,
            start: process_start(1),
        };
        drop(lock);
        std::fs::write(dir.path().join(LOCK_FILE), init.to_text()).expect("write");
        let err = RunLock::acquire(dir.path()).expect_err("busy");
        assert!(matches!(err, LockError::Busy { pid: 1, .. }), "{err}");
        assert!(err.to_string().contains("pid 1"), "{err}");
    }

    #[test]
    fn releasing_removes_the_file_and_stale_locks_are_taken_over() {
        let dir = tempfile::tempdir().expect("tmp");
        drop(RunLock::acquire(dir.path()).expect("lock"));
        assert!(!dir.path().join(LOCK_FILE).exists());
        // A pid far above any pid_max, and a recycled pid (ours, started at another time).
        let dead = Owner {
            pid: u32::MAX - 7,
            start: None,
        };
        std::fs::write(dir.path().join(LOCK_FILE), dead.to_text()).expect("write");
        let ckpts = dir.path().join("checkpoints");
        std::fs::create_dir(&ckpts).expect("mkdir");
        let leftover = ckpts.join(format!(".ckpt-00000001.safetensors.tmp-{}", dead.pid));
        let other = ckpts.join(".ckpt-00000001.safetensors.tmp-12");
        std::fs::write(&leftover, b"half").expect("write");
        std::fs::write(&other, b"half").expect("write");
        // A half-written sample grid, under today's temporary names.
        std::fs::create_dir(dir.path().join("samples")).expect("mkdir");
        let grid = dir
            .path()
            .join("samples")
            .join(ddpm_fs::temporary_name(dead.pid));
        std::fs::write(&grid, b"half").expect("write");
        let lock = RunLock::acquire(dir.path()).expect("stale lock taken over");
        assert!(
            !leftover.exists() && !grid.exists(),
            "the dead process's temporary files are removed"
        );
        assert!(other.exists(), "other processes' files are left alone");
        drop(lock);
        if let Some(start) = process_start(std::process::id()) {
            let recycled = Owner {
                pid: std::process::id(),
                start: Some(start + 1),
            };
            std::fs::write(dir.path().join(LOCK_FILE), recycled.to_text()).expect("write");
            drop(RunLock::acquire(dir.path()).expect("recycled pid is stale"));
        }
        // Garbage in the lock file is stale too.
        std::fs::write(dir.path().join(LOCK_FILE), b"\xff\xfe").expect("write");
        drop(RunLock::acquire(dir.path()).expect("garbage lock taken over"));
    }

    /// Two processes that find the same stale lock: the one that takes it over second sees the
    /// first one's live lock under the takeover lock and stops, instead of removing it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_stale_lock_taken_over_by_another_process_meanwhile_is_not_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let lock_path = dir.path().join(LOCK_FILE);
        // A stale lock: a pid that has exited.
        let mut gone = std::process::Command::new("true").spawn().expect("spawn");
        let dead = gone.id();
        gone.wait().expect("wait");
        std::fs::write(&lock_path, format!("pid {dead}\nstart 1\n")).expect("stale");
        // Hold the takeover lock, as a process in the middle of taking over would.
        let guard = std::fs::File::create(dir.path().join(TAKEOVER_FILE)).expect("guard");
        guard.lock().expect("lock guard");
        let run_dir = dir.path().to_path_buf();
        let taker = std::thread::spawn(move || RunLock::acquire(&run_dir));
        // Meanwhile that other process installs its live lock (a child that is running).
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let holder = Owner {
            pid: live.id(),
            start: process_start(live.id()),
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::write(&lock_path, holder.to_text()).expect("live lock");
        drop(guard);
        let result = taker.join().expect("join");
        let _ = live.kill();
        let _ = live.wait();
        match result {
            Err(LockError::Busy { pid, .. }) => assert_eq!(pid, holder.pid),
            other => panic!("expected Busy, got {other:?}"),
        }
        let text = std::fs::read_to_string(&lock_path).expect("the live lock is still there");
        assert_eq!(Owner::parse(&text), Some(holder));
    }
}
