"""scripts/_bench_util.py: the device's busy time read from a profiler trace."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # as running a script does
from _bench_util import device_busy_seconds, device_busy_share  # noqa: E402


def _trace(path: Path, events: list[dict]) -> str:
    meta = [
        dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
        dict(ph="M", name="process_name", pid=7, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="thread_name", pid=7, tid=1, args=dict(name="Stream #13(Compute)")),
        dict(ph="M", name="thread_name", pid=7, tid=2, args=dict(name="Stream #14(MemcpyD2H)")),
        dict(ph="M", name="thread_name", pid=7, tid=3, args=dict(name="XLA Modules")),
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return str(path)


def test_device_busy_time_is_the_union_of_the_device_lines(tmp_path):
    x = lambda pid, tid, ts, dur: dict(ph="X", pid=pid, tid=tid, ts=ts, dur=dur, name="k")  # noqa: E731
    path = _trace(
        tmp_path / "t.json.gz",
        [
            x(7, 1, 0, 100),  # a kernel
            x(7, 2, 50, 100),  # a copy overlapping it: [0, 150) once
            x(7, 1, 300, 50),  # after a gap of 150
            x(7, 3, 0, 1000),  # the module spans the gaps: not busy time
            x(1, 9, 0, 5000),  # the host's events: not the device's
        ],
    )
    assert device_busy_seconds(path) == pytest.approx(200e-6)


def test_a_trace_without_a_device_process_has_no_busy_time(tmp_path):
    path = tmp_path / "cpu.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump([dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU"))], f)
    assert device_busy_seconds(str(path)) is None


def test_a_cpu_run_is_reported_as_missing_never_as_zero():
    import jax.numpy as jnp

    busy, wall = device_busy_share(lambda: jnp.ones(4).sum().block_until_ready())
    assert busy is None and wall > 0
