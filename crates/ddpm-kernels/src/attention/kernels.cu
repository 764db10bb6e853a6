// Attention's CUDA kernels (see attention/cuda.rs). Part of cuda/kernels.cu (after
// cuda/common.cuh).
//
// Row softmax for attention (attention/cuda.rs): one warp per row of n entries, in place.
template <typename T>
__device__ void softmax_rows(T* s, uint32_t rows, uint32_t n) {
  typedef typename Acc<T>::type A;
  const uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (row >= rows) return;
  T* r = s + (size_t)row * n;
  A m = load(r[lane < n ? lane : 0]);  // any entry of the row starts the maximum
  for (uint32_t j = lane; j < n; j += 32) m = fmax(m, (A)load(r[j]));
  for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
  A sum = 0;
  for (uint32_t j = lane; j < n; j += 32) sum += exp((A)load(r[j]) - m);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const A inv = (A)1 / sum;
  for (uint32_t j = lane; j < n; j += 32) r[j] = store<T>(exp((A)load(r[j]) - m) * inv);
}

// Its backward, scaled: dp = scale * p * (dp - sum_j dp * p) per row, in place in dp.
template <typename T>
__device__ void softmax_rows_bwd(const T* p, T* dp, uint32_t rows, uint32_t n, double scale) {
  typedef typename Acc<T>::type A;
  const uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* pr = p + (size_t)row * n;
  T* dr = dp + (size_t)row * n;
  A dot = 0;
  for (uint32_t j = lane; j < n; j += 32) dot += (A)load(pr[j]) * (A)load(dr[j]);
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  const A sc = (A)scale;
  for (uint32_t j = lane; j < n; j += 32) {
    const A pv = load(pr[j]);
    dr[j] = store<T>(sc * pv * ((A)load(dr[j]) - dot));
  }
}

#define INSTANTIATE_SOFTMAX(T, SUFFIX)                                                           \
  extern "C" __global__ void softmax_rows_##SUFFIX(T* s, uint32_t rows, uint32_t n) {           \
    softmax_rows<T>(s, rows, n);                                                                 \
  }                                                                                              \
  extern "C" __global__ void softmax_rows_bwd_##SUFFIX(const T* p, T* dp, uint32_t rows,        \
                                                       uint32_t n, double scale) {              \
    softmax_rows_bwd<T>(p, dp, rows, n, scale);                                                  \
  }

INSTANTIATE_SOFTMAX(float, f32)
INSTANTIATE_SOFTMAX(double, f64)
INSTANTIATE_SOFTMAX(__half, f16)
INSTANTIATE_SOFTMAX(__nv_bfloat16, bf16)
