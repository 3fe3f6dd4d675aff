"""From sampled tokens to what callers read: stop checks, limits, text, logprobs, `RequestOutput`.

Each step the runner hands back one token per sequence that reached its end (a verification of
speculative drafts: its accepted drafts and the token after them, one row each, in order). For
each, in row order, the processor appends the token, records its logprobs, streams its text
and checks the request's stop conditions (EOS and stop tokens, then stop strings, then
max_tokens and max_model_len), and says which sequences are done and why; the engine then frees
them (rows of a sequence after its stop are dropped). Outputs are built from the request state
on demand, the logprob entries incrementally (each step adds one, never rebuilding the rest).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from jinfer.engine.detokenizer import IncrementalDetokenizer
from jinfer.engine.output_guard import Guard
from jinfer.engine.stats import EngineStats
from jinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jinfer.runner.model_runner import StepResult
from jinfer.scheduler.plan import StepPlan
from jinfer.scheduler.sequence import Sequence
from jinfer.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SeqState:
    """One completion's output state: its sequence, its text so far, its logprob entries."""

    seq: Sequence
    index: int  # among the request's n completions
    detok: IncrementalDetokenizer
    text: str = ""
    checked_upto: int = 0  # how much of `text` stop strings have been searched in
    released: int | None = None  # with an output guard: how much of `text` callers may see
    # Per-token logprob dicts built so far: each step adds one, never rebuilding the rest.
    logprob_entries: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)

    def completion(self) -> CompletionOutput:
        seq = self.seq
        logprobs = None
        if seq.params.logprobs is not None:
            built = self.logprob_entries
            for i in range(len(built), len(seq.logprobs)):
                chosen_lp, top = seq.logprobs[i]
                entry = {tid: Logprob(lp, rank=r + 1) for r, (tid, lp) in enumerate(top)}
                entry.setdefault(seq.output_token_ids[i], Logprob(chosen_lp))
                built.append(entry)
            logprobs = list(built)
        return CompletionOutput(
            index=self.index,
            text=self.text if self.released is None else self.text[: self.released],
            token_ids=seq.known_output_token_ids(),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
        )


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    states: list[SeqState]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.states)


class OutputProcessor:
    """Holds every request in flight (`requests`, by id) and turns steps into their outputs."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        stats: EngineStats,
        guard: Guard | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.stats = stats
        self.guard = guard  # checks each completion's text before it is released
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        seqs: list[Sequence],
    ) -> None:
        states = [
            SeqState(
                seq,
                i,
                IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, seq.params.skip_special_tokens
                ),
            )
            for i, seq in enumerate(seqs)
        ]
        metrics = RequestMetrics(arrival_time=time.monotonic())
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, states, metrics
        )

    def mark_scheduled(self, plan: StepPlan) -> None:
        """Notes when each request in `plan` was first scheduled (its queueing time)."""
        now = time.monotonic()
        for seq, _ in plan.scheduled:
            metrics = self.requests[seq.parent_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now

    def process(self, result: StepResult) -> tuple[list[RequestState], list[tuple[Sequence, str]]]:
        """Appends the step's tokens. Returns the requests it touched, and the sequences that
        are done with their finish reasons, in row order, for the scheduler to finish."""
        touched: dict[str, RequestState] = {}
        done: list[tuple[Sequence, str]] = []
        stopped: set[int] = set()  # a verification's rows after its stop are never seen
        now = time.monotonic()
        for row, seq in enumerate(result.seqs):
            if seq.is_finished or id(seq) in stopped:  # aborted meanwhile, or stopped above
                continue
            req = self.requests[seq.parent_id]
            state = next(s for s in req.states if s.seq is seq)
            token = int(result.tokens[row])
            seq.fill_placeholder(token)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                # The mask allows only what the matcher accepts: this is a bug, not an input.
                log.error(
                    "request %s: its grammar refused token %d (%s); ending it",
                    seq.request_id, token, seq.matcher.get_error(),
                )  # fmt: skip
                done.append((seq, "abort"))
                stopped.add(id(seq))
                touched[req.request_id] = req
                continue
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
            if self.guard is not None:
                reason = self._check_guard(state, reason)
            if reason is not None:
                done.append((seq, reason))
                stopped.add(id(seq))
            touched[req.request_id] = req
        return list(touched.values()), done

    def _check_stop(self, state: SeqState, token: int) -> str | None:
        """Appends the token's text and returns a finish reason, or None to go on."""
        seq, p = state.seq, state.seq.params
        # Counts of the tokens known so far: a later one may already be in flight.
        num_output, num_tokens = seq.num_known_output_tokens, seq.num_known_tokens
        past_min = num_output >= p.min_tokens
        if past_min and token in seq.eos_token_ids:
            return "stop"  # EOS text is never part of the output
        if past_min and token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        state.text += state.detok.add(token)
        if past_min and p.stop and self._find_stop(state) is not None:
            return "stop"
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            state.text += state.detok.flush()
            return "stop"
        if (p.max_tokens is not None and num_output >= p.max_tokens) or (
            num_tokens >= self.max_model_len
        ):
            state.text += state.detok.flush()
            return "length"
        return None

    def _check_guard(self, state: SeqState, reason: str | None) -> str | None:
        """Asks the output guard what of the text may be released; "content_filter" if it
        ends the request."""
        t0 = time.perf_counter()
        verdict = self.guard(state.text, reason is not None, state.seq.request_id)
        self.stats.guard_time += time.perf_counter() - t0
        release = max(0, min(verdict.release, len(state.text)))
        if verdict.block:
            state.text, state.released = state.text[:release], None
            state.seq.stop_reason = None
            return "content_filter"
        state.released = None if reason is not None else release
        return reason

    def _find_stop(self, state: SeqState) -> str | None:
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

    def output(self, req: RequestState) -> RequestOutput:
        """The request's state as a `RequestOutput`; a finished request leaves `requests`."""
        outputs = [state.completion() for state in req.states]
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
