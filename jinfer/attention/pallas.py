"""The Pallas attention backend: the engine's flat batch in the kernels' ragged layout.

The runner's `AttentionMetadata` describes tokens (position, block-table row); the kernels want
sequences (query runs `cu_q_lens`, `kv_lens`, page lists). A run is a maximal stretch of tokens
of the same row at consecutive positions, which is exactly one request's share of the step:

    seq_ids    [3, 3, 3, 5, 1, 0, 0]      (two padding tokens at the end: row 0, position 0)
    positions  [7, 8, 9, 4, 0, 0, 0]
    runs       [-------] [] [] [] []      cu_q_lens = [0, 3, 4, 5, 6, 7, 7, 7, 7]
    kv_lens    [10, 5, 1, 1, 1, 0, 0, 0]  (last position of each run + 1)

Padding tokens become one-token runs over the scratch page: harmless, and it keeps the rule free
of engine conventions. The layout is derived inside the jitted step from arrays it already has,
so shapes (S = T rows) stay static per token bucket and no new program is compiled.

Kernel choice follows the platform the step is compiled for (`AttentionMetadata.platform`): GPU
-> the Triton kernels, TPU -> the Mosaic TPU kernel, CPU -> the GPU kernels in Pallas's
interpreter (slow; for tests). On GPU (and in the interpreter) a decode-only step takes the
split-K decode kernel and any other step the ragged one; the host knows which when it plans the
step (`AttentionMetadata.decode_only`), so each is its own program and neither branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.attention.backend import AttentionBackend
from jinfer.attention.metadata import AttentionMetadata
from pallas_kernels.attention import decode_gpu, ragged_gpu, ragged_tpu


def ragged_layout(meta: AttentionMetadata) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(kv_lens [T], rows [T], cu_q_lens [T + 1]) of the step's runs; run s reads the pages of
    block-table row rows[s]."""
    pos, seq_ids = meta.positions, meta.seq_ids
    t = pos.shape[0]
    starts = jnp.ones(t, bool).at[1:].set((seq_ids[1:] != seq_ids[:-1]) | (pos[1:] != pos[:-1] + 1))
    (first,) = jnp.nonzero(starts, size=t, fill_value=t)  # [T] first token of each run
    cu_q_lens = jnp.concatenate([first, jnp.array([t])]).astype(jnp.int32)  # [T + 1]
    last = jnp.clip(cu_q_lens[1:] - 1, 0, t - 1)
    used = cu_q_lens[1:] > cu_q_lens[:-1]
    kv_lens = jnp.where(used, pos[last] + 1, 0).astype(jnp.int32)  # [T]
    rows = seq_ids[jnp.minimum(first, t - 1)]
    return kv_lens, rows, cu_q_lens


def pallas_paged_attention(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    meta: AttentionMetadata,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [T, N, H]
    platform = meta.platform or jax.default_backend()
    opts = dict(window=window, softcap=softcap)
    if platform == "tpu":
        # One kernel for every step: decode is its one-query case (see ragged_tpu.py).
        kv_lens, rows, cu_q_lens = ragged_layout(meta)
        return ragged_tpu.ragged_paged_attention(
            q, k_pages, v_pages, kv_lens, meta.block_tables, cu_q_lens, rows, **opts
        )
    interpret = platform != "gpu"
    if meta.decode_only:
        # A decode-only step (the host knows; its own program): the split-K decode kernel, one
        # token per run, so token t is its own sequence.
        kv_lens = meta.positions + 1
        pages = meta.block_tables[meta.seq_ids]  # [T, Pmax]
        return decode_gpu.paged_decode_attention(
            q, k_pages, v_pages, kv_lens, pages, **opts, interpret=interpret
        )
    kv_lens, rows, cu_q_lens = ragged_layout(meta)
    pages = meta.block_tables[rows]  # [T, Pmax]
    return ragged_gpu.ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, pages, cu_q_lens, **opts, interpret=interpret
    )


class PallasBackend(AttentionBackend):
    """The Pallas kernels (`pallas_kernels/attention/`): GPU and TPU; on CPU, only if asked, in
    Pallas's interpreter (correct, slow: for tests)."""

    name = "pallas"
    layout = "token"
    default_page_size = 16  # the kernels copy pages into blocks of their own size (block_sizes.py)
    query_block = 1  # ragged runs: the kernels take query runs of any length
    native_platforms = ("gpu", "tpu")
    reads_any_cache_dtype = False

    def unsupported(self, platform: str, head_dim: int, tensor_parallel_size: int) -> str | None:
        if tensor_parallel_size > 1:
            # `pallas_call` has no sharding rule yet: XLA would gather every head around it.
            return f"tensor_parallel_size {tensor_parallel_size}"
        if platform == "gpu" and head_dim & (head_dim - 1):
            return f"head_dim {head_dim} is not a power of two (the GPU kernels tile it)"
        return None

    def decode_kernel(self, platform: str) -> bool:
        return platform != "tpu"  # TPU: the ragged kernel takes decodes as one-query runs

    def attend(self, q, k_pages, v_pages, meta, *, window, softcap):
        return pallas_paged_attention(q, k_pages, v_pages, meta, window=window, softcap=softcap)


PALLAS = PallasBackend()
