// What our CUDA kernels share (see cuda/mod.rs): the element types' loads and stores, block
// sums, 16-byte packs and the grid-stride loop. Included first by cuda/kernels.cu, which
// build.rs compiles to PTX (nvcc --ptx) when the crate's `cuda` feature is on, with each op's
// kernels.cu after it.
//
// Every kernel is instantiated for float, double, __half and __nv_bfloat16 with the suffix
// candle's kernel_name gives (f32, f64, f16, bf16). Half types are read into float and all
// sums are in float (double for double).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float load(const float v) { return v; }
__device__ __forceinline__ double load(const double v) { return v; }
__device__ __forceinline__ float load(const __half v) { return __half2float(v); }
__device__ __forceinline__ float load(const __nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T store(double v);
template <> __device__ __forceinline__ double store<double>(double v) { return v; }

// ---------------------------------------------------------------------------------------------
// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : (A)0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// V consecutive elements of T, stored with one 16-byte store when they fill 16 bytes.
template <typename T, uint32_t V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
  __device__ __forceinline__ void load_from(const T* p) {
    if constexpr (sizeof(T) * V == 16) {
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
    } else {
#pragma unroll
      for (uint32_t i = 0; i < V; ++i) v[i] = p[i];
    }
  }
  __device__ __forceinline__ void store_to(T* p) const {
    if constexpr (sizeof(T) * V == 16) {
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (uint32_t i = 0; i < V; ++i) p[i] = v[i];
    }
  }
};

// Grid-stride loop over `total` work items.
#define GRID_STRIDE(t, total)                                                                    \
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < (total); t += gridDim.x * blockDim.x)
