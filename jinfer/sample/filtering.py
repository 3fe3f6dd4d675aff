"""Top-k and top-p as one logit threshold per row, without sorting the vocabulary.

The sampler keeps a row's tokens whose (temperature-scaled) logit reaches the row's threshold.
Top-k and top-p read the best CANDIDATES tokens first; rows whose answer lies beyond them are
settled exactly over the whole vocabulary: on CPU by bisection, run only when some row needs it
(a device conditional); on accelerators, where a conditional would stop the device for the host,
by a radix search of fixed length (`radix_search`) for every row of the batches the host finds
may need it.
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
    scaled: jax.Array,
    weights: jax.Array,
    hi: jax.Array,
    s: SamplingBatch,
    candidates: int = CANDIDATES,
) -> jax.Array:
    """Per-row logit threshold below which tokens are dropped by top-k and top-p. [B, 1].

    Top-p applies to what top-k keeps, renormalized (as vLLM and transformers do): the smallest
    set of the row's top-k whose share of the top-k's mass reaches top_p. `hi` [B, 1]: the row
    max of `scaled`; `weights` [B, V] = exp(scaled - hi). The answer usually lies among the
    `candidates` best tokens (a top-k within them holds its nucleus too; without top-k, they
    often already hold top_p of the mass); rows where it does not are settled exactly over the
    whole vocabulary -- never a full sort (one sort of 64 x 49k floats takes a second on a
    CPU): on CPU by bisection, run only when a row needs it (a device conditional); in an
    accelerator's "top_p" variant by a radix search for every row, with no conditional.
    """
    v = scaled.shape[-1]
    filtering = None if s.variant is None else s.variant.filtering
    exact = filtering == "top_p"  # the host knows some row may need the search: no candidates
    inside = True if filtering == "top_k" else None  # None: the device decides (CPU)
    top_k_on = (s.top_k > 0)[:, None]  # [B, 1]; a row without top-k keeps every token
    k = jnp.where(top_k_on, jnp.minimum(s.top_k[:, None], v), v)  # [B, 1]

    def floor():
        # Below hi - 128 a weight is 0 in float32 (and banned tokens sit at -1e30): searching
        # there would only cost precision.
        return jnp.maximum(jnp.min(scaled, axis=-1, keepdims=True), hi - 128.0)

    def mass_from(t):  # [B, 1]: the weight of the tokens at or above t
        return jnp.sum(jnp.where(scaled >= t, weights, 0.0), -1, keepdims=True)

    top_p_on = s.top_p[:, None] < 1.0
    if exact:
        lo = floor()
        kth = jnp.where(top_k_on, radix_search(scaled, None, k.astype(jnp.float32), lo), -jnp.inf)
        target = s.top_p[:, None] * mass_from(kth)
        pth = radix_search(scaled, weights, target, jnp.maximum(kth, lo))
        return jnp.maximum(kth, jnp.where(top_p_on, pth, -jnp.inf))

    c = min(candidates, v)
    best = best_values(scaled, c)  # [B, C] descending
    kth = jnp.take_along_axis(best, jnp.minimum(k, c) - 1, axis=-1)
    k_inside = ~top_k_on | (k <= c)

    def k_search(kth):
        kth_x = _bisect(floor(), hi, lambda t: jnp.sum(scaled >= t, -1, keepdims=True) >= k)
        return jnp.where(k_inside, kth, kth_x)

    kth = branch(inside, jnp.all(k_inside), lambda x: x, k_search, kth)
    kth = jnp.where(top_k_on, kth, -jnp.inf)  # [B, 1]

    # Top-p over the top-k: the smallest set of its best tokens reaching a share of its mass
    # (a row without top-k: the whole row's; with one, counted only where some row has both).
    whole = jnp.sum(weights, -1, keepdims=True)
    top_k_mass = branch(
        inside, jnp.any(top_k_on & top_p_on), mass_from, lambda _: jnp.zeros_like(whole), kth
    )
    target = s.top_p[:, None] * jnp.where(top_k_on, top_k_mass, whole)
    p = jnp.where(best >= kth, jnp.exp(best - hi), 0.0)  # [B, C]
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each candidate
    pth = jnp.min(jnp.where((before < target) & (best >= kth), best, jnp.inf), -1, keepdims=True)
    within = top_k_on & (k <= c)  # the whole top-k is among the candidates, so its nucleus too
    p_inside = ~top_p_on | within | (jnp.sum(p, axis=-1, keepdims=True) >= target)

    def p_search(pth):
        pth_x = _bisect(jnp.maximum(kth, floor()), hi, lambda t: mass_from(t) >= target)
        return jnp.where(p_inside, pth, pth_x)

    pth = branch(inside, jnp.all(p_inside), lambda x: x, p_search, pth)
    return jnp.maximum(kth, jnp.where(top_p_on, pth, -jnp.inf))


BEST_BLOCK = 16  # best_values: the vocabulary read in blocks of this many tokens


def best_values(x: jax.Array, c: int) -> jax.Array:
    """The c largest values of each row, descending (lax.top_k's values). [B, V] -> [B, C].

    In two stages, as top_k's cost grows with the row it reads: the c largest lie in the c
    blocks of BEST_BLOCK tokens with the largest maxima (a value among the c largest makes its
    block's maximum at least as large, and at most c blocks can hold them), so top_k reads
    the blocks' maxima, then those blocks' tokens."""
    b, v = x.shape
    nb = -(-v // BEST_BLOCK)
    if nb <= c:
        return jax.lax.top_k(x, c)[0]
    blocks = jnp.pad(x, ((0, 0), (0, nb * BEST_BLOCK - v)), constant_values=-jnp.inf)
    blocks = blocks.reshape(b, nb, BEST_BLOCK)
    picked = jax.lax.top_k(jnp.max(blocks, -1), c)[1]  # [B, C]
    tokens = jnp.take_along_axis(blocks, picked[:, :, None], axis=1).reshape(b, c * BEST_BLOCK)
    return jax.lax.top_k(tokens, c)[0]


RADIX_BITS = 4  # a radix search settles this many bits of the answer per pass


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 that orders as the floats do (-0.0 taken as +0.0)."""
    i = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _from_order_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def radix_search(
    x: jax.Array,
    weights: jax.Array | None,
    target: jax.Array,
    floor: jax.Array,
) -> jax.Array:
    """The largest of each row's values t >= floor whose F(t) reaches target, where F(t) is the
    number (`weights` None) or the weight of the row's values >= t; `floor` where none does.
    x, weights [B, V]; target, floor [B, 1] -> [B, 1].

    Exact, with no sort, no conditional and no loop the device decides: the answer's 32 bits
    (as an order-preserving integer key, counted up from the floor's) are settled RADIX_BITS at
    a time, each pass counting F at the 2**RADIX_BITS - 1 next candidates at once: 8 passes
    over the row where a bisection takes 32, and exact where a bisection on the value is only
    as fine as its last step (neighbouring floats near 0). An accelerator's passes cost their
    reads of the row; on XLA:CPU each threshold costs a pass, so CPU bisects instead."""
    keys = _order_key(x)  # [B, V]
    base = _order_key(floor)  # [B, 1]
    f = jnp.ones_like(x) if weights is None else weights
    f = jnp.where(keys >= base, f, 0.0)  # values below the floor count for nothing
    # Distance above the floor's key (int32 arithmetic wraps; as uint32 it is exact).
    above = jax.lax.bitcast_convert_type(keys - base, jnp.uint32)  # [B, V]
    digits = jnp.arange(1, 2**RADIX_BITS, dtype=jnp.uint32)  # [D]

    answer = jnp.zeros(base.shape, jnp.uint32)  # [B, 1]: the bits settled so far
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):  # unrolled: 8 passes
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
