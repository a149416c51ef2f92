// nanobind module _jax_mxfp8_cuda: exposes every CUDA FFI target that the
// kernel families registered (see JAX_MXFP8_REGISTER_CUDA_TARGET), plus build info.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>

#include "jax_mxfp8/ffi_common.h"
#ifdef JAX_MXFP8_WITH_CUTLASS
#include "sm100/host_bindings.h"  // host-only CUTLASS GEMM shape checks / workspace size
#endif

namespace nb = nanobind;

namespace jax_mxfp8 {
std::vector<TargetRegistration>& CudaTargets() {
  static std::vector<TargetRegistration> targets;
  return targets;
}
}  // namespace jax_mxfp8

NB_MODULE(_jax_mxfp8_cuda, m) {
  m.def("registrations", []() {
    nb::dict out;
    for (const auto& t : jax_mxfp8::CudaTargets()) {
      out[t.name] = nb::capsule(reinterpret_cast<void*>(t.handler));
    }
    return out;
  });
  m.def("build_info", []() {
    nb::dict info;
    info["cuda_architectures"] = JAX_MXFP8_CUDA_ARCHS;
    info["cuda_runtime_version"] = CUDART_VERSION;
    info["ffi_version"] = JAX_MXFP8_FFI_VERSION;
#ifdef JAX_MXFP8_WITH_CUTLASS
    info["cutlass_sm100"] = true;
#else
    info["cutlass_sm100"] = false;
#endif
    return info;
  });
#ifdef JAX_MXFP8_WITH_CUTLASS
  jax_mxfp8::sm100::AddCutlassGemmBindings(m);
#endif
}
