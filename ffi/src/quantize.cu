// MXFP8 quantize / dequantize / scale swizzle kernels and their XLA FFI handlers.
//
// Numerics match jax_mxfp8/reference.py (the jnp definition) bit for bit: block maxima are
// taken on float32 bit patterns, scale exponents come from the exponent/mantissa bits (no
// log2/exp2), powers of two are built from bits, and the only rounding is one RNE conversion
// to e4m3 (quantize) or to the output dtype (dequantize).
// Build without fast-math: subnormal float32 products must not be flushed.
//
// Work layout: K is a multiple of 32, so the flattened input is a sequence of 32-element
// blocks and row-major scales are the flattened block index. A warp takes a chunk of 1024
// elements (512 for fp32) per loop step and every memory instruction of the warp covers one
// contiguous span: lane i reads the i-th 16-byte vector of each 32-vector span (a first
// version with each lane reading 32-64 contiguous bytes left half-filled sectors per
// instruction and lost 10-40% of the bandwidth on H100). A block is then spread over 4 (16-bit
// inputs) or 8 (fp32) lanes that combine their maxima with xor shuffles. Swizzled (F8_128x4)
// scales need the block's (batch, row, column); with K/32 % 4 == 0 four scales are gathered
// into one 32-bit store, and the zero padding rows are written by extra work items of the same
// launch.
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
constexpr int kSteps = 4;             // 16-byte accesses per lane per loop step (all in flight)
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

// ---- element access: one 16-byte vector per lane per access ----------------------------------

template <typename T>
struct Vec;  // kCount elements of T in 16 bytes, loaded as float32 (exact for every input dtype)

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kCount = 8;
  static __device__ __forceinline__ void Load(const __nv_bfloat16* p, float (&v)[kCount]) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is a 16-bit shift (exact, keeps subnormals)
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct Vec<__half> {
  static constexpr int kCount = 8;
  static __device__ __forceinline__ void Load(const __half* p, float (&v)[kCount]) {
    uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);  // exact
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Vec<float> {
  static constexpr int kCount = 4;
  static __device__ __forceinline__ void Load(const float* p, float (&v)[kCount]) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
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

// e4m3 RNE of n (4 or 8) scaled values, packed little-endian. The saturating hardware
// conversion is safe for every rule: scaled magnitudes never exceed 448 (ceil and naive by
// construction, floor clips first), and it converts a pair per instruction.
__device__ __forceinline__ uint32_t ToE4M3x4(const float* s) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(s[0], s[1]), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(s[2], s[3]), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

template <int n>
__device__ __forceinline__ void StoreE4M3(uint8_t* p, const float (&s)[n]) {
  if constexpr (n == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(ToE4M3x4(s), ToE4M3x4(s + 4));
  } else {
    static_assert(n == 4, "4 or 8 values per lane");
    *reinterpret_cast<uint32_t*>(p) = ToE4M3x4(s);
  }
}

template <int n>
__device__ __forceinline__ void StoreNaN(uint8_t* p) {
  constexpr uint32_t kNaN4 = kValueNaN * 0x01010101u;
  if constexpr (n == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(kNaN4, kNaN4);
  } else {
    *reinterpret_cast<uint32_t*>(p) = kNaN4;
  }
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

// elements: x's size (a multiple of 32). pad_items (swizzled only): one uint32 zero store per
// (batch, padding row, 4-column group). word_scales: swizzled and K/32 % 4 == 0.
template <typename T, int kRule, bool kSwizzle>
// At most 64 registers (1024 threads per SM) where that does not spill; 85 otherwise.
__global__ void __launch_bounds__(kThreads, (kSwizzle && sizeof(T) == 2) ? 3 : 4)
QuantizeKernel(const T* __restrict__ x, uint8_t* __restrict__ values, uint8_t* __restrict__ scales,
               uint64_t elements, uint64_t pad_items, ScaleGeometry g, bool word_scales) {
  constexpr int kV = Vec<T>::kCount;          // elements per lane per access
  constexpr int kLanes = kBlockSize / kV;     // lanes sharing a block: 4 or 8
  constexpr int kChunk = kSteps * 32 * kV;    // elements per warp per loop step: 1024 or 512
  const int lane = threadIdx.x & 31;
  const uint64_t first_thread = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * (kThreads / 32);
  const uint64_t chunks = (elements + kChunk - 1) / kChunk;
  for (uint64_t chunk = first_thread / 32; chunk < chunks; chunk += warps) {  // warp-uniform
    const uint64_t base = chunk * kChunk + static_cast<uint64_t>(lane) * kV;
    float v[kSteps][kV];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {  // all loads in flight before any use
      const uint64_t e = base + j * 32 * kV;
      if (e < elements) {
        Vec<T>::Load(x + e, v[j]);
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) v[j][i] = 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const uint64_t e = base + j * 32 * kV;
      const bool active = e < elements;
      uint32_t amax_bits = 0;
#pragma unroll
      for (int i = 0; i < kV; ++i) amax_bits = max(amax_bits, __float_as_uint(v[j][i]) & 0x7FFFFFFFu);
      // Max of |bits| orders finite magnitudes and puts Inf/NaN (>= 0x7F800000) on top.
#pragma unroll
      for (int o = 1; o < kLanes; o <<= 1) amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, o));
      uint32_t scale_byte;
      if (amax_bits >= kNonFinite) {
        scale_byte = kScaleNaN;
        if (active) StoreNaN<kV>(values + e);
      } else {
        const int e_b = ScaleExponent<kRule>(amax_bits);
        const float inv = InverseScale(e_b);
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          v[j][i] *= inv;
          if (kRule == kFloor) v[j][i] = fminf(fmaxf(v[j][i], -448.0f), 448.0f);
        }
        scale_byte = static_cast<uint32_t>(e_b);
        if (active) StoreE4M3<kV>(values + e, v[j]);
      }
      const uint32_t block = static_cast<uint32_t>(e / kBlockSize);
      if (!kSwizzle) {
        if (active && lane % kLanes == 0) scales[block] = static_cast<uint8_t>(scale_byte);
      } else if (word_scales) {
        // Blocks 4c..4c+3 of a row are 4 contiguous bytes of the atom: gather them in one lane.
        uint32_t word = scale_byte;
#pragma unroll
        for (int k = 1; k < 4; ++k) word |= __shfl_down_sync(0xFFFFFFFFu, scale_byte, k * kLanes) << (8 * k);
        if (active && lane % (4 * kLanes) == 0) {
          const uint32_t row_flat = block / g.cols;
          const uint32_t c = block - row_flat * g.cols;
          const uint32_t batch = row_flat / g.rows;
          const uint32_t r = row_flat - batch * g.rows;
          *reinterpret_cast<uint32_t*>(scales + batch * g.batch_bytes + SwizzledOffset(r, c, g.padded_cols)) = word;
        }
      } else if (active && lane % kLanes == 0) {
        const uint32_t row_flat = block / g.cols;
        const uint32_t c = block - row_flat * g.cols;
        const uint32_t batch = row_flat / g.rows;
        const uint32_t r = row_flat - batch * g.rows;
        uint8_t* tile = scales + batch * g.batch_bytes;
        tile[SwizzledOffset(r, c, g.padded_cols)] = static_cast<uint8_t>(scale_byte);
        if (c + 1 == g.cols) {  // the row's last block also zeroes its group's padding columns
          for (uint32_t pc = g.cols; pc < g.padded_cols; ++pc) tile[SwizzledOffset(r, pc, g.padded_cols)] = 0;
        }
      }
    }
  }
  if (kSwizzle) {  // padding rows [M, Mp) of every batch index: 4 zero bytes per item
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
    const uint32_t groups = g.padded_cols >> 2;
    const uint32_t per_batch = (g.padded_rows - g.rows) * groups;
    for (uint64_t item = first_thread; item < pad_items; item += stride) {
      const uint32_t i = static_cast<uint32_t>(item);
      const uint32_t batch = i / per_batch;
      const uint32_t rem = i - batch * per_batch;
      const uint32_t r = g.rows + rem / groups;
      const uint32_t c = (rem % groups) * 4;
      *reinterpret_cast<uint32_t*>(scales + batch * g.batch_bytes + SwizzledOffset(r, c, g.padded_cols)) = 0;
    }
  }
}

// ---- dequantize ----------------------------------------------------------------------------

template <typename T>
struct OutVec;  // 16 bytes of output: kCount values of T

template <>
struct OutVec<__nv_bfloat16> {
  static constexpr int kCount = 8;
  static __device__ __forceinline__ void Store(__nv_bfloat16* p, const float (&v)[kCount]) {
    uint4 q;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);  // RNE, keeps subnormals
    *reinterpret_cast<uint4*>(p) = q;
  }
};

template <>
struct OutVec<__half> {
  static constexpr int kCount = 8;
  static __device__ __forceinline__ void Store(__half* p, const float (&v)[kCount]) {
    uint4 q;
    __half2* h = reinterpret_cast<__half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);  // RNE; overflow -> Inf
    *reinterpret_cast<uint4*>(p) = q;
  }
};

template <>
struct OutVec<float> {
  static constexpr int kCount = 4;
  static __device__ __forceinline__ void Store(float* p, const float (&v)[kCount]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// Four e4m3 codes (one little-endian word) -> float32, exact (e4m3 -> f16 -> f32).
__device__ __forceinline__ void DecodeE4M3x4(uint32_t w, float* out) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> (16 * half)), __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&raw));
    out[2 * half] = f.x;
    out[2 * half + 1] = f.y;
  }
}

// Lane i of a warp reads kV codes (8 or 4 bytes) and writes the i-th 16-byte vector of each span.
template <typename T>
__global__ void __launch_bounds__(kThreads)
DequantizeKernel(const uint8_t* __restrict__ values, const uint8_t* __restrict__ scales,
                 T* __restrict__ out, uint64_t elements) {
  constexpr int kV = OutVec<T>::kCount;
  constexpr int kChunk = kSteps * 32 * kV;
  const int lane = threadIdx.x & 31;
  const uint64_t warps = static_cast<uint64_t>(gridDim.x) * (kThreads / 32);
  const uint64_t chunks = (elements + kChunk - 1) / kChunk;
  for (uint64_t chunk = (static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; chunk < chunks;
       chunk += warps) {
    const uint64_t base = chunk * kChunk + static_cast<uint64_t>(lane) * kV;
    uint32_t codes[kSteps][kV / 4];
    uint32_t scale_bytes[kSteps];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {  // all loads in flight before any use
      const uint64_t e = base + j * 32 * kV;
      if (e < elements) {
        if constexpr (kV == 8) {
          const uint2 q = __ldg(reinterpret_cast<const uint2*>(values + e));
          codes[j][0] = q.x;
          codes[j][kV / 4 - 1] = q.y;
        } else {
          codes[j][0] = __ldg(reinterpret_cast<const uint32_t*>(values + e));
        }
        scale_bytes[j] = __ldg(scales + e / kBlockSize);
      }
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const uint64_t e = base + j * 32 * kV;
      if (e >= elements) continue;
      const float scale = Scale(scale_bytes[j]);
      float v[kV];
#pragma unroll
      for (int w = 0; w < kV / 4; ++w) DecodeE4M3x4(codes[j][w], v + 4 * w);
#pragma unroll
      for (int i = 0; i < kV; ++i) v[i] *= scale;  // exact unless the result is a float32 subnormal/overflow
      OutVec<T>::Store(out + e, v);
    }
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

// Threads that cover `elements` with one warp per chunk of kSteps 16-byte vectors per lane.
uint64_t ChunkThreads(uint64_t elements, int per_vector) {
  const uint64_t chunk = uint64_t{kSteps} * 32 * per_vector;
  return (elements + chunk - 1) / chunk * 32;
}

template <typename T, int kRule, bool kSwizzle>
ffi::Error LaunchQuantize(cudaStream_t stream, const void* x, void* values, void* scales,
                          uint64_t elements, uint64_t pad_items, const ScaleGeometry& g) {
  constexpr auto kernel = QuantizeKernel<T, kRule, kSwizzle>;
  const uint64_t threads = ChunkThreads(elements, Vec<T>::kCount);
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<kernel>(threads > pad_items ? threads : pad_items, &grid));
  const bool word_scales = kSwizzle && g.cols % 4 == 0;
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<uint8_t*>(values),
                                        static_cast<uint8_t*>(scales), elements, pad_items, g, word_scales);
  return CheckLaunch("mxfp8 quantize kernel");
}

template <typename T>
ffi::Error DispatchRule(int32_t rounding, bool swizzle, cudaStream_t stream, const void* x, void* values,
                        void* scales, uint64_t elements, uint64_t pad_items, const ScaleGeometry& g) {
#define JAX_MXFP8_QUANTIZE_CASE(rule)                                                                 \
  case rule:                                                                                          \
    return swizzle ? LaunchQuantize<T, rule, true>(stream, x, values, scales, elements, pad_items, g) \
                   : LaunchQuantize<T, rule, false>(stream, x, values, scales, elements, pad_items, g);
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
  const uint64_t pad_items = swizzle ? batches * (g.padded_rows - g.rows) * (g.padded_cols / 4) : 0;
  if (pad_items >= (uint64_t{1} << 32) || g.batch_bytes >= (uint64_t{1} << 32))
    return Invalid("quantize", "swizzled scales too large for one call");
  void* xp = x.untyped_data();
  void* vp = values->untyped_data();
  void* sp = scales->untyped_data();
  switch (x.element_type()) {
    case ffi::DataType::BF16:
      return DispatchRule<__nv_bfloat16>(rounding, swizzle, stream, xp, vp, sp, elements, pad_items, g);
    case ffi::DataType::F16:
      return DispatchRule<__half>(rounding, swizzle, stream, xp, vp, sp, elements, pad_items, g);
    case ffi::DataType::F32:
      return DispatchRule<float>(rounding, swizzle, stream, xp, vp, sp, elements, pad_items, g);
    default:
      return Invalid("quantize", "x must be bfloat16, float16 or float32");
  }
}

template <typename T>
ffi::Error LaunchDequantize(cudaStream_t stream, const void* values, const void* scales, void* out,
                            uint64_t elements) {
  constexpr auto kernel = DequantizeKernel<T>;
  unsigned grid = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(GridFor<kernel>(ChunkThreads(elements, OutVec<T>::kCount), &grid));
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(values), static_cast<const uint8_t*>(scales),
                                        static_cast<T*>(out), elements);
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
  switch (out->element_type()) {
    case ffi::DataType::BF16:
      return LaunchDequantize<__nv_bfloat16>(stream, values.untyped_data(), scales.untyped_data(),
                                             out->untyped_data(), elements);
    case ffi::DataType::F16:
      return LaunchDequantize<__half>(stream, values.untyped_data(), scales.untyped_data(), out->untyped_data(), elements);
    case ffi::DataType::F32:
      return LaunchDequantize<float>(stream, values.untyped_data(), scales.untyped_data(), out->untyped_data(), elements);
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
