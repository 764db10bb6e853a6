//! Shuffled, augmented batches as candle tensors, reproducible from a seed and resumable.
//!
//! The order of epoch `e` is a pure function of `(seed, e)` ([`epoch_permutation`]) and the flip
//! of the sample at position `p` of epoch `e` a pure function of `(seed, e, p)` ([`flip_decisions`]),
//! both drawn from ChaCha8 streams. So a [`LoaderPosition`] saved with a checkpoint is all that is
//! needed to resume the exact batch sequence with [`Loader::seek`], whatever the number of worker
//! threads.
//!
//! Batches are assembled on worker threads from the images cached in the [`Dataset`] and handed
//! over through bounded channels (`prefetch` batches per worker), in order.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::transform;

/// The batches each worker prepares ahead by default.
pub const DEFAULT_PREFETCH: usize = 2;

/// The most loader worker threads a [`Loader`] starts: batches are assembled from memory, so a
/// few workers keep any model busy, and thousands of threads exhaust the process's memory maps
/// (a thread that cannot set up its stack aborts the process).
pub const MAX_WORKERS: usize = 64;

const SHUFFLE_DOMAIN: u64 = 0x5348_5546_464c_4531; // "SHUFFLE1"
const FLIP_DOMAIN: u64 = 0x464c_4950_5f5f_5f31; // "FLIP___1"

/// Where a loader is in its stream of batches: the epoch and the number of samples of that epoch
/// already handed out. Save it with a checkpoint and pass it to [`Loader::seek`] to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct LoaderPosition {
    /// The epoch, from 0.
    pub epoch: u64,
    /// The position within the epoch's shuffled order of the next sample to hand out.
    pub index: usize,
}

/// One batch of images and labels.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `f32` images in [-1, 1], shape (b, c, h, w), on the CPU.
    pub images: Tensor,
    /// `u32` class labels, shape (b,), on the CPU.
    pub labels: Tensor,
    /// The indices of the images in the data set.
    pub indices: Vec<usize>,
    /// The epoch the batch belongs to.
    pub epoch: u64,
    /// The position of its first sample within the epoch (of the global batch, when the loader
    /// is sharded).
    pub start: usize,
}

/// The order in which epoch `epoch` visits `n` samples: a pure function of `(seed, epoch, n)`.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut stream_rng(seed, SHUFFLE_DOMAIN, epoch));
    order
}

/// Whether the samples at positions `start..start + len` of epoch `epoch` are flipped: each a
/// pure function of `(seed, epoch, position)` (one ChaCha8 word per position).
pub fn flip_decisions(seed: u64, epoch: u64, start: usize, len: usize) -> Vec<bool> {
    let mut rng = stream_rng(seed, FLIP_DOMAIN, epoch);
    rng.set_word_pos(start as u128);
    (0..len).map(|_| rng.next_u32() & 1 == 1).collect()
}

fn stream_rng(seed: u64, domain: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&domain.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(epoch);
    rng
}

/// What determines the batch sequence.
#[derive(Debug, Clone, Copy)]
struct Plan {
    n: usize,
    batch_size: usize,
    seed: u64,
    drop_last: bool,
    flip: bool,
    /// `(rank, world)`: this process takes the positions `rank, rank + world, ...` of each batch
    /// (`(0, 1)`: all of them).
    shard: (usize, usize),
}

impl Plan {
    /// Moves a position at the end of an epoch (or before a last partial batch that is dropped)
    /// to the start of the next epoch.
    fn normalize(&self, p: LoaderPosition) -> LoaderPosition {
        let min = if self.drop_last { self.batch_size } else { 1 };
        if self.n.saturating_sub(p.index) < min {
            LoaderPosition {
                epoch: p.epoch + 1,
                index: 0,
            }
        } else {
            p
        }
    }

    fn batch_len(&self, p: LoaderPosition) -> usize {
        self.batch_size.min(self.n - p.index)
    }

    /// The position after the batch starting at `p` (which must be normalized).
    fn advance(&self, p: LoaderPosition) -> LoaderPosition {
        self.normalize(LoaderPosition {
            epoch: p.epoch,
            index: p.index + self.batch_len(p),
        })
    }

    fn build(
        &self,
        ds: &Dataset,
        p: LoaderPosition,
        order: &mut Option<(u64, Vec<usize>)>,
    ) -> Result<Batch> {
        if order.as_ref().is_none_or(|(e, _)| *e != p.epoch) {
            *order = Some((p.epoch, epoch_permutation(self.seed, p.epoch, self.n)));
        }
        let perm = &order.as_ref().expect("set above").1;
        let global_len = self.batch_len(p);
        let mut indices = perm[p.index..p.index + global_len].to_vec();
        let mut flips = if self.flip {
            flip_decisions(self.seed, p.epoch, p.index, global_len)
        } else {
            vec![false; global_len]
        };
        let (rank, world) = self.shard;
        if world > 1 {
            // The epoch positions `rank, rank + world, ...` of the global batch, with the flips
            // drawn for those positions: the ranks together make the single-process batch.
            let mine = |k: &usize| (p.index + k) % world == rank;
            indices = (0..global_len).filter(mine).map(|k| indices[k]).collect();
            flips = (0..global_len).filter(mine).map(|k| flips[k]).collect();
        }
        let len = indices.len();
        let image_len = ds.image_len();
        let mut data = vec![0f32; len * image_len];
        for ((out, &i), &flip) in data.chunks_exact_mut(image_len).zip(&indices).zip(&flips) {
            transform::write_signed_chw(ds.image_u8(i)?, ds.image_size(), flip, out);
        }
        let labels: Vec<u32> = indices.iter().map(|&i| ds.labels()[i]).collect();
        let (c, s) = (ds.channels(), ds.image_size());
        Ok(Batch {
            images: Tensor::from_vec(data, (len, c, s, s), &Device::Cpu)?,
            labels: Tensor::from_vec(labels, len, &Device::Cpu)?,
            indices,
            epoch: p.epoch,
            start: p.index,
        })
    }
}

/// Worker threads producing batches round-robin: worker `w` makes batches `w, w + W, ...`.
struct Pipeline {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    turn: usize,
}

impl Pipeline {
    fn start(
        plan: Plan,
        ds: Arc<Dataset>,
        from: LoaderPosition,
        workers: usize,
        prefetch: usize,
    ) -> Result<Self> {
        let mut pipeline = Pipeline {
            receivers: Vec::with_capacity(workers),
            handles: Vec::with_capacity(workers),
            turn: 0,
        };
        for w in 0..workers {
            let (tx, rx) = sync_channel(prefetch);
            let ds = Arc::clone(&ds);
            let handle = std::thread::Builder::new()
                .name(format!("ddpm-loader-{w}"))
                .spawn(move || {
                    let mut pos = from;
                    for _ in 0..w {
                        pos = plan.advance(pos);
                    }
                    let mut order = None;
                    loop {
                        let batch = plan.build(&ds, pos, &mut order);
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                        for _ in 0..workers {
                            pos = plan.advance(pos);
                        }
                    }
                })
                .map_err(DataError::Spawn)?;
            pipeline.receivers.push(rx);
            pipeline.handles.push(handle);
        }
        Ok(pipeline)
    }

    fn next(&mut self) -> Result<Batch> {
        let rx = &self.receivers[self.turn % self.receivers.len()];
        self.turn += 1;
        rx.recv().map_err(|_| DataError::WorkerDied)?
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Closing the channels makes each worker's next send fail, so it returns.
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Hands out shuffled, augmented batches of a [`Dataset`], forever, epoch after epoch.
pub struct Loader {
    dataset: Arc<Dataset>,
    plan: Plan,
    workers: usize,
    prefetch: usize,
    position: LoaderPosition,
    order: Option<(u64, Vec<usize>)>,
    pipeline: Option<Pipeline>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dataset", &self.dataset.name())
            .field("batch_size", &self.plan.batch_size)
            .field("seed", &self.plan.seed)
            .field("drop_last", &self.plan.drop_last)
            .field("workers", &self.workers)
            .field("position", &self.position)
            .finish()
    }
}

impl Loader {
    /// A loader over `dataset` starting at epoch 0.
    ///
    /// `drop_last` leaves out each epoch's last partial batch; `workers` threads assemble batches
    /// ahead of time (0: in the calling thread). Flips follow [`Dataset::flip`].
    pub fn new(
        dataset: impl Into<Arc<Dataset>>,
        batch_size: usize,
        seed: u64,
        drop_last: bool,
        workers: usize,
    ) -> Result<Self> {
        let dataset = dataset.into();
        let n = dataset.len();
        if batch_size == 0 {
            return Err(DataError::Config("batch size 0".to_string()));
        }
        if workers > MAX_WORKERS {
            return Err(DataError::Config(format!(
                "{workers} loader workers: the most is {MAX_WORKERS} (0 assembles batches in the \
                 calling thread; 1 to 4 are plenty)"
            )));
        }
        if n == 0 {
            return Err(DataError::Config(format!(
                "data set {} is empty",
                dataset.name()
            )));
        }
        if drop_last && batch_size > n {
            return Err(DataError::Config(format!(
                "batch size {batch_size} with drop_last exceeds the {n} images of {}",
                dataset.name()
            )));
        }
        let plan = Plan {
            n,
            batch_size,
            seed,
            drop_last,
            flip: dataset.flip(),
            shard: (0, 1),
        };
        Ok(Loader {
            dataset,
            plan,
            workers,
            prefetch: DEFAULT_PREFETCH,
            position: LoaderPosition::default(),
            order: None,
            pipeline: None,
        })
    }

    /// Makes this loader hand out only rank `rank`'s share of each batch of `world` data-parallel
    /// processes: the epoch positions `rank, rank + world, ...`, so `batch_size / world` images.
    /// The position (and so a checkpoint's loader state) stays the global batch's. `batch_size`
    /// must divide by `world`.
    pub fn with_shard(mut self, rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(DataError::Config(format!(
                "data shard {rank} of {world}: the rank must be below the world size"
            )));
        }
        if !self.plan.batch_size.is_multiple_of(world) {
            return Err(DataError::Config(format!(
                "batch size {} does not divide among {world} data-parallel ranks",
                self.plan.batch_size
            )));
        }
        self.pipeline = None;
        self.plan.shard = (rank, world);
        Ok(self)
    }

    /// Sets how many batches each worker prepares ahead (at least 1).
    pub fn with_prefetch(mut self, batches_per_worker: usize) -> Self {
        self.pipeline = None;
        self.prefetch = batches_per_worker.max(1);
        self
    }

    /// The data set.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.plan.batch_size
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.plan.seed
    }

    /// The number of batches in each epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.plan.n, self.plan.batch_size);
        if self.plan.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The next batch; after the last batch of an epoch comes the first of the next epoch.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let batch = if self.workers == 0 {
            self.plan
                .build(&self.dataset, self.position, &mut self.order)?
        } else {
            if self.pipeline.is_none() {
                self.pipeline = Some(Pipeline::start(
                    self.plan,
                    Arc::clone(&self.dataset),
                    self.position,
                    self.workers,
                    self.prefetch,
                )?);
            }
            let pipeline = self.pipeline.as_mut().expect("started above");
            match pipeline.next() {
                Ok(batch) => batch,
                Err(e) => {
                    self.pipeline = None;
                    return Err(e);
                }
            }
        };
        debug_assert_eq!(
            (batch.epoch, batch.start),
            (self.position.epoch, self.position.index)
        );
        self.position = self.plan.advance(self.position);
        Ok(batch)
    }

    /// The position of the next batch: save it to resume exactly with [`Loader::seek`].
    pub fn position(&self) -> LoaderPosition {
        self.position
    }

    /// Continues from a saved position: the next batch is the one that followed it.
    ///
    /// An index past the data set's length is an error; an index at the end of an epoch moves
    /// to the start of the next.
    pub fn seek(&mut self, position: LoaderPosition) -> Result<()> {
        if position.index > self.plan.n {
            return Err(DataError::Config(format!(
                "loader position index {} is past the {} images of {}",
                position.index,
                self.plan.n,
                self.dataset.name()
            )));
        }
        self.pipeline = None;
        self.position = self.plan.normalize(position);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` 2x2 images whose first two bytes encode their index.
    fn indexed(n: usize, channels: usize) -> Dataset {
        let mut pixels = Vec::new();
        for i in 0..n {
            let mut img = vec![0u8; channels * 4];
            img[0] = (i >> 8) as u8;
            img[1] = (i & 0xff) as u8;
            pixels.extend(img);
        }
        let labels = (0..n).map(|i| (i % 3) as u32).collect();
        Dataset::from_u8(
            channels,
            2,
            pixels,
            labels,
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap()
    }

    fn take(loader: &mut Loader, k: usize) -> Vec<(Vec<usize>, Vec<f32>, Vec<u32>)> {
        (0..k)
            .map(|_| {
                let b = loader.next_batch().unwrap();
                (
                    b.indices,
                    b.images.flatten_all().unwrap().to_vec1().unwrap(),
                    b.labels.to_vec1().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn more_workers_than_the_maximum_are_refused_not_spawned() {
        let err = Loader::new(indexed(8, 1), 2, 0, true, MAX_WORKERS + 1).unwrap_err();
        assert!(err.to_string().contains(&MAX_WORKERS.to_string()), "{err}");
        let mut l = Loader::new(indexed(8, 1), 2, 0, true, MAX_WORKERS).unwrap();
        assert_eq!(l.next_batch().unwrap().indices.len(), 2);
    }

    #[test]
    fn permutations_are_pure_and_differ_between_epochs_and_seeds() {
        let p = epoch_permutation(7, 3, 100);
        assert_eq!(p, epoch_permutation(7, 3, 100));
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(p, epoch_permutation(7, 4, 100));
        assert_ne!(p, epoch_permutation(8, 3, 100));
        // Flips are random access: a window equals the same slice of a longer run.
        let all = flip_decisions(7, 3, 0, 64);
        assert_eq!(flip_decisions(7, 3, 17, 20), all[17..37]);
        let ones = flip_decisions(1, 0, 0, 4000).iter().filter(|&&f| f).count();
        assert!((1800..2200).contains(&ones), "{ones} flips of 4000");
    }

    #[test]
    fn each_epoch_visits_every_image_once_with_the_right_labels() {
        let ds = indexed(10, 1);
        let mut loader = Loader::new(ds, 4, 1, false, 0).unwrap();
        assert_eq!(loader.batches_per_epoch(), 3);
        let batches = take(&mut loader, 3);
        assert_eq!(
            batches.iter().map(|b| b.0.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.0.clone()).collect();
        assert_eq!(seen, epoch_permutation(1, 0, 10));
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        for (indices, images, labels) in &batches {
            for (k, &i) in indices.iter().enumerate() {
                assert_eq!(labels[k], (i % 3) as u32);
                // The image's second byte is its index, mapped to [-1, 1].
                assert_eq!(images[k * 4 + 1], transform::u8_to_signed(i as u8));
            }
        }
        assert_eq!(loader.position(), LoaderPosition { epoch: 1, index: 0 });
    }

    #[test]
    fn drop_last_skips_the_partial_batch() {
        let mut loader = Loader::new(indexed(10, 1), 4, 1, true, 0).unwrap();
        assert_eq!(loader.batches_per_epoch(), 2);
        let b = take(&mut loader, 3);
        assert!(b.iter().all(|x| x.0.len() == 4));
        assert_eq!(b[2].0, epoch_permutation(1, 1, 10)[..4]);
        assert!(Loader::new(indexed(3, 1), 4, 1, true, 0).is_err());
        assert!(Loader::new(indexed(3, 1), 0, 1, false, 0).is_err());
    }

    #[test]
    fn same_seed_same_batches_for_any_number_of_workers() {
        let ds = Arc::new(indexed(37, 3).with_flip(true));
        let reference = take(
            &mut Loader::new(Arc::clone(&ds), 5, 42, false, 0).unwrap(),
            20,
        );
        for workers in [1, 2, 3] {
            let mut loader = Loader::new(Arc::clone(&ds), 5, 42, false, workers).unwrap();
            assert_eq!(take(&mut loader, 20), reference, "{workers} workers");
        }
        let other = take(
            &mut Loader::new(Arc::clone(&ds), 5, 43, false, 2).unwrap(),
            20,
        );
        assert_ne!(other, reference);
    }

    #[test]
    fn seek_resumes_exactly_mid_epoch_and_across_epochs() {
        let ds = Arc::new(indexed(23, 1).with_flip(true));
        let mut a = Loader::new(Arc::clone(&ds), 4, 9, false, 2).unwrap();
        let before = take(&mut a, 8); // past the first epoch of 6 batches
        let saved = a.position();
        assert_eq!(saved, LoaderPosition { epoch: 1, index: 8 });
        let after = take(&mut a, 10);
        // A fresh loader (different worker count) seeking to the saved position continues alike.
        let mut b = Loader::new(Arc::clone(&ds), 4, 9, false, 1).unwrap();
        b.seek(saved).unwrap();
        assert_eq!(take(&mut b, 10), after);
        // Seeking back replays the start.
        b.seek(LoaderPosition::default()).unwrap();
        assert_eq!(take(&mut b, 8), before);
        // The end of an epoch is the start of the next; past the end is an error.
        b.seek(LoaderPosition {
            epoch: 2,
            index: 23,
        })
        .unwrap();
        assert_eq!(b.position(), LoaderPosition { epoch: 3, index: 0 });
        assert!(b
            .seek(LoaderPosition {
                epoch: 2,
                index: 24
            })
            .is_err());
    }

    #[test]
    fn flips_mirror_images_as_decided() {
        let ds = Arc::new(indexed(64, 1).with_flip(true));
        let mut loader = Loader::new(Arc::clone(&ds), 64, 5, false, 0).unwrap();
        let b = loader.next_batch().unwrap();
        let images: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
        let flips = flip_decisions(5, 0, 0, 64);
        assert!(flips.iter().any(|&f| f) && flips.iter().any(|&f| !f));
        for (k, &i) in b.indices.iter().enumerate() {
            let mut expected = ds.image(i).unwrap();
            if flips[k] {
                transform::hflip_chw(&mut expected, 2);
            }
            assert_eq!(&images[k * 4..k * 4 + 4], expected.as_slice());
        }
        // Without flips, batches hold the images as they are.
        let plain = Arc::new(indexed(8, 1));
        let b = Loader::new(Arc::clone(&plain), 8, 5, false, 0)
            .unwrap()
            .next_batch()
            .unwrap();
        let images: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(
                &images[k * 4..k * 4 + 4],
                plain.image(i).unwrap().as_slice()
            );
        }
    }

    #[test]
    fn shards_together_make_the_single_process_batches() {
        let ds = Arc::new(indexed(37, 1).with_flip(true));
        // 37 images, batches of 6 with drop_last: 6 batches per epoch, so 8 batches cross into
        // the second epoch.
        let whole = take(&mut Loader::new(Arc::clone(&ds), 6, 3, true, 0).unwrap(), 8);
        for world in [1, 2, 3, 6] {
            let shards: Vec<_> = (0..world)
                .map(|r| {
                    let mut l = Loader::new(Arc::clone(&ds), 6, 3, true, 2)
                        .unwrap()
                        .with_shard(r, world)
                        .unwrap();
                    let b = take(&mut l, 8);
                    assert_eq!(
                        l.position(),
                        LoaderPosition {
                            epoch: 1,
                            index: 12
                        }
                    );
                    b
                })
                .collect();
            for (step, (indices, images, labels)) in whole.iter().enumerate() {
                for (k, &i) in indices.iter().enumerate() {
                    // Position k of the global batch is rank k % world's entry k / world.
                    let (r, j) = (k % world, k / world);
                    let (si, sx, sl) = &shards[r][step];
                    assert_eq!(si.len(), 6 / world);
                    assert_eq!(si[j], i, "world {world} step {step} position {k}");
                    assert_eq!(sl[j], labels[k]);
                    // Same pixels, flips included.
                    assert_eq!(sx[j * 4..j * 4 + 4], images[k * 4..k * 4 + 4]);
                }
            }
        }
        let loader = || Loader::new(Arc::clone(&ds), 6, 3, true, 0).unwrap();
        assert!(loader().with_shard(0, 4).is_err());
        assert!(loader().with_shard(2, 2).is_err());
        assert!(loader().with_shard(0, 0).is_err());
    }

    #[test]
    fn batches_have_the_documented_shapes_and_types() {
        let mut loader = Loader::new(indexed(6, 3), 4, 0, false, 1).unwrap();
        let b = loader.next_batch().unwrap();
        assert_eq!(b.images.dims(), &[4, 3, 2, 2]);
        assert_eq!(b.images.dtype(), candle_core::DType::F32);
        assert_eq!(b.labels.dims(), &[4]);
        assert_eq!(b.labels.dtype(), candle_core::DType::U32);
        let json = serde_json::to_string(&loader.position()).unwrap();
        assert_eq!(json, r#"{"epoch":0,"index":4}"#);
        drop(loader); // joins its workers
    }
}
