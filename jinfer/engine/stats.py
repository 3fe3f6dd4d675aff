"""`EngineStats`: what the engine loop has done, for benchmarks and the metrics endpoint."""

from __future__ import annotations

import dataclasses

from jinfer.runner.model_runner import StepResult
from jinfer.scheduler.plan import StepPlan


@dataclasses.dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Wall seconds inside step(), and the part of them spent blocked on the device's results;
    # the rest (scheduling, building inputs, dispatch, stop checks, outputs) is host time. The
    # synchronous loop's device idles through it; with async scheduling the device computes the
    # step in flight meanwhile, so host time no longer says how long the device waited.
    step_time: float = 0.0
    device_time: float = 0.0
    guard_time: float = 0.0  # of step_time: in the output guard (output_guard.py)
    # Prefix cache, in tokens, counted at each admission (vllm:prefix_cache_queries / _hits).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # (bucket, "prefill" | "decode") -> [steps, runner seconds, real tokens]: where step time
    # goes by compiled program ("prefill": the step runs some prompt tokens).
    steps_by_bucket: dict[tuple[int, str], list[float]] = dataclasses.field(default_factory=dict)
    # Speculative decoding (vLLM's vllm:spec_decode_*): verifications run, drafts verified,
    # drafts accepted, and accepted drafts by position in their draft (0: the first).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = dataclasses.field(default_factory=list)

    def record_verification(self, num_drafts: int, num_accepted: int) -> None:
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_drafts
        self.spec_num_accepted_tokens += num_accepted
        if len(self.spec_accepted_per_pos) < num_drafts:
            self.spec_accepted_per_pos += [0] * (num_drafts - len(self.spec_accepted_per_pos))
        for i in range(num_accepted):
            self.spec_accepted_per_pos[i] += 1

    @property
    def host_time(self) -> float:
        return self.step_time - self.device_time

    @property
    def host_fraction(self) -> float:
        """Share of step wall time the host was busy (not waiting for results): with the
        synchronous loop, the share the device waited on the host."""
        return self.host_time / self.step_time if self.step_time else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def record_plan(self, plan: StepPlan, prefix_caching: bool) -> None:
        """Counts what scheduling did: preemptions, and the prefix cache's admissions."""
        self.num_preemptions += len(plan.preempted)
        if prefix_caching:
            for seq, num_cached in plan.admitted:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_cached

    def record_step(self, plan: StepPlan, result: StepResult) -> None:
        """Counts a step the runner ran, and tallies it under its bucket and kind."""
        self.num_steps += 1
        self.device_time += result.device_time
        kind = (
            "prefill"
            if any(n > 1 + len(s.draft_token_ids) for s, n in plan.scheduled)
            else "decode"
        )
        tally = self.steps_by_bucket.setdefault((result.bucket, kind), [0, 0.0, 0])
        tally[0] += 1
        tally[1] += result.host_time + result.device_time
        tally[2] += plan.num_tokens
