"""Batched sampling on device: one compiled function serves every mix of settings.

Rows are requests. The expensive optional parts (penalties, the sort behind top-k/top-p, top-N
logprobs) sit behind `lax.cond`, so a batch that does not use them does not pay for them, and no
setting ever triggers a new compile.

Per-row randomness comes from the request's own seed folded with its output index, so a seeded
request draws the same tokens whatever else shares the batch. Greedy rows take the argmax.
Logprobs are those of the model's raw distribution (vLLM's default), before any processing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.sampling_params import MAX_LOGPROBS

NEG_INF = -1e30


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
    want_logprobs: jax.Array  # [] bool: any row asked for top-N logprobs
    use_penalties: jax.Array  # [] bool


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


def _top_k_top_p_threshold(scaled: jax.Array, s: SamplingBatch) -> jax.Array:
    """Per-row logit threshold below which tokens are dropped by top-k and top-p. [B, 1]."""
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < s.top_p[:, None]
    pth = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.maximum(kth, pth)


def _gumbel(seed_lo: jax.Array, seed_hi: jax.Array, counter: jax.Array, v: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed_lo), seed_hi), counter)
    return jax.random.gumbel(key, (v,), jnp.float32)


@jax.jit
def sample(logits: jax.Array, s: SamplingBatch) -> SampleOutput:
    """logits [B, V] float32 -> one token per row, with logprobs."""
    b, v = logits.shape
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = jax.lax.cond(s.use_penalties, _apply_penalties, lambda x, _: x, logits, s)
    rows = jnp.arange(b)[:, None]
    bias_ids = jnp.where(s.bias_ids >= 0, s.bias_ids, v)
    x = x.at[rows, bias_ids].add(s.bias_vals, mode="drop")

    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled = x / temp
    needs_sort = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0)))
    threshold = jax.lax.cond(
        needs_sort,
        _top_k_top_p_threshold,
        lambda y, _: jnp.full((b, 1), -jnp.inf, y.dtype),
        scaled,
        s,
    )
    probs = jax.nn.softmax(scaled, axis=-1)
    min_p_cut = s.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    drop = (scaled < threshold) | (probs < min_p_cut)
    scaled = jnp.where(drop, NEG_INF, scaled)
    noise = jax.vmap(_gumbel, in_axes=(0, 0, 0, None))(s.seed_lo, s.seed_hi, s.counter, v)
    sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
    tokens = jnp.where(s.temperature > 0, sampled, greedy)

    chosen = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    top_vals, top_ids = jax.lax.cond(
        s.want_logprobs,
        lambda lp: tuple(jax.lax.top_k(lp, MAX_LOGPROBS)),
        lambda lp: (
            jnp.zeros((b, MAX_LOGPROBS), lp.dtype),
            jnp.zeros((b, MAX_LOGPROBS), jnp.int32),
        ),
        raw_logprobs,
    )
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_vals)


def split_seed(seed: int) -> tuple[np.uint32, np.uint32]:
    return np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
