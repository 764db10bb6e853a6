//! `ddpm launch --nproc N -- train ...`: data-parallel training as N processes of this binary on
//! one machine, started the way torchrun starts them (rank r gets `RANK=r`, `WORLD_SIZE=N`,
//! `LOCAL_RANK=r`, so it trains on `cuda:r`; see docs/distributed.md). The launcher waits for
//! every rank; when one fails it stops the others (they could only wait on the failed rank's
//! collectives) and names the failed rank; SIGINT/SIGTERM are passed on to the ranks as SIGTERM,
//! so they finish the step and rank 0 writes a checkpoint (a second signal, a second or more
//! later, is passed on too: the ranks then exit at once). On Linux a rank also gets SIGTERM if
//! the launcher itself dies.

use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

/// Arguments of `ddpm launch`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start, one per GPU: ranks 0..N-1 on cuda:0..cuda:N-1.
    #[arg(long, alias = "gpus", value_name = "N")]
    pub nproc: usize,
    /// The command every rank runs, after `--`: `train` and its arguments (the same `--out` for
    /// all ranks).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// Refuses, for more than one rank, a training command whose `--device` is not a bare `cuda`:
/// the launcher gives rank r `cuda:r` only for `cuda`, and keeps any other device, so
/// `--device cuda:1` would put every rank on one GPU and `cpu` (the default) on none.
fn check_device(nproc: usize, command: &[String]) -> anyhow::Result<()> {
    if nproc < 2 {
        return Ok(());
    }
    let mut device = None;
    let mut args = command.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if arg == "--device" {
            device = args.next().map(String::as_str);
        } else if let Some(value) = arg.strip_prefix("--device=") {
            device = Some(value);
        }
    }
    match device.map(str::trim) {
        Some("cuda") => Ok(()),
        other => bail!(
            "--nproc {nproc}: each rank trains on its own CUDA device, rank r on cuda:r, so the \
             training command needs `--device cuda` ({})",
            match other {
                Some(d) => format!("it has `--device {d}`"),
                None => "it has no --device, which means the CPU".to_string(),
            }
        ),
    }
}

/// The one rank of `--nproc 1` exited with `code` after printing its own error: `ddpm` exits
/// with the same code and prints nothing more.
#[derive(Debug)]
pub struct SoleRankFailed {
    /// The rank's exit code.
    pub code: i32,
}

impl std::fmt::Display for SoleRankFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the only rank failed (exit code {})", self.code)
    }
}

impl std::error::Error for SoleRankFailed {}

/// The environment variables that make a `ddpm train` process one rank.
const RANK_VARS: [&str; 3] = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];

/// Runs `ddpm launch`.
pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    if a.nproc == 0 {
        bail!("--nproc must be at least 1 (one process per GPU)");
    }
    if a.command.first().map(String::as_str) != Some("train") {
        bail!(
            "`ddpm launch` runs `ddpm train` as several ranks: give the training command after \
             `--`, e.g. `ddpm launch --nproc 2 -- train --config my.toml --out runs/dp --device \
             cuda`"
        );
    }
    if let Some(var) = RANK_VARS.iter().find(|v| std::env::var_os(v).is_some()) {
        bail!(
            "{var} is already set: `ddpm launch` sets the ranks' variables itself (unset them, \
             or run `ddpm train` directly under your own launcher)"
        );
    }
    ddpm_train::World::check_launch(a.nproc).with_context(|| format!("--nproc {}", a.nproc))?;
    check_device(a.nproc, &a.command)?;
    let exe = std::env::current_exe().context("finding this ddpm binary to start the ranks")?;
    // Signals received; each new one (a second, to force the ranks out) is passed on.
    let signals = Arc::new(AtomicUsize::new(0));
    {
        let signals = signals.clone();
        ctrlc::set_handler(move || {
            signals.fetch_add(1, Ordering::SeqCst);
        })
        .context("installing the SIGINT/SIGTERM handler")?;
    }
    let n = a.nproc;
    let mut ranks: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&a.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string());
        die_with_parent(&mut cmd);
        let child = cmd.spawn();
        match child {
            Ok(c) => ranks.push(Some(c)),
            Err(e) => {
                stop_all(&mut ranks);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    tracing::info!(nproc = n, "ranks started");
    let mut failed: Option<(usize, ExitStatus)> = None;
    let (mut forwarded, mut last_forward) = (0, Instant::now());
    loop {
        let mut running = 0;
        for (rank, slot) in ranks.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = match child.try_wait() {
                Ok(s) => s,
                Err(e) => {
                    stop_all(&mut ranks);
                    return Err(e).context(format!("waiting for rank {rank}"));
                }
            };
            match status {
                Some(status) => {
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                    }
                    *slot = None;
                }
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        let received = signals.load(Ordering::SeqCst);
        if failed.is_some() {
            stop_all(&mut ranks);
        } else if received > forwarded
            && (forwarded == 0 || last_forward.elapsed() >= Duration::from_secs(1))
        {
            // The ranks treat a second signal at least a second after the first as "exit now";
            // one that arrives twice at once (a terminal's SIGINT reaches the ranks directly
            // too) is passed on once.
            forwarded = received;
            last_forward = Instant::now();
            eprintln!("launch: passing the interrupt on to the {running} running rank(s)");
            for child in ranks.iter().flatten() {
                terminate(child);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        // The only rank said why on its own `error:` line; one more line would repeat it.
        Some((_, status)) if n == 1 && status.code().is_some() => Err(SoleRankFailed {
            code: status.code().unwrap_or(1),
        }
        .into()),
        Some((rank, status)) => bail!(
            "rank {rank} of {n} failed ({status}), so the other ranks were stopped; its error is \
             above. Checkpoints written before the failure are kept: if there is one, the same \
             `ddpm launch` with `train --resume DIR` continues from it"
        ),
        None => Ok(()),
    }
}

/// Kills every rank still running and reaps it (a rank whose peer failed would wait on it
/// forever in a collective). Checkpoints are written atomically, so none is lost.
fn stop_all(ranks: &mut [Option<Child>]) {
    for slot in ranks.iter_mut() {
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// On Linux, a rank gets SIGTERM when the launcher dies (killed, out of memory), instead of
/// training on without it, holding its GPU.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Asks a rank to stop as `ddpm train` does on SIGTERM: finish the step, write a checkpoint.
fn terminate(child: &Child) {
    #[cfg(unix)]
    {
        // SAFETY: sending a signal to a child process we started and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_ranks_need_a_bare_cuda_device() {
        let cmd = |args: &[&str]| -> Vec<String> {
            ["train", "--out", "r"]
                .iter()
                .chain(args)
                .map(|s| s.to_string())
                .collect()
        };
        for ok in [
            &["--device", "cuda"][..],
            &["--device=cuda"],
            &["--device", " cuda "],
        ] {
            assert!(check_device(2, &cmd(ok)).is_ok(), "{ok:?}");
        }
        // One rank is a plain run: any device.
        assert!(check_device(1, &cmd(&["--device", "cpu"])).is_ok());
        for (bad, says) in [
            (&[][..], "it has no --device"),
            (&["--device", "cpu"], "it has `--device cpu`"),
            (&["--device=cuda:1"], "it has `--device cuda:1`"),
            (
                &["--device", "cuda", "--device", "cuda:0"],
                "`--device cuda:0`",
            ),
        ] {
            let err = check_device(4, &cmd(bad)).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("--nproc 4") && err.contains("--device cuda"),
                "{bad:?}: {err}"
            );
        }
    }
}
