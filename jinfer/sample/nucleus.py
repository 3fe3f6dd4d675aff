"""Top-p by redrawing (CPU): draw from the kept weights, redraw a token outside the nucleus.

A row's nucleus (top-p) is the smallest set of its heaviest tokens whose mass reaches `target`
(top_p times the mass of what top-k keeps). A token is in it exactly when the tokens strictly
heavier than it weigh less than `target`: one pass over the row tests one drawn token, where
finding the nucleus's edge exactly takes a search of many passes (on XLA:CPU, ~32 at ~0.7 ms
each for 32 x 49152 rows). So CPU draws first and asks afterwards, as FlashInfer's rejection
samplers do: a drawn token outside the nucleus is redrawn from the tokens heavier than it
(every lighter or equal token lies outside too), until one lands inside. A draw that lands in
the nucleus, from any set holding it, is distributed as the nucleus's renormalized weights,
so the answer is exact in distribution; most rows accept their first draw (a nucleus holding
95% of the mass keeps 95% of them), and the few redrawn rows are gathered, REDRAW_ROWS at a
time, so a redraw reads a few rows, not the batch.

The draws come from each request's own seed, counter and redraw number: a seeded request
draws the same tokens whatever shares its batch. They are not the tokens an accelerator's
exact threshold (`filtering.radix_search`) draws for the same seed; both follow the same
distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.sample.draw import inverse_cdf, uniform

REDRAW_ROWS = 2  # rows a redraw pass reads at once
# A row still outside its nucleus after this many redraws takes its best token (always in the
# nucleus). Each redraw lands inside with at least top_p's chance, and a miss removes the drawn
# token and every lighter one, so no real row comes near it; it bounds rows of NaNs.
MAX_REDRAWS = 64


def heavier_mass(weights: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mass of each row's tokens strictly heavier than `token` [B], and the token's
    weight: [B], [B]. weights [B, V]."""
    w = jnp.take_along_axis(weights, token[:, None], axis=-1)  # [B, 1]
    return jnp.sum(jnp.where(weights > w, weights, 0.0), axis=-1), w[:, 0]


def redraw_outside_nucleus(
    weights: jax.Array,
    tokens: jax.Array,
    target: jax.Array,
    best: jax.Array,
    seed_lo: jax.Array,
    seed_hi: jax.Array,
    counter: jax.Array,
) -> jax.Array:
    """`tokens` [B], drawn from `weights` [B, V] (what top-k and min-p keep), with every token
    outside its row's nucleus redrawn until one lands inside. `target` [B]: the mass the row's
    nucleus reaches (inf: no top-p); `best` [B]: the rows' heaviest tokens. [B] int32.

    A loop whose trip count the device decides: for CPU only (on an accelerator it would stop
    the device for the host every pass)."""
    b = weights.shape[0]
    r = min(REDRAW_ROWS, b)
    mass, w = heavier_mass(weights, tokens)
    done = mass < target
    low = jnp.where(done, -jnp.inf, w)  # [B]: every token this light or lighter is outside
    redraws = jnp.zeros((b,), jnp.int32)

    def redraw(state):
        tokens, low, done, redraws = state
        rows = jnp.nonzero(~done, size=r, fill_value=b)[0]  # [R]; b: no row (writes drop)
        at = jnp.minimum(rows, b - 1)
        w_rows = weights[at]  # [R, V]
        n = redraws[at] + 1
        u = jax.vmap(uniform)(seed_lo[at], seed_hi[at], counter[at], n)
        kept = jnp.where(w_rows > low[at][:, None], w_rows, 0.0)
        drawn, _ = inverse_cdf(kept, u, best[at])
        mass, w = heavier_mass(w_rows, drawn)
        ok = mass < target[at]
        out = ok | (n >= MAX_REDRAWS)
        drawn = jnp.where(ok, drawn, best[at])  # (a miss is redrawn next, unless it gives up)
        tokens = tokens.at[rows].set(drawn, mode="drop")
        low = low.at[rows].set(jnp.where(ok, low[at], w), mode="drop")
        done = done.at[rows].set(out, mode="drop")
        return tokens, low, done, redraws.at[rows].set(n, mode="drop")

    state = (tokens, low, done, redraws)
    tokens, *_ = jax.lax.while_loop(lambda st: ~jnp.all(st[2]), redraw, state)
    return tokens
