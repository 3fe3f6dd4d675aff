"""XLA paged attention vs a dense per-token reference, over ragged lengths that hit page edges."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention import xla
from jinfer.attention.kv_cache import BF16_BITS, LAYOUTS, to_layout, write
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla import XLA
from jinfer.runner.buckets import align, place, region_a

PAGE = 4


def xla_paged_attention(q, k_pages, v_pages, meta, **kw):
    """The XLA path over pools built here in the "token" layout [P, Z, K, H], which the test
    cases index by page and slot; the path reads the "head" layout (kv_cache.py)."""
    k_pages, v_pages = to_layout(k_pages, "head", "k"), to_layout(v_pages, "head", "v")
    return xla.xla_paged_attention(q, k_pages, v_pages, meta, **kw)


def _dense_reference(q, k_seq, v_seq, positions, window, softcap):
    """q [T, N, H]; k_seq/v_seq per token: [S, K, H] of its own request."""
    out = []
    g = q.shape[1] // k_seq[0].shape[1]
    for t in range(q.shape[0]):
        k = np.repeat(k_seq[t], g, axis=1)  # [S, N, H]: query head n reads kv head n // g
        v = np.repeat(v_seq[t], g, axis=1)
        s = np.einsum("nh,snh->ns", q[t], k)
        if softcap:
            s = softcap * np.tanh(s / softcap)
        pos = np.arange(k.shape[0])
        mask = pos <= positions[t]
        if window:
            mask &= pos > positions[t] - window
        s = np.where(mask[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(np.einsum("ns,snh->nh", p, v))
    return np.stack(out)


def _slots(tables, seq_ids, positions, real=None) -> jnp.ndarray:
    """Each real token's cache slot; padding keeps slot 0 (the scratch page), as the runner does."""
    seq_ids, positions = np.asarray(seq_ids), np.asarray(positions)
    slots = tables[seq_ids, positions // PAGE] * PAGE + positions % PAGE
    if real is not None:
        slots = np.where(np.isin(np.arange(len(slots)), real), slots, 0)
    return jnp.asarray(slots, jnp.int32)


@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_paged_attention_matches_dense_reference(gqa, window, softcap):
    rng = np.random.default_rng(gqa * 100 + (window or 0) + int(softcap or 0))
    kv_heads, head_dim, num_pages = 2, 8, 64
    n = kv_heads * gqa
    # (computed before, new this step): decodes, chunks, page edges (PAGE-1, PAGE, PAGE+1)
    requests = [(0, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 3), (0, 2 * PAGE), (7, 9), (30, 1)]
    k_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))  # pages scattered randomly
    max_pages = 16
    tables = np.zeros((len(requests), max_pages), np.int32)
    positions, seq_ids, k_seq, v_seq = [], [], [], []
    for r, (done, new) in enumerate(requests):
        total = done + new
        pages = [free.pop() for _ in range(-(-total // PAGE))]
        tables[r, : len(pages)] = pages
        ks = k_pages[pages].reshape(-1, kv_heads, head_dim)[:total]
        vs = v_pages[pages].reshape(-1, kv_heads, head_dim)[:total]
        for p in range(done, total):
            positions.append(p)
            seq_ids.append(r)
            k_seq.append(ks)
            v_seq.append(vs)
    # Pool pages nobody owns hold NaN: the output must not see them.
    owned = set(tables.ravel().tolist()) - {0}
    for p in set(range(num_pages)) - owned:
        k_pages[p] = np.nan
        v_pages[p] = np.nan
    t = len(positions)
    q = rng.standard_normal((t, n, head_dim)).astype(np.float32)
    meta = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        seq_ids=jnp.asarray(seq_ids, jnp.int32),
        slot_mapping=_slots(tables, seq_ids, positions),
        block_tables=jnp.asarray(tables),
        backend=XLA,
    )
    got = xla_paged_attention(
        jnp.asarray(q),
        jnp.asarray(k_pages),
        jnp.asarray(v_pages),
        meta,
        window=window,
        softcap=softcap,
    )
    want = _dense_reference(q, k_seq, v_seq, positions, window, softcap)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_decodes", [1, 2, 64])
@pytest.mark.parametrize("window", [None, 40])
def test_decodes_over_many_pages_match_dense_reference(num_decodes, window):
    """Decodes only, at contexts of many pages (one key step each): 64 tokens go through 8
    groups in 2 independent loops."""
    rng = np.random.default_rng(num_decodes + (window or 0))
    kv_heads, gqa, head_dim = 2, 3, 8
    lengths = rng.integers(1, 12 * PAGE, num_decodes)
    lengths[0] = 8 * PAGE + 1  # just past a page edge
    max_pages = -(-int(lengths.max()) // PAGE)
    num_pages = num_decodes * max_pages + 1
    k_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables = np.zeros((num_decodes, max_pages), np.int32)
    k_seq, v_seq = [], []
    for r, n in enumerate(lengths):
        pages = [free.pop() for _ in range(-(-int(n) // PAGE))]
        tables[r, : len(pages)] = pages
        k_seq.append(k_pages[pages].reshape(-1, kv_heads, head_dim)[:n])
        v_seq.append(v_pages[pages].reshape(-1, kv_heads, head_dim)[:n])
    for p in free:  # unowned pages hold NaN
        k_pages[p] = v_pages[p] = np.nan
    positions = lengths - 1
    seq_ids = np.arange(num_decodes)
    meta = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        seq_ids=jnp.asarray(seq_ids, jnp.int32),
        slot_mapping=_slots(tables, seq_ids, positions),
        block_tables=jnp.asarray(tables),
        backend=XLA,
    )
    q = rng.standard_normal((num_decodes, kv_heads * gqa, head_dim)).astype(np.float32)
    got = xla_paged_attention(
        jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), meta, window=window
    )
    want = _dense_reference(q, k_seq, v_seq, positions, window, None)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


# The long prefix adds a window spanning more than one 256-key block (600), where some blocks
# are whole for every query and the ones at the window's edge are not.
MIX_WINDOWS = [(m, w) for m in ("many", "one-prefill") for w in (None, 5, 21)]
MIX_WINDOWS += [("one-prefill-long", w) for w in (None, 21, 600)]


# Soft-capping and bfloat16 (products in bf16 on the one-request path) at one block size and
# GQA: each case compiles both attention paths (~3 s), so not every combination runs.
PREFILL_CASES = [
    (mix, window, query_block, gqa, softcap, dtype)
    for mix, window in MIX_WINDOWS
    for query_block in (4, 16)
    for gqa in (1, 4)
    for softcap in (None, 20.0)
    for dtype in ("float32", "bfloat16")
    if (softcap is None and dtype == "float32") or (query_block == 16 and gqa == 4)
    if dtype == "float32" or mix != "many"
]


@pytest.mark.parametrize("mix, window, query_block, gqa, softcap, dtype", PREFILL_CASES)
def test_prefill_query_blocks_match_dense_reference(
    query_block, gqa, window, softcap, mix, dtype, monkeypatch
):
    """Decodes per token in region A, prefill runs in query blocks sharing one KV gather: runs of
    1, Bq-1, Bq, Bq+1 and several blocks, after cached prefixes that end mid-page and mid-block.
    `many`: several requests' blocks, in groups of 2 blocks with their own key loops (two
    streams; runs split across groups, a group of padding only). `one-prefill`: the blocks all
    hold one request's chunk (the one-gather path); `-long` after a 700-token prefix, so most key
    blocks are seen whole and skip the masks. `bfloat16`: a bf16 query over a pool of bf16 bits,
    which the one-request path multiplies in bf16."""
    monkeypatch.setattr("jinfer.attention.xla_prefill.BLOCKS_PER_GROUP", 2)
    rng = np.random.default_rng(query_block * 1000 + gqa * 100 + (window or 0))
    bq = query_block
    kv_heads, head_dim, num_pages, max_pages = 2, 8, 260, 200
    n = kv_heads * gqa
    # (computed before, new this step), in plan order; decodes mixed in between prefill runs
    if mix == "many":
        requests = [(5, 1), (0, bq - 1), (PAGE + 1, bq), (9, 1), (3, bq + 1), (0, 3 * bq + 2)]
        requests += [(2 * bq + 3, 2 * bq + 1), (30, 1), (0, 2)]
    elif mix == "one-prefill":
        requests = [(5, 1), (2 * PAGE + 3, 3 * bq + 5), (9, 1)]
    else:
        requests = [(5, 1), (700, 3 * bq + 5), (9, 1)]
    lengths = [new for _, new in requests]
    rows = list(range(len(requests)))
    a = align(len(requests), bq)
    blocks = sum(align(new, bq) for new in lengths if new > 1) // bq
    bucket = a + align(blocks + 2, 4) * bq  # + at least two blocks of padding only
    placement = place(lengths, rows, bucket, len(requests), bq)
    assert placement is not None and region_a(bucket, len(requests), bq) == a

    k_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, kv_heads, head_dim)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables = np.zeros((len(requests), max_pages), np.int32)
    positions = np.zeros(bucket, np.int32)
    seq_ids = np.zeros(bucket, np.int32)
    real, k_seq, v_seq = [], [], []
    for r, ((done, new), start) in enumerate(zip(requests, placement.starts, strict=True)):
        total = done + new
        pages = [free.pop() for _ in range(-(-total // PAGE))]
        tables[r, : len(pages)] = pages
        ks = k_pages[pages].reshape(-1, kv_heads, head_dim)[:total]
        vs = v_pages[pages].reshape(-1, kv_heads, head_dim)[:total]
        positions[start : start + new] = np.arange(done, total)
        seq_ids[start : start + new] = r
        for i in range(new):
            real.append(start + i)
            k_seq.append(ks)
            v_seq.append(vs)
    owned = set(tables.ravel().tolist()) - {0}
    for p in set(range(num_pages)) - owned:  # incl. scratch page 0: padding must not read it
        k_pages[p] = np.nan
        v_pages[p] = np.nan
    q = rng.standard_normal((bucket, n, head_dim)).astype(np.float32)
    tol = 2e-5
    q_in, k_in, v_in = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    if dtype == "bfloat16":  # the reference gets the same bf16-rounded inputs
        tol = 3e-2
        q_in, k_in, v_in = (x.astype(jnp.bfloat16) for x in (q_in, k_in, v_in))
        q = np.asarray(q_in, np.float32)
        k_seq = [np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32) for x in k_seq]
        v_seq = [np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32) for x in v_seq]
        k_in, v_in = (jax.lax.bitcast_convert_type(x, BF16_BITS) for x in (k_in, v_in))
    meta = AttentionMetadata(
        positions=jnp.asarray(positions),
        seq_ids=jnp.asarray(seq_ids),
        slot_mapping=_slots(tables, seq_ids, positions, real),
        block_tables=jnp.asarray(tables),
        backend=XLA,
        block_rows=jnp.asarray(placement.block_rows),
        block_lens=jnp.asarray(placement.block_lens),
        query_block=bq,
    )
    got = xla_paged_attention(q_in, k_in, v_in, meta, window=window, softcap=softcap)
    got = np.asarray(got, np.float32)
    want = _dense_reference(q[real], k_seq, v_seq, positions[real], window, softcap)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[real], want, atol=tol, rtol=tol)


def test_a_pool_of_bfloat16_bits_reads_exactly_as_its_float32_values():
    """kv_cache.BF16_BITS: a bfloat16 pool kept as uint16 patterns, widened per gathered block."""
    rng = np.random.default_rng(3)
    pages = jnp.asarray(rng.standard_normal((6, PAGE, 2, 8)).astype(np.float32))
    as_bf16 = pages.astype(jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(as_bf16, BF16_BITS)
    tables = np.array([[3, 1, 5], [2, 4, 0]], np.int32)
    positions, seq_ids = np.array([9, 10, 2]), np.array([0, 0, 1])
    meta = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        seq_ids=jnp.asarray(seq_ids, jnp.int32),
        slot_mapping=_slots(tables, seq_ids, positions),
        block_tables=jnp.asarray(tables),
        backend=XLA,
    )
    q = jnp.asarray(rng.standard_normal((3, 4, 8)).astype(np.float32))
    want = xla_paged_attention(q, as_bf16.astype(jnp.float32), as_bf16.astype(jnp.float32), meta)
    got = xla_paged_attention(q, bits, bits, meta)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Writes round to bfloat16 and store the bits.
    new = jnp.asarray(rng.standard_normal((3, 2, 8)).astype(np.float32))
    written = write(bits, new, meta.slot_mapping, "token", "k")
    assert written.dtype == BF16_BITS
    back = jax.lax.bitcast_convert_type(written, jnp.bfloat16)[
        meta.slot_mapping // PAGE, meta.slot_mapping % PAGE
    ]
    np.testing.assert_array_equal(np.asarray(back), np.asarray(new.astype(jnp.bfloat16)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("role", ["k", "v"])
def test_write_puts_each_token_in_its_slot_in_either_layout(layout, role):
    """A token's keys (values) land at [page, offset] of the pool in either layout, and nothing
    else changes; slots past the pool (mode="drop") write nothing."""
    rng = np.random.default_rng(7)
    pages = rng.standard_normal((5, PAGE, 2, 8)).astype(np.float32)  # [P, Z, K, H]
    slots = np.array([1 * PAGE + 3, 4 * PAGE, 2 * PAGE + 1, 5 * PAGE + 2], np.int32)  # last: out
    new = rng.standard_normal((4, 2, 8)).astype(np.float32)  # [T, K, H]
    want = pages.copy()
    for t, slot in enumerate(slots[:3]):
        want[slot // PAGE, slot % PAGE] = new[t]
    pool = to_layout(jnp.asarray(pages), layout, role)
    got = write(pool, jnp.asarray(new), jnp.asarray(slots), layout, role)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(to_layout(want, layout, role)))
