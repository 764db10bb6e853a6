// Our CUDA kernels, one translation unit (one PTX module, `ddpm_unet_kernels`): the shared
// pieces, then each op's kernels.cu, which sits beside its Rust code. Compiled to PTX by
// build.rs (nvcc --ptx) when the crate's `cuda` feature is on; see cuda/mod.rs.

#include "common.cuh"

#include "../conv/kernels.cu"
#include "../upsample/kernels.cu"
#include "../group_norm/kernels.cu"
#include "../optim/kernels.cu"
#include "../attention/kernels.cu"
