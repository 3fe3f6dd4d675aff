"""Pure-JAX references for the paged attention kernels: the meaning every kernel must reproduce.

Notation (shared by every file in this package):

    T tokens in the flat batch    N query heads   K kv heads    G = N // K query heads per kv head
    H head dim                    P pool pages    Z page size   S sequences in the batch
    Pmax pages per sequence (block-table width)

The ragged layout (`cu_q_lens`) lists each sequence's query tokens as one contiguous run of the
flat batch. A sequence's KV length already counts this step's tokens (their keys and values were
written into the pool before attention), so query token i of a run of q_len tokens sits at
position kv_len - q_len + i and sees keys

    s <= position                      causal
    s >  position - window             sliding window (when window is set)

Rows past the last sequence have q_len 0 (cu_q_lens repeats T) and kv_len 0.

These functions gather every sequence's whole page list densely: memory O(T * Pmax * Z), fine for
tests, never for serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    kv_lens: jax.Array,  # [S] int32
    page_indices: jax.Array,  # [S, Pmax] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [T, N, H]
    t, n, h = q.shape
    _, z, k, _ = k_pages.shape
    g = n // k
    max_pages = page_indices.shape[1]
    tok = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, tok, side="right") - 1, 0, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]  # [T]
    pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])  # [T]
    keys = k_pages[page_indices[seq]].reshape(t, max_pages * z, k, h)  # [T, S_k, K, H]
    vals = v_pages[page_indices[seq]].reshape(t, max_pages * z, k, h)
    key_pos = jnp.arange(max_pages * z)
    visible = key_pos[None, :] <= pos[:, None]  # [T, S_k]
    if window is not None:
        visible &= key_pos[None, :] > pos[:, None] - window
    keys = jnp.where(visible[:, :, None, None], keys, 0).astype(jnp.float32)
    vals = jnp.where(visible[:, :, None, None], vals, 0).astype(jnp.float32)
    qg = q.reshape(t, k, g, h).astype(jnp.float32)
    s = jnp.einsum("tkgh,tskh->tkgs", qg, keys, precision="highest")
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible[:, None, None, :], s, NEG_INF)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    p = jnp.where(visible[:, None, None, :], p, 0.0)
    out = jnp.einsum("tkgs,tskh->tkgh", p, vals, precision="highest")
    out = out / jnp.maximum(p.sum(axis=-1), 1e-30)[..., None]
    return out.reshape(t, n, h).astype(q.dtype)


def decode_paged_attention_reference(
    q: jax.Array,  # [S, N, H], one query token per sequence, already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    kv_lens: jax.Array,  # [S] int32 (0 = padding row)
    page_indices: jax.Array,  # [S, Pmax] int32
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [S, N, H]
    """Decode is the ragged case with one query per sequence."""
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, window=window, softcap=softcap
    )
