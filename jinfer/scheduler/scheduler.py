"""Continuous batching: which requests compute how many tokens this step.

The result is a plain `StepPlan`. The scheduler owns the waiting queue, the running list, the
block manager and the device slots (rows of the block table); it never touches the device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from jinfer.scheduler.block_manager import BlockManager
from jinfer.scheduler.plan import StepPlan
from jinfer.scheduler.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SchedulerConfig:
    """The engine options the scheduler reads (config/engine.py declares them and their
    defaults), and the prefill layout's unit."""

    max_num_seqs: int  # R: requests running at once (rows of the block table)
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int  # prompt + output tokens of one request
    # A prefill run of n > 1 tokens costs align(n, this) of the budget: the runner lays prefill
    # out in query blocks of this many tokens (`runner/buckets.py: prefill_granularity`; 1: none).
    prefill_granularity: int = 1


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq` (stop, length or abort) and returns its pages and slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
            self.blocks.free(seq)
        seq.drop_placeholders()  # tokens still in flight for it are dropped when they land
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    # --------------------------------------------------------------- schedule
    def draft_rows(self) -> int:
        """Rows speculative drafts may take this step: those no request needs, and none while a
        prompt is still to prefill. A step that carries a prefill chunk is compute-bound: each
        draft there costs what a prompt token costs, takes budget from the chunk and makes the
        prompt wait a step more, and at a typical acceptance the decodes gain less than that
        (prompt lookup on the coding-agent workload at 4 sessions: 0.8x with drafts beside the
        chunks, docs/benchmarks.md). Decode-only steps are bandwidth-bound: drafts ride free."""
        if self.waiting or any(s.num_uncomputed_tokens > 1 for s in self.running):
            return 0
        return self.config.max_num_seqs - len(self.running)

    def schedule(self) -> StepPlan:
        # Policy: fill the token budget with running requests first, decodes before prefill
        # chunks, so long prompts never stall running decodes; then admit waiting requests in
        # arrival order while budget, slots and pages last (no overtaking: FCFS). When a running
        # request cannot get a page, the latest-arrived running request is preempted (its pages
        # freed; it recomputes later from the front of the queue). An admitted request starts
        # from the longest prefix of full pages the prefix cache holds; only the rest costs budget.
        # A request whose token in flight (a placeholder) is its last by length waits for it.
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        admitted: list[tuple[Sequence, int]] = []
        decodes = [
            s for s in self.running if s.num_uncomputed_tokens == 1 and not self._ends_in_flight(s)
        ]
        # Longest context first: the per-token attention groups its key loops by position in
        # the batch (attention.xla.TOKENS_PER_GROUP), so similar lengths share a loop bound.
        decodes.sort(key=lambda s: -s.num_tokens)
        chunks = [s for s in self.running if s.num_uncomputed_tokens > 1]
        # Speculative decoding: a decode with drafts verifies them in the same step, one logits
        # row each. Drafts take only rows and budget no request needs: sampled rows are at most
        # max_num_seqs, and a busy batch, or one with prompts to prefill, verifies none.
        spare_rows = self.draft_rows()
        used = 0
        for seq in decodes + chunks:
            budget = self.config.max_num_batched_tokens - used
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if seq.draft_token_ids:
                keep = max(0, min(len(seq.draft_token_ids), budget - 1, spare_rows))
                del seq.draft_token_ids[keep:]
                spare_rows -= keep
            num_new = self._fit(seq.num_uncomputed_tokens, budget) + len(seq.draft_token_ids)
            if num_new == 0:  # less than one query block left: a later 1-token run may fit
                continue
            num_preempted = len(preempted)
            if self._reserve(seq, num_new, preempted, scheduled):
                scheduled.append((seq, num_new))
                used += self._run_cost(seq, num_new)
            if len(preempted) != num_preempted:  # a preemption may have unscheduled others
                used = sum(self._run_cost(s, n) for s, n in scheduled)

        budget = self.config.max_num_batched_tokens - used

        while self.waiting and budget > 0 and self.free_slots and not preempted:
            seq = self.waiting[0]
            if seq.num_placeholders:  # preempted with a token in flight: next step
                break
            if seq.num_computed_tokens or seq.block_table:
                raise RuntimeError(f"waiting request {seq.request_id} still holds KV state")
            cached = self.blocks.lookup(seq)  # leaves at least the last token to compute
            num_cached = len(cached) * self.blocks.page_size
            num_new = self._fit(seq.num_tokens - num_cached, budget)
            if num_new == 0 or not self.blocks.can_allocate(seq, num_cached + num_new, cached):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, num_cached + num_new, cached)
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = num_cached
            seq.slot = self.free_slots.pop()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            admitted.append((seq, num_cached))
            budget -= self._cost(num_new)
        verifying = {id(s) for s, _ in scheduled}
        for seq in self.running + preempted:  # drafts not verified this step are dropped
            if seq.draft_token_ids and id(seq) not in verifying:
                seq.draft_token_ids = []
        return StepPlan(scheduled, preempted, admitted)

    def _ends_in_flight(self, seq: Sequence) -> bool:
        """Whether the token in flight for `seq` is its last by length (max_tokens or
        max_model_len): computing its KV would be wasted, and past max_model_len impossible."""
        if not seq.num_placeholders:
            return False
        max_tokens = seq.params.max_tokens
        full = max_tokens is not None and seq.num_output_tokens >= max_tokens
        return full or seq.num_tokens >= self.config.max_model_len

    def _cost(self, num_new: int) -> int:
        """What a run of `num_new` tokens takes of the budget: a prefill run (more than one
        token) is laid out in whole query blocks."""
        q = self.config.prefill_granularity
        return num_new if num_new == 1 else -(-num_new // q) * q

    def _run_cost(self, seq: Sequence, num_new: int) -> int:
        """A verification (a token and its drafts) runs per token: no query-block padding."""
        return num_new if seq.draft_token_ids else self._cost(num_new)

    def _fit(self, remaining: int, budget: int) -> int:
        """How many of `remaining` uncomputed tokens a run may take out of `budget`: all of them
        if their blocks fit, else as many whole blocks as fit (0: none)."""
        if self._cost(remaining) <= budget:
            return remaining
        q = self.config.prefill_granularity
        return budget // q * q

    def _reserve(
        self,
        seq: Sequence,
        num_new: int,
        preempted: list[Sequence],
        scheduled: list[tuple[Sequence, int]],
    ) -> bool:
        """Allocates pages for `seq`, preempting later arrivals if needed. False if `seq` itself
        had to be preempted."""
        target = seq.num_computed_tokens + num_new
        while not self.blocks.can_allocate(seq, target):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            preempted.append(victim)
            for i, (s, _) in enumerate(scheduled):
                if s is victim:
                    del scheduled[i]
                    break
            if victim is seq:
                return False
        self.blocks.allocate(seq, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.debug("preempting %s (%d tokens computed)", seq.request_id, seq.num_computed_tokens)
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    # ------------------------------------------------------------ bookkeeping
    def on_dispatched(self, plan: StepPlan) -> None:
        """Advances each scheduled request (its tokens are being computed: the device runs
        steps in order, so the next step may read them); full pages of known tokens become
        cacheable."""
        for seq, num_new in plan.scheduled:
            # (drafts count as computed once accepted: `spec_decode.verify.accept`)
            seq.num_computed_tokens += num_new - len(seq.draft_token_ids)
            self.blocks.cache_full_pages(seq)

    def on_token_known(self, seq: Sequence) -> None:
        """A placeholder of `seq` was filled: a page it completes may now be cached."""
        if seq.status is Status.RUNNING:
            self.blocks.cache_full_pages(seq)
