// Plain C++ interface (no CUTLASS, no CUDA headers) between the SM100 CUTLASS
// MXFP8 GEMM instantiations, the FFI handler that dispatches to them, and the
// host-only bindings (shape checks, workspace size) exposed to Python.
//
// Each ffi/src/sm100/gemm_<config>_<out>.cu instantiates exactly one kernel
// type and adds one GemmInstance to the registry, so the instantiations build
// in parallel and a config is added by adding one small file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace jax_mxfp8::sm100 {

// Tile configurations. Python (jax_mxfp8/backends/cutlass.py, CONFIGS) picks one
// per M at trace time and must use the same numbers.
enum class GemmConfig : int32_t {
  kSwapAB_128x64x256 = 0,  // small M: D^T = W . X^T, tokens on the 64-wide MMA N side
  k1Sm_128x128x256 = 1,    // medium M: one CTA per 128x128 tile
  k2Sm_256x128x256 = 2,    // large M: CTA pair (cluster 2x1) per 256x128 tile
};

// kF32 serves row-parallel partial products (sharding.py) and float32 callers.
enum class OutDtype : int32_t { kBF16 = 0, kF16 = 1, kF32 = 2 };

// Row-major operands: x [m, k] e4m3, w [n, k] e4m3, out [m, n]. Scales are the
// F8_128x4-swizzled uint8 buffers (numerics.md): x_scales [pad128(m) * pad4(k/32)],
// w_scales [pad128(n) * pad4(k/32)], zero padding. bias [n] float32 or null.
struct GemmArgs {
  int m = 0, n = 0, k = 0;
  const void* x = nullptr;
  const void* x_scales = nullptr;
  const void* w = nullptr;
  const void* w_scales = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct GemmInstance {
  GemmConfig config;
  OutDtype out_dtype;
  const char* name;
  bool swap_ab;
  int tile_m, tile_n, tile_k;  // MMA tile (before any operand swap)
  int cluster_m, cluster_n;
  // "" when the kernel can run (m, n, k); otherwise why not: our MX rules, then
  // CUTLASS's can_implement. Host-only, no CUDA calls.
  std::string (*check)(int m, int n, int k);
  // CUTLASS's own Gemm::can_implement verdict alone (no rule of ours), for tests.
  bool (*cutlass_can_implement)(int m, int n, int k);
  size_t (*workspace_size)(int m, int n, int k);
  // Enqueues the GEMM on `stream` (void* = cudaStream_t). "" on success.
  std::string (*run)(const GemmArgs& args, void* stream);
};

std::vector<GemmInstance>& GemmInstances();
const GemmInstance* FindGemmInstance(GemmConfig config, OutDtype out_dtype);

struct RegisterGemmInstance {
  explicit RegisterGemmInstance(const GemmInstance& instance) {
    GemmInstances().push_back(instance);
  }
};

}  // namespace jax_mxfp8::sm100
