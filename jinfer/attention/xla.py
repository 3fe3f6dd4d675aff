"""The XLA attention: the reference and the CPU path, in the pool's "head" layout.

Every token t of the step belongs to request row `seq_ids[t]` and sits at `positions[t]`. Its keys
are that request's cached positions s with

    s <= positions[t]                      (causal; this step's tokens are already written)
    s >  positions[t] - window             (sliding-window layers only)

The XLA path reads the pool in its "head" layout (`kv_cache.py`) and walks the key axis a page
at a time with an online softmax, gathering each token's (or query block's) pages. The loop's
bounds are computed from the positions inside jit, so one compiled step serves any context
length.

Prefill runs may instead come in query blocks (`block_rows` / `block_lens`, see
`xla_prefill.py`): the last NB * Bq tokens of the batch, each block Bq tokens of one
request, which share one KV gather. The first T - NB * Bq tokens (region A: decodes, or the whole
batch in small buckets) take the per-token path. Without blocks (None) every token is per-token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.attention import kv_cache
from jinfer.attention.backend import AttentionBackend
from jinfer.attention.key_loops import grouped_map, initial_state, online_softmax_step
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla_prefill import QUERY_BLOCK, blocked_paged_attention
from jinfer.config.cache import SCRATCH_PAGE


class XlaBackend(AttentionBackend):
    """The XLA attention: every platform, any head size, any cache dtype, tensor parallel."""

    name = "xla"
    layout = "head"
    # The XLA path steps through keys a page at a time, and each key step costs a dozen small
    # kernels, so its pages are long: 32 decodes, ms per layer at a 160 / 600-token context,
    # pages of 16: 2.7 / 11.5, 32: 1.9 / 9.4, 64: 1.5 / 5.7, 128: 1.8 / 4.7 (CPU, SmolLM2 heads).
    default_page_size = 64
    query_block = QUERY_BLOCK
    native_platforms = ("cpu", "gpu", "tpu")
    reads_any_cache_dtype = True  # read_pages upcasts each gathered page
    serves_sinks = True  # each loop starts from the sink (key_loops.initial_state)

    def storage_dtype(self, dtype: Any) -> Any:
        """bfloat16 pools as their 16-bit patterns: XLA:CPU moves a widening convert (or a
        bitcast) of gathered blocks onto the whole pool, once per layer and step, while integer
        bits gathered and shifted stay per block (`kv_cache.read_pages`)."""
        return kv_cache.BF16_BITS if jnp.dtype(dtype) == jnp.bfloat16 else dtype

    def attend(self, q, k_pages, v_pages, meta, *, window, softcap, sinks=None):
        return xla_paged_attention(
            q, k_pages, v_pages, meta, window=window, softcap=softcap, sinks=sinks
        )


XLA = XlaBackend()


def xla_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    meta: AttentionMetadata,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # [N] each head's sink logit (gpt-oss), or None
) -> jax.Array:  # [T, N, H]
    """Region A per token, the prefill region (if any) in query blocks; the split is static."""
    blocked = meta.num_blocked_tokens
    opts = dict(window=window, softcap=softcap, sinks=sinks)
    if blocked == 0:
        return _per_token_attention(q, k_pages, v_pages, meta, **opts)
    a = q.shape[0] - blocked
    out_b = blocked_paged_attention(
        q[a:],
        k_pages,
        v_pages,
        meta.positions[a:],
        meta.block_rows,
        meta.block_lens,
        meta.block_tables,
        **opts,
    )  # [NB * Bq, N, H]
    if a == 0:
        return out_b
    region_a = dataclasses.replace(
        meta,
        positions=meta.positions[:a],
        seq_ids=meta.seq_ids[:a],
        slot_mapping=meta.slot_mapping[:a],
        block_rows=None,
        block_lens=None,
    )
    out_a = _per_token_attention(q[:a], k_pages, v_pages, region_a, **opts)
    return jnp.concatenate([out_a, out_b], axis=0)


# The per-token path's key loops: one per group of this many tokens (see below). Measured on
# CPU against 4 groups whatever the batch: 16 decodes at 300 keys 1.99 -> 1.59 ms per layer
# (2 groups), 64 at 900 keys 23.3 -> 21.0 (8), 128 at 600 keys 34.0 -> 29.3 (16).
TOKENS_PER_GROUP = 8


# Independent chains those loops run in: XLA:CPU may run two independent loops side by side,
# but one lax.map's iterations only one after the other (CPU, 64 decodes at a 900-token
# context: 28.4 -> 26.6 ms per layer with 2 chains of 2 groups instead of 1 chain of 4).
TOKEN_STREAMS = 2


def _per_token_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    meta: AttentionMetadata,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # [N]
) -> jax.Array:  # [T, N, H]
    """Each token gathers its own copy of its request's KV pages: right for decodes.

    A key loop runs to the longest context among its tokens, and every token pays for every
    step of it. So the tokens go in static groups of TOKENS_PER_GROUP, each with its own loop
    bound; the scheduler orders decodes longest first, so a batch of mixed context lengths
    pays roughly for its real keys rather than T x the longest."""
    t, n, h = q.shape
    k = k_pages.shape[1]
    g = n // k
    token_tables = meta.block_tables[meta.seq_ids]  # [T, Pmax]
    qg = q.reshape(t, k, g, h).astype(jnp.float32)  # [T, K, G, H]
    # Padding tokens write to the scratch page and need no keys: a group of padding only runs
    # no key steps at all.
    page_size = k_pages.shape[3]
    real = meta.slot_mapping // page_size != SCRATCH_PAGE  # [T]

    loop = functools.partial(
        _token_loop,
        k_pages=k_pages,
        v_pages=v_pages,
        window=window,
        softcap=softcap,
        sinks=None if sinks is None else sinks.reshape(k, g),
    )
    xs = (qg, token_tables, meta.positions, real)
    out = grouped_map(loop, xs, TOKENS_PER_GROUP, TOKEN_STREAMS)  # [T, K, G, H]
    return out.reshape(t, n, h).astype(q.dtype)


def _token_loop(
    qg: jax.Array,  # [T, K, G, H] float32
    token_tables: jax.Array,  # [T, Pmax]
    positions: jax.Array,  # [T]
    real: jax.Array,  # [T] bool: not padding
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    *,
    window: int | None,
    softcap: float | None,
    sinks: jax.Array | None,  # [K, G]
) -> jax.Array:  # [T, K, G, H] float32
    t, k, g, h = qg.shape
    block = k_pages.shape[3]  # Z: one page per key step

    # Pages needed by any real token: from the oldest visible position to the newest.
    hi = jnp.max(jnp.where(real, positions, -1)) // block + 1  # 0 when all are padding
    if window is None:
        lo = jnp.int32(0)
    else:
        oldest = jnp.min(jnp.where(real, positions, jnp.iinfo(jnp.int32).max))
        lo = jnp.minimum(jnp.maximum(oldest - window + 1, 0) // block, hi)

    def body(b, carry):
        m, denom, acc = carry  # [T, K, G], [T, K, G], [T, K, G, H]
        page_ids = jax.lax.dynamic_index_in_dim(token_tables, b, axis=1, keepdims=False)  # [T]
        kb = kv_cache.read_pages(k_pages, page_ids)  # [T, K, H, Z]
        vb = kv_cache.read_pages(v_pages, page_ids)  # [T, K, Z, H]
        s = jnp.einsum("tkgh,tkhz->tkgz", qg, kb)  # [T, K, G, Z]
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        key_pos = b * block + jnp.arange(block)  # [Z]
        visible = key_pos[None, :] <= positions[:, None]  # [T, Z]
        if window is not None:
            visible &= key_pos[None, :] > positions[:, None] - window
        m_new, l_new, p, corr = online_softmax_step(m, denom, s, visible[:, None, None, :])
        # Slots past a request's length may hold stale data (or NaN): never let 0 * NaN in.
        vb = jnp.where(visible[:, None, :, None], vb, 0.0)
        acc_new = acc * corr[..., None] + jnp.einsum("tkgz,tkzh->tkgh", p, vb)
        return m_new, l_new, acc_new

    init = initial_state((t, k, g), sinks, h)
    _, denom, acc = jax.lax.fori_loop(lo, hi, body, init)
    return acc / jnp.maximum(denom, 1e-30)[..., None]
