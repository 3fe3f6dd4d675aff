"""`AsyncEngine`: the synchronous `Engine` driven by one thread, fed and read from asyncio.

    handler (event loop)            engine thread
    submit(...) -> stream  --inbox-->  engine.add_request
                                       loop: drain inbox (adds, aborts), engine.step()
    async for out in stream <--call_soon_threadsafe-- each RequestOutput

Everything that touches the engine happens on its thread, so the engine needs no locks. The
inbox is drained before every step, so an abort (a client that went away) takes effect before
the next step and its pages are free by then. A stream keeps only the newest output (each one
holds the whole state so far), so a slow reader never makes the engine wait or queue memory.

If a step raises, the engine is dead: the traceback is logged once, every open stream ends with
the error, `/health` turns 503, new requests are refused, and `on_dead` is told (the server then
exits non-zero, so that a supervisor restarts it: `--exit-on-engine-error`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from jinfer.outputs import CompletionOutput, RequestOutput
from jinfer.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; nothing more can be served."""


class QueueFullError(RuntimeError):
    """Admission control: too many requests are waiting already (retry later)."""


class TooLargeError(ValueError):
    """Admission control: more requests at once than the server ever holds (never retry)."""


class ShuttingDownError(RuntimeError):
    """The server is draining for shutdown and takes no new requests."""


class RequestStream:
    """One request's outputs, newest first: `async for out in stream` yields each new state."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._latest: RequestOutput | BaseException | None = None
        self._event = asyncio.Event()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:  # on the event loop
        self._latest = item
        self._event.set()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            await self._event.wait()
            self._event.clear()
            item, self._latest = self._latest, None
            if item is None:
                continue
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


@dataclasses.dataclass
class _Pending:
    stream: RequestStream
    prompt_token_ids: list[int]
    n: int
    last: RequestOutput | None = None


class AsyncEngine:
    """Runs `engine` on a background thread. `engine` is a `jinfer.engine.engine.Engine` (or one
    with the same methods: add_request, abort, step, has_unfinished_requests)."""

    def __init__(
        self,
        engine: Any,
        *,
        max_waiting_requests: int = 256,
        on_output: Callable[[RequestOutput], None] | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_output = on_output  # called on the engine thread (metrics)
        self.on_dead = on_dead  # called on the event loop once the loop died and streams ended
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.draining = False

    # -------------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="jinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the engine thread; open streams end with their requests aborted."""
        self.abort_all()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def fail(self, error: BaseException) -> None:
        """Declares the engine dead from outside its loop (a lost rank of its process group):
        every open stream ends with `error`, `/health` turns 503. Call on the event loop."""
        if self.error is not None:
            return
        log.error("engine failed: %s", error)
        self.error = error
        self._stop = True
        self._wake.set()
        self._fail_all(error)

    # --------------------------------------------------------------- requests
    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        grammar: Any = None,
    ) -> RequestStream:
        """Queues a validated request (call on the event loop). Raises if it cannot be taken.
        `grammar`: its constraint, compiled by `engine.validate_params`."""
        self.check_admission(1)
        stream = RequestStream(request_id, self._loop)
        self._pending[request_id] = _Pending(stream, prompt_token_ids, params.n)
        self._send(("add", (request_id, prompt_token_ids, params, prompt, grammar)))
        return stream

    def check_admission(self, num_requests: int) -> None:
        """Raises QueueFullError / ShuttingDownError / EngineDeadError if `num_requests` more
        requests cannot be taken now."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self.error!r}")
        if self.draining:
            raise ShuttingDownError("the server is shutting down")
        capacity = self.engine.config.max_num_seqs + self.max_waiting_requests
        if num_requests > capacity:
            raise TooLargeError(
                f"this asks for {num_requests} completions at once, more than the server ever "
                f"holds ({capacity}: max_num_seqs + max_waiting_requests); send fewer prompts"
            )
        if len(self._pending) + num_requests > capacity:
            raise QueueFullError(
                f"{len(self._pending)} requests are in flight, the limit is {capacity}; "
                "retry shortly"
            )

    def abort(self, request_id: str) -> None:
        """Ends a request (client gone); its pages are freed before the next engine step."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._send(("abort", _aborted(request_id, pending)))

    def abort_all(self) -> None:
        """Ends every request with a final output whose unfinished choices say `abort`."""
        for request_id, pending in list(self._pending.items()):
            self._pending.pop(request_id, None)
            final = _aborted(request_id, pending)
            self._send(("abort", final))
            pending.stream.put(final)

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Runs `fn` on the engine thread between steps (call on the event loop): its result,
        or its exception, in the returned future (e.g. resetting the prefix cache)."""
        future = self._loop.create_future()
        if self.error is not None:
            future.set_exception(EngineDeadError(f"the engine loop stopped: {self.error!r}"))
        else:
            self._send(("call", (fn, future)))
        return future

    def _report(self, out: RequestOutput) -> None:
        if self.on_output is not None:
            self.on_output(out)

    def _send(self, item: tuple[str, Any]) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake.set()

    # ------------------------------------------------------------ engine side
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    for out in outputs:
                        self._report(out)
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - the loop reports any failure, then stops
            log.exception("engine loop died")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for kind, payload in items:
            if kind == "abort":  # payload: the request's final output, for the metrics
                self.engine.abort(payload.request_id)
                self._report(payload)
                continue
            if kind == "call":
                fn, future = payload
                try:
                    result, error = fn(), None
                except Exception as e:  # noqa: BLE001 - the caller's to handle
                    result, error = None, e
                self._loop.call_soon_threadsafe(_settle, future, result, error)
                continue
            request_id, ids, params, prompt, grammar = payload
            try:
                self.engine.add_request(request_id, ids, params, prompt=prompt, grammar=grammar)
            except ValueError as e:  # validated already; reaching here is a bug, not a crash
                self._loop.call_soon_threadsafe(self._fail, request_id, e)

    # -------------------------------------------------------- event-loop side
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is None:  # aborted meanwhile
                continue
            pending.last = out
            if out.finished:
                del self._pending[out.request_id]
            pending.stream.put(out)

    def _fail(self, request_id: str, error: BaseException) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._pending):
            self._fail(request_id, EngineDeadError(f"the engine loop stopped: {error!r}"))
        with self._lock:  # calls the loop will never run
            calls = [payload for kind, payload in self._inbox if kind == "call"]
            self._inbox = [item for item in self._inbox if item[0] != "call"]
        for _, future in calls:
            _settle(future, None, EngineDeadError(f"the engine loop stopped: {error!r}"))
        if self.on_dead is not None:
            self.on_dead(error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # (its caller went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _aborted(request_id: str, pending: _Pending) -> RequestOutput:
    """The final state of a request ended by the server: unfinished choices say `abort`."""
    last = pending.last
    if last is None:
        outputs = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(pending.n)]
        return RequestOutput(request_id, None, pending.prompt_token_ids, outputs, finished=True)
    outputs = [
        o if o.finish_reason else dataclasses.replace(o, finish_reason="abort")
        for o in last.outputs
    ]
    return dataclasses.replace(last, outputs=outputs, finished=True)
