// K-split counts and workspace layouts of the MARLIN GEMM kernels (ffi/src/marlin.cu and
// ffi/src/marlin_sm90.cu). The kernels' host code checks and carves the workspace with these
// functions, and the CPU module exposes them to the Python lowering, which sizes the hidden
// workspace result before the kernel runs: one definition for both sides.
// Host-only and dependency-free (no CUDA headers), so the CPU module can include it.
#pragma once

#include <cstdint>

namespace jax_mxfp8 {
namespace marlin {

// K per pipeline stage of both kernels, and the granularity of the packed layout.
inline constexpr int kStageK = 64;
// K splits summed inside one thread-block cluster: the portable cluster size.
inline constexpr int kMaxClusterSplits = 8;
// K splits of the wgmma kernel summed through the workspace.
inline constexpr int kMaxWgmmaSplits = 64;
// Size of the workspace result when no K split needs one (XLA buffers are never empty).
inline constexpr int64_t kMinWorkspaceBytes = 256;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// How the mma.sync kernel divides the K / 64 stages: `splits` clamped to [1, K / 64], then
// as few splits as give the same stages per split, so that no split is empty.
struct SplitK {
  int splits;
  int kt_per_split;
};

constexpr SplitK MarlinSplitK(int64_t k, int64_t splits) {
  const int64_t kt_total = k / kStageK;
  if (kt_total < 1) return {1, 0};
  const int64_t s = splits < 1 ? 1 : splits > kt_total ? kt_total : splits;
  const int64_t per = CeilDiv(kt_total, s);
  return {static_cast<int>(CeilDiv(kt_total, per)), static_cast<int>(per)};
}

constexpr int MarlinEffectiveSplits(int64_t k, int64_t splits) { return MarlinSplitK(k, splits).splits; }

// A K-split workspace: int32 counters (one per output tile, zeroed before the launch) padded to
// 256 bytes, then every split's fp32 partial tiles. used = false: the launch needs none.
struct SplitWorkspace {
  bool used;
  int64_t counter_bytes;
  int64_t partial_bytes;
  // The size of the workspace result the lowering allocates.
  constexpr int64_t bytes() const { return used ? counter_bytes + partial_bytes : kMinWorkspaceBytes; }
};

// mma.sync kernel: blocks of 16 * m_blocks rows x 64 * warps_n columns; partials
// [splits][m_chunks * 16 * m_blocks][n]. No workspace for one split or cluster reductions.
constexpr SplitWorkspace MarlinWorkspace(int64_t m, int64_t n, int64_t k, int64_t m_blocks,
                                         int64_t warps_n, int64_t splits, bool cluster) {
  const int64_t s = MarlinEffectiveSplits(k, splits);
  if (s == 1 || m <= 0 || cluster || m_blocks < 1 || warps_n < 1) return {false, 0, 0};
  const int64_t rows = 16 * m_blocks;
  const int64_t m_chunks = CeilDiv(m, rows);
  return {true, RoundUp(n / (64 * warps_n) * m_chunks * 4, 256), s * m_chunks * rows * n * 4};
}

// wgmma kernel: tiles of block_m tokens x 64 * consumers output columns; partials
// [splits][tiles][block_m * 64 * consumers]. No workspace for one split or cluster reductions.
constexpr SplitWorkspace WgmmaWorkspace(int64_t m, int64_t n, int64_t block_m, int64_t consumers,
                                        int64_t splits, bool cluster) {
  if (splits <= 1 || cluster || m <= 0 || block_m < 1 || consumers < 1) return {false, 0, 0};
  const int64_t tiles = CeilDiv(m, block_m) * (n / (64 * consumers));
  return {true, RoundUp(tiles * 4, 256), splits * tiles * block_m * 64 * consumers * 4};
}

}  // namespace marlin
}  // namespace jax_mxfp8
