// Our CUDA kernels (see cuda.rs): im2col / col2im for convolutions on cuBLAS GEMMs, and a
// fused GroupNorm + per-(image, channel) affine + SiLU + dropout, forward and backward.
// Compiled to PTX by build.rs (nvcc --ptx) when the crate's `cuda` feature is on.
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
// im2col: cols (c * kh * kw, b * oh * ow) from x (b, c, h, w), zero where a window leaves the
// input (padding `pad` before; the end padding is implied by oh, ow). Rows are (channel, tap),
// columns (image, output pixel), so that a convolution is one GEMM W (c_out, c kh kw) x cols,
// and its weight gradient one GEMM too (no per-image products summed afterwards). One block
// per (row, image) segment of oh * ow entries: its decomposition is computed once, and the
// threads write the segment in order (coalesced). 32-bit index arithmetic (the host checks
// that every tensor has fewer than 2^32 elements).
template <typename T>
__device__ void im2col(const T* x, T* cols, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                       uint32_t kh, uint32_t kw, uint32_t stride, uint32_t pad, uint32_t oh,
                       uint32_t ow) {
  const uint32_t seg = blockIdx.x;  // ((ci * kh * kw) + ky * kw + kx) * b + n
  const uint32_t taps = kh * kw;
  const uint32_t n = seg % b, row = seg / b;
  const uint32_t ci = row / taps, tap = row % taps;
  const uint32_t ky = tap / kw, kx = tap % kw;
  const T* plane = x + ((size_t)n * c + ci) * h * w;
  T* out = cols + (size_t)seg * oh * ow;
  const T zero = store<T>((typename Acc<T>::type)0);
  const uint32_t len = oh * ow;
  for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {
    const uint32_t oy = j / ow, ox = j - oy * ow;
    const int iy = (int)(oy * stride + ky) - (int)pad;
    const int ix = (int)(ox * stride + kx) - (int)pad;
    out[j] = (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w) ? plane[iy * w + ix] : zero;
  }
}

// col2im: dx (b, c, h, w) = the sum over the windows that read each input element of their
// entries in cols (c * kh * kw, b * oh * ow). One block per (image, channel) plane, one thread
// per element: no atomics, so the result does not depend on scheduling.
template <typename T>
__device__ void col2im(const T* cols, T* dx, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                       uint32_t kh, uint32_t kw, uint32_t stride, uint32_t pad, uint32_t oh,
                       uint32_t ow) {
  typedef typename Acc<T>::type A;
  const uint32_t nc = blockIdx.x;  // n * c + ci
  const uint32_t n = nc / c, ci = nc % c;
  const uint32_t taps = kh * kw, seg = oh * ow;
  T* plane = dx + (size_t)nc * h * w;
  const uint32_t len = h * w;
  for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const int y = i / w, x = i - y * w;
    A acc = 0;
    for (uint32_t ky = 0; ky < kh; ++ky) {
      const int ty = y + (int)pad - (int)ky;
      if (ty < 0 || ty % (int)stride != 0) continue;
      const int oy = ty / (int)stride;
      if (oy >= (int)oh) continue;
      for (uint32_t kx = 0; kx < kw; ++kx) {
        const int tx = x + (int)pad - (int)kx;
        if (tx < 0 || tx % (int)stride != 0) continue;
        const int ox = tx / (int)stride;
        if (ox >= (int)ow) continue;
        const size_t s = ((size_t)(ci * taps + ky * kw + kx) * b + n) * seg;
        acc += load(cols[s + oy * ow + ox]);
      }
    }
    plane[i] = store<T>(acc);
  }
}

// A convolution's output from its GEMM: out (b, c_out, hw) = yt (c_out, b, hw) transposed, plus
// a bias per channel (bias_rows 1) or per (image, channel) (bias_rows b). One block per
// (image, channel) plane.
template <typename T>
__device__ void conv_out(const T* yt, const T* bias, T* out, uint32_t b, uint32_t c_out,
                         uint32_t hw, uint32_t bias_rows) {
  const uint32_t n = blockIdx.x / c_out, co = blockIdx.x % c_out;
  const T* src = yt + ((size_t)co * b + n) * hw;
  T* dst = out + (size_t)blockIdx.x * hw;
  const typename Acc<T>::type add = load(bias[bias_rows == 1 ? co : blockIdx.x]);
  for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) dst[j] = store<T>(load(src[j]) + add);
}

// Its backward: [dyt | dbias] with dyt (c_out, b, hw) the output gradient transposed back and
// dbias (b, c_out) the sum of each plane of it (summed over images by the caller for a bias
// per channel).
template <typename T>
__device__ void conv_out_bwd(const T* dout, T* packed, uint32_t b, uint32_t c_out, uint32_t hw) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const uint32_t n = blockIdx.x / c_out, co = blockIdx.x % c_out;
  const T* src = dout + (size_t)blockIdx.x * hw;
  T* dst = packed + ((size_t)co * b + n) * hw;
  A sum = 0;
  for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
    const T v = src[j];
    dst[j] = v;
    sum += load(v);
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) packed[(size_t)b * c_out * hw + blockIdx.x] = store<T>(sum);
}

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

// ---------------------------------------------------------------------------------------------
// GroupNorm. One block per (image, group); the group's elements are contiguous
// (cg channels of hw elements).

// The dropout mask of ops::Dropout (group_norm.rs): Wellons' lowbias32 hash of the element's
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

// y = dropout(act((x - mean) * rstd * a[n, c] + d[n, c])).
template <typename T>
__device__ void gn_fwd(const T* x, const T* a, const T* d, T* y, uint32_t groups, uint32_t c,
                       uint32_t hw, double eps, Post post) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const uint32_t cg = c / groups;
  const size_t len = (size_t)cg * hw;
  const size_t start = (size_t)blockIdx.x * len;  // blockIdx.x = n * groups + g
  const uint32_t n = blockIdx.x / groups, g = blockIdx.x % groups;
  A mean, rstd;
  group_stats(x + start, len, eps, scratch, &mean, &rstd);
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const size_t ch = (size_t)n * c + g * cg + cl;
    const A scale = load(a[ch]) * rstd, shift = load(d[ch]);
    const size_t base = start + (size_t)cl * hw;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      A h = (load(x[base + j]) - mean) * scale + shift;
      if (post.silu) h = h / ((A)1 + exp(-h));
      if (post.dropout) h *= mask_factor<A>(post, base + j);
      y[base + j] = store<T>(h);
    }
  }
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
// ad = [a | d], each (b, c). Dynamic shared memory: 2 * cg accumulators.
template <typename T>
__device__ void gn_bwd(const T* x, const T* ad, const T* dy, T* out, uint32_t b,
                       uint32_t groups, uint32_t c, uint32_t hw, double eps, Post post) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  extern __shared__ __align__(8) unsigned char dynamic[];
  A* chan = reinterpret_cast<A*>(dynamic);  // [sdhx | sdh], cg each
  const uint32_t cg = c / groups;
  const size_t len = (size_t)cg * hw;
  const size_t start = (size_t)blockIdx.x * len;
  const uint32_t n = blockIdx.x / groups, g = blockIdx.x % groups;
  const size_t bc = (size_t)b * c;
  const T* a = ad;
  const T* d = ad + bc;
  A mean, rstd;
  group_stats(x + start, len, eps, scratch, &mean, &rstd);
  // Pass 1: per-channel sums of dh * (x - mean) * rstd and of dh.
  for (uint32_t cl = 0; cl < cg; ++cl) {
    const size_t ch = (size_t)n * c + g * cg + cl;
    const A scale = load(a[ch]) * rstd, shift = load(d[ch]);
    const size_t base = start + (size_t)cl * hw;
    A sx = 0, s = 0;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      const A xc = load(x[base + j]) - mean;
      const A dh = pre_activation_grad<A>(post, load(dy[base + j]), xc * scale + shift, base + j);
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
    const size_t base = start + (size_t)cl * hw;
    for (uint32_t j = threadIdx.x; j < hw; j += blockDim.x) {
      const A xc = load(x[base + j]) - mean;
      const A dh = pre_activation_grad<A>(post, load(dy[base + j]), xc * scale + shift, base + j);
      dx[base + j] = store<T>(dh * scale + c0 + xc * c2);
    }
    if (threadIdx.x == 0) {
      out[(size_t)b * c * hw + ch] = store<T>(chan[cl]);
      out[(size_t)b * c * hw + bc + ch] = store<T>(chan[cg + cl]);
    }
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                   \
  extern "C" __global__ void im2col_##SUFFIX(const T* x, T* cols, uint32_t b, uint32_t c,       \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,  \
                                             uint32_t stride, uint32_t pad, uint32_t oh,        \
                                             uint32_t ow) {                                     \
    im2col<T>(x, cols, b, c, h, w, kh, kw, stride, pad, oh, ow);                                \
  }                                                                                              \
  extern "C" __global__ void col2im_##SUFFIX(const T* cols, T* dx, uint32_t b, uint32_t c,      \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,  \
                                             uint32_t stride, uint32_t pad, uint32_t oh,        \
                                             uint32_t ow) {                                     \
    col2im<T>(cols, dx, b, c, h, w, kh, kw, stride, pad, oh, ow);                               \
  }                                                                                              \
  extern "C" __global__ void conv_out_##SUFFIX(const T* yt, const T* bias, T* out, uint32_t b,  \
                                               uint32_t c_out, uint32_t hw, uint32_t bias_rows) { \
    conv_out<T>(yt, bias, out, b, c_out, hw, bias_rows);                                         \
  }                                                                                              \
  extern "C" __global__ void conv_out_bwd_##SUFFIX(const T* dout, T* packed, uint32_t b,        \
                                                   uint32_t c_out, uint32_t hw) {               \
    conv_out_bwd<T>(dout, packed, b, c_out, hw);                                                 \
  }                                                                                              \
  extern "C" __global__ void upsample2x_##SUFFIX(const T* x, T* y, uint32_t h, uint32_t w) {    \
    upsample2x<T>(x, y, h, w);                                                                   \
  }                                                                                              \
  extern "C" __global__ void upsample2x_adjoint_##SUFFIX(const T* dy, T* dx, uint32_t h,        \
                                                         uint32_t w) {                          \
    upsample2x_adjoint<T>(dy, dx, h, w);                                                         \
  }                                                                                              \
  extern "C" __global__ void group_norm_fwd_##SUFFIX(const T* x, const T* a, const T* d, T* y,  \
                                                     uint32_t groups, uint32_t c, uint32_t hw,  \
                                                     double eps, POST_PARAMS) {                 \
    gn_fwd<T>(x, a, d, y, groups, c, hw, eps, POST);                                            \
  }                                                                                              \
  extern "C" __global__ void group_norm_bwd_##SUFFIX(const T* x, const T* ad, const T* dy,      \
                                                     T* out, uint32_t b, uint32_t groups,       \
                                                     uint32_t c, uint32_t hw, double eps,       \
                                                     POST_PARAMS) {                             \
    gn_bwd<T>(x, ad, dy, out, b, groups, c, hw, eps, POST);                                     \
  }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
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
