// Shared helpers for jax_mxfp8's XLA FFI handlers: error checks that return
// ffi::Error (handlers never throw), and the registry each kernel family
// adds its targets to (so bindings_cuda.cc never needs editing).
#pragma once

#include <string>
#include <vector>

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

#if defined(__CUDACC__) || defined(JAX_MXFP8_HAS_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace jax_mxfp8 {

namespace ffi = xla::ffi;

struct TargetRegistration {
  const char* name;       // e.g. "jax_mxfp8_quantize_cuda_v1"
  XLA_FFI_Handler* handler;
};

// All CUDA targets compiled into this module, in registration order.
std::vector<TargetRegistration>& CudaTargets();

struct RegisterCudaTarget {
  RegisterCudaTarget(const char* name, XLA_FFI_Handler* handler) {
    CudaTargets().push_back({name, handler});
  }
};

#if defined(__CUDACC__) || defined(JAX_MXFP8_HAS_CUDA_RUNTIME)
inline ffi::Error CudaError(cudaError_t err, const char* what) {
  (void)cudaGetLastError();  // clear a non-sticky error so a later launch check does not see it
  return ffi::Error::Internal(std::string("jax_mxfp8: ") + what + ": " + cudaGetErrorString(err));
}

// After a kernel launch: report a bad launch configuration or a sticky error.
inline ffi::Error CheckLaunch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError(err, kernel);
  return ffi::Error::Success();
}
#endif

}  // namespace jax_mxfp8

// The version of every target's calling convention (operands, attributes, results), appended
// to its name: a serialized jax.export artifact names the version it was lowered for, and a
// module of another version refuses it by name instead of misreading its buffers. Bump it with
// jax_mxfp8/_ffi.py's FFI_VERSION whenever a handler's signature changes.
#define JAX_MXFP8_FFI_VERSION "v1"

// Registers an FFI handler symbol (from XLA_FFI_DEFINE_HANDLER_SYMBOL) under a target name
// (with "_" JAX_MXFP8_FFI_VERSION appended).
#define JAX_MXFP8_REGISTER_CUDA_TARGET(target_name, handler_symbol)             \
  static ::jax_mxfp8::RegisterCudaTarget jax_mxfp8_registration_##handler_symbol( \
      target_name "_" JAX_MXFP8_FFI_VERSION, handler_symbol)

// Returns from the enclosing handler if a CUDA call fails.
#define JAX_MXFP8_CUDA_RETURN_IF_ERROR(expr)                          \
  do {                                                               \
    cudaError_t jax_mxfp8_err_ = (expr);                             \
    if (jax_mxfp8_err_ != cudaSuccess)                               \
      return ::jax_mxfp8::CudaError(jax_mxfp8_err_, #expr);          \
  } while (0)

// Returns from the enclosing handler if an ffi::Error-returning call fails.
#define JAX_MXFP8_RETURN_IF_ERROR(expr)                \
  do {                                                 \
    ::xla::ffi::Error jax_mxfp8_ferr_ = (expr);        \
    if (jax_mxfp8_ferr_.failure()) return jax_mxfp8_ferr_; \
  } while (0)
