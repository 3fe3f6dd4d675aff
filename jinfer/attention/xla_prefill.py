"""Prefill attention in query blocks: Bq tokens of one request share each gathered KV block.

The per-token path (`attention.xla_paged_attention`) gathers every query token's own copy of
each KV page: [T, K, H, Z] per step of the key loop. A 512-token chunk at 8k context moves 512
copies of the whole context through memory, and the scores are T matrix-vector products. Here
the runner has laid each prefill run out in whole blocks of Bq consecutive positions of one
request (`AttentionMetadata.block_rows` / `block_lens`), so one gather [NB, K, H, Z] serves Bq
queries and the scores are [G * Bq, H] x [H, Z] matrix products. Pools are in the "head" layout
(`kv_cache.py`): keys [P, K, H, Z], values [P, K, Z, H].

Block b holds `block_lens[b]` real tokens at the front (positions p_b, p_b + 1, ...) of
block-table row `block_rows[b]`; the rest is padding. Padding queries see no keys and come out
as 0; blocks of padding only (len 0) likewise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jinfer.attention import kv_cache
from jinfer.attention.key_loops import grouped_map, initial_state, online_softmax_step

BIG = 2**30
# Bq: tokens per query block (the XLA backend's prefill granularity). Measured on CPU (SmolLM2,
# 8k context): see scripts/bench_prefill.py.
QUERY_BLOCK = 16


def blocked_paged_attention(
    q: jax.Array,  # [NB * Bq, N, H], already scaled
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    positions: jax.Array,  # [NB * Bq] int32
    block_rows: jax.Array,  # [NB] int32
    block_lens: jax.Array,  # [NB] int32
    block_tables: jax.Array,  # [R, Pmax] int32
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # [N] each head's sink logit (gpt-oss), or None
) -> jax.Array:  # [NB * Bq, N, H]
    nb = block_rows.shape[0]
    tq, n, h = q.shape
    bq = tq // nb
    _, k, _, page_size = k_pages.shape
    g = n // k
    tables = block_tables[block_rows]  # [NB, Pmax]
    # [NB, K, G, Bq, H]: the scores' layout, transposed once here rather than in every key step
    qb = q.reshape(nb, bq, k, g, h).astype(jnp.float32).transpose(0, 2, 3, 1, 4)
    pos = positions.reshape(nb, bq)  # [NB, Bq]
    valid = jnp.arange(bq)[None, :] < block_lens[:, None]  # [NB, Bq]

    def per_block(_):
        # Groups of BLOCKS_PER_GROUP blocks, each with its own key-loop bounds (as the per-token
        # path groups tokens): a step's fresh short prompts do not pay for the key blocks of a
        # long prompt's chunk next to them.
        loop = functools.partial(
            _block_loop,
            k_pages=k_pages,
            v_pages=v_pages,
            window=window,
            softcap=softcap,
            sinks=None if sinks is None else sinks.reshape(1, k, g, 1),
        )
        xs = (qb, tables, pos, valid)
        out = grouped_map(loop, xs, BLOCKS_PER_GROUP, BLOCK_STREAMS)  # [NB, K, G, Bq, H]
        return out.transpose(0, 3, 1, 2, 4).reshape(tq, n, h)  # [NB, Bq, K, G, H]

    lo, hi = _key_blocks(pos, valid, page_size, window)  # the one-request path's key pages

    # The common case -- one long prompt's chunk fills every block -- needs no per-block gathers:
    # one gather of that request's keys serves all NB * Bq queries as one large matmul per key
    # block (instead of NB small ones, which XLA:CPU runs ~10x below its GEMM rate).
    real = block_lens > 0
    row = block_rows[jnp.argmax(real)]
    one_request = jnp.all(jnp.where(real, block_rows == row, True))
    out = jax.lax.cond(
        one_request,
        lambda _: _one_request_attention(
            q.reshape(tq, k, g, h),
            k_pages,
            v_pages,
            positions,
            valid.reshape(tq),
            jnp.take(block_tables, row, axis=0),
            lo=lo * page_size,
            hi=hi * page_size,
            block=DENSE_KV_BLOCK,
            window=window,
            softcap=softcap,
            sinks=sinks,
        ),
        per_block,
        None,
    )
    return out.astype(q.dtype)


def _key_blocks(
    pos: jax.Array, valid: jax.Array, block: int, window: int | None
) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks of `block` positions that any valid query (at `pos`) sees, from
    the oldest visible position to the newest; empty when no query is valid."""
    hi = jnp.max(jnp.where(valid, pos, -1)) // block + 1
    if window is None:
        return jnp.int32(0), hi
    oldest = jnp.min(jnp.where(valid, pos, BIG))
    return jnp.minimum(jnp.maximum(oldest - window + 1, 0) // block, hi), hi


# The per-block path's key loops: one per group of this many query blocks, in BLOCK_STREAMS
# independent chains (see attention.TOKENS_PER_GROUP / TOKEN_STREAMS).
BLOCKS_PER_GROUP = 8
BLOCK_STREAMS = 2


def _block_loop(
    qb: jax.Array,  # [NB, K, G, Bq, H] float32
    tables: jax.Array,  # [NB, Pmax] each block's block-table row
    pos: jax.Array,  # [NB, Bq]
    valid: jax.Array,  # [NB, Bq] bool
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    *,
    window: int | None,
    softcap: float | None,
    sinks: jax.Array | None,  # [1, K, G, 1]
) -> jax.Array:  # [NB, K, G, Bq, H] float32
    nb, k, g, bq, h = qb.shape
    block = k_pages.shape[3]  # Z: one page per key step
    lo, hi = _key_blocks(pos, valid, block, window)

    def body(j, carry):
        m, denom, acc = carry  # [NB, K, G, Bq], [NB, K, G, Bq], [NB, K, G, Bq, H]
        page_ids = jax.lax.dynamic_index_in_dim(tables, j, axis=1, keepdims=False)  # [NB]
        kb = kv_cache.read_pages(k_pages, page_ids)  # [NB, K, H, Z]
        vb = kv_cache.read_pages(v_pages, page_ids)  # [NB, K, Z, H]
        s = jnp.einsum("bkgqh,bkhz->bkgqz", qb, kb)  # [NB, K, G, Bq, Z]
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        key_pos = j * block + jnp.arange(block)  # [Z]
        visible = key_pos[None, None, :] <= pos[:, :, None]  # [NB, Bq, Z]
        if window is not None:
            visible &= key_pos[None, None, :] > pos[:, :, None] - window
        visible &= valid[:, :, None]
        vis = visible[:, None, None, :, :]  # [NB, 1, 1, Bq, Z]
        m_new, l_new, p, corr = online_softmax_step(m, denom, s, vis)
        # Keys no query of the block sees may be stale or NaN: never let 0 * NaN in.
        seen = jnp.any(visible, axis=1)  # [NB, Z]
        vb = jnp.where(seen[:, None, :, None], vb, 0.0)
        acc_new = acc * corr[..., None] + jnp.einsum("bkgqz,bkzh->bkgqh", p, vb)
        return m_new, l_new, acc_new

    init = initial_state((nb, k, g, bq), sinks, h)
    _, denom, acc = jax.lax.fori_loop(lo, hi, body, init)
    return acc / jnp.maximum(denom, 1e-30)[..., None]


DENSE_KV_BLOCK = 256  # keys per step of the one-request loop (a whole number of pages)


def _one_request_attention(
    q: jax.Array,  # [T, K, G, H]
    k_pages: jax.Array,  # [P, K, H, Z]
    v_pages: jax.Array,  # [P, K, Z, H]
    positions: jax.Array,  # [T]
    valid: jax.Array,  # [T] bool
    table: jax.Array,  # [Pmax] int32: the request's block-table row
    *,
    lo: jax.Array,  # first key position any query needs (a multiple of the caller's block)
    hi: jax.Array,  # one past the last
    block: int,
    window: int | None,
    softcap: float | None,
    sinks: jax.Array | None,  # [N]
) -> jax.Array:  # [T, N, H] float32
    """Key blocks every valid query sees whole (below the chunk's diagonal, inside every
    query's window) skip the masks, as flash attention does: at long context they are nearly
    all of them. (CPU, a 512-token chunk at 1.5k-3.5k context: the selects were ~1/4 of the
    attention kernels' time; the chunk got ~4% faster end to end.)"""
    t, k, g, h = q.shape
    page_size = k_pages.shape[3]
    ppb = max(1, block // page_size)
    block = ppb * page_size
    pad = (-table.shape[0]) % ppb
    table = jnp.pad(table, (0, pad)) if pad else table
    # One [G * T, H] x [H, C] product per kv head: XLA:CPU runs a batched (over heads) einsum of
    # the same shapes ~30% slower.
    qk = q.transpose(1, 2, 0, 3).reshape(k, g * t, h)  # [K, G*T, H]
    # A bfloat16 model over a bfloat16 pool multiplies in bfloat16 (accumulating in float32),
    # as flash attention does on accelerators: XLA:CPU's bf16 products run ~3x faster.
    low = q.dtype == jnp.bfloat16 and k_pages.dtype in (jnp.bfloat16, kv_cache.BF16_BITS)
    cdt = jnp.bfloat16 if low else jnp.float32
    qk = qk.astype(cdt)

    def product(a: jax.Array, b: jax.Array) -> jax.Array:  # [M, X] x [X, N] -> float32
        return jnp.dot(a.astype(cdt), b, preferred_element_type=jnp.float32)

    def step(j, carry, masked: bool):
        page_ids = jax.lax.dynamic_slice(table, (j * ppb,), (ppb,))
        kb = kv_cache.read_pages(k_pages, page_ids, cdt)  # [ppb, K, H, Z]
        kb = kb.transpose(1, 2, 0, 3).reshape(k, h, block)  # [K, H, C]
        vb = kv_cache.read_pages(v_pages, page_ids, cdt)  # [ppb, K, Z, H]
        vb = vb.transpose(1, 0, 2, 3).reshape(k, block, h)  # [K, C, H]
        visible = None
        if masked:
            key_pos = j * block + jnp.arange(block)  # [C]
            visible = (key_pos[None, :] <= positions[:, None]) & valid[:, None]  # [T, C]
            if window is not None:
                visible &= key_pos[None, :] > positions[:, None] - window
            seen = jnp.any(visible, axis=0)  # [C]: keys nobody sees may be stale or NaN
            vb = jnp.where(seen[None, :, None], vb, jnp.zeros((), vb.dtype))
            visible = jnp.tile(visible, (g, 1))  # [G*T, C]
        new = []
        for i, (m, denom, acc) in enumerate(carry):  # [G*T], [G*T], [G*T, H]
            s = product(qk[i], kb[i])  # [G*T, C]
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            m_new, l_new, p, corr = online_softmax_step(m, denom, s, visible)
            new.append((m_new, l_new, acc * corr[:, None] + product(p, vb[i])))
        return tuple(new)

    # Blocks [whole_lo, whole_hi) are visible in full to every valid query.
    first, last = lo // block, -(-hi // block)
    newest = jnp.max(jnp.where(valid, positions, -1))
    oldest = jnp.min(jnp.where(valid, positions, BIG))
    whole_hi = jnp.clip((oldest + 1) // block, first, last)
    whole_lo = first if window is None else -(-(newest - window + 1) // block)
    whole_lo = jnp.clip(whole_lo, first, whole_hi)
    head_sinks = None if sinks is None else jnp.repeat(sinks.reshape(k, g), t, axis=1)  # [K, G*T]
    carry = tuple(
        initial_state((g * t,), None if sinks is None else head_sinks[i], h) for i in range(k)
    )  # per kv head: running max, denominator, accumulator
    masked = functools.partial(step, masked=True)
    carry = jax.lax.fori_loop(first, whole_lo, masked, carry)
    carry = jax.lax.fori_loop(whole_lo, whole_hi, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(whole_hi, last, masked, carry)
    out = jnp.stack([acc / jnp.maximum(denom, 1e-30)[:, None] for _, denom, acc in carry])
    return out.reshape(k, g, t, h).transpose(2, 0, 1, 3).reshape(t, k * g, h)  # [T, N, H]
