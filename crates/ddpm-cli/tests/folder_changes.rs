//! End-to-end tests of an image folder that changes under a run: the feature classifier stored
//! by `ddpm eval --quality` is reused only while the folder's training images and class names
//! are the ones it was trained on (docs/quality.md), and resuming a class-conditional run on a
//! folder of another number of classes says so.

mod common;

use std::path::Path;

use common::{assert_ok, assert_one_clean_error, ddpm, fixtures, run, stderr};

/// Makes `root/<class>` for each `(class, fixture classes)`, holding the fixture's Flowers JPEGs
/// of those fixture classes (10 each), replacing what was there.
fn make_folder(root: &Path, classes: &[(&str, &[&str])]) {
    if root.exists() {
        std::fs::remove_dir_all(root).expect("old folder removed");
    }
    for (class, from) in classes {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).expect("class folder");
        for f in *from {
            for entry in std::fs::read_dir(fixtures().join("flowers").join(f)).expect("fixture") {
                let path = entry.expect("entry").path();
                std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
            }
        }
    }
}

/// Trains a tiny model on `folder:<data>` into `out` with `flags`.
fn train(p: &Path, data: &str, out: &str, flags: &[&str]) {
    let mut c = ddpm(p);
    c.args(["train", "--quiet", "--dataset"])
        .arg(format!("folder:{data}"))
        .args(["--out", out, "--model", "cifar-small", "--image-size", "8"])
        .args([
            "--batch-size",
            "2",
            "--sample-every",
            "0",
            "--timesteps",
            "20",
        ])
        .args(flags);
    assert_ok(&run(&mut c));
}

#[test]
fn a_stored_classifier_of_other_images_or_classes_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let fc = p.join("fc");
    make_folder(
        &fc,
        &[
            ("daisy", &["daisy", "dandelion"]),
            ("rose", &["rose", "tulip"]),
        ],
    );
    train(p, "fc", "runs/fc", &["--steps", "1"]);
    let eval = |extra: &[&str]| {
        let mut c = ddpm(p);
        c.args([
            "eval",
            "--checkpoint",
            "runs/fc",
            "--quality",
            "--num-samples",
            "4",
        ])
        .args([
            "--steps",
            "2",
            "--classifier-steps",
            "20",
            "--report",
            "ev.json",
        ])
        .args(extra);
        run(&mut c)
    };
    let stored = |o: &std::process::Output| stderr(o).contains("feature classifier loaded");

    // First use trains and stores it; unchanged data reuses it.
    let o = eval(&[]);
    assert_ok(&o);
    assert!(!stored(&o), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(p.join("data/classifiers"))
        .expect("classifiers")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let o = eval(&[]);
    assert_ok(&o);
    assert!(stored(&o), "{}", stderr(&o));

    // Other images under the same class names: refused, naming the file and what to do.
    make_folder(
        &fc,
        &[
            ("daisy", &["daisy", "sunflower"]),
            ("rose", &["rose", "tulip"]),
        ],
    );
    let o = eval(&[]);
    assert_one_clean_error(&o, "was trained on other images");
    assert_one_clean_error(&o, "--train-classifier");
    assert_one_clean_error(&o, &name);

    // `--train-classifier` recovers; the new one is reused.
    let o = eval(&["--train-classifier"]);
    assert_ok(&o);
    assert!(!stored(&o), "{}", stderr(&o));
    let o = eval(&[]);
    assert_ok(&o);
    assert!(stored(&o), "{}", stderr(&o));

    // The same images with the class folders renamed: refused, naming both sets of classes.
    make_folder(
        &fc,
        &[
            ("aster", &["daisy", "sunflower"]),
            ("rose", &["rose", "tulip"]),
        ],
    );
    let o = eval(&[]);
    assert_one_clean_error(&o, "was trained on the classes [daisy, rose]");
    assert_one_clean_error(&o, "[aster, rose]");
    assert_one_clean_error(&o, "--train-classifier");
    assert_ok(&eval(&["--train-classifier"]));
    assert!(stored(&eval(&[])));
}

#[test]
fn resuming_a_conditional_run_on_other_classes_names_the_class_counts() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    make_folder(&p.join("fc"), &[("daisy", &["daisy"]), ("rose", &["rose"])]);
    make_folder(
        &p.join("fb"),
        &[
            ("daisy", &["daisy"]),
            ("rose", &["rose"]),
            ("tulip", &["tulip"]),
        ],
    );
    train(
        p,
        "fc",
        "runs/fcc",
        &["--class-conditional", "--steps", "2"],
    );
    let mut c = ddpm(p);
    c.args([
        "train",
        "--quiet",
        "--resume",
        "runs/fcc",
        "--dataset",
        "folder:fb",
    ])
    .args(["--steps", "4"]);
    let o = run(&mut c);
    assert_one_clean_error(&o, "class-conditional with 2 classes");
    assert_one_clean_error(&o, "has 3");
    let line = stderr(&o);
    assert!(!line.contains("image size or channels"), "{line}");
}
