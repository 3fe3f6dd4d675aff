"""`StepPlan`: the scheduler's answer for one step, a plain value the runner turns into inputs."""

from __future__ import annotations

import dataclasses

from jinfer.scheduler.sequence import Sequence


@dataclasses.dataclass
class StepPlan:
    """This step's work: each entry computes `num_new` tokens of `seq` from num_computed_tokens."""

    scheduled: list[tuple[Sequence, int]]
    preempted: list[Sequence]
    # Requests admitted this step, with the prompt tokens the prefix cache already held.
    admitted: list[tuple[Sequence, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def verifies(self) -> bool:
        """Whether a request verifies drafts in this step (true until the step's result lands
        and `spec_decode.verify.accept` clears them)."""
        return any(seq.draft_token_ids for seq, _ in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
