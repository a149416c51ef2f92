// Instrumentation policy of the wgmma kernel for the timeline tool (tools/wgmma_trace.cu only;
// the library compiles the kernel with NoHooks, ffi/src/marlin_sm90.cu). TraceHooks records
// per-block timestamps of the kernel's timeline points, and with -DWGMMA_NO_DEQUANT or
// -DWGMMA_NO_MMA removes the dequantization (the raw words, loads kept, become the A
// fragments) or the wgmmas from the main loop: what is left of the loop time shows what
// bounds it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// [block][point]: globaltimer ns of points 0..5; [7] = the block's SM.
__device__ unsigned long long g_trace[1 << 14][8];

struct TraceHooks {
#ifdef WGMMA_NO_DEQUANT
  static constexpr bool kDequant = false;
#else
  static constexpr bool kDequant = true;
#endif
#ifdef WGMMA_NO_MMA
  static constexpr bool kMma = false;
#else
  static constexpr bool kMma = true;
#endif

  static __device__ __forceinline__ void Point(bool cond, int point) {
    if (!cond) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_trace[blockIdx.x][point] = t;
    if (point == 0) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      g_trace[blockIdx.x][7] = sm;
    }
  }

  // Stands in for the dequantization when kDequant is false: every fragment register still
  // depends on the stage's loads (weight words and scales), so none of them is optimized away.
  static __device__ __forceinline__ void Fragments(const uint2 (&q)[4], const uint32_t (&sw)[2],
                                                   uint32_t (&frag)[4][4]) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      frag[ks][0] = q[ks].x, frag[ks][1] = q[ks].y;
      frag[ks][2] = q[ks].x ^ sw[0], frag[ks][3] = q[ks].y ^ sw[1];
    }
  }
};
