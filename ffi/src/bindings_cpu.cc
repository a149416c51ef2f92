// nanobind module _jax_mxfp8_cpu: always built. Holds build information and the
// registry of CPU FFI targets (the CPU lowerings are jnp today; this is where a
// native CPU handler would register).
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

NB_MODULE(_jax_mxfp8_cpu, m) {
  m.def("registrations", []() { return nb::dict(); });
  m.def("build_info", []() {
    nb::dict info;
    info["xla_ffi_api_version"] =
        nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
    return info;
  });
}
