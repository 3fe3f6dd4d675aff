"""The device half of the paged KV cache: a static-shape page pool and pure update helpers.

Per layer, keys and values live in a pool of P pages of Z token slots, K kv heads of width H,
in one of two layouts, chosen by the attention backend that reads them (`backend.py`):

    "token"  k, v : [P, Z, K, H]    a page is one [Z, K, H] tile: what the Pallas kernels copy
    "head"   k    : [P, K, H, Z]    a gathered page is already the operand of the XLA path's
             v    : [P, K, Z, H]    batched products: scores [G, H] x [H, Z] and values
                                    [G, Z] x [Z, H] per kv head, with no transpose per key step

(CPU, SmolLM2 heads, `scripts/bench_cpu_attention.py`, ms per layer: 32 decodes at a 1000-token
context 14.5 -> 8.7, 64 at 1000 27.3 -> 17.6, 64 at 160 4.5 -> 2.8, against the token layout read
in 64-key blocks of 16-token pages, which XLA:CPU transposed into its dots' layout in every key
step, running the score product with a transposed right operand at under half the speed.)

A token's cache slot is `page * Z + offset`; the host (`block_manager.py`) decides pages and
uploads the flat `slot_mapping` each step. Page 0 is reserved scratch (`config/cache.py`):
padding tokens write there, and no request ever owns it, so padded shapes never touch real
data.

    block_tables[r] = [7, 3, 12, 0, 0, ...]   request r's pages in order; 0 = unused
    position p of request r  ->  page block_tables[r, p // Z], offset p % Z
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.config.model import ModelConfig

LAYOUTS = ("token", "head")

# A pool of bfloat16 keys and values may be stored as their 16-bit patterns (the XLA backend's
# choice: `xla.XlaBackend.storage_dtype`); `read_pages` widens them, `write` narrows into them.
BF16_BITS = jnp.uint16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [P, Z, K, H] ("token") or [P, K, H, Z] ("head")
    v: tuple[jax.Array, ...]  # L x [P, Z, K, H] ("token") or [P, K, Z, H] ("head")
    layout: str = dataclasses.field(metadata=dict(static=True))  # "token" or "head"

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[role_axes(self.layout, "k").index("Z")]


# Each layout's axes of the k and v pools, by name: Z token slots, K kv heads, H head width.
_AXES = {"token": ("PZKH", "PZKH"), "head": ("PKHZ", "PKZH")}


def pool_axes(layout: str) -> tuple[str, str]:
    """The axis letters of the (k, v) pools in `layout`, e.g. ("PKHZ", "PKZH")."""
    if layout not in _AXES:
        raise ValueError(f"KV cache layout must be one of {LAYOUTS}, got {layout!r}")
    return _AXES[layout]


def role_axes(layout: str, role: str) -> str:
    """The axis letters of the keys' (`role` "k") or values' ("v") pool in `layout`."""
    return pool_axes(layout)[0 if role == "k" else 1]


def pool_shapes(
    cfg: ModelConfig, num_pages: int, page_size: int, layout: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (k, v) pool shapes of one layer."""
    size = {"P": num_pages, "Z": page_size, "K": cfg.num_kv_heads, "H": cfg.head_dim}
    k_axes, v_axes = pool_axes(layout)
    return tuple(size[a] for a in k_axes), tuple(size[a] for a in v_axes)


def to_layout(pages: jax.Array, layout: str, role: str) -> jax.Array:
    """A [P, Z, K, H] ("token" layout) pool of keys (`role` "k") or values ("v") in `layout`."""
    axes = role_axes(layout, role)
    return jnp.transpose(pages, ["PZKH".index(a) for a in axes])


def init_cache(
    cfg: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: Any = jnp.float32,
    sharding=None,  # (k, v) shardings, or None
    *,
    layout: str = "head",
) -> KVCache:
    """Zero-filled page pool in `layout`; `sharding` (optional) places every layer's pages.

    One program makes all 2L pools, each created where it lives (no host copy, and no
    per-layer compile at start-up)."""
    k_shape, v_shape = pool_shapes(cfg, num_pages, page_size, layout)
    n = cfg.num_layers

    def zeros() -> list[jax.Array]:
        return [jnp.zeros(k_shape, dtype) for _ in range(n)] + [
            jnp.zeros(v_shape, dtype) for _ in range(n)
        ]

    out = None if sharding is None else [sharding[0]] * n + [sharding[1]] * n
    pools = jax.jit(zeros, out_shardings=out)()
    return KVCache(k=tuple(pools[:n]), v=tuple(pools[n:]), layout=layout)


def read_pages(pages: jax.Array, page_ids: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """pages[page_ids] ([..., <page axes>]) in `dtype` (float32, or bfloat16 from a bf16 pool). A
    pool of bfloat16 bits (`BF16_BITS`) is gathered as 16-bit integers and widened by a shift,
    exactly, or reinterpreted as bfloat16."""
    out = pages[page_ids]
    if out.dtype == BF16_BITS:
        if jnp.dtype(dtype) == jnp.bfloat16:
            return jax.lax.bitcast_convert_type(out, jnp.bfloat16)
        out = jax.lax.bitcast_convert_type(out.astype(jnp.uint32) << 16, jnp.float32)
    return out.astype(dtype)


def write(
    pages: jax.Array,  # one layer's k or v pool, in `layout`
    new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32, flat slot = page * Z + offset
    layout: str,
    role: str,  # "k" or "v": which of the layout's two pools `pages` is
) -> jax.Array:
    """Writes one layer's new keys (or values) into their slots; returns the updated pool."""
    axes = role_axes(layout, role)
    page_size = pages.shape[axes.index("Z")]
    if pages.dtype == BF16_BITS:
        new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BF16_BITS)
    # Index the pool in place ([page, offset]): scattering into a reshaped view made XLA copy
    # the whole pool on every step. Two index arrays apart ([P, K, H, Z] at [page, :, :,
    # offset]) select [T, K, H] too: NumPy puts their broadcast axis first.
    index = [slice(None)] * 4
    index[0], index[axes.index("Z")] = slot_mapping // page_size, slot_mapping % page_size
    return pages.at[tuple(index)].set(new.astype(pages.dtype), mode="drop")
