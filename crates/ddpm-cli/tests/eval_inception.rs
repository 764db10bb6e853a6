//! End-to-end tests of `ddpm eval --samples DIR --fid inception`: a full-size Inception-v3 weights
//! file with random values is written at test time (about 95 MB in the test's temp dir, under
//! pytorch-fid's tensor names, its name carrying its own SHA-256 prefix), a few real digits are
//! scored, and the report's FIDs are those of the library's `InceptionFid` on the same images;
//! a missing file, a wrong hash prefix and a fetch forbidden by --no-fetch are one error line.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_data::{DataConfig, Dataset, DatasetSpec, Split};
use ddpm_train::eval::inception::{InceptionFid, FID_FEATURES};
use ddpm_train::eval::recognisable::reference_and_floor;
use ddpm_train::eval::{load_samples, SampleLoadOptions};
use ddpm_unet::candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use common::{assert_ok, assert_one_clean_error, ddpm, read_json, run, stderr, train_tiny};

/// The small, briefly trained classifier of the `--samples` tests (eval_samples.rs).
const TINY_CLASSIFIER: [&str; 8] = [
    "--classifier-steps",
    "100",
    "--classifier-width",
    "8",
    "--classifier-features",
    "32",
    "--classifier-batch-size",
    "32",
];

/// Writes pytorch-fid's Inception-v3 with seeded random values into `dir` as
/// `pt_inception-random-PREFIX.safetensors`, PREFIX the first 8 hex digits of its SHA-256;
/// returns its path. The names and shapes are the ones the network asks for (a `VarMap`
/// records them); convolutions are He-scaled so that activations stay of order 1 through the
/// 94 layers, BatchNorm statistics are random near (0, 1).
fn write_random_weights(dir: &Path) -> PathBuf {
    let map = VarMap::new();
    InceptionFid::new(
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        &Device::Cpu,
    )
    .expect("the network builds");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut names: Vec<(String, Vec<usize>)> = map
        .data()
        .lock()
        .expect("lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    names.sort();
    let mut tensors = HashMap::new();
    for (name, shape) in names {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("conv.weight") {
            let fan_in: usize = shape[1..].iter().product();
            let scale = (6.0 / fan_in as f32).sqrt();
            (0..count)
                .map(|_| rng.random_range(-scale..scale))
                .collect()
        } else if name.ends_with("running_var") || name.ends_with("bn.weight") {
            (0..count).map(|_| rng.random_range(0.5..1.5)).collect()
        } else {
            (0..count).map(|_| rng.random_range(-0.1..0.1)).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
        tensors.insert(name, t);
    }
    let tmp = dir.join("weights.tmp");
    candle_core::safetensors::save(&tensors, &tmp).expect("weights written");
    let digest = hex::encode(Sha256::digest(std::fs::read(&tmp).expect("read")));
    let path = dir.join(format!("pt_inception-random-{}.safetensors", &digest[..8]));
    std::fs::rename(&tmp, &path).expect("renamed");
    path
}

/// `ddpm eval --samples real --fid inception` in `p`, quiet, the cache in `p/cache`, and
/// `extra` flags.
fn eval_inception(p: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = ddpm(p);
    c.env("DDPM_CACHE_DIR", p.join("cache"))
        .args(["eval", "--samples", "real", "--quiet", "--fid", "inception"])
        .args(TINY_CLASSIFIER)
        .args(extra);
    run(&mut c)
}

#[test]
fn eval_samples_with_inception_fid_reports_the_networks_distances() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let _ = ddpm(p); // places the fixture
    let test = Dataset::open(
        &DatasetSpec::Mnist,
        &DataConfig::with_root(p.join("data")),
        Split::Test,
    )
    .expect("fixture test split");
    // Four real digits as the "samples".
    std::fs::create_dir_all(p.join("real")).expect("dir");
    for i in 0..4 {
        image::GrayImage::from_raw(28, 28, test.image_u8(i).expect("image").to_vec())
            .expect("28x28")
            .save(p.join(format!("real/{i:04}.png")))
            .expect("png");
    }
    let weights = write_random_weights(p);
    let w = weights.to_str().expect("utf-8 path");

    let o = eval_inception(p, &["--inception-weights", w]);
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("FID (Inception-v3, pytorch-fid pool3)"),
        "{text}"
    );
    assert!(
        !text.contains("not comparable with Inception FID"),
        "{text}"
    );
    let r = read_json(&p.join("real-eval.json"));
    let q = &r["recognisable"];
    assert_eq!(q["fid_features"], FID_FEATURES);
    assert_eq!(q["reference_images"], 4);
    let fid = |v: &Value| {
        let x = v["fid"].as_f64().expect("fid");
        assert!(x.is_finite() && x >= 0.0, "{x}");
        x
    };
    let (samples_fid, floor_fid) = (fid(&q["samples"]), fid(&q["real_floor"]));

    // The same distances from the library, on the same images: the samples as read from the
    // folder, the reference and floor as `--seed 0` picks them.
    let net = InceptionFid::load(&weights, &Device::Cpu).expect("weights load");
    let samples = load_samples(&p.join("real"), &SampleLoadOptions::new(1, 28))
        .expect("samples")
        .images;
    let (reference, floor) = reference_and_floor(&test, 4, 0).expect("reference");
    for (got, images) in [(samples_fid, &samples), (floor_fid, &floor)] {
        let want = net.fid(images, &reference).expect("fid");
        assert!(
            (got - want).abs() <= 1e-6 * want.max(1e-3),
            "{got} vs {want}"
        );
    }
    // Real digits against other real digits: a positive distance in random features.
    assert!(
        samples_fid > 0.0 && floor_fid > 0.0,
        "{samples_fid} {floor_fid}"
    );
    eprintln!("{text}");
}

#[test]
fn eval_quality_with_inception_fid_replaces_every_fid() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // The tiny model of eval.rs (with linear betas): 30 steps on the fixture at 16x16, T = 50.
    train_tiny(p, "");
    let weights = write_random_weights(p);
    let mut c = ddpm(p);
    c.env("DDPM_CACHE_DIR", p.join("cache"))
        .args(["eval", "--checkpoint", "run", "--quality", "--quiet"])
        .args(["--num-samples", "4", "--steps", "5", "--report", "q.json"])
        .args(["--fid", "inception", "--inception-weights"])
        .arg(&weights)
        .args(TINY_CLASSIFIER);
    let o = run(&mut c);
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("FID (Inception-v3, pytorch-fid pool3)"),
        "{text}"
    );
    assert!(!text.contains("classifier-feature FID"), "{text}");
    let r = read_json(&p.join("q.json"));
    let q = &r["quality"];
    assert_eq!(q["recognisable"]["fid_features"], FID_FEATURES);
    let fid = q["fid"].as_f64().expect("fid");
    assert_eq!(q["recognisable"]["samples"]["fid"], q["fid"]);
    let train_vs_test = q["fid_train_vs_test"].as_f64().expect("fid_train_vs_test");
    assert!(
        train_vs_test.is_finite() && train_vs_test > 0.0,
        "{train_vs_test}"
    );
    // The samples grid holds the samples the FID was computed from: the library's distance of
    // its cells to the reference test images is the report's.
    let test = Dataset::open(
        &DatasetSpec::Mnist,
        &DataConfig {
            image_size: Some(16),
            ..DataConfig::with_root(p.join("data"))
        },
        Split::Test,
    )
    .expect("fixture test split");
    let samples = load_samples(
        &p.join("q-samples.png"),
        &SampleLoadOptions {
            grid_cell: Some(16),
            grid_count: Some(4),
            ..SampleLoadOptions::new(1, 16)
        },
    )
    .expect("samples grid")
    .images;
    let (reference, _) = reference_and_floor(&test, 4, 0).expect("reference");
    let net = InceptionFid::load(&weights, &Device::Cpu).expect("weights load");
    let want = net.fid(&samples, &reference).expect("fid");
    assert!(
        (fid - want).abs() <= 1e-6 * want.max(1e-3),
        "{fid} vs {want}"
    );
}

#[test]
fn inception_weights_errors_are_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let _ = ddpm(p);
    std::fs::create_dir_all(p.join("real")).expect("dir");
    for i in 0..2u8 {
        image::GrayImage::from_pixel(28, 28, image::Luma([40 * i]))
            .save(p.join(format!("real/{i}.png")))
            .expect("png");
    }
    // A missing file.
    let o = eval_inception(p, &["--inception-weights", "missing.pth"]);
    assert_one_clean_error(&o, "--inception-weights missing.pth: no such file");
    // A file whose contents do not have the SHA-256 prefix its name carries.
    std::fs::write(p.join("pt_inception-x-00000000.pth"), b"not the weights").expect("write");
    let o = eval_inception(p, &["--inception-weights", "pt_inception-x-00000000.pth"]);
    assert_one_clean_error(&o, "not the 00000000 its name promises");
    // The default URL, not cached, with fetching forbidden: nothing is reached for.
    let o = eval_inception(p, &["--no-fetch"]);
    assert_one_clean_error(&o, "--no-fetch forbids fetching them");
    assert!(
        stderr(&o).contains("pt_inception-2015-12-05-6726825d.pth"),
        "{}",
        stderr(&o)
    );
    // An unknown kind.
    let mut c = ddpm(p);
    c.args(["eval", "--samples", "real", "--fid", "tensorflow"]);
    assert_one_clean_error(
        &run(&mut c),
        "--fid tensorflow: use classifier or inception",
    );
}
