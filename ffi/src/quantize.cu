// MXFP8 quantize / dequantize / scale swizzle kernels and their XLA FFI handlers.
//
// Numerics follow shared/design/numerics.md bit for bit (jax_mxfp8/reference.py is the jnp
// mirror): block maxima are taken on float32 bit patterns, scale exponents come from the
// exponent/mantissa bits (no log2/exp2), powers of two are built from bits, and the only
// rounding is one RNE conversion to e4m3 (quantize) or to the output dtype (dequantize).
// Build without fast-math: subnormal float32 products must not be flushed.
//
// Memory layout of the work: K is a multiple of 32, so the flattened input is a sequence of
// 32-element blocks and the row-major scales are exactly the flattened block index. A thread
// owns a "unit" of 16 consecutive elements (16-byte vector loads of the input, one 16-byte
// store of e4m3 values); the two lanes of a block exchange their partial maxima with one
// shuffle. The swizzled (F8_128x4) scale layout needs the block's (batch, row, column); its
// zero padding is written by extra work items of the same launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "jax_mxfp8/ffi_common.h"

namespace jax_mxfp8 {
namespace {

constexpr int kBlockSize = 32;        // elements per scale
constexpr int kUnit = 16;             // elements per thread per step
constexpr int kThreads = 256;         // threads per CTA
constexpr uint32_t kNonFinite = 0x7F800000u;  // |bits| >= this: Inf or NaN
constexpr uint8_t kScaleNaN = 255;
constexpr uint8_t kValueNaN = 0x7F;

enum Rounding : int32_t { kCeil = 0, kFloor = 1, kNaive = 2 };

// ---- launch geometry: a grid-stride loop over a grid sized to the chip --------------------

// CTAs of `kKernel` resident on the whole device (SM count x occupancy), cached per kernel
// and device: later calls cost two cheap runtime queries at most.
template <auto kKernel>
cudaError_t ResidentCtas(int* out) {
  static std::atomic<int> cache[64];  // by device ordinal; 0 = not computed yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int cached = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (cached > 0) {
    *out = cached;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  *out = sms * (per_sm > 0 ? per_sm : 1);
  if (device < 64) cache[device].store(*out, std::memory_order_relaxed);
  return cudaSuccess;
}

// Grid for a grid-stride loop over work_items threads: never more CTAs than fit at once, so
// every CTA stays resident and the work is split evenly.
template <auto kKernel>
cudaError_t GridFor(uint64_t work_items, unsigned* grid) {
  int resident = 0;
  cudaError_t err = ResidentCtas<kKernel>(&resident);
  if (err != cudaSuccess) return err;
  const uint64_t needed = (work_items + kThreads - 1) / kThreads;
  *grid = static_cast<unsigned>(needed < static_cast<uint64_t>(resident) ? needed : resident);
  return cudaSuccess;
}

// ---- element access ------------------------------------------------------------------------

template <typename T>
struct InputTraits;

template <>
struct InputTraits<__nv_bfloat16> {
  static __device__ __forceinline__ void Load16(const __nv_bfloat16* p, float (&v)[kUnit]) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    uint4 a = __ldg(q), b = __ldg(q + 1);
    uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // bf16 -> f32 is a 16-bit shift (exact, keeps subnormals)
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct InputTraits<__half> {
  static __device__ __forceinline__ void Load16(const __half* p, float (&v)[kUnit]) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    uint4 a = __ldg(q), b = __ldg(q + 1);
    uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      __half2 h = *reinterpret_cast<__half2*>(&w[i]);
      float2 f = __half22float2(h);  // exact
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};

template <>
struct InputTraits<float> {
  static __device__ __forceinline__ void Load16(const float* p, float (&v)[kUnit]) {
    const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float4 f = __ldg(q + i);
      v[4 * i] = f.x;
      v[4 * i + 1] = f.y;
      v[4 * i + 2] = f.z;
      v[4 * i + 3] = f.w;
    }
  }
};

// Biased e8m0 exponent from the float32 bit pattern of a finite, non-negative amax.
template <int kRule>
__device__ __forceinline__ int ScaleExponent(uint32_t amax_bits) {
  int exponent = static_cast<int>(amax_bits >> 23);  // 0 for zero / subnormal
  int e_b;
  if (kRule == kCeil) {
    // amax = 1.m * 2^(E-127) <= 448 * 2^(e_b-127) = 1.75 * 2^(e_b-119): e_b = E-8, +1 if 1.m > 1.75.
    e_b = exponent == 0 ? 0 : exponent - 8 + ((amax_bits & 0x7FFFFFu) > 0x600000u ? 1 : 0);
  } else if (kRule == kFloor) {
    e_b = exponent - 8;  // floor(log2 amax) - 8 + 127
  } else {
    e_b = exponent > 1 ? exponent : 1;  // floor(log2(max(amax, 2^-126))) + 127
  }
  return min(max(e_b, 0), 254);
}

// 2^(127 - e_b) for e_b in [0, 254]. 2^-127 (e_b = 254) is the float32 subnormal 0x00400000;
// one multiply by it is exact whenever the product is normal, and a product below 2^-126 is an
// e4m3 (signed) zero either way, so this equals the reference's two-step scaling bit for bit.
__device__ __forceinline__ float InverseScale(int e_b) {
  int biased = 254 - e_b;  // exponent field of 2^(127 - e_b)
  return __uint_as_float(biased > 0 ? static_cast<uint32_t>(biased) << 23 : 0x00400000u);
}

// 2^(e_b - 127) for e_b in [0, 254]; NaN for 255.
__device__ __forceinline__ float Scale(uint32_t e_b) {
  if (e_b == kScaleNaN) return __uint_as_float(0x7FC00000u);
  return __uint_as_float(e_b > 0 ? e_b << 23 : 0x00400000u);
}

// e4m3 RNE of 16 scaled values, packed little-endian. The saturating hardware conversion is
// safe for every rule: scaled magnitudes never exceed 448 (ceil, naive by construction; floor
// clips first), and it is a single instruction per pair.
__device__ __forceinline__ uint4 ToE4M3(const float (&s)[kUnit]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(s[4 * i], s[4 * i + 1]), __NV_SATFINITE, __NV_E4M3);
    uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(s[4 * i + 2], s[4 * i + 3]), __NV_SATFINITE, __NV_E4M3);
    w[i] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Byte offset of scale (r, c) inside one batch's F8_128x4 tile set (numerics.md).
__device__ __forceinline__ uint32_t SwizzledOffset(uint32_t r, uint32_t c, uint32_t kbp) {
  return ((r >> 7) * (kbp >> 2) + (c >> 2)) * 512u + (r & 31u) * 16u + ((r & 127u) >> 5) * 4u + (c & 3u);
}

struct ScaleGeometry {
  uint32_t cols;         // Kb = K / 32 scale columns
  uint32_t rows;         // M: rows per batch index (swizzled layout only)
  uint32_t padded_rows;  // Mp
  uint32_t padded_cols;  // Kbp
  uint64_t batch_bytes;  // Mp * Kbp
};

// ---- quantize ------------------------------------------------------------------------------

// units: number of 16-element units (2 per block). pad_items (swizzled only): one uint32 zero
// store per (batch, padding row, 4-column group).
template <typename T, int kRule, bool kSwizzle>
__global__ void __launch_bounds__(kThreads)
QuantizeKernel(const T* __restrict__ x, uint8_t* __restrict__ values, uint8_t* __restrict__ scales,
               uint64_t units, uint64_t pad_items, ScaleGeometry g) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  // Warp-uniform trip count (units rounded up to a warp) so the pair shuffle sees a full warp.
  const uint64_t warp_units = (units + 31) & ~uint64_t{31};
  for (uint64_t unit = first; unit < warp_units; unit += stride) {
    const bool active = unit < units;
    float v[kUnit];
    uint32_t amax_bits = 0;
    if (active) {
      InputTraits<T>::Load16(x + unit * kUnit, v);
#pragma unroll
      for (int i = 0; i < kUnit; ++i) amax_bits = max(amax_bits, __float_as_uint(v[i]) & 0x7FFFFFFFu);
    }
    // Max of |bits| orders finite magnitudes and puts Inf/NaN (>= 0x7F800000) on top.
    amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, 1));
    if (!active) continue;

    uint4 packed;
    uint8_t scale_byte;
    if (amax_bits >= kNonFinite) {
      const uint32_t nan4 = kValueNaN * 0x01010101u;
      packed = make_uint4(nan4, nan4, nan4, nan4);
      scale_byte = kScaleNaN;
    } else {
      const int e_b = ScaleExponent<kRule>(amax_bits);
      const float inv = InverseScale(e_b);
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        v[i] *= inv;
        if (kRule == kFloor) v[i] = fminf(fmaxf(v[i], -448.0f), 448.0f);
      }
      packed = ToE4M3(v);
      scale_byte = static_cast<uint8_t>(e_b);
    }
    reinterpret_cast<uint4*>(values)[unit] = packed;

    if ((unit & 1) == 0) {  // the first lane of the block writes its scale
      const uint32_t block = static_cast<uint32_t>(unit >> 1);
      if (!kSwizzle) {
        scales[block] = scale_byte;
      } else {
        const uint32_t row_flat = block / g.cols;
        const uint32_t c = block - row_flat * g.cols;
        const uint32_t batch = row_flat / g.rows;
        const uint32_t r = row_flat - batch * g.rows;
        uint8_t* tile = scales + batch * g.batch_bytes;
        tile[SwizzledOffset(r, c, g.padded_cols)] = scale_byte;
        if (c + 1 == g.cols) {  // the row's last block also zeroes its group's padding columns
          for (uint32_t pc = g.cols; pc < g.padded_cols; ++pc) tile[SwizzledOffset(r, pc, g.padded_cols)] = 0;
        }
      }
    }
  }
  if (kSwizzle) {  // padding rows [M, Mp) of every batch index: 4 zero bytes per item
    const uint32_t groups = g.padded_cols >> 2;
    const uint32_t pad_rows = g.padded_rows - g.rows;
    for (uint64_t item = first; item < pad_items; item += stride) {
      const uint32_t i = static_cast<uint32_t>(item);
      const uint32_t per_batch = pad_rows * groups;
      const uint32_t batch = i / per_batch;
      const uint32_t rem = i - batch * per_batch;
      const uint32_t r = g.rows + rem / groups;
      const uint32_t c = (rem % groups) * 4;
      uint8_t* tile = scales + batch * g.batch_bytes;
      *reinterpret_cast<uint32_t*>(tile + SwizzledOffset(r, c, g.padded_cols)) = 0;
    }
  }
}

// ---- dequantize ----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void Store16(T* p, const float (&v)[kUnit]);

template <>
__device__ __forceinline__ void Store16(__nv_bfloat16* p, const float (&v)[kUnit]) {
  uint32_t w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);  // RNE, keeps subnormals
    w[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  uint4* q = reinterpret_cast<uint4*>(p);
  q[0] = make_uint4(w[0], w[1], w[2], w[3]);
  q[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

template <>
__device__ __forceinline__ void Store16(__half* p, const float (&v)[kUnit]) {
  uint32_t w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);  // RNE; overflow -> Inf
    w[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  uint4* q = reinterpret_cast<uint4*>(p);
  q[0] = make_uint4(w[0], w[1], w[2], w[3]);
  q[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

template <>
__device__ __forceinline__ void Store16(float* p, const float (&v)[kUnit]) {
  float4* q = reinterpret_cast<float4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
DequantizeKernel(const uint8_t* __restrict__ values, const uint8_t* __restrict__ scales,
                 T* __restrict__ out, uint64_t units) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t unit = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; unit < units;
       unit += stride) {
    const uint4 packed = __ldg(reinterpret_cast<const uint4*>(values) + unit);
    const float scale = Scale(__ldg(scales + (unit >> 1)));
    const uint32_t w[4] = {packed.x, packed.y, packed.z, packed.w};
    float v[kUnit];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // e4m3 -> f16 is exact; f16 -> f32 is exact
        __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>(w[i] >> (16 * half)), __NV_E4M3);
        float2 f = __half22float2(*reinterpret_cast<__half2*>(&raw));
        v[4 * i + 2 * half] = f.x * scale;  // exact unless the result is a float32 subnormal/overflow
        v[4 * i + 2 * half + 1] = f.y * scale;
      }
    }
    Store16(out + unit * kUnit, v);
  }
}

// ---- swizzle / unswizzle -------------------------------------------------------------------

// One thread per 16 output bytes: rows {r, r+32, r+64, r+96} of a 128-row tile x 4 columns.
__global__ void __launch_bounds__(kThreads)
SwizzleKernel(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, uint64_t chunks, ScaleGeometry g) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  const uint32_t chunks_per_batch = static_cast<uint32_t>(g.batch_bytes / 16);
  for (uint64_t item = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; item < chunks;
       item += stride) {
    const uint32_t batch = static_cast<uint32_t>(item / chunks_per_batch);
    const uint32_t chunk = static_cast<uint32_t>(item - static_cast<uint64_t>(batch) * chunks_per_batch);
    const uint32_t atom = chunk >> 5;  // 32 chunks of 16 bytes per 512-byte atom
    const uint32_t row_tile = atom / (g.padded_cols >> 2);
    const uint32_t col_group = atom - row_tile * (g.padded_cols >> 2);
    const uint32_t r0 = row_tile * 128 + (chunk & 31);
    const uint8_t* src = in + static_cast<uint64_t>(batch) * g.rows * g.cols;
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // q = (r % 128) / 32
      const uint32_t r = r0 + 32 * q;
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t c = col_group * 4 + j;
        if (r < g.rows && c < g.cols) word |= static_cast<uint32_t>(src[static_cast<uint64_t>(r) * g.cols + c]) << (8 * j);
      }
      w[q] = word;
    }
    reinterpret_cast<uint4*>(out + static_cast<uint64_t>(batch) * g.batch_bytes)[chunk] =
        make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// One thread per output byte (scales are 1/32 of the data; coalesced writes matter more).
__global__ void __launch_bounds__(kThreads)
UnswizzleKernel(const uint8_t* __restrict__ in, uint8_t* __restrict__ out, uint64_t total, ScaleGeometry g) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  const uint64_t per_batch = static_cast<uint64_t>(g.rows) * g.cols;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const uint64_t batch = i / per_batch;
    const uint32_t rc = static_cast<uint32_t>(i - batch * per_batch);
    const uint32_t r = rc / g.cols;
    const uint32_t c = rc - r * g.cols;
    out[i] = in[batch * g.batch_bytes + SwizzledOffset(r, c, g.padded_cols)];
  }
}

// ---- handlers ------------------------------------------------------------------------------

ffi::Error Invalid(const std::string& op, const std::string& what) {
  return ffi::Error::InvalidArgument("jax_mxfp8_" + op + "_cuda: " + what);
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

uint32_t RoundUp(uint32_t x, uint32_t m) { return (x + m - 1) / m * m; }

// Scale geometry of [..., M, K/32] scales; batch = product of the leading dims before M.
ScaleGeometry Geometry(uint32_t rows, uint32_t cols) {
  ScaleGeometry g;
  g.cols = cols;
  g.rows = rows;
  g.padded_rows = RoundUp(rows, 128);
  g.padded_cols = RoundUp(cols, 4);
  g.batch_bytes = static_cast<uint64_t>(g.padded_rows) * g.padded_cols;
  return g;
}

template <typename T, int kRule, bool kSwizzle>
ffi::Error LaunchQuantize(cudaStream_t stream, const void* x, void* values, void* scales,
                          uint64_t units, uint64_t pad_items, const ScaleGeometry& g) {
  constexpr auto kernel = QuantizeKernel<T, kRule, kSwizzle>;
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<kernel>(units > pad_items ? units : pad_items, &grid));
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<uint8_t*>(values),
                                        static_cast<uint8_t*>(scales), units, pad_items, g);
  return CheckLaunch("mxfp8 quantize kernel");
}

template <typename T>
ffi::Error DispatchRule(int32_t rounding, bool swizzle, cudaStream_t stream, const void* x, void* values,
                        void* scales, uint64_t units, uint64_t pad_items, const ScaleGeometry& g) {
#define JAX_MXFP8_QUANTIZE_CASE(rule)                                                          \
  case rule:                                                                                   \
    return swizzle ? LaunchQuantize<T, rule, true>(stream, x, values, scales, units, pad_items, g) \
                   : LaunchQuantize<T, rule, false>(stream, x, values, scales, units, pad_items, g);
  switch (rounding) {
    JAX_MXFP8_QUANTIZE_CASE(kCeil)
    JAX_MXFP8_QUANTIZE_CASE(kFloor)
    JAX_MXFP8_QUANTIZE_CASE(kNaive)
    default:
      return Invalid("quantize", "rounding must be 0 (ceil), 1 (floor) or 2 (naive), got " +
                                     std::to_string(rounding));
  }
#undef JAX_MXFP8_QUANTIZE_CASE
}

ffi::Error QuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> values,
                        ffi::Result<ffi::AnyBuffer> scales, int32_t rounding, bool swizzle) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return Invalid("quantize", "x must have at least one dimension");
  const int64_t k = dims[dims.size() - 1];
  if (k <= 0 || k % kBlockSize != 0)
    return Invalid("quantize", "the last dimension K=" + std::to_string(k) + " must be a positive multiple of 32");
  if (values->element_type() != ffi::DataType::F8E4M3FN || values->element_count() != x.element_count())
    return Invalid("quantize", "values must be float8_e4m3fn with x's shape");
  if (scales->element_type() != ffi::DataType::U8)
    return Invalid("quantize", "scales must be uint8");
  const uint64_t elements = x.element_count();
  const uint64_t blocks = elements / kBlockSize;
  if (blocks >= (uint64_t{1} << 31)) return Invalid("quantize", "too many blocks (>= 2^31) for one call");
  const uint32_t cols = static_cast<uint32_t>(k / kBlockSize);
  const uint64_t total_rows = blocks / cols;
  // Swizzled: the dimension before K is M; the rest is batch (rank-1 input: M = 1).
  const uint32_t rows = swizzle && dims.size() >= 2 ? static_cast<uint32_t>(dims[dims.size() - 2])
                                                    : static_cast<uint32_t>(total_rows ? 1 : 0);
  const ScaleGeometry g = Geometry(swizzle ? rows : 1, cols);
  const uint64_t batches = swizzle && rows > 0 ? total_rows / rows : 0;
  const uint64_t expected_scales = swizzle ? batches * g.batch_bytes : blocks;
  if (scales->element_count() != expected_scales)
    return Invalid("quantize", "scales has " + std::to_string(scales->element_count()) + " bytes, expected " +
                                   std::to_string(expected_scales) + (swizzle ? " ([..., Mp*Kbp])" : " ([..., K/32])"));
  if (elements == 0) return ffi::Error::Success();
  if (!Aligned16(x.untyped_data()) || !Aligned16(values->untyped_data()))
    return Invalid("quantize", "x and values must be 16-byte aligned");
  const uint64_t units = elements / kUnit;
  const uint64_t pad_items = swizzle ? batches * (g.padded_rows - g.rows) * (g.padded_cols / 4) : 0;
  if (pad_items >= (uint64_t{1} << 32) || g.batch_bytes >= (uint64_t{1} << 32))
    return Invalid("quantize", "swizzled scales too large for one call");
  void* xp = x.untyped_data();
  void* vp = values->untyped_data();
  void* sp = scales->untyped_data();
  switch (x.element_type()) {
    case ffi::DataType::BF16:
      return DispatchRule<__nv_bfloat16>(rounding, swizzle, stream, xp, vp, sp, units, pad_items, g);
    case ffi::DataType::F16:
      return DispatchRule<__half>(rounding, swizzle, stream, xp, vp, sp, units, pad_items, g);
    case ffi::DataType::F32:
      return DispatchRule<float>(rounding, swizzle, stream, xp, vp, sp, units, pad_items, g);
    default:
      return Invalid("quantize", "x must be bfloat16, float16 or float32");
  }
}

template <typename T>
ffi::Error LaunchDequantize(cudaStream_t stream, const void* values, const void* scales, void* out,
                            uint64_t units) {
  constexpr auto kernel = DequantizeKernel<T>;
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<kernel>(units, &grid));
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(values), static_cast<const uint8_t*>(scales),
                                        static_cast<T*>(out), units);
  return CheckLaunch("mxfp8 dequantize kernel");
}

ffi::Error DequantizeImpl(cudaStream_t stream, ffi::AnyBuffer values, ffi::AnyBuffer scales,
                          ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = values.dimensions();
  if (dims.size() < 1) return Invalid("dequantize", "values must have at least one dimension");
  const int64_t k = dims[dims.size() - 1];
  if (k <= 0 || k % kBlockSize != 0)
    return Invalid("dequantize", "the last dimension K=" + std::to_string(k) + " must be a positive multiple of 32");
  if (values.element_type() != ffi::DataType::F8E4M3FN) return Invalid("dequantize", "values must be float8_e4m3fn");
  if (scales.element_type() != ffi::DataType::U8 && scales.element_type() != ffi::DataType::F8E8M0FNU)
    return Invalid("dequantize", "scales must be uint8 or float8_e8m0fnu");
  const uint64_t elements = values.element_count();
  if (scales.element_count() != elements / kBlockSize)
    return Invalid("dequantize", "scales must have shape [..., K/32] matching values");
  if (out->element_count() != elements) return Invalid("dequantize", "the result must have values' shape");
  if (elements == 0) return ffi::Error::Success();
  if (!Aligned16(values.untyped_data()) || !Aligned16(out->untyped_data()))
    return Invalid("dequantize", "values and the result must be 16-byte aligned");
  const uint64_t units = elements / kUnit;
  switch (out->element_type()) {
    case ffi::DataType::BF16:
      return LaunchDequantize<__nv_bfloat16>(stream, values.untyped_data(), scales.untyped_data(),
                                             out->untyped_data(), units);
    case ffi::DataType::F16:
      return LaunchDequantize<__half>(stream, values.untyped_data(), scales.untyped_data(), out->untyped_data(), units);
    case ffi::DataType::F32:
      return LaunchDequantize<float>(stream, values.untyped_data(), scales.untyped_data(), out->untyped_data(), units);
    default:
      return Invalid("dequantize", "the result dtype must be bfloat16, float16 or float32");
  }
}

ffi::Error SwizzleImpl(cudaStream_t stream, ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = scales.dimensions();
  if (dims.size() < 2) return Invalid("swizzle_scales", "scales must be [..., M, Kb]");
  if (scales.element_type() != ffi::DataType::U8 || out->element_type() != ffi::DataType::U8)
    return Invalid("swizzle_scales", "scales and the result must be uint8");
  const uint32_t rows = static_cast<uint32_t>(dims[dims.size() - 2]);
  const uint32_t cols = static_cast<uint32_t>(dims[dims.size() - 1]);
  const ScaleGeometry g = Geometry(rows, cols);
  const uint64_t per_batch = static_cast<uint64_t>(rows) * cols;
  const uint64_t batches = per_batch ? scales.element_count() / per_batch : 0;
  if (out->element_count() != batches * g.batch_bytes)
    return Invalid("swizzle_scales", "the result must be [..., Mp*Kbp]");
  if (out->element_count() == 0) return ffi::Error::Success();
  if (out->element_count() >= (uint64_t{1} << 36)) return Invalid("swizzle_scales", "too large");
  if (!Aligned16(out->untyped_data())) return Invalid("swizzle_scales", "the result must be 16-byte aligned");
  const uint64_t chunks = out->element_count() / 16;
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<SwizzleKernel>(chunks, &grid));
  SwizzleKernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(scales.untyped_data()),
                                               static_cast<uint8_t*>(out->untyped_data()), chunks, g);
  return CheckLaunch("mxfp8 swizzle_scales kernel");
}

ffi::Error UnswizzleImpl(cudaStream_t stream, ffi::AnyBuffer swizzled, ffi::Result<ffi::AnyBuffer> out,
                         int64_t rows, int64_t cols) {
  if (swizzled.element_type() != ffi::DataType::U8 || out->element_type() != ffi::DataType::U8)
    return Invalid("unswizzle_scales", "input and result must be uint8");
  if (rows < 0 || cols < 0 || rows >= (int64_t{1} << 31) || cols >= (int64_t{1} << 31))
    return Invalid("unswizzle_scales", "rows and cols must be in [0, 2^31)");
  const ScaleGeometry g = Geometry(static_cast<uint32_t>(rows), static_cast<uint32_t>(cols));
  const uint64_t batches = g.batch_bytes ? swizzled.element_count() / g.batch_bytes : 0;
  if (swizzled.element_count() != batches * g.batch_bytes ||
      out->element_count() != batches * static_cast<uint64_t>(rows) * cols)
    return Invalid("unswizzle_scales", "input must be [..., Mp*Kbp] and the result [..., rows, cols]");
  const uint64_t total = out->element_count();
  if (total == 0) return ffi::Error::Success();
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<UnswizzleKernel>(total, &grid));
  UnswizzleKernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(swizzled.untyped_data()),
                                                 static_cast<uint8_t*>(out->untyped_data()), total, g);
  return CheckLaunch("mxfp8 unswizzle_scales kernel");
}

}  // namespace
}  // namespace jax_mxfp8

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp8QuantizeCuda, jax_mxfp8::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("rounding")
                                  .Attr<bool>("swizzle"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp8DequantizeCuda, jax_mxfp8::DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp8SwizzleScalesCuda, jax_mxfp8::SwizzleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp8UnswizzleScalesCuda, jax_mxfp8::UnswizzleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols"),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_quantize_cuda", JaxMxfp8QuantizeCuda);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_dequantize_cuda", JaxMxfp8DequantizeCuda);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_swizzle_scales_cuda", JaxMxfp8SwizzleScalesCuda);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_unswizzle_scales_cuda", JaxMxfp8UnswizzleScalesCuda);
