"""The device half of the paged KV cache: a static-shape page pool and pure update helpers.

Per layer, keys and values live in a pool of pages:

    k, v : [P, Z, K, H]      P pages of Z token slots, K kv heads of width H

A token's cache slot is `page * Z + offset`; the host (`block_manager.py`) decides pages and
uploads the flat `slot_mapping` each step. Page 0 is reserved scratch: padding tokens write
there, and no request ever owns it, so padded shapes never touch real data.

    block_tables[r] = [7, 3, 12, 0, 0, ...]   request r's pages in order; 0 = unused
    position p of request r  ->  page block_tables[r, p // Z], offset p % Z
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.config import ModelConfig

SCRATCH_PAGE = 0

# A bfloat16 pool read by the XLA attention is stored as its 16-bit patterns: XLA:CPU moves a
# widening convert (or a bitcast) of gathered blocks onto the whole pool, once per layer and
# step, while integer bits gathered and shifted stay per block (`read_pages`).
BF16_BITS = jnp.uint16


def storage_dtype(dtype: Any, attention_backend: str) -> Any:
    """The dtype a pool of `dtype` keys/values is stored in for `attention_backend`."""
    if jnp.dtype(dtype) == jnp.bfloat16 and attention_backend == "xla":
        return BF16_BITS
    return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [P, Z, K, H]
    v: tuple[jax.Array, ...]  # L x [P, Z, K, H]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    return (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)


def init_cache(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any = jnp.float32, sharding=None
) -> KVCache:
    """Zero-filled page pool; `sharding` (optional) places every layer's pages.

    One program makes all 2L pools, each created where it lives (no host copy, and no
    per-layer compile at start-up)."""
    shape = cache_shape(cfg, num_pages, page_size)
    n = cfg.num_layers

    def zeros() -> list[jax.Array]:
        return [jnp.zeros(shape, dtype) for _ in range(2 * n)]

    pools = jax.jit(zeros, out_shardings=None if sharding is None else [sharding] * (2 * n))()
    return KVCache(k=tuple(pools[:n]), v=tuple(pools[n:]))


def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any = jnp.float32) -> int:
    """Bytes one page costs across all layers, keys and values."""
    per_layer = page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return 2 * cfg.num_layers * per_layer


def read_pages(pages: jax.Array, page_ids: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """pages[page_ids] ([..., Z, K, H]) in `dtype` (float32, or bfloat16 from a bf16 pool). A
    pool of bfloat16 bits (`BF16_BITS`) is gathered as 16-bit integers and widened by a shift,
    exactly, or reinterpreted as bfloat16."""
    out = pages[page_ids]
    if out.dtype == BF16_BITS:
        if jnp.dtype(dtype) == jnp.bfloat16:
            return jax.lax.bitcast_convert_type(out, jnp.bfloat16)
        out = jax.lax.bitcast_convert_type(out.astype(jnp.uint32) << 16, jnp.float32)
    return out.astype(dtype)


def write(
    pages: jax.Array,  # [P, Z, K, H]
    new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32, flat slot = page * Z + offset
) -> jax.Array:
    """Writes one layer's new keys (or values) into their slots; returns the updated pool."""
    page_size = pages.shape[1]
    if pages.dtype == BF16_BITS:
        new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BF16_BITS)
    # Index the pool in place ([page, offset]): scattering into a reshaped view made XLA copy
    # the whole pool on every step.
    return pages.at[slot_mapping // page_size, slot_mapping % page_size].set(
        new.astype(pages.dtype), mode="drop"
    )
