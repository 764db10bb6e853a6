// The convolution's CUDA kernels (see conv/cuda.rs): im2col / col2im for convolutions on
// cuBLAS GEMMs, and the GEMM output's transpose with the bias. Part of cuda/kernels.cu (after
// cuda/common.cuh).

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

#define INSTANTIATE_CONV(T, SUFFIX)                                                              \
  extern "C" __global__ void im2col_##SUFFIX(const T* x, T* cols, uint32_t b, uint32_t c,        \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,   \
                                             uint32_t stride, uint32_t pad, uint32_t oh,         \
                                             uint32_t ow) {                                      \
    im2col<T, 1>(x, cols, b, c, h, w, kh, kw, stride, pad, oh, ow);                              \
  }                                                                                              \
  extern "C" __global__ void im2col_vec_##SUFFIX(const T* x, T* cols, uint32_t b, uint32_t c,    \
                                                 uint32_t h, uint32_t w, uint32_t kh,            \
                                                 uint32_t kw, uint32_t stride, uint32_t pad,     \
                                                 uint32_t oh, uint32_t ow) {                     \
    im2col<T, 16 / sizeof(T)>(x, cols, b, c, h, w, kh, kw, stride, pad, oh, ow);                 \
  }                                                                                              \
  extern "C" __global__ void col2im_##SUFFIX(const T* cols, T* dx, uint32_t b, uint32_t c,       \
                                             uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,   \
                                             uint32_t stride, uint32_t pad, uint32_t oh,         \
                                             uint32_t ow) {                                      \
    col2im<T>(cols, dx, b, c, h, w, kh, kw, stride, pad, oh, ow);                                \
  }                                                                                              \
  extern "C" __global__ void col2im_vec_##SUFFIX(const T* cols, T* dx, uint32_t b, uint32_t c,   \
                                                 uint32_t h, uint32_t w, uint32_t kh,            \
                                                 uint32_t kw, uint32_t stride, uint32_t pad,     \
                                                 uint32_t oh, uint32_t ow) {                     \
    col2im_vec<T>(cols, dx, b, c, h, w, kh, kw, pad, oh, ow);                                    \
  }                                                                                              \
  extern "C" __global__ void conv_out_##SUFFIX(const T* yt, const T* bias, T* out, uint32_t b,   \
                                               uint32_t c_out, uint32_t hw, uint32_t bias_rows) { \
    conv_out<T, 1>(yt, bias, out, b, c_out, hw, bias_rows);                                      \
  }                                                                                              \
  extern "C" __global__ void conv_out_vec_##SUFFIX(const T* yt, const T* bias, T* out,           \
                                                   uint32_t b, uint32_t c_out, uint32_t hw,      \
                                                   uint32_t bias_rows) {                         \
    conv_out<T, 16 / sizeof(T)>(yt, bias, out, b, c_out, hw, bias_rows);                         \
  }                                                                                              \
  extern "C" __global__ void conv_out_bwd_##SUFFIX(const T* dout, T* packed, uint32_t b,         \
                                                   uint32_t c_out, uint32_t hw) {                \
    conv_out_bwd<T, 1>(dout, packed, b, c_out, hw);                                              \
  }                                                                                              \
  extern "C" __global__ void conv_out_bwd_vec_##SUFFIX(const T* dout, T* packed, uint32_t b,     \
                                                       uint32_t c_out, uint32_t hw) {            \
    conv_out_bwd<T, 16 / sizeof(T)>(dout, packed, b, c_out, hw);                                 \
  }

INSTANTIATE_CONV(float, f32)
INSTANTIATE_CONV(double, f64)
INSTANTIATE_CONV(__half, f16)
INSTANTIATE_CONV(__nv_bfloat16, bf16)
