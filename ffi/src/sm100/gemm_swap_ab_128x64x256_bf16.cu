// Small M (decode): swapped operands, 128 weight rows x 64 tokens x 256 K per MMA tile, 1SM.
#include "cutlass_gemm_kernel.cuh"

JAX_MXFP8_SM100_GEMM_INSTANCE(kSwapAB_128x64x256, kBF16, "swap_ab_128x64x256_bf16",
                              ::jax_mxfp8::sm100::MxGemm<cutlass::bfloat16_t, 128, 64, 256, 1,
                                                         /*TwoSm=*/false, /*SwapAB=*/true>)
