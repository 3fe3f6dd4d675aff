"""Drawing a token: a uniform number per row from the request's own seed, and the inverse of
the cumulative distribution of the row's kept weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256  # inverse-CDF sampling: the vocabulary in blocks of this many tokens


def inverse_cdf(weights: jax.Array, u: jax.Array, best: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The token whose cumulative weight first exceeds u [B] times the row's sum (u in
    [0, 1)), and that sum: [B] i32, [B] f32.

    Two levels, so no [B, V] cumulative sum (slow on XLA:CPU): block sums find the block, then
    one block per row is scanned."""
    b, v = weights.shape
    nb = -(-v // BLOCK)
    w = jnp.pad(weights, ((0, 0), (0, nb * BLOCK - v))).reshape(b, nb, BLOCK)
    block_sums = jnp.sum(w, axis=-1)  # [B, NB]
    block_cum = jnp.cumsum(block_sums, axis=-1)
    u = u * block_cum[:, -1]  # (the row's sum, from its blocks: no pass of its own)
    bi = jnp.minimum(jnp.sum(block_cum <= u[:, None], axis=-1), nb - 1)  # [B]
    start = jnp.take_along_axis(block_cum - block_sums, bi[:, None], axis=-1)  # [B, 1]
    inner = jnp.take_along_axis(w, bi[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    inner_cum = start + jnp.cumsum(inner, axis=-1)
    j = jnp.minimum(jnp.sum(inner_cum <= u[:, None], axis=-1), BLOCK - 1)
    token = bi * BLOCK + j
    # Rounding can land on a zero-weight token at a block's end: take the row's best instead
    # (`best`, the greedy token: no filter ever drops it, so it is the argmax of `weights`).
    hit = jnp.take_along_axis(inner, j[:, None], axis=-1)[:, 0] > 0
    return jnp.where(hit, token, best).astype(jnp.int32), block_cum[:, -1]


def uniform(
    seed_lo: jax.Array, seed_hi: jax.Array, counter: jax.Array, redraw: jax.Array | None = None
) -> jax.Array:
    """A row's uniform number in [0, 1) for its token `counter` (its `redraw`-th redraw, if
    given: `sample/nucleus.py`), from the request's own seed alone, so a seeded request draws
    the same whatever shares its batch. Scalars; vmap over rows."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed_lo), seed_hi), counter)
    if redraw is not None:
        key = jax.random.fold_in(key, redraw)
    return jax.random.uniform(key, (), jnp.float32)


def inverse_cdf_listed(
    weights: jax.Array, ids: jax.Array, u: jax.Array, best: jax.Array
) -> jax.Array:
    """`inverse_cdf` for rows whose every kept token is listed: `weights` [B, C] of the tokens
    `ids` [B, C] (distinct within a row, in any order; 0 weight: not kept), the same token as
    over the whole row (the cumulative weights are in token order), up to float rounding at
    the edges between tokens. [B] int32.

    Each listed token's cumulative weight is summed from the others pairwise ([B, C, C]): at
    C = 128 much cheaper than a pass over a vocabulary, and the same sums whatever the rows'
    other candidates, so a row draws the same whatever shares its batch."""
    before = jnp.sum(jnp.where(ids[:, None, :] < ids[:, :, None], weights[:, None, :], 0.0), -1)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, 1]
    # The last kept token whose cumulative weight before it is at most u times the total.
    hit = (weights > 0) & (before <= u[:, None] * total)
    token = jnp.max(jnp.where(hit, ids, -1), axis=-1)
    return jnp.where(token >= 0, token, best).astype(jnp.int32)
