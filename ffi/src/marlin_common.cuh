// Pieces shared by the two MARLIN-backend GEMM kernels (marlin.cu: mma.sync, SM80+;
// marlin_sm90.cu: wgmma, sm_90a): the exact fp8 -> bf16 dequantization of the packed weight,
// the bias + output-rounding epilogue store, the chunk schedule of grouped (MoE) launches, and
// small host helpers.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "jax_mxfp8/ffi_common.h"

namespace jax_mxfp8 {
namespace marlin {

constexpr uint32_t kTwo120 = 0x7B807B80u;  // bf16x2 (2^120, 2^120)

enum DTypeCode : int { kBF16 = 0, kF16 = 1, kF32 = 2, kNone = 3 };

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// bf16x2 a * b with one RNE rounding; fma with -0 keeps the sign of zero products. There is
// no .ftz form for bf16, so subnormal inputs and results are kept (the exhaustive test checks).
__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// A K-split block's arrival at its tile's counter (after its partial is stored; the caller's
// block barrier precedes this in thread 0), then the wait for the tile's other splits. Only
// for grids that are resident all at once (ResidentBlocks): a block not yet started would
// never arrive; they are launched cooperatively (LaunchKernel).
__device__ __forceinline__ void ArriveAndWait(int32_t* counter, int splits) {
  __threadfence();
  atomicAdd(counter, 1);
  int done;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(done) : "l"(counter) : "memory");
  } while (done < splits);
  __threadfence();
}

// ---- dequantization ------------------------------------------------------------------------

// bf16x2 (s, s) for scale byte `byte` (0..3) of `word`.
template <bool kGeneral>
__device__ __forceinline__ uint32_t ScalePair(uint32_t word, int byte) {
  const uint32_t t = __byte_perm(word, 0u, byte | 0x40 | (byte << 8) | 0x4000);  // e per half
  if constexpr (!kGeneral) {
    return (t + 0x00780078u) << 7;  // 2^(e - 7): folds the 2^120 of the bit trick in
  } else {
    // 2^(e - 127): exponent field e, except e = 0 -> 0x0040 (2^-127) and e = 255 -> NaN.
    const uint32_t plus1 = t + 0x00010001u;
    const uint32_t regular = ((plus1 & 0x00FE00FEu) + 0x00FF00FFu) & 0x01000100u;
    return (t << 7) | ((regular ^ 0x01000100u) >> 2);
  }
}

// One packed word (column n; the codes of rows 2c, 2c+8, 2c+1, 2c+9) -> two bf16x2 registers:
// r0 holds rows (2c, 2c+1), r1 rows (2c+8, 2c+9), the lower row in the low half. That is the B
// fragment of mma.m16n8k16 for column n, and half of the A fragment of row n for wgmma.
// The word's bits are interleaved at packing time (pack_values in
// jax_mxfp8/backends/marlin/layout.py) so that r0's codes already sit where bf16 wants them
// (sign at 15/31, exponent and mantissa at 10..4/26..20) and r1's come out of one rotation and
// one shift: 5 integer ops per word instead of 7 for plain bytes. The dequantization is the
// main-loop cost of the wgmma kernel at M <= 64.
template <bool kGeneral>
__device__ __forceinline__ void Dequant(uint32_t q, uint32_t scale, uint32_t& r0, uint32_t& r1) {
  uint32_t h0 = q & 0x87F087F0u;
  uint32_t h1 = (__funnelshift_r(q, q, 4) & 0x87808780u) | ((q << 4) & 0x00700070u);
  if constexpr (kGeneral) {
    // Codes 0x7F/0xFF (exponent and mantissa all ones) -> NaN: exponent field all ones.
    h0 |= (((h0 & 0x07F007F0u) + 0x00100010u) & 0x08000800u) * 15u;
    h1 |= (((h1 & 0x07F007F0u) + 0x00100010u) & 0x08000800u) * 15u;
    h0 = MulBf16x2(h0, kTwo120);
    h1 = MulBf16x2(h1, kTwo120);
  }
  r0 = MulBf16x2(h0, scale);
  r1 = MulBf16x2(h1, scale);
}

// ---- epilogue ------------------------------------------------------------------------------

// Args: any struct with bias, bias_type, y, out_type and n (GemmArgs, WgmmaArgs).
template <typename Args>
__device__ __forceinline__ float4 LoadBias(const Args& a, int col) {
  switch (a.bias_type) {
    case kBF16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(a.bias) + col);
      const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      return make_float4(lo.x, lo.y, hi.x, hi.y);
    }
    case kF16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __half*>(a.bias) + col);
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
      return make_float4(lo.x, lo.y, hi.x, hi.y);
    }
    case kF32:
      return *reinterpret_cast<const float4*>(static_cast<const float*>(a.bias) + col);
    default:
      return make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// y[row, col .. col+3] = v + bias, rounded once to the output dtype.
template <typename Args>
__device__ __forceinline__ void StoreOut(const Args& a, int row, int col, float4 v) {
  const float4 b = LoadBias(a, col);
  v.x += b.x; v.y += b.y; v.z += b.z; v.w += b.w;
  const size_t off = static_cast<size_t>(row) * a.n + col;
  if (a.out_type == kBF16) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(a.y) + off) = raw;
  } else if (a.out_type == kF16) {
    const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&lo);
    raw.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(static_cast<__half*>(a.y) + off) = raw;
  } else {
    *reinterpret_cast<float4*>(static_cast<float*>(a.y) + off) = v;
  }
}

// ---- host helpers --------------------------------------------------------------------------

// kernel<<<blocks, threads, smem, stream>>>(args...), as clusters of `cluster` consecutive blocks
// along x when cluster > 1 (the K splits of one output tile; `cluster` divides `blocks`), and
// as a cooperative launch when `cooperative`: the driver then starts the whole grid at once,
// which blocks that wait for each other (ArriveAndWait) need even when other kernels share
// the GPU.
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), unsigned blocks, int threads, int smem,
                         cudaStream_t stream, int cluster, bool cooperative, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  if (cluster > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (cooperative) {
    attrs[n].id = cudaLaunchAttributeCooperative;
    attrs[n].val.cooperative = 1;
    ++n;
  }
  config.attrs = attrs;
  config.numAttrs = n;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// How many blocks of `kernel` the GPU holds at once (SMs x blocks per SM), per device: K-split
// blocks may wait for each other (ArriveAndWait) only when the whole grid fits.
struct ResidentBlocks {
  static constexpr int kDevices = 64;
  std::mutex mu;
  int blocks[kDevices] = {};

  template <typename Kernel>
  cudaError_t Get(Kernel kernel, int threads, int smem, int* out) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    std::lock_guard<std::mutex> lock(mu);
    const bool tracked = device >= 0 && device < kDevices;
    if (tracked && blocks[device] > 0) {
      *out = blocks[device];
      return cudaSuccess;
    }
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    *out = per_sm * sms;
    if (tracked) blocks[device] = *out;
    return cudaSuccess;
  }
};

inline int DTypeOf(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::F16: return kF16;
    case ffi::DataType::F32: return kF32;
    default: return -1;
  }
}

// The problem both GEMM handlers take: x [M, K], the packed qweight [K/16, 16N] and scales
// [K/32, N], flags [>= 1], bias [N] or empty, y [M, N] in bf16, fp16 or fp32.
struct PackedGemm {
  int64_t m = 0, k = 0, n = 0;
  int x_type = -1, out_type = -1, bias_type = kNone;
};

// Fills `g`, or returns the first thing that does not fit (messages start with `what`). The
// x dtype is left to the caller (the kernels take different ones).
inline ffi::Error CheckPackedGemm(const std::string& what, const ffi::AnyBuffer& x,
                                  const ffi::Buffer<ffi::U8>& qweight,
                                  const ffi::Buffer<ffi::U8>& scales,
                                  const ffi::Buffer<ffi::S32>& flags, const ffi::AnyBuffer& bias,
                                  const ffi::AnyBuffer& y, PackedGemm& g) {
  const auto xd = x.dimensions();
  const auto wd = qweight.dimensions();
  const auto sd = scales.dimensions();
  const auto yd = y.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument(what + ": x, qweight, scales and y must be 2-D");
  g.m = xd[0];
  g.k = xd[1];
  g.n = yd[1];
  if (yd[0] != g.m) return ffi::Error::InvalidArgument(what + ": y rows != x rows");
  if (g.k % 64 != 0 || g.n % 64 != 0 || g.k == 0)
    return ffi::Error::InvalidArgument(what + ": K and N must be positive multiples of 64 (got K=" +
                                       std::to_string(g.k) + ", N=" + std::to_string(g.n) + ")");
  if (wd[0] != g.k / 16 || wd[1] != 16 * g.n || sd[0] != g.k / 32 || sd[1] != g.n)
    return ffi::Error::InvalidArgument(what + ": packed weight shapes do not match x and y");
  if (g.m > 0x7FFFFFFF || g.n > 0x7FFFFFFF || g.k > 0x7FFFFFFF)
    return ffi::Error::InvalidArgument(what + ": dimensions exceed 2^31 - 1");
  if (flags.element_count() < 1) return ffi::Error::InvalidArgument(what + ": flags is empty");
  g.x_type = DTypeOf(x.element_type());
  g.out_type = DTypeOf(y.element_type());
  if (g.out_type < 0) return ffi::Error::InvalidArgument(what + ": y must be bf16, fp16 or fp32");
  if (bias.element_count() > 0) {
    g.bias_type = DTypeOf(bias.element_type());
    if (bias.element_count() != static_cast<size_t>(g.n) || g.bias_type < 0)
      return ffi::Error::InvalidArgument(what + ": bias must be [N] bf16, fp16 or fp32");
  }
  return ffi::Error::Success();
}

// The problem both grouped handlers take: x [T, K] rows grouped by expert, group_sizes [E],
// qweight [E, K/16, 16N], scales [E, K/32, N], flags [E, 1], bias [E, N] or empty, y [T, N].
struct GroupedGemm {
  int64_t t = 0, k = 0, n = 0, e = 0;
  int x_type = -1, out_type = -1, bias_type = kNone;
};

inline ffi::Error CheckGroupedGemm(const std::string& what, const ffi::AnyBuffer& x,
                                   const ffi::Buffer<ffi::U8>& qweight,
                                   const ffi::Buffer<ffi::U8>& scales,
                                   const ffi::Buffer<ffi::S32>& flags,
                                   const ffi::Buffer<ffi::S32>& group_sizes,
                                   const ffi::AnyBuffer& bias, const ffi::AnyBuffer& y,
                                   GroupedGemm& g) {
  const auto xd = x.dimensions(), wd = qweight.dimensions(), sd = scales.dimensions();
  const auto yd = y.dimensions(), gd = group_sizes.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3 || yd.size() != 2 || gd.size() != 1)
    return ffi::Error::InvalidArgument(what + ": x, y must be 2-D, qweight and scales 3-D [E, ...], "
                                       "group_sizes 1-D");
  g.t = xd[0];
  g.k = xd[1];
  g.n = yd[1];
  g.e = gd[0];
  const int64_t t = g.t, k = g.k, n = g.n, e = g.e;
  if (yd[0] != t || k % 64 || n % 64 || k == 0 || e < 1 || wd[0] != e || sd[0] != e ||
      wd[1] != k / 16 || wd[2] != 16 * n || sd[1] != k / 32 || sd[2] != n ||
      flags.element_count() != static_cast<size_t>(e))
    return ffi::Error::InvalidArgument(what + ": shapes do not form x [T, K], qweight [E, K/16, 16N], "
                                       "scales [E, K/32, N], flags [E, 1], y [T, N] with K, N "
                                       "multiples of 64");
  if (t > 0x3FFFFFFF || n > 0x7FFFFFFF || k > 0x7FFFFFFF || e > 0x3FFFFFFF)
    return ffi::Error::InvalidArgument(what + ": dimensions too large");
  g.x_type = DTypeOf(x.element_type());
  g.out_type = DTypeOf(y.element_type());
  if (g.out_type < 0) return ffi::Error::InvalidArgument(what + ": y must be bf16, fp16 or fp32");
  if (bias.element_count() > 0) {
    g.bias_type = DTypeOf(bias.element_type());
    if (bias.element_count() != static_cast<size_t>(e * n) || g.bias_type < 0)
      return ffi::Error::InvalidArgument(what + ": bias must be [E, N] bf16, fp16 or fp32");
  }
  return ffi::Error::Success();
}

// Row chunks of a grouped launch's grid: ceil(T / rows) + min(E, T), the most any grouping of T
// rows over E experts needs (at most min(E, T) experts have rows, each adding at most one
// partial chunk); chunks past the used ones exit at once.
inline int64_t GroupedChunks(int64_t t, int64_t e, int rows) {
  return (t + rows - 1) / rows + std::min<int64_t>(e, t);
}

// Where chunk c of a grouped launch lies. Chunks are the kRows-row pieces of each expert's
// rows in expert order (an expert of g rows has ceil(g / kRows) of them); the chunks after the
// last one cover the rows past sum(group_sizes), which are zero. Group sizes are clamped to
// [0, rows left] (the rows are x's, m of them), as ragged_dot reads them. Every thread of the
// block calls it (block-wide scans); kThreadCount is the block size.
struct GroupChunk {
  int expert;     // -1: a tail chunk (zero rows), -2: nothing to do
  int row_begin;  // first row of x / y
  int rows;       // rows of the chunk
};

template <int kRows, int kThreadCount>
__device__ __forceinline__ GroupChunk FindChunk(const int32_t* group_sizes, int experts, int m,
                                                int c) {
  // Row sums in 64 bits: group sizes may add up past 2^31 (they are clipped at m below).
  // Warp-scan algorithm: the least shared memory (the mma.sync kernel's 16 x 256 tile leaves
  // ~256 B of the 99 KiB of SM86/89).
  using RowScan = cub::BlockScan<long long, kThreadCount, cub::BLOCK_SCAN_WARP_SCANS>;
  using Scan = cub::BlockScan<int, kThreadCount, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ union {
    typename RowScan::TempStorage rows;
    typename Scan::TempStorage chunks;
  } scan;
  __shared__ GroupChunk found;
  const int tid = threadIdx.x;
  const int per = (experts + kThreadCount - 1) / kThreadCount;  // experts per thread, in order
  const int e0 = min(experts, tid * per), e1 = min(experts, e0 + per);
  long long raw = 0;
  for (int e = e0; e < e1; ++e) raw += max(0, __ldg(group_sizes + e));
  long long start = 0, total_rows = 0;
  RowScan(scan.rows).ExclusiveSum(raw, start, total_rows);
  // rows of expert e inside x: [r, r + g) clipped to [0, m)
  auto clipped = [&](long long r, int g) {
    return static_cast<int>(max(0LL, min(r + g, static_cast<long long>(m)) - r));
  };
  int chunks = 0;
  long long r = start;
  for (int e = e0; e < e1; ++e) {
    const int g = max(0, __ldg(group_sizes + e));
    chunks += (clipped(r, g) + kRows - 1) / kRows;
    r += g;
  }
  __syncthreads();  // scan storage reused
  int first = 0, total_chunks = 0;
  Scan(scan.chunks).ExclusiveSum(chunks, first, total_chunks);
  if (tid == 0) {
    const int used = static_cast<int>(min(total_rows, static_cast<long long>(m)));
    const int tail = c - total_chunks;
    found = tail >= 0 && tail * kRows < m - used
                ? GroupChunk{-1, used + tail * kRows, min(kRows, m - used - tail * kRows)}
                : GroupChunk{-2, 0, 0};
  }
  __syncthreads();
  if (c >= first && c < first + chunks) {  // this thread's experts hold chunk c
    long long r = start;
    int k = first;
    for (int e = e0; e < e1; ++e) {
      const int g = max(0, __ldg(group_sizes + e));
      const int clamped = clipped(r, g);
      const int n = (clamped + kRows - 1) / kRows;
      if (c < k + n) {
        const int off = (c - k) * kRows;
        found = GroupChunk{e, static_cast<int>(r) + off, min(kRows, clamped - off)};
        break;
      }
      k += n;
      r += g;
    }
  }
  __syncthreads();
  return found;
}

// Zeros in rows [row_begin, row_begin + rows) x columns [col0, col0 + cols) of y [*, n]
// (a tail chunk: rows past the groups' sum); cols * the element size is a multiple of 16.
__device__ __forceinline__ void ZeroRows(void* y, int n, int out_type, int row_begin, int rows,
                                         int col0, int cols, int tid, int threads) {
  const int esize = out_type == kF32 ? 4 : 2;
  const int words = cols * esize / 16;  // 16-byte stores per row
  for (int i = tid; i < rows * words; i += threads) {
    const size_t row = row_begin + i / words;
    uint8_t* dst = static_cast<uint8_t*>(y) + (row * n + col0) * esize;
    reinterpret_cast<uint4*>(dst)[i % words] = make_uint4(0, 0, 0, 0);
  }
}

// The dynamic shared-memory limit one kernel has been raised to, per device (a static of that
// kernel's launcher).
struct SmemLimit {
  static constexpr int kDevices = 64;
  std::mutex mu;
  int bytes[kDevices] = {};
};

// Raise `kernel`'s dynamic shared-memory limit on the current device to at least `bytes`. Never
// lowers it: one kernel is launched with several sizes (marlin.cu: plain and cluster launches),
// and a lowered limit would make the larger launch fail.
template <typename Kernel>
cudaError_t AllowSmem(Kernel kernel, int bytes, SmemLimit& limit) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(limit.mu);
  const bool tracked = device >= 0 && device < SmemLimit::kDevices;
  if (tracked && limit.bytes[device] >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && tracked) limit.bytes[device] = bytes;
  return err;
}

}  // namespace marlin
}  // namespace jax_mxfp8
