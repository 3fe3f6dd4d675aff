"""A mixture-of-experts MLP, dropless, in static shapes: every token runs its top X experts.

The router scores each token over the E experts (float32 softmax), keeps the top X and, with
`norm_topk_prob`, renormalizes their weights. The T*X (token, expert) rows are then run through
their experts' SwiGLU MLPs as grouped products, and summed back per token with the router's
weights. No capacity factor, no token dropped, one program for any routing. The grouped product
is chosen by platform and row count (at trace time: T is the step's bucket, static), from
`scripts/bench_moe.py`'s measurements:

    ragged    rows sorted by expert, `lax.ragged_dot` with the group sizes counted on the device:
              GPUs and TPUs have grouped-GEMM lowerings for it. XLA:CPU lowers it densely (every
              expert's weights over every row), 3-23x the floor.
    gather    (CPU, few rows) each row times its own expert's weights, gathered per row: reads
              exactly the active weights, 1.2x the floor for one token; per-row copies make it
              slow for many.
    blocked   (CPU, many rows) the sorted rows padded to whole blocks of `BLOCK` rows per expert,
              each block one batched product with its expert's weights: at most
              ceil(T*X / BLOCK) + min(E, T*X) blocks, 1.3-2.3x the floor at 32-128 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.config.model import ModelConfig
from jinfer.models.layers import activation, dense
from jinfer.models.params import LayerParams

BLOCK = 8  # rows per block of the blocked product
GATHER_MAX_ROWS = 64  # CPU: up to this many (token, expert) rows, gather; beyond, blocked


def moe_block(cfg: ModelConfig, p: LayerParams, x: jax.Array) -> jax.Array:  # [T, D]
    t, top = x.shape[0], cfg.num_experts_per_tok
    scores = dense("td,de->te", x, p.router, jnp.float32)  # [T, E]
    weights, experts = jax.lax.top_k(jax.nn.softmax(scores, axis=-1), top)  # [T, X]
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = experts.reshape(-1)  # [R] R = T*X rows, token-major
    if jax.default_backend() != "cpu":
        out = _ragged(cfg, p, x, flat, top)
    elif flat.shape[0] <= GATHER_MAX_ROWS:
        out = _gathered(cfg, p, x, flat, top)
    else:
        out = _blocked(cfg, p, x, flat, top)
    w = weights.reshape(t * top, 1)
    return jnp.sum((out * w).reshape(t, top, -1), axis=1).astype(x.dtype)  # [T, D]


def _swiglu(cfg: ModelConfig, product, rows: jax.Array, p: LayerParams) -> jax.Array:
    """down(act(gate(rows)) * up(rows)) with `product(lhs, w)` the grouped weight product."""
    gate = activation(cfg, product(rows, p.w_gate))  # [R, C] float32
    return product((gate * product(rows, p.w_up)).astype(rows.dtype), p.w_down)  # [R, D]


def _ragged(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int):
    order = jnp.argsort(flat, stable=True)  # rows by expert
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)  # [E]

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # run i times expert i's weight
        return jax.lax.ragged_dot(lhs, w, sizes, preferred_element_type=jnp.float32)

    out = _swiglu(cfg, product, x[order // top], p)  # [R, D] in expert order
    return jnp.zeros_like(out).at[order].set(out)  # back to token order


def _gathered(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int):
    rows = jnp.repeat(x, top, axis=0)  # [R, D]

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # [R, in] x [R, in, out]
        return jnp.einsum("ri,rio->ro", lhs, w[flat], preferred_element_type=jnp.float32)

    return _swiglu(cfg, product, rows, p)


def _blocked(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int):
    e, r = cfg.num_experts, flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)  # [E]
    padded = (sizes + BLOCK - 1) // BLOCK * BLOCK  # each expert's rows to whole blocks
    ends = jnp.cumsum(padded)
    starts, firsts = ends - padded, jnp.cumsum(sizes) - sizes
    by_expert = flat[order]
    dest = starts[by_expert] + jnp.arange(r) - firsts[by_expert]  # [R] row in the blocks
    nb = -(-r // BLOCK) + min(e, r)  # the most blocks any routing needs (static)
    block_expert = jnp.searchsorted(ends, jnp.arange(nb) * BLOCK, side="right")
    block_expert = jnp.minimum(block_expert, e - 1)  # [NB] (past the last: empty blocks)
    rows = jnp.zeros((nb * BLOCK, x.shape[1]), x.dtype).at[dest].set(x[order // top])

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # blocks x their experts' weights
        blocks = lhs.reshape(nb, BLOCK, -1)
        out = jnp.einsum(
            "bni,bio->bno", blocks, w[block_expert], preferred_element_type=jnp.float32
        )
        return out.reshape(nb * BLOCK, -1)

    out = _swiglu(cfg, product, rows, p)[dest]  # [R, D] in expert order
    return jnp.zeros_like(out).at[order].set(out)
