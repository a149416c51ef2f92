// XLA FFI target jax_mxfp8_cutlass_gemm_cuda: native MXFP8 x MXFP8 GEMM on SM100
// through CUTLASS, out [M, N] = dequant(x) . dequant(w)^T (+ bias).
// This file holds no kernel: it validates the buffers and dispatches to the
// instantiation registered for (config, out dtype) by gemm_<config>_<out>.cu.
//
//   args:    x [M, K] e4m3, x_scales [pad128(M) * pad4(K/32)] u8 (swizzled),
//            w [N, K] e4m3, w_scales [pad128(N) * pad4(K/32)] u8 (swizzled),
//            optional bias [N] f32
//   results: out [M, N] bf16 | f16 | f32, workspace [W] u8 (W from cutlass_gemm_workspace_size)
//   attrs:   config (int32, GemmConfig; chosen per M in Python at trace time)
#include <cuda_runtime.h>

#include <optional>
#include <string>

#include "cutlass_gemm_api.h"
#include "jax_mxfp8/ffi_common.h"

namespace jax_mxfp8::sm100 {

std::vector<GemmInstance>& GemmInstances() {
  static std::vector<GemmInstance> instances;
  return instances;
}

const GemmInstance* FindGemmInstance(GemmConfig config, OutDtype out_dtype) {
  for (const GemmInstance& instance : GemmInstances())
    if (instance.config == config && instance.out_dtype == out_dtype) return &instance;
  return nullptr;
}

namespace {

int64_t PaddedScaleBytes(int64_t rows, int64_t k) {
  const int64_t scale_cols = k / 32;
  return (rows + 127) / 128 * 128 * ((scale_cols + 3) / 4 * 4);
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_mxfp8_cutlass_gemm_cuda: " + what);
}

// x and w are AnyBuffer: this XLA FFI version has no typed F8 buffers.
ffi::Error CutlassGemmImpl(cudaStream_t stream, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::U8, 1> x_scales, ffi::AnyBuffer w,
                           ffi::Buffer<ffi::U8, 1> w_scales,
                           std::optional<ffi::Buffer<ffi::F32, 1>> bias,
                           ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::Buffer<ffi::U8, 1>> workspace, int32_t config) {
  if (x.element_type() != ffi::F8E4M3FN || w.element_type() != ffi::F8E4M3FN ||
      x.dimensions().size() != 2 || w.dimensions().size() != 2)
    return Invalid("x [M, K] and w [N, K] must be 2-D float8_e4m3fn");
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  if (w.dimensions()[1] != k)
    return Invalid("x is [M, K] = [" + std::to_string(m) + ", " + std::to_string(k) +
                   "] but w is [N, K] = [" + std::to_string(n) + ", " +
                   std::to_string(w.dimensions()[1]) + "]");
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) return Invalid("M, N and K must fit in int32");
  if (k % 32 != 0) return Invalid("K=" + std::to_string(k) + " is not a multiple of 32");
  if (static_cast<int64_t>(x_scales.element_count()) != PaddedScaleBytes(m, k) ||
      static_cast<int64_t>(w_scales.element_count()) != PaddedScaleBytes(n, k))
    return Invalid("scales must be the swizzled [pad128(rows) * pad4(K/32)] buffers (expected " +
                   std::to_string(PaddedScaleBytes(m, k)) + " and " +
                   std::to_string(PaddedScaleBytes(n, k)) + " bytes)");
  auto out_dims = out->dimensions();
  if (out_dims.size() != 2 || out_dims[0] != m || out_dims[1] != n)
    return Invalid("out must be [M, N] = [" + std::to_string(m) + ", " + std::to_string(n) + "]");
  if (bias.has_value() && static_cast<int64_t>(bias->element_count()) != n)
    return Invalid("bias must be [N] = [" + std::to_string(n) + "] float32");

  OutDtype out_dtype;
  if (out->element_type() == ffi::BF16) {
    out_dtype = OutDtype::kBF16;
  } else if (out->element_type() == ffi::F16) {
    out_dtype = OutDtype::kF16;
  } else if (out->element_type() == ffi::F32) {
    out_dtype = OutDtype::kF32;
  } else {
    return Invalid("out must be bfloat16, float16 or float32");
  }
  const GemmInstance* instance = FindGemmInstance(static_cast<GemmConfig>(config), out_dtype);
  if (instance == nullptr)
    return Invalid("no kernel compiled for config " + std::to_string(config) + " and this out dtype");
  if (m == 0 || n == 0) return ffi::Error::Success();  // empty output: nothing to launch

  GemmArgs args;
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.x = x.untyped_data();
  args.x_scales = x_scales.untyped_data();
  args.w = w.untyped_data();
  args.w_scales = w_scales.untyped_data();
  args.bias = bias.has_value() ? bias->typed_data() : nullptr;
  args.out = out->untyped_data();
  args.workspace = workspace->untyped_data();
  args.workspace_bytes = workspace->element_count();
  std::string failure = instance->run(args, stream);
  if (!failure.empty())
    return ffi::Error::Internal(std::string("jax_mxfp8_cutlass_gemm_cuda (") + instance->name +
                                "): " + failure);
  return CheckLaunch(instance->name);
}

// Aliases: a comma inside the binding would split the handler macro's arguments.
using ByteVector = ffi::Buffer<ffi::U8, 1>;
using FloatVector = ffi::Buffer<ffi::F32, 1>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp8CutlassGemm, CutlassGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()                 // x
                                  .Arg<ByteVector>()                     // x_scales (swizzled)
                                  .Arg<ffi::AnyBuffer>()                 // w
                                  .Arg<ByteVector>()                     // w_scales (swizzled)
                                  .OptionalArg<FloatVector>()            // bias
                                  .Ret<ffi::AnyBuffer>()                 // out
                                  .Ret<ByteVector>()                     // workspace
                                  .Attr<int32_t>("config"),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_MXFP8_REGISTER_CUDA_TARGET("jax_mxfp8_cutlass_gemm_cuda", JaxMxfp8CutlassGemm);

}  // namespace jax_mxfp8::sm100
