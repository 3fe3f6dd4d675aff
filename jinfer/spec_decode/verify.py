"""Which requests draft, and what a verification step accepted.

A request with d drafts runs its last token and the d drafts in one step, each of the d + 1
positions producing logits (the same sampler, one row each, `runner/model_runner.py`). Row i's
token is what the model says follows position i, so draft i is right when it equals row i's
token; the first wrong one, and everything after it, is rejected, and row k's token (after the
k accepted drafts) is the step's own new token. Greedy rows make this exact: the tokens are the
ones decoding without drafts would give.

Sampled rows too. A draft here is one token, not a distribution (q = one-hot), and rejection
sampling then accepts draft d with probability p(d) and otherwise draws the correction from
p with d removed, renormalized. Drawing x ~ p and accepting when x == d does exactly that: x
equals d with probability p(d), and given x != d it is distributed as p(y) / (1 - p(d)). Each
row draws with its own output position's random number (`sample/metadata.py`), so a seeded
request gets the very tokens it gets without drafts, and the output distribution is the
target model's.

The rejected drafts' KV slots hold garbage only past the request's computed tokens, which the
next step overwrites; they never reach the prefix cache (it indexes computed, known tokens
only).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jinfer.config.speculative import SpeculativeConfig
from jinfer.engine.stats import EngineStats
from jinfer.runner.model_runner import StepResult
from jinfer.scheduler.sequence import Sequence
from jinfer.spec_decode.budget import DraftBudget
from jinfer.spec_decode.ngram import NgramDrafter
from jinfer.spec_decode.suffix import SuffixDrafter

Drafter = NgramDrafter | SuffixDrafter


def make_drafter(spec: SpeculativeConfig) -> Drafter | None:
    """The proposer `spec` names; None without speculation."""
    if not spec.enabled:
        return None
    return {"ngram": NgramDrafter, "suffix": SuffixDrafter}[spec.method](spec)


def drafts_allowed(seq: Sequence) -> bool:
    """Requests whose next sample reads nothing of their history on the host (no grammar, no
    penalties, no bad words) and past min_tokens: every row of a verification then samples
    exactly what a decode at that position would, greedy or seeded (row r draws output token
    n + r's own random number, `sample/metadata.py`)."""
    p = seq.params
    return (
        not seq.needs_known_tokens
        and seq.num_output_tokens >= p.min_tokens
        and not seq.num_placeholders
    )


def propose(
    seqs: list[Sequence], drafter: Drafter, spec: SpeculativeConfig, max_model_len: int
) -> None:
    """Sets each eligible decode's `draft_token_ids` (the scheduler may trim them): at most
    num_speculative_tokens, none past max_tokens or max_model_len (the step's own token comes
    after them), and for a `paced` drafter at most one more than its last verification held."""
    for seq in seqs:
        seq.draft_token_ids = []
        if seq.num_uncomputed_tokens != 1 or not drafts_allowed(seq):
            continue
        room = max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        k = min(spec.num_speculative_tokens, room)
        if drafter.paced and seq.num_drafts_wanted is not None:
            k = min(k, seq.num_drafts_wanted)
        if k <= 0:
            continue
        seq.draft_token_ids = drafter.propose(seq, k)


def accept(result: StepResult, stats: EngineStats, budget: DraftBudget | None = None) -> StepResult:
    """The step's result with each verification cut to its accepted drafts and the token after
    them (rows of one sequence, in order); the sequences' placeholders and computed tokens
    advanced to match. Rows of other sequences pass through."""
    keep: list[int] = []
    row = 0
    seqs = result.seqs
    while row < len(seqs):
        seq = seqs[row]
        drafts = seq.draft_token_ids
        if not drafts:
            keep.append(row)
            row += 1
            continue
        d = len(drafts)
        got = result.tokens[row : row + d]  # what follows the token and each draft
        wrong = np.flatnonzero(got != np.asarray(drafts))
        k = int(wrong[0]) if len(wrong) else d
        keep += range(row, row + k + 1)
        seq.draft_token_ids = []
        # Adaptive length: all accepted, one more next time; else as many as held, plus one. A
        # request whose drafts keep failing verifies one at a time (a row, ~nothing).
        seq.num_drafts_wanted = d + 1 if k == d else k + 1
        if not seq.is_finished:  # (aborted meanwhile: nothing of it is kept)
            for _ in range(k):
                seq.add_placeholder()  # the step's one placeholder is there already
            seq.num_computed_tokens += k
            stats.record_verification(d, k)
            if budget is not None:
                budget.record(seq, d, k)
        row += d + 1
    if len(keep) == len(seqs):
        return result
    idx = np.asarray(keep, np.int64)
    return dataclasses.replace(
        result,
        seqs=[seqs[i] for i in keep],
        tokens=result.tokens[idx],
        logprobs=result.logprobs[idx],
        top_ids=None if result.top_ids is None else result.top_ids[idx],
        top_logprobs=None if result.top_logprobs is None else result.top_logprobs[idx],
    )
