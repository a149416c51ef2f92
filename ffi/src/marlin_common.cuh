// Pieces shared by the two MARLIN-backend GEMM kernels (marlin.cu: mma.sync, SM80+;
// marlin_sm90.cu: wgmma, sm_90a): the exact fp8 -> bf16 dequantization of the packed weight,
// the bias + output-rounding epilogue store, and small host helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
