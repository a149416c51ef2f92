// Medium M: one CTA per 128x128 output tile, 256 K per stage, 1SM MMA.
#include "cutlass_gemm_kernel.cuh"

JAX_MXFP8_SM100_GEMM_INSTANCE(k1Sm_128x128x256, kF16, "1sm_128x128x256_f16",
                              ::jax_mxfp8::sm100::MxGemm<cutlass::half_t, 128, 128, 256, 1,
                                                         /*TwoSm=*/false, /*SwapAB=*/false>)
