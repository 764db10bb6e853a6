//! `ddpm forward`: the forward-process figure (rows of images, columns of timesteps).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use ddpm_data::{image_io, DataConfig, Dataset, DatasetSpec, Split};
use ddpm_schedule::{BetaSchedule, Schedule, ScheduleConfig};
use rand::SeedableRng;

/// Arguments of `ddpm forward`.
#[derive(Args)]
pub struct ForwardArgs {
    /// mnist, fashion-mnist, cifar10, flowers or folder:PATH.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Comma-separated timesteps (columns).
    #[arg(long, default_value = "0,10,50,100,200,400,600,800,999")]
    timesteps: String,
    /// Images (rows).
    #[arg(long, default_value_t = 4)]
    num: usize,
    /// Beta schedule (ddpm_schedule::BetaSchedule::NAMES): linear, scaled-linear, cosine,
    /// quadratic, sigmoid.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Diffusion steps T.
    #[arg(long = "total-steps", default_value_t = 1000)]
    total_steps: usize,
    /// Image size (default: the data set's).
    #[arg(long)]
    image_size: Option<usize>,
    /// Data root.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG.
    #[arg(long, default_value = "forward.png")]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let spec: DatasetSpec = a
        .dataset
        .parse()
        .with_context(|| format!("--dataset {}", a.dataset))?;
    let ts: Vec<usize> = a
        .timesteps
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("--timesteps: `{s}` is not a number"))
        })
        .collect::<Result<_>>()?;
    if a.total_steps == 0 {
        anyhow::bail!("--total-steps must be at least 1 (the schedule's number of timesteps T)");
    }
    if ts.is_empty() || a.num == 0 {
        anyhow::bail!("--timesteps and --num must not be empty");
    }
    if let Some(t) = ts.iter().find(|&&t| t >= a.total_steps) {
        anyhow::bail!("--timesteps: {t} is out of range for T = {}", a.total_steps);
    }
    crate::require_extension(&a.out, "--out", "png")?;
    crate::check_output_file(&a.out, "--out")?;
    let beta_schedule: BetaSchedule = crate::beta_schedule(&a.schedule)?;
    let device = ddpm_train::parse_device(&a.device)?;
    let schedule = Schedule::new(
        &ScheduleConfig {
            timesteps: a.total_steps,
            beta_schedule,
        },
        &device,
    )?;
    let cfg = DataConfig {
        root: a.data_dir.clone(),
        image_size: a.image_size,
        ..DataConfig::default()
    };
    let probe = ddpm_train::TrainConfig {
        dataset: spec.clone(),
        data: cfg.clone(),
        ..Default::default()
    };
    if let DatasetSpec::Folder(dir) = &spec {
        if !dir.is_dir() {
            anyhow::bail!(
                "--dataset {}: no such folder ({}): give a folder of images",
                a.dataset,
                std::path::absolute(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
            );
        }
    }
    crate::train::ensure_data(&probe, false)?;
    check_memory(&probe, a.num, ts.len())?;
    // `ensure_data` fetched the set or said how: what fails here is the data themselves.
    let ds = Dataset::open_first(&spec, &cfg, Split::Train, a.num)
        .with_context(|| format!("opening {spec} in {}", a.data_dir.display()))?;
    let n = a.num.min(ds.len());
    if n < a.num {
        tracing::warn!(
            "--num {}: the training split has only {n} images, so the figure has {n} rows",
            a.num
        );
    }
    let x0 = Tensor::stack(
        &(0..n)
            .map(|i| ds.image_tensor(i))
            .collect::<ddpm_data::Result<Vec<_>>>()?,
        0,
    )?
    .to_device(&device)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let noise = ddpm_train::sample::gaussian(&mut rng, x0.dims(), &device)?;
    // Column-major tiles: row i is image i, column j is timestep j.
    let mut tiles = Vec::with_capacity(n * ts.len());
    let cols: Vec<Tensor> = ts
        .iter()
        .map(|&t| {
            let tt = Tensor::from_vec(vec![t as u32; n], n, &device)?;
            Ok(schedule
                .q_sample(&x0, &tt, &noise)?
                .clamp(-1f32, 1f32)?
                .to_device(&Device::Cpu)?)
        })
        .collect::<Result<_>>()?;
    for i in 0..n {
        for col in &cols {
            tiles.push(col.get(i)?);
        }
    }
    let grid = Tensor::stack(&tiles, 0)?;
    image_io::save_image_grid(&grid, ts.len(), &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    tracing::info!(path = %a.out.display(), rows = n, columns = ts.len(), "forward-process figure written");
    Ok(())
}

/// Refuses a figure whose decoded images (the first `--num` of the training split, at
/// `--image-size`) and tiles cannot fit in the available memory, before the decoding runs out
/// of it.
fn check_memory(probe: &ddpm_train::TrainConfig, num: usize, columns: usize) -> Result<()> {
    use ddpm_train::memory::{estimate, human_bytes};
    let Some(available) = crate::train::available_memory() else {
        return Ok(());
    };
    let e = estimate(probe);
    let tile = (e.channels as u64).saturating_mul((e.image_size as u64).saturating_pow(2));
    let rows = num.min(e.images.unwrap_or(num)) as u64;
    // The decoded images in u8, then each tile in f32, held about four times over (images,
    // noise, noised columns, the grid).
    let decoded = tile.saturating_mul(rows);
    let tiles = tile
        .saturating_mul(rows)
        .saturating_mul(columns as u64 + 2)
        .saturating_mul(4 * 4);
    let need = decoded.saturating_add(tiles);
    if need <= available {
        return Ok(());
    }
    anyhow::bail!(
        "this figure needs at least {} of memory but {} is available: its {} images of {}x{} \
         in {} columns; lower --image-size (now {}) or --num",
        human_bytes(need),
        human_bytes(available),
        rows,
        e.image_size,
        e.image_size,
        columns,
        e.image_size,
    )
}
