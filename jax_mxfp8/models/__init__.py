"""Example models built on jax_mxfp8, tested like the library.

- decoder: a Llama-style Flax NNX decoder with Hugging Face-style checkpoint loading (needs flax).
- tp_mlp: a tensor-parallel MXFP8 MLP under jit with a Mesh (column- then row-parallel).
"""
