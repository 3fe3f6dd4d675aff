"""Where each scheduled token sits in the padded flat batch: decodes per token, prefill in blocks.

A bucket of T tokens is split statically into region A (the first A tokens: the per-token
attention path) and NB query blocks of Bq tokens (`attention/xla_prefill.py`):

    A = align(min(T, max_num_seqs), Bq)       (all of T when that leaves no block)
    [ d d d d . . . . | p p p p p . . . | p p p p p p p p | p p . . . . . . | . . . ]
      region A: decodes  run 1, 5 tokens    run 2, 10 tokens: 2 blocks          padding

Decodes (runs of one token) are packed at the front of region A; every prefill run starts a
block and is padded to whole blocks. A bucket with no blocks takes the whole step per token,
in plan order (as before blocks existed).

Alignment costs up to Bq - 1 padding tokens per prefill run, and region A is there in every
bucket. The scheduler therefore counts a prefill run of n > 1 tokens as align(n, Bq) against its
token budget (`prefill_granularity`), so the block region of the top rung, A +
align(max_num_batched_tokens, Bq), holds every plan it makes. (The runner used to absorb the
padding with a "worst case" rung of A + budget + R * (Bq - 1) tokens: a full step of a few
mixed-length prompts overflowed the top rung by a block or two and ran in a bucket three times
its size, 3.5-4 s instead of ~1 s on CPU.) The ladder's top rungs are "one prefill chunk plus
decodes": A + 1/2, 3/4 and all of max_num_batched_tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def region_a(bucket: int, max_num_seqs: int, query_block: int) -> int:
    """Tokens of `bucket` that take the per-token path; the rest is whole query blocks."""
    if query_block <= 1:
        return bucket
    return min(align(min(bucket, max_num_seqs), query_block), bucket)


def prefill_granularity(max_num_batched_tokens: int, max_num_seqs: int, query_block: int) -> int:
    """The scheduler's unit for prefill runs: Bq when the largest bucket has query blocks, 1 when
    every token of every bucket goes per token."""
    top = max_num_batched_tokens
    return query_block if region_a(top, max_num_seqs, query_block) < top else 1


def token_buckets(
    max_num_batched_tokens: int, max_num_seqs: int, query_block: int, smallest: int = 8
) -> tuple[int, ...]:
    """Bucket sizes: smallest, 2 x smallest, ... up to max_num_batched_tokens, then the blocked
    top rungs. The runner starts at 1 on CPU, where a step's matmuls cost about as much per
    padding row as per real one (SmolLM2: 30 layers at 1 row ~16 ms, at 8 rows ~34 ms; one
    stream decoded ~30% slower in a bucket of 8), and at 8 on accelerators."""
    sizes, t = [], smallest
    while t < max_num_batched_tokens:
        sizes.append(t)
        t *= 2
    top = max_num_batched_tokens
    a = region_a(top, max_num_seqs, query_block)
    if a >= top:  # no blocks even in the largest bucket: every plan fits it per token
        return (*sizes, top)
    # One prefill chunk (and decodes) of half, three quarters or all of the budget: a follow-up
    # turn's few hundred new tokens should not pay attention for a full chunk of padding blocks.
    # The last holds every plan of a scheduler that counts prefill runs in whole blocks.
    chunks = {a + align(top * k // 4, query_block) for k in (2, 3, 4) if top * k // 4 > a}
    return tuple(sorted({*sizes, *chunks}))


@dataclasses.dataclass
class Placement:
    """The offsets of a plan's runs in one bucket, and the query-block metadata."""

    bucket: int
    starts: list[int]  # flat offset of each run's first token, in plan order
    block_rows: np.ndarray  # [NB] int32
    block_lens: np.ndarray  # [NB] int32


def place(
    run_lengths: list[int],
    run_rows: list[int],
    bucket: int,
    max_num_seqs: int,
    query_block: int,
    per_token: list[bool] | None = None,
) -> Placement | None:
    """Lays the runs out in `bucket`, or None when they do not fit it. `per_token[i]`: run i
    takes region A like decodes, each token attending up to its own position (a token and its
    speculative drafts: a verification costs what its decodes would, no query-block padding)."""
    per_token = per_token or [False] * len(run_lengths)
    a = region_a(bucket, max_num_seqs, query_block)
    nb = (bucket - a) // max(query_block, 1)
    block_rows = np.zeros(nb, np.int32)
    block_lens = np.zeros(nb, np.int32)
    if nb == 0:
        if sum(run_lengths) > bucket:
            return None
        starts = [int(x) for x in np.cumsum([0, *run_lengths])[:-1]]
        return Placement(bucket, starts, block_rows, block_lens)
    starts: list[int] = []
    decode_at, block = 0, 0
    for n, row, alone in zip(run_lengths, run_rows, per_token, strict=True):
        if n == 1 or alone:
            if decode_at + n > a:
                return None
            starts.append(decode_at)
            decode_at += n
            continue
        need = -(-n // query_block)
        if block + need > nb:
            return None
        starts.append(a + block * query_block)
        block_rows[block : block + need] = row
        block_lens[block : block + need] = np.minimum(
            query_block, n - query_block * np.arange(need)
        )
        block += need
    return Placement(bucket, starts, block_rows, block_lens)
