"""Top-k and top-p as one logit threshold per row, without sorting the vocabulary.

The sampler keeps a row's tokens whose (temperature-scaled) logit reaches the row's threshold.
Top-k and top-p read the best CANDIDATES tokens first; rows whose answer lies beyond them are
settled exactly by bisection over the whole vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.sample.metadata import CANDIDATES, SamplingBatch

BISECT_STEPS = 32


def _bisect(lo: jax.Array, hi: jax.Array, ok) -> jax.Array:
    """Largest t in [lo, hi] with ok(t) (ok is monotone: true at lo, false above the answer),
    to float precision. lo, hi [B, 1]."""

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, BISECT_STEPS, body, (lo, hi))
    return lo


def top_k_top_p_threshold(
    scaled: jax.Array, weights: jax.Array, s: SamplingBatch, candidates: int = CANDIDATES
) -> jax.Array:
    """Per-row logit threshold below which tokens are dropped by top-k and top-p. [B, 1].

    Top-p applies to what top-k keeps, renormalized (as vLLM and transformers do): the smallest
    set of the row's top-k whose share of the top-k's mass reaches top_p. `weights` [B, V] =
    exp(scaled - row max). The answer usually lies among the `candidates` best tokens (a top-k
    within them holds its nucleus too; without top-k, they often already hold top_p of the
    mass); rows where it does not are settled exactly by bisection on the logit value over the
    whole vocabulary -- never a full sort (one sort of 64 x 49k floats takes a second on a CPU).
    """
    v = scaled.shape[-1]
    c = min(candidates, v)
    best = jax.lax.top_k(scaled, c)[0]  # [B, C] descending
    top_k_on = (s.top_k > 0)[:, None]  # [B, 1]; a row without top-k keeps every token
    k = jnp.where(top_k_on, jnp.minimum(s.top_k[:, None], v), v)  # [B, 1]
    kth = jnp.take_along_axis(best, jnp.minimum(k, c) - 1, axis=-1)
    k_inside = ~top_k_on | (k <= c)
    hi = jnp.max(scaled, axis=-1, keepdims=True)
    # Below hi - 128 a weight is 0 in float32 (and banned tokens sit at -1e30): searching there
    # would only cost precision.
    lo = jnp.maximum(jnp.min(scaled, axis=-1, keepdims=True), hi - 128.0)

    def k_search(kth):
        kth_x = _bisect(lo, hi, lambda t: jnp.sum(scaled >= t, -1, keepdims=True) >= k)
        return jnp.where(k_inside, kth, kth_x)

    # Each search runs only when a row needs it; a "top_k" batch (every filter a top-k within
    # the candidates) never does, and the host knows it.
    inside = True if s.variant is not None and s.variant.filtering == "top_k" else None
    kth = branch(inside, jnp.all(k_inside), lambda x: x, k_search, kth)
    kth = jnp.where(top_k_on, kth, -jnp.inf)  # [B, 1]

    # Top-p over the top-k: their mass zk, and the candidates' share of it, best first.
    top_p_on = s.top_p[:, None] < 1.0
    target = s.top_p[:, None] * jnp.sum(jnp.where(scaled >= kth, weights, 0.0), -1, keepdims=True)
    p = jnp.where(best >= kth, jnp.exp(best - hi), 0.0)  # [B, C]
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each candidate
    pth = jnp.min(jnp.where((before < target) & (best >= kth), best, jnp.inf), -1, keepdims=True)
    within = top_k_on & (k <= c)  # the whole top-k is among the candidates, so its nucleus too
    p_inside = ~top_p_on | within | (jnp.sum(p, axis=-1, keepdims=True) >= target)

    def p_search(pth):
        floor = jnp.maximum(kth, lo)
        mass = lambda t: jnp.sum(jnp.where(scaled >= t, weights, 0), -1, keepdims=True)  # noqa: E731
        pth_x = _bisect(floor, hi, lambda t: mass(t) >= target)
        return jnp.where(p_inside, pth, pth_x)

    pth = branch(inside, jnp.all(p_inside), lambda x: x, p_search, pth)
    return jnp.maximum(kth, jnp.where(top_p_on, pth, -jnp.inf))


def branch(decided: bool | None, pred: jax.Array, true_fn, false_fn, *operands):
    """`true_fn(*operands)` or `false_fn(*operands)`: as the host `decided` (accelerators: one
    program per variant, no conditional in it), or, where it did not (None: CPU, where the
    conditional costs the host nothing and skips the work), as the device finds `pred`."""
    if decided is None:
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return (true_fn if decided else false_fn)(*operands)
