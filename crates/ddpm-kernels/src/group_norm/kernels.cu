// The fused GroupNorm + per-(image, channel) affine + SiLU + dropout, forward and backward
// (see group_norm/cuda.rs). Part of cuda/kernels.cu (after cuda/common.cuh).
//
// GroupNorm. One block per (image, group); the group's elements are contiguous
// (cg channels of hw elements).

// The dropout mask of group_norm::Dropout (group_norm/cpu.rs): Wellons' lowbias32 hash of the element's
// index in the whole tensor (as u32), keep when the hash is at least the threshold.
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

struct Post {
  int silu;
  int dropout;
  uint32_t threshold, s1, s2;
  double keep;
};

#define POST_PARAMS int silu, int dropout, uint32_t threshold, uint32_t s1, uint32_t s2, double keep
#define POST Post{silu, dropout, threshold, s1, s2, keep}

template <typename A>
__device__ __forceinline__ A mask_factor(const Post& p, size_t index) {
  const uint32_t h = hash32(hash32((uint32_t)index + p.s1) ^ p.s2);
  return h >= p.threshold ? (A)p.keep : (A)0;
}

// Mean and 1/sqrt(var + eps) of the group at xs (len elements), two passes.
template <typename T, typename A>
__device__ __forceinline__ void group_stats(const T* xs, size_t len, double eps, A* scratch,
                                            A* mean, A* rstd) {
  A s = 0;
  for (size_t j = threadIdx.x; j < len; j += blockDim.x) s += load(xs[j]);
  const A m = block_sum(s, scratch) / (A)len;
  A q = 0;
  for (size_t j = threadIdx.x; j < len; j += blockDim.x) {
    const A v = load(xs[j]) - m;
    q += v * v;
  }
  const A var = block_sum(q, scratch) / (A)len;
  *mean = m;
  *rstd = (A)1 / sqrt(var + (A)eps);
}

// y = dropout(act((x - mean) * rstd * a[n, c] + d[n, c])). `xg`: the block's group of x, in
// global memory or copied to shared memory (gn_fwd_shared); `y` and the dropout hash are
// indexed in the whole tensor.
template <typename T>
__device__ void gn_fwd_group(const T* xg, const T* a, const T* d, T* y, uint32_t groups,
                             uint32_t c, uint32_t hw, double eps, Post post) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const uint32_t cg = c / groups;
  const size_t len = (size_t)cg * hw;
  const size_t start = (size_t)blockIdx.x * len;  // blockIdx.x = n * groups + g
  const uint32_t n = blockIdx.x / groups, g = blockIdx.x % groups;
  A mean, rstd;
  group_stats(xg, len, eps, scratch, &mean, &rstd);
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const size_t ch = (size_t)n * c + g * cg + cl;
    const A scale = load(a[ch]) * rstd, shift = load(d[ch]);
    const size_t base = (size_t)cl * hw;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      A h = (load(xg[base + j]) - mean) * scale + shift;
      if (post.silu) h = h / ((A)1 + exp(-h));
      if (post.dropout) h *= mask_factor<A>(post, start + base + j);
      y[start + base + j] = store<T>(h);
    }
  }
}

// Copies the block's `len` elements at `src` to shared memory `dst`, then synchronizes.
template <typename T>
__device__ __forceinline__ void to_shared(const T* src, T* dst, size_t len) {
  for (size_t j = threadIdx.x; j < len; j += blockDim.x) dst[j] = src[j];
  __syncthreads();
}

template <typename T>
__device__ void gn_fwd(const T* x, const T* a, const T* d, T* y, uint32_t groups, uint32_t c,
                       uint32_t hw, double eps, Post post) {
  const size_t len = (size_t)(c / groups) * hw;
  gn_fwd_group(x + (size_t)blockIdx.x * len, a, d, y, groups, c, hw, eps, post);
}

// The same with the group read once from global memory into shared memory (dynamic, len
// elements; the host uses it where that fits): the statistics and the output then read it
// from there instead of three times from global memory.
template <typename T>
__device__ void gn_fwd_shared(const T* x, const T* a, const T* d, T* y, uint32_t groups,
                              uint32_t c, uint32_t hw, double eps, Post post) {
  extern __shared__ __align__(16) unsigned char dynamic[];
  T* xs = reinterpret_cast<T*>(dynamic);
  const size_t len = (size_t)(c / groups) * hw;
  to_shared(x + (size_t)blockIdx.x * len, xs, len);
  gn_fwd_group(xs, a, d, y, groups, c, hw, eps, post);
}

// The gradient before the activation, dh, at one element.
template <typename A>
__device__ __forceinline__ A pre_activation_grad(const Post& post, A dy, A h, size_t index) {
  if (post.dropout) dy *= mask_factor<A>(post, index);
  if (post.silu) {
    const A s = (A)1 / ((A)1 + exp(-h));
    dy *= s * ((A)1 + h * ((A)1 - s));
  }
  return dy;
}

// out = [dx | da | dd]: dx (b, c, hw), da = sum(dh * xhat), dd = sum(dh) per (image, channel).
// ad = [a | d], each (b, c). `xg`, `dyg`: the block's group of x and of the output gradient
// (global or shared memory); `chan`: 2 * cg accumulators in shared memory.
template <typename T, typename A>
__device__ void gn_bwd_group(const T* xg, const T* ad, const T* dyg, T* out, A* chan, uint32_t b,
                             uint32_t groups, uint32_t c, uint32_t hw, double eps, Post post) {
  __shared__ A scratch[32];
  const uint32_t cg = c / groups;
  const size_t len = (size_t)cg * hw;
  const size_t start = (size_t)blockIdx.x * len;
  const uint32_t n = blockIdx.x / groups, g = blockIdx.x % groups;
  const size_t bc = (size_t)b * c;
  const T* a = ad;
  const T* d = ad + bc;
  A mean, rstd;
  group_stats(xg, len, eps, scratch, &mean, &rstd);
  // Pass 1: per-channel sums of dh * (x - mean) * rstd and of dh.
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const size_t ch = (size_t)n * c + g * cg + cl;
    const A scale = load(a[ch]) * rstd, shift = load(d[ch]);
    const size_t base = (size_t)cl * hw;
    A sx = 0, s = 0;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      const A xc = load(xg[base + j]) - mean;
      const A dh =
          pre_activation_grad<A>(post, load(dyg[base + j]), xc * scale + shift, start + base + j);
      sx += dh * xc;
      s += dh;
    }
    sx = block_sum(sx, scratch) * rstd;
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
      chan[cl] = sx;
      chan[cg + cl] = s;
    }
  }
  __syncthreads();
  // The group's sums of dh * a and dh * xhat * a, by every thread from shared memory.
  A s1 = 0, s2 = 0;
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const A ac = load(a[(size_t)n * c + g * cg + cl]);
    s1 += chan[cg + cl] * ac;
    s2 += chan[cl] * ac;
  }
  const A c0 = -s1 * rstd / (A)len, c2 = -s2 * rstd / (A)len * rstd;
  // Pass 2: dx = dh * a * rstd + c0 + (x - mean) * c2, dh recomputed.
  T* dx = out;
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const size_t ch = (size_t)n * c + g * cg + cl;
    const A ac = load(a[ch]);
    const A scale = ac * rstd, shift = load(d[ch]);
    const size_t base = (size_t)cl * hw;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      const A xc = load(xg[base + j]) - mean;
      const A dh =
          pre_activation_grad<A>(post, load(dyg[base + j]), xc * scale + shift, start + base + j);
      dx[start + base + j] = store<T>(dh * scale + c0 + xc * c2);
    }
    if (threadIdx.x == 0) {
      out[(size_t)b * c * hw + ch] = store<T>(chan[cl]);
      out[(size_t)b * c * hw + bc + ch] = store<T>(chan[cg + cl]);
    }
  }
}

template <typename T>
__device__ void gn_bwd(const T* x, const T* ad, const T* dy, T* out, uint32_t b,
                       uint32_t groups, uint32_t c, uint32_t hw, double eps, Post post) {
  typedef typename Acc<T>::type A;
  extern __shared__ __align__(16) unsigned char dynamic[];
  const size_t start = (size_t)blockIdx.x * (c / groups) * hw;
  gn_bwd_group(x + start, ad, dy + start, out, reinterpret_cast<A*>(dynamic), b, groups, c, hw,
               eps, post);
}

// The same with the group of x and of the gradient read once into shared memory (after the
// 2 * cg accumulators; the host uses it where that fits), instead of four and two times from
// global memory.
template <typename T>
__device__ void gn_bwd_shared(const T* x, const T* ad, const T* dy, T* out, uint32_t b,
                              uint32_t groups, uint32_t c, uint32_t hw, double eps, Post post) {
  typedef typename Acc<T>::type A;
  extern __shared__ __align__(16) unsigned char dynamic[];
  const uint32_t cg = c / groups;
  const size_t len = (size_t)cg * hw, start = (size_t)blockIdx.x * len;
  A* chan = reinterpret_cast<A*>(dynamic);
  // 2 * cg accumulators, rounded up to 16 bytes.
  T* xs = reinterpret_cast<T*>(dynamic + ((2 * cg * sizeof(A) + 15) / 16) * 16);
  T* dys = xs + len;
  to_shared(x + start, xs, len);
  to_shared(dy + start, dys, len);
  gn_bwd_group(xs, ad, dys, out, chan, b, groups, c, hw, eps, post);
}

#define INSTANTIATE_GROUP_NORM(T, SUFFIX)                                                        \
  extern "C" __global__ void group_norm_fwd_##SUFFIX(const T* x, const T* a, const T* d, T* y,   \
                                                     uint32_t groups, uint32_t c, uint32_t hw,   \
                                                     double eps, POST_PARAMS) {                  \
    gn_fwd<T>(x, a, d, y, groups, c, hw, eps, POST);                                             \
  }                                                                                              \
  extern "C" __global__ void group_norm_bwd_##SUFFIX(const T* x, const T* ad, const T* dy,       \
                                                     T* out, uint32_t b, uint32_t groups,        \
                                                     uint32_t c, uint32_t hw, double eps,        \
                                                     POST_PARAMS) {                              \
    gn_bwd<T>(x, ad, dy, out, b, groups, c, hw, eps, POST);                                      \
  }                                                                                              \
  extern "C" __global__ void group_norm_fwd_shared_##SUFFIX(                                     \
      const T* x, const T* a, const T* d, T* y, uint32_t groups, uint32_t c, uint32_t hw,        \
      double eps, POST_PARAMS) {                                                                 \
    gn_fwd_shared<T>(x, a, d, y, groups, c, hw, eps, POST);                                      \
  }                                                                                              \
  extern "C" __global__ void group_norm_bwd_shared_##SUFFIX(                                     \
      const T* x, const T* ad, const T* dy, T* out, uint32_t b, uint32_t groups, uint32_t c,     \
      uint32_t hw, double eps, POST_PARAMS) {                                                    \
    gn_bwd_shared<T>(x, ad, dy, out, b, groups, c, hw, eps, POST);                               \
  }                                                                                              \


INSTANTIATE_GROUP_NORM(float, f32)
INSTANTIATE_GROUP_NORM(double, f64)
INSTANTIATE_GROUP_NORM(__half, f16)
INSTANTIATE_GROUP_NORM(__nv_bfloat16, bf16)
