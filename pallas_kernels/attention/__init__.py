"""Pallas paged-attention kernels: GPU (Triton lowering) and TPU (Mosaic), each beside the
pure-JAX reference of `reference.py`, `interpret` threaded through for CPU tests.

    ragged_gpu.py   mixed prefill + decode steps on NVIDIA GPUs
    decode_gpu.py   decode-only steps on NVIDIA GPUs (split-K)
    ragged_tpu.py   every step on TPUs
    schedule.py     the ragged kernels' work list; block_sizes.py: tile sizes and why

The kernels know nothing of the engine: they take query runs (`cu_q_lens`), KV lengths and page
lists. `jinfer/attention/pallas.py` adapts the engine's batch to them.
"""
