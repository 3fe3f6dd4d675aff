"""One object per attention backend: all the engine must know of it, declared in one place.

A backend is a way of reading the paged KV cache, and the cache is laid out for its reader. So the
backend declares the pool layout it reads, its default page size, the dtype a pool is stored in,
how prefill runs are laid out in a step (query blocks, or ragged runs), where `auto` may pick it,
and what it cannot serve; and it writes and reads the cache. No other module switches on a
backend's name: they ask the object (`AttentionMetadata.backend`, `EngineConfig.backend`).

    backend  layout  page  prefill              auto picks it on
    xla      head    64    query blocks of 16   CPU, and wherever Pallas does not serve
    pallas   token   16    ragged runs          GPU (head_dim a power of two), TPU; TP = 1;
                                                no attention sinks (gpt-oss: xla) yet
"""

from __future__ import annotations

from typing import Any

import jax

from jinfer.attention import kv_cache


class AttentionBackend:
    """The interface; `xla.XLA` and `pallas.PALLAS` are the instances. Instances are static
    arguments of the jitted step (they sit in `AttentionMetadata`), hashed by identity."""

    name: str
    layout: str  # the pool layout it reads: one of kv_cache.LAYOUTS
    default_page_size: int  # tokens per page when page_size is not set
    # Tokens per query block of a prefill run (the scheduler's unit for prefill, and the
    # runner's layout: `runner/buckets.py`); 1: prefill runs are ragged, no blocks.
    query_block: int
    native_platforms: tuple[str, ...]  # where `auto` may pick it (elsewhere: only if asked)
    reads_any_cache_dtype: bool  # may the KV cache be in a dtype other than the model's?
    serves_sinks: bool = False  # attention sinks (`attend(..., sinks=)`, gpt-oss)

    def storage_dtype(self, dtype: Any) -> Any:
        """The dtype a pool of `dtype` keys and values is stored in."""
        return dtype

    def unsupported(self, platform: str, head_dim: int, tensor_parallel_size: int) -> str | None:
        """Why `auto` must not pick this backend for such a model and mesh, or None."""
        return None

    def decode_kernel(self, platform: str) -> bool:
        """Whether decode-only steps (`AttentionMetadata.decode_only`) take a kernel of their
        own on `platform`: the runner then builds a decode-only program for the buckets they
        fit, and picks it on the host."""
        return False

    def write(
        self,
        pages: jax.Array,  # one layer's k or v pool, in `self.layout`
        new: jax.Array,  # [T, K, H]
        slot_mapping: jax.Array,  # [T] int32
        role: str,  # "k" or "v"
    ) -> jax.Array:
        """One layer's new keys (or values) written into their slots; the updated pool."""
        return kv_cache.write(pages, new, slot_mapping, self.layout, role)

    def attend(
        self,
        q: jax.Array,  # [T, N, H], already scaled
        k_pages: jax.Array,  # the layer's pools, in `self.layout`
        v_pages: jax.Array,
        meta: Any,  # AttentionMetadata
        *,
        window: int | None,
        softcap: float | None,
    ) -> jax.Array:  # [T, N, H]
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"AttentionBackend({self.name!r})"
