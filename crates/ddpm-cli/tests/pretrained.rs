//! `ddpm sample --pretrained DIR` on the tiny random diffusers pipeline of
//! crates/ddpm-unet/tests/fixtures/diffusers-tiny (made by bench/pytorch/diffusers_fixtures.py)
//! and the files its provenance lists, bad directories, and our DDIM loop against diffusers'
//! DDIMPipeline from the same noise.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_ok, assert_one_clean_error, ddpm_bare, run};
use ddpm_schedule::diffusers::DiffusersScheduler;
use ddpm_schedule::{DdimOptions, DdimSampler};
use ddpm_unet::diffusers::load_unet_dir;

#[path = "../../ddpm-unet/tests/support/diffusers_fixture.rs"]
mod diffusers_fixture;
use diffusers_fixture::{fixture, fixture_of, MODERN, TINY};

fn png_dims(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn samples_from_both_layouts_of_a_diffusers_pipeline() {
    let dir = tempfile::tempdir().expect("tmp");
    let pipeline = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ];
    let flat = [
        "model_index.json",
        "config.json",
        "diffusion_pytorch_model.bin",
        "scheduler_config.json",
    ];
    for (layout, sampler, files) in [("pipeline", "ddim", pipeline), ("flat-bin", "ddpm", flat)] {
        let each = format!("each-{layout}");
        let grid = format!("{layout}.png");
        let o = run(ddpm_bare(dir.path()).args([
            "sample",
            "--pretrained",
            fixture(layout).to_str().expect("utf-8 path"),
            "--num",
            "2",
            "--sampler",
            sampler,
            "--steps",
            "10",
            "--out",
            &grid,
            "--out-dir",
            &each,
            "--quiet",
        ]));
        assert_ok(&o);
        // Two 16x16 images in one row, 1-pixel borders.
        assert_eq!(png_dims(&dir.path().join(&grid)), (2 * 18 + 2, 18 + 2));
        for i in 0..2 {
            let p = dir.path().join(&each).join(format!("sample-{i:05}.png"));
            assert_eq!(png_dims(&p), (16, 16));
        }
        // The provenance beside the grid lists the files read, relative to the directory, as
        // for a Hub repository.
        let json = dir.path().join(format!("{layout}.json"));
        let text = std::fs::read_to_string(&json).expect("provenance written");
        let prov: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let read = &prov["pretrained"];
        assert_eq!(read["dir"], fixture(layout).display().to_string());
        assert!(read.get("repo").is_none(), "a local directory: {read}");
        assert_eq!(read["files"], serde_json::json!(files));
        // Sampling again under the same name replaces the provenance record, but never a JSON
        // that is not one (a checkpoint's, an eval report): that is refused before sampling.
        let again = |grid: &str| {
            run(ddpm_bare(dir.path()).args([
                "sample",
                "--pretrained",
                fixture(layout).to_str().expect("utf-8 path"),
                "--num",
                "1",
                "--steps",
                "2",
                "--out",
                grid,
                "--quiet",
            ]))
        };
        assert_ok(&again(&grid));
        let foreign = dir.path().join(format!("{layout}-mine.json"));
        std::fs::write(&foreign, "{\"step\": 2}").expect("written");
        assert_one_clean_error(&again(&format!("{layout}-mine.png")), "which is not one");
        assert_eq!(
            std::fs::read_to_string(&foreign).expect("kept"),
            "{\"step\": 2}"
        );
        assert!(!dir.path().join(format!("{layout}-mine.png")).exists());
    }
}

#[test]
fn bad_pretrained_directories_give_one_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let sample = |pretrained: &str| {
        run(ddpm_bare(dir.path()).args([
            "sample",
            "--pretrained",
            pretrained,
            "--num",
            "1",
            "--quiet",
        ]))
    };
    assert_one_clean_error(&sample("./missing"), "no such directory");
    assert_one_clean_error(&sample(""), "--pretrained is empty");
    std::fs::create_dir(dir.path().join("empty")).expect("dir");
    assert_one_clean_error(&sample("empty"), "scheduler_config.json");

    // A pipeline whose UNet asks for what our model cannot do: the field is named.
    let bad = dir.path().join("fourier");
    std::fs::create_dir_all(bad.join("unet")).expect("dir");
    std::fs::create_dir_all(bad.join("scheduler")).expect("dir");
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        std::fs::copy(fixture("pipeline").join(f), bad.join(f)).expect("copy");
    }
    let cfg = std::fs::read_to_string(fixture("pipeline/unet/config.json")).expect("config");
    let cfg = cfg.replace("\"positional\"", "\"fourier\"");
    std::fs::write(bad.join("unet/config.json"), cfg).expect("write");
    assert_one_clean_error(&sample("fourier"), "time_embedding_type");

    // Sizes edited by hand are refused before a model of that size is allocated (they aborted
    // on allocations of 4 GB and more).
    let config = std::fs::read_to_string(fixture("pipeline/unet/config.json")).expect("config");
    let mut json: serde_json::Value = serde_json::from_str(&config).expect("json");
    for (key, value, needle) in [
        (
            "in_channels",
            serde_json::json!(4_294_967_296u64),
            "do not belong together",
        ),
        (
            "layers_per_block",
            serde_json::json!(100_000_000),
            "`layers_per_block` = 100000000",
        ),
    ] {
        let original = json[key].clone();
        json[key] = value;
        std::fs::write(bad.join("unet/config.json"), json.to_string()).expect("write");
        assert_one_clean_error(&sample("fourier"), needle);
        json[key] = original;
    }

    // Both sources at once are refused by the argument parser.
    let o = run(ddpm_bare(dir.path()).args(["sample", "--pretrained", "a", "--checkpoint", "b"]));
    assert!(!o.status.success());
}

/// Our DDIM loop (eta 0, clipped x_0, on the timesteps diffusers visits) from diffusers' initial
/// noise ends where diffusers' DDIMPipeline ended, within 1/255 per pixel (and the raw samples
/// agree to 1e-4): for the DDPM paper's settings and for diffusers' own defaults.
#[test]
fn our_ddim_loop_reproduces_diffusers_ddim_pipeline() -> Result<(), Box<dyn std::error::Error>> {
    for name in [TINY, MODERN] {
        ddim_loop_reproduces_diffusers(name)?;
    }
    Ok(())
}

fn ddim_loop_reproduces_diffusers(name: &'static str) -> Result<(), Box<dyn std::error::Error>> {
    let fixture = |rel: &str| fixture_of(name, rel);
    let want = candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu)?;
    let loaded = load_unet_dir(&fixture("pipeline"), &Device::Cpu, DType::F32)?;
    let text = std::fs::read_to_string(fixture("pipeline/scheduler/scheduler_config.json"))?;
    let scheduler = DiffusersScheduler::from_json(&text)?;
    let schedule = scheduler.schedule(&Device::Cpu, DType::F32)?;
    let timesteps = scheduler.inference_timesteps(10)?;
    let theirs: Vec<i64> = want["ddim_timesteps"].to_vec1()?;
    let theirs: Vec<usize> = theirs.into_iter().map(|t| t as usize).collect();
    assert_eq!(timesteps, theirs);
    let sampler = DdimSampler::with_timesteps(
        &schedule,
        &timesteps,
        DdimOptions {
            clip_x0: scheduler.clip_x0,
            ..DdimOptions::default()
        },
    )?;

    let mut x = want["ddim_noise"].clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let tt = Tensor::full(t as u32, x.dim(0)?, &Device::Cpu)?;
        let out = loaded.model.forward(&x, &tt)?;
        x = sampler.step(&out, &x, i, scheduler.objective, None)?;
    }
    let raw = (&x - &want["ddim_sample"])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(raw < 1e-4, "final sample differs by {raw}");
    // The pipeline's images: (x / 2 + 0.5) clamped to [0, 1], NHWC.
    let ours = ((x / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?;
    let gap = (ours - &want["ddim_images"])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(gap <= 1.0 / 255.0, "images differ by {gap}");
    println!(
        "{name}: DDIM, 10 steps: max |ours - diffusers| = {raw:.2e} (sample), {gap:.2e} (image)"
    );
    Ok(())
}

/// `ddpm sample --pretrained` on a pipeline with diffusers' own defaults (the layout of the models
/// its training example writes; `export.rs` exports a run trained with them).
#[test]
fn a_pipeline_with_diffusers_default_settings_samples() {
    let dir = tempfile::tempdir().expect("tmp");
    let o = run(ddpm_bare(dir.path()).args([
        "sample",
        "--pretrained",
        fixture_of(MODERN, "pipeline").to_str().expect("utf-8 path"),
        "--num",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "5",
        "--out",
        "modern.png",
        "--quiet",
    ]));
    assert_ok(&o);
    assert_eq!(
        png_dims(&dir.path().join("modern.png")),
        (2 * 18 + 2, 18 + 2)
    );
}

/// A pipeline with only the fp16 variant of its UNet weights (as many Hub repositories ship
/// beside, or instead of, full precision) is read into f32 with a warning, and samples what the
/// full-precision weights sample, to within the rounding of half precision; its provenance names
/// the variant.
#[test]
fn an_fp16_variant_alone_is_read_with_a_warning() {
    let dir = tempfile::tempdir().expect("tmp");
    let half = dir.path().join("half");
    std::fs::create_dir_all(half.join("unet")).expect("dir");
    std::fs::create_dir_all(half.join("scheduler")).expect("dir");
    for f in [
        "model_index.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(fixture("pipeline").join(f), half.join(f)).expect("copy");
    }
    let tensors = candle_core::safetensors::load(
        fixture("pipeline/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("fixture weights");
    let tensors: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F16).expect("f16")))
        .collect();
    candle_core::safetensors::save(
        &tensors,
        half.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .expect("save");
    let sample = |from: &Path, out: &str| {
        run(ddpm_bare(dir.path()).args([
            "sample",
            "--pretrained",
            from.to_str().expect("utf-8 path"),
            "--num",
            "2",
            "--steps",
            "10",
            "--seed",
            "3",
            "--out",
            out,
        ]))
    };
    let o = sample(&half, "half.png");
    assert_ok(&o);
    let err = common::stderr(&o);
    assert!(err.contains("fp16 variant"), "{err}");
    let o = sample(&fixture("pipeline"), "full.png");
    assert_ok(&o);
    assert!(!common::stderr(&o).contains("fp16 variant"));
    let pixels = |name: &str| {
        image::open(dir.path().join(name))
            .expect("png")
            .to_rgb8()
            .into_raw()
    };
    let (h, f) = (pixels("half.png"), pixels("full.png"));
    assert_eq!(h.len(), f.len());
    let worst = h
        .iter()
        .zip(&f)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 8, "pixels differ by up to {worst}/255");
    let prov: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("half.json")).expect("provenance"),
    )
    .expect("json");
    assert!(
        prov["pretrained"]["files"]
            .to_string()
            .contains("unet/diffusion_pytorch_model.fp16.safetensors"),
        "{prov}"
    );
}
