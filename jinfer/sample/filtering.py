"""Top-k and top-p as one logit threshold per row, without sorting the vocabulary.

The sampler keeps a row's tokens whose (temperature-scaled) logit reaches the row's threshold.
Top-k and top-p read the best CANDIDATES tokens first. Rows whose answer lies beyond them are
settled exactly over the whole vocabulary: on accelerators, where a conditional would stop the
device for the host, by a radix search of fixed length (`radix_search`) for every row of the
batches the host finds may need it; on CPU, a top-k by bisection, run only when some row needs
it (a device conditional), and a nucleus by testing the drawn token (`sample/nucleus.py`).
"""

from __future__ import annotations

from typing import NamedTuple

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


class Filters(NamedTuple):
    """What top-k and top-p keep of each row."""

    threshold: jax.Array  # [B, 1]: scaled logits below it are dropped
    # [B]: top_p, where the row's nucleus is left to the draw (CPU: `sample/nucleus.py`); inf
    # where the threshold settles it
    share: jax.Array
    mass: jax.Array  # [B]: what `share` is a share of: a top-k's mass, or 0 for the row's whole
    listed: jax.Array  # [B] bool: every token the row keeps is among its candidates (CPU)
    best: jax.Array  # [B, C]: the candidates' scaled logits, descending, -inf padded (CPU)
    ids: jax.Array  # [B, C] int32: their tokens

    @classmethod
    def none(cls, b: int, c: int) -> Filters:
        """Rows that keep every token."""
        unset = jnp.full((b,), jnp.inf)
        best = jnp.full((b, c), -jnp.inf)
        ids = jnp.zeros((b, c), jnp.int32)
        return cls(jnp.full((b, 1), -jnp.inf), unset, jnp.zeros((b,)), unset < 0, best, ids)


def top_k_top_p_threshold(
    x: jax.Array,
    temp: jax.Array,
    hi: jax.Array,
    s: SamplingBatch,
    candidates: int = CANDIDATES,
) -> Filters:
    """What top-k and top-p keep of each row: a threshold on its scaled logits x / temp (x
    [B, V], temp [B, 1], row max `hi` [B, 1]); on CPU, also the nucleus left to the draw and
    the candidates that hold all a row keeps.

    Top-p applies to what top-k keeps, renormalized (as vLLM and transformers do): the smallest
    set of the row's top-k whose share of the top-k's mass reaches top_p. Never a full sort
    (one sort of 64 x 49k floats takes a second on a CPU):
    - an accelerator's "top_p" variant finds both thresholds exactly by radix searches, for
      every row, with no conditional;
    - its "top_k" variant reads them from the `candidates` best tokens (a top-k within them
      holds its nucleus too);
    - CPU reads the fewest candidates that hold every row's top-k (none for a batch without
      top-k), bisects for a top-k beyond them (a device conditional: only when a row needs
      it), and leaves any other nucleus to the draw: the drawn token is tested, and redrawn if
      outside, where finding the nucleus's edge would take ~32 passes.
    """
    b, v = x.shape
    filtering = None if s.variant is None else s.variant.filtering
    # [B, 1]; a row without top-k keeps every token, and a greedy row's filters filter nothing
    sampled = (s.temperature > 0)[:, None]
    top_k_on = (s.top_k > 0)[:, None] & sampled
    k = jnp.where(top_k_on, jnp.minimum(s.top_k[:, None], v), v)  # [B, 1]
    top_p_on = (s.top_p[:, None] < 1.0) & sampled

    # The scaled logits and their weights [B, V] are computed where they are read: an array a
    # device conditional closes over is written out in full, whichever branch runs.
    def scaled():
        return x / temp

    def floor():
        # Below hi - 128 a weight is 0 in float32 (and banned tokens sit at -1e30): searching
        # there would only cost precision.
        return jnp.maximum(jnp.min(scaled(), axis=-1, keepdims=True), hi - 128.0)

    def mass_from(t):  # [B, 1]: the weight of the tokens at or above t
        y = scaled()
        return jnp.sum(jnp.where(y >= t, jnp.exp(y - hi), 0.0), -1, keepdims=True)

    def settled(threshold):  # an accelerator's answer: the threshold is all
        return Filters.none(b, 1)._replace(threshold=threshold)

    if filtering == "top_p":  # the host knows some row may need the search: no candidates
        y = scaled()
        lo = floor()
        kth = jnp.where(top_k_on, radix_search(y, None, k.astype(jnp.float32), lo), -jnp.inf)
        target = s.top_p[:, None] * mass_from(kth)
        pth = radix_search(y, jnp.exp(y - hi), target, jnp.maximum(kth, lo))
        return settled(jnp.maximum(kth, jnp.where(top_p_on, pth, -jnp.inf)))

    inside = True if filtering == "top_k" else None  # None: the device decides (CPU)
    # The candidates are read from x: x / temp rounds monotonically, so the scaled logits' k-th
    # value is x's over temp, and the scaled logits need not be written out.
    c = min(candidates, v)
    if inside:  # every filtering row's top-k lies within the candidates
        best, ids = best_tokens(x, c)
        edge = best[:, -1:]
    else:  # CPU: the fewest candidates that hold every row's top-k
        best, ids, edge = _cpu_candidates(x, jnp.where(top_k_on, k, 0), c)
    best, edge = best / temp, edge / temp  # [B, C], [B, 1]
    kth = jnp.take_along_axis(best, jnp.minimum(k, c) - 1, axis=-1)
    k_inside = ~top_k_on | (k <= c)

    def k_search(kth):
        y = scaled()
        kth_x = _bisect(floor(), hi, lambda t: jnp.sum(y >= t, -1, keepdims=True) >= k)
        return jnp.where(k_inside, kth, kth_x)

    kth = branch(inside, jnp.all(k_inside), lambda x: x, k_search, kth)
    kth = jnp.where(top_k_on, kth, -jnp.inf)  # [B, 1]

    # Top-p over a top-k within the candidates: the smallest set of its best tokens reaching a
    # share of its mass. The candidates hold the top-k unless a token beyond them ties its
    # k-th value.
    p = jnp.where(best >= kth, jnp.exp(best - hi), 0.0)  # [B, C]
    held = jnp.sum(p, axis=-1, keepdims=True)  # [B, 1]
    ties_beyond = edge >= kth
    top_k_mass = branch(
        inside, jnp.any(top_k_on & top_p_on & ties_beyond), mass_from, lambda _: held, kth
    )
    target = s.top_p[:, None] * top_k_mass
    before = jnp.cumsum(p, axis=-1) - p  # mass strictly above each candidate
    pth = jnp.min(jnp.where((before < target) & (best >= kth), best, jnp.inf), -1, keepdims=True)
    within = top_k_on & (k <= c)  # the whole top-k is among the candidates, so its nucleus too
    threshold = jnp.maximum(kth, jnp.where(top_p_on & within, pth, -jnp.inf))
    if inside:  # (every filtering row's top-k is within)
        return settled(threshold)
    # Any other nucleus is left to the draw: of a row without top-k, a share of the row's whole
    # mass (0: the sampler has it from the draw); of a top-k beyond the candidates, of its mass.
    left = top_p_on & ~within
    share = jnp.where(left, s.top_p[:, None], jnp.inf)[:, 0]
    mass = jnp.where(top_k_on, top_k_mass, 0.0)[:, 0]
    listed = (within & ~ties_beyond)[:, 0]
    return Filters(threshold, share, mass, listed, best, ids)


# CPU's smaller candidate counts, tried before CANDIDATES: one over a power of two, so a top-k
# of 32 or 64 keeps a candidate past its k-th value (which shows no tie of it lies beyond).
CPU_CANDIDATES = (33, 65)


def _cpu_candidates(x: jax.Array, k: jax.Array, c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best values of each row and their tokens [B, C], descending, -inf padded: the fewest
    of CPU_CANDIDATES + (c,) that hold every row's top-k `k` [B, 1] (0: none) and one token
    more, or none at all for a batch without top-k (lax.top_k's cost grows with its count:
    0.9 ms for 32, 2.5 ms for 128 on 32 x 49152); and the edge [B, 1], the last real one."""
    sizes = [n for n in CPU_CANDIDATES if n < c] + [c]
    most = jnp.max(k)

    def read(n):
        def f(x):
            values, ids = best_tokens(x, n)
            pad = ((0, 0), (0, c - n))
            return jnp.pad(values, pad, constant_values=-jnp.inf), jnp.pad(ids, pad)

        def none(x):
            return jnp.full((x.shape[0], c), -jnp.inf, x.dtype), jnp.zeros(
                (x.shape[0], c), jnp.int32
            )

        return f if n else none

    which = jnp.where(most == 0, 0, 1 + jnp.sum(most >= jnp.asarray(sizes[:-1])))
    best, ids = jax.lax.switch(which, [read(n) for n in [0] + sizes], x)
    # (The edge read out here: returned from the switch's branches too, it made the switch
    # ~3x slower on XLA:CPU.)
    n = jnp.asarray([1] + sizes)[which]
    edge = jax.lax.dynamic_slice_in_dim(best, n - 1, 1, axis=1)  # [B, 1]
    return best, ids, edge


BEST_BLOCK = 16  # best_tokens: the vocabulary read in blocks of this many tokens


def best_tokens(x: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """The c largest values of each row, descending, and their tokens (lax.top_k's values; its
    indices up to the order of ties). [B, V] -> [B, C], [B, C] int32.

    In two stages, as top_k's cost grows with the row it reads: the c largest lie in the c
    blocks of BEST_BLOCK tokens with the largest maxima (a value among the c largest makes its
    block's maximum at least as large, and at most c blocks can hold them), so top_k reads
    the blocks' maxima, then those blocks' tokens."""
    b, v = x.shape
    nb = -(-v // BEST_BLOCK)
    if nb <= c:
        values, ids = jax.lax.top_k(x, c)
        return values, ids.astype(jnp.int32)
    blocks = jnp.pad(x, ((0, 0), (0, nb * BEST_BLOCK - v)), constant_values=-jnp.inf)
    blocks = blocks.reshape(b, nb, BEST_BLOCK)
    picked = jax.lax.top_k(jnp.max(blocks, -1), c)[1]  # [B, C]
    tokens = jnp.take_along_axis(blocks, picked[:, :, None], axis=1).reshape(b, c * BEST_BLOCK)
    values, at = jax.lax.top_k(tokens, c)
    ids = jnp.take_along_axis(picked, at // BEST_BLOCK, axis=-1) * BEST_BLOCK + at % BEST_BLOCK
    return values, ids.astype(jnp.int32)


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
