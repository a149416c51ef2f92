"""Inputs that exercise the corners of docs/numerics.md (float32 rows, one block = 32 values)."""
import numpy as np

from .mxfp8 import E4M3


def edge_case_blocks(rng) -> np.ndarray:
    finite = np.unique(np.abs(E4M3[np.isfinite(E4M3)]))
    mids = (finite[:-1] + finite[1:]) / 2  # exact e4m3 rounding ties at scale 2^0
    blocks = []

    def block(values):
        v = np.zeros(32, np.float64)
        v[: len(values)] = values[:32]
        blocks.append(v)

    block([])                                              # all zero
    block([-0.0] * 32)                                     # negative zeros
    block([np.nan, 1.0])                                   # NaN block
    block([np.inf, 1.0]); block([-np.inf, -2.0])           # +-Inf blocks
    for k in (-100, -10, 0, 3, 60):
        block([448.0 * 2.0**k, 1.0 * 2.0**k, -3.0 * 2.0**k])              # amax exactly 448 * 2^k
        block([np.nextafter(np.float32(448.0 * 2.0**k), np.float32(np.inf)), 2.0**k])  # just above
        block([np.nextafter(np.float32(448.0 * 2.0**k), np.float32(0)), -2.0**k])       # just below
    for i in range(0, len(mids), 31):                      # rounding ties and their neighbours
        block([448.0, *mids[i:i + 31]])
        block([448.0, *np.nextafter(mids[i:i + 31].astype(np.float32), np.float32(np.inf))])
        block([-448.0, *-np.nextafter(mids[i:i + 31].astype(np.float32), np.float32(0))])
    block(rng.standard_normal(32) * 1e-30)                  # tiny
    block(rng.standard_normal(32) * 1e-42)                  # float32 subnormals
    block([1e-44, -3e-45, 1e-40, 2e-39])                    # subnormals only
    block([1e-38, 1e-44, -1e-40])                           # min-normal amax with subnormal neighbours
    block(rng.standard_normal(32) * 1e38)                   # huge
    block([3.0e38, -3.3e38, 1.0])                           # near float32 max
    block(np.concatenate([[1000.0], rng.standard_normal(31) * 1e-3]))  # outlier: small values underflow
    return np.stack(blocks).astype(np.float32)
