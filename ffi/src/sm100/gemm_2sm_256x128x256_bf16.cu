// Large M: a CTA pair (cluster 2x1) shares one 256x128 MMA tile (2SM tcgen05), 256 K per stage.
#include "cutlass_gemm_kernel.cuh"

JAX_MXFP8_SM100_GEMM_INSTANCE(k2Sm_256x128x256, kBF16, "2sm_256x128x256_bf16",
                              ::jax_mxfp8::sm100::MxGemm<cutlass::bfloat16_t, 256, 128, 256, 2,
                                                         /*TwoSm=*/true, /*SwapAB=*/false>)
