// _jax_mxfp8_sm100_layout: host-only (no GPU, no nvcc) evaluation of the scale
// factor layout that CUTLASS's SM100 block-scaled GEMM reads, so the tests can
// prove it equals jax_mxfp8.reference.swizzle_scales byte for byte, padding
// included (tests/test_backends_cutlass.py). Test-only: tests/oracles/build.py compiles it on first
// use; it is not part of the wheel.
//
// The layout comes from CUTLASS itself, not from a formula of ours:
// cutlass::detail::Sm1xxBlockScaledConfig<32>::tile_atom_to_shape_SFA/SFB, the
// config the MXFP8 mainloop uses (ffi/src/sm100/cutlass_gemm_kernel.cuh
// static_asserts that it is the same type).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "cute/layout.hpp"
#include "cute/util/print.hpp"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/version.h"

namespace nb = nanobind;

namespace {

using ScaleConfig = cutlass::detail::Sm1xxBlockScaledConfig<32>;
constexpr int kBlock = ScaleConfig::SFVecSize;  // 32 values share one scale byte

int64_t PadTo(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// offsets[l, r, c] = byte offset CUTLASS reads for the scale of (batch l, row r,
// k-block c), over the padded domain r < pad128(rows), c < pad4(k/32). Every one
// of the 32 k positions of a block must map to the same byte (the atom's k
// stride is 0); a mismatch raises.
template <class Layout>
nb::ndarray<nb::numpy, int64_t, nb::ndim<3>> Offsets(const Layout& layout, int64_t rows, int64_t k,
                                                     int64_t batch) {
  using namespace cute;
  const int64_t padded_rows = PadTo(rows, 128), padded_cols = PadTo(k / kBlock, 4);
  if (size<0>(layout) != padded_rows || size<1>(layout) != padded_cols * kBlock ||
      size<2>(layout) != batch)
    throw std::runtime_error("CUTLASS scale layout domain is not [batch, pad128(rows), pad4(K/32)*32]");
  const size_t count = static_cast<size_t>(batch * padded_rows * padded_cols);
  auto* out = new int64_t[count];
  nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<int64_t*>(p); });
  size_t i = 0;
  for (int64_t l = 0; l < batch; ++l)
    for (int64_t r = 0; r < padded_rows; ++r)
      for (int64_t c = 0; c < padded_cols; ++c) {
        const int64_t offset = layout(int(r), int(c * kBlock), int(l));
        for (int j = 1; j < kBlock; ++j)
          if (layout(int(r), int(c * kBlock + j), int(l)) != offset)
            throw std::runtime_error("CUTLASS scale layout: a 32-value block spans several bytes");
        out[i++] = offset;
      }
  size_t shape[3] = {size_t(batch), size_t(padded_rows), size_t(padded_cols)};
  return nb::ndarray<nb::numpy, int64_t, nb::ndim<3>>(out, 3, shape, owner);
}

void CheckShape(int64_t rows, int64_t k, int64_t batch) {
  if (rows < 1 || k < kBlock || k % kBlock != 0 || batch < 1)
    throw nb::value_error("need rows >= 1, batch >= 1 and K a positive multiple of 32");
  if (rows > (1 << 24) || k > (1 << 24) || batch > 64)
    throw nb::value_error("shape too large for an exhaustive layout check");
}

// The SFA layout for a problem (M=rows, K, L=batch) / the SFB layout for (N=rows, K, L).
auto LayoutSFA(int64_t rows, int64_t k, int64_t batch) {
  return ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(int(rows), 1, int(k), int(batch)));
}
auto LayoutSFB(int64_t rows, int64_t k, int64_t batch) {
  return ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(1, int(rows), int(k), int(batch)));
}

template <class Layout>
std::string Describe(const Layout& layout) {
  std::ostringstream os;
  os << layout;
  return os.str();
}

}  // namespace

NB_MODULE(_jax_mxfp8_sm100_layout, m) {
  m.attr("cutlass_version") =
      nb::make_tuple(CUTLASS_MAJOR, CUTLASS_MINOR, CUTLASS_PATCH);
  m.def("sfa_offsets", [](int64_t rows, int64_t k, int64_t batch) {
    CheckShape(rows, k, batch);
    return Offsets(LayoutSFA(rows, k, batch), rows, k, batch);
  }, nb::arg("rows"), nb::arg("k"), nb::arg("batch") = 1,
     "CUTLASS SFA byte offsets, int64 [batch, pad128(rows), pad4(k/32)].");
  m.def("sfb_offsets", [](int64_t rows, int64_t k, int64_t batch) {
    CheckShape(rows, k, batch);
    return Offsets(LayoutSFB(rows, k, batch), rows, k, batch);
  }, nb::arg("rows"), nb::arg("k"), nb::arg("batch") = 1,
     "CUTLASS SFB byte offsets, int64 [batch, pad128(rows), pad4(k/32)].");
  // cosize: one past the largest offset, i.e. the buffer size CUTLASS may touch.
  m.def("sfa_cosize", [](int64_t rows, int64_t k, int64_t batch) {
    CheckShape(rows, k, batch);
    return int64_t(cute::cosize(LayoutSFA(rows, k, batch)));
  }, nb::arg("rows"), nb::arg("k"), nb::arg("batch") = 1);
  m.def("sfa_layout_string", [](int64_t rows, int64_t k, int64_t batch) {
    CheckShape(rows, k, batch);
    return Describe(LayoutSFA(rows, k, batch));
  }, nb::arg("rows"), nb::arg("k"), nb::arg("batch") = 1);
}
