// float32 output (row-parallel partial products before the psum, float32 callers): the
// general 1SM 128x128x256 tile only, for every M, to keep the build small.
#include "cutlass_gemm_kernel.cuh"

JAX_MXFP8_SM100_GEMM_INSTANCE(k1Sm_128x128x256, kF32, "1sm_128x128x256_f32",
                              ::jax_mxfp8::sm100::MxGemm<float, 128, 128, 256, 1,
                                                         /*TwoSm=*/false, /*SwapAB=*/false>)
