"""One model over several processes: jax.distributed joins the devices, a channel the steps.

Every rank runs the same jitted programs over one global mesh (JAX's multi-controller model:
NCCL between GPUs, ICI/DCN on TPU pods, gloo between CPU processes). Rank 0, the leader, owns
the scheduler, the tokenizer and the HTTP server; before each program it dispatches it sends
the followers which program (its number in a table every rank builds the same way at warm-up)
and the program's packed inputs, and they dispatch it too (`runner/mirror.py`).

The steps travel over a TCP channel of their own (`channel.py`, on the coordinator's PORT+1),
not through a JAX collective: `multihost_utils.broadcast_one_to_all` runs a small program per
call, compiles one for every new buffer size (20-50 ms), and costs ~1.7 ms per call on CPU,
against ~0.02 ms of the leader's time on the socket (0.03-0.05 ms until the follower has it;
`scripts/bench_multihost.py`). The channel also carries the lifecycle:

    start     every rank checks its options (engine/config), connects to the leader's channel
              (timing out on an unreachable leader: jaxlib would abort the process) and sends
              its options; the leader refuses a rank whose options differ, naming the first
              that does; then jax.distributed joins the devices, all before any weights load;
              after warm-up the ranks compare their program tables
    serve     heartbeats both ways every second; a rank silent for `HEARTBEAT_TIMEOUT` s or
              whose connection closes is lost: the leader tells the other followers which, every
              process logs it and exits 1 (the leader first ends its in-flight requests with an
              error); a follower that loses the leader names rank 0
    stop      the leader sends `stop` as it exits; followers exit 0
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jinfer.config.cli import flag
from jinfer.config.engine import EngineConfig
from jinfer.distributed.channel import Channel, ChannelClosed

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats
HEARTBEAT_TIMEOUT = float(os.environ.get("JINFER_HEARTBEAT_TIMEOUT", 30.0))  # then it is lost
EXIT_GRACE = 3.0  # seconds the leader gives failed requests' responses before it exits
_SAME_ON_EVERY_RANK = "every option but node_rank"


class GroupError(RuntimeError):
    """A process group that cannot start (named rank, address or option)."""


def initialize(config: EngineConfig) -> None:
    """Joins jax.distributed as `config.node_rank` of `config.nnodes` (gloo between CPUs)."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service takes SIGTERM for itself; the server's drain needs it.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address=config.dist_init_addr,
            num_processes=config.nnodes,
            process_id=config.node_rank,
            initialization_timeout=max(1, int(config.dist_timeout)),
        )
    except Exception as e:  # noqa: BLE001 - jaxlib raises its own error types
        raise GroupError(
            f"rank {config.node_rank} of {config.nnodes} could not join the group at "
            f"{config.dist_init_addr} within {config.dist_timeout:g} s (dist_timeout): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def group_devices(tensor_parallel_size: int, nnodes: int) -> list[Any]:
    """The mesh's devices: an equal share from every process, in process order."""
    devices = jax.devices()
    if len(devices) % tensor_parallel_size:
        raise GroupError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the group's "
            f"{len(devices)} devices ({nnodes} processes)"
        )
    share = tensor_parallel_size // nnodes
    chosen = []
    for p in range(jax.process_count()):
        mine = [d for d in devices if d.process_index == p]
        if len(mine) < share:
            raise GroupError(
                f"tensor_parallel_size={tensor_parallel_size} over {nnodes} processes needs "
                f"{share} devices in each; process {p} has {len(mine)}"
            )
        chosen += mine[:share]
    return chosen


class ProcessGroup:
    """This process's place in the group: the leader's channels to every follower, or a
    follower's to the leader."""

    def __init__(self, config: EngineConfig, model: str) -> None:
        self.rank = config.node_rank
        self.nnodes = config.nnodes
        self.config = config
        self.model = model
        self.followers: dict[int, Channel] = {}  # rank -> channel (leader)
        self.leader: Channel | None = None  # (follower)
        self.on_lost: list[Callable[[int, str], None]] = []  # called on the leader
        self._last_heard: dict[int, float] = {}
        self._inbox: dict[int, queue.Queue] = {}  # rank -> its messages but heartbeats
        self._closed = False
        self._stopped = False  # (follower) the leader said stop
        self.send_time = 0.0  # seconds the leader spent sending steps
        self.num_messages = 0
        self.num_bytes = 0  # of the messages' buffers

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------- start
    def _options(self) -> dict[str, Any]:
        opts = {name: getattr(self.config, name) for name in self.config.__dataclass_fields__}
        opts.pop("node_rank")
        return {"model": self.model, **opts}

    def connect(self) -> None:
        """The leader accepts every follower and checks its options; a follower connects and
        waits to be accepted. GroupError (on every rank) if the options differ."""
        host, _, port = self.config.dist_init_addr.rpartition(":")
        address = (host.strip("[]"), int(port) + 1)
        deadline = time.monotonic() + self.config.dist_timeout
        if self.is_leader:
            self._accept(address, deadline)
        else:
            self._join(address, deadline)

    def _accept(self, address: tuple[str, int], deadline: float) -> None:
        server = socket.create_server(address, family=_family(address[0]), reuse_port=False)
        mine = self._options()
        try:
            while len(self.followers) < self.nnodes - 1:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock, _ = server.accept()
                except TimeoutError:
                    missing = sorted(set(range(1, self.nnodes)) - set(self.followers))
                    raise GroupError(
                        f"ranks {missing} did not connect to {address[0]}:{address[1]} within "
                        f"{self.config.dist_timeout:g} s (dist_timeout)"
                    ) from None
                channel = Channel(sock)
                hello, _ = channel.recv(timeout=10)
                rank, theirs = hello.get("rank"), hello.get("options", {})
                diff = _first_difference(mine, theirs)
                if diff is not None:
                    error = (
                        f"rank {rank} was started with different options than rank 0 "
                        f"({_SAME_ON_EVERY_RANK} must match): {diff}"
                    )
                    channel.send({"op": "refuse", "error": error})
                    raise GroupError(error)
                self.followers[rank] = channel
            for channel in self.followers.values():
                channel.send({"op": "accept"})
        finally:
            server.close()

    def _join(self, address: tuple[str, int], deadline: float) -> None:
        while True:
            try:
                sock = socket.create_connection(address, timeout=5)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise GroupError(
                        f"rank {self.rank} of {self.nnodes} could not join the group at "
                        f"{self.config.dist_init_addr} within {self.config.dist_timeout:g} s "
                        f"(dist_timeout): rank 0's step channel on port {address[1]}: {e}"
                    ) from e
                time.sleep(0.2)
        sock.settimeout(None)
        self.leader = Channel(sock)
        self.leader.send({"op": "hello", "rank": self.rank, "options": _jsonable(self._options())})
        reply, _ = self.leader.recv(timeout=max(1.0, deadline - time.monotonic()))
        if reply["op"] == "refuse":
            raise GroupError(reply["error"])

    def check_programs(self, digest: str) -> None:
        """After warm-up: every rank built the same program table (GroupError if not)."""
        if self.is_leader:
            for rank, channel in self.followers.items():
                header, _ = self._next(rank, self.config.dist_timeout)
                if header.get("digest") != digest:
                    error = f"rank {rank} built other step programs than rank 0 at warm-up"
                    channel.send({"op": "refuse", "error": error})
                    raise GroupError(error)
                channel.send({"op": "accept"})
        else:
            self.leader.send({"op": "programs", "digest": digest})
            reply, _ = self.recv()
            if reply["op"] == "refuse":
                raise GroupError(reply["error"])

    # ------------------------------------------------------------------- steps
    def broadcast(self, header: dict[str, Any], *buffers: np.ndarray) -> None:
        """Sends a step message to every follower (leader)."""
        t0 = time.perf_counter()
        for rank, channel in self.followers.items():
            try:
                channel.send(header, *buffers)
            except ChannelClosed as e:
                self.lost(rank, str(e))
                raise
        self.send_time += time.perf_counter() - t0
        self.num_messages += 1
        self.num_bytes += sum(b.nbytes for b in buffers)

    def recv(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The leader's next message (follower)."""
        return self._next(0, None)

    def _next(self, rank: int, timeout: float | None) -> tuple[dict[str, Any], list[np.ndarray]]:
        try:
            return self._inbox[rank].get(timeout=timeout)
        except queue.Empty:
            raise GroupError(f"rank {rank} sent nothing for {timeout:g} s") from None

    # --------------------------------------------------------------- lifecycle
    def _start_lifecycle(self) -> None:
        """A reader per peer (heartbeats noted, other messages queued for `recv`), a watchdog
        over them, and this rank's own heartbeats."""
        peers = self.followers if self.is_leader else {0: self.leader}
        now = time.monotonic()
        for rank, channel in peers.items():
            self._inbox[rank] = queue.Queue()
            self._last_heard[rank] = now
            threading.Thread(
                target=self._read, args=(rank, channel), name=f"jinfer-rank{rank}", daemon=True
            ).start()
        threading.Thread(target=self._watch, name="jinfer-heartbeat", daemon=True).start()

    def _read(self, rank: int, channel: Channel) -> None:
        while not self._closed:
            try:
                header, buffers = channel.recv()
            except ChannelClosed as e:
                if self._stopped:
                    return
                self.lost(rank, str(e))
                return
            self._last_heard[rank] = time.monotonic()
            if header["op"] == "stop":
                self._stopped = True
            if header["op"] == "lost":  # (from the leader) another rank is gone
                self.lost(int(header["rank"]), f"rank 0 lost it: {header['reason']}")
                return
            if header["op"] != "heartbeat":
                self._inbox[rank].put((header, buffers))

    def _watch(self) -> None:
        peers = self.followers if self.is_leader else {0: self.leader}
        while not self._closed:
            for rank, channel in peers.items():
                try:
                    channel.send({"op": "heartbeat"})
                except ChannelClosed:
                    pass  # its reader says which rank
                silent = time.monotonic() - self._last_heard[rank]
                if silent > HEARTBEAT_TIMEOUT and not self._stopped:
                    self.lost(rank, f"nothing heard for {silent:.0f} s")
            time.sleep(HEARTBEAT_INTERVAL)

    def lost(self, rank: int, reason: str) -> None:
        """A rank is gone: the group cannot compute any more. Logs which, tells the leader's
        listeners (its server fails in-flight requests), and exits 1 (after `EXIT_GRACE` s
        on the leader, for the failed responses to go out)."""
        if self._closed or self._stopped:
            return
        self._closed = True
        log.error(
            "lost rank %d of %d (%s): the group cannot go on; exiting with status 1 for a "
            "supervisor to restart every rank",
            rank,
            self.nnodes,
            reason,
        )
        for other, channel in self.followers.items():  # (leader) so they name the same rank
            if other != rank:
                try:
                    channel.send({"op": "lost", "rank": rank, "reason": reason})
                except ChannelClosed:
                    pass
        for callback in self.on_lost:
            try:
                callback(rank, reason)
            except Exception:  # noqa: BLE001 - exiting anyway
                log.exception("lost-rank callback failed")
        if self.is_leader:
            time.sleep(EXIT_GRACE)
        logging.shutdown()
        os._exit(1)  # a rank stuck in a collective with the lost one cannot be joined

    def close(self) -> None:
        """Ends the group cleanly: the leader tells every follower to stop."""
        if self._closed:
            return
        self._closed = True
        for channel in self.followers.values():
            try:
                channel.send({"op": "stop"})
            except ChannelClosed:
                pass


def join(config: EngineConfig, model: str) -> ProcessGroup:
    """This process's group, started and checked (before any weights load)."""
    group = ProcessGroup(config, model)
    group.connect()  # first: jaxlib aborts the process on a coordinator it cannot reach
    initialize(config)
    group_devices(config.tensor_parallel_size, config.nnodes)  # refuse a mesh that cannot be
    # Loss detection only now: a rank refusing the group above exits, and its peers must refuse
    # it for their own reason, not report it lost.
    group._start_lifecycle()
    atexit.register(group.close)
    log.info(
        "rank %d of %d joined (%d devices in all)", group.rank, group.nnodes, jax.device_count()
    )
    return group


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Whatever writes to file descriptor 1 inside goes to 2. Gloo announces its connections
    on stdout from C++ at a group's first collective (at warm-up), and a script's stdout is for
    its output (`scripts/generate.py`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        for k, v in options.items()
    }


def _first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    for name, value in _jsonable(mine).items():
        other = theirs.get(name, "<missing>")
        if other != value:
            return f"{flag(name)} is {value!r} on rank 0 and {other!r} there"
    return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
