//! diffusers interop against diffusers itself: the tiny random UNet2DModel of
//! `tests/fixtures/diffusers-tiny` (written by bench/pytorch/diffusers_fixtures.py) loads from its
//! pipeline directory (safetensors) and from its flat copy (a PyTorch `.bin` with the old attention
//! names), and predicts what diffusers predicted on the same input; so does the tiny model of
//! `tests/fixtures/diffusers-tiny-modern`, with diffusers' own defaults (attention heads, the
//! flipped and unshifted time embedding, symmetric downsampling padding, eps 1e-5); broken
//! configs and weights are refused naming the field or tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ddpm_unet::diffusers::{find_unet_files, load_unet_dir, read_weights};
use ddpm_unet::UnetError;

type R<T> = Result<T, Box<dyn std::error::Error>>;

#[path = "support/diffusers_fixture.rs"]
mod diffusers_fixture;
use diffusers_fixture::{fixture, fixture_of, MODERN};

fn expected() -> R<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("expected.safetensors"),
        &Device::Cpu,
    )?)
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> R<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

#[test]
fn both_layouts_and_formats_predict_what_diffusers_predicted() -> R<()> {
    let want = expected()?;
    let x = &want["x"];
    let t = want["t"].to_dtype(DType::U32)?;
    for dir in ["pipeline", "flat-bin"] {
        let loaded = load_unet_dir(&fixture(dir), &Device::Cpu, DType::F32)?;
        let weights = loaded.files.weights.file_name().unwrap_or_default();
        match dir {
            "pipeline" => assert_eq!(weights, "diffusion_pytorch_model.safetensors"),
            _ => assert_eq!(weights, "diffusion_pytorch_model.bin"),
        }
        assert!(loaded.config.notes.is_empty(), "{:?}", loaded.config.notes);
        let cfg = &loaded.config.config;
        assert_eq!(
            (cfg.image_size, cfg.ch, cfg.ch_mult.clone(), cfg.groups),
            (16, 8, vec![1, 2], 4)
        );
        assert_eq!(cfg.attn_resolutions, vec![8]);
        let eps = loaded.model.forward(x, &t)?;
        let err = rel_err(&eps, &want["eps"])?;
        println!("{dir}: max |ours - diffusers| / max |diffusers| = {err:.2e}");
        // f32 through two levels with attention: agreement to rounding, well under 1e-4.
        assert!(err < 1e-4, "{dir}: relative error {err}");
    }
    Ok(())
}

/// The layout diffusers' own defaults give (what its training example writes, the most common
/// DDPMs on the Hub): attention in heads of 4 features, `[cos, sin]` time embedding with
/// freq_shift 0, symmetric downsampling padding, GroupNorm eps 1e-5. Each setting is read, and
/// the output is diffusers' within rounding.
#[test]
fn diffusers_own_defaults_predict_what_diffusers_predicted() -> R<()> {
    let want =
        candle_core::safetensors::load(fixture_of(MODERN, "expected.safetensors"), &Device::Cpu)?;
    let t = want["t"].to_dtype(DType::U32)?;
    let loaded = load_unet_dir(&fixture_of(MODERN, "pipeline"), &Device::Cpu, DType::F32)?;
    assert!(loaded.config.notes.is_empty(), "{:?}", loaded.config.notes);
    let cfg = &loaded.config.config;
    assert_eq!(cfg.attention_head_dim, Some(4));
    assert_eq!(cfg.norm_eps, 1e-5);
    assert!(cfg.flip_sin_to_cos);
    assert_eq!((cfg.freq_shift, cfg.downsample_padding), (0.0, 1));
    let eps = loaded.model.forward(&want["x"], &t)?;
    let err = rel_err(&eps, &want["eps"])?;
    println!("modern: max |ours - diffusers| / max |diffusers| = {err:.2e}");
    assert!(err < 1e-4, "relative error {err}");
    let agreement = err;
    // Each setting matters: read as the paper's, the same weights predict something else.
    for paper in [
        serde_json::json!({"attention_head_dim": null}),
        serde_json::json!({"norm_eps": 1e-6}),
        serde_json::json!({"flip_sin_to_cos": false}),
        serde_json::json!({"freq_shift": 1}),
        serde_json::json!({"downsample_padding": 0}),
    ] {
        let tmp = tempfile::tempdir()?;
        let unet = tmp.path().join("unet");
        std::fs::create_dir_all(&unet)?;
        std::fs::copy(
            fixture_of(MODERN, "pipeline/unet/diffusion_pytorch_model.safetensors"),
            unet.join("diffusion_pytorch_model.safetensors"),
        )?;
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixture_of(MODERN, "pipeline/unet/config.json"),
        )?)?;
        for (k, v) in paper.as_object().expect("object") {
            cfg[k] = v.clone();
        }
        std::fs::write(unet.join("config.json"), cfg.to_string())?;
        let other = load_unet_dir(tmp.path(), &Device::Cpu, DType::F32)?;
        let err = rel_err(&other.model.forward(&want["x"], &t)?, &want["eps"])?;
        // GroupNorm's eps moves the output by about ten times the rounding (1e-5 against
        // 1e-6 beside variances near 1); the other settings by far more.
        assert!(
            err > 5.0 * agreement,
            "{paper}: the setting changed nothing ({err:.2e}, rounding {agreement:.2e})"
        );
    }
    Ok(())
}

/// A copy of the pipeline directory in a temporary directory, with `edit` applied to its UNet
/// weights (by name) and its config (as JSON).
fn edited_copy(
    edit_weights: impl FnOnce(&mut HashMap<String, Tensor>) -> R<()>,
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> R<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let unet = tmp.path().join("unet");
    std::fs::create_dir_all(&unet)?;
    let mut tensors = read_weights(&fixture(
        "pipeline/unet/diffusion_pytorch_model.safetensors",
    ))?;
    edit_weights(&mut tensors)?;
    candle_core::safetensors::save(&tensors, unet.join("diffusion_pytorch_model.safetensors"))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(
        "pipeline/unet/config.json",
    ))?)?;
    edit_config(&mut cfg);
    std::fs::write(unet.join("config.json"), cfg.to_string())?;
    Ok(tmp)
}

fn load_err(dir: &Path) -> UnetError {
    match load_unet_dir(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn weights_that_do_not_fit_are_refused_naming_the_tensor() -> R<()> {
    let missing = "down_blocks.1.attentions.0.to_k.bias";
    let tmp = edited_copy(
        |t| {
            t.remove(missing);
            Ok(())
        },
        |_| {},
    )?;
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, UnetError::MissingTensor { name, .. } if name == missing),
        "{e}"
    );

    let tmp = edited_copy(
        |t| {
            t.insert(
                "class_embedding.weight".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu)?,
            );
            Ok(())
        },
        |_| {},
    )?;
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, UnetError::UnexpectedTensor { name, .. } if name == "class_embedding.weight"),
        "{e}"
    );

    let bad = "up_blocks.1.resnets.1.conv1.weight";
    let tmp = edited_copy(
        |t| {
            let w = t[bad].narrow(1, 0, 8)?.contiguous()?;
            t.insert(bad.into(), w);
            Ok(())
        },
        |_| {},
    )?;
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, UnetError::ShapeMismatch { name, found, .. } if name == bad && found[1] == 8),
        "{e}"
    );
    assert!(e.to_string().contains(bad));

    let nan = "mid_block.resnets.1.norm2.weight";
    let tmp = edited_copy(
        |t| {
            let mut v = t[nan].to_vec1::<f32>()?;
            v[2] = f32::NAN;
            t.insert(nan.into(), Tensor::new(v, &Device::Cpu)?);
            Ok(())
        },
        |_| {},
    )?;
    let e = load_err(tmp.path());
    assert!(
        e.to_string().contains(nan) && e.to_string().contains("NaN"),
        "{e}"
    );
    Ok(())
}

#[test]
fn configs_we_cannot_represent_are_refused_naming_the_field() -> R<()> {
    let cases: [(&str, serde_json::Value, &str); 3] = [
        (
            "time_embedding_type",
            "fourier".into(),
            "time_embedding_type",
        ),
        (
            "down_block_types",
            serde_json::json!(["DownBlock2D", "CrossAttnDownBlock2D"]),
            "down_block_types[1]",
        ),
        ("norm_num_groups", 3.into(), "norm_num_groups"),
    ];
    for (key, value, field) in cases {
        let tmp = edited_copy(|_| Ok(()), |c| c[key] = value.clone())?;
        let e = load_err(tmp.path());
        assert!(
            matches!(&e, UnetError::DiffusersConfig { field: f, .. } if f == field),
            "{key}: {e}"
        );
        assert!(e.to_string().contains(&format!("`{field}`")), "{e}");
    }
    Ok(())
}

#[test]
fn directories_without_a_model_are_refused() -> R<()> {
    let tmp = tempfile::tempdir()?;
    let e = find_unet_files(tmp.path()).expect_err("empty dir");
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::write(tmp.path().join("config.json"), "{}")?;
    let e = find_unet_files(tmp.path()).expect_err("no weights");
    assert!(
        e.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
    let e = find_unet_files(&tmp.path().join("nope")).expect_err("no dir");
    assert!(e.to_string().contains("not a directory"), "{e}");
    // A weights file that is not a pickle: an error naming it.
    std::fs::write(
        tmp.path().join("diffusion_pytorch_model.bin"),
        b"not a pickle",
    )?;
    let e = read_weights(&tmp.path().join("diffusion_pytorch_model.bin")).expect_err("garbage");
    assert!(e.to_string().contains("diffusion_pytorch_model.bin"), "{e}");
    Ok(())
}

/// Run by bench/parity/diffusers_import.py, which writes full-size `UNet2DModel`s with random
/// weights and diffusers' output on a fixed input into `DDPM_IMPORT_PARITY_DIR/<case>/`: each
/// loads through our reader and predicts what diffusers predicted (within 1e-4 of its largest
/// value).
#[test]
#[ignore = "run by bench/parity/diffusers_import.py"]
fn parity_import_from_diffusers() -> R<()> {
    let Some(root) = std::env::var_os("DDPM_IMPORT_PARITY_DIR") else {
        panic!("set DDPM_IMPORT_PARITY_DIR (bench/parity/diffusers_import.py does)");
    };
    let mut cases: Vec<_> = std::fs::read_dir(&root)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("expected.safetensors").is_file())
        .collect();
    cases.sort();
    println!("| case | parameters | heads | input | max abs error | relative |");
    println!("|---|---|---|---|---|---|");
    let mut worst = 0f32;
    for case in cases {
        let want = candle_core::safetensors::load(case.join("expected.safetensors"), &Device::Cpu)?;
        let loaded = load_unet_dir(&case.join("pipeline"), &Device::Cpu, DType::F32)?;
        let eps = loaded
            .model
            .forward(&want["x"], &want["t"].to_dtype(DType::U32)?)?;
        let abs = (&eps - &want["eps"])?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let rel = rel_err(&eps, &want["eps"])?;
        worst = worst.max(rel);
        let params: usize = loaded
            .model
            .tensors()
            .values()
            .map(|t| t.elem_count())
            .sum();
        let cfg = &loaded.config.config;
        let heads = cfg
            .attention_head_dim
            .map_or("one per block".to_string(), |d| {
                format!("{d} features each")
            });
        println!(
            "| {} | {params} | {heads} | {:?} | {abs:.2e} | {rel:.2e} |",
            case.file_name().unwrap_or_default().to_string_lossy(),
            want["x"].dims(),
        );
    }
    assert!(worst < 1e-4, "largest relative error {worst:.2e}");
    Ok(())
}
