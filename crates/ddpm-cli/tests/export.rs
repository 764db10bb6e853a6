//! `ddpm export --format diffusers`: a trained run written as a diffusers DDPMPipeline directory,
//! read back by `ddpm sample --pretrained` with identical results; the lucidrains `unet`, a
//! non-empty `--out` and unknown formats refused with one clear line.
//! (bench/parity/diffusers_export.py checks that diffusers itself loads the export.)

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_ok, assert_one_clean_error, ddpm, run, train_new, write_tiny_config};
use ddpm_train::checkpoint::{load_model, WeightsKind};
use ddpm_unet::diffusers::load_unet_dir;

/// The tiny `ddpm_unet` trained 4 steps with the extra top-level `settings` and `tables` (TOML,
/// may be empty) into `dir/out`.
fn train(dir: &Path, out: &str, settings: &str, tables: &str) {
    let cfg = write_tiny_config(
        dir,
        &format!(
            "steps = 4\nbatch_size = 8\nwarmup_steps = 2\ncheckpoint_every = 4\n\
             sample_every = 0\nlog_every = 1\nworkers = 1\nema_decay = 0.5\n{settings}\n"
        ),
        tables,
    );
    assert_ok(&run(&mut train_new(dir, out, &cfg)));
}

fn export(dir: &Path, args: &[&str]) -> std::process::Output {
    run(ddpm(dir).arg("export").args(args))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .expect("tensor values")
}

/// The UNet's output for one fixed input at two timesteps.
fn output(model: &ddpm_unet::DiffusionModel) -> Vec<f32> {
    let cfg = model.config();
    let (c, s) = (cfg.channels(), cfg.image_size());
    let n = 2 * c * s * s;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (2, c, s, s), &Device::Cpu).expect("input");
    let t = Tensor::new(&[3u32, 777], &Device::Cpu).expect("timesteps");
    values(&model.forward(&x, &t).expect("forward"))
}

/// A run trained with diffusers' own `UNet2DModel` settings (attention heads, flipped and
/// unshifted time embedding, symmetric downsampling padding, eps 1e-5; keys of `[model]`) is
/// exported with them, and the export computes what the run computes.
#[test]
fn a_run_with_diffusers_default_settings_exports_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // Keys right after the tiny config's [model] section belong to it.
    let modern = "attention_head_dim = 4\nnorm_eps = 1e-5\nflip_sin_to_cos = true\n\
                  freq_shift = 0.0\ndownsample_padding = 1\n";
    train(p, "run", "", modern);
    let toml = std::fs::read_to_string(p.join("run/config.toml")).expect("config");
    assert!(toml.contains("attention_head_dim = 4"), "{toml}");
    assert_ok(&export(p, &["--checkpoint", "run", "--out", "pipe"]));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.join("pipe/unet/config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(cfg["attention_head_dim"], 4);
    assert_eq!(cfg["norm_eps"], 1e-5);
    assert_eq!(cfg["flip_sin_to_cos"], true);
    assert_eq!(cfg["freq_shift"], 0);
    assert_eq!(cfg["downsample_padding"], 1);
    let ema = load_model(&p.join("run"), WeightsKind::Ema, &Device::Cpu).expect("run");
    let pipe = load_unet_dir(&p.join("pipe"), &Device::Cpu, DType::F32).expect("pipe");
    assert_eq!(output(&ema.model), output(&pipe.model));
    // A head width that does not divide an attention block is refused by name.
    let mut c = ddpm(p);
    let bad = write_tiny_config(p, "steps = 1", "attention_head_dim = 3\n");
    c.args([
        "train",
        "--config",
        bad.to_str().expect("utf-8"),
        "--out",
        "bad",
    ]);
    assert_one_clean_error(&run(&mut c), "attention_head_dim");
}

#[test]
fn an_exported_run_samples_like_the_run_through_pretrained() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    train(p, "run", "", "");
    assert_ok(&export(p, &["--checkpoint", "run", "--out", "pipe"]));
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        assert!(p.join("pipe").join(f).is_file(), "{f} written");
    }
    // A pipeline directory given where a run is expected says how to read it.
    let mut wrong = ddpm(p);
    wrong.args(["sample", "--checkpoint", "pipe", "--out", "w.png"]);
    assert_one_clean_error(&run(&mut wrong), "--pretrained pipe");
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.join("pipe/scheduler/scheduler_config.json")).expect("read"),
    )
    .expect("json");
    // The default schedule (linear, 1e-4 to 0.02, T = 1000) is diffusers' own linear schedule.
    assert_eq!(sched["beta_schedule"], "linear");
    assert!(sched["trained_betas"].is_null());
    assert_eq!(sched["num_train_timesteps"], 1000);
    assert_eq!(sched["prediction_type"], "epsilon");

    // The weights read back are the run's EMA weights, bit for bit, and so is the output.
    let ema = load_model(&p.join("run"), WeightsKind::Ema, &Device::Cpu).expect("run");
    let pipe = load_unet_dir(&p.join("pipe"), &Device::Cpu, DType::F32).expect("pipe");
    let theirs = pipe.model.tensors();
    for (name, t) in ema.model.tensors() {
        assert_eq!(values(&t), values(&theirs[&name]), "{name}");
    }
    assert_eq!(output(&ema.model), output(&pipe.model));

    // Sampling through --pretrained gives the run's images.
    let sample = |source: &[&str], out: &str| {
        let o = run(ddpm(p)
            .arg("sample")
            .args(source)
            .args(["--num", "3", "--steps", "5", "--seed", "11", "--quiet"])
            .args(["--out", out]));
        assert_ok(&o);
        std::fs::read(p.join(out)).expect("grid")
    };
    for sampler in ["ddim", "ddpm"] {
        let flags = ["--sampler", sampler];
        let a = sample(&[&["--checkpoint", "run"][..], &flags].concat(), "a.png");
        let b = sample(&[&["--pretrained", "pipe"][..], &flags].concat(), "b.png");
        assert!(a == b, "{sampler}: --pretrained of the export differs");
    }

    // --weights raw writes the raw weights; a non-empty --out needs --force.
    let o = export(
        p,
        &["--checkpoint", "run", "--out", "pipe", "--weights", "raw"],
    );
    assert_one_clean_error(&o, "--force");
    assert_ok(&export(
        p,
        &[
            "--checkpoint",
            "run",
            "--out",
            "pipe",
            "--weights",
            "raw",
            "--force",
        ],
    ));
    let raw = load_model(&p.join("run"), WeightsKind::Raw, &Device::Cpu).expect("run");
    let pipe = load_unet_dir(&p.join("pipe"), &Device::Cpu, DType::F32).expect("pipe");
    assert_eq!(output(&raw.model), output(&pipe.model));
    assert_ne!(output(&raw.model), output(&ema.model), "EMA 0.5 differs");

    // A finished export leaves no marker; one that did not finish (killed between its files,
    // here its marker put back by hand) is refused by --pretrained, and a new export mends it.
    let marker = p.join("pipe/.ddpm-export-incomplete");
    assert!(
        !marker.exists(),
        "the marker of a finished export is removed"
    );
    std::fs::write(&marker, "").expect("marker");
    let o = run(ddpm(p).args([
        "sample",
        "--pretrained",
        "pipe",
        "--num",
        "1",
        "--steps",
        "2",
    ]));
    assert_one_clean_error(&o, "did not finish");
    assert_ok(&export(
        p,
        &["--checkpoint", "run", "--out", "pipe", "--force"],
    ));
    assert!(!marker.exists());
}

#[test]
fn a_schedule_diffusers_has_no_formula_for_is_written_as_trained_betas() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // Our cosine clips the betas to [1e-4, 0.9999]; diffusers' squaredcos_cap_v2 does not.
    train(
        p,
        "run",
        "objective = \"v\"",
        "[schedule]\ntimesteps = 50\n\n[schedule.beta_schedule]\nkind = \"cosine\"\n",
    );
    assert_ok(&export(p, &["--checkpoint", "run", "--out", "pipe"]));
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.join("pipe/scheduler/scheduler_config.json")).expect("read"),
    )
    .expect("json");
    let listed = sched["trained_betas"].as_array().expect("trained_betas");
    assert_eq!(listed.len(), 50);
    assert_eq!(sched["prediction_type"], "v_prediction");
    let ours = load_model(&p.join("run"), WeightsKind::Ema, &Device::Cpu)
        .expect("run")
        .schedule
        .betas()
        .expect("betas");
    for (a, b) in listed.iter().zip(&ours) {
        assert_eq!(a.as_f64(), Some(*b));
    }
    let sample = |source: &str, out: &str| {
        let o = run(ddpm(p)
            .arg("sample")
            .args([
                source,
                if source == "--checkpoint" {
                    "run"
                } else {
                    "pipe"
                },
            ])
            .args(["--num", "2", "--steps", "4", "--seed", "5", "--quiet"])
            .args(["--out", out]));
        assert_ok(&o);
        std::fs::read(p.join(out)).expect("grid")
    };
    assert!(sample("--checkpoint", "a.png") == sample("--pretrained", "b.png"));
}

#[test]
fn models_and_flags_export_cannot_serve_are_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // A lucidrains-style `unet` weights file.
    let model = ddpm_unet::DiffusionModel::new(
        &ddpm_unet::ModelConfig::preset("mnist-small").expect("preset"),
        0,
        &Device::Cpu,
        DType::F32,
    )
    .expect("model");
    model.save(&p.join("unet.safetensors")).expect("saved");
    let o = export(p, &["--checkpoint", "unet.safetensors", "--out", "pipe"]);
    assert_one_clean_error(&o, "diffusers has no class");
    assert!(!p.join("pipe").exists(), "nothing written");

    let o = export(
        p,
        &[
            "--checkpoint",
            "unet.safetensors",
            "--out",
            "pipe",
            "--format",
            "onnx",
        ],
    );
    assert_one_clean_error(&o, "unknown --format `onnx`");
    let o = export(p, &["--checkpoint", "missing", "--out", "pipe"]);
    assert_one_clean_error(&o, "missing");
    std::fs::write(p.join("file"), b"x").expect("file");
    let o = export(p, &["--checkpoint", "unet.safetensors", "--out", "file"]);
    assert_one_clean_error(&o, "is a file");
}

/// For bench/parity/diffusers_export.py (which runs it with `--ignored` and
/// `DDPM_EXPORT_PARITY_DIR` set): the `cifar-small` and `cifar10` presets with every parameter
/// randomized (GroupNorms and the zero-initialized output layers too, so that every tensor
/// matters), each exported by `ddpm export` into `DIR/<preset>/pipeline`, with our UNet's output
/// on a fixed input in `DIR/<preset>/expected.safetensors` (`x`, `t`, `eps`, and the schedule's
/// `betas` in f64); and `cifar-small-classes`, `cifar-small` class-conditional with 10 classes,
/// whose input also has `labels` (a class and the null label).
#[test]
#[ignore = "run by bench/parity/diffusers_export.py"]
fn parity_export_for_diffusers() {
    let Some(root) = std::env::var_os("DDPM_EXPORT_PARITY_DIR") else {
        panic!("set DDPM_EXPORT_PARITY_DIR (bench/parity/diffusers_export.py does)");
    };
    let root = Path::new(&root);
    for (name, preset, classes, diffusers_defaults) in [
        ("cifar-small", "cifar-small", None, false),
        ("cifar10", "cifar10", None, false),
        ("cifar-small-classes", "cifar-small", Some(10), false),
        // diffusers' own UNet2DModel defaults: 16-feature heads (4 at 64 channels), flipped
        // and unshifted time embedding, symmetric downsampling padding, eps 1e-5.
        ("cifar-small-diffusers", "cifar-small", None, true),
    ] {
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("parity dir");
        let mut config = ddpm_unet::ModelConfig::preset(preset).expect("preset");
        config.set_num_classes(classes);
        if let (true, ddpm_unet::ModelConfig::DdpmUnet(c)) = (diffusers_defaults, &mut config) {
            c.attention_head_dim = Some(16);
            c.norm_eps = 1e-5;
            c.flip_sin_to_cos = true;
            c.freq_shift = 0.0;
            c.downsample_padding = 1;
        }
        let model =
            ddpm_unet::DiffusionModel::new(&config, 0, &Device::Cpu, DType::F32).expect("model");
        let random: std::collections::HashMap<String, Tensor> = model
            .vars()
            .iter()
            .map(|(name, v)| {
                let fan_in: usize = v.dims().iter().skip(1).product::<usize>().max(1);
                let std = if v.dims().len() == 1 {
                    0.3
                } else {
                    1.0 / (fan_in as f64).sqrt()
                };
                let t = Tensor::randn(0f32, std as f32, v.dims(), &Device::Cpu)
                    .and_then(|t| {
                        // GroupNorm scales near 1, as trained ones are.
                        if name.contains("norm") && name.ends_with("weight") {
                            t + 1.0
                        } else {
                            Ok(t)
                        }
                    })
                    .expect("random tensor");
                (name.clone(), t)
            })
            .collect();
        model
            .set_tensors(&random, Path::new("random"))
            .expect("randomized");
        model
            .save(&dir.join("weights.safetensors"))
            .expect("weights saved");
        let o = run(common::ddpm_bare(&dir).args([
            "export",
            "--checkpoint",
            "weights.safetensors",
            "--out",
            "pipeline",
        ]));
        assert_ok(&o);
        let cfg = model.config();
        let (c, s) = (cfg.channels(), cfg.image_size());
        let x = Tensor::randn(0f32, 1.0, (2, c, s, s), &Device::Cpu).expect("x");
        let t = Tensor::new(&[3u32, 777], &Device::Cpu).expect("t");
        let labels = Tensor::new(&[3i64, 10], &Device::Cpu).expect("labels");
        let eps = match classes {
            Some(_) => model.forward_full(&x, &t, Some(&labels), None, None),
            None => model.forward(&x, &t),
        }
        .expect("forward");
        let t_i64 = t.to_dtype(DType::I64).expect("t as i64");
        let betas = load_model(
            &dir.join("weights.safetensors"),
            WeightsKind::Ema,
            &Device::Cpu,
        )
        .expect("weights file")
        .schedule
        .betas()
        .expect("betas");
        let betas = Tensor::new(betas, &Device::Cpu).expect("betas");
        let mut expected = std::collections::HashMap::from([
            ("x".to_string(), x),
            ("t".to_string(), t_i64),
            ("eps".to_string(), eps),
            ("betas".to_string(), betas),
        ]);
        if classes.is_some() {
            expected.insert("labels".to_string(), labels);
        }
        candle_core::safetensors::save(&expected, dir.join("expected.safetensors"))
            .expect("expected written");
    }
}
