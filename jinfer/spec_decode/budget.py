"""How many drafts a step verifies: as many as raise its expected tokens per second.

A draft costs a row of the step. Where a decode step reads the weights once for every row (an
accelerator at short contexts) a few more rows cost almost nothing; where each row pays for its
attention over a long context and its share of the matmuls (CPU), a draft costs most of what a
decode row does, and one that holds half the time loses. Measured on SmolLM2 on a 2-core CPU at
~6.8k-token contexts (coding agents): four decodes take 224 ms, four decodes with one draft each
387 ms (eight rows: a bucket of 8, `runner/buckets.py`), so prompt lookup, holding ~46% of its
drafts, made a server with four such sessions 0.8x as fast as without it.

So each step plans its drafts against a cost model of the step, `StepCost`, measured at warm-up
(`ModelRunner.step_cost`: every decode bucket, full of requests at a short and a long context,
and full of one request's rows). A request's next draft holds with probability alpha (its
recent verifications' share of drafts that held, starting from, and returning to, the
engine's), its j-th with alpha ** j (drafts hold in a chain). Of all the ways to spend the
spare rows, the step takes the one whose best drafts give the most expected tokens per
second, counting every decode's own token; none when nothing beats plain decoding. This is
the issue's adaptive speculation: a full or costly batch drafts less, a request whose drafts
keep failing drafts less, rows the bucket would pad anyway take drafts for free, and a lone
stream at a cheap context drafts as far as its drafts hold.
"""

from __future__ import annotations

import bisect
import dataclasses

from jinfer.scheduler.sequence import Sequence

# A request's acceptance, alpha, counts its drafts that held and the verifications that met one
# that did not, weighed with PRIOR_WEIGHT verifications' worth of the engine's acceptance. Its
# counts fade by RELAX per token it decodes (acceptance comes in runs: a copied passage holds
# throughout, free text rarely), so a request whose drafts failed for a while returns to the
# engine's acceptance and drafts again when that may pay (a verification is the only way to
# learn that its drafts hold again).
PRIOR_WEIGHT = 2.0
RELAX = 0.05


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds of a decode-only step that runs in `buckets[i]` rows:

        intercept[i] + per_context[i] * (the requests' contexts, summed)
                     + per_shared[i] * (the context of every further row, summed)

    A request's first row reads its KV; its drafts' rows, and the bucket's padding rows, attend
    over KV another row of the group reads anyway (they cost their arithmetic, not the reads).
    Padding rows count at the requests' mean context."""

    buckets: tuple[int, ...]
    intercept: tuple[float, ...]
    per_context: tuple[float, ...]  # seconds per token of a request's context
    per_shared: tuple[float, ...]  # seconds per token of context of a further row

    def seconds(self, contexts: list[int], drafts: list[int]) -> float:
        """A step of one row per request at `contexts` plus `drafts[i]` more rows for request
        i; inf when no bucket holds its rows."""
        rows = len(contexts) + sum(drafts)
        i = bisect.bisect_left(self.buckets, rows)
        if i == len(self.buckets):
            return float("inf")
        total = sum(contexts)
        shared = sum(c * d for c, d in zip(contexts, drafts, strict=True))
        shared += (self.buckets[i] - rows) * total / max(len(contexts), 1)  # padding
        return self.intercept[i] + self.per_context[i] * total + self.per_shared[i] * shared

    @classmethod
    def fit(cls, timings: dict[int, dict[str, tuple[int, float]]]) -> StepCost:
        """From each bucket's timed steps: {"short": (context, s), "long": (context, s)} of as
        many requests as the bucket has rows, and "shared": (context, s) of one request with
        that many rows. Noise never makes a larger bucket cheaper."""
        buckets = tuple(sorted(timings))
        intercept: list[float] = []
        per_context: list[float] = []
        per_shared: list[float] = []
        for b in buckets:
            (c0, t0), (c1, t1) = timings[b]["short"], timings[b]["long"]
            slope = max(0.0, (t1 - t0) / (b * (c1 - c0))) if c1 > c0 else 0.0
            a = max(0.0, t0 - b * slope * c0)
            if intercept:
                a, slope = max(a, intercept[-1]), max(slope, per_context[-1])
            cs, ts = timings[b]["shared"]
            shared = (ts - a - slope * cs) / ((b - 1) * cs) if b > 1 and cs else slope
            intercept.append(a)
            per_context.append(slope)
            per_shared.append(min(max(shared, 0.0), slope))
        return cls(buckets, tuple(intercept), tuple(per_context), tuple(per_shared))


def choose_drafts(
    contexts: list[int],  # [N] each decode's context (tokens it attends to)
    alphas: list[float],  # [N] each decode's chance that its next draft holds
    offered: list[int],  # [N] drafts proposed for it
    spare_rows: int,  # rows the step may add for drafts
    cost: StepCost,
) -> list[int]:
    """How many of its offered drafts each decode verifies this step: the split of at most
    `spare_rows` extra rows that maximizes expected tokens (a decode's own token, plus
    alpha ** j for its j-th draft) per expected second. [N]."""
    n = len(contexts)
    if n == 0:
        return []
    # Every draft's expected gain, best first: a request's are alpha, alpha^2, ... (decreasing),
    # so the m best gains overall take a prefix of each request's drafts.
    gains = sorted(
        ((alphas[i] ** j, i) for i in range(n) for j in range(1, offered[i] + 1)),
        key=lambda g: -g[0],
    )[: max(0, spare_rows)]
    keep = [0] * n
    best_rate, best = n / cost.seconds(contexts, keep), list(keep)
    tokens = float(n)
    for gain, i in gains:
        tokens += gain
        keep[i] += 1
        rate = tokens / cost.seconds(contexts, keep)
        if rate > best_rate:
            best_rate, best = rate, list(keep)
    return best


class DraftBudget:
    """The engine's per-step draft planner: the step's cost model, and how drafts have held,
    per request and engine-wide (every request's starting point)."""

    def __init__(self, cost: StepCost) -> None:
        self.cost = cost
        # Drafts that held engine-wide, and verifications that stopped at one that did not,
        # starting optimistic (0.8: four of five drafts hold) so that the first requests'
        # drafts get tried; a few hundred verifications outweigh it.
        self.held = 4.0
        self.failed = 1.0

    def alpha(self, seq: Sequence) -> float:
        """The chance that `seq`'s next draft holds."""
        prior = self.held / (self.held + self.failed)
        held, failed = self._counts(seq)
        return (held + PRIOR_WEIGHT * prior) / (held + failed + PRIOR_WEIGHT)

    def record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """One verification of `seq`: its first `num_accepted` of `num_drafts` drafts held."""
        failed = int(num_accepted < num_drafts)
        held, failed_before = self._counts(seq)
        seq.drafts_held, seq.drafts_failed = held + num_accepted, failed_before + failed
        seq.drafts_counted_at = seq.num_output_tokens
        self.held += num_accepted
        self.failed += failed

    @staticmethod
    def _counts(seq: Sequence) -> tuple[float, float]:
        """`seq`'s held and failed counts, faded to its current token."""
        fade = (1 - RELAX) ** max(seq.num_output_tokens - seq.drafts_counted_at, 0)
        return seq.drafts_held * fade, seq.drafts_failed * fade

    def may_pay(self, decodes: list[Sequence], spare_rows: int, most: int) -> bool:
        """Whether drafts could pay this step if every decode offered `most` of them (more
        offered never makes fewer worth it): when not, the engine drafts nothing and keeps the
        step in flight overlapped with the next one."""
        return any(self._choose(decodes, [most] * len(decodes), spare_rows))

    def trim(self, decodes: list[Sequence], spare_rows: int) -> None:
        """Cuts each decode's `draft_token_ids` to what pays for itself this step."""
        if not any(s.draft_token_ids for s in decodes):
            return
        offered = [len(s.draft_token_ids) for s in decodes]
        for seq, k in zip(decodes, self._choose(decodes, offered, spare_rows), strict=True):
            del seq.draft_token_ids[k:]

    def _choose(self, decodes: list[Sequence], offered: list[int], spare_rows: int) -> list[int]:
        contexts = [s.num_tokens for s in decodes]
        alphas = [self.alpha(s) for s in decodes]
        return choose_drafts(contexts, alphas, offered, spare_rows, self.cost)
