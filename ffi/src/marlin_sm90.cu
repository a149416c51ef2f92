// Hopper (sm_90a) W8A16 MXFP8 GEMM of the MARLIN backend, for the M where marlin.cu's mma.sync
// loop is compute-bound: y[M, N] = x[M, K] . dequantize(W)[N, K]^T (+ bias), fp32 accumulation.
//
// It computes y^T = W . x^T with wgmma: the weight is operand A, taken from registers after
// the same exact fp8 -> bf16 dequantization as marlin.cu (marlin_common.cuh), and x is
// operand B, read by the tensor cores straight from shared memory. The packed weight needs
// no second layout: the lane/word order that gives mma.sync its B fragments (marlin.cu's
// header) is, two words at a time, the A fragment of wgmma m64nNk16 (warp w of a warpgroup
// owns weight rows 16w + g and 16w + g + 8 of the 64: words 2w and 2w + 1 of each lane).
// This is the "weight as the register operand, activations from shared memory" structure of
// vLLM's Machete and CUTLASS's Hopper mixed-input GEMMs (described in shared/design/marlin.md);
// the code is our own.
//
// Block: one producer warpgroup and C consumer warpgroups (setmaxnreg moves registers from the
// first to the others). The producer's one thread keeps STAGES stages of K = 64 in flight, each
// completing on one mbarrier: x by TMA (a [BM, 64] bf16 box, 128-byte swizzle, rows past M
// zero-filled), the weight's C 64-row tiles and their scales by plain bulk copies (they are
// contiguous in the packed layout). Consumer c computes weight rows [64c, 64c + 64) x BM tokens
// as wgmma m64nBMk16 steps: it dequantizes a whole stage's four A fragments while the tensor
// cores run the previous stage's four wgmmas (two register buffers, at most two stage groups in
// flight; a first version with one k16 step per group was 1.1-1.6x slower at BM = 64 on the
// H200). Epilogue: the fp32 tile is transposed through shared memory and stored row by row
// with the bias, rounded once. Where N gives too few tiles for the SMs, K is split among
// several blocks per tile (MarlinWgmmaKernel), and 1, 2 or 4 consumers with 1 or 2 blocks per
// SM trade x reuse against parallelism (DispatchWgmma; marlin.py picks per shape and M).
#include <cuda.h>  // CUtensorMap; the encoder is fetched through the runtime (no -lcuda)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "jax_mxfp8/ffi_common.h"
#include "marlin_common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_MXFP8_WGMMA 1  // wgmma and setmaxnreg exist only in sm_90a code
#endif

// Per-block timeline points, recorded only by tools/wgmma_trace.cu (which defines this macro
// before including this file): 0 entry, 1 first stage consumed, 2 main loop done (kStream: the
// first accumulation), 3 partial stored and counted (K splits through the workspace), 4
// partials summed, 5 output stored.
#ifndef WGMMA_TRACE
#define WGMMA_TRACE(cond, point)
#endif

namespace jax_mxfp8 {
namespace {

using namespace marlin;  // NOLINT: the shared dequantization and epilogue helpers

constexpr int kBK = 64;  // K per stage: one 128-byte swizzled row of x per token
constexpr int kMaxClusterSplits = 8;  // K splits in one thread-block cluster: the portable size
constexpr int kMaxSplits = 64;        // through the workspace

// How the K splits of an output tile are summed (one kernel instantiation each). kStream: no
// fixed splits; the grid is one block per resident slot and block b takes the b-th equal share
// of all (tile, 64-deep stage) units in order, across tile boundaries (stream-K, Osama et al.
// 2023; CUTLASS calls it the stream-K tile scheduler): a tile's first block adds the partials
// of the blocks that took the rest of it.
enum class Reduce { kNone, kCluster, kWorkspace, kStream };

template <int BM, int C, int STAGES, int BLOCKS>
struct WgTile {
  static constexpr int kBM = BM, kC = C, kStages = STAGES;
  static constexpr int kThreads = 128 * (C + 1);
  static constexpr int kBN = 64 * C;             // weight rows (output columns) per block
  static constexpr int kXBytes = BM * kBK * 2;   // bf16 x tile
  static constexpr int kWBytes = 4 * C * 1024;   // 4 k16 rows x C packed 64-row tiles
  static constexpr int kSBytes = 2 * kBN;        // 2 scale groups x kBN rows
  static constexpr int kXOff = 0;
  static constexpr int kWOff = STAGES * kXBytes;
  static constexpr int kSOff = kWOff + STAGES * kWBytes;
  static constexpr int kBarOff = kSOff + STAGES * kSBytes;
  static constexpr int kStageTx = kXBytes + kWBytes + kSBytes;
  static constexpr int kOutStride = kBN + 4;     // floats; the pad makes the transposing stores conflict-free
  static constexpr int kOutBytes = BM * kOutStride * 4;
  static constexpr int kFlagOff = kBarOff + 2 * STAGES * 8;  // kWorkspace: "last block" flag
  static constexpr int kSmemBytes = kFlagOff + 16 + 1024;      // + slack to align to 1024
  // K-split sums shared by the tile's blocks (WgmmaArgs::spread): not at BM = 256, where the
  // sum's loads spill next to 128 accumulators (and no plan splits K).
  static constexpr bool kCanSpread = BM <= 128;
  // BLOCKS blocks per SM. setmaxnreg moves registers inside the block: the producer's and
  // consumers' budgets together stay within what the block got at launch (kThreads x the
  // per-thread count __launch_bounds__ allows, a multiple of 8).
  // The producer keeps 40 (CUTLASS's budget) where the consumers still get >= 208, else 32;
  // one consumer keeps the 208 its block was tuned with (216 would fit).
  static constexpr int kLaunchRegs = (65536 / (BLOCKS * kThreads)) / 8 * 8;
  static constexpr int kProducerRegs = C == 1 || (BLOCKS == 1 && C == 2) ? 40 : 32;
  static constexpr int kFreeRegs = (kLaunchRegs * kThreads - 128 * kProducerRegs) / (128 * C) / 8 * 8;
  static constexpr int kConsumerRegs = C == 1 ? 208 : kFreeRegs < 232 ? kFreeRegs : 232;
  static_assert(kOutBytes <= kBarOff, "the epilogue tile reuses the pipeline buffers");
  static_assert(kXBytes % 1024 == 0 && kBarOff % 8 == 0, "alignment");
  static_assert(BM % 64 == 0 && BM <= 256, "wgmma N and the TMA box");
  static_assert(128 * kProducerRegs + 128 * C * kConsumerRegs <= kLaunchRegs * kThreads, "registers");
  static_assert(BLOCKS * (kSmemBytes + 1024) <= 233472, "228 KiB shared memory per SM, 1 KiB per block");
};

struct WgmmaArgs {
  const uint8_t* w;      // packed values [K/16, 16N]
  const uint8_t* s;      // packed scales [K/32, N]
  const int32_t* flags;  // [1]
  const void* bias;      // [N] or null
  void* y;               // [M, N]
  int m, n, k;
  int bias_type, out_type;
  int m_tiles;
  int splits;        // K splits of each output tile (1: no split)
  float* partial;    // kWorkspace: [splits][tiles][BM * kBN] fp32 partial tiles
  int32_t* counters;  // kWorkspace: [tiles] blocks done, zeroed before the launch
  int spread;         // kWorkspace, every block resident at once: the splits of a tile wait for
                      // each other and each sums and stores 1/splits of its token rows
  // kStream: partial = [blocks][BM * kBN] (a block's first, unfinished tile), counters =
  // [blocks] "partial stored" flags, zeroed before the launch.
};

// Where stage i of a block's sequence comes from.
struct StageAt {
  int kt, n_tile, m0;
};

#if JAX_MXFP8_WGMMA
#include "wgmma_rs.inc"

__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void BulkLoad(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// wgmma shared-memory descriptor of a K-major bf16 tile with 128-byte rows, 128-byte swizzle
// (TMA's layout): stride between 8-row groups 1024 B; the leading offset is unused.
__device__ __forceinline__ uint64_t XDesc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across the waits above.
template <int N>
__device__ __forceinline__ void FenceAcc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Pins register definitions before this point: the compiler may otherwise sink the dequantizing
// arithmetic past wgmma.fence into the group (a "memory" clobber does not order arithmetic).
__device__ __forceinline__ void FenceOperands(uint32_t (&a)[4], uint64_t& desc) {
  asm volatile("" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3]), "+l"(desc)::"memory");
}

template <int R>
__device__ __forceinline__ void SetMaxNRegDec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void SetMaxNRegInc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}

__device__ __forceinline__ void ConsumerBarrier(int threads) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(threads) : "memory");
}

// Every thread of every block of the cluster (the unaligned form: a warp need not be
// converged); release/acquire makes the shared-memory writes before it visible to peers.
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

__device__ __forceinline__ void Add4(float4& v, const float4& u) {
  v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
}

// Sum of the float4 at shared address `addr` in the blocks of ranks 0 .. splits - 1, in rank
// order (the same order every run: deterministic).
__device__ __forceinline__ float4 ClusterSum(uint32_t addr, int splits) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int r = 0; r < splits; ++r) {
    uint32_t peer;
    float4 u;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(addr), "r"(r));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(u.x), "=f"(u.y), "=f"(u.z), "=f"(u.w)
                 : "r"(peer)
                 : "memory");
    v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
  }
  return v;
}

// The block's stages 0 .. num - 1, stage i from at(i); ring slot and phase count from the first.
template <typename T, typename At>
__device__ __forceinline__ void Produce(const CUtensorMap* x_map, const WgmmaArgs& a, uint32_t sbase,
                                        uint32_t full0, uint32_t empty0, int num, At at) {
  constexpr int C = T::kC, STAGES = T::kStages;
  const size_t tiles64 = static_cast<size_t>(a.n) / 64;
  for (int i = 0; i < num; ++i) {
    const StageAt st = at(i);
    const int s = i % STAGES, kt = st.kt, n_tile = st.n_tile, m0 = st.m0;
    if (i >= STAGES) MbarWait(empty0 + 8 * s, ((i / STAGES) - 1) & 1);  // consumers freed it
    const uint32_t full = full0 + 8 * s;
    MbarExpectTx(full, T::kStageTx);
    TmaLoad2d(sbase + T::kXOff + s * T::kXBytes, x_map, kt * kBK, m0, full);
#pragma unroll
    for (int j = 0; j < 4; ++j)  // k16 row kt*4 + j: this block's C tiles are contiguous
      BulkLoad(sbase + T::kWOff + s * T::kWBytes + j * C * 1024,
               a.w + (static_cast<size_t>(kt * 4 + j) * tiles64 + static_cast<size_t>(n_tile) * C) * 1024,
               C * 1024, full);
#pragma unroll
    for (int g = 0; g < 2; ++g)
      BulkLoad(sbase + T::kSOff + s * T::kSBytes + g * T::kBN,
               a.s + static_cast<size_t>(kt * 2 + g) * a.n + static_cast<size_t>(n_tile) * T::kBN,
               T::kBN, full);
  }
}

// Where one consumer thread finds its A words and scales in a stage: rows 16wi + g and
// 16wi + g + 8 of tile c are words 2wi, 2wi + 1 of its lane, at byte 8 (wi & 1) of half wi >> 1;
// their scales are bytes 2 (wi & 1) + {0, 1} of the 4-byte word at 8g + 4 (wi >> 1) of the
// tile's 64 scale bytes.
struct ConsumerView {
  int w_off, s_off, sbyte;
  __device__ ConsumerView(int c, int wi, int lane)
      : w_off(c * 1024 + (wi >> 1) * 512 + lane * 16 + (wi & 1) * 8),
        s_off(c * 64 + 8 * (lane >> 2) + 4 * (wi >> 1)),
        sbyte(2 * (wi & 1)) {}
};

// One stage kt (counted from the block's first): dequantize its four k16 A fragments into
// `frag` (free: the group that read it, stage kt - 2, was retired by the previous stage's
// wait), then issue its four wgmmas as one group, which runs while the next stage is
// dequantized. `release_prev`: stage kt - 1 belongs to the same accumulation (its slot is
// released here; the last stage of an accumulation is released by Consume).
template <typename T, bool kGeneral>
__device__ __forceinline__ void ConsumeStage(float (&acc)[T::kBM / 2], uint32_t (&frag)[4][4],
                                             const uint8_t* smem, uint32_t sbase, uint32_t full0,
                                             uint32_t empty0, int kt, bool release_prev,
                                             const ConsumerView& v, int lane) {
  constexpr int C = T::kC, STAGES = T::kStages;
  const int s = kt % STAGES;
  MbarWait(full0 + 8 * s, (kt / STAGES) & 1);
  WGMMA_TRACE(kt == 0 && threadIdx.x == 128, 1);
  const uint8_t* wst = smem + T::kWOff + s * T::kWBytes + v.w_off;
  const uint8_t* sst = smem + T::kSOff + s * T::kSBytes + v.s_off;
  const uint32_t sw[2] = {*reinterpret_cast<const uint32_t*>(sst),
                          *reinterpret_cast<const uint32_t*>(sst + T::kBN)};
  uint2 q[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) q[ks] = *reinterpret_cast<const uint2*>(wst + ks * C * 1024);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const uint32_t scale_lo = ScalePair<kGeneral>(sw[ks >> 1], v.sbyte);
    const uint32_t scale_hi = ScalePair<kGeneral>(sw[ks >> 1], v.sbyte + 1);
    Dequant<kGeneral>(q[ks].x, scale_lo, frag[ks][0], frag[ks][2]);
    Dequant<kGeneral>(q[ks].y, scale_hi, frag[ks][1], frag[ks][3]);
  }
  // Every input register of the group (fragments, descriptors) is written before its fence:
  // ptxas serializes wgmmas when other instructions define their inputs inside the group.
  const uint32_t x_tile = sbase + T::kXOff + s * T::kXBytes;
  uint64_t desc[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    desc[ks] = XDesc(x_tile + ks * 32);  // k16 step: 32 B along the row
    FenceOperands(frag[ks], desc[ks]);
  }
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) WgmmaRS<T::kBM>::Mma(acc, frag[ks], desc[ks]);
  WgmmaCommit();
  WgmmaWait<1>();  // stage kt - 1's group is done: its register buffer and its slot are free
  // No one reads kt - 1's slot any more: our loads of it were consumed by the dequantization,
  // its wgmmas are complete. The producer waits on this barrier before refilling the slot
  // (CUTLASS's TMA pipelines release a slot the same way, with no proxy fence: one here cost a
  // MEMBAR per stage).
  if (release_prev && lane == 0) MbarArrive(empty0 + 8 * ((kt - 1) % STAGES));
}

// Accumulates the block's stages first .. first + num - 1 into acc. kReleaseLast: more stages
// follow in the ring (kStream), so the last one's slot is released too.
template <typename T, bool kGeneral, bool kReleaseLast = false>
__device__ __forceinline__ void Consume(float (&acc)[T::kBM / 2], const uint8_t* smem, uint32_t sbase,
                                        uint32_t full0, uint32_t empty0, int num, int c, int wi,
                                        int lane, int first = 0) {
  const ConsumerView v(c, wi, lane);
  // Two register buffers, alternating by stage (register arrays need constant indices). The
  // loop body takes both unconditionally (an odd first stage is peeled): with a conditional
  // second stage ptxas cannot count the groups in flight and serializes every wgmma.
  uint32_t frag0[4][4], frag1[4][4];
  int j = 0;
  if (num & 1) ConsumeStage<T, kGeneral>(acc, frag1, smem, sbase, full0, empty0, first + j++, false, v, lane);
  for (; j < num; j += 2) {
    ConsumeStage<T, kGeneral>(acc, frag0, smem, sbase, full0, empty0, first + j, j >= 1, v, lane);
    ConsumeStage<T, kGeneral>(acc, frag1, smem, sbase, full0, empty0, first + j + 1, true, v, lane);
  }
  WgmmaWait<0>();
  FenceAcc(acc);
  if constexpr (kReleaseLast)
    if (lane == 0) MbarArrive(empty0 + 8 * ((first + num - 1) % T::kStages));
}

// acc straight from the registers to y (+ bias, rounded once): a kStream block cannot borrow
// the pipeline buffers to transpose through, its next stages are already arriving. Thread
// (c, wi, lane) holds rows 8i + 2 (lane % 4) (+1) of columns 64c + 16wi + lane / 4 (+8).
template <typename T>
__device__ __forceinline__ void StoreFragments(const WgmmaArgs& a, const float (&acc)[T::kBM / 2],
                                               int m0, int col) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < T::kBM / 8; ++i) {
    const int m = m0 + 8 * i + 2 * (lane & 3);
    if (m < a.m) {
      StoreOut1(a, m, col, acc[4 * i]);
      StoreOut1(a, m, col + 8, acc[4 * i + 2]);
    }
    if (m + 1 < a.m) {
      StoreOut1(a, m + 1, col, acc[4 * i + 1]);
      StoreOut1(a, m + 1, col + 8, acc[4 * i + 3]);
    }
  }
}

// The consumers of a kStream block: units [u_begin, u_end) of the tile-major (tile, stage)
// sequence, one accumulation per tile they touch. Only the first can start inside a tile: it
// is stored as a partial and flagged. A tile's first block adds, after its own K range, the
// partials of the blocks that took the rest of the tile, in K order (deterministic).
template <typename T>
__device__ __forceinline__ void ConsumeStream(const WgmmaArgs& a, const uint8_t* smem, uint32_t sbase,
                                              uint32_t full0, uint32_t empty0, long long units,
                                              long long u_begin, long long u_end, int kt_total,
                                              int c, int wi, int lane) {
  constexpr int BM = T::kBM, C = T::kC, kQuads = BM / 8;
  const int ct = threadIdx.x - 128;
  const auto partial = [&](int block) {
    return reinterpret_cast<float4*>(a.partial) + static_cast<size_t>(block) * kQuads * 128 * C + ct;
  };
  const bool general = __ldg(a.flags) & 1;
  int first = 0;
  for (long long u = u_begin; u < u_end;) {
    const int tile = static_cast<int>(u / kt_total);
    const long long tile_end = static_cast<long long>(tile + 1) * kt_total;
    const int num = static_cast<int>(min(u_end, tile_end) - u);
    float acc[BM / 2];
#pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
    if (general)
      Consume<T, true, true>(acc, smem, sbase, full0, empty0, num, c, wi, lane, first);
    else
      Consume<T, false, true>(acc, smem, sbase, full0, empty0, num, c, wi, lane, first);
    WGMMA_TRACE(threadIdx.x == 128 && first == 0, 2);
    if (u != tile_end - kt_total) {  // a later K range of the tile: its first block adds it
#pragma unroll
      for (int i = 0; i < kQuads; ++i)
        __stcg(partial(blockIdx.x) + i * 128 * C,
               make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
      ConsumerBarrier(128 * C);
      if (ct == 0) {
        __threadfence();
        atomicExch(a.counters + blockIdx.x, 1);
      }
    } else {
      if (u + num < tile_end) {  // the rest of the tile: the next blocks' first accumulations
        int last = blockIdx.x;
        while (last + 1 < static_cast<int>(gridDim.x) && (last + 1) * units / gridDim.x < tile_end) ++last;
        if (ct == 0) {  // all blocks are resident (cooperative launch)
          for (int b = blockIdx.x + 1; b <= last; ++b)
            while (LoadAcquire(a.counters + b) == 0) {
            }
          __threadfence();
        }
        ConsumerBarrier(128 * C);
        for (int b = blockIdx.x + 1; b <= last; ++b) {
#pragma unroll
          for (int i0 = 0; i0 < kQuads; i0 += 8) {  // eight loads in flight
            float4 p[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) p[i] = __ldcg(partial(b) + (i0 + i) * 128 * C);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              acc[4 * (i0 + i)] += p[i].x;
              acc[4 * (i0 + i) + 1] += p[i].y;
              acc[4 * (i0 + i) + 2] += p[i].z;
              acc[4 * (i0 + i) + 3] += p[i].w;
            }
          }
        }
      }
      const int n_tile = tile / a.m_tiles;
      StoreFragments<T>(a, acc, (tile % a.m_tiles) * BM, n_tile * T::kBN + 64 * c + 16 * wi + (lane >> 2));
    }
    u += num;
    first += num;
  }
  WGMMA_TRACE(threadIdx.x == 128, 5);
}
#endif  // JAX_MXFP8_WGMMA

// Grid: output tiles (M fastest: neighbours share the weight tile in L2) x K splits (fastest).
// Each split reduces a contiguous K range; the partial tiles are summed in split order, so
// the result is the same every run: kCluster - the splits of a tile are one cluster (rank =
// split) and sum through distributed shared memory, every rank storing 1/splits of the rows;
// kWorkspace - each block stores its partial to global memory and the last block of the tile
// (atomic counter) sums them (marlin.cu's two schemes). Each scheme is its own instantiation:
// the cluster barriers mark a kernel for cluster launches, and with them the unsplit kernel ran
// ~1.2x slower on the H200 (RESULTS.md, fifth session).
template <int BM, int C, int STAGES, int BLOCKS, Reduce kReduce>
__global__ void __launch_bounds__(WgTile<BM, C, STAGES, BLOCKS>::kThreads, BLOCKS)
    MarlinWgmmaKernel(const __grid_constant__ CUtensorMap x_map, const WgmmaArgs a) {
#if JAX_MXFP8_WGMMA
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);  // swizzle atoms
  const uint32_t sbase = SmemAddr(smem);
  const uint32_t full0 = sbase + T::kBarOff, empty0 = full0 + 8 * STAGES;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int split = blockIdx.x % a.splits, tile = blockIdx.x / a.splits;
  const int m_tile = tile % a.m_tiles, n_tile = tile / a.m_tiles;
  const int m0 = m_tile * BM, kt_total = a.k / kBK;
  const int kt_begin = split * kt_total / a.splits;  // near-equal ranges, none empty (host)
  const int num_kt = (split + 1) * kt_total / a.splits - kt_begin;
  WGMMA_TRACE(tid == 0, 0);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      MbarInit(full0 + 8 * s, 1);           // the producer's expect_tx arrival (+ bytes)
      MbarInit(empty0 + 8 * s, 4 * C);      // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // kStream: this block's share of the (tile, stage) units of the whole problem.
  const long long units = static_cast<long long>(a.n / T::kBN) * a.m_tiles * kt_total;
  const long long u_begin = blockIdx.x * units / gridDim.x, u_end = (blockIdx.x + 1) * units / gridDim.x;
  if (wg == 0) {
    SetMaxNRegDec<T::kProducerRegs>();
    if (tid == 0) {
      if constexpr (kReduce == Reduce::kStream) {
        Produce<T>(&x_map, a, sbase, full0, empty0, static_cast<int>(u_end - u_begin), [&](int i) {
          const long long u = u_begin + i;
          const int t = static_cast<int>(u / kt_total);
          return StageAt{static_cast<int>(u - static_cast<long long>(t) * kt_total), t / a.m_tiles,
                         (t % a.m_tiles) * BM};
        });
      } else {
        Produce<T>(&x_map, a, sbase, full0, empty0, num_kt,
                   [&](int i) { return StageAt{kt_begin + i, n_tile, m0}; });
      }
    }
    if constexpr (kReduce == Reduce::kCluster) {  // the consumers' cluster barriers count every thread
      ClusterSync();
      ClusterSync();
    }
    return;
  }
  SetMaxNRegInc<T::kConsumerRegs>();
  const int c = wg - 1, wi = (tid >> 5) & 3, ct = tid - 128;
  if constexpr (kReduce == Reduce::kStream) {
    ConsumeStream<T>(a, smem, sbase, full0, empty0, units, u_begin, u_end, kt_total, c, wi, lane);
    return;
  }
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
  if (__ldg(a.flags) & 1)
    Consume<T, true>(acc, smem, sbase, full0, empty0, num_kt, c, wi, lane);
  else
    Consume<T, false>(acc, smem, sbase, full0, empty0, num_kt, c, wi, lane);
  WGMMA_TRACE(tid == 128, 2);

  int row_begin = 0, row_end = BM;  // the tile's token rows this block stores
  if constexpr (kReduce == Reduce::kWorkspace) {
    // Partials in accumulator order (float4 i of consumer thread ct at [i][ct]: coalesced);
    // quad i holds tokens 8i .. 8i + 7 of the tile.
    constexpr int kTileFloats = BM * T::kBN, kQuads = BM / 8;
    const size_t tiles = gridDim.x / a.splits;
    const auto part = [&](int sp) {
      return reinterpret_cast<float4*>(a.partial + (sp * tiles + tile) * kTileFloats) + ct;
    };
    const auto quad = [&](int i) {
      return make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
    };
    const auto set_quad = [&](int i, const float4& v) {
      acc[4 * i] = v.x; acc[4 * i + 1] = v.y; acc[4 * i + 2] = v.z; acc[4 * i + 3] = v.w;
    };
    bool spread = false;
    if constexpr (T::kCanSpread) spread = a.spread;
    if (spread) {
      // Split s sums quads [q0, q1) of every split's partial, in split order, and stores their
      // tokens: the tail is shared by all the tile's blocks instead of left to the last one.
      const int q0 = split * kQuads / a.splits, q1 = (split + 1) * kQuads / a.splits;
#pragma unroll
      for (int i = 0; i < kQuads; ++i)  // the quads the other splits sum
        if (i < q0 || i >= q1) __stcg(part(split) + i * 128 * C, quad(i));
      ConsumerBarrier(128 * C);
      if (ct == 0) ArriveAndWait(a.counters + tile, a.splits);
      ConsumerBarrier(128 * C);
      WGMMA_TRACE(tid == 128, 3);
#pragma unroll
      for (int i = 0; i < kQuads; i += 2) {  // two quads at a time, four splits' loads in flight
        const bool own0 = i >= q0 && i < q1, own1 = i + 1 >= q0 && i + 1 < q1;
        if (!own0 && !own1) continue;
        float4 v0 = make_float4(0.f, 0.f, 0.f, 0.f), v1 = v0;
        for (int sp0 = 0; sp0 < a.splits; sp0 += 4) {
          float4 u[4][2];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const bool other = sp0 + j < a.splits && sp0 + j != split;
            u[j][0] = other && own0 ? __ldcg(part(sp0 + j) + i * 128 * C) : quad(i);
            u[j][1] = other && own1 ? __ldcg(part(sp0 + j) + (i + 1) * 128 * C) : quad(i + 1);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (sp0 + j < a.splits) {
              Add4(v0, u[j][0]);
              Add4(v1, u[j][1]);
            }
        }
        if (own0) set_quad(i, v0);
        if (own1) set_quad(i + 1, v1);
      }
      row_begin = 8 * q0;
      row_end = 8 * q1;
    } else {
      // Any grid: each block stores its partial, the tile's last block (atomic counter) sums.
#pragma unroll
      for (int i = 0; i < kQuads; ++i) __stcg(part(split) + i * 128 * C, quad(i));
      __threadfence();
      ConsumerBarrier(128 * C);
      int* last = reinterpret_cast<int*>(smem + T::kFlagOff);
      if (ct == 0) *last = atomicAdd(a.counters + tile, 1) == a.splits - 1;
      ConsumerBarrier(128 * C);
      WGMMA_TRACE(tid == 128, 3);
      if (!*last) return;
      __threadfence();
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {  // in place: quad i's own partial is read before it is replaced
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int sp = 0; sp < a.splits; ++sp)  // split order, whichever block is last
          Add4(v, sp == split ? quad(i) : __ldcg(part(sp) + i * 128 * C));
        set_quad(i, v);
      }
    }
    WGMMA_TRACE(tid == 128, 4);
  }

  // ---- epilogue: transpose through shared memory, then whole output rows ----
  ConsumerBarrier(128 * C);  // every consumer's wgmma reads of the pipeline buffers are done
  float* st = reinterpret_cast<float*>(smem);
  const int nl = 64 * c + 16 * wi + (lane >> 2);
#pragma unroll
  for (int i = 0; i < BM / 8; ++i) {  // wgmma D: rows 16wi + g (+8), token columns 8i + 2(l%4) (+1)
    const int m = 8 * i + 2 * (lane & 3);
    st[m * T::kOutStride + nl] = acc[4 * i];
    st[(m + 1) * T::kOutStride + nl] = acc[4 * i + 1];
    st[m * T::kOutStride + nl + 8] = acc[4 * i + 2];
    st[(m + 1) * T::kOutStride + nl + 8] = acc[4 * i + 3];
  }
  constexpr int kVecs = T::kBN / 4;
  const int rows = min(BM, a.m - m0);
  if constexpr (kReduce != Reduce::kCluster) {
    ConsumerBarrier(128 * C);
    const int stored = min(rows, row_end) - row_begin;
    for (int idx = ct; idx < stored * kVecs; idx += 128 * C) {
      const int row = row_begin + idx / kVecs, v = idx % kVecs;
      StoreOut(a, m0 + row, n_tile * T::kBN + 4 * v,
               *reinterpret_cast<const float4*>(st + row * T::kOutStride + 4 * v));
    }
    WGMMA_TRACE(tid == 128, 5);
  } else {
    ClusterSync();  // every rank's partial tile is in its shared memory
    const int per = (rows * kVecs + a.splits - 1) / a.splits;
    const int end = min(rows * kVecs, (split + 1) * per);
    for (int idx = split * per + ct; idx < end; idx += 128 * C) {
      const int row = idx / kVecs, v = idx % kVecs;
      StoreOut(a, m0 + row, n_tile * T::kBN + 4 * v,
               ClusterSum(SmemAddr(st + row * T::kOutStride + 4 * v), a.splits));
    }
    ClusterSync();  // no rank leaves (freeing its shared memory) while another still reads it
    WGMMA_TRACE(tid == 128, 5);
  }
#else
  __trap();  // unreachable: the host launches this kernel only from an sm_90a build on SM 9.0
#endif
}

// ---- host side -----------------------------------------------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// x [M, K] bf16 row-major as [BM, 64] boxes with the 128-byte swizzle wgmma reads.
ffi::Error EncodeX(CUtensorMap* map, const void* x, int64_t m, int64_t k, int block_m) {
  const auto encode = TensorMapEncoder();
  if (encode == nullptr)
    return ffi::Error::Internal("marlin wgmma: the CUDA driver has no cuTensorMapEncodeTiled");
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k) * 2};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(block_m)};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(x), dims,
                            strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return ffi::Error::Internal("marlin wgmma: cuTensorMapEncodeTiled failed with CUresult " +
                                std::to_string(static_cast<int>(r)) + " (x must be 16-byte aligned)");
  return ffi::Error::Success();
}

// One kernel instantiation's launches (the statics are per instantiation).
template <int BM, int C, int STAGES, int BLOCKS, Reduce kReduce>
struct WgmmaKernel {
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  static constexpr auto kKernel = MarlinWgmmaKernel<BM, C, STAGES, BLOCKS, kReduce>;

  // Raises the shared-memory limit; `fit` (if given): how many blocks the GPU holds at once.
  static ffi::Error Prepare(int* fit) {
    static SmemLimit smem_limit;
    static ResidentBlocks resident;
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(AllowSmem(kKernel, T::kSmemBytes, smem_limit));
    if (fit != nullptr) JAX_MXFP8_CUDA_RETURN_IF_ERROR(resident.Get(kKernel, T::kThreads, T::kSmemBytes, fit));
    return ffi::Error::Success();
  }

  // cooperative: the blocks wait for each other (spread K-split sums, kStream).
  static ffi::Error Launch(cudaStream_t stream, const CUtensorMap& map, const WgmmaArgs& args,
                           unsigned blocks, bool cooperative) {
    JAX_MXFP8_RETURN_IF_ERROR(Prepare(nullptr));
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(LaunchKernel(kKernel, blocks, T::kThreads, T::kSmemBytes, stream,
                                                kReduce == Reduce::kCluster ? args.splits : 1,
                                                cooperative, map, args));
    return CheckLaunch("marlin wgmma kernel");
  }
};

// `ws`: the hidden workspace output (sized by marlin.py's wgmma_workspace_bytes). K splits
// through it share their tile's sum when the grid fits on the GPU at once (spread) unless
// `allow_spread` is false (tools/wgmma_trace.cu compares the two).
template <int BM, int C, int STAGES, int BLOCKS>
ffi::Error LaunchWgmma(cudaStream_t stream, const CUtensorMap& map, WgmmaArgs args, Reduce sum,
                       uint8_t* ws, size_t ws_bytes, bool allow_spread = true) {
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  if (args.n % T::kBN != 0)
    return ffi::Error::InvalidArgument("marlin wgmma: N=" + std::to_string(args.n) +
                                       " is not a multiple of the block width " + std::to_string(T::kBN));
  args.m_tiles = (args.m + BM - 1) / BM;
  const long long tiles = static_cast<long long>(args.n / T::kBN) * args.m_tiles;
  if (tiles * args.splits > 0x7FFFFFFF) return ffi::Error::InvalidArgument("marlin wgmma: grid too large");
  const unsigned blocks = static_cast<unsigned>(tiles * args.splits);
  const auto too_small = [&](size_t need) {
    return ffi::Error::InvalidArgument("marlin wgmma: workspace of " + std::to_string(ws_bytes) +
                                       " bytes < the " + std::to_string(need) + " needed");
  };
  switch (sum) {
    case Reduce::kNone:
      return WgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kNone>::Launch(stream, map, args, blocks, false);
    case Reduce::kCluster:
      return WgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kCluster>::Launch(stream, map, args, blocks, false);
    case Reduce::kWorkspace: {  // counters, then the partial tiles
      using K = WgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kWorkspace>;
      const size_t counter_bytes = (static_cast<size_t>(tiles) * 4 + 255) / 256 * 256;
      const size_t need = counter_bytes + static_cast<size_t>(tiles) * args.splits * BM * T::kBN * 4;
      if (ws_bytes < need) return too_small(need);
      args.counters = reinterpret_cast<int32_t*>(ws);
      args.partial = reinterpret_cast<float*>(ws + counter_bytes);
      int fit = 0;
      JAX_MXFP8_RETURN_IF_ERROR(K::Prepare(&fit));
      args.spread = T::kCanSpread && allow_spread && blocks <= static_cast<unsigned>(fit);
      JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws, 0, counter_bytes, stream));
      return K::Launch(stream, map, args, blocks, args.spread != 0);
    }
    case Reduce::kStream: {  // one block per resident slot (fewer if the workspace is smaller)
      if constexpr (!T::kCanSpread) {
        return ffi::Error::InvalidArgument("marlin wgmma: stream=1 needs block_m <= 128");
      } else {
        using K = WgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kStream>;
        int fit = 0;
        JAX_MXFP8_RETURN_IF_ERROR(K::Prepare(&fit));
        const long long units = tiles * (args.k / kBK);
        const auto need = [](long long g) {
          return (static_cast<size_t>(g) * 4 + 255) / 256 * 256 + static_cast<size_t>(g) * BM * T::kBN * 4;
        };
        long long g = fit < units ? fit : units;
        while (g > 1 && need(g) > ws_bytes) --g;
        if (g < 1 || need(g) > ws_bytes) return too_small(need(1));
        const size_t flag_bytes = (static_cast<size_t>(g) * 4 + 255) / 256 * 256;
        args.counters = reinterpret_cast<int32_t*>(ws);
        args.partial = reinterpret_cast<float*>(ws + flag_bytes);
        JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws, 0, flag_bytes, stream));
        return K::Launch(stream, map, args, static_cast<unsigned>(g), true);
      }
    }
  }
  return ffi::Error::Internal("marlin wgmma: unknown sum");
}

// The configurations jax_mxfp8/backends/marlin.py may ask for (WGMMA_CONFIGS there): x rows
// per block, consumer warpgroups, blocks per SM.
ffi::Error DispatchWgmma(cudaStream_t stream, const CUtensorMap& map, const WgmmaArgs& args, int bm,
                         int c, int blocks_per_sm, Reduce sum, uint8_t* ws, size_t ws_bytes,
                         bool allow_spread = true) {
  switch (bm * 100 + c * 10 + blocks_per_sm) {
    case 6412: return LaunchWgmma<64, 1, 8, 2>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 12812: return LaunchWgmma<128, 1, 5, 2>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 6421: return LaunchWgmma<64, 2, 8, 1>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 6422: return LaunchWgmma<64, 2, 6, 2>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 12821: return LaunchWgmma<128, 2, 8, 1>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 6441: return LaunchWgmma<64, 4, 8, 1>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    case 25621: return LaunchWgmma<256, 2, 5, 1>(stream, map, args, sum, ws, ws_bytes, allow_spread);
    default:
      return ffi::Error::InvalidArgument("marlin wgmma: no compiled configuration for block_m=" +
                                         std::to_string(bm) + ", consumers=" + std::to_string(c) +
                                         ", blocks_per_sm=" + std::to_string(blocks_per_sm));
  }
}

bool BuiltForSm90a() {
  return std::string(JAX_MXFP8_CUDA_ARCHS).find("90a") != std::string::npos;
}

ffi::Error MarlinWgmmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> qweight,
                           ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> flags,
                           ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::U8>> workspace, int32_t block_m,
                           int32_t consumers, int32_t blocks_per_sm, int32_t splits, int32_t cluster,
                           int32_t stream_k) {
  PackedGemm g;
  JAX_MXFP8_RETURN_IF_ERROR(CheckPackedGemm("marlin wgmma", x, qweight, scales, flags, bias, *y, g));
  if (g.x_type != kBF16)
    return ffi::Error::InvalidArgument("marlin wgmma: x must be bfloat16 (fp16 x uses the mma.sync kernel)");
  const int64_t m = g.m, k = g.k, n = g.n;
  if (m == 0) return ffi::Error::Success();
  if (stream_k && (splits != 1 || cluster))
    return ffi::Error::InvalidArgument("marlin wgmma: stream=1 takes splits=1, cluster=0 (it divides K itself)");
  const int max_splits = cluster ? kMaxClusterSplits : kMaxSplits;
  if (splits < 1 || splits > max_splits || splits > k / kBK)
    return ffi::Error::InvalidArgument("marlin wgmma: splits=" + std::to_string(splits) +
                                       " must be in [1, min(" + std::to_string(max_splits) +
                                       ", K/64 = " + std::to_string(k / kBK) + ")]");
  int device = 0, major = 0, minor = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0 || !BuiltForSm90a())
    return ffi::Error::InvalidArgument(
        "marlin wgmma: needs a compute capability 9.0 GPU (H100/H200) and a build whose "
        "CMAKE_CUDA_ARCHITECTURES include 90a (this GPU: " + std::to_string(major) + "." +
        std::to_string(minor) + ", built for " + JAX_MXFP8_CUDA_ARCHS + "); use the mma.sync kernel");

  WgmmaArgs args{};
  args.w = qweight.typed_data();
  args.s = scales.typed_data();
  args.flags = flags.typed_data();
  args.bias = g.bias_type != kNone ? bias.untyped_data() : nullptr;
  args.y = y->untyped_data();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.bias_type = g.bias_type;
  args.out_type = g.out_type;
  args.splits = splits;
  CUtensorMap map;
  JAX_MXFP8_RETURN_IF_ERROR(EncodeX(&map, x.untyped_data(), m, k, block_m));
  const Reduce sum = stream_k ? Reduce::kStream
                     : splits == 1 ? Reduce::kNone
                     : cluster ? Reduce::kCluster
                               : Reduce::kWorkspace;
  return DispatchWgmma(stream, map, args, block_m, consumers, blocks_per_sm, sum,
                       workspace->typed_data(), workspace->element_count());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinWgmmaHandler, MarlinWgmmaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, K] bf16
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qweight [K/16, 16N]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales [K/32, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // flags [1]
                                  .Arg<ffi::AnyBuffer>()         // bias [N] or [0]
                                  .Ret<ffi::AnyBuffer>()         // y [M, N]
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace (K splits through it, stream-K)
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("consumers")
                                  .Attr<int32_t>("blocks_per_sm")
                                  .Attr<int32_t>("splits")       // K splits of each output tile
                                  .Attr<int32_t>("cluster")      // 1: summed in a cluster (<= 8 splits)
                                  .Attr<int32_t>("stream"),      // 1: stream-K (Reduce::kStream)
                              {ffi::Traits::kCmdBufferCompatible});

JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_wgmma_cuda", MarlinWgmmaHandler);

}  // namespace jax_mxfp8
