//! `cargo xtask tidy`: checks the architecture invariants of ARCHITECTURE.md that a program can.
//!
//! - **Layering.** Each workspace crate depends only on the crates below it ([`LAYERS`]), read
//!   from `cargo metadata`.
//! - **No environment in libraries.** No `env::var`/`env::var_os`/`env::vars` in the sources of
//!   the library crates: a choice is a value passed in (`ddpm_unet::KernelPolicy`, fetch options);
//!   only the binaries (`ddpm-cli`, `xtask`, benches and examples) read variables.
//! - **Unsafe code in known places.** In shipped code (`src/`), `unsafe` only under the kernels
//!   ([`UNSAFE_ALLOWED`]) and in the few modules that call foreign code (the CUDA driver, NCCL,
//!   mimalloc, signals), each listed there with its reason. Tests may use it where they must.
//! - **No timings in comments.** Measured times, rates and speed-ups go stale; they belong in
//!   docs/benchmarks.md with the command that made them. A comment line with a number in `ms`,
//!   `µs`, `GFLOP/s`, `img/s` (and the like), decimal seconds or a percentage of a step fails,
//!   unless it carries `tidy: not a timing` (a setting, such as a timeout).
//!
//! `--root DIR` checks another checkout (the tests plant a violation of each rule in a copy).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

/// The workspace crates from the bottom layer up, each with the workspace crates it may use.
pub const LAYERS: [(&str, &[&str]); 8] = [
    ("ddpm-fs", &[]),
    ("ddpm-schedule", &[]),
    ("ddpm-kernels", &[]),
    ("ddpm-unet", &["ddpm-fs", "ddpm-kernels"]),
    ("ddpm-data", &["ddpm-fs"]),
    (
        "ddpm-train",
        &[
            "ddpm-fs",
            "ddpm-schedule",
            "ddpm-kernels",
            "ddpm-unet",
            "ddpm-data",
        ],
    ),
    (
        "ddpm-cli",
        &[
            "ddpm-fs",
            "ddpm-schedule",
            "ddpm-kernels",
            "ddpm-unet",
            "ddpm-data",
            "ddpm-train",
        ],
    ),
    (
        "xtask",
        &[
            "ddpm-fs",
            "ddpm-schedule",
            "ddpm-kernels",
            "ddpm-unet",
            "ddpm-data",
            "ddpm-train",
        ],
    ),
];

/// The library crates: their `src/` may not read the environment.
pub const LIBRARIES: [&str; 6] = [
    "ddpm-fs",
    "ddpm-schedule",
    "ddpm-kernels",
    "ddpm-unet",
    "ddpm-data",
    "ddpm-train",
];

/// Where `unsafe` may appear (path prefixes under the root), and why.
pub const UNSAFE_ALLOWED: [(&str, &str); 6] = [
    (
        "crates/ddpm-kernels/src/",
        "the hand-written kernels (SIMD, raw slices, uninitialised buffers, CUDA launches)",
    ),
    (
        "crates/ddpm-train/src/device.rs",
        "the CUDA memory pool and mimalloc options (foreign calls)",
    ),
    (
        "crates/ddpm-train/src/distributed.rs",
        "NCCL communicators and device buffers (foreign calls)",
    ),
    (
        "crates/ddpm-cli/src/launch.rs",
        "signals and process groups of the launched ranks (libc)",
    ),
    (
        "xtask/src/bench.rs",
        "the CUDA profiler's start and stop (foreign calls)",
    ),
    ("crates/vendor/", "the vendored candle-core"),
];

/// Arguments of `tidy`.
#[derive(Args, Debug)]
pub struct TidyArgs {
    /// The checkout to check (default: this workspace).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// One broken invariant: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule (`layering`, `env`, `unsafe`, `timing`).
    pub rule: &'static str,
    /// The file and line, or the crate.
    pub at: String,
    /// What is wrong.
    pub what: String,
}

/// Runs `tidy`: every check; fails listing each violation.
pub fn run(args: TidyArgs) -> anyhow::Result<()> {
    let root = match args.root {
        Some(r) => r,
        None => crate::fuzz::workspace_root(),
    };
    let metadata = crate::cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .context("running cargo metadata")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed in {}: {}",
            root.display(),
            String::from_utf8_lossy(&metadata.stderr).trim()
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("parsing cargo metadata")?;
    let mut violations = check_layering(&metadata);
    violations.extend(check_sources(&root)?);
    if violations.is_empty() {
        println!(
            "tidy: ok (layering of {} crates, no environment reads in {} libraries, unsafe only \
             in {} allowed places, no timings in comments)",
            LAYERS.len(),
            LIBRARIES.len(),
            UNSAFE_ALLOWED.len()
        );
        return Ok(());
    }
    for v in &violations {
        println!("tidy: {} at {}: {}", v.rule, v.at, v.what);
    }
    bail!(
        "{} architecture invariant(s) broken (ARCHITECTURE.md says why each holds)",
        violations.len()
    )
}

/// Layering: every dependency of a workspace crate on another is one [`LAYERS`] allows; a
/// workspace crate missing from [`LAYERS`] is a violation too (it must be placed).
pub fn check_layering(metadata: &serde_json::Value) -> Vec<Violation> {
    let mut out = Vec::new();
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    for p in &packages {
        let Some(name) = p["name"].as_str() else {
            continue;
        };
        let Some((_, allowed)) = LAYERS.iter().find(|(n, _)| *n == name) else {
            out.push(Violation {
                rule: "layering",
                at: name.to_string(),
                what: "a workspace crate not placed in a layer (add it to tidy::LAYERS and \
                       ARCHITECTURE.md)"
                    .into(),
            });
            continue;
        };
        for dep in p["dependencies"].as_array().into_iter().flatten() {
            let Some(dep_name) = dep["name"].as_str() else {
                continue;
            };
            if dep["kind"].as_str() == Some("dev") {
                continue;
            }
            if names.iter().any(|n| n == dep_name) && !allowed.contains(&dep_name) {
                out.push(Violation {
                    rule: "layering",
                    at: name.to_string(),
                    what: format!(
                        "depends on {dep_name}, which is not below it (allowed: {})",
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                });
            }
        }
    }
    out
}

/// The environment, unsafe and timing rules over every `.rs` file of `crates/` and `xtask/`.
pub fn check_sources(root: &Path) -> anyhow::Result<Vec<Violation>> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask"] {
        collect_rs(&root.join(dir), &mut files)?;
    }
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(root)
            .unwrap_or(&file)
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with("crates/vendor/") {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        out.extend(check_file(&rel, &text));
    }
    Ok(out)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The rules for one file (`rel`: its path from the root, with `/`).
pub fn check_file(rel: &str, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    let library_src = LIBRARIES
        .iter()
        .any(|l| rel.starts_with(&format!("crates/{l}/src/")));
    // Shipped code only: tests may call libc (signals, allocators) where they must.
    let unsafe_ok =
        !rel.contains("/src/") || UNSAFE_ALLOWED.iter().any(|(p, _)| rel.starts_with(p));
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{rel}:{}", i + 1);
        let (code, comment) = split_comment(line);
        if library_src
            && (code.contains("env::var")
                || code.contains("env::vars")
                || code.contains("env::var_os"))
        {
            out.push(Violation {
                rule: "env",
                at: at(),
                what: "a library reads an environment variable: take the choice as a value \
                       (the binary reads the variable; crates/ddpm-cli/src/env.rs)"
                    .into(),
            });
        }
        if !unsafe_ok && has_word(code, "unsafe") {
            out.push(Violation {
                rule: "unsafe",
                at: at(),
                what: "`unsafe` outside the kernels and the listed foreign-call modules \
                       (tidy::UNSAFE_ALLOWED)"
                    .into(),
            });
        }
        if !comment.is_empty() && !comment.contains("tidy: not a timing") {
            if let Some(found) = timing_in(comment) {
                out.push(Violation {
                    rule: "timing",
                    at: at(),
                    what: format!(
                        "a measured time in a comment (`{found}`): put it in docs/benchmarks.md \
                         with the command that measured it"
                    ),
                });
            }
        }
    }
    out
}

/// A line's code and its `//` comment (empty when none), `//` inside a string literal being code.
fn split_comment(line: &str) -> (&str, &str) {
    let bytes = line.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                return (&line[..i], &line[i..]);
            }
            _ => {}
        }
        i += 1;
    }
    (line, "")
}

/// Whether `word` occurs in `code` as a whole word (not inside an identifier or a string such
/// as `"unsafe path"`).
fn has_word(code: &str, word: &str) -> bool {
    let mut in_string = false;
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            _ if !in_string && bytes[i..].starts_with(word.as_bytes()) => {
                let before = i.checked_sub(1).map(|j| bytes[j]);
                let after = bytes.get(i + word.len()).copied();
                let ident =
                    |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ident(before) && !ident(after) {
                    return true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// The first measured quantity in a comment: a number followed by a time or rate unit, decimal
/// seconds, or a percentage of a step.
pub fn timing_in(comment: &str) -> Option<String> {
    const UNITS: [&str; 9] = [
        "ms", "µs", "us", "ns", "GFLOP/s", "TFLOP/s", "img/s", "images/s", "it/s",
    ];
    let words: Vec<&str> = comment.split_whitespace().collect();
    for (k, w) in words.iter().enumerate() {
        let number = w.trim_end_matches([',', ';', ')', '.']);
        let starts_numeric = number
            .trim_start_matches(['(', '~'])
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit());
        if !starts_numeric {
            continue;
        }
        // "10.5 ms", "47ms", "59-70 GFLOP/s".
        for unit in UNITS {
            if number.ends_with(unit) && number.len() > unit.len() {
                let head = &number[..number.len() - unit.len()];
                if head.ends_with(|c: char| c.is_ascii_digit()) {
                    return Some(number.to_string());
                }
            }
            if let Some(next) = words.get(k + 1) {
                if next.trim_end_matches([',', ';', ')', '.', ':']) == unit {
                    return Some(format!("{number} {unit}"));
                }
            }
        }
        // "17.7 s", "0.73 s".
        if number.contains('.')
            && number
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        {
            if let Some(next) = words.get(k + 1) {
                if next.trim_end_matches([',', ';', ')', '.']) == "s" {
                    return Some(format!("{number} s"));
                }
            }
        }
        // "15-30% of a CPU training step".
        if number.ends_with('%') {
            let rest = words[k + 1..words.len().min(k + 6)].join(" ");
            if rest.contains("step") {
                return Some(format!("{number} {rest}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn the_workspace_keeps_every_invariant() {
        let root = crate::fuzz::workspace_root();
        let v = check_sources(&root).unwrap();
        assert!(v.is_empty(), "{v:#?}");
    }

    #[test]
    fn a_planted_environment_read_in_a_library_fails() {
        let src = "fn f() -> bool {\n    std::env::var(\"X\").is_ok()\n}\n";
        let v = check_file("crates/ddpm-unet/src/ops.rs", src);
        assert_eq!(rules(&v), ["env"]);
        assert_eq!(v[0].at, "crates/ddpm-unet/src/ops.rs:2");
        // The binary may; so may a comment that names one.
        assert!(check_file("crates/ddpm-cli/src/env.rs", src).is_empty());
        assert!(
            check_file("crates/ddpm-data/src/x.rs", "// uses env::var in the CLI\n").is_empty()
        );
    }

    #[test]
    fn planted_unsafe_outside_the_kernels_fails() {
        let src = "fn f(p: *const u8) -> u8 {\n    unsafe { *p }\n}\n";
        assert_eq!(
            rules(&check_file("crates/ddpm-data/src/mnist.rs", src)),
            ["unsafe"]
        );
        assert!(check_file("crates/ddpm-kernels/src/conv/cpu.rs", src).is_empty());
        // Not the word in a string or an identifier.
        let benign = "let e = bad(\"unsafe or empty path\");\nfn unsafe_edits() {}\n";
        assert!(check_file("crates/ddpm-data/src/x.rs", benign).is_empty());
    }

    /// A line with characters of several bytes (a `÷` in a string) is scanned without
    /// slicing inside one, and what follows them is still checked.
    #[test]
    fn lines_with_multibyte_characters_are_checked() {
        let src = "fn f(p: *const u8) -> u8 {\n    let _ = \"ours ÷ best\"; unsafe { *p }\n}\n";
        assert_eq!(
            rules(&check_file("crates/ddpm-data/src/x.rs", src)),
            ["unsafe"]
        );
    }

    #[test]
    fn planted_timings_in_comments_fail_and_settings_pass() {
        for bad in [
            "/// a step took 47 ms on an H200",
            "// 59-70 GFLOP/s against 43-55",
            "// DDIM went from 17.7 to 10.3 s",
            "/// 112 images/s at batch 32",
            "// that was 15-30% of a CPU training step",
            "// 3.8ms after the change",
        ] {
            let v = check_file(
                "crates/ddpm-unet/src/x.rs",
                &format!("{bad}\nfn f() {{}}\n"),
            );
            assert_eq!(rules(&v), ["timing"], "{bad}");
        }
        for ok in [
            "/// with 5 retries starting at 1 s",
            "// 64 channels x 256 tiles",
            "// 28x28 images, 196 tiles",
            "/// after 10 ms (mimalloc's default) tidy: not a timing",
        ] {
            assert!(
                check_file("crates/ddpm-unet/src/x.rs", ok).is_empty(),
                "{ok}"
            );
        }
    }

    #[test]
    fn a_planted_upward_dependency_fails_the_layering() {
        let meta = serde_json::json!({"packages": [
            {"name": "ddpm-schedule", "dependencies": []},
            {"name": "ddpm-unet", "dependencies": [
                {"name": "ddpm-train", "kind": null},
                {"name": "candle-core", "kind": null}
            ]},
            {"name": "ddpm-train", "dependencies": [
                {"name": "ddpm-unet", "kind": null},
                {"name": "ddpm-cli", "kind": "dev"}
            ]},
            {"name": "ddpm-new", "dependencies": []}
        ]});
        let v = check_layering(&meta);
        assert_eq!(
            v.iter()
                .map(|v| (v.rule, v.at.as_str()))
                .collect::<Vec<_>>(),
            [("layering", "ddpm-unet"), ("layering", "ddpm-new")]
        );
        assert!(v[0].what.contains("ddpm-train"));
    }
}
