"""Oracles the tests check the package against, independent of it: mxfp8 (a numpy reference
of docs/numerics.md), edge_cases (inputs at that contract's corners) and build (native oracles
compiled on first use, e.g. CUTLASS's own SM100 scale layout)."""
