"""One model over two processes on localhost (jax.distributed with gloo, tensor parallel over
both): `python -m jinfer.serve --nnodes 2 --node-rank R --dist-init-addr ...` serves the same
greedy tokens as one process, and the group starts, stops and fails as a group."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_util import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.slow

SMALL = ("--max-model-len", "256", "--max-num-batched-tokens", "32", "--max-num-seqs", "4")
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three colors:",
    "Once upon a time, in a land far away,",
]
# Two full 64-token pages: its second request is a prefix-cache hit.
SHARED = "You are a careful assistant. Answer in one short sentence. " * 12


class Group:
    """A leader (HTTP on a free port) and a follower, started together."""

    def __init__(self, *args: str, nnodes: int = 2, timeout: float = 600) -> None:
        port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        common = ["--nnodes", str(nnodes), "--dist-init-addr", f"127.0.0.1:{port}"]
        common += ["--tensor-parallel-size", str(nnodes), "--dist-timeout", "120", *args]
        self.procs = [self._start(["--port", str(self.port), *common, "--node-rank", "0"])]
        self.procs += [self._start([*common, "--node-rank", str(r)]) for r in range(1, nnodes)]
        ok = wait_until(lambda: self.health() == 200 or self.exited(), timeout, 0.2)
        if not ok or self.exited():
            self.kill()
            raise RuntimeError("group did not start:\n" + self.logs())

    def _start(self, args: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "jinfer.serve", *args]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JINFER_HEARTBEAT_TIMEOUT": "10"}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        proc.log = []
        threading.Thread(target=lambda: proc.log.extend(proc.stdout), daemon=True).start()
        return proc

    def health(self) -> int | None:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    def exited(self) -> bool:
        return any(p.poll() is not None for p in self.procs)

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}\n" + "".join(p.log[-30:]) for r, p in enumerate(self.procs))


def complete(url: str, prompt: str, max_tokens: int = 24) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["tokens"]


def stream_chat(url: str, prompt: str) -> str:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    text.append(delta[0]["delta"]["content"])
    return "".join(text)


def workload(url: str) -> dict:
    """Sequential, streamed, concurrent (more than max_num_seqs, in a pool of 5 usable pages
    that 4 requests crossing into their second page preempt) and prefix-cache-hitting
    requests; what each returned."""
    out = {"sequential": [complete(url, p) for p in PROMPTS[:3]]}
    out["streamed"] = [stream_chat(url, p) for p in PROMPTS[3:5]]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        out["concurrent"] = list(pool.map(lambda p: complete(url, p, 64), PROMPTS))
    out["prefix"] = [complete(url, SHARED + q) for q in ("Why is the sky blue?", "What is 2+2?")]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    out["counters"] = {
        name: _counter(metrics, name) for name in ("vllm:prefix_cache_hits", "vllm:num_preemptions")
    }
    return out


def _counter(metrics: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.parametrize(
    "model, pages",
    [("smollm2-135m-instruct", "6"), ("gemma3-270m", "6")],
)
def test_two_processes_serve_the_same_tokens_as_one(model, pages):
    args = ("--model", model, *SMALL, "--num-pages", pages)
    one = ServerProcess(*args)
    try:
        expected = workload(one.url)
    finally:
        assert one.stop() == 0
    group = Group(*args)
    try:
        got = workload(group.url)
        counters = got.pop("counters")  # (they depend on how the concurrent requests arrive)
        expected.pop("counters")
        assert got == expected
        assert counters["vllm:prefix_cache_hits"] > 0
        assert counters["vllm:num_preemptions"] > 0
        # SIGTERM to the leader drains and stops every rank, cleanly.
        group.procs[0].send_signal(signal.SIGTERM)
        assert group.wait(60) == [0, 0], group.logs()
        assert "the leader stopped" in "".join(group.procs[1].log)
    finally:
        group.kill()


def test_a_lost_follower_fails_requests_and_every_rank_exits_naming_it():
    # Three ranks (SmolLM2's 9 heads, 3 KV heads and widths divide by 3): rank 2 dies.
    group = Group("--model", "smollm2-135m-instruct", *SMALL, "--num-pages", "16", nnodes=3)
    try:
        assert complete(group.url, PROMPTS[0])  # the group serves
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"prompt": PROMPTS[1], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
            pending = pool.submit(httpx.post, group.url + "/v1/completions", json=body, timeout=120)
            time.sleep(1.0)  # decoding
            group.procs[2].kill()
            statuses = []
            assert wait_until(
                lambda: statuses.append(group.health()) or group.procs[0].poll() is not None, 60
            )
            try:
                answer = pending.result(timeout=60)
                assert answer.status_code >= 500, answer.text  # an error, not a hang
            except httpx.TransportError:
                pass  # (or the connection ended with the process)
        assert 503 in statuses
        assert group.wait(60)[:2] == [1, 1], group.logs()
        for rank in (0, 1):  # each survivor names the rank that was lost
            assert "lost rank 2 of 3" in "".join(group.procs[rank].log), group.logs()
    finally:
        group.kill()


def test_followers_of_a_lost_leader_exit_naming_it():
    group = Group("--model", "smollm2-135m-instruct", *SMALL, "--num-pages", "16")
    try:
        assert complete(group.url, PROMPTS[0])
        group.procs[0].kill()
        assert group.wait(60)[1] == 1, group.logs()
        assert "lost rank 0 of 2" in "".join(group.procs[1].log), group.logs()
    finally:
        group.kill()


def test_generate_script_on_two_processes_prints_what_one_prints():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "generate.py")
    engine = ["--model", "smollm2-135m-instruct", *SMALL, "--num-pages", "16"]
    work = ["--temperature", "0", "--max-tokens", "16", "--prompt", PROMPTS[1], "--chat", "Hi!"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, script, *engine, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
        )  # fmt: skip

    one = start(*work).communicate(timeout=300)[0]
    addr = ("--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}")
    addr += ("--tensor-parallel-size", "2")
    # Rank 1 runs the same command with no work of its own (it would be ignored if given).
    procs = [start(*addr, "--node-rank", "0", *work), start(*addr, "--node-rank", "1")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    assert outs[0][0] == one and "--- [2] chat: Hi!" in one
    assert outs[1][0] == ""  # a follower prints nothing


# ---------------------------------------------------------------- bad configurations
def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jinfer.serve", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_a_rank_out_of_range_is_refused_before_anything_starts():
    r = _run("--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "127.0.0.1:1")
    assert r.returncode == 2
    assert "--node-rank must be below nnodes=2, got 2" in r.stderr


def test_an_unreachable_coordinator_times_out_with_a_message():
    addr = f"127.0.0.1:{free_port()}"  # nobody there
    args = ("--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr, "--dist-timeout", "3")
    args += ("--tensor-parallel-size", "2")
    t0 = time.monotonic()
    r = _run(*args)
    assert r.returncode == 1
    assert f"rank 1 of 2 could not join the group at {addr} within 3 s" in r.stderr + r.stdout
    assert time.monotonic() - t0 < 60


def _pair(leader: tuple[str, ...], follower: tuple[str, ...]) -> list[str]:
    """Runs a two-rank group that must fail at start; each rank's output."""
    addr = f"127.0.0.1:{free_port()}"
    common = ("--nnodes", "2", "--dist-init-addr", addr, "--dist-timeout", "30")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jinfer.serve",
                *common,
                "--node-rank",
                str(rank),
                "--port",
                str(free_port()),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for rank, extra in enumerate((leader, follower))
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    for out in outs:
        assert "loaded smollm2" not in out  # refused before the weights
    return outs


def test_mismatched_flags_between_ranks_are_refused_naming_the_flag():
    tp = ("--tensor-parallel-size", "2")
    outs = _pair((*tp, "--max-num-seqs", "4"), (*tp, "--max-num-seqs", "8"))
    for out in outs:
        assert "--max-num-seqs is 4 on rank 0 and 8 there" in out


def test_a_tensor_parallel_size_the_devices_do_not_divide_is_refused():
    tp = ("--tensor-parallel-size", "4")  # two processes of one CPU device each
    for out in _pair(tp, tp):
        assert "tensor_parallel_size=4 does not divide the group's 2 devices" in out
