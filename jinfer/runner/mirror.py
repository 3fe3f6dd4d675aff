"""The leader's programs, run again on every follower of a process group.

Every rank warms up the same way, so every rank meets the same step programs in the same order;
each records the layout of each program's packed inputs (`packing.Layout`: the tree and shapes,
the program's static argument) in a `ProgramTable`, and the ranks compare the tables' digests.
From then on a program is named by its number in the table: the leader sends, before each
dispatch, that number and the program's two packed buffers (`forward` or `sample`), and a
follower dispatches the same program on its devices (`follow`). Only a program's inputs travel:
the KV cache, the logits and the sampled tokens each rank keeps on its own devices, and the
collectives inside the programs keep the ranks in step.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from jinfer.runner import packing

log = logging.getLogger(__name__)


class ProgramTable:
    """The layouts of every program run at warm-up, numbered in the order first seen."""

    def __init__(self) -> None:
        self.numbers: dict[tuple[str, packing.Layout], int] = {}
        self.entries: list[tuple[str, packing.Layout]] = []

    def record(self, kind: str, layout: packing.Layout) -> None:
        if (kind, layout) not in self.numbers:
            self.numbers[(kind, layout)] = len(self.entries)
            self.entries.append((kind, layout))

    def number(self, kind: str, layout: packing.Layout) -> int:
        try:
            return self.numbers[(kind, layout)]
        except KeyError:
            raise RuntimeError(
                f"a {kind} program that warm-up did not build: followers cannot run it"
            ) from None

    def digest(self) -> str:
        h = hashlib.sha256()
        for kind, layout in self.entries:
            h.update(f"{kind}|{layout.leaves}|{len(layout.leaves)}\n".encode())
        return h.hexdigest()


class StepMirror:
    """Tells the followers each program the leader dispatches (once warm-up has built them)."""

    def __init__(self, group: Any) -> None:  # a distributed.multihost.ProcessGroup
        self.group = group
        self.table = ProgramTable()
        self.recording = True  # during warm-up every rank runs its own

    def forward(
        self, layout: packing.Layout, ibuf: np.ndarray, fbuf: np.ndarray, prev: str,
        num_layers: int | None,
    ) -> None:  # fmt: skip
        """`prev`: "idle" or "last", the tokens the program reads from the step before."""
        self._send("forward", layout, ibuf, fbuf, prev=prev, layers=num_layers)

    def sample(self, layout: packing.Layout, ibuf: np.ndarray, fbuf: np.ndarray) -> None:
        self._send("sample", layout, ibuf, fbuf)

    def _send(self, kind: str, layout, ibuf, fbuf, **extra: Any) -> None:
        if self.recording:
            self.table.record(kind, layout)
            return
        header = {"op": kind, "program": self.table.number(kind, layout), **extra}
        self.group.broadcast(header, ibuf, fbuf)

    def end_warmup(self) -> None:
        """Warm-up is over: the ranks compare tables, then the leader's programs travel."""
        self.group.check_programs(self.table.digest())
        self.recording = False
        log.info(
            "rank %d: %d step programs in the group's table",
            self.group.rank,
            len(self.table.entries),
        )


def follow(runner: Any, mirror: StepMirror) -> None:
    """A follower's loop: runs every program the leader sends until it says stop."""
    group = mirror.group
    logits = None  # the last forward pass's, which the next sample reads
    last_tokens = runner.idle_tokens  # the last sampler's tokens, which a forward may read
    while True:
        header, buffers = group.recv()
        op = header["op"]
        if op == "stop":
            log.info("rank %d: the leader stopped", group.rank)
            return
        kind, layout = mirror.table.entries[header["program"]]
        if kind != op:
            raise RuntimeError(f"program {header['program']} is a {kind}, not a {op}")
        ibuf, fbuf = buffers
        if op == "forward":
            prev = runner.idle_tokens if header["prev"] == "idle" else last_tokens
            logits = runner.run_forward(layout, ibuf, fbuf, prev, header["layers"])
        else:
            _, last_tokens = runner.sampler.run_packed(logits, layout, ibuf, fbuf)
