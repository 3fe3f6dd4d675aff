"""Measurements the benchmark scripts share: the machine's ceilings, one cold prefill, decode.

Scripts run as `python scripts/NAME.py`, so `scripts/` is on the path and they import this as
`_bench_util`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn: Callable[[], Any], reps: int = 10, rounds: int = 3) -> float:
    """Median seconds per call over `rounds` rounds of `reps` calls, after one warm-up call
    (which compiles). Results are waited for once per round, so calls may overlap."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a jitted device-to-device copy, `a + 1` over `nbytes` (each byte read once and
    written once, both counted)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda a: a + 1)
    return 2 * nbytes / timed(lambda: f(x), reps=5)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a jitted sum over `nbytes` (each byte read once): what streaming weights
    can reach. On this project's CPU it is ~4x `copy_bandwidth`, whose writes are the slow
    half (a 1 GiB buffer, larger than the 300 MB L3: 30 against 8 GB/s)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    return nbytes / timed(lambda: f(x), reps=5)


def gemm_rate(n: int, dtype: Any = jnp.float32) -> float:
    """FLOP/s of one n x n x n matrix product of `dtype` inputs, accumulated in float32 as the
    model's weight products are (`model.dense`)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / timed(lambda: f(a, a), reps=3, rounds=5)


def random_ids(n: int, seed: int = 0) -> list[int]:
    """n random token ids clear of the first 100 (where special tokens live)."""
    return np.random.default_rng(seed).integers(100, 40000, n).tolist()


def prefill_rate(llm: Any, ids: list[int], warm: bool = True) -> float:
    """Tokens/s of one cold prompt, timed to its first token.

    `warm` first runs the reversed prompt (same length, so the same programs and as many pages,
    but nothing of the timed prompt for the prefix cache to find)."""
    from jinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    if warm:
        llm.generate([{"prompt_token_ids": ids[::-1]}], params, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    return len(ids) / (time.perf_counter() - t0)


def decode_rate(llm: Any, batch: int, prompt_len: int, steps: int) -> float:
    """Output tok/s of `batch` requests decoding together, timed over steady-state steps only
    (every prompt prefilled first)."""
    from jinfer import SamplingParams

    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"d{batch}-{i}", random_ids(prompt_len, seed=batch * 1000 + i), params)
    while any(s.num_known_output_tokens == 0 for s in eng.scheduler.running) or eng.num_waiting():
        eng.step()  # prefill everything first
    start = eng.stats.num_generated_tokens
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    elapsed = time.perf_counter() - t0
    return (eng.stats.num_generated_tokens - start) / elapsed


# Lines of a trace's device process that span other lines' events (a module from its first
# kernel to its last, gaps included): not the device's own busy time.
SPANNING_LINES = ("XLA Modules", "Steps")


def device_busy_seconds(trace_path: str) -> float | None:
    """Seconds the device was busy in a Perfetto trace written by `jax.profiler.trace`: the
    union of the intervals on its device processes (`/device:GPU:0`, `/device:TPU:0`: kernels
    and copies, as the device timed them), None when the trace has none (XLA:CPU runs its
    programs on the host's threads)."""
    with gzip.open(trace_path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes, lines = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            lines[(e["pid"], e.get("tid"))] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if not devices:
        return None
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X"
        and e.get("pid") in devices
        and not lines.get((e["pid"], e.get("tid")), "").startswith(SPANNING_LINES)
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # the union: overlapping streams count once
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6  # (trace times are microseconds)


def device_busy_share(run: Callable[[], Any]) -> tuple[float | None, float]:
    """`run()` under JAX's profiler: the share of its wall time the device was busy (from the
    device's own timings, `device_busy_seconds`; None on CPU) and the wall seconds. Tracing
    costs the host some time, so the share is, if anything, low."""
    with tempfile.TemporaryDirectory() as out:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        paths = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
        busy = device_busy_seconds(paths[0]) if paths else None
    return (None if busy is None else busy / wall), wall
