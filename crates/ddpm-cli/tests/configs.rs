//! Every recipe in `configs/` at the repository root trains: the real `ddpm` binary runs each file
//! for 2 steps of 2 images at 16x16 on small data (the MNIST fixture; Fashion-MNIST and CIFAR-10
//! files written here in their own formats; the Flowers fixture's JPEGs), so a file that stops
//! parsing, validating or training fails here. The folder is listed, so a new recipe is covered
//! without editing this test.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, run, stderr};
use ddpm_train::TrainConfig;
use ddpm_unet::{ModelConfig, PRESETS};

/// The recipes: every `*.toml` in `configs/`, sorted.
fn recipes() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("configs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// An IDX file (uncompressed, which the reader takes as it takes the gzipped one): magic
/// number, big-endian dimensions, payload.
fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Pseudo-random bytes (a fixed LCG), so that the images are not flat.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as u8
        })
        .collect()
}

/// Places every data set a recipe may name in `dir/data`, as a user who copied the files there
/// by hand would (the binary uses them without fetching): the MNIST fixture, a Fashion-MNIST of
/// 8 training and 4 test 28x28 images in its IDX files, a CIFAR-10 of 4 images in each of its six
/// binary batches, and the Flowers fixture's class folders.
fn place_data(dir: &Path) {
    use ddpm_data::{cifar, mnist};
    common::place_fixture_mnist(dir);
    let data = dir.join("data");

    let fashion = data.join("fashion-mnist");
    std::fs::create_dir_all(&fashion).expect("data/fashion-mnist created");
    for (images, labels, n, seed) in [
        (mnist::TRAIN_IMAGES, mnist::TRAIN_LABELS, 8u32, 1),
        (mnist::TEST_IMAGES, mnist::TEST_LABELS, 4, 2),
    ] {
        let pixels = noise(n as usize * 28 * 28, seed);
        let classes: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let write =
            |stem: &str, bytes: Vec<u8>| std::fs::write(fashion.join(stem), bytes).expect("IDX");
        write(images, idx(mnist::IMAGES_MAGIC, &[n, 28, 28], &pixels));
        write(labels, idx(mnist::LABELS_MAGIC, &[n], &classes));
    }

    let batches = data.join("cifar10").join(cifar::BATCH_DIR);
    std::fs::create_dir_all(&batches).expect("CIFAR-10 folder created");
    for (i, name) in cifar::TRAIN_FILES
        .iter()
        .chain([&cifar::TEST_FILE])
        .enumerate()
    {
        let labels: Vec<u8> = (0..4).map(|j| ((i + j) % 10) as u8).collect();
        let pixels = noise(4 * cifar::IMAGE_LEN, 10 + i as u32);
        cifar::write_batch(&batches.join(name), &labels, &pixels).expect("CIFAR-10 batch written");
    }

    let flowers = fixtures().join("flowers");
    for class in std::fs::read_dir(&flowers).expect("Flowers fixture") {
        let class = class.expect("Flowers class").path();
        if !class.is_dir() {
            continue;
        }
        let to = data
            .join("flowers")
            .join(class.file_name().expect("class name"));
        std::fs::create_dir_all(&to).expect("Flowers class folder created");
        for image in std::fs::read_dir(&class).expect("Flowers class folder") {
            let image = image.expect("Flowers image").path();
            std::fs::copy(&image, to.join(image.file_name().expect("image name")))
                .expect("Flowers image copied");
        }
    }
}

/// Each recipe's `[model]` is one of the presets (with the channels and image size its data set
/// gives it), its header names the command that runs it, and it validates.
#[test]
fn every_recipe_is_a_valid_config_of_a_preset_model() {
    let files = recipes();
    assert!(files.len() >= 5, "recipes: {files:?}");
    for file in &files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let text = std::fs::read_to_string(file).expect("recipe readable");
        assert!(
            text.contains(&format!("ddpm train --config configs/{name}")),
            "{name}: its header should give the command that runs it"
        );
        let cfg = TrainConfig::from_toml_file(file).unwrap_or_else(|e| panic!("{name}: {e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let preset = PRESETS.iter().find(|p| {
            let Ok(mut m) = ModelConfig::preset(p) else {
                return false;
            };
            m.set_channels(cfg.model.channels());
            m.set_image_size(cfg.model.image_size());
            m == cfg.model
        });
        assert!(
            preset.is_some(),
            "{name}: [model] is none of the presets {PRESETS:?}"
        );
    }
}

/// Each recipe trains 2 steps on small data and writes its checkpoint; the run's recorded
/// config is the recipe's but for the flags of this test.
#[test]
fn every_recipe_trains_two_steps() {
    for file in recipes() {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let dir = tempfile::tempdir().expect("tmp");
        place_data(dir.path());
        let out = run(common::ddpm_bare(dir.path())
            .args(["train", "--quiet", "--no-fetch", "--config"])
            .arg(&file)
            .args(["--out", "run", "--steps", "2", "--batch-size", "2"])
            .args(["--image-size", "16", "--sample-every", "0"]));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let run_dir = dir.path().join("run");
        assert!(
            run_dir.join("checkpoints/ckpt-00000002.json").is_file(),
            "{name}: no checkpoint of step 2: {}",
            stderr(&out)
        );
        let recipe = TrainConfig::from_toml_file(&file).expect("recipe parses");
        let ran = TrainConfig::from_toml_file(&run_dir.join("config.toml")).expect("run config");
        assert_eq!(ran.dataset, recipe.dataset, "{name}");
        assert_eq!(ran.schedule, recipe.schedule, "{name}");
        assert_eq!(
            (ran.loss, ran.objective, ran.optimizer),
            (recipe.loss, recipe.objective, recipe.optimizer),
            "{name}"
        );
        assert_eq!(
            (ran.steps, ran.batch_size, ran.data.image_size),
            (2, 2, Some(16)),
            "{name}"
        );
    }
}
