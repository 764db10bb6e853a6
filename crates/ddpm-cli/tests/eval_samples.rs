//! End-to-end tests of `ddpm eval --samples`: folders and grids of images scored with the MNIST
//! classifier (trained on the committed fixture with a tiny budget) next to real held-out test
//! images; real digits score high, noise low; a grid gives the numbers of the same images in a
//! folder; bad input is one error line.

mod common;

use std::path::{Path, PathBuf};

use ddpm_data::{DataConfig, Dataset, DatasetSpec, Split};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::{assert_ok, assert_one_clean_error, ddpm, num, read_json, run, FIXTURE_TEST_IMAGES};

/// The classifier flags of every `--samples` run: small and briefly trained (on the fixture's
/// 400 training images), so that the test takes seconds; it reaches about 86% test accuracy and
/// scores 75% of the 40 real digits below recognisable, and none of the noise images.
const TINY_CLASSIFIER: [&str; 8] = [
    "--classifier-steps",
    "300",
    "--classifier-width",
    "8",
    "--classifier-features",
    "32",
    "--classifier-batch-size",
    "32",
];

/// `ddpm eval --samples PATH` in `p` with the tiny classifier, quiet, and `extra` flags.
fn eval_samples(p: &Path, samples: &str, extra: &[&str]) -> std::process::Output {
    let mut c = ddpm(p);
    c.args(["eval", "--samples", samples, "--quiet"])
        .args(TINY_CLASSIFIER)
        .args(extra);
    run(&mut c)
}

/// The first `n` images of the fixture's test split (real digits the classifier never saw), as
/// 28x28 u8 pictures.
fn real_digits(p: &Path, n: usize) -> Vec<image::GrayImage> {
    let test = Dataset::open(
        &DatasetSpec::Mnist,
        &DataConfig::with_root(p.join("data")),
        Split::Test,
    )
    .expect("fixture test split");
    assert_eq!(test.len(), FIXTURE_TEST_IMAGES);
    (0..n)
        .map(|i| {
            image::GrayImage::from_raw(28, 28, test.image_u8(i).expect("image").to_vec())
                .expect("28x28")
        })
        .collect()
}

/// Writes `images` as `dir/0000.png`, ... and returns `dir`.
fn write_folder(dir: PathBuf, images: &[image::GrayImage]) -> PathBuf {
    std::fs::create_dir_all(&dir).expect("dir");
    for (i, img) in images.iter().enumerate() {
        img.save(dir.join(format!("{i:04}.png"))).expect("png");
    }
    dir
}

/// The scores of the samples and of the real floor in a report.
fn scores(r: &Value) -> (&Value, &Value) {
    let q = &r["recognisable"];
    (&q["samples"], &q["real_floor"])
}

/// The fields of one set of scores are present and consistent.
fn check_scores(s: &Value, images: u64) {
    assert_eq!(s["images"], images);
    let frac = num(&s["recognisable"], "recognisable");
    assert!((0.0..=1.0).contains(&frac));
    assert_eq!(
        s["recognisable_count"].as_u64().expect("count") as f64,
        frac * images as f64
    );
    let hist: Vec<u64> = s["class_histogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|v| v.as_u64().expect("count"))
        .collect();
    assert_eq!(hist.len(), 10);
    assert_eq!(hist.iter().sum::<u64>(), images);
    // The normalised entropy, recomputed from the histogram.
    let h: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let q = c as f64 / images as f64;
            -q * q.ln()
        })
        .sum::<f64>()
        / 10f64.ln();
    assert!((num(&s["class_entropy"], "entropy") - h).abs() < 1e-12);
    assert!(num(&s["fid"], "fid") >= 0.0);
    let conf = num(&s["mean_confidence"], "mean_confidence");
    assert!((0.1 - 1e-12..=1.0 + 1e-12).contains(&conf), "{conf}");
}

#[test]
fn eval_samples_scores_real_digits_high_and_noise_low() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let _ = ddpm(p); // places the fixture
    let digits = real_digits(p, 40);
    write_folder(p.join("real"), &digits);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let noise: Vec<image::GrayImage> = (0..40)
        .map(|_| image::GrayImage::from_fn(28, 28, |_, _| image::Luma([rng.random::<u8>()])))
        .collect();
    write_folder(p.join("noise"), &noise);

    // Real digits: the classifier is trained on first use, stored with the data; the report
    // lands beside the folder.
    let o = eval_samples(p, "real", &[]);
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("recognisable (confidence >= 0.9)") && text.contains("real floor"),
        "{text}"
    );
    assert!(p.join("data/classifiers/mnist-28.safetensors").exists());
    let real = read_json(&p.join("real-eval.json"));
    assert_eq!(real["format"], "ddpm-rs/eval-samples/v1");
    assert_eq!(real["dataset"], "mnist");
    assert_eq!(real["source"]["kind"], "folder");
    assert_eq!(real["source"]["files"], 40);
    assert_eq!(real["classifier"]["trained_now"], true);
    assert_eq!(real["recognisable"]["fid_features"], "classifier features");
    assert_eq!(real["recognisable"]["confidence"], 0.9);
    // 40 samples: a floor of 40 test images, a reference of the other 40 of a permutation of
    // the 100.
    assert_eq!(real["recognisable"]["reference_images"], 40);
    assert_eq!(real["recognisable"]["test_split_images"], 100);
    let (s, floor) = scores(&real);
    check_scores(s, 40);
    check_scores(floor, 40);
    let accuracy = num(&real["classifier"]["test_accuracy"], "accuracy");
    let real_rec = num(&s["recognisable"], "real");
    assert!(
        real_rec >= 0.5,
        "real digits recognisable {real_rec} ({accuracy})"
    );
    assert!(num(&floor["recognisable"], "floor") >= 0.5);
    assert!(num(&s["class_entropy"], "entropy") > 0.8);

    // Noise: low, and far from the test images in feature space.
    assert_ok(&eval_samples(p, "noise", &["--report", "noise.json"]));
    let noisy = read_json(&p.join("noise.json"));
    assert_eq!(noisy["classifier"]["trained_now"], false);
    let (n, nfloor) = scores(&noisy);
    check_scores(n, 40);
    let noise_rec = num(&n["recognisable"], "noise");
    assert!(noise_rec <= 0.2, "noise recognisable {noise_rec}");
    assert!(num(&n["fid"], "fid") > 5.0 * num(&s["fid"], "fid"));
    // The floor depends only on the number of samples and the seed.
    assert_eq!(nfloor, floor);

    // The same digits as a grid the way `ddpm sample` writes one (40 of them: 7 columns, 6 rows,
    // 2 empty cells at the end), in RGB: the same numbers, and a note on the empty cells.
    let t = ddpm_data::candle_core::Tensor::from_vec(
        digits
            .iter()
            .flat_map(|d| d.as_raw().iter().map(|&v| f32::from(v) / 127.5 - 1.0))
            .collect::<Vec<f32>>(),
        (40, 1, 28, 28),
        &ddpm_data::candle_core::Device::Cpu,
    )
    .expect("tensor");
    ddpm_data::save_image_grid(&t, 7, p.join("grid.png")).expect("grid");
    assert_eq!(
        image::image_dimensions(p.join("grid.png")).expect("png"),
        (7 * 30 + 2, 6 * 30 + 2)
    );
    assert_ok(&eval_samples(p, "grid.png", &[]));
    let g = read_json(&p.join("grid-eval.json"));
    assert_eq!(g["source"]["kind"], "grid");
    assert_eq!(
        (g["source"]["columns"].clone(), g["source"]["rows"].clone()),
        (7.into(), 6.into())
    );
    assert_eq!(g["source"]["empty_cells_dropped"], 2);
    assert!(g["notes"][0]
        .as_str()
        .expect("note")
        .contains("--grid-count 42"));
    assert_eq!(scores(&g), scores(&real));

    // The threshold is a flag: at 0.5 at least as many are recognisable.
    assert_ok(&eval_samples(
        p,
        "real",
        &["--confidence", "0.5", "--report", "half.json"],
    ));
    let half = read_json(&p.join("half.json"));
    assert_eq!(half["recognisable"]["confidence"], 0.5);
    assert!(num(&scores(&half).0["recognisable"], "half") >= real_rec);

    // Larger images are resized with a note, or refused with --strict-size.
    let big: Vec<image::GrayImage> = digits[..4]
        .iter()
        .map(|d| image::imageops::resize(d, 56, 56, image::imageops::FilterType::Triangle))
        .collect();
    write_folder(p.join("big"), &big);
    assert_ok(&eval_samples(p, "big", &[]));
    let b = read_json(&p.join("big-eval.json"));
    assert!(
        b["notes"][0]
            .as_str()
            .expect("note")
            .contains("4 of 4 images were not 28x28"),
        "{b}"
    );
    assert_one_clean_error(&eval_samples(p, "big", &["--strict-size"]), "56x56");
}

#[test]
fn bad_samples_give_one_clear_error_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let _ = ddpm(p);
    std::fs::create_dir_all(p.join("empty")).expect("dir");
    std::fs::write(p.join("empty/readme.txt"), "no images").expect("txt");
    assert_one_clean_error(&eval_samples(p, "empty", &[]), "no .png, .jpg or .jpeg");
    assert_one_clean_error(&eval_samples(p, "missing", &[]), "missing");
    // An unreadable image is named.
    std::fs::create_dir_all(p.join("junk")).expect("dir");
    image::GrayImage::new(28, 28)
        .save(p.join("junk/a.png"))
        .expect("png");
    std::fs::write(p.join("junk/b.png"), b"not a png at all").expect("junk");
    assert_one_clean_error(&eval_samples(p, "junk", &[]), "b.png");
    // A PNG cut short is named too.
    let bytes = std::fs::read(p.join("junk/a.png")).expect("a");
    std::fs::write(p.join("junk/b.png"), &bytes[..bytes.len() / 2]).expect("cut");
    assert_one_clean_error(&eval_samples(p, "junk", &[]), "b.png");
    // A grid whose size does not fit 28x28 cells with 2-pixel padding: the numbers.
    image::RgbImage::new(100, 62)
        .save(p.join("odd.png"))
        .expect("png");
    let o = eval_samples(p, "odd.png", &[]);
    assert_one_clean_error(&o, "100x62");
    assert_one_clean_error(&o, "multiples of 30");
    // 100 - 2 = 98 and 62 - 2 = 60 have no common divisor c + 2 >= 6: no cell side fits.
    assert_one_clean_error(&o, "no cell side fits");
    // A single image is not two samples.
    std::fs::create_dir_all(p.join("one")).expect("dir");
    image::GrayImage::new(28, 28)
        .save(p.join("one/a.png"))
        .expect("png");
    assert_one_clean_error(&eval_samples(p, "one", &[]), "at least 2");
    // Flags: the threshold, and --samples with a checkpoint.
    std::fs::create_dir_all(p.join("two")).expect("dir");
    for i in 0..2 {
        image::GrayImage::new(28, 28)
            .save(p.join(format!("two/{i}.png")))
            .expect("png");
    }
    assert_one_clean_error(&eval_samples(p, "two", &["--confidence", "1.5"]), "(0, 1]");
    assert_one_clean_error(
        &eval_samples(p, "two", &["--report", "no/such/dir/r.json"]),
        "does not exist",
    );
    let o = run(ddpm(p).args(["eval", "--samples", "two", "--checkpoint", "run"]));
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("--checkpoint"));
    // Nothing was written.
    assert!(!p.join("two-eval.json").exists() && !p.join("odd-eval.json").exists());
}

/// `--quality` reports the same fields for a model's samples: a tiny model trained 20 steps on
/// the fixture at 16x16.
#[test]
fn eval_quality_reports_the_recognisable_fields() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    common::write_tiny_config(
        p,
        "steps = 20
batch_size = 8
warmup_steps = 2
checkpoint_every = 20
sample_every = 0
log_every = 10
workers = 1
",
        r#"[schedule]
timesteps = 50
beta_schedule = { kind = "scaled_linear" }
"#,
    );
    assert_ok(&run(ddpm(p).args([
        "train",
        "--quiet",
        "--config",
        "tiny.toml",
        "--out",
        "run",
    ])));
    let mut c = ddpm(p);
    c.args([
        "eval",
        "--checkpoint",
        "run",
        "--quality",
        "--num-samples",
        "12",
        "--steps",
        "3",
        "--confidence",
        "0.8",
        "--report",
        "q.json",
        "--quiet",
        "--classifier-steps",
        "20",
        "--classifier-width",
        "4",
        "--classifier-features",
        "8",
    ]);
    let o = run(&mut c);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("recognisable (confidence >= 0.8)"));
    let q = &read_json(&p.join("q.json"))["quality"];
    let r = &q["recognisable"];
    assert_eq!(r["confidence"], 0.8);
    assert_eq!(r["fid_features"], "classifier features");
    assert_eq!(r["reference_images"], q["test_images"]);
    assert_eq!(r["reference_images"], 12);
    check_scores(&r["samples"], 12);
    check_scores(&r["real_floor"], 12);
    // The samples' scores are those of the quality report's own fields.
    assert_eq!(r["samples"]["fid"], q["fid"]);
    assert_eq!(r["samples"]["class_histogram"], q["class_histogram"]);
    // A bad threshold stops before sampling.
    let mut c = ddpm(p);
    c.args([
        "eval",
        "--checkpoint",
        "run",
        "--quality",
        "--confidence",
        "0",
    ]);
    assert_one_clean_error(&run(&mut c), "(0, 1]");
}
