//! End-to-end tests of checkpoint integrity (issue 21): each reproduces an attack on the
//! release binary and checks the fixed behaviour — a diverging run keeps only finite
//! checkpoints and `sample`/`eval` refuse non-finite weights (1), damaged (2), replaced or
//! edited (3) checkpoints are refused with the newest intact one named and resumable, and the
//! NaN stop says only what is true and gives advice that can be followed (4); identical states
//! write byte-identical files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    assert_ok, assert_one_clean_error, clean_error, ddpm, run, stderr, tensors, train_new,
    write_tiny_config,
};

/// The checkpoints (steps) in `run/checkpoints`, sorted.
fn checkpoints(run: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| {
                let n = e.ok()?.file_name().to_string_lossy().into_owned();
                n.strip_prefix("ckpt-")?.strip_suffix(".json")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn json_of(run: &Path, step: usize) -> PathBuf {
    run.join(format!("checkpoints/ckpt-{step:08}.json"))
}

fn tensors_of(run: &Path, step: usize) -> PathBuf {
    run.join(format!("checkpoints/ckpt-{step:08}.safetensors"))
}

/// The names of the tensors of a checkpoint that hold a NaN or an infinity (all are f32).
fn non_finite(file: &Path) -> Vec<String> {
    tensors(file)
        .into_iter()
        .filter(|(_, bytes)| {
            bytes
                .chunks_exact(4)
                .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        })
        .map(|(name, _)| name)
        .collect()
}

/// The tiny model (16x16 MNIST fixture), `steps` steps, a checkpoint every `every`, the newest
/// `keep` kept, no sample grids: `dir/tiny.toml`.
fn tiny(dir: &Path, steps: usize, every: usize, keep: usize) -> PathBuf {
    write_tiny_config(
        dir,
        &format!(
            "steps = {steps}\nbatch_size = 8\nwarmup_steps = 2\ncheckpoint_every = {every}\n\
             keep_checkpoints = {keep}\nsample_every = 0\nlog_every = 1\nworkers = 1\n"
        ),
        "",
    )
}

fn resume(dir: &Path, run_dir: &str) -> Command {
    let mut c = ddpm(dir);
    c.args(["train", "--quiet", "--resume", run_dir]);
    c
}

fn sample(dir: &Path, checkpoint: &str) -> Output {
    run(ddpm(dir).args([
        "sample",
        "--checkpoint",
        checkpoint,
        "--num",
        "4",
        "--steps",
        "3",
        "--out",
        "s.png",
        "--quiet",
    ]))
}

fn eval_nll(dir: &Path, checkpoint: &str) -> Output {
    run(ddpm(dir).args([
        "eval",
        "--checkpoint",
        checkpoint,
        "--nll",
        "--limit",
        "4",
        "--nll-timesteps",
        "4",
        "--quiet",
    ]))
}

/// The `error:` line of a failure (one line, no panic).
fn error_line(o: &Output) -> String {
    clean_error(o).unwrap_or_else(|e| panic!("{e}"))
}

/// The arguments (after `ddpm`) of the command an error line advises, between backquotes.
fn advice(line: &str) -> Vec<&str> {
    let cmd = line
        .split('`')
        .find(|s| s.starts_with("ddpm train --resume"))
        .unwrap_or_else(|| panic!("no command in: {line}"));
    cmd.split_whitespace().skip(1).collect()
}

/// Rewrites a checkpoint's tensors file with `ema.*` made NaN, as a binary older than the NaN
/// guard could write it. `legacy`: also without the integrity records (no hashes or run id in
/// the JSON or the metadata), as that binary wrote every checkpoint; otherwise the records are
/// kept and the JSON's SHA-256 of the tensors updated (a consistent file whose only fault is
/// the NaNs).
fn poison_ema(json: &Path, legacy: bool) {
    let tensors_path = json.with_extension("safetensors");
    let bytes = std::fs::read(&tensors_path).expect("tensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let mut metadata: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    if legacy {
        metadata.retain(|k, _| {
            !["ddpm.run_id", "ddpm.config_sha256", "ddpm.meta_sha256"].contains(&k.as_str())
        });
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("tensors");
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let mut data = v.data().to_vec();
            if name.starts_with("ema.") {
                for c in data.chunks_exact_mut(4) {
                    c.copy_from_slice(&f32::NAN.to_le_bytes());
                }
            }
            (name, v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).expect("view");
            (n.clone(), view)
        })
        .collect();
    let out = safetensors::serialize(views, Some(metadata)).expect("serialize");
    std::fs::write(&tensors_path, &out).expect("write tensors");
    let mut j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json).expect("json")).expect("json");
    let obj = j.as_object_mut().expect("object");
    obj.insert("tensors_bytes".into(), out.len().into());
    if legacy {
        for k in ["run_id", "config_sha256", "tensors_sha256"] {
            obj.remove(k);
        }
    } else {
        obj.insert(
            "tensors_sha256".into(),
            ddpm_train::checkpoint::sha256_hex(&out).into(),
        );
    }
    std::fs::write(json, serde_json::to_vec_pretty(&j).expect("json")).expect("write json");
}

/// Item 1: `warmup_steps = 0` and `--lr 0.3` make the gradient norm infinite within a few
/// steps. The run stops on the first non-finite value without applying it: every checkpoint on
/// disk is finite, the newest is the one the error names, it samples and evaluates, and the
/// advice (resume with a lower --lr) is accepted. A NaN checkpoint as the old binary wrote it
/// (legacy or consistent) is refused by `sample` and `eval` with exit 1 and one error line.
#[test]
fn item1_a_diverging_run_keeps_only_finite_checkpoints_and_nan_weights_are_refused() {
    let _row = common::AttackRow("NaN/inf step: no update, only finite checkpoints");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    std::fs::write(p.join("it.toml"), "warmup_steps = 0\n").expect("config");
    let o = run(ddpm(p).args([
        "train",
        "--quiet",
        "--config",
        "it.toml",
        "--model",
        "mnist-small",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "30",
        "--checkpoint-every",
        "1",
        "--lr",
        "0.3",
        "--out",
        "run",
    ]));
    let line = error_line(&o);
    assert_one_clean_error(&o, "became");
    let run_dir = p.join("run");
    let kept = checkpoints(&run_dir);
    let newest = *kept
        .last()
        .expect("at least one checkpoint before the divergence");
    assert!(
        line.contains(&format!("the newest checkpoint, step {newest}, is kept")),
        "{line}"
    );
    assert!(line.contains("changed any weight, moment or EMA"), "{line}");
    // Clipping is on (the default): it is not advised; no warm-up: that is.
    assert!(
        !line.contains("clipping") && line.contains("warm-up"),
        "{line}"
    );
    for step in &kept {
        let bad = non_finite(&tensors_of(&run_dir, *step));
        assert!(bad.is_empty(), "checkpoint {step} holds non-finite {bad:?}");
    }
    assert_ok(&sample(p, "run"));
    assert_ok(&eval_nll(p, "run"));
    // The advice can be followed: the command it gives runs (the run may diverge again; it then
    // stops the same way), and the change of learning rate is recorded.
    let args = advice(&line);
    assert!(args.contains(&"--lr"), "{line}");
    let o = run(ddpm(p).args(&args).arg("--quiet"));
    if !o.status.success() {
        assert_one_clean_error(&o, "became");
    }
    let history = std::fs::read_to_string(run_dir.join("history.jsonl")).expect("history");
    assert!(
        history.contains(r#""key":"optimizer.lr","from":"0.3","to":"0.03""#),
        "{history}"
    );
    if let Some(i) = args.iter().position(|a| *a == "--from-step") {
        // Resuming the checkpoint right before the stop would replay it: an earlier one is
        // advised, and the newer ones are set aside, not deleted.
        let from: usize = args[i + 1].parse().expect("step");
        assert!(from < newest, "{line}");
        assert!(
            line.contains("stops again whatever the learning rate"),
            "{line}"
        );
        let aside = run_dir.join(format!("checkpoints/set-aside/ckpt-{newest:08}.json"));
        assert!(aside.exists(), "{} missing", aside.display());
    }

    // A NaN checkpoint as the binary before the fix wrote it (ckpt-N with NaN EMA): refused.
    let newest = *checkpoints(&run_dir).last().expect("checkpoint");
    let json = json_of(&run_dir, newest);
    let saved = (
        std::fs::read(&json).expect("json"),
        std::fs::read(json.with_extension("safetensors")).expect("tensors"),
    );
    let _ = std::fs::remove_file(p.join("s.png"));
    for legacy in [true, false] {
        std::fs::write(&json, &saved.0).expect("restore");
        std::fs::write(json.with_extension("safetensors"), &saved.1).expect("restore");
        poison_ema(&json, legacy);
        let ckpt = json.to_string_lossy().into_owned();
        for o in [sample(p, &ckpt), eval_nll(p, &ckpt)] {
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert_one_clean_error(&o, "NaN or infinite");
            assert!(error_line(&o).contains("ema.*"), "{}", error_line(&o));
        }
        assert!(
            !p.join("s.png").exists(),
            "a grid was written from NaN weights"
        );
    }
}

/// Item 2: 8 bytes flipped in the middle of the newest checkpoint's tensors. `--resume` refuses
/// it naming the file, the SHA-256 and the newest intact checkpoint; `sample` names that
/// checkpoint too; nothing is changed. `--resume-intact` then continues from it (the damaged
/// files kept in checkpoints/set-aside/), exactly as an uninterrupted run.
#[test]
fn item2_flipped_bytes_are_detected_and_the_intact_checkpoint_resumes_exactly() {
    let _row = common::AttackRow("flipped bytes in a checkpoint");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = tiny(p, 6, 2, 3);
    assert_ok(&run(&mut train_new(p, "run", &cfg)));
    let run_dir = p.join("run");
    let file = tensors_of(&run_dir, 6);
    let mut bytes = std::fs::read(&file).expect("read");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&file, &bytes).expect("flip");
    let o = run(resume(p, "run").args(["--steps", "8"]));
    assert_one_clean_error(&o, "ckpt-00000006.safetensors");
    let line = error_line(&o);
    for needle in [
        "SHA-256",
        "the newest intact one is step 4",
        "--from-step 4",
        "--resume-intact",
    ] {
        assert!(line.contains(needle), "`{needle}` not in: {line}");
    }
    assert_eq!(
        std::fs::read(&file).expect("read"),
        bytes,
        "the damaged file changed"
    );
    assert_eq!(checkpoints(&run_dir), vec![2, 4, 6]);
    let o = sample(p, "run");
    assert_one_clean_error(&o, "use it with --checkpoint");
    assert!(
        error_line(&o).contains("ckpt-00000004.json"),
        "{}",
        error_line(&o)
    );

    assert_ok(&run(resume(p, "run").args([
        "--steps",
        "8",
        "--resume-intact",
    ])));
    assert_eq!(checkpoints(&run_dir), vec![4, 6, 8]);
    let aside = run_dir.join("checkpoints/set-aside/ckpt-00000006.safetensors");
    assert_eq!(
        std::fs::read(&aside).expect("set aside"),
        bytes,
        "damaged file lost"
    );
    let history = std::fs::read_to_string(run_dir.join("history.jsonl")).expect("history");
    assert!(history.contains(r#""set_aside":[{"step":6"#), "{history}");
    // From step 4 of the same run, the state at 8 is an uninterrupted run's, bit for bit.
    let cfg8 = p.join("eight.toml");
    std::fs::copy(tiny(p, 8, 2, 3), &cfg8).expect("copy");
    assert_ok(&run(&mut train_new(p, "reference", &cfg8)));
    assert_eq!(
        tensors(&tensors_of(&run_dir, 8)),
        tensors(&tensors_of(&p.join("reference"), 8))
    );
}

/// Item 3: the newest tensors file replaced by an older one or by another run's, the JSON's
/// step edited from 4 to 100, the tensors file deleted: each resume is refused with one line
/// naming the file and what differs. An edit of config.toml is honoured for a safe key and
/// refused by name for another.
#[test]
fn item3_replaced_edited_or_missing_files_and_config_edits_are_never_silent() {
    let _row = common::AttackRow("replaced/edited/missing checkpoint files");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = tiny(p, 4, 2, 3);
    assert_ok(&run(&mut train_new(p, "run", &cfg)));
    assert_ok(&run(train_new(p, "other", &cfg).args(["--seed", "1"])));
    let run_dir = p.join("run");
    let (json, file) = (json_of(&run_dir, 4), tensors_of(&run_dir, 4));
    let good = (
        std::fs::read(&json).expect("json"),
        std::fs::read(&file).expect("tensors"),
    );
    let restore = || {
        std::fs::write(&json, &good.0).expect("restore");
        std::fs::write(&file, &good.1).expect("restore");
    };
    let resume_fails = |needle: &str| {
        let o = run(resume(p, "run").args(["--steps", "6"]));
        assert_one_clean_error(&o, needle);
        let line = error_line(&o);
        assert!(line.contains("the newest intact one is step 2"), "{line}");
    };
    std::fs::copy(tensors_of(&run_dir, 2), &file).expect("older");
    resume_fails("holds the tensors of step 2, but ckpt-00000004.json is the checkpoint of step 4");
    std::fs::copy(tensors_of(&p.join("other"), 4), &file).expect("other run");
    resume_fails("belongs to another run");
    restore();
    let text = String::from_utf8(good.0.clone()).expect("utf-8");
    std::fs::write(&json, text.replacen("\"step\": 4,", "\"step\": 100,", 1)).expect("edit");
    resume_fails("is the checkpoint of step 100");
    restore();
    std::fs::remove_file(&file).expect("delete");
    resume_fails("tensors file");
    let o = run(&mut resume(p, "run"));
    assert!(!error_line(&o).ends_with("No such file or directory (os error 2)"));
    restore();
    assert_eq!(checkpoints(&run_dir), vec![2, 4]);

    // config.toml: an unsafe key is refused by name, a safe one honoured and recorded.
    let config_path = run_dir.join("config.toml");
    let original = std::fs::read_to_string(&config_path).expect("config.toml");
    std::fs::write(
        &config_path,
        original.replacen("batch_size = 8", "batch_size = 16", 1),
    )
    .expect("edit");
    let o = run(resume(p, "run").args(["--steps", "6"]));
    assert_one_clean_error(&o, "`batch_size` (8 -> 16)");
    let lr = original
        .lines()
        .find(|l| l.starts_with("lr = "))
        .expect("lr line")
        .to_string();
    std::fs::write(&config_path, original.replacen(&lr, "lr = 0.001", 1)).expect("edit");
    let o = run(resume(p, "run").args(["--steps", "6"]));
    assert_ok(&o);
    assert!(
        stderr(&o).contains("`optimizer.lr` = 0.001"),
        "{}",
        stderr(&o)
    );
    let newest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json_of(&run_dir, 6)).expect("json")).expect("json");
    assert_eq!(newest["config"]["optimizer"]["lr"], 0.001);
    assert_eq!(newest["config"]["steps"], 6);
}

/// Item 4: `--lr 1e30` with no warm-up diverges at step 2. Without a checkpoint the error says
/// there is none (never "step 0 is kept"); with one it names it, and its advice — resume with a
/// lower --lr — runs; --grad-clip and --warmup-steps are accepted on resume too, and recorded.
#[test]
fn item4_the_nan_stop_says_only_what_is_true_and_its_advice_can_be_followed() {
    let _row = common::AttackRow("NaN stop message and its advice (--lr 1e30)");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    std::fs::write(p.join("it.toml"), "warmup_steps = 0\n").expect("config");
    let train = |out: &str, extra: &[&str]| {
        let mut c = ddpm(p);
        c.args([
            "train",
            "--quiet",
            "--config",
            "it.toml",
            "--model",
            "mnist-small",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--steps",
            "30",
            "--lr",
            "1e30",
            "--out",
            out,
        ])
        .args(extra);
        run(&mut c)
    };
    let o = train("none", &[]);
    assert_one_clean_error(&o, "no checkpoint had been written yet");
    let line = error_line(&o);
    assert!(
        !line.contains("step 0") && !line.contains("clipping"),
        "{line}"
    );
    assert!(
        line.contains("start the run again with a lower learning rate"),
        "{line}"
    );
    assert!(checkpoints(&p.join("none")).is_empty());

    // A checkpoint right before the divergence holds the weights that diverge: resuming it
    // would replay the stop, so the error says so and advises a new run instead.
    let o = train("one", &["--checkpoint-every", "1"]);
    let line = error_line(&o);
    for needle in [
        "the newest checkpoint, step 1, is kept",
        "stops again whatever the learning rate",
        "start a new run (another --out) with a lower learning rate",
    ] {
        assert!(line.contains(needle), "`{needle}` not in: {line}");
    }
    // --lr, --grad-clip and --warmup-steps are accepted on resume, and recorded.
    let o = run(resume(p, "one").args([
        "--lr",
        "0.001",
        "--steps",
        "2",
        "--grad-clip",
        "0.5",
        "--warmup-steps",
        "10",
    ]));
    if !o.status.success() {
        assert_one_clean_error(&o, "became");
    }
    let history = std::fs::read_to_string(p.join("one/history.jsonl")).expect("history");
    for key in ["optimizer.lr", "grad_clip", "warmup_steps", "steps"] {
        assert!(
            history.contains(&format!(r#""key":"{key}""#)),
            "{key}: {history}"
        );
    }
    let config = std::fs::read_to_string(p.join("one/config.toml")).expect("config.toml");
    assert!(
        config.contains("grad_clip = 0.5") && config.contains("warmup_steps = 10"),
        "{config}"
    );
}

/// Two runs of the same configuration write byte-identical checkpoint files (the safetensors
/// metadata keys are sorted, the run id follows the config).
#[test]
fn identical_states_give_byte_identical_checkpoint_files() {
    let _row = common::AttackRow("identical states, byte-identical checkpoints");
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    let cfg = tiny(p, 2, 2, 3);
    assert_ok(&run(&mut train_new(p, "a", &cfg)));
    assert_ok(&run(&mut train_new(p, "b", &cfg)));
    for name in ["ckpt-00000002.json", "ckpt-00000002.safetensors"] {
        let read = |run: &str| std::fs::read(p.join(run).join("checkpoints").join(name));
        assert!(
            read("a").expect("a") == read("b").expect("b"),
            "{name} differs between identical runs"
        );
    }
}
