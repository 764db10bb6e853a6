// Nearest 2x upsampling's CUDA kernels (see upsample/cuda.rs). Part of cuda/kernels.cu (after
// cuda/common.cuh).
// Nearest-neighbour 2x upsampling of planes of h x w: y (2h x 2w) from x, one block per plane.
template <typename T>
__device__ void upsample2x(const T* x, T* y, uint32_t h, uint32_t w) {
  const T* src = x + (size_t)blockIdx.x * h * w;
  T* dst = y + (size_t)blockIdx.x * 4 * h * w;
  const uint32_t w2 = 2 * w, len = 4 * h * w;
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const uint32_t oy = i / w2, ox = i - oy * w2;
    dst[i] = src[(oy >> 1) * w + (ox >> 1)];
  }
}

// Its adjoint: dx (h x w) = the sum of each 2 x 2 block of dy (2h x 2w), one block per plane.
template <typename T>
__device__ void upsample2x_adjoint(const T* dy, T* dx, uint32_t h, uint32_t w) {
  typedef typename Acc<T>::type A;
  const T* src = dy + (size_t)blockIdx.x * 4 * h * w;
  T* dst = dx + (size_t)blockIdx.x * h * w;
  const uint32_t w2 = 2 * w, len = h * w;
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const uint32_t y = i / w, x = i - y * w;
    const T* top = src + (2 * y) * w2 + 2 * x;
    const A sum = (A)load(top[0]) + (A)load(top[1]) + (A)load(top[w2]) + (A)load(top[w2 + 1]);
    dst[i] = store<T>(sum);
  }
}

#define INSTANTIATE_UPSAMPLE(T, SUFFIX)                                                          \
  extern "C" __global__ void upsample2x_##SUFFIX(const T* x, T* y, uint32_t h, uint32_t w) {     \
    upsample2x<T>(x, y, h, w);                                                                   \
  }                                                                                              \
  extern "C" __global__ void upsample2x_adjoint_##SUFFIX(const T* dy, T* dx, uint32_t h,         \
                                                         uint32_t w) {                           \
    upsample2x_adjoint<T>(dy, dx, h, w);                                                         \
  }

INSTANTIATE_UPSAMPLE(float, f32)
INSTANTIATE_UPSAMPLE(double, f64)
INSTANTIATE_UPSAMPLE(__half, f16)
INSTANTIATE_UPSAMPLE(__nv_bfloat16, bf16)
