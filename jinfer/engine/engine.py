"""The engine loop: schedule -> run -> sample -> postprocess, one step at a time.

`Engine` owns the scheduler, the model runner and every request's host state. It is
synchronous and single-threaded; the offline `LLM` drives it in a loop, and a server drives it
from one background thread.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from jinfer.attention.kv_cache import KVCache
from jinfer.config.cache import pages_for
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.engine.output_guard import load_guard
from jinfer.engine.output_processor import OutputProcessor, RequestState
from jinfer.engine.stats import EngineStats
from jinfer.models.params import Params
from jinfer.outputs import RequestOutput
from jinfer.runner import buckets
from jinfer.runner.compilation import num_compiles
from jinfer.runner.model_runner import DispatchedStep, ModelRunner
from jinfer.sampling_params import ParamError, SamplingParams
from jinfer.scheduler.block_manager import BlockManager
from jinfer.scheduler.plan import StepPlan
from jinfer.scheduler.scheduler import Scheduler, SchedulerConfig
from jinfer.scheduler.sequence import Sequence, Status
from jinfer.spec_decode import verify
from jinfer.spec_decode.budget import DraftBudget
from jinfer.structured.grammar import CompiledGrammar, GrammarCompiler
from jinfer.structured.guards import TokenGuards
from jinfer.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
        max_pages_per_seq = pages_for(config.max_model_len, config.page_size)
        if cache.num_pages - 1 < max_pages_per_seq:
            raise ValueError(
                f"KV cache too small: {cache.num_pages - 1} usable pages cannot hold one "
                f"request of max_model_len={config.max_model_len} ({max_pages_per_seq} pages)"
            )
        self.blocks = BlockManager(
            cache.num_pages,
            config.page_size,
            enable_prefix_caching=config.enable_prefix_caching,
            record_events=config.kv_events.enabled,
        )
        self.runner = ModelRunner(cfg, params, cache, config)
        granularity = buckets.prefill_granularity(
            config.max_num_batched_tokens, config.max_num_seqs, self.runner.query_block
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_num_batched_tokens,
                config.max_model_len,
                granularity,
            ),
            self.blocks,
        )
        self.stats = EngineStats()
        self.output = OutputProcessor(
            tokenizer, config.max_model_len, self.stats, load_guard(config.output_guard)
        )
        self.warmup_time = 0.0
        self._in_flight: tuple[StepPlan, DispatchedStep] | None = None  # dispatched, not landed
        self._rng = np.random.default_rng(config.seed)
        self._arrivals = 0
        self._eos = tuple(dict.fromkeys(list(cfg.eos_token_ids) + list(tokenizer.stop_token_ids())))
        self.grammars = GrammarCompiler(tokenizer)  # structured output's constraints
        self.group = None  # the processes the model spans, if more than this one (builder.py)
        self.kv_events = None  # the KV cache events' publisher, when enabled (builder.py)
        self.speculative = config.speculative  # drafts verified per step (spec_decode/)
        self.drafter = verify.make_drafter(self.speculative)  # None: no speculation
        self.draft_budget: DraftBudget | None = None  # drafts per step, from warm-up's costs

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> None:
        """Queues a request; raises ValueError for an input it cannot serve. `grammar`: its
        constraint, compiled already by `validate_params` (else it is compiled here)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt_token_ids)
        self._check_token_ids(params)
        if grammar is None and params.structured_outputs is not None:
            grammar = self.grammars.compile(params.structured_outputs)
        guards = TokenGuards.build(
            self.tokenizer, self.cfg.vocab_size, params.allowed_token_ids, params.bad_words
        )
        seqs = []
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
                matcher=None if grammar is None else grammar.matcher(),  # one per completion
                guards=guards,  # (read-only: shared)
            )
            self._arrivals += 1
            seqs.append(seq)
            self.scheduler.add(seq)
        self.output.add_request(request_id, prompt, ids, seqs)
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

    def validate_params(self, params: SamplingParams) -> CompiledGrammar | None:
        """ParamError if `params` names a token id this model does not have, or its
        structured-output constraint does not compile (GrammarError); the compiled constraint,
        for `add_request`. Compiling takes ~1 ms for a small schema and up to the compiler's
        timeout: call this off the engine's thread (the server does)."""
        self._check_token_ids(params)
        if params.structured_outputs is None:
            return None
        return self.grammars.compile(params.structured_outputs)

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.cfg.vocab_size
        named = (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
            ("allowed_token_ids", params.allowed_token_ids or []),
        )
        for name, ids in named:
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ParamError(
                    name, f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})"
                )

    def abort(self, request_id: str) -> bool:
        """Ends a request wherever it is; its pages return at once. False if unknown."""
        req = self.output.requests.pop(request_id, None)
        if req is None:
            return False
        for state in req.states:
            if not state.seq.is_finished:
                self._finish(state.seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # -------------------------------------------------------------------- step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Runs one engine step; returns the current state of every request it touched, or of
        those it finished (offline callers: no per-step copies of growing outputs)."""
        t0 = time.perf_counter()
        outputs = self._step(finished_only)
        self._publish_kv_events()
        self.stats.step_time += time.perf_counter() - t0
        return outputs

    def _publish_kv_events(self) -> None:
        """The step's prefix-cache changes, to a KV-aware router (`kv_events.py`)."""
        if self.kv_events is not None:
            self.kv_events.publish(self.blocks.cache.take_events())

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        # Async scheduling: plan and dispatch this step while the previous one runs, then read
        # the previous one's tokens (the device computes on meanwhile) and check its stops.
        # Each sampled token is a placeholder until it lands (sequence.py); a request that
        # stops meanwhile computed one token too many, which nobody sees. A step that samples
        # for a request whose sampling reads its tokens on the host (a grammar's mask,
        # penalties) lands the previous step between its forward pass and its sampling: the
        # host's work overlaps the forward pass, and the sampler sees every token.
        outputs = []
        if self._in_flight is not None and self._in_flight[0].verifies:
            # How many drafts hold decides where their request's next token goes: a
            # verification lands before the next step is planned, whether that step drafts or not.
            outputs += self._land(finished_only)
        if self._drafts_may_pay():
            # Drafts continue the known tokens: the step in flight lands first (its host work
            # no longer overlaps the device; a verification step makes up for it many times).
            # A full batch, one with prompts to prefill, or one whose drafts would cost more
            # than they bring drafts nothing and stays overlapped.
            if self._in_flight is not None:
                outputs += self._land(finished_only)
            verify.propose(
                self.scheduler.running, self.drafter, self.speculative, self.config.max_model_len
            )
            if self.draft_budget is not None:  # what this step's drafts are worth (budget.py)
                self.draft_budget.trim(self._decodes(), self.scheduler.draft_rows())
        plan = self.scheduler.schedule()
        self.stats.record_plan(plan, self.config.enable_prefix_caching)
        previous, self._in_flight = self._in_flight, None
        if not plan.is_empty:
            self.output.mark_scheduled(plan)
            forward = self.runner.forward(plan, None if previous is None else previous[1])
            self.scheduler.on_dispatched(plan)
            if previous is not None and any(s.needs_known_tokens for s in forward.seqs):
                outputs += self._land(finished_only, previous)
                previous = None
            dispatched = self.runner.sample(forward)
            for seq in {id(s): s for s in dispatched.seqs}.values():  # (a verification: rows)
                if not seq.is_finished:  # (landing the previous step may have stopped it)
                    seq.add_placeholder()
            self._in_flight = (plan, dispatched)
        if previous is not None:
            outputs += self._land(finished_only, previous)
        if not self.config.async_scheduling and self._in_flight is not None:
            outputs += self._land(finished_only)
        return outputs

    def _decodes(self) -> list[Sequence]:
        return [s for s in self.scheduler.running if s.num_uncomputed_tokens == 1]

    def _drafts_may_pay(self) -> bool:
        """Whether this step may verify drafts: speculation is on, the step has rows to spare,
        and, once warm-up has measured the steps' costs, drafts could be worth their rows."""
        spare_rows = 0 if self.drafter is None else self.scheduler.draft_rows()
        if spare_rows <= 0 or self.draft_budget is None:
            return spare_rows > 0
        most = self.speculative.num_speculative_tokens
        return self.draft_budget.may_pay(self._decodes(), spare_rows, most)

    def _land(
        self, finished_only: bool, step: tuple[StepPlan, DispatchedStep] | None = None
    ) -> list[RequestOutput]:
        """Reads a dispatched step's tokens (by default the one in flight), fills their
        placeholders and checks stops; the outputs of the requests it touched."""
        if step is None:
            step, self._in_flight = self._in_flight, None
        plan, dispatched = step
        result = dispatched.result()
        self.stats.record_step(plan, result)  # (before `accept` clears the drafts it counts)
        result = verify.accept(result, self.stats, self.draft_budget)  # (no drafts: as it is)
        touched, done = self.output.process(result)
        for seq in result.seqs:
            self.scheduler.on_token_known(seq)
        for seq, reason in done:
            self._finish(seq, reason)
        return [self.output.output(req) for req in touched if req.finished or not finished_only]

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if self.drafter is not None:
            self.drafter.finish(seq)  # (suffix decoding drafts from finished outputs)

    @property
    def requests(self) -> dict[str, RequestState]:
        """Requests in flight, by id (a finished one leaves once its output is built)."""
        return self.output.requests

    def warmup(self) -> float:
        """Compiles every program a step may run (the runner's buckets); seconds taken."""
        self.grammars.prepare()  # the vocabulary for constraints, on a worker meanwhile
        t0 = time.perf_counter()
        self.runner.warmup()
        if self.drafter is not None:  # the steps' costs, to plan drafts by (budget.py)
            self.draft_budget = DraftBudget(self.runner.step_cost())
        self.warmup_time = time.perf_counter() - t0
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
        self._publish_kv_events()

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
