"""Paged attention over a flat, ragged token batch: the one call site the model uses.

`paged_attention` dispatches on `AttentionMetadata.backend`: "xla" (`xla.py`: the reference and
the CPU path) or "pallas" (`pallas.py`: the kernels in pallas_kernels/ on GPU/TPU, their
interpreter on CPU). Both take the same arguments and agree to rounding.
"""

from __future__ import annotations

import jax

from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.pallas import pallas_paged_attention
from jinfer.attention.xla import xla_paged_attention


def paged_attention(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # the layer's pools in kv_cache.layout_for(meta.backend)
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [T, N, H]
    if meta.backend == "xla":
        return xla_paged_attention(q, k_pages, v_pages, meta, window=window, softcap=softcap)
    if meta.backend == "pallas":
        return pallas_paged_attention(q, k_pages, v_pages, meta, window=window, softcap=softcap)
    raise ValueError(f"unknown attention backend {meta.backend!r}")
