// nanobind module _jax_mxfp8_cpu: always built. Holds build information, the registry of CPU
// FFI targets (the CPU lowerings are jnp today; this is where a native CPU handler would
// register), and the host-side sizes the CUDA lowerings need before a kernel runs (the
// MARLIN kernels' K splits and workspaces), so Python never mirrors the C++ logic.
#include <nanobind/nanobind.h>

#include <cstdint>

#include "jax_mxfp8/marlin_workspace.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;
namespace mw = jax_mxfp8::marlin;

NB_MODULE(_jax_mxfp8_cpu, m) {
  m.def("registrations", []() { return nb::dict(); });
  m.def("build_info", []() {
    nb::dict info;
    info["xla_ffi_api_version"] =
        nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
    return info;
  });

  m.attr("marlin_max_cluster_splits") = mw::kMaxClusterSplits;
  m.attr("wgmma_max_splits") = mw::kMaxWgmmaSplits;
  m.def(
      "marlin_effective_splits",
      [](int64_t k, int64_t splits) { return mw::MarlinEffectiveSplits(k, splits); },
      nb::arg("k"), nb::arg("splits"),
      "K splits the mma.sync kernel really runs for `splits` requested (none empty).");
  m.def(
      "marlin_workspace_bytes",
      [](int64_t m, int64_t n, int64_t k, int64_t m_blocks, int64_t warps_n, int64_t splits,
         bool cluster) {
        return mw::MarlinWorkspace(m, n, k, m_blocks, warps_n, splits, cluster).bytes();
      },
      nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("m_blocks"), nb::arg("warps_n"),
      nb::arg("splits"), nb::arg("cluster"),
      "Bytes of the mma.sync kernel's workspace result.");
  m.def(
      "wgmma_workspace_bytes",
      [](int64_t m, int64_t n, int64_t block_m, int64_t consumers, int64_t splits, bool cluster) {
        return mw::WgmmaWorkspace(m, n, block_m, consumers, splits, cluster).bytes();
      },
      nb::arg("m"), nb::arg("n"), nb::arg("block_m"), nb::arg("consumers"), nb::arg("splits"),
      nb::arg("cluster"), "Bytes of the wgmma kernel's workspace result.");
}
