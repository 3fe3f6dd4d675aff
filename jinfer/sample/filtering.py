"""Top-k and top-p as one logit threshold per row, without sorting the vocabulary.

The sampler keeps a row's tokens whose (temperature-scaled) logit reaches the row's threshold.
Top-k and top-p read the best CANDIDATES tokens first; rows whose answer lies beyond them are
settled exactly over the whole vocabulary: on CPU by bisection, run only when some row needs it;
on accelerators, where a conditional would stop the device for the host, by a radix search with
a fixed number of passes in the program of the batches the host finds may need it.
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
    mass); rows where it does not are settled exactly over the whole vocabulary -- never a full
    sort (one sort of 64 x 49k floats takes a second on a CPU): on CPU by bisection, run only
    when a row needs it (a device conditional); in an accelerator's "top_p" variant by a radix
    search for every row, in a fixed number of passes and without a conditional.
    """
    v = scaled.shape[-1]
    filtering = None if s.variant is None else s.variant.filtering
    exact = filtering == "top_p"  # the host knows some row may need the search: no candidates
    inside = True if filtering == "top_k" else None  # None: the device decides (CPU)
    top_k_on = (s.top_k > 0)[:, None]  # [B, 1]; a row without top-k keeps every token
    k = jnp.where(top_k_on, jnp.minimum(s.top_k[:, None], v), v)  # [B, 1]
    hi = jnp.max(scaled, axis=-1, keepdims=True)
    # Below hi - 128 a weight is 0 in float32 (and banned tokens sit at -1e30): searching there
    # would only cost precision.
    lo = jnp.maximum(jnp.min(scaled, axis=-1, keepdims=True), hi - 128.0)

    if exact:
        kth = radix_search(scaled, None, k.astype(jnp.float32), lo)
    else:
        c = min(candidates, v)
        best = jax.lax.top_k(scaled, c)[0]  # [B, C] descending
        kth = jnp.take_along_axis(best, jnp.minimum(k, c) - 1, axis=-1)
        k_inside = ~top_k_on | (k <= c)

        def k_search(kth):
            kth_x = _bisect(lo, hi, lambda t: jnp.sum(scaled >= t, -1, keepdims=True) >= k)
            return jnp.where(k_inside, kth, kth_x)

        kth = branch(inside, jnp.all(k_inside), lambda x: x, k_search, kth)
    kth = jnp.where(top_k_on, kth, -jnp.inf)  # [B, 1]

    # Top-p over the top-k: a share of their mass.
    top_p_on = s.top_p[:, None] < 1.0
    target = s.top_p[:, None] * jnp.sum(jnp.where(scaled >= kth, weights, 0.0), -1, keepdims=True)
    floor = jnp.maximum(kth, lo)
    if exact:
        pth = radix_search(scaled, weights, target, floor)
    else:  # the candidates' share of it, best first
        p = jnp.where(best >= kth, jnp.exp(best - hi), 0.0)  # [B, C]
        before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each candidate
        keep = (before < target) & (best >= kth)
        pth = jnp.min(jnp.where(keep, best, jnp.inf), -1, keepdims=True)
        within = top_k_on & (k <= c)  # the whole top-k is among the candidates, its nucleus too
        p_inside = ~top_p_on | within | (jnp.sum(p, axis=-1, keepdims=True) >= target)

        def p_search(pth):
            mass = lambda t: jnp.sum(jnp.where(scaled >= t, weights, 0), -1, keepdims=True)  # noqa: E731
            pth_x = _bisect(floor, hi, lambda t: mass(t) >= target)
            return jnp.where(p_inside, pth, pth_x)

        pth = branch(inside, jnp.all(p_inside), lambda x: x, p_search, pth)
    return jnp.maximum(kth, jnp.where(top_p_on, pth, -jnp.inf))


RADIX_BITS = 4  # a radix search settles this many bits of the answer per pass


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 that orders as the floats do (-0.0 taken as +0.0)."""
    i = jax.lax.bitcast_convert_type(x + 0.0, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _from_order_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def radix_search(
    x: jax.Array, weights: jax.Array | None, target: jax.Array, floor: jax.Array
) -> jax.Array:
    """The largest of each row's values t >= floor whose F(t) reaches target, where F(t) is the
    number (`weights` None) or the weight of the row's values >= t; `floor` where none does.
    x, weights [B, V]; target, floor [B, 1] -> [B, 1].

    Exact, with no sort, no conditional and no loop the device decides: the answer's 32 bits
    (as an order-preserving integer key, counted up from the floor's) are settled RADIX_BITS at
    a time, each pass counting F at the 2**RADIX_BITS - 1 next candidates at once -- 8 passes
    over the row, where bisection to float precision takes 32."""
    keys = _order_key(x)  # [B, V]
    base = _order_key(floor)  # [B, 1]
    f = jnp.ones_like(x) if weights is None else weights
    f = jnp.where(keys >= base, f, 0.0)  # values below the floor count for nothing
    # Distance above the floor's key (int32 arithmetic wraps; as uint32 it is exact).
    above = jax.lax.bitcast_convert_type(keys - base, jnp.uint32)  # [B, V]
    digits = jnp.arange(1, 2**RADIX_BITS, dtype=jnp.uint32)  # [D]
    answer = jnp.zeros(base.shape, jnp.uint32)  # [B, 1]: the bits settled so far
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        tries = answer + (digits << shift)  # [B, D], ascending
        reached = jnp.sum(jnp.where(above[:, None, :] >= tries[:, :, None], f[:, None, :], 0), -1)
        digit = jnp.sum(reached >= target, -1, keepdims=True)  # F falls as t rises: a prefix
        answer = answer + (digit.astype(jnp.uint32) << shift)
    return _from_order_key(jax.lax.bitcast_convert_type(answer, jnp.int32) + base)


def branch(decided: bool | None, pred: jax.Array, true_fn, false_fn, *operands):
    """`true_fn(*operands)` or `false_fn(*operands)`: as the host `decided` (accelerators: one
    program per variant, no conditional in it), or, where it did not (None: CPU, where the
    conditional costs the host nothing and skips the work), as the device finds `pred`."""
    if decided is None:
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return (true_fn if decided else false_fn)(*operands)
