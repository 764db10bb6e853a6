//! GroupNorm's CUDA passes ([`super::GroupNorm`]: GroupNorm + per-(image, channel) affine +
//! SiLU + dropout, one kernel each way instead of some fifteen candle ops forward and thirty
//! backward); the kernels are in `kernels.cu` here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, DType, Layout, Result};

use super::{Dropout, GroupNorm};
use crate::cuda::{extended, launch, Arg};

/// Whether the GroupNorm kernels take `groups` groups of `channels`: the backward pass keeps
/// two sums per channel of a group in shared memory, at most 48 KiB (f64).
pub fn fits(channels: usize, groups: usize) -> bool {
    groups > 0 && channels / groups * 2 * 8 <= 48 * 1024
}

/// The kernel arguments of [`GroupNorm`]'s activation and dropout, in kernels.cu's order:
/// `silu`, `dropout` (int), the dropout's threshold and two seed words (uint32_t), and the
/// kept elements' factor (double).
fn post_args(op: &GroupNorm) -> [Arg; 6] {
    let (dropout, threshold, s1, s2, keep) = match op.dropout.filter(|d| d.p > 0.0) {
        Some(d) => {
            let (threshold, s1, s2) = Dropout::hash_params(&d);
            (1, threshold, s1, s2, 1.0 / (1.0 - d.p))
        }
        None => (0, 0, 0, 0, 1.0),
    };
    [
        Arg::I32(op.silu as i32),
        Arg::I32(dropout),
        Arg::U32(threshold),
        Arg::U32(s1),
        Arg::U32(s2),
        Arg::F64(keep),
    ]
}

/// (b, c, hw) of a GroupNorm input, checked against `groups`.
fn gn_dims(l: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
    let dims = l.dims();
    if dims.len() < 2 {
        candle_core::bail!("group_norm: expected (b, c, ...), got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups");
    }
    if l.shape().elem_count() + 2 * b * c > u32::MAX as usize {
        candle_core::bail!("group_norm: tensors over 2^32 elements are not supported");
    }
    Ok((b, c, dims[2..].iter().product()))
}

/// Dynamic shared memory a GroupNorm kernel may ask for: CUDA's 48 KiB without opting in,
/// less the kernels' static scratch.
const SHARED_LIMIT: usize = 46 * 1024;

/// One block per (image, group): 256 threads, or 128 for small groups.
fn per_group(blocks: usize, group_len: usize, shared: usize) -> LaunchConfig {
    let threads = if group_len >= 2048 { 256 } else { 128 };
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

fn check_len(l: &Layout, len: usize, what: &str) -> Result<()> {
    if l.shape().elem_count() != len {
        candle_core::bail!(
            "group_norm: {what} has {} elements, expected {len}",
            l.shape().elem_count()
        );
    }
    Ok(())
}

/// [`GroupNorm`]'s forward pass on CUDA: `y` from `x`, `a`, `d` (b, c).
pub(super) fn forward(op: &GroupNorm, inputs: [(&CudaStorage, &Layout); 3]) -> Result<CudaStorage> {
    let [(x, lx), (_, la), (_, ld)] = inputs;
    let (b, c, hw) = gn_dims(lx, op.groups)?;
    check_len(la, b * c, "a")?;
    check_len(ld, b * c, "d")?;
    let len = c / op.groups * hw;
    // The group in shared memory where it fits (and the later kernels are on).
    let shared = len * x.dtype().size_in_bytes();
    let (name, shared) = if extended() && shared <= SHARED_LIMIT {
        ("group_norm_fwd_shared", shared)
    } else {
        ("group_norm_fwd", 0)
    };
    let cfg = per_group(b * op.groups, len, shared);
    let mut args = vec![
        Arg::U32(op.groups as u32),
        Arg::U32(c as u32),
        Arg::U32(hw as u32),
        Arg::F64(op.eps),
    ];
    args.extend(post_args(op));
    // SAFETY: kernels.cu's group_norm_fwd kernels take (x, a, d, y, groups, c, hw, eps, the
    // post arguments) and write every element of `y` (as many as `x`).
    unsafe { launch(name, &inputs, lx.shape().elem_count(), cfg, &args) }
}

/// [`GroupNorm`]'s backward pass on CUDA: `[dx | da | dd]` from `x`, `[a | d]` and the output
/// gradient.
pub(super) fn backward(
    op: &GroupNorm,
    inputs: [(&CudaStorage, &Layout); 3],
) -> Result<CudaStorage> {
    let [(x, lx), (_, lad), (_, ldy)] = inputs;
    let (b, c, hw) = gn_dims(lx, op.groups)?;
    check_len(lad, 2 * b * c, "[a | d]")?;
    check_len(ldy, lx.shape().elem_count(), "the gradient")?;
    let cg = c / op.groups;
    let acc = if x.dtype() == DType::F64 { 8 } else { 4 };
    // The accumulators, then (where it fits) the group of x and of the gradient.
    let sums = (2 * cg * acc).next_multiple_of(16);
    let shared = sums + 2 * cg * hw * x.dtype().size_in_bytes();
    let (name, shared) = if extended() && shared <= SHARED_LIMIT {
        ("group_norm_bwd_shared", shared)
    } else {
        ("group_norm_bwd", 2 * cg * acc)
    };
    let cfg = per_group(b * op.groups, cg * hw, shared);
    let out_len = lx.shape().elem_count() + 2 * b * c;
    let mut args = vec![
        Arg::U32(b as u32),
        Arg::U32(op.groups as u32),
        Arg::U32(c as u32),
        Arg::U32(hw as u32),
        Arg::F64(op.eps),
    ];
    args.extend(post_args(op));
    // SAFETY: kernels.cu's group_norm_bwd kernels take (x, [a | d], dy, out, b, groups, c, hw,
    // eps, the post arguments) and write every element of `out` (dx, then da and dd).
    unsafe { launch(name, &inputs, out_len, cfg, &args) }
}

#[cfg(test)]
mod tests {
    use crate::cuda::testing::{gpu, randn, rel_err};
    use crate::group_norm::Dropout;
    use candle_core::{DType, Device, Tensor, Var};

    /// Our GroupNorm op on CUDA against the same op on the CPU: output and the gradients of x,
    /// a and d, for f32; and bf16 on CUDA against f32 on the CPU within bf16's precision.
    fn check_group_norm(
        dev: &Device,
        dims: &[usize],
        groups: usize,
        silu: bool,
        dropout: Option<Dropout>,
    ) {
        let (b, c) = (dims[0], dims[1]);
        let xc = ((randn(dims, 4) * 2.0).unwrap() + 0.5).unwrap();
        let ac = randn(&[b, c], 5);
        let dc = randn(&[b, c], 6);
        let probe = randn(dims, 7);
        let run = |dev: &Device, dtype: DType| {
            let to = |t: &Tensor| {
                Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap()
            };
            let (x, a, d) = (to(&xc), to(&ac), to(&dc));
            let y = super::super::group_norm_act(&x, groups, &a, &d, silu, dropout, 1e-5).unwrap();
            let p = probe.to_device(dev).unwrap().to_dtype(dtype).unwrap();
            let g = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
            let grads = [&x, &a, &d].map(|v| g.get(v).unwrap().clone());
            (y, grads)
        };
        let (yc, gc) = run(&Device::Cpu, DType::F32);
        let what = format!("group_norm {dims:?} groups {groups} silu {silu} dropout {dropout:?}");
        let (yg, gg) = run(dev, DType::F32);
        assert!(
            rel_err(&yg, &yc) < 1e-5,
            "{what}: forward {}",
            rel_err(&yg, &yc)
        );
        for (name, (g, c)) in ["dx", "da", "dd"].iter().zip(gg.iter().zip(&gc)) {
            assert!(rel_err(g, c) < 1e-4, "{what}: {name} {}", rel_err(g, c));
        }
        let (yh, gh) = run(dev, DType::BF16);
        assert!(
            rel_err(&yh, &yc) < 2e-2,
            "{what}: bf16 forward {}",
            rel_err(&yh, &yc)
        );
        for (name, (g, c)) in ["dx", "da", "dd"].iter().zip(gh.iter().zip(&gc)) {
            assert!(
                rel_err(g, c) < 5e-2,
                "{what}: bf16 {name} {}",
                rel_err(g, c)
            );
        }
    }

    #[test]
    fn group_norm_matches_the_cpu_kernel() {
        let Some(dev) = gpu() else { return };
        let drop = Some(Dropout {
            p: 0.3,
            seed: 0x1234_5678_9abc,
        });
        check_group_norm(&dev, &[2, 8, 5, 3], 4, false, None);
        check_group_norm(&dev, &[3, 6, 4, 4], 3, true, None);
        check_group_norm(&dev, &[2, 8, 6, 6], 2, true, drop);
        check_group_norm(&dev, &[1, 5, 7], 1, true, None); // 1-D, one group of odd size
        check_group_norm(&dev, &[4, 64, 32, 32], 32, true, drop);
        check_group_norm(&dev, &[2, 512, 4, 4], 32, true, None);
        // Groups too large for shared memory: the kernels that read global memory throughout.
        check_group_norm(&dev, &[2, 8, 64, 64], 2, true, drop);
    }
}
