//! Every diffusers beta schedule against the betas diffusers computed
//! (tests/fixtures/diffusers_betas.json, written by bench/pytorch/diffusers_fixtures.py from the
//! same scheduler configs), and our named schedules where one reproduces them.

use candle_core::{DType, Device};
use ddpm_schedule::diffusers::DiffusersScheduler;
use ddpm_schedule::{BetaSchedule, ScheduleConfig};
use serde_json::Value;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn cases() -> R<Vec<Value>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/diffusers_betas.json"
    );
    let root: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(root["cases"].as_array().ok_or("no cases")?.clone())
}

fn floats(v: &Value) -> R<Vec<f64>> {
    v.as_array()
        .ok_or("not a list")?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| "not a number".into()))
        .collect()
}

/// Our f64 values against diffusers' f32 ones: f32 rounding of the result (6e-8 relative) plus
/// the rounding of diffusers' f32 arithmetic on the way (linspace's `start + i * step` in f32
/// is off by up to a few ulps of `end`).
fn assert_close(ours: &[f64], theirs: &[f64], abs: f64, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let tol = abs + 2e-7 * b.abs();
        assert!((a - b).abs() <= tol, "{what}[{i}]: ours {a}, diffusers {b}");
    }
}

#[test]
fn every_beta_schedule_gives_the_betas_diffusers_computes() -> R<()> {
    let cases = cases()?;
    let names: Vec<&str> = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "linear",
            "scaled_linear",
            "squaredcos_cap_v2",
            "squaredcos_cap_v2_short",
            "sigmoid",
            "laplace",
            "trained_betas"
        ]
    );
    for case in &cases {
        let name = case["name"].as_str().ok_or("name")?;
        let s = DiffusersScheduler::from_json(&case["config"].to_string())?;
        let theirs = floats(&case["betas"])?;
        // Absolute slack: a few f32 ulps of the largest beta.
        let top = theirs.iter().cloned().fold(0.0, f64::max);
        assert_close(&s.betas, &theirs, 4.0 * f32::EPSILON as f64 * top, name);

        // The named schedule, where there is one, gives the same betas.
        let want_named = match name {
            "linear" => Some("linear"),
            "scaled_linear" => Some("quadratic"),
            "squaredcos_cap_v2" | "squaredcos_cap_v2_short" => Some("cosine"),
            "sigmoid" => Some("sigmoid"),
            _ => None,
        };
        assert_eq!(
            s.named.map(|c| c.beta_schedule.name()),
            want_named,
            "{name}"
        );
        if let Some(named) = s.named {
            assert_close(
                &named.betas()?,
                &theirs,
                4.0 * f32::EPSILON as f64 * top,
                name,
            );
        }

        if let Some(abar) = case.get("alphas_cumprod") {
            let schedule = s.schedule(&Device::Cpu, DType::F64)?;
            // diffusers' cumulative product runs in f32: its error grows with t.
            let n = theirs.len() as f64;
            assert_close(
                schedule.alphas_cumprod().values(),
                &floats(abar)?,
                n * f32::EPSILON as f64,
                &format!("{name} alphas_cumprod"),
            );
        }
    }
    Ok(())
}

#[test]
fn squaredcos_cap_v2_is_not_our_default_cosine() -> R<()> {
    let cases = cases()?;
    let short = cases
        .iter()
        .find(|c| c["name"] == "squaredcos_cap_v2_short")
        .ok_or("case")?;
    let theirs = floats(&short["betas"])?;
    // At 20 steps the last beta reaches diffusers' cap of 0.999 ...
    assert!((theirs[19] - 0.999).abs() < 1e-6, "{}", theirs[19]);
    // ... where our default cosine caps at 0.9999.
    let ours = ScheduleConfig::cosine(20).betas()?;
    assert!(ours[19] > 0.9995, "{}", ours[19]);
    let s = DiffusersScheduler::from_json(&short["config"].to_string())?;
    assert!(matches!(
        s.named.map(|c| c.beta_schedule),
        Some(BetaSchedule::Cosine { max_beta, .. }) if max_beta == 0.999
    ));
    Ok(())
}

#[test]
fn a_ddim_sampler_over_given_timesteps() -> R<()> {
    use ddpm_schedule::{DdimOptions, DdimSampler, Schedule, ScheduleError};
    let schedule = Schedule::new(&ScheduleConfig::default(), &Device::Cpu)?;
    // Over the timesteps `new` picks, the same sampler.
    let ours = DdimSampler::new(
        &schedule,
        DdimOptions {
            steps: Some(10),
            ..DdimOptions::default()
        },
    )?;
    let same = DdimSampler::with_timesteps(&schedule, ours.timesteps(), DdimOptions::default())?;
    for i in 0..10 {
        assert_eq!(
            same.affine_step(i, ddpm_schedule::Objective::Eps)?,
            ours.affine_step(i, ddpm_schedule::Objective::Eps)?
        );
    }
    // diffusers' leading timesteps: each step goes to the next one, the last to x_0.
    let s = DiffusersScheduler::from_json("{}")?;
    let ts = s.inference_timesteps(10)?;
    let sampler = DdimSampler::with_timesteps(&schedule, &ts, DdimOptions::default())?;
    assert_eq!(sampler.timesteps(), ts.as_slice());
    assert_eq!(sampler.prev_timestep(0), Some(800));
    assert_eq!(sampler.prev_timestep(9), None);
    for bad in [&[][..], &[1000, 5][..], &[5, 5][..], &[3, 7][..]] {
        assert!(
            matches!(
                DdimSampler::with_timesteps(&schedule, bad, DdimOptions::default()),
                Err(ScheduleError::InvalidSteps { .. }
                    | ScheduleError::InvalidParameter {
                        field: "timesteps",
                        ..
                    })
            ),
            "{bad:?}"
        );
    }
    Ok(())
}
