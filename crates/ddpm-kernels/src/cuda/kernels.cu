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

// im2col: cols (c * kh * kw, b * oh * ow) from x (b, c, h, w), zero where a window leaves the
// input (padding `pad` before; the end padding is implied by oh, ow). Rows are (channel, tap),
// columns (image, output pixel), so that a convolution is one GEMM W (c_out, c kh kw) x cols,
// and its weight gradient one GEMM too (no per-image products summed afterwards).
//
// One thread per (channel, image, output row, V consecutive output columns) writes the V
// entries of every tap (kh * kw rows of cols): the index arithmetic, which bounded the first
// version (one thread per entry), is done once per kh * kw * V entries, consecutive threads
// write consecutive addresses, and with V * sizeof(T) = 16 (ow a multiple of V) each tap is one
// 16-byte store. 32-bit index arithmetic (the host checks that every tensor has fewer than
// 2^32 elements).
template <typename T, uint32_t V>
__device__ void im2col(const T* x, T* cols, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                       uint32_t kh, uint32_t kw, uint32_t stride, uint32_t pad, uint32_t oh,
                       uint32_t ow) {
  const uint32_t chunks = ow / V;
  const uint32_t ohw = oh * ow;
  const size_t next_row = (size_t)b * ohw;  // from one row of cols to the next
  const T zero = store<T>((typename Acc<T>::type)0);
  GRID_STRIDE(t, c * b * oh * chunks) {
    const uint32_t q = t / chunks, ox0 = (t - q * chunks) * V;
    const uint32_t r = q / oh, oy = q - r * oh;
    const uint32_t ci = r / b, n = r - ci * b;
    const T* plane = x + ((size_t)n * c + ci) * h * w;
    T* out = cols + ((size_t)ci * kh * kw * b + n) * ohw + oy * ow + ox0;
    for (uint32_t ky = 0; ky < kh; ++ky) {
      const int iy = (int)(oy * stride + ky) - (int)pad;
      const bool row_in = iy >= 0 && iy < (int)h;
      const T* src = plane + (row_in ? iy : 0) * w;
      for (uint32_t kx = 0; kx < kw; ++kx, out += next_row) {
        const int ix0 = (int)(ox0 * stride + kx) - (int)pad;
        Pack<T, V> pack;
#pragma unroll
        for (uint32_t v = 0; v < V; ++v) {
          const int ix = ix0 + (int)(v * stride);
          pack.v[v] = (row_in && ix >= 0 && ix < (int)w) ? src[ix] : zero;
        }
        pack.store_to(out);
      }
    }
  }
}

// col2im: dx (b, c, h, w) = the sum over the windows that read each input element of their
// entries in cols (c * kh * kw, b * oh * ow). One thread per element: no atomics, so the result
// does not depend on scheduling.
template <typename T>
__device__ void col2im(const T* cols, T* dx, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                       uint32_t kh, uint32_t kw, uint32_t stride, uint32_t pad, uint32_t oh,
                       uint32_t ow) {
  typedef typename Acc<T>::type A;
  const uint32_t taps = kh * kw, seg = oh * ow, len = h * w;
  GRID_STRIDE(t, b * c * len) {
    const uint32_t nc = t / len, i = t - nc * len;
    const uint32_t n = nc / c, ci = nc - n * c;
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
    dx[t] = store<T>(acc);
  }
}

// col2im of a stride-1 convolution, each thread summing V = 16 / sizeof(T) consecutive
// elements of one input row and writing them with one 16-byte store (the host uses it when w
// and h * w are multiples of V). For each tap the V entries read are consecutive in cols.
template <typename T>
__device__ void col2im_vec(const T* cols, T* dx, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                           uint32_t kh, uint32_t kw, uint32_t pad, uint32_t oh, uint32_t ow) {
  typedef typename Acc<T>::type A;
  constexpr uint32_t V = 16 / sizeof(T);
  const uint32_t taps = kh * kw, seg = oh * ow, chunks = w / V;
  GRID_STRIDE(t, b * c * h * chunks) {
    const uint32_t q = t / chunks, x0 = (t - q * chunks) * V;
    const uint32_t nc = q / h, y = q - nc * h;
    const uint32_t n = nc / c, ci = nc - n * c;
    A acc[V];
#pragma unroll
    for (uint32_t v = 0; v < V; ++v) acc[v] = 0;
    for (uint32_t ky = 0; ky < kh; ++ky) {
      const int oy = (int)y + (int)pad - (int)ky;
      if (oy < 0 || oy >= (int)oh) continue;
      for (uint32_t kx = 0; kx < kw; ++kx) {
        const T* src = cols + ((size_t)(ci * taps + ky * kw + kx) * b + n) * seg + oy * ow;
        const int ox0 = (int)x0 + (int)pad - (int)kx;
#pragma unroll
        for (uint32_t v = 0; v < V; ++v) {
          const int ox = ox0 + (int)v;
          if (ox >= 0 && ox < (int)ow) acc[v] += load(src[ox]);
        }
      }
    }
    Pack<T, V> pack;
#pragma unroll
    for (uint32_t v = 0; v < V; ++v) pack.v[v] = store<T>(acc[v]);
    pack.store_to(dx + (size_t)q * w + x0);
  }
}

// A convolution's output from its GEMM: out (b, c_out, hw) = yt (c_out, b, hw) transposed, plus
// a bias per channel (bias_rows 1) or per (image, channel) (bias_rows b). One thread per V
// consecutive elements of a plane (V divides hw).
template <typename T, uint32_t V>
__device__ void conv_out(const T* yt, const T* bias, T* out, uint32_t b, uint32_t c_out,
                         uint32_t hw, uint32_t bias_rows) {
  typedef typename Acc<T>::type A;
  const uint32_t chunks = hw / V;
  GRID_STRIDE(t, b * c_out * chunks) {
    const uint32_t plane = t / chunks, j = (t - plane * chunks) * V;
    const uint32_t n = plane / c_out, co = plane - n * c_out;
    const A add = load(bias[bias_rows == 1 ? co : plane]);
    Pack<T, V> pack;
    pack.load_from(yt + ((size_t)co * b + n) * hw + j);
#pragma unroll
    for (uint32_t v = 0; v < V; ++v) pack.v[v] = store<T>((A)load(pack.v[v]) + add);
    pack.store_to(out + (size_t)plane * hw + j);
  }
}

// Its backward: [dyt | dbias] with dyt (c_out, b, hw) the output gradient transposed back and
// dbias (b, c_out) the sum of each plane of it (summed over images by the caller for a bias
// per channel). One warp per plane, V elements per lane and step.
template <typename T, uint32_t V>
__device__ void conv_out_bwd(const T* dout, T* packed, uint32_t b, uint32_t c_out, uint32_t hw) {
  typedef typename Acc<T>::type A;
  const uint32_t plane = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (plane >= b * c_out) return;
  const uint32_t n = plane / c_out, co = plane - n * c_out;
  const T* src = dout + (size_t)plane * hw;
  T* dst = packed + ((size_t)co * b + n) * hw;
  A sum = 0;
  for (uint32_t j = lane * V; j < hw; j += 32 * V) {
    Pack<T, V> pack;
    pack.load_from(src + j);
    pack.store_to(dst + j);
#pragma unroll
    for (uint32_t v = 0; v < V; ++v) sum += load(pack.v[v]);
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) packed[(size_t)b * c_out * hw + plane] = store<T>(sum);
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

#define INSTANTIATE(T, SUFFIX)                                                                   \
  extern "C" __global__ void im2col_##SUFFIX(const T* x, T* cols, uint32_t b, uint32_t c,       \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,  \
                                             uint32_t stride, uint32_t pad, uint32_t oh,        \
                                             uint32_t ow) {                                     \
    im2col<T, 1>(x, cols, b, c, h, w, kh, kw, stride, pad, oh, ow);                             \
  }                                                                                              \
  extern "C" __global__ void im2col_vec_##SUFFIX(const T* x, T* cols, uint32_t b, uint32_t c,   \
                                                 uint32_t h, uint32_t w, uint32_t kh,           \
                                                 uint32_t kw, uint32_t stride, uint32_t pad,    \
                                                 uint32_t oh, uint32_t ow) {                    \
    im2col<T, 16 / sizeof(T)>(x, cols, b, c, h, w, kh, kw, stride, pad, oh, ow);               \
  }                                                                                              \
  extern "C" __global__ void col2im_##SUFFIX(const T* cols, T* dx, uint32_t b, uint32_t c,      \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,  \
                                             uint32_t stride, uint32_t pad, uint32_t oh,        \
                                             uint32_t ow) {                                     \
    col2im<T>(cols, dx, b, c, h, w, kh, kw, stride, pad, oh, ow);                               \
  }                                                                                              \
  extern "C" __global__ void col2im_vec_##SUFFIX(const T* cols, T* dx, uint32_t b, uint32_t c,  \
                                                 uint32_t h, uint32_t w, uint32_t kh,           \
                                                 uint32_t kw, uint32_t stride, uint32_t pad,    \
                                                 uint32_t oh, uint32_t ow) {                    \
    col2im_vec<T>(cols, dx, b, c, h, w, kh, kw, pad, oh, ow);                                   \
  }                                                                                              \
  extern "C" __global__ void conv_out_##SUFFIX(const T* yt, const T* bias, T* out, uint32_t b,  \
                                               uint32_t c_out, uint32_t hw, uint32_t bias_rows) { \
    conv_out<T, 1>(yt, bias, out, b, c_out, hw, bias_rows);                                      \
  }                                                                                              \
  extern "C" __global__ void conv_out_vec_##SUFFIX(const T* yt, const T* bias, T* out,          \
                                                   uint32_t b, uint32_t c_out, uint32_t hw,     \
                                                   uint32_t bias_rows) {                        \
    conv_out<T, 16 / sizeof(T)>(yt, bias, out, b, c_out, hw, bias_rows);                         \
  }                                                                                              \
  extern "C" __global__ void conv_out_bwd_##SUFFIX(const T* dout, T* packed, uint32_t b,        \
                                                   uint32_t c_out, uint32_t hw) {               \
    conv_out_bwd<T, 1>(dout, packed, b, c_out, hw);                                              \
  }                                                                                              \
  extern "C" __global__ void conv_out_bwd_vec_##SUFFIX(const T* dout, T* packed, uint32_t b,    \
                                                       uint32_t c_out, uint32_t hw) {           \
    conv_out_bwd<T, 16 / sizeof(T)>(dout, packed, b, c_out, hw);                                 \
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
  }                                                                                              \
  extern "C" __global__ void group_norm_fwd_shared_##SUFFIX(                                     \
      const T* x, const T* a, const T* d, T* y, uint32_t groups, uint32_t c, uint32_t hw,         \
      double eps, POST_PARAMS) {                                                                 \
    gn_fwd_shared<T>(x, a, d, y, groups, c, hw, eps, POST);                                     \
  }                                                                                              \
  extern "C" __global__ void group_norm_bwd_shared_##SUFFIX(                                     \
      const T* x, const T* ad, const T* dy, T* out, uint32_t b, uint32_t groups, uint32_t c,     \
      uint32_t hw, double eps, POST_PARAMS) {                                                    \
    gn_bwd_shared<T>(x, ad, dy, out, b, groups, c, hw, eps, POST);                              \
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

// ---------------------------------------------------------------------------------------------
// Row softmax for attention (cuda/attention.rs): one warp per row of n entries, in place.
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
