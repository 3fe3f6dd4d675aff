"""`SamplingBatch`: the sampler's per-row settings, built from the sequences of one step.

The runner hands the sampler the sequences that reached the end of their known tokens; this
module turns their `SamplingParams` (and, for penalties, their token history) into fixed-width
host arrays, one row per sequence and greedy padding rows, which the sampler's one compiled
program reads. Nothing here is per request on the device: every mix of settings is data.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from jinfer.scheduler.sequence import Sequence
from jinfer.structured.bitmask import mask_width

NEG_INF = -1e30  # a banned token's logit bias
# Top-k and top-p read this many best tokens first (no full-vocabulary sort); a batch whose every
# filtering row has a top-k within them never needs the exact search beyond (`SamplerVariant`).
CANDIDATES = 128
FILTERINGS = ("none", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class SamplerVariant:
    """Which of the sampler's parts a batch's rows use, decided on the host when the step is
    planned. On accelerators each variant is a program of its own (warm-up builds them all),
    so the device never branches on a batch's settings; on CPU, where a conditional costs the
    host nothing, one program decides on the device (`SamplingBatch.variant` is None)."""

    penalties: bool  # some row has repetition, presence or frequency penalties
    # "none"; "top_k": every filtering row has a top-k within CANDIDATES (and maybe a top-p,
    # which applies within its top-k); "top_p": the others, which may need an exact search
    # beyond the candidates (its program runs one for every row: `sample/filtering.py`)
    filtering: str


# Width of the per-row logit-bias table: MAX_LOGIT_BIAS entries plus MAX_STOP_TOKEN_IDS bans plus
# the model's EOS ids. One fixed width (unused entries are -1 and dropped) keeps the number of
# sampler programs down; the scatter of [rows, 512] is noise next to the [rows, V] softmax.
BIAS_WIDTH = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] i32; 0 = off
    top_p: jax.Array  # [B] f32; 1 = off
    min_p: jax.Array  # [B] f32; 0 = off
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    seed_lo: jax.Array  # [B] u32
    seed_hi: jax.Array  # [B] u32
    counter: jax.Array  # [B] i32: index of the token being sampled
    bias_ids: jax.Array  # [B, NB] i32; -1 = unused (min_tokens bans, logit_bias)
    bias_vals: jax.Array  # [B, NB] f32
    history: jax.Array  # [B, Lh] i32: prompt + output ids, -1 padded (penalties only)
    history_is_output: jax.Array  # [B, Lh] bool
    # [B, W] i32: each row's allowed tokens as bits (structured output: `structured/bitmask.py`),
    # all ones for a row without a constraint; a [B, 1] stub when no row has one (a program of
    # its own: a free batch never pays for the mask)
    bitmask: jax.Array
    want_logprobs: jax.Array  # [] bool: any row asked for top-N logprobs
    use_penalties: jax.Array  # [] bool
    variant: SamplerVariant | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        rows: int,
        history_len: int,
        decide_on_host: bool = False,
        bitmask: np.ndarray | None = None,
    ) -> SamplingBatch:
        """The sampling settings of `seqs` in `rows` padded rows (padding rows are greedy);
        `history_len`: the penalty history's width (the engine's max_model_len);
        `decide_on_host`: settle the batch's `SamplerVariant` here (accelerators);
        `bitmask` [rows, W]: the rows' allowed tokens, when some row is constrained."""
        f32 = lambda v: np.full(rows, v, np.float32)  # noqa: E731
        temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
        rep, pres, freq = f32(1.0), f32(0.0), f32(0.0)
        top_k = np.zeros(rows, np.int32)
        seed_lo = np.zeros(rows, np.uint32)
        seed_hi = np.zeros(rows, np.uint32)
        counter = np.zeros(rows, np.int32)
        biases = [_logit_bias(s) for s in seqs]
        bias_ids = np.full((rows, BIAS_WIDTH), -1, np.int32)
        bias_vals = np.zeros((rows, BIAS_WIDTH), np.float32)
        want_logprobs = use_penalties = False
        earlier: dict[int, int] = {}  # a verification's rows: one per position, in order
        for i, s in enumerate(seqs):
            p = s.params
            temperature[i], top_p[i], min_p[i], top_k[i] = p.temperature, p.top_p, p.min_p, p.top_k
            rep[i], pres[i], freq[i] = (
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            )
            seed_lo[i], seed_hi[i] = split_seed(s.seed)
            # The draw of output token j is keyed by j: a verification's row r samples token
            # num_output_tokens + r with the very draw decoding would use for it.
            counter[i] = s.num_output_tokens + earlier.get(id(s), 0)
            earlier[id(s)] = earlier.get(id(s), 0) + 1
            bias_ids[i, : len(biases[i])] = list(biases[i])
            bias_vals[i, : len(biases[i])] = list(biases[i].values())
            want_logprobs |= p.logprobs is not None
            use_penalties |= p.uses_penalties
        history, is_output = _history(seqs if use_penalties else [], rows, history_len)
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            seed_lo=seed_lo,
            seed_hi=seed_hi,
            counter=counter,
            bias_ids=bias_ids,
            bias_vals=bias_vals,
            history=history,
            history_is_output=is_output,
            bitmask=np.full((rows, 1), -1, np.int32) if bitmask is None else bitmask,
            want_logprobs=np.bool_(want_logprobs),
            use_penalties=np.bool_(use_penalties),
            variant=_variant(seqs, use_penalties) if decide_on_host else None,
        )

    @classmethod
    def warmup_variants(
        cls, rows: int, history_len: int, vocab_size: int, decide_on_host: bool = False
    ) -> list[SamplingBatch]:
        """One batch per program the sampler may run for `rows`: without and with the penalty
        history, without and with a token mask (CPU: always with one), and on the host's side
        every `SamplerVariant` (warm-up compiles them all)."""
        base = cls.from_sequences([], rows, history_len)
        out = []
        widths = (1, mask_width(vocab_size)) if decide_on_host else (mask_width(vocab_size),)
        for length, width in itertools.product((1, history_len), widths):
            arrays = dict(
                history=np.full((rows, length), -1, np.int32),
                history_is_output=np.zeros((rows, length), np.bool_),
                bitmask=np.full((rows, width), -1, np.int32),
            )
            if not decide_on_host:
                out.append(dataclasses.replace(base, **arrays))
                continue
            for filtering in FILTERINGS:
                variant = SamplerVariant(penalties=length > 1, filtering=filtering)
                out.append(dataclasses.replace(base, **arrays, variant=variant))
        return out


def _variant(seqs: list[Sequence], use_penalties: bool) -> SamplerVariant:
    filters = [
        s.params
        for s in seqs
        if s.params.temperature > 0 and (s.params.top_k or s.params.top_p < 1)
    ]
    if not filters:
        filtering = "none"
    elif all(0 < p.top_k <= CANDIDATES for p in filters):  # their nuclei lie within too
        filtering = "top_k"
    else:
        filtering = "top_p"
    return SamplerVariant(penalties=use_penalties, filtering=filtering)


def _logit_bias(seq: Sequence) -> dict[int, float]:
    """The request's logit_bias, plus a ban on stop tokens while min_tokens is not reached."""
    p = seq.params
    bias = dict(p.logit_bias)
    if seq.num_output_tokens < p.min_tokens:
        for t in list(p.stop_token_ids) + list(seq.eos_token_ids):
            bias[t] = NEG_INF
    return bias


def _history(seqs: list[Sequence], rows: int, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt + output ids of each row, for penalties; a [rows, 1] stub when none uses them."""
    length = history_len if seqs else 1
    history = np.full((rows, length), -1, np.int32)
    is_output = np.zeros((rows, length), np.bool_)
    for i, s in enumerate(seqs):
        ids = s.all_token_ids()[:length]
        history[i, : len(ids)] = ids
        is_output[i, s.num_prompt_tokens : len(ids)] = True
    return history, is_output


def split_seed(seed: int) -> tuple[np.uint32, np.uint32]:
    return np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
