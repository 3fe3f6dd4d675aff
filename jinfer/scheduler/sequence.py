"""`Sequence`: one request's state as it moves through the engine.

The scheduler's whole view of progress is one number per request: `num_computed_tokens`, which
catches up with `num_tokens` (prompt + generated). Prefill, chunked prefill, decode and recompute
after preemption are all the same motion.

A step that samples a token for a sequence appends a placeholder for it when it is dispatched;
the token's value fills it when the step's results reach the host. With async scheduling the
next step is planned and dispatched in between: it computes the placeholder's token from the
device's copy (`runner/model_runner.py`), so host bookkeeping never waits for the device.

    output_token_ids  [5, 9, 14, PLACEHOLDER]   num_placeholders 1: one value still on the device
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from jinfer.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled on the device whose value the host has not yet read


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved seed: the request's own, or drawn at arrival
    arrival: int  # admission order; later arrivals are preempted first
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # page ids, in position order
    slot: int = -1  # row in the device block table while running
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    eos_token_ids: tuple[int, ...] = ()  # stop tokens from the model (empty with ignore_eos)
    parent_id: str = ""  # the request this sequence is one of `n` completions of
    # Per generated token: (sampled logprob, [(token id, logprob), ...] top-N).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Prefix cache: keys of the full pages of all_token_ids() (filled lazily, see
    # prefix_cache.py), how many leading block-table pages are already indexed or were
    # offered to the index, and the tokens the first admission found cached (None: not yet).
    page_keys: list[bytes] = field(default_factory=list)
    num_indexed_pages: int = 0
    num_cached_tokens: int | None = None
    num_placeholders: int = 0  # trailing output tokens still on the device (PLACEHOLDER)
    # Structured output: the request's own llguidance matcher (None: unconstrained). It has
    # consumed every known output token; the sampler masks the next one by it.
    matcher: Any = None
    guards: Any = None  # allowed_token_ids / bad_words (`structured/guards.py`), or None
    # Speculative decoding: tokens proposed to follow the last one (`spec_decode/`), which the
    # step scheduled for this sequence verifies; never part of its tokens until accepted.
    draft_token_ids: list[int] = field(default_factory=list)
    num_drafts_wanted: int | None = None  # how many to propose next (None: as many as allowed)
    drafter_state: Any = None  # what the proposer keeps of it between steps (suffix: an index)
    # How its drafts held (`spec_decode/budget.py`): drafts that held, verifications that met
    # one that did not, both as of its output token `drafts_counted_at`.
    drafts_held: float = 0.0
    drafts_failed: float = 0.0
    drafts_counted_at: int = 0

    @property
    def needs_known_tokens(self) -> bool:
        """Its next sample reads all its tokens on the host (penalties' history, the grammar's
        state, a bad word's start): it cannot be sampled while a token of it is still on the
        device."""
        return (
            self.matcher is not None
            or self.params.uses_penalties
            or (self.guards is not None and self.guards.needs_history)
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host has: all but the trailing placeholders."""
        return self.num_tokens - self.num_placeholders

    @property
    def num_known_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_placeholders

    def known_output_token_ids(self) -> list[int]:
        return self.output_token_ids[: len(self.output_token_ids) - self.num_placeholders]

    def add_placeholder(self) -> None:
        """A dispatched step samples this sequence's next token."""
        self.output_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def fill_placeholder(self, token: int) -> None:
        """The oldest placeholder's value has reached the host."""
        self.output_token_ids[len(self.output_token_ids) - self.num_placeholders] = token
        self.num_placeholders -= 1

    def drop_placeholders(self) -> None:
        """Forgets tokens still in flight (the sequence finished before they arrived)."""
        if self.num_placeholders:
            del self.output_token_ids[-self.num_placeholders :]
            self.num_placeholders = 0

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids()[start:end] without building the whole list (a per-step cost)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
