// One CUTLASS 4.2 block-scaled MXFP8 x MXFP8 GEMM for sm_100a, parameterized by
// tile, cluster, 1SM/2SM, operand swap and output type. Included only by the
// ffi/src/sm100/gemm_<config>_<out>.cu files, one instantiation each (every
// instantiation costs ~50 s of nvcc front end).
//
// Built from CUTLASS's own pieces: the OpClassBlockScaledTensorOp collective
// builder (sm100_blockscaled_umma_builder.inl) with mx_float8_t operands and the
// Mxf8f6f4 schedules, the TMA warp-specialized epilogue with a fused bias
// (LinCombPerColBias, or LinCombPerRowBias when the operands are swapped), and
// GemmUniversalAdapter. Example 72c (MXFP8 x MXFP4) was the starting point.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "cutlass_gemm_api.h"

namespace jax_mxfp8::sm100 {

// SwapAB computes D^T [n, m] = W [n, k] . X^T: the weight rows fill the
// 128-row MMA M side and the few tokens the narrow N side; a column-major D^T
// is exactly the row-major [m, n] output, and the bias becomes per-row.
template <class OutT, int TileM, int TileN, int TileK, int ClusterM, bool TwoSm, bool SwapAB>
struct MxGemm {
  static constexpr bool kSwapAB = SwapAB;
  static constexpr int kTileM = TileM, kTileN = TileN, kTileK = TileK, kClusterM = ClusterM;
  using MxE4m3 = cutlass::mx_float8_t<cutlass::float_e4m3_t>;
  using MmaTile = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Int<TileK>>;
  using Cluster = cute::Shape<cute::Int<ClusterM>, cute::_1, cute::_1>;
  using LayoutD = std::conditional_t<SwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<OutT>::value;  // 16-byte rows

  // Bias is float32 so y = acc + bias is formed in float32 exactly as in the
  // reference (numerics.md), then rounded once to OutT.
  using Fusion = std::conditional_t<
      SwapAB, cutlass::epilogue::fusion::LinCombPerRowBias<OutT, float, float, OutT, float>,
      cutlass::epilogue::fusion::LinCombPerColBias<OutT, float, float, OutT, float>>;
  using EpilogueSchedule = std::conditional_t<TwoSm, cutlass::epilogue::TmaWarpSpecialized2Sm,
                                              cutlass::epilogue::TmaWarpSpecialized1Sm>;
  using MainloopSchedule =
      std::conditional_t<TwoSm, cutlass::gemm::KernelTmaWarpSpecialized2SmMxf8f6f4Sm100,
                         cutlass::gemm::KernelTmaWarpSpecialized1SmMxf8f6f4Sm100>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlignD,  // no C operand
      OutT, LayoutD, kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  // A and B are both K-major ([rows, k] row-major in memory): A = RowMajor [M', K],
  // B = ColumnMajor [K, N'] is the same bytes as row-major [N', K].
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp,
      MxE4m3, cutlass::layout::RowMajor, 16,
      MxE4m3, cutlass::layout::ColumnMajor, 16,
      float, MmaTile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // The scale layout the kernel reads is the one the host layout oracle
  // (tests/oracles/sm100_layout) proves equal to reference.swizzle_scales.
  using ScaleConfig = typename Mainloop::Sm1xxBlkScaledConfig;
  static_assert(std::is_same_v<ScaleConfig, cutlass::detail::Sm1xxBlockScaledConfig<32>>,
                "the mainloop's scale layout is not the one the host layout test checks");

  static typename Gemm::Arguments MakeArguments(const GemmArgs& a) {
    using namespace cute;
    // CUTLASS's (M', N') problem: (m, n), or (n, m) when swapped.
    const int pm = SwapAB ? a.n : a.m;
    const int pn = SwapAB ? a.m : a.n;
    const void* ptr_a = SwapAB ? a.w : a.x;
    const void* ptr_sfa = SwapAB ? a.w_scales : a.x_scales;
    const void* ptr_b = SwapAB ? a.x : a.w;
    const void* ptr_sfb = SwapAB ? a.x_scales : a.w_scales;
    auto problem = make_shape(pm, pn, a.k, 1);
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {pm, a.k, 1});
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {pn, a.k, 1});
    auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {pm, pn, 1});
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {pm, pn, 1});

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {pm, pn, a.k, 1},
        {static_cast<const cutlass::float_e4m3_t*>(ptr_a), stride_a,
         static_cast<const cutlass::float_e4m3_t*>(ptr_b), stride_b,
         static_cast<const cutlass::float_ue8m0_t*>(ptr_sfa),
         ScaleConfig::tile_atom_to_shape_SFA(problem),
         static_cast<const cutlass::float_ue8m0_t*>(ptr_sfb),
         ScaleConfig::tile_atom_to_shape_SFB(problem)},
        {{}, nullptr, stride_c, static_cast<OutT*>(a.out), stride_d}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = a.bias;  // null: the broadcast reads zeros instead
    return args;
  }

  // Shape rules, ours first (with reasons), then CUTLASS's own can_implement
  // (TMA alignment, scale layouts). Host-only: builds no TMA descriptor.
  static std::string Check(int m, int n, int k) {
    if (m < 1 || n < 1 || k < 1)
      return "M, N and K must be positive (got M=" + std::to_string(m) + ", N=" +
             std::to_string(n) + ", K=" + std::to_string(k) + ")";
    if (k % 32 != 0)
      return "K=" + std::to_string(k) + " is not a multiple of 32 (one e8m0 scale per 32 values)";
    if (n % 8 != 0)
      return "N=" + std::to_string(n) +
             " is not a multiple of 8 (output rows must be 16-byte aligned for the TMA store)";
    if (!CutlassCanImplement(m, n, k))
      return "CUTLASS can_implement rejected M=" + std::to_string(m) + ", N=" + std::to_string(n) +
             ", K=" + std::to_string(k);
    return "";
  }

  static GemmArgs ShapeOnly(int m, int n, int k) {
    GemmArgs shape_only;
    shape_only.m = m;
    shape_only.n = n;
    shape_only.k = k;
    return shape_only;
  }

  static bool CutlassCanImplement(int m, int n, int k) {
    return Gemm::can_implement(MakeArguments(ShapeOnly(m, n, k))) == cutlass::Status::kSuccess;
  }

  static size_t WorkspaceSize(int m, int n, int k) {
    return Gemm::get_workspace_size(MakeArguments(ShapeOnly(m, n, k)));
  }

  static std::string Run(const GemmArgs& a, void* stream_ptr) {
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    std::string reason = Check(a.m, a.n, a.k);
    if (!reason.empty()) return reason;
    typename Gemm::Arguments args = MakeArguments(a);
    if (Gemm::get_workspace_size(args) > a.workspace_bytes)
      return "workspace too small: " + std::to_string(a.workspace_bytes) + " bytes, need " +
             std::to_string(Gemm::get_workspace_size(args));
    Gemm gemm;
    cutlass::Status status = gemm.initialize(args, a.workspace, stream);
    if (status != cutlass::Status::kSuccess)
      return std::string("CUTLASS initialize failed: ") + cutlass::cutlassGetStatusString(status);
    status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) {
      cudaError_t err = cudaGetLastError();
      return std::string("CUTLASS run failed: ") + cutlass::cutlassGetStatusString(status) + " (" +
             cudaGetErrorString(err) + ")";
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("CUTLASS GEMM launch: ") + cudaGetErrorString(err);
    return "";
  }
};

}  // namespace jax_mxfp8::sm100

// Registers one instantiation (an MxGemm<...>) under (config, out dtype).
// Used exactly once per gemm_<config>_<out>.cu file.
#define JAX_MXFP8_SM100_GEMM_INSTANCE(CONFIG, OUT_DTYPE, NAME, ...)                            \
  namespace {                                                                                  \
  using ThisGemm = __VA_ARGS__;                                                                \
  const ::jax_mxfp8::sm100::RegisterGemmInstance kRegisterThisGemm(                            \
      ::jax_mxfp8::sm100::GemmInstance{                                                        \
          ::jax_mxfp8::sm100::GemmConfig::CONFIG, ::jax_mxfp8::sm100::OutDtype::OUT_DTYPE,     \
          NAME, ThisGemm::kSwapAB, ThisGemm::kTileM, ThisGemm::kTileN, ThisGemm::kTileK,       \
          ThisGemm::kClusterM, 1, &ThisGemm::Check, &ThisGemm::CutlassCanImplement,              \
          &ThisGemm::WorkspaceSize, &ThisGemm::Run});                                          \
  }
