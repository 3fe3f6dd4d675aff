"""Test helpers for the HTTP server: a live uvicorn on a free localhost port, and an engine whose
model is replaced by a hand-computable one.

`EchoRunner` stands in for the `ModelRunner` only: scheduling, paging, stop handling,
detokenization, aborts and the whole HTTP stack are the real ones. Its "model" repeats the
prompt token by token, so the completion of a prompt with ids [a, b, c] is a, b, c, a, b, ...
and every expected text can be computed by hand with the tokenizer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
import uvicorn

from jinfer.attention.kv_cache import init_cache
from jinfer.config.engine import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.runner.model_runner import StepResult
from jinfer.sampling_params import MAX_LOGPROBS
from jinfer.scheduler.plan import StepPlan
from jinfer.server.app import ServerConfig, create_app


class EchoRunner:
    """The next token of a sequence is its prompt's token at (outputs so far) mod prompt length.
    Its logprob is -0.5; the top-N are that token, then the ids after it, at -0.5 - rank."""

    def __init__(self, vocab_size: int, step_delay: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.step_delay = step_delay
        self.fail = False  # set to make the next step raise (a dying engine)

    def warmup(self) -> float:
        return 0.0

    def dispatch(self, plan: StepPlan, prev: Any = None) -> EchoStep:
        """The tokens follow from what the host knows at dispatch: the count of outputs,
        placeholders of a step in flight included (the runner's `dispatch` protocol)."""
        if self.fail:
            raise RuntimeError("injected engine failure")
        seqs = [s for s, n in plan.scheduled if s.num_computed_tokens + n == s.num_tokens]
        tokens = np.array(
            [s.prompt_token_ids[s.num_output_tokens % s.num_prompt_tokens] for s in seqs], np.int32
        )
        ranks = np.arange(MAX_LOGPROBS, dtype=np.int32)
        top_ids = (tokens[:, None] + ranks[None, :]) % self.vocab_size
        top_lps = np.broadcast_to(-0.5 - ranks, top_ids.shape).astype(np.float32)
        logprobs = np.full(len(seqs), -0.5, np.float32)
        result = StepResult(seqs, tokens, logprobs, top_ids, top_lps, 0.0, self.step_delay)
        return EchoStep(seqs, result, self.step_delay)

    def forward(self, plan: StepPlan, prev: Any = None) -> EchoStep:
        """The runner's two-part dispatch: the echo step is whole at once."""
        return self.dispatch(plan, prev)

    def sample(self, step: EchoStep) -> EchoStep:
        return step


class EchoStep:
    """A dispatched echo step: its results are ready `delay` seconds after it was dispatched."""

    def __init__(self, seqs: list, result: StepResult, delay: float) -> None:
        self.seqs, self._result = seqs, result
        self._ready = time.monotonic() + delay

    def result(self) -> StepResult:
        time.sleep(max(0.0, self._ready - time.monotonic()))
        return self._result


def echo_tokens(prompt_ids: list[int], n: int) -> list[int]:
    return [prompt_ids[i % len(prompt_ids)] for i in range(n)]


def make_echo_engine(tokenizer: Any, step_delay: float = 0.0, **config: Any) -> Engine:
    """A real `Engine` (scheduler, pages, stops) over `EchoRunner`."""
    from conftest import tiny_config

    cfg = tiny_config(vocab_size=tokenizer.vocab_size)
    config.setdefault("max_model_len", 256)
    config.setdefault("max_num_seqs", 8)
    config.setdefault("max_num_batched_tokens", 64)
    config.setdefault("num_pages", 200)
    econfig = EngineConfig(**config).resolve(cfg, "cpu")
    cache = init_cache(cfg, econfig.num_pages, econfig.page_size)
    engine = Engine(cfg, None, cache, tokenizer, econfig)
    engine.runner = EchoRunner(cfg.vocab_size, step_delay)
    return engine


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def state(self) -> Any:
        return self.app.state.jinfer

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready after {timeout} s")


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


MODEL = "echo-model"


def start(tok, config: ServerConfig | None = None, step_delay: float = 0.002, **engine_kw):
    engine = make_echo_engine(tok, step_delay=step_delay, **engine_kw)
    app = create_app(config or ServerConfig(MODEL), lambda: (engine, tok))
    server = LiveServer(app)
    server.engine = engine
    return server


def expected_text(tok, prompt: str, n: int) -> str:
    return tok.decode(echo_tokens(tok.encode(prompt), n))


def chat_prompt_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def assert_idle(server) -> None:
    engine = server.engine
    assert wait_until(lambda: not engine.has_unfinished_requests() and not engine.requests)
    assert engine.kv_cache_usage() == 0.0
    engine.check_invariants()


# A real `python -m jinfer.serve` in a subprocess (the real-model server tests).
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "jinfer.serve", "--port", str(self.port), *args]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.log: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()
        ok = wait_until(lambda: self._health() == 200 or self.proc.poll() is not None, timeout, 0.2)
        if not ok or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-40:]))

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def _health(self) -> int | None:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def serve_real_model(*args: str) -> Any:
    """The real-model test modules' server: SmolLM2 with small batches, stopped (exit 0 checked)
    when the module is done. Use as `yield from serve_real_model()` in a module fixture."""
    s = ServerProcess(
        "--max-model-len", "1024", "--max-num-batched-tokens", "64", "--max-num-seqs", "8", *args
    )  # fmt: skip
    yield s
    assert s.stop() == 0
