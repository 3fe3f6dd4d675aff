"""Pallas kernels for mixtures of experts.

grouped_matmul_gpu.py   rows sorted by expert times their experts' weights, on NVIDIA GPUs
                        (Triton lowering), with the pure-JAX reference `reference`
"""
