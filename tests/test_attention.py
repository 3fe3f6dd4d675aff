"""XLA paged attention vs a dense per-token reference, over ragged lengths that hit page edges."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention import AttentionMetadata, xla_paged_attention

PAGE = 4


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
        slot_mapping=jnp.zeros(t, jnp.int32),
        block_tables=jnp.asarray(tables),
        kv_block=8,
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
