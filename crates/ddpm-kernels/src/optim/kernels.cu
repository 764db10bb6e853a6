// The optimizer's CUDA kernels (see optim/cuda.rs). Part of cuda/kernels.cu (after
// cuda/common.cuh).
//
// In-place optimizer and EMA updates on f32 (master weights, moments, averages).

// dst = keep * dst + take * f(scale * src), f the identity or the square: AdamW's moments and
// the EMA.
extern "C" __global__ void axpby_f32(float* dst, const float* src, uint32_t n, float keep,
                                     float take, float scale, int square) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float g = src[i] * scale;
    if (square) g *= g;
    dst[i] = dst[i] * keep + g * take;
  }
}

// AdamW's update from its moments: p = p * decay - lr * (m * inv_bc1) / (sqrt(v * inv_bc2) + eps).
extern "C" __global__ void adamw_f32(float* p, const float* m, const float* v, uint32_t n,
                                     float decay, float inv_bc1, float inv_bc2, float lr,
                                     float eps) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float update = (m[i] * inv_bc1) / (sqrtf(v[i] * inv_bc2) + eps);
    p[i] = p[i] * decay - update * lr;
  }
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor updates (PyTorch's "foreach"/fused optimizers): one launch for all variables of
// a model. Each slot names up to four f32 tensors of n elements; block i works on chunk
// (i - first_block) of the slot whose range of blocks holds i.
struct Slot {
  uint64_t ptr[4];
  uint32_t n;
  uint32_t first_block;
};
#define MULTI_CHUNK 4096u

__device__ __forceinline__ const Slot& slot_of(const Slot* slots, uint32_t count) {
  uint32_t lo = 0, hi = count;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (slots[mid].first_block <= blockIdx.x) lo = mid; else hi = mid;
  }
  return slots[lo];
}

// AdamW on slots (p, m, v, g): the moments from the gradient times `scale` (the clipping
// factor), then the variable; the same arithmetic, in the same order, as axpby_f32 (twice)
// followed by adamw_f32.
extern "C" __global__ void adamw_multi_f32(const Slot* slots, uint32_t count, float scale,
                                           float keep1, float take1, float keep2, float take2,
                                           float decay, float inv_bc1, float inv_bc2, float lr,
                                           float eps) {
  const Slot& s = slot_of(slots, count);
  float* p = reinterpret_cast<float*>(s.ptr[0]);
  float* m = reinterpret_cast<float*>(s.ptr[1]);
  float* v = reinterpret_cast<float*>(s.ptr[2]);
  const float* g = reinterpret_cast<const float*>(s.ptr[3]);
  const uint32_t start = (blockIdx.x - s.first_block) * MULTI_CHUNK;
  const uint32_t end = min(start + MULTI_CHUNK, s.n);
  for (uint32_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float gs = g[i] * scale;
    const float mi = m[i] * keep1 + gs * take1;
    const float vi = v[i] * keep2 + (gs * gs) * take2;
    m[i] = mi;
    v[i] = vi;
    const float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
    p[i] = p[i] * decay - update * lr;
  }
}

// dst = keep * dst + take * src on slots (dst, src): the EMA of all variables.
extern "C" __global__ void axpby_multi_f32(const Slot* slots, uint32_t count, float keep,
                                           float take) {
  const Slot& s = slot_of(slots, count);
  float* d = reinterpret_cast<float*>(s.ptr[0]);
  const float* x = reinterpret_cast<const float*>(s.ptr[1]);
  const uint32_t start = (blockIdx.x - s.first_block) * MULTI_CHUNK;
  const uint32_t end = min(start + MULTI_CHUNK, s.n);
  for (uint32_t i = start + threadIdx.x; i < end; i += blockDim.x) d[i] = d[i] * keep + x[i] * take;
}

// Sum of squares on slots (x): block i writes its chunk's sum, in double, to out[i].
extern "C" __global__ void sumsq_multi_f32(const Slot* slots, uint32_t count, double* out) {
  __shared__ double scratch[32];
  const Slot& s = slot_of(slots, count);
  const float* x = reinterpret_cast<const float*>(s.ptr[0]);
  const uint32_t start = (blockIdx.x - s.first_block) * MULTI_CHUNK;
  const uint32_t end = min(start + MULTI_CHUNK, s.n);
  double acc = 0;
  for (uint32_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const double v = x[i];
    acc += v * v;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
