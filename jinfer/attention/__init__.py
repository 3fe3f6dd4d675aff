"""Paged attention over a flat, ragged token batch: the one call site the model uses.

`paged_attention` and `write_kv` hand the work to the step's backend (`AttentionMetadata.backend`,
one object per backend: `backend.py`): `xla.XLA` (the reference and the CPU path) or
`pallas.PALLAS` (the kernels in pallas_kernels/ on GPU/TPU, their interpreter on CPU). Both take
the same arguments and agree to rounding. `resolve_backend` turns an `attention_backend` option
into one of them.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.attention.backend import AttentionBackend
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.pallas import PALLAS
from jinfer.attention.xla import XLA

log = logging.getLogger(__name__)

# In order of preference: `auto` takes the first that is native to the platform and serves the
# model and mesh.
BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (PALLAS, XLA)}
ATTENTION_BACKENDS = ("auto", *BACKENDS)  # the choices of the attention_backend option


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}; got {name!r}")
    return BACKENDS[name]


def resolve_backend(
    name: str,
    platform: str,
    head_dim: int = 128,
    tensor_parallel_size: int = 1,
    sinks: bool = False,
) -> AttentionBackend:
    """The backend `name` means: itself, or for `auto` the first backend native to `platform`
    that does not declare the model or mesh unsupported (the Pallas kernels on GPU/TPU, XLA on
    CPU). A backend named explicitly is taken as asked ("pallas" on CPU: the interpreter),
    unless it cannot compute the model at all (`sinks`: attention sinks, gpt-oss)."""
    if name != "auto":
        backend = get_backend(name)
        if sinks and not backend.serves_sinks:
            serving = ", ".join(b.name for b in BACKENDS.values() if b.serves_sinks)
            raise ValueError(
                f"attention_backend={name!r} has no attention sinks, which this model "
                f"(gpt-oss) needs; use {serving}"
            )
        return backend
    for backend in BACKENDS.values():
        if platform not in backend.native_platforms or (sinks and not backend.serves_sinks):
            continue
        why_not = backend.unsupported(platform, head_dim, tensor_parallel_size)
        if why_not is None:
            return backend
        log.info("attention backend %s does not serve %s here", backend.name, why_not)
    raise ValueError(f"no attention backend serves platform {platform!r}")


def check_cache_dtype(backend: AttentionBackend, kv_dtype: Any, dtype: Any) -> None:
    """ValueError unless `backend` reads a KV cache of `kv_dtype` next to a `dtype` model."""
    if jnp.dtype(kv_dtype) == jnp.dtype(dtype) or backend.reads_any_cache_dtype:
        return
    readers = " or ".join(
        f"attention_backend={b.name!r}" for b in BACKENDS.values() if b.reads_any_cache_dtype
    )
    raise ValueError(
        f"kv_cache_dtype={jnp.dtype(kv_dtype).name} differs from the model dtype "
        f"({jnp.dtype(dtype).name}): only {readers} reads a cache of another dtype"
    )


def write_kv(
    k_pages: jax.Array,  # one layer's pools, in the layout of meta.backend
    v_pages: jax.Array,
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    meta: AttentionMetadata,
) -> tuple[jax.Array, jax.Array]:
    """The step's new keys and values written into their slots (`meta.slot_mapping`)."""
    backend = meta.backend
    return (
        backend.write(k_pages, k, meta.slot_mapping, "k"),
        backend.write(v_pages, v, meta.slot_mapping, "v"),
    )


def paged_attention(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # the layer's pools in meta.backend.layout
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # [N]: each head's sink logit (gpt-oss), or None
) -> jax.Array:  # [T, N, H]
    opts = dict(window=window, softcap=softcap)
    if sinks is not None:  # (only backends that serve sinks take the keyword)
        opts["sinks"] = sinks
    return meta.backend.attend(q, k_pages, v_pages, meta, **opts)
