//! Loader throughput on Flowers (training split: 3,887 images of the 4,317-image set, 3,303 of
//! TensorFlow's) at 32x32 with random flips, batch size 64: cold (open the data set, decoding and
//! resizing every JPEG, then one epoch of batches) and warm (batches from the images cached in
//! memory).
//!
//! Run with `cargo bench -p ddpm-data --bench loader` after `cargo xtask fetch-data flowers`
//! (the data directory is `data/` of the workspace, or `$DDPM_REAL_DATA`); the numbers are
//! batches per second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ddpm_data::{DataConfig, Dataset, DatasetSpec, Loader, Split};

const BATCH: usize = 64;

fn config() -> DataConfig {
    let root = std::env::var_os("DDPM_REAL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data")));
    assert!(
        root.join("flowers").is_dir(),
        "Flowers expected in {}: run `cargo xtask fetch-data flowers` first",
        root.display()
    );
    DataConfig::with_root(root)
}

fn bench_loader(c: &mut Criterion) {
    let cfg = config();
    let mut group = c.benchmark_group("flowers_32_flip");

    let probe = Dataset::open(&DatasetSpec::Flowers, &cfg, Split::Train).unwrap();
    let epoch_batches = probe.len() / BATCH;
    group.throughput(Throughput::Elements(epoch_batches as u64));
    // About a second per cold iteration: give its 10 samples the time they need.
    group.measurement_time(Duration::from_secs(11));
    group.bench_function("cold_open_and_epoch", |b| {
        b.iter(|| {
            let ds = Dataset::open(&DatasetSpec::Flowers, &cfg, Split::Train).unwrap();
            let mut loader = Loader::new(ds, BATCH, 0, true, 2).unwrap();
            for _ in 0..epoch_batches {
                std::hint::black_box(loader.next_batch().unwrap());
            }
        })
    });

    let ds = Arc::new(probe);
    assert!(ds.flip());
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    for workers in [0, 2] {
        let mut loader = Loader::new(Arc::clone(&ds), BATCH, 0, true, workers).unwrap();
        group.bench_function(format!("warm_batch_workers_{workers}"), |b| {
            b.iter(|| std::hint::black_box(loader.next_batch().unwrap()))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench_loader
}
criterion_main!(benches);
