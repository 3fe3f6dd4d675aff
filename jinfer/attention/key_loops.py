"""The XLA attention paths' key loops: the online-softmax fold, and static groups of loops.

Both XLA paths (`xla.py` per token, `xla_prefill.py` per query block) walk the keys a page at a
time and fold each page's scores into a running max, denominator and accumulator; both split
their rows into static groups, each with its own loop bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def online_softmax_step(
    m: jax.Array, denom: jax.Array, s: jax.Array, visible: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Folds one key block's scores s [..., C] (`visible` broadcasts to s; None: every key is
    visible, no masks) into the running max m and denominator denom [...]. Returns (m_new,
    denom_new, p, corr): p the block's unnormalised weights (0 where not visible), corr the
    factor the accumulator is rescaled by. Every XLA attention loop here (per token, per query
    block, one request) steps through it."""
    if visible is not None:
        s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    corr = jnp.exp(m - m_new)
    return m_new, denom * corr + p.sum(axis=-1), p, corr


def initial_state(
    shape: tuple[int, ...], sinks: jax.Array | None, head_dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, denom, acc) [*shape], [*shape], [*shape, H] before the first key block: empty, or,
    with attention sinks (gpt-oss; `sinks` broadcasts to `shape`), already holding each head's
    sink as a key of score `sink` and value zero, so it only adds to the denominator."""
    acc = jnp.zeros((*shape, head_dim), jnp.float32)
    if sinks is None:
        return jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32), acc
    return jnp.broadcast_to(sinks.astype(jnp.float32), shape), jnp.ones(shape, jnp.float32), acc


def grouped_map(
    loop: Callable[..., jax.Array],
    xs: tuple[jax.Array, ...],  # each [M, ...]
    per_group: int,
    streams: int,
) -> jax.Array:  # [M, ...]: loop's outputs, in row order
    """Runs `loop(*xs)` on static groups of `per_group` rows of `xs` (one group when M does not
    split evenly), so each group's key loop has its own trip count. lax.map compiles one loop
    body, run once per group; the groups go in `streams` independent maps, which XLA:CPU may run
    side by side (one map's iterations run only one after the other)."""
    m = xs[0].shape[0]
    groups = m // per_group if m % per_group == 0 and m > per_group else 1
    streams = streams if groups % streams == 0 else 1

    def split(x: jax.Array) -> jax.Array:
        """[M, ...] -> [streams, groups / streams, M / groups, ...]"""
        return x.reshape(streams, groups // streams, m // groups, *x.shape[1:])

    parts = tuple(split(x) for x in xs)
    outs = [jax.lax.map(lambda x: loop(*x), tuple(p[i] for p in parts)) for i in range(streams)]
    out = jnp.concatenate(outs)  # [groups, M / groups, ...]
    return out.reshape(m, *out.shape[2:])
