// Host-only Python bindings for the SM100 CUTLASS GEMMs, added to _jax_mxfp8_cuda
// by bindings_cuda.cc when the module is built with them (JAX_MXFP8_WITH_CUTLASS).
// None of these touch a GPU: they answer shape and workspace questions at trace
// time and let the tests show, on any host, which shapes the kernels reject.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "cutlass_gemm_api.h"

namespace jax_mxfp8::sm100 {

inline const GemmInstance& InstanceOrThrow(int config, int out_dtype) {
  const GemmInstance* instance =
      FindGemmInstance(static_cast<GemmConfig>(config), static_cast<OutDtype>(out_dtype));
  if (instance == nullptr)
    throw nanobind::value_error("no CUTLASS GEMM compiled for this (config, out_dtype)");
  return *instance;
}

inline void AddCutlassGemmBindings(nanobind::module_& m) {
  namespace nb = nanobind;
  m.def("cutlass_gemm_instances", []() {
    nb::list out;
    for (const GemmInstance& g : GemmInstances()) {
      nb::dict d;
      d["config"] = static_cast<int>(g.config);
      d["out_dtype"] = static_cast<int>(g.out_dtype);
      d["name"] = g.name;
      d["swap_ab"] = g.swap_ab;
      d["tile"] = nb::make_tuple(g.tile_m, g.tile_n, g.tile_k);
      d["cluster"] = nb::make_tuple(g.cluster_m, g.cluster_n);
      out.append(d);
    }
    return out;
  });
  // "" when the kernel can run this shape, otherwise the reason it cannot.
  m.def("cutlass_gemm_check", [](int config, int out_dtype, int m, int n, int k) {
    return InstanceOrThrow(config, out_dtype).check(m, n, k);
  }, nb::arg("config"), nb::arg("out_dtype"), nb::arg("m"), nb::arg("n"), nb::arg("k"));
  // CUTLASS's Gemm::can_implement alone, without our MX rules.
  m.def("cutlass_gemm_can_implement", [](int config, int out_dtype, int m, int n, int k) {
    return InstanceOrThrow(config, out_dtype).cutlass_can_implement(m, n, k);
  }, nb::arg("config"), nb::arg("out_dtype"), nb::arg("m"), nb::arg("n"), nb::arg("k"));
  m.def("cutlass_gemm_workspace_size", [](int config, int out_dtype, int m, int n, int k) {
    return InstanceOrThrow(config, out_dtype).workspace_size(m, n, k);
  }, nb::arg("config"), nb::arg("out_dtype"), nb::arg("m"), nb::arg("n"), nb::arg("k"));
}

}  // namespace jax_mxfp8::sm100
