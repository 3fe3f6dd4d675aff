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
        kind = "prefill" if any(n > 1 for _, n in plan.scheduled) else "decode"
        tally = self.steps_by_bucket.setdefault((result.bucket, kind), [0, 0.0, 0])
        tally[0] += 1
        tally[1] += result.host_time + result.device_time
        tally[2] += plan.num_tokens
