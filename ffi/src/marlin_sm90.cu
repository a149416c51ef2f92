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
// vLLM's Machete and CUTLASS's Hopper mixed-input GEMMs; the code is our own.
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
// SM trade x reuse against parallelism (DispatchWgmma; the planner picks per shape and M).
#include <cuda.h>  // CUtensorMap; the encoder is fetched through the runtime (no -lcuda)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "jax_mxfp8/ffi_common.h"
#include "jax_mxfp8/marlin_workspace.h"
#include "marlin_common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_MXFP8_WGMMA 1  // wgmma and setmaxnreg exist only in sm_90a code
#endif

namespace jax_mxfp8 {
namespace {

using namespace marlin;  // NOLINT: the shared dequantization and epilogue helpers

constexpr int kBK = 64;  // K per stage: one 128-byte swizzled row of x per token
static_assert(kBK == kStageK, "the packed layout's stage");
// K split limits (kMaxClusterSplits, kMaxWgmmaSplits) and the workspace layout (WgmmaWorkspace):
// jax_mxfp8/marlin_workspace.h, shared with the CPU module that sizes the workspace.

// Instrumentation policy of the kernel. The library's is NoHooks, which compiles to nothing;
// the timeline tool (tools/wgmma_trace.cu) passes one that records per-block timestamps and
// can switch off parts of the main loop to show what bounds it. Point(cond, p) marks timeline
// point p where cond holds: 0 entry, 1 first stage consumed, 2 main loop done, 3 partial
// stored and counted (K splits through the workspace), 4 partials summed, 5 output stored.
struct NoHooks {
  static constexpr bool kDequant = true;  // false: Hooks::Fragments(q, sw, frag) stands in
  static constexpr bool kMma = true;      // false: no wgmma issued
  static __device__ __forceinline__ void Point(bool, int) {}
};

// How the K splits of an output tile are summed (one kernel instantiation each).
enum class Reduce { kNone, kCluster, kWorkspace };

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
  // Grouped (MoE) launches: x rows grouped by expert, group_sizes [experts] on the device; w, s,
  // flags and bias stacked per expert (strides in bytes of w and s); m_tiles counts row chunks.
  const int32_t* group_sizes;
  int experts;
  size_t w_stride, s_stride;
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

// Stages kt_begin .. kt_begin + num_kt - 1 of this block's K range; ring slot and phase count
// from the first.
template <typename T>
__device__ __forceinline__ void Produce(const CUtensorMap* x_map, const WgmmaArgs& a, uint32_t sbase,
                                        uint32_t full0, uint32_t empty0, int kt_begin, int num_kt,
                                        int n_tile, int m0) {
  constexpr int C = T::kC, STAGES = T::kStages;
  const size_t tiles64 = static_cast<size_t>(a.n) / 64;
  for (int i = 0; i < num_kt; ++i) {
    const int s = i % STAGES, kt = kt_begin + i;
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
// dequantized.
template <typename T, bool kGeneral, typename Hooks>
__device__ __forceinline__ void ConsumeStage(float (&acc)[T::kBM / 2], uint32_t (&frag)[4][4],
                                             const uint8_t* smem, uint32_t sbase, uint32_t full0,
                                             uint32_t empty0, int kt, const ConsumerView& v,
                                             int lane) {
  constexpr int C = T::kC, STAGES = T::kStages;
  const int s = kt % STAGES;
  MbarWait(full0 + 8 * s, (kt / STAGES) & 1);
  Hooks::Point(kt == 0 && threadIdx.x == 128, 1);
  const uint8_t* wst = smem + T::kWOff + s * T::kWBytes + v.w_off;
  const uint8_t* sst = smem + T::kSOff + s * T::kSBytes + v.s_off;
  const uint32_t sw[2] = {*reinterpret_cast<const uint32_t*>(sst),
                          *reinterpret_cast<const uint32_t*>(sst + T::kBN)};
  uint2 q[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) q[ks] = *reinterpret_cast<const uint2*>(wst + ks * C * 1024);
  if constexpr (Hooks::kDequant) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const uint32_t scale_lo = ScalePair<kGeneral>(sw[ks >> 1], v.sbyte);
      const uint32_t scale_hi = ScalePair<kGeneral>(sw[ks >> 1], v.sbyte + 1);
      Dequant<kGeneral>(q[ks].x, scale_lo, frag[ks][0], frag[ks][2]);
      Dequant<kGeneral>(q[ks].y, scale_hi, frag[ks][1], frag[ks][3]);
    }
  } else {
    Hooks::Fragments(q, sw, frag);
  }
  // Every input register of the group (fragments, descriptors) is written before its fence:
  // ptxas serializes wgmmas when other instructions define their inputs inside the group.
  // k16 step ks: 32 B along the row, 2 in the descriptor's address field (16-B units; the tile
  // is 1024-B aligned, so no carry). One add each: recomputing XDesc per step cost ~3 % at M = 64.
  const uint64_t desc0 = XDesc(sbase + T::kXOff + s * T::kXBytes);
  uint64_t desc[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    desc[ks] = desc0 + 2 * ks;
    FenceOperands(frag[ks], desc[ks]);
  }
  WgmmaFence();
  if constexpr (Hooks::kMma) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) WgmmaRS<T::kBM>::Mma(acc, frag[ks], desc[ks]);
  }
  WgmmaCommit();
  WgmmaWait<1>();  // stage kt - 1's group is done: its register buffer and its slot are free
  // No one reads kt - 1's slot any more: our loads of it were consumed by the dequantization,
  // its wgmmas are complete. The producer waits on this barrier before refilling the slot
  // (CUTLASS's TMA pipelines release a slot the same way, with no proxy fence: one here cost a
  // MEMBAR per stage).
  if (kt >= 1 && lane == 0) MbarArrive(empty0 + 8 * ((kt - 1) % STAGES));
}

template <typename T, bool kGeneral, typename Hooks>
__device__ __forceinline__ void Consume(float (&acc)[T::kBM / 2], const uint8_t* smem, uint32_t sbase,
                                        uint32_t full0, uint32_t empty0, int num_kt, int c,
                                        int wi, int lane) {
  const ConsumerView v(c, wi, lane);
  // Two register buffers, alternating by stage (register arrays need constant indices). The
  // loop body takes both unconditionally (an odd first stage is peeled): with a conditional
  // second stage ptxas cannot count the groups in flight and serializes every wgmma.
  uint32_t frag0[4][4], frag1[4][4];
  int kt = 0;
  if (num_kt & 1) ConsumeStage<T, kGeneral, Hooks>(acc, frag1, smem, sbase, full0, empty0, kt++, v, lane);
  for (; kt < num_kt; kt += 2) {
    ConsumeStage<T, kGeneral, Hooks>(acc, frag0, smem, sbase, full0, empty0, kt, v, lane);
    ConsumeStage<T, kGeneral, Hooks>(acc, frag1, smem, sbase, full0, empty0, kt + 1, v, lane);
  }
  WgmmaWait<0>();
  FenceAcc(acc);
}
#endif  // JAX_MXFP8_WGMMA

// Grid: output tiles (M fastest: neighbours share the weight tile in L2) x K splits (fastest).
// Each split reduces a contiguous K range; the partial tiles are summed in split order, so
// the result is the same every run: kCluster - the splits of a tile are one cluster (rank =
// split) and sum through distributed shared memory, every rank storing 1/splits of the rows;
// kWorkspace - each block stores its partial to global memory and counts itself on the tile's
// counter; where the grid is resident at once (WgmmaArgs::spread) the splits wait for each other
// and each sums 1/splits of the tile's token rows, else the tile's last block sums it all
// (marlin.cu's schemes). Each scheme is its own instantiation: the cluster barriers mark a
// kernel for cluster launches, and with them the unsplit kernel ran ~1.2x slower on the H200.
template <int BM, int C, int STAGES, int BLOCKS, Reduce kReduce, typename Hooks = NoHooks,
          bool kGrouped = false>
__global__ void __launch_bounds__(WgTile<BM, C, STAGES, BLOCKS>::kThreads, BLOCKS)
    MarlinWgmmaKernel(const __grid_constant__ CUtensorMap x_map, const WgmmaArgs args) {
#if JAX_MXFP8_WGMMA
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (SmemAddr(smem_raw) & 1023)) & 1023);  // swizzle atoms
  const uint32_t sbase = SmemAddr(smem);
  const uint32_t full0 = sbase + T::kBarOff, empty0 = full0 + 8 * STAGES;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int split = blockIdx.x % args.splits, tile = blockIdx.x / args.splits;
  const int m_tile = tile % args.m_tiles, n_tile = tile / args.m_tiles;
  WgmmaArgs a = args;
  int m0 = m_tile * BM, rows = min(BM, a.m - m0);  // the x / y rows of this block's tile
  if constexpr (kGrouped) {
    // Row chunk m_tile is one expert's rows: that expert's weight, rows [row_begin, + rows).
    // The TMA box still loads BM rows from row_begin (the next expert's, or zero fill past
    // T); only the chunk's rows are stored.
    const GroupChunk chunk = FindChunk<BM, T::kThreads>(a.group_sizes, a.experts, a.m, m_tile);
    if (chunk.expert == -2) return;
    if (chunk.expert == -1) {
      ZeroRows(a.y, a.n, a.out_type, chunk.row_begin, chunk.rows, n_tile * T::kBN, T::kBN, tid,
               T::kThreads);
      return;
    }
    m0 = chunk.row_begin;
    rows = chunk.rows;
    a.w += chunk.expert * a.w_stride;
    a.s += chunk.expert * a.s_stride;
    a.flags += chunk.expert;
    if (a.bias != nullptr)
      a.bias = static_cast<const uint8_t*>(a.bias) +
               static_cast<size_t>(chunk.expert) * a.n * (a.bias_type == kF32 ? 4 : 2);
  }
  const int kt_total = a.k / kBK;
  const int kt_begin = split * kt_total / a.splits;  // near-equal ranges, none empty (host)
  const int num_kt = (split + 1) * kt_total / a.splits - kt_begin;
  Hooks::Point(tid == 0, 0);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      MbarInit(full0 + 8 * s, 1);           // the producer's expect_tx arrival (+ bytes)
      MbarInit(empty0 + 8 * s, 4 * C);      // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) {
    SetMaxNRegDec<T::kProducerRegs>();
    if (tid == 0) Produce<T>(&x_map, a, sbase, full0, empty0, kt_begin, num_kt, n_tile, m0);
    if constexpr (kReduce == Reduce::kCluster) {  // the consumers' cluster barriers count every thread
      ClusterSync();
      ClusterSync();
    }
    return;
  }
  SetMaxNRegInc<T::kConsumerRegs>();
  const int c = wg - 1, wi = (tid >> 5) & 3, ct = tid - 128;
  float acc[BM / 2];
#pragma unroll
  for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;
  if (__ldg(a.flags) & 1)
    Consume<T, true, Hooks>(acc, smem, sbase, full0, empty0, num_kt, c, wi, lane);
  else
    Consume<T, false, Hooks>(acc, smem, sbase, full0, empty0, num_kt, c, wi, lane);
  Hooks::Point(tid == 128, 2);

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
      Hooks::Point(tid == 128, 3);
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
      Hooks::Point(tid == 128, 3);
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
    Hooks::Point(tid == 128, 4);
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
  if constexpr (kReduce != Reduce::kCluster) {
    ConsumerBarrier(128 * C);
    const int stored = min(rows, row_end) - row_begin;
    for (int idx = ct; idx < stored * kVecs; idx += 128 * C) {
      const int row = row_begin + idx / kVecs, v = idx % kVecs;
      StoreOut(a, m0 + row, n_tile * T::kBN + 4 * v,
               *reinterpret_cast<const float4*>(st + row * T::kOutStride + 4 * v));
    }
    Hooks::Point(tid == 128, 5);
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
    Hooks::Point(tid == 128, 5);
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

// `spread`: let the K splits of a tile share its sum when the grid fits on the GPU at once
// (they wait for each other; a block that is not resident yet would never arrive otherwise).
template <int BM, int C, int STAGES, int BLOCKS, Reduce kReduce, typename Hooks = NoHooks,
          bool kGrouped = false>
ffi::Error LaunchWgmmaKernel(cudaStream_t stream, const CUtensorMap& map, WgmmaArgs args,
                             unsigned blocks, bool spread = true) {
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  auto kernel = MarlinWgmmaKernel<BM, C, STAGES, BLOCKS, kReduce, Hooks, kGrouped>;
  static SmemLimit smem_limit;  // one per instantiation
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(AllowSmem(kernel, T::kSmemBytes, smem_limit));
  if constexpr (kReduce == Reduce::kWorkspace) {
    static ResidentBlocks resident;
    int fit = 0;
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(resident.Get(kernel, T::kThreads, T::kSmemBytes, &fit));
    args.spread = T::kCanSpread && spread && blocks <= static_cast<unsigned>(fit);
  }
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(LaunchKernel(kernel, blocks, T::kThreads, T::kSmemBytes, stream,
                                              kReduce == Reduce::kCluster ? args.splits : 1,
                                              args.spread != 0, map, args));
  return CheckLaunch("marlin wgmma kernel");
}

// ws: the FFI workspace (K splits summed through global memory); spread = false keeps the
// last-block sum even where the grid is resident (tools/wgmma_trace.cu compares the two).
// kGrouped: a grouped launch (args.group_sizes), one K range per block (splits 1).
template <int BM, int C, int STAGES, int BLOCKS, typename Hooks = NoHooks, bool kGrouped = false>
ffi::Error LaunchWgmma(cudaStream_t stream, const CUtensorMap& map, WgmmaArgs args, bool cluster,
                       uint8_t* ws, size_t ws_bytes, bool spread = true) {
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  if (args.n % T::kBN != 0)
    return ffi::Error::InvalidArgument("marlin wgmma: N=" + std::to_string(args.n) +
                                       " is not a multiple of the block width " + std::to_string(T::kBN));
  const int64_t m_tiles = kGrouped ? GroupedChunks(args.m, args.experts, BM) : (args.m + BM - 1) / BM;
  const long long tiles = static_cast<long long>(args.n / T::kBN) * m_tiles;
  if (tiles * args.splits > 0x7FFFFFFF) return ffi::Error::InvalidArgument("marlin wgmma: grid too large");
  args.m_tiles = static_cast<int>(m_tiles);
  const unsigned blocks = static_cast<unsigned>(tiles * args.splits);
  if constexpr (kGrouped) {
    if (args.splits != 1) return ffi::Error::InvalidArgument("marlin grouped wgmma: splits must be 1");
    return LaunchWgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kNone, Hooks, true>(stream, map, args, blocks);
  }
  if (args.splits == 1)
    return LaunchWgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kNone, Hooks>(stream, map, args, blocks);
  if (cluster)
    return LaunchWgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kCluster, Hooks>(stream, map, args, blocks);
  // Counters, then the partial tiles (WgmmaWorkspace, the size the lowering allocated).
  const SplitWorkspace layout = WgmmaWorkspace(args.m, args.n, BM, C, args.splits, false);
  const size_t needed = static_cast<size_t>(layout.counter_bytes + layout.partial_bytes);
  if (ws_bytes < needed)
    return ffi::Error::InvalidArgument("marlin wgmma: workspace of " + std::to_string(ws_bytes) +
                                       " bytes < the " + std::to_string(needed) + " needed");
  args.counters = reinterpret_cast<int32_t*>(ws);
  args.partial = reinterpret_cast<float*>(ws + layout.counter_bytes);
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws, 0, layout.counter_bytes, stream));
  return LaunchWgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kWorkspace, Hooks>(stream, map, args, blocks,
                                                                             spread);
}

// The configurations jax_mxfp8/backends/marlin/kernels.py may ask for (WGMMA_CONFIGS): x rows
// per block, consumer warpgroups, blocks per SM.
template <bool kGrouped>
ffi::Error DispatchWgmma(cudaStream_t stream, const CUtensorMap& map, const WgmmaArgs& args, int bm,
                         int c, int blocks_per_sm, bool cluster, uint8_t* ws, size_t bytes) {
  switch (bm * 100 + c * 10 + blocks_per_sm) {
    case 6412: return LaunchWgmma<64, 1, 8, 2, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 12812: return LaunchWgmma<128, 1, 5, 2, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 6421: return LaunchWgmma<64, 2, 8, 1, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 6422: return LaunchWgmma<64, 2, 6, 2, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 12821: return LaunchWgmma<128, 2, 8, 1, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 6441: return LaunchWgmma<64, 4, 8, 1, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    case 25621: return LaunchWgmma<256, 2, 5, 1, NoHooks, kGrouped>(stream, map, args, cluster, ws, bytes);
    default:
      return ffi::Error::InvalidArgument("marlin wgmma: no compiled configuration for block_m=" +
                                         std::to_string(bm) + ", consumers=" + std::to_string(c) +
                                         ", blocks_per_sm=" + std::to_string(blocks_per_sm));
  }
}

bool BuiltForSm90a() {
  return std::string(JAX_MXFP8_CUDA_ARCHS).find("90a") != std::string::npos;
}

ffi::Error CheckSm90a(const std::string& what) {
  int device = 0, major = 0, minor = 0;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0 || !BuiltForSm90a())
    return ffi::Error::InvalidArgument(
        what + ": needs a compute capability 9.0 GPU (H100/H200) and a build whose "
        "CMAKE_CUDA_ARCHITECTURES include 90a (this GPU: " + std::to_string(major) + "." +
        std::to_string(minor) + ", built for " + JAX_MXFP8_CUDA_ARCHS + "); use the mma.sync kernel");
  return ffi::Error::Success();
}

ffi::Error MarlinWgmmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> qweight,
                           ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> flags,
                           ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::U8>> workspace, int32_t block_m,
                           int32_t consumers, int32_t blocks_per_sm, int32_t splits, int32_t cluster) {
  PackedGemm g;
  JAX_MXFP8_RETURN_IF_ERROR(CheckPackedGemm("marlin wgmma", x, qweight, scales, flags, bias, *y, g));
  if (g.x_type != kBF16)
    return ffi::Error::InvalidArgument("marlin wgmma: x must be bfloat16 (fp16 x uses the mma.sync kernel)");
  const int64_t m = g.m, k = g.k, n = g.n;
  if (m == 0) return ffi::Error::Success();
  const int max_splits = cluster ? kMaxClusterSplits : kMaxWgmmaSplits;
  if (splits < 1 || splits > max_splits || splits > k / kBK)
    return ffi::Error::InvalidArgument("marlin wgmma: splits=" + std::to_string(splits) +
                                       " must be in [1, min(" + std::to_string(max_splits) +
                                       ", K/64 = " + std::to_string(k / kBK) + ")]");
  JAX_MXFP8_RETURN_IF_ERROR(CheckSm90a("marlin wgmma"));

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
  return DispatchWgmma<false>(stream, map, args, block_m, consumers, blocks_per_sm, cluster != 0,
                             workspace->typed_data(), workspace->element_count());
}

// The grouped GEMM on wgmma (marlin.cu's grouped kernel for many rows per expert): x [T, K]
// bf16 rows grouped by expert (group_sizes [E]), qweight [E, K/16, 16N], scales [E, K/32, N],
// flags [E, 1], bias [E, N] or [0] -> y [T, N], rows past sum(group_sizes) zero. Grid:
// (ceil(T / block_m) + min(E, T)) row chunks x N tiles, one K range per block.
ffi::Error MarlinGroupedWgmmaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> qweight,
                                  ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> flags,
                                  ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer bias,
                                  ffi::Result<ffi::AnyBuffer> y, int32_t block_m, int32_t consumers,
                                  int32_t blocks_per_sm) {
  GroupedGemm g;
  JAX_MXFP8_RETURN_IF_ERROR(
      CheckGroupedGemm("marlin grouped wgmma", x, qweight, scales, flags, group_sizes, bias, *y, g));
  if (g.x_type != kBF16)
    return ffi::Error::InvalidArgument("marlin grouped wgmma: x must be bfloat16 (fp16 x uses the "
                                       "mma.sync grouped kernel)");
  if (g.t == 0) return ffi::Error::Success();
  JAX_MXFP8_RETURN_IF_ERROR(CheckSm90a("marlin grouped wgmma"));
  WgmmaArgs args{};
  args.w = qweight.typed_data();
  args.s = scales.typed_data();
  args.flags = flags.typed_data();
  args.bias = g.bias_type != kNone ? bias.untyped_data() : nullptr;
  args.y = y->untyped_data();
  args.m = static_cast<int>(g.t);
  args.n = static_cast<int>(g.n);
  args.k = static_cast<int>(g.k);
  args.bias_type = g.bias_type;
  args.out_type = g.out_type;
  args.splits = 1;
  args.group_sizes = group_sizes.typed_data();
  args.experts = static_cast<int>(g.e);
  args.w_stride = static_cast<size_t>(g.k) * g.n;
  args.s_stride = static_cast<size_t>(g.k / 32) * g.n;
  CUtensorMap map;
  JAX_MXFP8_RETURN_IF_ERROR(EncodeX(&map, x.untyped_data(), g.t, g.k, block_m));
  return DispatchWgmma<true>(stream, map, args, block_m, consumers, blocks_per_sm, false, nullptr, 0);
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
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace (K splits, cluster = 0)
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("consumers")
                                  .Attr<int32_t>("blocks_per_sm")
                                  .Attr<int32_t>("splits")       // K splits of each output tile
                                  .Attr<int32_t>("cluster"),     // 1: summed in a cluster (<= 8 splits)
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinGroupedWgmmaHandler, MarlinGroupedWgmmaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [T, K] bf16
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qweight [E, K/16, 16N]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales [E, K/32, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // flags [E, 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_sizes [E]
                                  .Arg<ffi::AnyBuffer>()         // bias [E, N] or [0]
                                  .Ret<ffi::AnyBuffer>()         // y [T, N]
                                  .Attr<int32_t>("block_m")
                                  .Attr<int32_t>("consumers")
                                  .Attr<int32_t>("blocks_per_sm"),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_wgmma_cuda", MarlinWgmmaHandler);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_grouped_wgmma_cuda", MarlinGroupedWgmmaHandler);

}  // namespace jax_mxfp8
