"""Three launches of the wgmma kernel on random data, for ncu (`bash tools/gpu.sh profile`
profiles the third): python -P tools/ncu_wgmma.py N K M BM C [BLOCKS_PER_SM [SPLITS]]"""
import sys

import jax
import jax.numpy as jnp

from jax_mxfp8.backends import marlin

n, k, m, bm, c, *rest = map(int, sys.argv[1:])
blocks = rest[0] if rest else None
splits = rest[1] if len(rest) > 1 else 1
q = marlin.pack_values(jax.random.bits(jax.random.key(1), (n, k), jnp.uint8) & jnp.uint8(0xF7))
s = jax.random.randint(jax.random.key(2), (k // 32, n), 118, 128, jnp.int32).astype(jnp.uint8)
x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
f = jax.jit(lambda x: marlin.gemm_sm90(x, q, s, jnp.zeros((1,), jnp.int32), block_m=bm, consumers=c,
                                       blocks_per_sm=blocks, splits=splits, out_dtype=jnp.bfloat16))
for _ in range(3):
    f(x).block_until_ready()
print("ran", n, k, m, bm, c, blocks, splits)
