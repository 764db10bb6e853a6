//! The sixth attack round on the release binary (docs/reliability.md, "Attacks of 2026-12-07
//! (a sixth round, on the day's new code)"): output paths that name one file twice (a GIF linked
//! to the grid, the grid among the `--out-dir` images, eval's two PNGs), and output paths that
//! could only fail at the end of the work (a name ending in `/`, an `--out-dir` below a file, a
//! dangling link or a loop). Each is refused before any sampling, with nothing written.

mod common;

use std::path::Path;

use common::{assert_ok, assert_one_clean_error, ddpm, run, train_tiny};

/// `ddpm sample` of the tiny run in `dir/run`, 2 images with a 2-step DDIM sampler.
fn sample(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = ddpm(dir);
    c.args([
        "sample",
        "--quiet",
        "--checkpoint",
        "run",
        "--num",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "2",
    ])
    .args(args);
    run(&mut c)
}

#[cfg(unix)]
#[test]
fn outputs_that_are_one_file_or_cannot_be_written_are_refused_before_sampling() {
    let _row = common::AttackRow("sample outputs naming one file, or unwritable, refused first");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    train_tiny(p, "");
    use std::os::unix::fs::symlink;

    // A GIF name that is a link to the grid: the GIF replaced the grid.
    symlink("grid.png", p.join("anim.gif")).unwrap();
    let o = sample(p, &["--out", "grid.png", "--gif", "anim.gif"]);
    assert_one_clean_error(&o, "are the same file");
    assert!(!p.join("grid.png").exists());

    // The grid named as one of the --out-dir images: sample 0 replaced it.
    std::fs::create_dir(p.join("od")).unwrap();
    let o = sample(p, &["--out", "od/sample-00000.png", "--out-dir", "od"]);
    assert_one_clean_error(&o, "is one of the --out-dir od images");
    assert!(std::fs::read_dir(p.join("od")).unwrap().next().is_none());
    // A name beyond the samples drawn is no image of theirs.
    assert_ok(&sample(
        p,
        &["--out", "od/sample-00002.png", "--out-dir", "od"],
    ));
    assert!(p.join("od/sample-00001.png").is_file());

    // Names that failed only when the grid was written, after the sampling.
    for out in ["out.png/", "out.png/."] {
        let o = sample(p, &["--out", out]);
        assert_one_clean_error(&o, "names a directory");
    }
    // --out-dir paths that failed only after the sampling, with the OS's bare words.
    std::fs::write(p.join("afile"), b"mine").unwrap();
    symlink("missing/sub", p.join("dangling")).unwrap();
    symlink("loop-b", p.join("loop-a")).unwrap();
    symlink("loop-a", p.join("loop-b")).unwrap();
    for (out_dir, says) in [
        ("afile/sub", "afile is a regular file, not a directory"),
        ("afile/", "afile is a regular file, not a directory"),
        (
            "dangling",
            "is a symbolic link to missing/sub, which does not exist",
        ),
        ("loop-a", "loop-a: "),
    ] {
        let o = sample(p, &["--out", "g.png", "--out-dir", out_dir]);
        assert_one_clean_error(&o, says);
        assert!(!p.join("g.png").exists(), "{out_dir}: the grid was written");
    }
    assert_eq!(std::fs::read(p.join("afile")).unwrap(), b"mine");
    // A FIFO where a sample image goes is refused before the work, not at its end.
    std::fs::remove_file(p.join("od/sample-00001.png")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(p.join("od/sample-00001.png"))
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let o = sample(p, &["--out", "g.png", "--out-dir", "od"]);
    assert_one_clean_error(&o, "a FIFO (named pipe)");
    assert!(!p.join("g.png").exists());
    // The check reads the directory, not `--num` names: an absurd --num is refused, not a hang.
    let mut c = ddpm(p);
    c.args(["sample", "--quiet", "--checkpoint", "run", "--out", "g.png"])
        .args(["--num", "18446744073709551615", "--out-dir", "od"]);
    let start = std::time::Instant::now();
    let o = run(&mut c);
    assert!(!o.status.success());
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn eval_refuses_one_png_for_both_grids() {
    let _row = common::AttackRow("eval --nearest-png and --samples-png naming one file refused");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    train_tiny(p, "");
    let o = run(ddpm(p).args([
        "eval",
        "--quiet",
        "--checkpoint",
        "run",
        "--quality",
        "--num-samples",
        "8",
        "--steps",
        "2",
        "--nearest-png",
        "same.png",
        "--samples-png",
        "./same.png",
    ]));
    assert_one_clean_error(&o, "are the same file");
    assert!(!p.join("same.png").exists());
    assert!(!p.join("run/eval.json").exists());
}
