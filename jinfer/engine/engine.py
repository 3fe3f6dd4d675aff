"""The engine loop: schedule -> run -> sample -> postprocess, one step at a time.

`Engine` owns the scheduler, the model runner and every request's host state. It is
synchronous and single-threaded; the offline `LLM` drives it in a loop, and a server drives it
from one background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from jinfer.attention.kv_cache import KVCache
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.models.params import Params
from jinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jinfer.runner import buckets
from jinfer.runner.compilation import num_compiles
from jinfer.runner.model_runner import ModelRunner, StepResult
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.block_manager import BlockManager
from jinfer.scheduler.scheduler import Scheduler, SchedulerConfig
from jinfer.scheduler.sequence import Sequence, Status
from jinfer.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _SeqState:
    seq: Sequence
    index: int
    detok: IncrementalDetokenizer
    text: str = ""
    checked_upto: int = 0  # how much of `text` stop strings have been searched in
    # Per-token logprob dicts built so far: each step adds one, never rebuilding the rest.
    logprob_entries: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    states: list[_SeqState]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.states)


@dataclasses.dataclass
class EngineStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Wall seconds inside step(), and the part of them spent blocked on the device's results;
    # the rest (scheduling, building inputs, dispatch, stop checks, outputs) is host time, during
    # which the device idles: the loop is synchronous.
    step_time: float = 0.0
    device_time: float = 0.0
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
        """Share of step wall time the device waited on the host (issue 5's goal: < 0.10)."""
        return self.host_time / self.step_time if self.step_time else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        cache: KVCache,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> None:
        if not config.is_resolved:
            raise ValueError("Engine needs a resolved config: config.resolve(model, platform)")
        self.cfg = cfg
        self.config = config
        self.tokenizer = tokenizer
        backend = config.backend
        layout = backend.layout
        if (cache.layout, cache.page_size) != (layout, config.page_size):
            raise ValueError(
                f"KV cache of {cache.page_size}-token pages in the {cache.layout!r} layout, but "
                f"attention_backend={config.attention_backend!r} with page_size="
                f"{config.page_size} reads {layout!r} pages of {config.page_size}"
            )
        max_pages_per_seq = -(-config.max_model_len // config.page_size)
        if cache.num_pages - 1 < max_pages_per_seq:
            raise ValueError(
                f"KV cache too small: {cache.num_pages - 1} usable pages cannot hold one "
                f"request of max_model_len={config.max_model_len} ({max_pages_per_seq} pages)"
            )
        self.blocks = BlockManager(
            cache.num_pages, config.page_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.runner = ModelRunner(cfg, params, cache, config)
        granularity = buckets.prefill_granularity(
            config.max_num_batched_tokens, config.max_num_seqs, self.runner.query_block
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, granularity),
            self.blocks,
        )
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.warmup_time = 0.0
        self._rng = np.random.default_rng(config.seed)
        self._arrivals = 0
        self._eos = tuple(dict.fromkeys(list(cfg.eos_token_ids) + list(tokenizer.stop_token_ids())))

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        """Queues a request; raises ValueError for an input it cannot serve."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt_token_ids)
        self.validate_params(params)
        states = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else int(self._rng.integers(2**62))
            seq = Sequence(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                prompt_token_ids=ids,
                params=params,
                seed=seed,
                arrival=self._arrivals,
                eos_token_ids=() if params.ignore_eos else self._eos,
                parent_id=request_id,
            )
            self._arrivals += 1
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            states.append(_SeqState(seq, i, detok))
            self.scheduler.add(seq)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        self.requests[request_id] = _Request(request_id, prompt, ids, states, metrics)
        self.stats.num_prompt_tokens += len(ids)

    def validate_prompt(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt as a list of ints; ValueError if this engine cannot serve it."""
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(ids) > self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len={self.config.max_model_len}"
            )
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})"
            )
        return ids

    def validate_params(self, params: SamplingParams) -> None:
        """ValueError if `params` names a token id this model does not have."""
        vocab = self.cfg.vocab_size
        named = (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias))
        for name, ids in named:
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(
                    f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})"
                )

    def abort(self, request_id: str) -> bool:
        """Ends a request wherever it is; its pages return at once. False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for state in req.states:
            if not state.seq.is_finished:
                self.scheduler.finish(state.seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # -------------------------------------------------------------------- step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Runs one engine step; returns the current state of every request it touched, or of
        those it finished (offline callers: no per-step copies of growing outputs)."""
        t0 = time.perf_counter()
        outputs = self._step(finished_only)
        self.stats.step_time += time.perf_counter() - t0
        return outputs

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.stats.num_preemptions += len(plan.preempted)
        if self.config.enable_prefix_caching:
            for seq, num_cached in plan.admitted:
                self.stats.prefix_cache_queries += seq.num_tokens
                self.stats.prefix_cache_hits += num_cached
        if plan.is_empty:
            return []
        now = time.monotonic()
        for seq, _ in plan.scheduled:
            metrics = self.requests[seq.parent_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        result = self.runner.execute(plan)
        self.scheduler.on_step_done(plan)
        self.stats.num_steps += 1
        self.stats.device_time += result.device_time
        kind = "prefill" if any(n > 1 for _, n in plan.scheduled) else "decode"
        tally = self.stats.steps_by_bucket.setdefault((result.bucket, kind), [0, 0.0, 0])
        tally[0] += 1
        tally[1] += result.host_time + result.device_time
        tally[2] += plan.num_tokens
        touched = self._postprocess(result)
        return [self._output(req) for req in touched if req.finished or not finished_only]

    def _postprocess(self, result: StepResult) -> list[_Request]:
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for row, seq in enumerate(result.seqs):
            if seq.is_finished:  # aborted meanwhile
                continue
            req_id = seq.parent_id
            req = self.requests[req_id]
            state = next(s for s in req.states if s.seq is seq)
            token = int(result.tokens[row])
            seq.output_token_ids.append(token)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            self.stats.num_generated_tokens += 1
            if seq.params.logprobs is not None:
                n = seq.params.logprobs
                top = [
                    (int(i), float(v))
                    for i, v in zip(
                        result.top_ids[row][:n], result.top_logprobs[row][:n], strict=True
                    )
                ]
                seq.logprobs.append((float(result.logprobs[row]), top))
            reason = self._check_stop(state, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            touched[req_id] = req
        return list(touched.values())

    def _check_stop(self, state: _SeqState, token: int) -> str | None:
        """Appends the token's text and returns a finish reason, or None to go on."""
        seq, p = state.seq, state.seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and token in seq.eos_token_ids:
            return "stop"  # EOS text is never part of the output
        if past_min and token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        state.text += state.detok.add(token)
        if past_min and p.stop and self._find_stop(state) is not None:
            return "stop"
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
            seq.num_tokens >= self.config.max_model_len
        ):
            state.text += state.detok.flush()
            return "length"
        return None

    def _find_stop(self, state: _SeqState) -> str | None:
        """Searches the newly added text for a stop string (which may span tokens)."""
        p = state.seq.params
        longest = max(len(s) for s in p.stop)
        start = max(0, state.checked_upto - longest + 1)
        best: tuple[int, str] | None = None
        for stop in p.stop:
            i = state.text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        state.checked_upto = len(state.text)
        if best is None:
            return None
        i, stop = best
        state.text = state.text[: i + len(stop)] if p.include_stop_str_in_output else state.text[:i]
        state.seq.stop_reason = stop
        return stop

    def _output(self, req: _Request) -> RequestOutput:
        outputs = []
        for state in req.states:
            seq = state.seq
            logprobs = None
            if seq.params.logprobs is not None:
                built = state.logprob_entries
                for i in range(len(built), len(seq.logprobs)):
                    chosen_lp, top = seq.logprobs[i]
                    entry = {tid: Logprob(lp, rank=r + 1) for r, (tid, lp) in enumerate(top)}
                    entry.setdefault(seq.output_token_ids[i], Logprob(chosen_lp))
                    built.append(entry)
                logprobs = list(built)
            outputs.append(
                CompletionOutput(
                    index=state.index,
                    text=state.text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=logprobs,
                )
            )
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
            req.metrics.finished_time = time.monotonic()
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            outputs,
            finished,
            dataclasses.replace(req.metrics),
            num_cached_tokens=req.states[0].seq.num_cached_tokens or 0,
        )

    def warmup(self) -> float:
        """Compiles every program a step may run (the runner's buckets); seconds taken."""
        self.warmup_time = self.runner.warmup()
        return self.warmup_time

    # ------------------------------------------------------------------ status
    @property
    def num_compiles(self) -> int:
        return num_compiles()

    def kv_cache_usage(self) -> float:
        """Fraction of KV pages referenced by requests; idle cached pages count as free."""
        return self.blocks.usage

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix not in use (on an idle engine: all of them, e.g. to time
        cold prefills); running requests go on."""
        self.blocks.reset_prefix_cache()

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def live_sequences(self) -> list[Sequence]:
        return self.scheduler.running + list(self.scheduler.waiting)

    def check_invariants(self) -> None:
        self.blocks.check_invariants(self.live_sequences())
        for seq in self.scheduler.waiting:
            if seq.status is not Status.WAITING:
                raise AssertionError(f"{seq.request_id} is queued but {seq.status}")
