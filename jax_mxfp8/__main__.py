"""python -m jax_mxfp8 {info,demo,bench}: see jax_mxfp8/cli."""
import sys

from jax_mxfp8.cli import main

if __name__ == "__main__":
    sys.exit(main())
