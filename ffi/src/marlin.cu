// Marlin-style W8A16 MXFP8 GEMM: y[M, N] = x[M, K] . dequantize(W)[N, K]^T (+ bias), fp32
// accumulation, with the weight dequantized in registers right before the tensor-core mma.
//
// The technique is that of IST-DASLab/marlin and vLLM's Marlin template; no code is copied
// from them.
//
// Packed weight (jax_mxfp8/backends/marlin/layout.py builds it; its formulas are the spec):
//   qweight uint8 [K/16, 16*N]: one 1 KiB tile per (k16 row kt, 64-column tile nt), stored
//   [kt][nt][half 2][lane 32][word 4][byte 4]. Lane l = 4g + c, word j = 4*half + w holds
//   column n = 64*nt + g + 8j and rows k = 16*kt + {2c, 2c+8, 2c+1, 2c+9} (bytes 0..3), i.e.
//   exactly the two B-fragment registers of mma.m16n8k16 for the n8 tile j once every code is
//   moved into a 16-bit half (the bits of each word are interleaved for that: Dequant in
//   marlin_common.cuh). Each lane reads its 32 bytes as two 16-B vectors, so global loads,
//   cp.async and shared-memory reads are all linear.
//   scales uint8 [K/32, N]: row = group, within each 64 columns position 8g + j holds column
//   g + 8j, so a lane group finds its eight scales in 8 contiguous bytes.
//   flags int32 [1]: bit 0 = "general" weight (a NaN value code, a NaN scale or a scale byte
//   above 134 somewhere); otherwise the faster folded-scale dequantization is exact.
//
// Dequantization (both paths are exact: one RNE rounding of value * 2^(e-127) to bf16):
//   fp8 s.eeee.mmm placed in a 16-bit half as bf16 (sign, 0000.eeee.mmm.0000) is exactly
//   value * 2^-120 (fp8 subnormals become bf16 subnormals). Fast path: one bf16x2 multiply by
//   2^(e-7) (exponent field e + 120 <= 254). General path: multiply by 2^120 (exact, normal),
//   then by 2^(e-127) (e = 0 -> bf16 subnormal 2^-127, e = 255 -> NaN), and NaN value codes
//   are forced to NaN. fp16 activations are split exactly into bf16 hi + lo parts (two mma),
//   so fp16 inputs keep their full precision without any range limit on the weight.
//
// Work split: block = 128 threads = WN warps across N (64 columns each) x WK = 4/WN warps
// across the k16 sub-tiles of each 64-deep pipeline stage; block tile = 16*MB rows x 64*WN
// columns x (K / splits). Blocks are not persistent: many small blocks stay resident together
// and share HBM bandwidth evenly. K splits (splits > 1): with cluster = 1 (SM90+, splits <= 8)
// the splits of one tile form a thread-block cluster; each block stores its fp32 partials into
// the shared memory of the block that owns that part of the tile (DSMEM), and owners sum them
// in split order: no workspace traffic, counters or memset (the CUDA programming guide's
// distributed shared memory section shows the mechanism). Otherwise each block writes its
// partial to the workspace and counts itself on the tile's counter (zeroed by a memset on the
// stream); where the whole grid is resident at once the splits wait for each other and each
// sums 1/splits of the tile, else the tile's last block sums it all. All are deterministic:
// the same additions in the same order.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "jax_mxfp8/ffi_common.h"
#include "jax_mxfp8/marlin_workspace.h"
#include "marlin_common.cuh"

namespace jax_mxfp8 {
namespace {

using namespace marlin;  // NOLINT: the shared dequantization and epilogue helpers

// kStageK (K per pipeline stage) and kMaxClusterSplits: jax_mxfp8/marlin_workspace.h.
constexpr int kThreads = 128;
constexpr int kSubTiles = kStageK / 16;  // k16 sub-tiles per stage

// ---- PTX helpers ---------------------------------------------------------------------------

// 16-byte async copy global -> shared, L2 only; src_size 0 zero-fills (rows past M).
// (No L2 evict_first cache-policy operand on the weight loads: on H100 with nvcc 13.0 the
// cp.async ... L2::cache_hint form issued from the main loop raised ILLEGAL_INSTRUCTION.)
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_size));
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp16x2 -> exact bf16x2 hi + lo (x = hi + lo: an fp16 significand has 11 bits).
__device__ __forceinline__ void SplitF16(uint32_t v, uint32_t& hi, uint32_t& lo) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
  const __nv_bfloat162 h = __floats2bfloat162_rn(f.x, f.y);
  const float2 fh = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(f.x - fh.x, f.y - fh.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// ---- the GEMM kernel -----------------------------------------------------------------------

struct GemmArgs {
  const void* x;          // [m, k] bf16 or fp16
  const uint8_t* w;       // packed values
  const uint8_t* s;       // packed scales
  const int32_t* flags;   // [1]
  const void* bias;       // [n] or null
  void* y;                // [m, n]
  float* partial;         // [splits, m_chunks * 16 * MB, n] when splits > 1
  int32_t* counters;      // [n_tiles * m_chunks] when splits > 1
  int m, n, k;
  int splits, kt_per_split, m_chunks;
  int bias_type, out_type;
  int cluster;            // 1: the splits of a tile are one cluster (SM90+), no workspace
  int spread;             // workspace, whole grid resident: the splits of a tile wait for each
                          // other and each sums 1/splits of it (else its last block sums all)
  // Grouped (ragged) launches: x rows grouped by expert, group_sizes [experts] on the device,
  // qweight / scales / flags / bias stacked per expert (strides in elements of each array).
  const int32_t* group_sizes;
  int experts;
  size_t w_stride, s_stride;
};

template <int MB, int WN, int STAGES>
struct Tile {
  static constexpr int kWK = 4 / WN;
  static constexpr int kSubPerWarp = kSubTiles / kWK;
  static constexpr int kRows = 16 * MB;
  static constexpr int kCols = 64 * WN;
  static constexpr int kBBytes = kSubTiles * WN * 1024;
  static constexpr int kABytes = kRows * kStageK * 2;
  static constexpr int kSBytes = 2 * kCols;
  static constexpr int kStageBytes = kBBytes + kABytes + kSBytes;
  static constexpr int kRedStride = kCols + 8;  // floats; padding spreads the fragment stores
  static constexpr int kRedFloats = kWK * kRows * kRedStride;
  static constexpr int kRedBytes = kRedFloats * 4;
  // cluster split-K: a receive buffer of splits x ceil(tile / splits) float4 after the slices
  static constexpr int kClusterBytes = kRedBytes + (kRows * kCols / 4 + kMaxClusterSplits) * 16;
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kSmemBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;
  static constexpr int kClusterSmemBytes = kSmemBytes > kClusterBytes ? kSmemBytes : kClusterBytes;
  static_assert(WN * kWK == 4, "4 warps per block");
  static_assert(kStageBytes % 128 == 0, "stage alignment");
};

template <int MB, int WN, int STAGES, typename XT>
__device__ __forceinline__ void LoadStage(const GemmArgs& a, uint8_t* stage, int kt, int n_tile,
                                          int m0) {
  using T = Tile<MB, WN, STAGES>;
  const int tid = threadIdx.x;
  const int n_tiles64 = a.n / 64;
#pragma unroll
  for (int i = 0; i < 2 * WN; ++i) {  // B: 4 sub-tiles x WN tiles x 64 vectors
    const int q = tid + kThreads * i;
    const int sub = q / (64 * WN), rest = q % (64 * WN);
    const size_t vec = (static_cast<size_t>(kt * kSubTiles + sub) * n_tiles64 + n_tile * WN) * 64 + rest;
    CpAsync16(SmemAddr(stage + q * 16), a.w + vec * 16, true);
  }
  const XT* x = static_cast<const XT*>(a.x);
#pragma unroll
  for (int i = 0; i < MB; ++i) {  // A: rows x 8 vectors, XOR-swizzled for ldmatrix
    const int q = tid + kThreads * i;
    const int row = q >> 3, ch = q & 7;
    const int grow = m0 + row;
    const bool valid = grow < a.m;
    // rows past M read the chunk's first row (inside x whatever the base) and are zero-filled
    const XT* src = x + static_cast<ptrdiff_t>(valid ? grow : m0) * a.k + kt * kStageK + ch * 8;
    CpAsync16(SmemAddr(stage + T::kBBytes + (row * 8 + (ch ^ (row & 7))) * 16), src, valid);
  }
  if (tid < 8 * WN) {  // scales: 2 groups x 64*WN bytes
    const int grp = tid / (4 * WN), rest = tid % (4 * WN);
    const uint8_t* src = a.s + static_cast<size_t>(kt * 2 + grp) * a.n + n_tile * T::kCols + rest * 16;
    CpAsync16(SmemAddr(stage + T::kBBytes + T::kABytes + tid * 16), src, true);
  }
}

template <int MB, int WN, int STAGES, typename XT, bool kGeneral>
__device__ __forceinline__ void ComputeStage(const uint8_t* stage, float (&acc)[MB][8][4]) {
  using T = Tile<MB, WN, STAGES>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const uint32_t a_base = SmemAddr(stage + T::kBBytes);
  uint32_t scale[8];
#pragma unroll
  for (int ss = 0; ss < T::kSubPerWarp; ++ss) {
    const int sub = wk * T::kSubPerWarp + ss;
    if (ss % 2 == 0) {  // a new 32-group starts: its 8 column scales for this lane group
      const int grp = sub >> 1;
      const uint2 raw = *reinterpret_cast<const uint2*>(
          stage + T::kBBytes + T::kABytes + (grp * WN + wn) * 64 + (lane >> 2) * 8);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        scale[j] = ScalePair<kGeneral>(raw.x, j);
        scale[4 + j] = ScalePair<kGeneral>(raw.y, j);
      }
    }
    const uint4* bsrc = reinterpret_cast<const uint4*>(stage) + (sub * WN + wn) * 64 + lane;
    const uint4 b_lo = bsrc[0], b_hi = bsrc[32];
    const uint32_t words[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
    uint32_t afrag[MB][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const int row = mb * 16 + (lane & 15);
      const int ch = 2 * sub + (lane >> 4);
      LdMatrixX4(afrag[mb], a_base + (row * 8 + (ch ^ (row & 7))) * 16);
    }
    if constexpr (std::is_same<XT, __half>::value) {
      uint32_t hi[MB][4], lo[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int r = 0; r < 4; ++r) SplitF16(afrag[mb][r], hi[mb][r], lo[mb][r]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t b0, b1;
        Dequant<kGeneral>(words[j], scale[j], b0, b1);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          MmaBf16(acc[mb][j], hi[mb], b0, b1);
          MmaBf16(acc[mb][j], lo[mb], b0, b1);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t b0, b1;
        Dequant<kGeneral>(words[j], scale[j], b0, b1);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) MmaBf16(acc[mb][j], afrag[mb], b0, b1);
      }
    }
  }
}

template <int MB, int WN, int STAGES, typename XT, bool kGeneral>
__device__ __forceinline__ void MainLoop(const GemmArgs& a, uint8_t* smem, float (&acc)[MB][8][4],
                                         int kt_begin, int num_kt, int n_tile, int m0) {
  using T = Tile<MB, WN, STAGES>;
  int read_slot = 0, write_slot = STAGES - 1;
  for (int it = 0; it < num_kt; ++it) {
    CpAsyncWait<STAGES - 2>();
    __syncthreads();  // stage `it` landed for everyone; slot write_slot was consumed at it - 1
    const int next = it + STAGES - 1;
    if (next < num_kt)
      LoadStage<MB, WN, STAGES, XT>(a, smem + write_slot * T::kStageBytes, kt_begin + next,
                                    n_tile, m0);
    CpAsyncCommit();  // always commit (possibly empty) so the wait counts stay right
    ComputeStage<MB, WN, STAGES, XT, kGeneral>(smem + read_slot * T::kStageBytes, acc);
    read_slot = read_slot + 1 == STAGES ? 0 : read_slot + 1;
    write_slot = write_slot + 1 == STAGES ? 0 : write_slot + 1;
  }
}

// The sum over the WK warps' slices of the reduction buffer at (row, col .. col + 3).
template <typename T>
__device__ __forceinline__ float4 SumWarps(const float* red, int row, int col) {
  float4 v = *reinterpret_cast<const float4*>(red + row * T::kRedStride + col);
#pragma unroll
  for (int w = 1; w < T::kWK; ++w) {
    const float4 u = *reinterpret_cast<const float4*>(red + (w * T::kRows + row) * T::kRedStride + col);
    v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
  }
  return v;
}

// Sum over the K splits' partials of y[row, col .. col + 3], in split order (the same order
// every run, whichever block sums), four splits' loads in flight at a time.
__device__ __forceinline__ float4 SumPartials(const GemmArgs& a, int m_pad, int row, int col) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int sp0 = 0; sp0 < a.splits; sp0 += 4) {
    float4 u[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (sp0 + j < a.splits)
        u[j] = __ldcg(reinterpret_cast<const float4*>(
            a.partial + (static_cast<size_t>(sp0 + j) * m_pad + row) * a.n + col));
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (sp0 + j < a.splits) {
        v.x += u[j].x; v.y += u[j].y; v.z += u[j].z; v.w += u[j].w;
      }
  }
  return v;
}

// One block's tile: rows [m_chunk * rows, +rows) of x (valid below a.m), columns of n_tile,
// K split `split`.
template <int MB, int WN, int STAGES, typename XT>
__device__ __forceinline__ void GemmTile(const GemmArgs& a, uint8_t* smem, int split, int m_chunk,
                                         int n_tile) {
  using T = Tile<MB, WN, STAGES>;
  __shared__ int is_last_block;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int m0 = m_chunk * T::kRows, n0 = n_tile * T::kCols;
  const int kt_total = a.k / kStageK;
  const int kt_begin = split * a.kt_per_split;
  const int num_kt = max(0, min(kt_total, kt_begin + a.kt_per_split) - kt_begin);

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < num_kt)
      LoadStage<MB, WN, STAGES, XT>(a, smem + st * T::kStageBytes, kt_begin + st, n_tile, m0);
    CpAsyncCommit();
  }

  float acc[MB][8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mb][j][r] = 0.f;

  if (__ldg(a.flags) & 1)
    MainLoop<MB, WN, STAGES, XT, true>(a, smem, acc, kt_begin, num_kt, n_tile, m0);
  else
    MainLoop<MB, WN, STAGES, XT, false>(a, smem, acc, kt_begin, num_kt, n_tile, m0);

  // ---- epilogue: sum the WK warps of each column tile through shared memory ----
  CpAsyncWait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = mb * 16 + (lane >> 2);
      const int col = wn * 64 + j * 8 + (lane & 3) * 2;
      float* dst = red + (wk * T::kRows + row) * T::kRedStride + col;
      *reinterpret_cast<float2*>(dst) = make_float2(acc[mb][j][0], acc[mb][j][1]);
      *reinterpret_cast<float2*>(dst + 8 * T::kRedStride) = make_float2(acc[mb][j][2], acc[mb][j][3]);
    }
  __syncthreads();

  constexpr int kVecs = T::kCols / 4;
  if (a.cluster) {  // ---- split-K inside the cluster: push partials, owners sum ----
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Rank r owns tile vectors [r * per, (r + 1) * per). Every rank stores its partial of each
    // vector straight into the owner's receive buffer (remote stores do not wait for a round
    // trip, unlike remote loads), then each owner sums its slots locally, in split order.
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    const int total = min(T::kRows, a.m - m0) * kVecs;
    const int per = (total + a.splits - 1) / a.splits;
    float4* recv = reinterpret_cast<float4*>(red + T::kRedFloats);  // [splits][per]
    cluster.sync();  // every rank is past its main loop: receive buffers are free
    for (int idx = tid; idx < total; idx += kThreads) {
      const int owner = idx / per;
      cluster.map_shared_rank(recv, owner)[split * per + idx - owner * per] =
          SumWarps<T>(red, idx / kVecs, 4 * (idx % kVecs));
    }
    cluster.sync();  // all partials delivered
    const int mine = min(per, total - split * per);
    for (int slot = tid; slot < mine; slot += kThreads) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int sp = 0; sp < a.splits; ++sp) {
        const float4 u = recv[sp * per + slot];
        v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
      }
      const int idx = split * per + slot;
      StoreOut(a, m0 + idx / kVecs, n0 + 4 * (idx % kVecs), v);
    }
#else
    __trap();  // unreachable: the host launches clusters only with sm_90+ code (LaunchGemm)
#endif
    return;
  }

  const int m_pad = a.m_chunks * T::kRows;
  for (int idx = tid; idx < T::kRows * kVecs; idx += kThreads) {
    const int row = idx / kVecs, c4 = idx % kVecs;
    const int grow = m0 + row;
    if (grow >= a.m) continue;
    const float4 v = SumWarps<T>(red, row, 4 * c4);
    const int gcol = n0 + 4 * c4;
    if (a.splits == 1) {
      StoreOut(a, grow, gcol, v);
    } else {
      __stcg(reinterpret_cast<float4*>(a.partial + (static_cast<size_t>(split) * m_pad + grow) * a.n + gcol), v);
    }
  }
  if (a.splits == 1) return;

  // ---- split-K through the workspace: partials summed in split order ----
  int* counter = a.counters + n_tile * a.m_chunks + m_chunk;
  const int cells = min(T::kRows, a.m - m0) * kVecs;  // (row, 4 columns) cells of the tile
  int begin = 0, end = cells;
  if (a.spread) {  // split s sums cells [s, s + 1) * cells / splits once every split arrived
    __syncthreads();
    if (tid == 0) ArriveAndWait(counter, a.splits);
    __syncthreads();
    begin = split * cells / a.splits;
    end = (split + 1) * cells / a.splits;
  } else {  // the tile's last block sums it all
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last_block = atomicAdd(counter, 1) == a.splits - 1;
    __syncthreads();
    if (!is_last_block) return;
    __threadfence();
  }
  for (int idx = begin + tid; idx < end; idx += kThreads) {
    const int row = m0 + idx / kVecs, col = n0 + 4 * (idx % kVecs);
    StoreOut(a, row, col, SumPartials(a, m_pad, row, col));
  }
}

template <int MB, int WN, int STAGES, typename XT>
__global__ void __launch_bounds__(kThreads, MB == 1 ? 3 : 2) MarlinGemmKernel(const GemmArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  int b = blockIdx.x;  // split fastest: a cluster's rank is its split
  const int split = b % a.splits;
  b /= a.splits;
  GemmTile<MB, WN, STAGES, XT>(a, smem, split, b % a.m_chunks, b / a.m_chunks);
}

// The grouped GEMM: blockIdx = (split, chunk, n_tile) as in the dense kernel, each chunk one
// expert's rows against that expert's weight; the K-split workspace and counters are indexed
// by chunk, so chunks are independent tiles. Tail chunks write zeros (split 0).
template <int MB, int WN, int STAGES, typename XT>
__global__ void __launch_bounds__(kThreads, MB == 1 ? 3 : 2) MarlinGroupedGemmKernel(const GemmArgs a) {
  using T = Tile<MB, WN, STAGES>;
  extern __shared__ __align__(128) uint8_t smem[];
  int b = blockIdx.x;
  const int split = b % a.splits;
  b /= a.splits;
  const int c = b % a.m_chunks, n_tile = b / a.m_chunks;
  const GroupChunk chunk = FindChunk<T::kRows, kThreads>(a.group_sizes, a.experts, a.m, c);
  if (chunk.expert == -2) return;
  if (chunk.expert == -1) {
    if (split == 0)
      ZeroRows(a.y, a.n, a.out_type, chunk.row_begin, chunk.rows, n_tile * T::kCols, T::kCols,
               threadIdx.x, kThreads);
    return;
  }
  // The chunk as rows [c * rows, c * rows + chunk.rows) of a shifted x / y: the tile code and
  // the workspace indexing stay the dense kernel's.
  GemmArgs g = a;
  const ptrdiff_t shift = static_cast<ptrdiff_t>(chunk.row_begin) - static_cast<ptrdiff_t>(c) * T::kRows;
  const int xsize = sizeof(XT), ysize = a.out_type == kF32 ? 4 : 2;
  g.x = static_cast<const uint8_t*>(a.x) + shift * a.k * xsize;
  g.y = static_cast<uint8_t*>(a.y) + shift * a.n * ysize;
  g.m = c * T::kRows + chunk.rows;
  g.w = a.w + chunk.expert * a.w_stride;
  g.s = a.s + chunk.expert * a.s_stride;
  g.flags = a.flags + chunk.expert;
  if (a.bias != nullptr)
    g.bias = static_cast<const uint8_t*>(a.bias) +
             static_cast<size_t>(chunk.expert) * a.n * (a.bias_type == kF32 ? 4 : 2);
  GemmTile<MB, WN, STAGES, XT>(g, smem, split, c, n_tile);
}

// ---- packed weight -> bf16 [N, K] (the large-M path: dequantize, then a cuBLAS GEMM) --------

constexpr int kDqStride = 64 + 8;  // bf16 per shared row (pad: 144 B, 16-B aligned)

// Columns [n_begin, n_begin + 64 * gridDim.x) of the N-column packed weight -> out rows from 0.
__global__ void __launch_bounds__(kThreads) MarlinDequantKernel(const uint8_t* w, const uint8_t* s,
                                                               __nv_bfloat16* out, int n, int k,
                                                               int n_begin) {
  __shared__ __align__(16) __nv_bfloat16 tile[64 * kDqStride];
  const int tid = threadIdx.x;
  const int nt = n_begin / 64 + blockIdx.x, kt64 = blockIdx.y;
  const int n_tiles64 = n / 64;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = tid + kThreads * i;
    const int sub = q >> 6, half = (q >> 5) & 1, lane = q & 31;
    const int g = lane >> 2, c = lane & 3;
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(
        w + ((static_cast<size_t>(kt64 * kSubTiles + sub) * n_tiles64 + nt) * 64 + half * 32 + lane) * 16));
    const uint32_t sw = __ldg(reinterpret_cast<const uint32_t*>(
        s + static_cast<size_t>(kt64 * 2 + (sub >> 1)) * n + nt * 64 + 8 * g + 4 * half));
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      uint32_t r0, r1;
      Dequant<true>(words[wi], ScalePair<true>(sw, wi), r0, r1);
      const int col = g + 8 * (4 * half + wi);
      __nv_bfloat16* row = tile + col * kDqStride + sub * 16 + 2 * c;
      *reinterpret_cast<uint32_t*>(row) = r0;
      *reinterpret_cast<uint32_t*>(row + 8) = r1;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int q = tid + kThreads * i;
    const int row = q >> 3, ch = q & 7;
    const uint4 v = *reinterpret_cast<const uint4*>(tile + row * kDqStride + ch * 8);
    __stcs(reinterpret_cast<uint4*>(out + static_cast<size_t>(blockIdx.x * 64 + row) * k + kt64 * kStageK + ch * 8), v);
  }
}

// ---- host side -----------------------------------------------------------------------------

template <int MB, int WN, int STAGES, typename XT, bool kGrouped>
ffi::Error LaunchGemm(cudaStream_t stream, const GemmArgs& args) {
  using T = Tile<MB, WN, STAGES>;
  if (args.n % T::kCols != 0)
    return ffi::Error::InvalidArgument("marlin: N=" + std::to_string(args.n) +
                                       " is not a multiple of the tile width " +
                                       std::to_string(T::kCols));
  auto kernel = kGrouped ? MarlinGroupedGemmKernel<MB, WN, STAGES, XT> : MarlinGemmKernel<MB, WN, STAGES, XT>;
  // Raised only as far as each kind of launch needs: SM86/SM89 allow 99 KiB per block, which
  // every tile's plain launch fits; cluster launches (SM90+, 227 KiB) need the receive buffer.
  static SmemLimit smem_limit;  // one per instantiation
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(
      AllowSmem(kernel, args.cluster ? T::kClusterSmemBytes : T::kSmemBytes, smem_limit));
  const long long blocks = static_cast<long long>(args.n / T::kCols) * args.splits * args.m_chunks;
  if (blocks > 0x7FFFFFFF) return ffi::Error::InvalidArgument("marlin: grid too large");
  if (!args.cluster) {
    GemmArgs plain = args;
    if (args.splits > 1 && !kGrouped) {  // grouped: empty chunks exit, so the last block sums
      static ResidentBlocks resident;  // one per instantiation
      int fit = 0;
      JAX_MXFP8_CUDA_RETURN_IF_ERROR(resident.Get(kernel, kThreads, T::kSmemBytes, &fit));
      plain.spread = blocks <= fit;
    }
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(LaunchKernel(kernel, static_cast<unsigned>(blocks), kThreads,
                                                T::kSmemBytes, stream, 1, plain.spread != 0, plain));
    return CheckLaunch("marlin gemm kernel");
  }
  // A build without sm_90 code would run the compute_80 PTX here, where the cluster epilogue
  // is compiled out: refuse instead of leaving y unwritten.
  cudaFuncAttributes attributes;
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.binaryVersion < 90 || attributes.ptxVersion < 90)
    return ffi::Error::InvalidArgument(
        "marlin: cluster=1 needs the kernel compiled for sm_90 or newer (this one runs code "
        "compiled for compute " + std::to_string(attributes.ptxVersion) + "); rebuild with "
        "CMAKE_CUDA_ARCHITECTURES including 90a, or use cluster=0");
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(LaunchKernel(kernel, static_cast<unsigned>(blocks), kThreads,
                                              T::kClusterSmemBytes, stream, args.splits, false, args));
  return CheckLaunch("marlin gemm kernel (cluster)");
}

template <typename XT, bool kGrouped>
ffi::Error DispatchTile(cudaStream_t stream, const GemmArgs& args, int mb, int wn) {
  // The tile configurations jax_mxfp8/backends/marlin/kernels.py may ask for (TILE_CONFIGS).
  switch (mb * 10 + wn) {
    case 11: return LaunchGemm<1, 1, 8, XT, kGrouped>(stream, args);
    case 12: return LaunchGemm<1, 2, 6, XT, kGrouped>(stream, args);
    case 14: return LaunchGemm<1, 4, 4, XT, kGrouped>(stream, args);
    case 21: return LaunchGemm<2, 1, 6, XT, kGrouped>(stream, args);
    case 22: return LaunchGemm<2, 2, 6, XT, kGrouped>(stream, args);
    case 24: return LaunchGemm<2, 4, 4, XT, kGrouped>(stream, args);
    case 41: return LaunchGemm<4, 1, 6, XT, kGrouped>(stream, args);
    case 42: return LaunchGemm<4, 2, 6, XT, kGrouped>(stream, args);
    case 44: return LaunchGemm<4, 4, 4, XT, kGrouped>(stream, args);
    default:
      return ffi::Error::InvalidArgument("marlin: no compiled tile for m_blocks=" +
                                         std::to_string(mb) + ", warps_n=" + std::to_string(wn));
  }
}

// The K-split reduction of a launch (args.splits already set): a cluster (SM90+, at most
// kMaxClusterSplits) or the workspace, whose counters are zeroed on the stream. m: the rows the
// workspace is laid out for.
ffi::Error SetUpSplits(const std::string& what, bool cluster, int64_t m, int64_t n, int64_t k,
                       int m_blocks, int warps_n, int splits, ffi::Buffer<ffi::U8>& workspace,
                       cudaStream_t stream, GemmArgs& args) {
  if (args.splits <= 1) return ffi::Error::Success();
  if (cluster) {
    int device = 0, major = 0;
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    JAX_MXFP8_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major < 9 || args.splits > kMaxClusterSplits)
      return ffi::Error::InvalidArgument(
          what + ": cluster=1 needs an SM90+ GPU and at most " + std::to_string(kMaxClusterSplits) +
          " K splits (got compute capability " + std::to_string(major) + ".x, " +
          std::to_string(args.splits) + " splits); use cluster=0");
    args.cluster = 1;
    return ffi::Error::Success();
  }
  const SplitWorkspace layout = MarlinWorkspace(m, n, k, m_blocks, warps_n, splits, false);
  if (workspace.element_count() < static_cast<size_t>(layout.counter_bytes + layout.partial_bytes))
    return ffi::Error::InvalidArgument(what + ": workspace too small for splits=" +
                                       std::to_string(args.splits));
  uint8_t* ws = workspace.typed_data();
  args.counters = reinterpret_cast<int32_t*>(ws);
  args.partial = reinterpret_cast<float*>(ws + layout.counter_bytes);
  JAX_MXFP8_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws, 0, layout.counter_bytes, stream));
  return ffi::Error::Success();
}

ffi::Error MarlinGemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> qweight,
                          ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> flags,
                          ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::Buffer<ffi::U8>> workspace, int32_t m_blocks,
                          int32_t warps_n, int32_t splits, int32_t cluster) {
  PackedGemm g;
  JAX_MXFP8_RETURN_IF_ERROR(CheckPackedGemm("marlin", x, qweight, scales, flags, bias, *y, g));
  if (g.x_type != kBF16 && g.x_type != kF16)
    return ffi::Error::InvalidArgument("marlin: x must be bfloat16 or float16");
  const int64_t m = g.m, k = g.k, n = g.n;
  const bool has_bias = g.bias_type != kNone;
  if (m == 0) return ffi::Error::Success();
  if (m_blocks < 1 || splits < 1) return ffi::Error::InvalidArgument("marlin: bad launch parameters");

  GemmArgs args{};
  args.x = x.untyped_data();
  args.w = qweight.typed_data();
  args.s = scales.typed_data();
  args.flags = flags.typed_data();
  args.bias = has_bias ? bias.untyped_data() : nullptr;
  args.y = y->untyped_data();
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  const SplitK split = MarlinSplitK(k, splits);  // no empty splits
  args.splits = split.splits;
  args.kt_per_split = split.kt_per_split;
  const int rows = 16 * m_blocks;
  args.m_chunks = static_cast<int>((m + rows - 1) / rows);
  args.bias_type = g.bias_type;
  args.out_type = g.out_type;
  JAX_MXFP8_RETURN_IF_ERROR(
      SetUpSplits("marlin", cluster, m, n, k, m_blocks, warps_n, splits, *workspace, stream, args));
  if (g.x_type == kBF16) return DispatchTile<__nv_bfloat16, false>(stream, args, m_blocks, warps_n);
  return DispatchTile<__half, false>(stream, args, m_blocks, warps_n);
}

// The grouped GEMM: x [T, K] rows grouped by expert (group_sizes [E]), qweight [E, K/16, 16N],
// scales [E, K/32, N], flags [E, 1], bias [E, N] or [0] -> y [T, N], rows past
// sum(group_sizes) zero. Grid: splits x (ceil(T / rows) + min(E, T)) chunks x N tiles (the
// most chunks any grouping needs; the unused ones exit at once).
ffi::Error MarlinGroupedGemmImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> qweight,
                                 ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> flags,
                                 ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer bias,
                                 ffi::Result<ffi::AnyBuffer> y,
                                 ffi::Result<ffi::Buffer<ffi::U8>> workspace, int32_t m_blocks,
                                 int32_t warps_n, int32_t splits, int32_t cluster) {
  GroupedGemm gg;
  JAX_MXFP8_RETURN_IF_ERROR(
      CheckGroupedGemm("marlin grouped", x, qweight, scales, flags, group_sizes, bias, *y, gg));
  const int64_t t = gg.t, k = gg.k, n = gg.n, e = gg.e;
  const int x_type = gg.x_type, out_type = gg.out_type, bias_type = gg.bias_type;
  if (x_type != kBF16 && x_type != kF16)
    return ffi::Error::InvalidArgument("marlin grouped: x must be bfloat16 or float16");
  if (t == 0) return ffi::Error::Success();
  if (m_blocks < 1 || splits < 1) return ffi::Error::InvalidArgument("marlin grouped: bad launch parameters");

  GemmArgs args{};
  args.x = x.untyped_data();
  args.w = qweight.typed_data();
  args.s = scales.typed_data();
  args.flags = flags.typed_data();
  args.bias = bias_type != kNone ? bias.untyped_data() : nullptr;
  args.y = y->untyped_data();
  args.m = static_cast<int>(t);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  const SplitK split = MarlinSplitK(k, splits);
  args.splits = split.splits;
  args.kt_per_split = split.kt_per_split;
  const int rows = 16 * m_blocks;
  const int64_t chunks = GroupedChunks(t, e, rows);
  if (chunks * rows > 0x7FFFFFFF)
    return ffi::Error::InvalidArgument("marlin grouped: T and E too large for one launch");
  args.m_chunks = static_cast<int>(chunks);
  args.bias_type = bias_type;
  args.out_type = out_type;
  args.group_sizes = group_sizes.typed_data();
  args.experts = static_cast<int>(e);
  args.w_stride = static_cast<size_t>(k) * n;
  args.s_stride = static_cast<size_t>(k / 32) * n;
  JAX_MXFP8_RETURN_IF_ERROR(SetUpSplits("marlin grouped", cluster,
                                        static_cast<int64_t>(args.m_chunks) * rows, n, k, m_blocks,
                                        warps_n, splits, *workspace, stream, args));
  if (x_type == kBF16) return DispatchTile<__nv_bfloat16, true>(stream, args, m_blocks, warps_n);
  return DispatchTile<__half, true>(stream, args, m_blocks, warps_n);
}

// out [rows, K] = columns [n_begin, n_begin + rows) of the dequantized [N, K] weight.
ffi::Error MarlinDequantImpl(cudaStream_t stream, ffi::Buffer<ffi::U8> qweight,
                             ffi::Buffer<ffi::U8> scales, ffi::Result<ffi::Buffer<ffi::BF16>> out,
                             int32_t n_begin) {
  const auto od = out->dimensions();
  const auto sd = scales.dimensions();
  if (od.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("marlin dequantize: out and scales must be 2-D");
  const int64_t rows = od[0], k = od[1], n = sd[1];
  if (n % 64 != 0 || rows % 64 != 0 || n_begin % 64 != 0 || k % kStageK != 0 || n > 0x7FFFFFFF ||
      k > 0x7FFFFFFF)
    return ffi::Error::InvalidArgument("marlin dequantize: N, K, the row count and n_begin must be "
                                       "multiples of 64");
  if (n_begin < 0 || n_begin + rows > n)
    return ffi::Error::InvalidArgument("marlin dequantize: columns [" + std::to_string(n_begin) + ", " +
                                       std::to_string(n_begin + rows) + ") are outside N=" +
                                       std::to_string(n));
  if (qweight.element_count() != static_cast<size_t>(n * k) || sd[0] != k / 32)
    return ffi::Error::InvalidArgument("marlin dequantize: packed shapes do not match [N, K]");
  if (rows == 0 || k == 0) return ffi::Error::Success();
  if (k / kStageK > 65535) return ffi::Error::InvalidArgument("marlin dequantize: K too large");
  const dim3 grid(static_cast<unsigned>(rows / 64), static_cast<unsigned>(k / kStageK));
  MarlinDequantKernel<<<grid, kThreads, 0, stream>>>(
      qweight.typed_data(), scales.typed_data(),
      reinterpret_cast<__nv_bfloat16*>(out->typed_data()), static_cast<int>(n), static_cast<int>(k),
      n_begin);
  return CheckLaunch("marlin dequantize kernel");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinGemmHandler, MarlinGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qweight [K/16, 16N]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales [K/32, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // flags [1]
                                  .Arg<ffi::AnyBuffer>()         // bias [N] or [0]
                                  .Ret<ffi::AnyBuffer>()         // y [M, N]
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace (hidden)
                                  .Attr<int32_t>("m_blocks")
                                  .Attr<int32_t>("warps_n")
                                  .Attr<int32_t>("splits")
                                  .Attr<int32_t>("cluster"),  // 1: reduce splits in DSMEM
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinDequantHandler, MarlinDequantImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qweight
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // [rows, K]
                                  .Attr<int32_t>("n_begin"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinGroupedGemmHandler, MarlinGroupedGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [T, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // qweight [E, K/16, 16N]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales [E, K/32, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // flags [E, 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_sizes [E]
                                  .Arg<ffi::AnyBuffer>()         // bias [E, N] or [0]
                                  .Ret<ffi::AnyBuffer>()         // y [T, N]
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace (hidden)
                                  .Attr<int32_t>("m_blocks")
                                  .Attr<int32_t>("warps_n")
                                  .Attr<int32_t>("splits")
                                  .Attr<int32_t>("cluster"),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_gemm_cuda", MarlinGemmHandler);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_grouped_gemm_cuda", MarlinGroupedGemmHandler);
JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_marlin_dequantize_cuda", MarlinDequantHandler);

}  // namespace jax_mxfp8
