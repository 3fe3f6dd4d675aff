"""Batched sampling on device: a fixed set of compiled programs serves every mix of settings.

Rows are requests. The expensive optional parts (penalties, the random draw, the top-k/top-p
threshold, top-N logprobs) run only for batches that use them, and no setting ever triggers a new
compile. Which parts a batch uses is decided on the host on accelerators (`SamplerVariant`: one
program per variant, none of them branching on the batch, since a conditional there makes the
device wait for the host), and on the device on CPU (one program, `lax.cond`s: they cost the
host nothing). Nothing sorts the vocabulary: top-k/top-p are one threshold per row, read from
the best CANDIDATES tokens or searched exactly beyond them (`sample/filtering.py`).

A sampled row draws one uniform number from the request's own seed folded with its output index
(so a seeded request draws the same tokens whatever else shares the batch) and inverts the
cumulative distribution of the kept tokens (`sample/draw.py`). Greedy rows take the argmax.
CPU draws a row whose kept tokens all lie among its candidates from those alone, and a row
whose nucleus lies beyond them from the whole row, redrawing a token outside the nucleus
(`sample/nucleus.py`): for a seed, other tokens than an accelerator's, from the same
distribution.
Logprobs are those of the model's raw distribution (vLLM's default), before any processing.
A constrained row (structured output) has every token its grammar forbids set to -inf after
penalties and biases, before temperature and the filters: on accelerators a batch with such
rows runs the program built for a full-width token mask, any other the one for a stub; CPU's one
program always takes the full mask and skips it when no row is constrained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jinfer.runner import packing
from jinfer.sample.draw import inverse_cdf, inverse_cdf_listed, uniform
from jinfer.sample.filtering import Filters, branch, top_k_top_p_threshold
from jinfer.sample.metadata import CANDIDATES, SamplingBatch
from jinfer.sample.nucleus import redraw_outside_nucleus
from jinfer.sampling_params import MAX_LOGPROBS
from jinfer.scheduler.sequence import Sequence
from jinfer.structured.bitmask import MaskFiller, allocate, apply_bitmask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32: logprob of the sampled token
    top_ids: jax.Array  # [B, MAX_LOGPROBS] i32
    top_logprobs: jax.Array  # [B, MAX_LOGPROBS] f32


def _apply_penalties(logits: jax.Array, s: SamplingBatch) -> jax.Array:
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    ids = jnp.where(s.history >= 0, s.history, v)  # out-of-range -> dropped
    seen = jnp.zeros((b, v), jnp.bool_).at[rows, ids].set(True, mode="drop")
    counts = (
        jnp.zeros((b, v), jnp.float32)
        .at[rows, ids]
        .add(s.history_is_output.astype(jnp.float32), mode="drop")
    )
    rep = s.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - s.frequency_penalty[:, None] * counts
    return logits - s.presence_penalty[:, None] * (counts > 0)


def _sample_rows(x: jax.Array, s: SamplingBatch, greedy: jax.Array, top: jax.Array) -> jax.Array:
    """Tokens drawn from softmax(x / temperature), filtered by top-k, top-p and min-p. [B].
    `greedy` [B]: the argmax tokens, `top` [B, 1]: the row maxima of x [B, V]."""
    b, v = x.shape
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    hi = top / temp  # max(x / t) is max(x) / t exactly (division rounds monotonically)
    needs_threshold = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0)))
    filtering = None if s.variant is None else s.variant.filtering != "none"
    # (Conditionals here take the logits, not the scaled logits or their weights: an operand
    # of a conditional is written out in full, and these are recomputed where they are read.)
    f = branch(
        filtering,
        needs_threshold,
        top_k_top_p_threshold,
        lambda *_: Filters.none(b, min(CANDIDATES, v)),
        x,
        temp,
        hi,
        s,
    )
    u = jax.vmap(uniform)(s.seed_lo, s.seed_hi, s.counter)
    if s.variant is not None:  # an accelerator's: the threshold settled every row
        return inverse_cdf(_kept(x / temp, hi, f.threshold, s.min_p), u, greedy)[0]

    # CPU: a row whose every kept token is among its candidates draws from them alone; the
    # others (when a batch has any) draw from the whole row, their nucleus tested after.
    listed = inverse_cdf_listed(_kept(f.best, hi, f.threshold, s.min_p), f.ids, u, greedy)
    whole = jnp.any((s.temperature > 0) & ~f.listed)
    drawn = branch(
        None, whole, lambda x: _draw_whole(x, temp, hi, f, s, u, greedy), lambda _: listed, x
    )
    return jnp.where(f.listed, listed, drawn)


def _kept(scaled: jax.Array, hi: jax.Array, threshold: jax.Array, min_p: jax.Array) -> jax.Array:
    """The weights exp(scaled - hi) of the tokens top-k, top-p and min-p keep, 0 for the others.
    scaled [B, N], hi and threshold [B, 1], min_p [B]."""
    weights = jnp.exp(scaled - hi)  # max 1
    # min-p: relative to the best token's probability, i.e. to its weight of 1.
    drop = (scaled < threshold) | (weights < min_p[:, None])
    return jnp.where(drop, 0.0, weights)


def _draw_whole(x, temp, hi, f: Filters, s: SamplingBatch, u, greedy) -> jax.Array:
    """CPU's draw over whole rows [B], each redrawn while outside a nucleus the threshold left
    to it (`sample/nucleus.py`): a share of its top-k's mass, or of the row's whole mass (what
    the draw kept, unless min-p dropped some of it)."""
    kept = _kept(x / temp, hi, f.threshold, s.min_p)  # [B, V]
    tokens, kept_mass = inverse_cdf(kept, u, greedy)
    left = f.share < jnp.inf
    whole = branch(
        None,
        jnp.any(left & (f.mass == 0) & (s.min_p > 0)),
        lambda x: jnp.sum(jnp.exp(x / temp - hi), axis=-1),
        lambda _: kept_mass,
        x,
    )
    target = f.share * jnp.where(f.mass > 0, f.mass, whole)
    seeds = (s.seed_lo, s.seed_hi, s.counter)
    return branch(
        None,
        jnp.any(left),
        lambda t: redraw_outside_nucleus(kept, t, target, greedy, *seeds),
        lambda t: t,
        tokens,
    )


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index of the maximum; of the first NaN if any), as a
    max and a min: XLA:CPU's fused value-and-index reduction is ~2x slower on [B, V] logits
    (32 x 49k: 3.3 against 1.6 ms, a greedy step's largest sampler cost). [B] int32."""
    m = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == m) | jnp.isnan(x)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


@jax.jit
def sample(logits: jax.Array, s: SamplingBatch) -> SampleOutput:
    """logits [B, V] float32 -> one token per row, with logprobs.

    With a host-decided `s.variant`, the parts a greedy row ignores (the draw, the top-N
    logprobs) run for every batch, branch-free: on an accelerator they cost less than a
    conditional's round trip to the host."""
    b, v = logits.shape
    on_host = s.variant is not None
    penalties = s.variant.penalties if on_host else None
    x = branch(penalties, s.use_penalties, _apply_penalties, lambda x, _: x, logits, s)
    rows = jnp.arange(b)[:, None]
    bias_ids = jnp.where(s.bias_ids >= 0, s.bias_ids, v)
    x = x.at[rows, bias_ids].add(s.bias_vals, mode="drop")
    if s.bitmask.shape[1] > 1:  # some row may be constrained
        # (CPU's one program always has the mask, and skips it when no row is constrained)
        masked = None if on_host else jnp.any(s.bitmask != -1)
        x = branch(True if on_host else None, masked, apply_bitmask, lambda x, _: x, x, s.bitmask)

    greedy = argmax(x)
    # The row maxima, read at the argmax (NaN where a row has one, as jnp.max gives): a reduction
    # of its own here, beside argmax's, made XLA:CPU's greedy program ~10% slower.
    top = jnp.take_along_axis(x, greedy[:, None], axis=-1)  # [B, 1]
    sampled = branch(
        True if on_host else None,
        jnp.any(s.temperature > 0),
        _sample_rows,
        lambda x, s, g, _: g,
        x,
        s,
        greedy,
        top,
    )
    tokens = jnp.where(s.temperature > 0, sampled, greedy)

    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, 1]
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse[:, 0]
    top_vals, top_ids = branch(
        True if on_host else None,
        s.want_logprobs,
        lambda lg: tuple(jax.lax.top_k(lg, MAX_LOGPROBS)),
        lambda lg: (
            jnp.zeros((b, MAX_LOGPROBS), lg.dtype),
            jnp.zeros((b, MAX_LOGPROBS), jnp.int32),
        ),
        logits,
    )
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_vals - lse)


# The runner's entry: the batch built from the sequences, packed into one int32 and one float32
# buffer (`runner/packing.py`: one host-to-device copy each), and the output handed back as one
# [rows, 2 + 2 * MAX_LOGPROBS] float32 array, int columns bit-cast (one device-to-host copy):
#
#     column 0: token (int32 bits)   1: its logprob   2..: top ids (int32 bits)   then top logprobs
#
# and the tokens again, padded to [max_rows] int32, for the next step to read on the device.
def _sample_packed(logits, layout, ibuf, fbuf, max_rows):
    out = sample(logits, packing.unpack(layout, ibuf, fbuf))
    as_f32 = lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)  # noqa: E731
    columns = [as_f32(out.tokens)[:, None], out.logprobs[:, None]]
    packed = jnp.concatenate(columns + [as_f32(out.top_ids), out.top_logprobs], axis=1)
    return packed, jnp.pad(out.tokens, (0, max_rows - out.tokens.shape[0]))


_sample_step = jax.jit(_sample_packed, static_argnums=(1, 4))


@dataclasses.dataclass
class Samples:
    """One step's sampled tokens on the host, one row per sequence that sampled."""

    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32: of each sampled token
    top_ids: np.ndarray | None  # [n, MAX_LOGPROBS] int32, when any row asked for logprobs
    top_logprobs: np.ndarray | None  # [n, MAX_LOGPROBS] float32


@dataclasses.dataclass
class PendingSamples:
    """Samples still on the device (the step is dispatched, perhaps still running)."""

    out: jax.Array  # [rows, 2 + 2 * MAX_LOGPROBS], see _sample_packed
    next_tokens: jax.Array  # [max_rows] int32: the sampled tokens, for the next step's inputs
    num_seqs: int
    want_logprobs: bool

    def fetch(self) -> Samples:
        """Blocks until the step is done; its samples on the host."""
        host = np.asarray(self.out)[: self.num_seqs]
        tokens = np.ascontiguousarray(host[:, 0]).view(np.int32)
        logprobs = np.ascontiguousarray(host[:, 1])
        top_ids = top_lps = None
        if self.want_logprobs:
            top_ids = np.ascontiguousarray(host[:, 2 : 2 + MAX_LOGPROBS]).view(np.int32)
            top_lps = np.ascontiguousarray(host[:, 2 + MAX_LOGPROBS :])
        return Samples(tokens, logprobs, top_ids, top_lps)


class Sampler:
    """Samples one token for each of a step's sequences from its logits row, on the device."""

    def __init__(self, history_len: int, max_rows: int, decide_on_host: bool = False) -> None:
        self.history_len = history_len  # the penalty history's width (max_model_len)
        self.max_rows = max_rows  # R: `next_tokens` has a row per request slot
        # Pick each batch's program on the host (accelerators: `SamplerVariant`), or let one
        # program branch on the device (CPU).
        self.decide_on_host = decide_on_host
        self._masks: MaskFiller | None = None  # llguidance's threads, from the first constraint
        self._free: dict[int, np.ndarray] = {}  # CPU: an all-ones mask per row count (read only)
        self.mirror: Any = None  # a process group's leader's `StepMirror` (runner/mirror.py)

    def sample(self, logits: jax.Array, seqs: list[Sequence]) -> PendingSamples:
        """Dispatches sampling for `seqs` (rows 0..len(seqs)-1 of `logits` [rows, V])."""
        rows, vocab = logits.shape
        batch = SamplingBatch.from_sequences(
            seqs, rows, self.history_len, self.decide_on_host, self._bitmask(seqs, rows, vocab)
        )
        out, next_tokens = self._run(logits, batch)
        return PendingSamples(out, next_tokens, len(seqs), bool(batch.want_logprobs))

    def _bitmask(self, seqs: list[Sequence], rows: int, vocab: int) -> np.ndarray | None:
        """[rows, W] allowed-token bits of the constrained rows (others all ones): filled by
        their matchers, then narrowed by their guards (allowed_token_ids, bad_words). When no
        row is constrained: None (accelerators: the program without a mask), or all ones (CPU:
        its one program skips the mask then; a program per width would double its compiles).
        A sequence that finished meanwhile (its previous token stopped it) keeps all ones: its
        sample is dropped."""
        live = [(i, s) for i, s in enumerate(seqs) if not s.is_finished]
        matched = [(s.matcher, i) for i, s in live if s.matcher is not None]
        guarded = [(s, i) for i, s in live if s.guards is not None]
        if not matched and not guarded:
            if self.decide_on_host:
                return None
            if rows not in self._free:
                self._free[rows] = allocate(rows, vocab)
            return self._free[rows]
        bitmask = allocate(rows, vocab)
        if matched:
            if self._masks is None:
                self._masks = MaskFiller()
            self._masks.fill(bitmask, matched)
        for s, i in guarded:  # (the output is read, and copied, only for bad words' starts)
            s.guards.apply(bitmask[i], s.known_output_token_ids() if s.guards.needs_history else [])
        return bitmask

    def warmup(self, logits: jax.Array) -> jax.Array:
        """Compiles the sampler's programs for logits of this shape [rows, V]; returns a
        `next_tokens` array like every later step's (for a step that reads none)."""
        rows, vocab = logits.shape
        variants = SamplingBatch.warmup_variants(rows, self.history_len, vocab, self.decide_on_host)
        for batch in variants:
            _, next_tokens = jax.block_until_ready(self._run(logits, batch))
        return next_tokens

    def lower(self, rows: int, vocab: int, lowering_platform: str) -> dict[str, jax.stages.Lowered]:
        """The sampler's programs for [rows, vocab] logits, lowered for `lowering_platform`."""
        logits = jax.ShapeDtypeStruct((rows, vocab), jnp.float32)
        out = {}
        variants = SamplingBatch.warmup_variants(rows, self.history_len, vocab, self.decide_on_host)
        for batch in variants:
            layout, ibuf, fbuf = packing.pack(batch)
            v = batch.variant
            name = f"sampler (history {batch.history.shape[1]}, mask {batch.bitmask.shape[1]}" + (
                f", {v.filtering})" if v is not None else ")"
            )
            on = dict(lowering_platforms=(lowering_platform,))
            args = (logits, layout, ibuf, fbuf, self.max_rows)
            out[name] = _sample_step.trace(*args).lower(**on)
        return out

    def _run(self, logits: jax.Array, batch: SamplingBatch) -> tuple[jax.Array, jax.Array]:
        layout, ibuf, fbuf = packing.pack(batch)
        if self.mirror is not None:
            self.mirror.sample(layout, ibuf, fbuf)
        return self.run_packed(logits, layout, ibuf, fbuf)

    def run_packed(
        self, logits: jax.Array, layout: packing.Layout, ibuf: np.ndarray, fbuf: np.ndarray
    ) -> tuple[jax.Array, jax.Array]:
        """Dispatches the sampler on a packed batch (a process group's followers call it with
        the leader's): the packed output and `next_tokens`."""
        if not logits.sharding.is_fully_replicated:
            # A tensor-parallel step's logits, split over the vocabulary, are gathered first
            # (vLLM gathers them too): the sampler reads whole rows. XLA's partitioning of the
            # sampler over split rows also miscompiled it: a one-row batch with a token mask
            # read token 0 from the packed output, whatever it had drawn.
            replicated = NamedSharding(logits.sharding.mesh, PartitionSpec())
            logits = jax.device_put(logits, replicated)
        return _sample_step(logits, layout, ibuf, fbuf, self.max_rows)
