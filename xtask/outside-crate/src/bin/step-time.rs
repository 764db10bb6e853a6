//! Times training steps (forward + backward) of a preset on stock candle-core, the same loop as
//! ddpm-unet's `step_time` example on the workspace's patched candle-core: running both in
//! alternating processes measures what the patch (crates/vendor/candle-core) buys.
//! `cargo run --release --manifest-path xtask/outside-crate/Cargo.toml --bin step-time --
//! mnist-small 32`.

use ddpm_unet::candle_core::{DType, Device, Tensor};
use ddpm_unet::{DiffusionModel, ModelConfig};

// As the `ddpm` binary and the step_time example.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("mnist-small");
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let cfg = ModelConfig::preset(preset)?;
    let dev = Device::Cpu;
    let model = DiffusionModel::new(&cfg, 0, &dev, DType::F32)?;
    let (c, s) = (cfg.channels(), cfg.image_size());
    let x = Tensor::randn(0f32, 1.0, (batch, c, s, s), &dev)?;
    let t = Tensor::from_vec((0..batch as u32).collect::<Vec<_>>(), batch, &dev)?;
    for i in 0..4 {
        let start = std::time::Instant::now();
        let y = model.forward(&x, &t)?;
        let f = start.elapsed();
        let loss = y.sqr()?.mean_all()?;
        let _g = loss.backward()?;
        println!(
            "{preset} b={batch} iter {i}: forward {:.3}s, forward+backward {:.3}s (stock candle-core)",
            f.as_secs_f64(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
