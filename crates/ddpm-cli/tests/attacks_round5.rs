//! The fifth attack round on the release binary (docs/reliability.md, "Attacks of 2026-12-07
//! (a fifth round)"): file names that broke the error line, labels read silently as one class,
//! a checkpoint copied in from another run, a run whose checkpoints were moved away, and a
//! pipeline exported into a run. Each is run as a user would, on the committed MNIST fixture or
//! a fake Hub on 127.0.0.1; no network is used.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{assert_ok, assert_one_clean_error, ddpm, ddpm_bare, run, stderr, write_tiny_config};

#[path = "../../ddpm-data/tests/support/hub_server.rs"]
mod hub_server;
use hub_server::{FakeHub, HubFile, Kind};

#[path = "../../ddpm-data/tests/support/hub_parquet.rs"]
mod hub_parquet;
use hub_parquet::png;

use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

const TRAIN: &str = "data/train-00000-of-00001.parquet";

/// A label of a row written by [`parquet_with_labels`].
#[derive(Clone)]
enum L {
    Int(Option<i64>),
    Str(Option<&'static str>),
}

/// A parquet file of one 8x6 PNG per label, with these labels (all integers or all strings, nulls
/// allowed), in the `datasets` library's schema.
fn parquet_with_labels(labels: &[L]) -> Vec<u8> {
    let string = labels.iter().any(|l| matches!(l, L::Str(_)));
    let schema = if string {
        "message schema { optional group image { optional binary bytes; } optional binary label \
         (STRING); }"
    } else {
        "message schema { optional group image { optional binary bytes; } optional int64 label; }"
    };
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let mut buf = Vec::new();
    let mut writer = SerializedFileWriter::new(
        &mut buf,
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut group = writer.next_row_group().unwrap();
    let values: Vec<ByteArray> = (0..labels.len())
        .map(|i| ByteArray::from(png(8, 6, [i as u8 * 20, 0, 0], false)))
        .collect();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&values, Some(&vec![2; labels.len()]), None)
        .unwrap();
    col.close().unwrap();
    let defs: Vec<i16> = labels
        .iter()
        .map(|l| match l {
            L::Int(Some(_)) | L::Str(Some(_)) => 1,
            _ => 0,
        })
        .collect();
    let mut col = group.next_column().unwrap().unwrap();
    if string {
        let v: Vec<ByteArray> = labels
            .iter()
            .filter_map(|l| match l {
                L::Str(Some(s)) => Some(ByteArray::from(*s)),
                _ => None,
            })
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&v, Some(&defs), None)
            .unwrap();
    } else {
        let v: Vec<i64> = labels
            .iter()
            .filter_map(|l| match l {
                L::Int(Some(x)) => Some(*x),
                _ => None,
            })
            .collect();
        col.typed::<Int64Type>()
            .write_batch(&v, Some(&defs), None)
            .unwrap();
    }
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
    buf
}

/// `ddpm` in `dir` with the Hub options pointing at `hub` and the cache in `dir/hf`.
fn ddpm_hub(dir: &Path, hub: &FakeHub) -> Command {
    let mut c = ddpm_bare(dir);
    c.env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "0");
    c
}

/// `ddpm train --quiet --out RUN` of the MNIST preset at 8x8 (milliseconds a step), a checkpoint
/// every step, with these flags, in `dir`.
fn train(dir: &Path, run_dir: &str, flags: &[&str]) -> std::process::Output {
    let mut c = ddpm(dir);
    c.args(["train", "--quiet", "--out", run_dir])
        .args([
            "--image-size",
            "8",
            "--batch-size",
            "2",
            "--sample-every",
            "0",
        ])
        .args(["--checkpoint-every", "1"])
        .args(flags);
    run(&mut c)
}

/// Writes a 6x5 PNG of one colour to `path`.
fn write_png(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, png(6, 5, [shade, 40, 90], false)).unwrap();
}

/// An image file named `bad\nerror: forged.png` made the error two lines, the second one a
/// forged `error:` line. Control characters of every message are now written escaped.
#[test]
fn a_file_name_with_a_newline_stays_on_the_one_error_line() {
    let _row = common::AttackRow("a file name with a newline in an error");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("imgs");
    write_png(&folder.join("a.png"), 10);
    write_png(&folder.join("b.png"), 20);
    std::fs::write(folder.join("bad\nerror: forged.png"), b"not an image").unwrap();
    let o = train(
        dir.path(),
        "runs/nl",
        &["--dataset", "folder:imgs", "--steps", "1"],
    );
    assert_one_clean_error(&o, "bad\\nerror: forged.png: cannot decode image");
}

/// A Hub data set whose label column is null in one row was read as one class, and a stray
/// label (50 among 0 and 1) made 51 classes, 49 of them empty; a class-conditional model was
/// trained on either without a word. Both are now warnings, as is an empty class folder.
#[test]
fn labels_read_as_one_class_and_classes_without_images_are_said() {
    let _row = common::AttackRow("null and stray Hub labels, empty class folders");
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_tiny_config(
        dir.path(),
        "batch_size = 4\nwarmup_steps = 1\nsample_every = 0\nlog_every = 1\nworkers = 1\n",
        "",
    );
    let cases = [
        (
            "nulls",
            vec![
                L::Int(Some(0)),
                L::Int(Some(1)),
                L::Int(None),
                L::Int(Some(1)),
            ],
            vec!["a row has no label", "[row 2]", "data set of one class"],
        ),
        (
            "strays",
            vec![
                L::Int(Some(0)),
                L::Int(Some(1)),
                L::Int(Some(50)),
                L::Int(Some(1)),
            ],
            vec!["48 of the 51 classes have no training image", "2 (2)"],
        ),
        (
            "strings",
            vec![
                L::Str(Some("cat")),
                L::Str(None),
                L::Str(Some("dog")),
                L::Str(Some("cat")),
            ],
            vec!["a row has no label", "[row 1]"],
        ),
    ];
    for (name, labels, needles) in cases {
        hub.publish(
            Kind::Dataset,
            &format!("t/{name}"),
            "main",
            vec![HubFile::lfs(TRAIN, parquet_with_labels(&labels))],
        );
        let mut c = ddpm_hub(dir.path(), &hub);
        c.args(["train", "--quiet", "--class-conditional", "--config"])
            .arg(&cfg)
            .args(["--dataset", &format!("hf:t/{name}"), "--steps", "1"])
            .args(["--out", &format!("run-{name}")]);
        let o = run(&mut c);
        assert_ok(&o);
        let err = stderr(&o);
        for needle in needles {
            assert!(err.contains(needle), "{name}: `{needle}` not in: {err}");
        }
    }
    // An image folder with an empty class folder (here a link to the folder itself).
    let folder = dir.path().join("classes");
    write_png(&folder.join("a/1.png"), 10);
    write_png(&folder.join("b/1.png"), 20);
    std::os::unix::fs::symlink(".", folder.join("c")).unwrap();
    let o = train(
        dir.path(),
        "runs/empty-class",
        &[
            "--dataset",
            "folder:classes",
            "--steps",
            "1",
            "--class-conditional",
        ],
    );
    assert_ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("1 of the 3 classes has no training image") && err.contains("2 (c)"),
        "{err}"
    );
}

/// A checkpoint (JSON and tensors) copied from another run into a run's `checkpoints/` verified
/// on its own and was resumed silently: the run continued another run's weights. The run id
/// of the directory's `history.jsonl` now names it, `--resume-intact` sets it aside, and
/// `sample` refuses it too.
#[test]
fn a_checkpoint_copied_in_from_another_run_is_named_and_set_aside() {
    let _row = common::AttackRow("a checkpoint copied in from another run");
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&train(dir.path(), "runs/ours", &["--steps", "2"]));
    assert_ok(&train(
        dir.path(),
        "runs/theirs",
        &["--steps", "3", "--lr", "0.0005"],
    ));
    let (from, to) = (
        dir.path().join("runs/theirs/checkpoints"),
        dir.path().join("runs/ours/checkpoints"),
    );
    for name in ["ckpt-00000003.json", "ckpt-00000003.safetensors"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    let mut c = ddpm(dir.path());
    c.args(["train", "--quiet", "--resume", "runs/ours", "--steps", "4"]);
    let o = run(&mut c);
    assert_one_clean_error(&o, "belongs to another run");
    assert_one_clean_error(&o, "--from-step 2");
    let mut c = ddpm(dir.path());
    c.args([
        "sample",
        "--quiet",
        "--checkpoint",
        "runs/ours",
        "--num",
        "2",
    ]);
    assert_one_clean_error(&run(&mut c), "belongs to another run");
    let mut c = ddpm(dir.path());
    c.args([
        "train",
        "--quiet",
        "--resume",
        "runs/ours",
        "--resume-intact",
    ])
    .args(["--steps", "4"]);
    assert_ok(&run(&mut c));
    assert!(to.join("set-aside/ckpt-00000003.json").is_file());
    assert!(to.join("ckpt-00000004.json").is_file());
}

/// A run whose checkpoints were moved into a sub-folder (or deleted after a resume) was taken
/// for one that stopped before its first checkpoint: a new run into its directory deleted its
/// metrics and history and replaced its config. It is now refused, and its files are kept.
#[test]
fn a_new_run_keeps_the_files_of_a_run_whose_checkpoints_were_moved() {
    let _row = common::AttackRow("a new run over a run whose checkpoints were moved");
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&train(dir.path(), "runs/a", &["--steps", "2"]));
    let run_dir = dir.path().join("runs/a");
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    let ckpts = run_dir.join("checkpoints");
    std::fs::create_dir(ckpts.join("old")).unwrap();
    for step in [1, 2] {
        for ext in ["json", "safetensors"] {
            let name = format!("ckpt-0000000{step}.{ext}");
            std::fs::rename(ckpts.join(&name), ckpts.join("old").join(&name)).unwrap();
        }
    }
    let o = train(dir.path(), "runs/a", &["--steps", "1"]);
    assert_one_clean_error(&o, "checkpoints/ holds old");
    assert_one_clean_error(&o, "--resume runs/a");
    assert_eq!(
        std::fs::read(run_dir.join("metrics.jsonl")).unwrap(),
        metrics
    );

    // Resumed once, then its checkpoints folder deleted: the history shows the resume.
    assert_ok(&train(dir.path(), "runs/b", &["--steps", "1"]));
    let mut c = ddpm(dir.path());
    c.args(["train", "--quiet", "--resume", "runs/b", "--steps", "2"]);
    assert_ok(&run(&mut c));
    std::fs::remove_dir_all(dir.path().join("runs/b/checkpoints")).unwrap();
    let o = train(dir.path(), "runs/b", &["--steps", "1"]);
    assert_one_clean_error(&o, "history.jsonl records a resume");
    assert!(dir.path().join("runs/b/metrics.jsonl").is_file());
}

/// `export --out RUN --force` wrote a pipeline into the run's own directory, after which
/// `sample --checkpoint RUN` refused the run as "a diffusers pipeline directory". A run's
/// directory and its `checkpoints/` are refused as `--out`, even with `--force`.
#[test]
fn export_never_writes_into_a_run() {
    let _row = common::AttackRow("export --out RUN --force");
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&train(
        dir.path(),
        "runs/x",
        &["--model", "cifar-small", "--steps", "1"],
    ));
    for out in ["runs/x", "runs/x/checkpoints"] {
        let mut c = ddpm(dir.path());
        c.args(["export", "--checkpoint", "runs/x", "--out", out, "--force"]);
        assert_one_clean_error(&run(&mut c), "runs/x/diffusers");
    }
    assert!(!dir.path().join("runs/x/model_index.json").exists());
    let mut c = ddpm(dir.path());
    c.args([
        "export",
        "--checkpoint",
        "runs/x",
        "--out",
        "runs/x/diffusers",
    ]);
    assert_ok(&run(&mut c));
    let mut c = ddpm(dir.path());
    c.args(["sample", "--quiet", "--checkpoint", "runs/x", "--num", "2"]);
    assert_ok(&run(&mut c));
    // A pipeline's files copied into the run by hand do not hide the run from `sample`.
    for f in ["model_index.json", "config.json"] {
        std::fs::copy(
            dir.path().join("runs/x/diffusers/model_index.json"),
            dir.path().join("runs/x").join(f),
        )
        .unwrap();
    }
    let mut c = ddpm(dir.path());
    c.args(["sample", "--quiet", "--checkpoint", "runs/x", "--num", "2"]);
    assert_ok(&run(&mut c));
}
