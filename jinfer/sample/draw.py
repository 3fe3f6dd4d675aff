"""Drawing a token: a uniform number per row from the request's own seed, and the inverse of
the cumulative distribution of the row's kept weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256  # inverse-CDF sampling: the vocabulary in blocks of this many tokens


def inverse_cdf(weights: jax.Array, u: jax.Array, best: jax.Array) -> jax.Array:
    """The token whose cumulative weight first exceeds u [B] times the row's sum (u in
    [0, 1)). [B] i32.

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
    return jnp.where(hit, token, best).astype(jnp.int32)


def uniform(seed_lo: jax.Array, seed_hi: jax.Array, counter: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed_lo), seed_hi), counter)
    return jax.random.uniform(key, (), jnp.float32)
