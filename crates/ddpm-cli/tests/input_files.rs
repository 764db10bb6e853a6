//! Inputs that are not what they seem: FIFOs, devices and oversized text files given as a config,
//! checkpoint, weights file, sample image or data-set image are refused at once in one line; a
//! `sample_num` whose grid cannot fit is refused at the start (and on resume); a stop asked
//! during a sample grid skips it; a partial `[model]` section takes the keys it leaves out from a
//! preset.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ddpm_unet::ModelConfig;

use common::{assert_ok, assert_one_clean_error, ddpm, run, stderr, wait_for};

/// Runs `cmd`, failing the test (and killing the command) if it has not ended within a minute: a
/// command that blocks on a FIFO or reads a device forever would otherwise hang the test.
fn run_promptly(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ddpm binary runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("waited for ddpm"),
        Err(_) => {
            // SAFETY: killing the child this test started (waited on by the thread above).
            #[cfg(unix)]
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = pid;
            panic!("ddpm {:?} did not end within a minute", cmd.get_args());
        }
    }
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// `n` distinct 8x8 PNGs in `dir`.
fn write_pngs(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).expect("folder");
    for i in 0..n {
        image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(i * 20) as u8, (x * 30) as u8, (y * 30) as u8])
        })
        .save(dir.join(format!("{i:02}.png")))
        .expect("png written");
    }
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_before_they_are_opened() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    for name in ["ff.toml", "ff.json", "ff.png"] {
        mkfifo(&p.join(name));
    }
    std::fs::create_dir_all(p.join("w")).expect("w");
    mkfifo(&p.join("w/ff.safetensors"));
    std::fs::create_dir_all(p.join("fdir")).expect("fdir");
    mkfifo(&p.join("fdir/a.png"));
    write_pngs(&p.join("imgs"), 12);
    write_pngs(&p.join("odd/g_fifo"), 12);
    mkfifo(&p.join("odd/g_fifo/zz.png"));
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--config", "ff.toml", "--out", "runs/f1"],
            "ff.toml",
        ),
        (
            &["sample", "--checkpoint", "ff.json", "--out", "x.png"],
            "ff.json",
        ),
        (
            &[
                "sample",
                "--checkpoint",
                "w/ff.safetensors",
                "--out",
                "x.png",
            ],
            "ff.safetensors",
        ),
        (
            &["export", "--checkpoint", "ff.json", "--out", "expf"],
            "ff.json",
        ),
        (
            &["eval", "--samples", "ff.png", "--dataset", "folder:imgs"],
            "ff.png",
        ),
        (
            &["eval", "--samples", "fdir", "--dataset", "folder:imgs"],
            "a.png",
        ),
        (
            &[
                "train",
                "--quiet",
                "--dataset",
                "folder:odd/g_fifo",
                "--out",
                "runs/g",
                "--image-size",
                "8",
                "--batch-size",
                "4",
                "--steps",
                "1",
            ],
            "zz.png",
        ),
    ];
    // A diffusers pipeline whose UNet config is a FIFO (the other files real).
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ddpm-unet/tests/fixtures/diffusers-tiny/pipeline");
    for f in ["model_index.json", "scheduler/scheduler_config.json"] {
        let to = p.join("pipe").join(f);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("dir");
        std::fs::copy(fixture.join(f), to).expect("copy");
    }
    std::fs::create_dir_all(p.join("pipe/unet")).expect("unet");
    std::fs::copy(
        fixture.join("unet/diffusion_pytorch_model.st"),
        p.join("pipe/unet/diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    mkfifo(&p.join("pipe/unet/config.json"));
    let o = run_promptly(ddpm(p).args(["sample", "--pretrained", "pipe", "--out", "y.png"]));
    assert_one_clean_error(&o, "config.json");
    assert_one_clean_error(&o, "a FIFO (named pipe), not a regular file");
    for (args, name) in cases {
        let o = run_promptly(ddpm(p).args(*args));
        assert_one_clean_error(&o, name);
        assert_one_clean_error(&o, "a FIFO (named pipe), not a regular file");
    }
    let o = run_promptly(ddpm(p).args(["train", "--config", "/dev/zero", "--out", "runs/z"]));
    assert_one_clean_error(
        &o,
        "/dev/zero: it is a character device, not a regular file",
    );
}

#[test]
fn an_oversized_config_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let mut text = String::from("steps = 1\n");
    let comment = format!("# {}\n", "x".repeat(1000));
    while text.len() <= 17 << 20 {
        text.push_str(&comment);
    }
    std::fs::write(p.join("big.toml"), text).expect("config");
    let o = run_promptly(ddpm(p).args(["train", "--config", "big.toml", "--out", "runs/b"]));
    assert_one_clean_error(&o, "big.toml");
    assert_one_clean_error(&o, "more than the 16 MB");
}

/// A tiny MNIST run at 8x8: `settings` are more top-level keys.
fn tiny_config(p: &Path, name: &str, settings: &str) -> std::path::PathBuf {
    let path = p.join(name);
    std::fs::write(
        &path,
        format!("batch_size = 4\nwarmup_steps = 0\n{settings}\n[data]\nimage_size = 8\n"),
    )
    .expect("config");
    path
}

// The memory checks read MemAvailable from /proc/meminfo (Linux); elsewhere they are skipped.
#[cfg(target_os = "linux")]
#[test]
fn a_sample_num_whose_grid_cannot_fit_is_refused_at_start_and_on_resume() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let huge = tiny_config(
        p,
        "sn.toml",
        "steps = 2\nsample_every = 1\nsample_num = 100000000000",
    );
    let o = run_promptly(
        ddpm(p)
            .args(["train", "--quiet", "--out", "runs/sn", "--config"])
            .arg(&huge),
    );
    assert_one_clean_error(&o, "`sample_num` = 100000000000");
    assert_one_clean_error(&o, "lower `sample_num`");
    assert!(!p.join("runs/sn/checkpoints").exists());
    // A run that fits, then `sample_num` raised in its config.toml (a key allowed to change).
    let ok = tiny_config(p, "ok.toml", "steps = 1\nsample_every = 1\nsample_num = 4");
    assert_ok(&run(ddpm(p)
        .args(["train", "--quiet", "--out", "runs/ok", "--config"])
        .arg(&ok)));
    let cfg = p.join("runs/ok/config.toml");
    let text = std::fs::read_to_string(&cfg).expect("config.toml");
    assert!(text.contains("sample_num = 4\n"), "{text}");
    std::fs::write(
        &cfg,
        text.replace("sample_num = 4\n", "sample_num = 100000000000\n"),
    )
    .expect("edited");
    let o = run_promptly(ddpm(p).args(["train", "--quiet", "--resume", "runs/ok", "--steps", "2"]));
    assert_one_clean_error(&o, "`sample_num` = 100000000000");
}

/// A stop asked while a long sample grid is drawn skips the grid: the run ends within seconds
/// with its checkpoint, and no grid is written.
#[cfg(unix)]
#[test]
fn a_stop_during_a_sample_grid_skips_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    // 4,096 images through 1,000 DDIM steps: minutes of sampling after the first step.
    let cfg = tiny_config(
        p,
        "grid.toml",
        "steps = 2\ncheckpoint_every = 1\nsample_every = 1\nsample_num = 4096\n\n[sampler]\nkind = \"ddim\"\nsteps = 1000\n",
    );
    let run_dir = p.join("runs/g");
    let mut c = ddpm(p);
    c.args(["train", "--quiet", "--out", "runs/g", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    struct Guard(Option<std::process::Child>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut child = Guard(Some(c.spawn().expect("spawn")));
    wait_for("the first checkpoint", Duration::from_secs(120), || {
        ddpm_train::checkpoint::list(&run_dir).is_ok_and(|l| !l.is_empty())
    });
    // Well into the grid that follows the checkpoint.
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.0.as_ref().expect("child").id();
    // SAFETY: signalling the child this test started and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let mut proc = child.0.take().expect("child");
    let out = loop {
        if proc.try_wait().expect("try_wait").is_some() {
            break proc.wait_with_output().expect("output");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = proc.kill();
            panic!("the run did not stop within a minute of SIGTERM during its sample grid");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let checkpoints = ddpm_train::checkpoint::list(&run_dir).expect("list");
    assert_eq!(checkpoints.last().map(|c| c.0), Some(1), "{err}");
    let grids = std::fs::read_dir(run_dir.join("samples")).map_or(0, |d| d.count());
    assert_eq!(grids, 0, "a grid was written: {err}");
}

/// `[model] dim = 8` alone trains: the other keys come from the default model, and the image
/// size and channels from the data; a `ddpm_unet` section takes `cifar-small`'s keys. An unknown
/// key or `arch`, or a value of the wrong type, is one line naming it.
#[test]
fn a_partial_model_section_takes_the_rest_from_a_preset() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let train = |out: &str, model: &str, extra: &[&str]| {
        let cfg = p.join(format!("{}.toml", out.replace('/', "_")));
        std::fs::write(
            &cfg,
            format!("steps = 1\nbatch_size = 4\nsample_every = 0\n\n[data]\nimage_size = 8\n\n[model]\n{model}"),
        )
        .expect("config");
        let mut c = ddpm(p);
        c.args(["train", "--quiet", "--out", out, "--config"])
            .arg(&cfg)
            .args(extra);
        run_promptly(&mut c)
    };
    let model_of = |out: &str| -> ModelConfig {
        ddpm_train::resume::read_config_file(&p.join(out).join("config.toml"))
            .expect("config.toml readable")
            .expect("config.toml written")
            .model
    };
    assert_ok(&train("runs/m1", "dim = 8\n", &[]));
    let ModelConfig::Unet(m) = model_of("runs/m1") else {
        panic!("not a unet");
    };
    let preset = ddpm_unet::UnetConfig::mnist_small();
    assert_eq!((m.dim, m.image_size, m.channels), (8, 8, 1));
    assert_eq!(m.dim_mults, preset.dim_mults);
    assert_eq!(m.num_classes, None);

    assert_ok(&train(
        "runs/m2",
        "arch = \"ddpm_unet\"\nch = 8\nattn_resolutions = []\n",
        &[],
    ));
    let ModelConfig::DdpmUnet(m) = model_of("runs/m2") else {
        panic!("not a ddpm_unet");
    };
    let preset = ddpm_unet::DdpmUnetConfig::cifar_small();
    assert_eq!((m.ch, m.in_channels, m.image_size), (8, 1, 8));
    assert_eq!((m.ch_mult, m.groups), (preset.ch_mult, preset.groups));

    let o = train("runs/bad1", "dim = 8\nwidth = 3\n", &[]);
    assert_one_clean_error(&o, "unknown field `width`");
    let o = train("runs/bad2", "dim = \"big\"\n", &[]);
    assert_one_clean_error(&o, "invalid type: string \"big\"");
    let o = train("runs/bad3", "arch = \"vit\"\ndim = 8\n", &[]);
    assert_one_clean_error(&o, "unknown variant `vit`");
}
