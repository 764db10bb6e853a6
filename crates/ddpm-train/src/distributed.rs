//! Data-parallel training: one process per GPU, gradients averaged over NCCL
//! (docs/distributed.md).
//!
//! [`World`] is where this process stands among the others, read from the torchrun-style
//! environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); it is always compiled, so that a build
//! without the `nccl` feature refuses a world of several ranks with a message saying how to build
//! one. [`Collective`] holds the NCCL communicator (with the `nccl` feature) and performs the
//! reductions the trainer needs: the mean of the gradients and of the logged loss, and the flags
//! that keep all ranks stopping together. Without a communicator every reduction is the identity,
//! so the single-process path runs exactly as it does without this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use ddpm_data::Loader;

use crate::Result;

/// The environment variable naming the NCCL id file instead of `<run_dir>/.nccl-id` (for ranks
/// on several machines sharing a filesystem).
pub const ID_FILE_VAR: &str = "DDPM_NCCL_ID_FILE";
/// The environment variable giving the seconds ranks other than 0 wait for the id file.
pub const ID_TIMEOUT_VAR: &str = "DDPM_NCCL_ID_TIMEOUT_S";
/// How long ranks other than 0 wait for rank 0's id file by default.
pub const DEFAULT_ID_TIMEOUT: Duration = Duration::from_secs(300);
/// Gradients are packed into buffers of about this many bytes, each all-reduced once.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Errors of data-parallel training.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is not a non-negative integer.
    #[error("environment variable {var}={value:?} is not a non-negative integer")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// Only one of `RANK` and `WORLD_SIZE` is set.
    #[error(
        "{set} is set but {missing} is not: a data-parallel launch sets RANK, WORLD_SIZE and \
         LOCAL_RANK for every process (torchrun does); unset them all for a single process"
    )]
    Partial {
        /// The variable that is set.
        set: &'static str,
        /// The one that is missing.
        missing: &'static str,
    },
    /// `WORLD_SIZE=0`.
    #[error("WORLD_SIZE=0: the world size must be at least 1")]
    EmptyWorld,
    /// `RANK` is not below `WORLD_SIZE`.
    #[error(
        "RANK={rank} is out of range for WORLD_SIZE={size}: ranks go from 0 to WORLD_SIZE - 1"
    )]
    RankOutOfRange {
        /// The rank asked for.
        rank: usize,
        /// The world size.
        size: usize,
    },
    /// The batch does not split evenly among the ranks.
    #[error(
        "batch size {batch_size} (micro-batches of {micro} with grad_accum {grad_accum}) does not \
         divide among {size} data-parallel ranks: choose a batch size whose micro-batch is a \
         multiple of {size}"
    )]
    BatchNotDivisible {
        /// The global batch size.
        batch_size: usize,
        /// The global micro-batch.
        micro: usize,
        /// Micro-batches per optimizer step.
        grad_accum: usize,
        /// The world size.
        size: usize,
    },
    /// Several ranks asked of a build without NCCL.
    #[error(
        "WORLD_SIZE={size}, but this `ddpm` was built without NCCL: build it with `--features \
         nccl` (`cargo xtask build-cuda --nccl`) to train on several GPUs"
    )]
    NoNccl {
        /// The world size asked for.
        size: usize,
    },
    /// Several ranks on a device that is not a CUDA GPU.
    #[error(
        "data-parallel training over {size} ranks needs one CUDA device per rank (--device \
         cuda), not {device}"
    )]
    NeedsCuda {
        /// The world size.
        size: usize,
        /// The device given.
        device: String,
    },
    /// Rank 0's id file did not appear in time.
    #[error(
        "rank {rank} waited {secs} s for the NCCL id file {} that rank 0 writes: is rank 0 \
         running with the same run directory (or the same {ID_FILE_VAR} on a shared \
         filesystem)? {ID_TIMEOUT_VAR} sets the wait",
        path.display()
    )]
    IdTimeout {
        /// This process's rank.
        rank: usize,
        /// The file waited for.
        path: PathBuf,
        /// The seconds waited.
        secs: u64,
    },
    /// The id file cannot be written or read.
    #[error("NCCL id file {}: {reason}", path.display())]
    IdFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// NCCL itself failed.
    #[error("NCCL {what} failed: {reason}")]
    Nccl {
        /// The call.
        what: &'static str,
        /// NCCL's error.
        reason: String,
    },
    /// Rank 0 failed to write a file; the other ranks stop with it.
    #[error("rank 0 failed while {what} (its log has the error): stopping this rank too")]
    LeadFailed {
        /// What rank 0 was doing.
        what: &'static str,
    },
}

/// Where this process stands among the data-parallel processes of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// This process's rank, from 0.
    pub rank: usize,
    /// The number of processes.
    pub size: usize,
    /// The GPU of this process on its machine.
    pub local_rank: usize,
    /// Whether a launcher set the variables (then NCCL is used even for one rank, which must
    /// change nothing).
    pub launched: bool,
    /// Where rank 0 writes the NCCL id (`None`: `<run_dir>/.nccl-id`).
    pub id_file: Option<PathBuf>,
    /// How long other ranks wait for it.
    pub id_timeout: Duration,
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

impl World {
    /// One process: no launcher, no communication.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            launched: false,
            id_file: None,
            id_timeout: DEFAULT_ID_TIMEOUT,
        }
    }

    /// The world from a variable lookup: the launcher's environment variables (`RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, ...), which the `ddpm` binary reads; single when `RANK` and
    /// `WORLD_SIZE` are unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let number = |name: &'static str| -> Result<Option<usize>, DistError> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| DistError::NotANumber {
                        var: name,
                        value: v,
                    }),
            }
        };
        let id_file = var(ID_FILE_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let id_timeout = number(ID_TIMEOUT_VAR)?
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(DEFAULT_ID_TIMEOUT);
        let (rank, size) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (None, None) => {
                return Ok(World {
                    id_file,
                    id_timeout,
                    ..World::single()
                })
            }
            (Some(_), None) => {
                return Err(DistError::Partial {
                    set: "RANK",
                    missing: "WORLD_SIZE",
                })
            }
            (None, Some(_)) => {
                return Err(DistError::Partial {
                    set: "WORLD_SIZE",
                    missing: "RANK",
                })
            }
            (Some(r), Some(s)) => (r, s),
        };
        if size == 0 {
            return Err(DistError::EmptyWorld);
        }
        if rank >= size {
            return Err(DistError::RankOutOfRange { rank, size });
        }
        if size > 1 && !cfg!(feature = "nccl") {
            return Err(DistError::NoNccl { size });
        }
        // A single-machine launcher may leave LOCAL_RANK out: the rank is then the GPU.
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        Ok(World {
            rank,
            size,
            local_rank,
            launched: true,
            id_file,
            id_timeout,
        })
    }

    /// Checks, before any rank starts, that this build and machine can run `size` ranks on one
    /// machine (ranks on `cuda:0` to `cuda:{size - 1}`): NCCL built in for more than one, and that
    /// many CUDA devices. A launcher calls it so that an impossible world is one error, not one
    /// per started process.
    pub fn check_launch(size: usize) -> Result<()> {
        if size > 1 && !cfg!(feature = "nccl") {
            return Err(DistError::NoNccl { size }.into());
        }
        if size > 1 {
            let last = size - 1;
            crate::device::check_ordinal(&format!("cuda:{last}"), last).map_err(|e| {
                crate::TrainError::Config(format!(
                    "{size} ranks need one CUDA device each ({e}): lower --nproc"
                ))
            })?;
        }
        Ok(())
    }

    /// Whether this is rank 0, the one that writes checkpoints, samples, metrics and plots.
    pub fn is_lead(&self) -> bool {
        self.rank == 0
    }

    /// The device this process uses for `spec`: with several ranks a bare `cuda` means
    /// `cuda:$LOCAL_RANK`; anything else is kept.
    pub fn device_spec(&self, spec: &str) -> String {
        if self.size > 1 && spec.trim() == "cuda" {
            format!("cuda:{}", self.local_rank)
        } else {
            spec.to_string()
        }
    }

    /// Checks that each micro-batch of `batch_size / grad_accum` images splits evenly among the
    /// ranks.
    pub fn check_batch(&self, batch_size: usize, grad_accum: usize) -> Result<(), DistError> {
        let micro = batch_size / grad_accum.max(1);
        if micro == 0 || !micro.is_multiple_of(self.size) {
            return Err(DistError::BatchNotDivisible {
                batch_size,
                micro,
                grad_accum,
                size: self.size,
            });
        }
        Ok(())
    }

    /// This rank's loader: its share of each of `loader`'s batches, the epoch positions
    /// `rank, rank + size, ...` (the loader itself for one rank, so that the single-process
    /// path is untouched).
    pub fn shard(&self, loader: Loader) -> Result<Loader> {
        if self.size == 1 {
            return Ok(loader);
        }
        Ok(loader.with_shard(self.rank, self.size)?)
    }

    /// The NCCL id file of a run in `run_dir`.
    pub fn id_path(&self, run_dir: &Path) -> PathBuf {
        self.id_file
            .clone()
            .unwrap_or_else(|| run_dir.join(".nccl-id"))
    }
}

/// The reductions among the ranks of a [`World`]. Without a communicator (one process, or a
/// launched world of one rank on the CPU) each is the identity.
pub struct Collective {
    world: World,
    #[cfg(feature = "nccl")]
    comm: Option<nccl::Reducer>,
}

impl std::fmt::Debug for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collective")
            .field("world", &self.world)
            .field("communicator", &self.has_comm())
            .finish()
    }
}

impl Collective {
    /// A single process: every reduction is the identity.
    pub fn single() -> Self {
        Collective {
            world: World::single(),
            #[cfg(feature = "nccl")]
            comm: None,
        }
    }

    /// Joins the ranks of `world` for the run in `run_dir` on `device`: a launched world on a
    /// CUDA device builds an NCCL communicator (rank 0 writes the id file, the others read it);
    /// otherwise there is nothing to join. Blocks until every rank has joined.
    pub fn connect(world: World, device: &Device, run_dir: &Path) -> Result<Self> {
        if world.size > 1 && !device.is_cuda() {
            return Err(DistError::NeedsCuda {
                size: world.size,
                device: format!("{:?}", device.location()),
            }
            .into());
        }
        #[cfg(feature = "nccl")]
        {
            let comm = if world.launched && device.is_cuda() {
                Some(nccl::Reducer::connect(&world, device, run_dir)?)
            } else {
                None
            };
            Ok(Collective { world, comm })
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = run_dir;
            if world.size > 1 {
                return Err(DistError::NoNccl { size: world.size }.into());
            }
            Ok(Collective { world })
        }
    }

    /// The world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Whether this is rank 0.
    pub fn is_lead(&self) -> bool {
        self.world.is_lead()
    }

    /// Whether reductions go through NCCL (else they are the identity).
    pub fn has_comm(&self) -> bool {
        #[cfg(feature = "nccl")]
        {
            self.comm.is_some()
        }
        #[cfg(not(feature = "nccl"))]
        {
            false
        }
    }

    /// Replaces every gradient with its mean over the ranks: summed with NCCL in buckets of about
    /// [`BUCKET_BYTES`] (in the map's sorted order), then divided by the world size. With one
    /// rank the division is skipped, so the gradients keep their bits.
    pub fn all_reduce_mean(&self, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            comm.all_reduce_mean(grads)?;
        }
        let _ = grads;
        Ok(())
    }

    /// The mean of `value` over the ranks (`value` itself with one rank).
    pub fn mean(&self, value: f64) -> Result<f64> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            return comm.mean(value);
        }
        Ok(value)
    }

    /// Every rank's `local` value (index = rank), `[local]` with one rank: the training RNGs'
    /// word positions, which rank 0 writes into checkpoints.
    pub fn word_positions(&self, local: u128) -> Result<Vec<u128>> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            return comm.word_positions(local);
        }
        Ok(vec![local])
    }

    /// Whether `flag` is set on any rank.
    pub fn any(&self, flag: bool) -> Result<bool> {
        #[cfg(feature = "nccl")]
        if let Some(comm) = &self.comm {
            return comm.any(flag);
        }
        Ok(flag)
    }
}

/// How many f64 values a u128 is carried in through a floating-point all-reduce: chunks of 43 bits
/// (f64 holds integers up to 2^53 exactly, so sums of one non-zero and zeros are exact).
pub const WORD_CHUNKS: usize = 3;
const CHUNK_BITS: u32 = 43;

/// `v` as [`WORD_CHUNKS`] exact f64 chunks, lowest first.
pub fn split_word(v: u128) -> [f64; WORD_CHUNKS] {
    let mask = (1u128 << CHUNK_BITS) - 1;
    std::array::from_fn(|i| ((v >> (CHUNK_BITS * i as u32)) & mask) as f64)
}

/// The u128 of [`split_word`]'s chunks; an error unless each is a whole number in range (a
/// corrupted reduction).
pub fn join_word(chunks: &[f64]) -> Result<u128> {
    let mut v = 0u128;
    for (i, &c) in chunks.iter().enumerate() {
        if !(c >= 0.0 && c < (1u64 << CHUNK_BITS) as f64 && c.fract() == 0.0) {
            return Err(candle_core::Error::Msg(format!(
                "all-reduced RNG position chunk {c} is not a {CHUNK_BITS}-bit integer"
            ))
            .into());
        }
        v |= (c as u128) << (CHUNK_BITS * i as u32);
    }
    Ok(v)
}

/// Buckets of gradient names: consecutive in the sorted order, of one dtype, each of about
/// `bucket_bytes` (a larger tensor makes a bucket of its own).
pub fn buckets(grads: &BTreeMap<String, Tensor>, bucket_bytes: usize) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0usize;
    let mut dtype = None;
    for (name, g) in grads {
        let size = g.elem_count() * g.dtype().size_in_bytes();
        let fits = out.last().is_some_and(|b| !b.is_empty())
            && dtype == Some(g.dtype())
            && bytes + size <= bucket_bytes;
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        dtype = Some(g.dtype());
        if let Some(b) = out.last_mut() {
            b.push(name.clone());
        }
    }
    out
}

/// The bytes of an NCCL unique id (`ncclUniqueId`).
pub type IdBytes = [u8; 128];

/// The id as it is stored in the id file: 128 bytes in hex, then a newline.
fn encode_id(id: &IdBytes) -> String {
    let mut s: String = id.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

fn decode_id(text: &str) -> Option<IdBytes> {
    let text = text.trim();
    if text.len() != 2 * 128 {
        return None;
    }
    let mut id = [0u8; 128];
    for (i, out) in id.iter_mut().enumerate() {
        *out = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Rank 0: writes the NCCL id to `path` atomically (a temporary file beside it, renamed over
/// it), so that other ranks never read half a file.
pub fn write_id_file(path: &Path, id: &IdBytes) -> Result<(), DistError> {
    let bad = |reason: String| DistError::IdFile {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| bad(format!("creating {}: {e}", dir.display())))?;
    }
    ddpm_fs::write_atomic(path, encode_id(id).as_bytes()).map_err(|e| bad(format!("writing: {e}")))
}

/// Ranks other than 0: waits up to `world.id_timeout` for rank 0's id file at `path`, then
/// reads it.
pub fn read_id_file(world: &World, path: &Path) -> Result<IdBytes, DistError> {
    let start = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(path) {
            // The file appears whole (it is renamed into place), so a bad one stays bad.
            Ok(text) => {
                return decode_id(&text).ok_or_else(|| DistError::IdFile {
                    path: path.to_path_buf(),
                    reason: "not an NCCL id (256 hex digits): delete it and launch again".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DistError::IdFile {
                    path: path.to_path_buf(),
                    reason: format!("reading: {e}"),
                })
            }
        }
        if start.elapsed() >= world.id_timeout {
            return Err(DistError::IdTimeout {
                rank: world.rank,
                path: path.to_path_buf(),
                secs: world.id_timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    //! The NCCL communicator and the all-reduce as a candle op.

    use std::collections::BTreeMap;
    use std::path::Path;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

    use super::{
        buckets, join_word, read_id_file, split_word, write_id_file, DistError, World,
        BUCKET_BYTES, WORD_CHUNKS,
    };
    use crate::Result;

    /// An NCCL communicator on the device's stream, so that its collectives are ordered with
    /// candle's kernels.
    pub(super) struct Reducer {
        comm: Comm,
        device: Device,
        size: usize,
        rank: usize,
    }

    // SAFETY: `Comm` holds a raw `ncclComm_t` and so is neither `Send` nor `Sync`. An NCCL
    // communicator is not tied to the thread that created it; what NCCL forbids is using it
    // from several threads at once. `Reducer` is `Send` but not `Sync`: it moves with its
    // trainer, and every call goes through `&self` of the one thread that owns it.
    unsafe impl Send for Reducer {}

    impl Reducer {
        pub(super) fn connect(world: &World, device: &Device, run_dir: &Path) -> Result<Self> {
            let cuda = device.as_cuda_device()?;
            let path = world.id_path(run_dir);
            let id = if world.is_lead() {
                let id = Id::new().map_err(|e| DistError::Nccl {
                    what: "ncclGetUniqueId",
                    reason: format!("{e:?}"),
                })?;
                write_id_file(&path, &id.internal().map(|c| c as u8))?;
                id
            } else {
                Id::uninit(read_id_file(world, &path)?.map(|b| b as std::ffi::c_char))
            };
            tracing::info!(rank = world.rank, size = world.size, id_file = %path.display(), "joining the NCCL communicator");
            let comm =
                Comm::from_rank(cuda.cuda_stream(), world.rank, world.size, id).map_err(|e| {
                    DistError::Nccl {
                        what: "ncclCommInitRank",
                        reason: format!("{e:?}"),
                    }
                })?;
            // Every rank has read the id once the communicator exists: a stale file must not
            // send the next launch's ranks to this one.
            if world.is_lead() {
                let _ = std::fs::remove_file(&path);
            }
            Ok(Reducer {
                comm,
                device: device.clone(),
                size: world.size,
                rank: world.rank,
            })
        }

        fn sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok(t.apply_op1_no_bwd(&AllReduceSum { comm: &self.comm })?)
        }

        pub(super) fn all_reduce_mean(&self, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
            for bucket in buckets(grads, BUCKET_BYTES) {
                let flat = bucket
                    .iter()
                    .map(|n| grads[n].flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mut summed = self.sum(&Tensor::cat(&flat, 0)?)?;
                if self.size > 1 {
                    summed = (summed / self.size as f64)?;
                }
                let mut offset = 0;
                for name in bucket {
                    let shape = grads[&name].shape().clone();
                    let len = shape.elem_count();
                    let mean = summed.narrow(0, offset, len)?.reshape(shape)?;
                    offset += len;
                    grads.insert(name, mean);
                }
            }
            Ok(())
        }

        pub(super) fn mean(&self, value: f64) -> Result<f64> {
            let t = Tensor::new(&[value], &self.device)?;
            let sum = self.sum(&t)?.to_vec1::<f64>()?[0];
            Ok(if self.size > 1 {
                sum / self.size as f64
            } else {
                sum
            })
        }

        pub(super) fn word_positions(&self, local: u128) -> Result<Vec<u128>> {
            // Each rank fills its own slot and zeros elsewhere; the sum is every rank's value.
            let mut slots = vec![0f64; WORD_CHUNKS * self.size];
            let rank = self.rank;
            slots[WORD_CHUNKS * rank..WORD_CHUNKS * (rank + 1)].copy_from_slice(&split_word(local));
            let summed = self
                .sum(&Tensor::new(slots, &self.device)?)?
                .to_vec1::<f64>()?;
            summed.chunks(WORD_CHUNKS).map(join_word).collect()
        }

        pub(super) fn any(&self, flag: bool) -> Result<bool> {
            let t = Tensor::new(&[flag as u8 as f32], &self.device)?;
            Ok(self.sum(&t)?.to_vec1::<f32>()?[0] > 0.0)
        }
    }

    /// The sum over the ranks of a contiguous f32 or f64 tensor, into a fresh buffer.
    struct AllReduceSum<'a> {
        comm: &'a Comm,
    }

    impl AllReduceSum<'_> {
        fn reduce<T: CudaDType + DeviceRepr + NcclType>(
            &self,
            s: &CudaStorage,
            start: usize,
            end: usize,
        ) -> candle_core::Result<CudaStorage> {
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<T>()?.slice(start..end);
            // SAFETY: every element is written by the all-reduce before it is read.
            let mut dst = unsafe { dev.alloc::<T>(end - start) }?;
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed: {e:?}")))?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev))
        }
    }

    impl CustomOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce needs a tensor on a CUDA device")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("the NCCL all-reduce needs a contiguous tensor");
            };
            let out = match s.dtype() {
                DType::F32 => self.reduce::<f32>(s, start, end)?,
                DType::F64 => self.reduce::<f64>(s, start, end)?,
                dt => candle_core::bail!("the NCCL all-reduce supports f32 and f64, not {dt:?}"),
            };
            Ok((out, l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RNG word positions cross the f64 all-reduce exactly, summed with the other ranks' zeros.
    #[test]
    fn word_positions_split_into_exact_f64_chunks() {
        for v in [
            0u128,
            1,
            12_345,
            u64::MAX as u128,
            (1u128 << 100) + 7,
            u128::MAX,
        ] {
            let chunks = split_word(v);
            let summed: Vec<f64> = chunks.iter().map(|c| c + 0.0 + 0.0).collect();
            assert_eq!(join_word(&summed).unwrap(), v);
        }
        // What a corrupted reduction would give is an error, not a wrong position.
        assert!(join_word(&[0.5, 0.0, 0.0]).is_err());
        assert!(join_word(&[-1.0, 0.0, 0.0]).is_err());
        assert!(join_word(&[(1u64 << 43) as f64, 0.0, 0.0]).is_err());
    }

    fn world(vars: &[(&str, &str)]) -> Result<World, DistError> {
        World::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_launcher_variables_is_a_single_process() {
        let w = world(&[]).unwrap();
        assert_eq!(w, World::single());
        assert!(w.is_lead() && !w.launched);
        assert_eq!(w.device_spec("cuda"), "cuda");
        let w = world(&[(ID_FILE_VAR, "/shared/id"), (ID_TIMEOUT_VAR, "7")]).unwrap();
        assert_eq!(w.id_path(Path::new("run")), PathBuf::from("/shared/id"));
        assert_eq!(w.id_timeout, Duration::from_secs(7));
        assert_eq!(
            World::single().id_path(Path::new("run")),
            Path::new("run").join(".nccl-id")
        );
    }

    #[test]
    fn a_launched_world_of_one_is_accepted_in_every_build() {
        let w = world(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.launched), (0, 1, 0, true));
        // One rank keeps the device as given.
        assert_eq!(w.device_spec("cuda"), "cuda");
    }

    #[test]
    fn bad_launcher_variables_are_clear_errors() {
        let e = world(&[("RANK", "one"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(&e, DistError::NotANumber { var: "RANK", value } if value == "one"),
            "{e}"
        );
        assert!(e.to_string().contains("RANK=\"one\""), "{e}");
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "-2")]).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::NotANumber {
                    var: "WORLD_SIZE",
                    ..
                }
            ),
            "{e}"
        );
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(e, DistError::RankOutOfRange { rank: 2, size: 2 }),
            "{e}"
        );
        assert!(e.to_string().contains("0 to WORLD_SIZE - 1"), "{e}");
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "0")]).unwrap_err();
        assert!(matches!(e, DistError::EmptyWorld), "{e}");
        let e = world(&[("RANK", "0")]).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::Partial {
                    missing: "WORLD_SIZE",
                    ..
                }
            ),
            "{e}"
        );
        let e = world(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::Partial {
                    missing: "RANK",
                    ..
                }
            ),
            "{e}"
        );
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "x")]).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::NotANumber {
                    var: "LOCAL_RANK",
                    ..
                }
            ),
            "{e}"
        );
        let e = world(&[(ID_TIMEOUT_VAR, "soon")]).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::NotANumber {
                    var: ID_TIMEOUT_VAR,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn several_ranks_without_nccl_say_how_to_build() {
        let e = world(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]).unwrap_err();
        assert!(matches!(e, DistError::NoNccl { size: 2 }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("--features nccl") && msg.contains("cargo xtask build-cuda --nccl"),
            "{msg}"
        );
        // Connecting such a world (built by hand) fails the same way, never silently alone.
        let w = World {
            rank: 0,
            size: 2,
            launched: true,
            ..World::single()
        };
        let dir = tempfile::tempdir().unwrap();
        let e = Collective::connect(w, &Device::Cpu, dir.path()).unwrap_err();
        assert!(e.to_string().contains("CUDA device per rank"), "{e}");
    }

    #[cfg(feature = "nccl")]
    #[test]
    fn several_ranks_with_nccl_map_cuda_to_the_local_rank() {
        let w = world(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (3, 4, 1));
        assert!(!w.is_lead());
        assert_eq!(w.device_spec("cuda"), "cuda:1");
        assert_eq!(w.device_spec("cuda:0"), "cuda:0");
        assert_eq!(w.device_spec("cpu"), "cpu");
        // Without LOCAL_RANK the rank is the GPU (one machine).
        let w = world(&[("RANK", "2"), ("WORLD_SIZE", "4")]).unwrap();
        assert_eq!(w.local_rank, 2);
    }

    #[test]
    fn the_micro_batch_must_split_among_the_ranks() {
        let w = |size| World {
            size,
            ..World::single()
        };
        assert!(w(1).check_batch(7, 1).is_ok());
        assert!(w(4).check_batch(64, 2).is_ok());
        assert!(w(4).check_batch(64, 16).is_ok());
        // 64 images in 32 micro-batches of 2 cannot give each of 4 ranks a share.
        let e = w(4).check_batch(64, 32).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::BatchNotDivisible {
                    micro: 2,
                    size: 4,
                    ..
                }
            ),
            "{e}"
        );
        let e = w(3).check_batch(64, 1).unwrap_err();
        assert!(
            matches!(
                e,
                DistError::BatchNotDivisible {
                    micro: 64,
                    size: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("does not divide among 3"), "{e}");
    }

    #[test]
    fn the_ranks_together_see_exactly_the_single_process_batches() {
        // 50 images whose first byte is their index; flips on, so that pixels check them too.
        let n = 50;
        let pixels: Vec<u8> = (0..n).flat_map(|i| [i as u8, 0, 0, 0]).collect();
        let ds = std::sync::Arc::new(
            ddpm_data::Dataset::from_u8(1, 2, pixels, vec![0; n], vec!["x".into()])
                .unwrap()
                .with_flip(true),
        );
        let loader = |workers| Loader::new(std::sync::Arc::clone(&ds), 8, 5, true, workers);
        let single = World::single();
        let mut whole = single.shard(loader(0).unwrap()).unwrap();
        // 6 batches of 8 per epoch: 9 batches cross into the second epoch.
        let batches: Vec<_> = (0..9).map(|_| whole.next_batch().unwrap()).collect();
        for size in [2, 4, 8] {
            let mut ranks: Vec<Loader> = (0..size)
                .map(|rank| {
                    let w = World {
                        rank,
                        size,
                        ..World::single()
                    };
                    w.shard(loader(1).unwrap()).unwrap()
                })
                .collect();
            for (step, b) in batches.iter().enumerate() {
                let images: Vec<f32> = b.images.flatten_all().unwrap().to_vec1().unwrap();
                let mut seen = vec![None; b.indices.len()];
                for (rank, l) in ranks.iter_mut().enumerate() {
                    let mine = l.next_batch().unwrap();
                    assert_eq!(mine.indices.len(), 8 / size, "size {size} step {step}");
                    let px: Vec<f32> = mine.images.flatten_all().unwrap().to_vec1().unwrap();
                    for (j, &i) in mine.indices.iter().enumerate() {
                        let k = rank + j * size;
                        assert_eq!(b.indices[k], i, "size {size} step {step} rank {rank}");
                        assert_eq!(px[j * 4..j * 4 + 4], images[k * 4..k * 4 + 4]);
                        assert!(seen[k].replace(rank).is_none());
                    }
                }
                assert!(seen.iter().all(Option::is_some), "size {size} step {step}");
            }
            // The position, saved with checkpoints, stays the global one on every rank.
            for l in &ranks {
                assert_eq!(l.position(), whole.position());
            }
        }
        let w = World {
            rank: 0,
            size: 3,
            ..World::single()
        };
        assert!(w.shard(loader(0).unwrap()).is_err());
    }

    #[test]
    fn the_id_file_is_written_whole_and_read_by_waiting_ranks() {
        let dir = tempfile::tempdir().unwrap();
        let rank1 = World {
            rank: 1,
            size: 2,
            launched: true,
            id_timeout: Duration::from_secs(20),
            ..World::single()
        };
        let path = rank1.id_path(&dir.path().join("run"));
        let mut id = [0u8; 128];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37);
        }
        // Rank 1 starts waiting before rank 0 has written (or even made the run directory).
        let waiter = {
            let (w, p) = (rank1.clone(), path.clone());
            std::thread::spawn(move || read_id_file(&w, &p))
        };
        std::thread::sleep(Duration::from_millis(120));
        write_id_file(&path, &id).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), id);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(".nccl-id")],
            "no temp file left"
        );
        // A file that is not an id is an error naming it, not a wait.
        std::fs::write(&path, "zz".repeat(128)).unwrap();
        let e = read_id_file(&rank1, &path).unwrap_err().to_string();
        assert!(
            e.contains(".nccl-id") && e.contains("not an NCCL id"),
            "{e}"
        );
        assert!(decode_id("00").is_none());
    }

    #[test]
    fn a_missing_id_file_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let world = World {
            rank: 1,
            size: 2,
            launched: true,
            id_timeout: Duration::from_millis(150),
            ..World::single()
        };
        let path = world.id_path(dir.path());
        let e = read_id_file(&world, &path).unwrap_err();
        assert!(matches!(e, DistError::IdTimeout { rank: 1, .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(".nccl-id") && e.contains("rank 0") && e.contains(ID_TIMEOUT_VAR),
            "{e}"
        );
    }

    #[test]
    fn without_a_communicator_reductions_are_the_identity() {
        let c = Collective::connect(World::single(), &Device::Cpu, Path::new("unused")).unwrap();
        assert!(!c.has_comm() && c.is_lead());
        let g = Tensor::new(&[1.5f32, -2.0, 3.25], &Device::Cpu).unwrap();
        let mut grads = BTreeMap::from([("a".to_string(), g.clone())]);
        c.all_reduce_mean(&mut grads).unwrap();
        assert_eq!(
            grads["a"].to_vec1::<f32>().unwrap(),
            g.to_vec1::<f32>().unwrap()
        );
        assert_eq!(c.mean(0.125).unwrap(), 0.125);
        assert!(c.any(true).unwrap() && !c.any(false).unwrap());
        // A launched world of one rank on the CPU has nothing to join either.
        let w = World {
            launched: true,
            ..World::single()
        };
        assert!(!Collective::connect(w, &Device::Cpu, Path::new("unused"))
            .unwrap()
            .has_comm());
    }

    #[test]
    fn buckets_follow_the_sorted_names_and_the_size_limit() {
        let t = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let grads = BTreeMap::from([
            ("b".to_string(), t(10)),
            ("a".to_string(), t(10)),
            ("c".to_string(), t(30)),
            ("d".to_string(), t(5)),
            ("e".to_string(), t(5)),
            (
                "f".to_string(),
                Tensor::zeros(2, candle_core::DType::F64, &Device::Cpu).unwrap(),
            ),
        ]);
        // 80 bytes per bucket: a+b (80), c alone (120, over the limit), d+e (40), f (other dtype).
        let got = buckets(&grads, 80);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                names(&["a", "b"]),
                names(&["c"]),
                names(&["d", "e"]),
                names(&["f"])
            ]
        );
        assert!(buckets(&BTreeMap::new(), 80).is_empty());
    }
}
