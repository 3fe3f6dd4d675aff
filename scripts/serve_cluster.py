"""Replicas behind a router: N jinfer servers on localhost and vllm-router in front of them.

    python scripts/serve_cluster.py --replicas 2 --policy cache_aware --port 8000 \\
        -- --model smollm2-135m-instruct --max-num-seqs 16

Everything after `--` goes to every replica's `python -m jinfer.serve`. Replicas listen on
the ports after `--port` (8001, 8002, ...), each started once the one before is ready (the later
ones load their programs from the compile cache), then the router listens on `--port` with the
`--policy` vllm-router names (`cache_aware` keeps a conversation on the replica that holds its
prefix; `round_robin`, `power_of_two`, `consistent_hash`, `random`; `kv_aware` routes on the KV
events each replica publishes: `--kv-events`). `--replica-nnodes K` makes each replica a
process group of K ranks on this machine (`--nnodes`, tensor parallel over them), as it would
span K hosts. SIGINT or SIGTERM stops the router, then every replica (each drains).

vllm-router is an optional dependency: `pip install 'jinfer[router]'` (or `vllm-router`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("serve_cluster")

POLICIES = ("cache_aware", "round_robin", "power_of_two", "consistent_hash", "random", "kv_aware")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_binary() -> str:
    """The vllm-router launcher beside this Python, or on PATH; a clear error if neither."""
    beside = Path(sys.executable).parent / "vllm-router"
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if found is None:
        raise SystemExit(
            "vllm-router is not installed: pip install 'jinfer[router]' (or vllm-router)"
        )
    return found


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Process:
    """A child process whose output is kept (the last lines) for error messages."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            del self.lines[:-200]

    def tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


class Replica:
    """One jinfer server: a single process, or a group of `nnodes` ranks on this machine.
    `kv_events`: it publishes its KV cache events on two free ports (live, replay)."""

    def __init__(
        self, index: int, port: int, server_args: list[str], nnodes: int = 1,
        kv_events: bool = False,
    ) -> None:  # fmt: skip
        self.index = index
        self.url = f"http://127.0.0.1:{port}"
        self.kv_endpoints: tuple[str, str] | None = None
        if kv_events:
            self.kv_endpoints = (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
            config = {"enable_kv_cache_events": True, "endpoint": self.kv_endpoints[0],
                      "replay_endpoint": self.kv_endpoints[1]}  # fmt: skip
            server_args = [*server_args, "--kv-events-config", json.dumps(config)]
        base = [sys.executable, "-m", "jinfer.serve", *server_args]
        env = {**os.environ}
        if nnodes == 1:
            self.ranks = [Process(f"replica{index}", [*base, "--port", str(port)], env)]
            return
        group = ["--nnodes", str(nnodes), "--dist-init-addr", f"127.0.0.1:{free_port()}"]
        if "--tensor-parallel-size" not in server_args:
            group += ["--tensor-parallel-size", str(nnodes)]
        self.ranks = [
            Process(
                f"replica{index}.rank{rank}",
                [*base, *group, "--node-rank", str(rank), "--port", str(port if rank == 0 else 0)],
                env,
            )
            for rank in range(nnodes)
        ]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _healthy(self.url):
                return
            dead = [r for r in self.ranks if not r.alive()]
            if dead:
                raise RuntimeError(
                    f"{dead[0].name} exited with {dead[0].proc.returncode}:\n{dead[0].tail()}"
                )
            time.sleep(0.3)
        raise TimeoutError(f"replica {self.index} at {self.url} not ready in {timeout:g} s")

    def alive(self) -> bool:
        return all(r.alive() for r in self.ranks)

    def stop(self) -> list[int | None]:
        return [self.ranks[0].stop()] + [r.stop(60) for r in self.ranks[1:]]  # leader first

    def kill(self) -> None:
        for r in self.ranks:
            r.kill()

    def block_size(self) -> int:
        """Its KV page size, from vLLM's `vllm:cache_config_info` gauge."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        match = re.search(r'^vllm:cache_config_info\{[^}]*block_size="(\d+)"', text, re.M)
        if match is None:
            raise RuntimeError(f"replica {self.index} reports no vllm:cache_config_info")
        return int(match.group(1))

    def metrics(self) -> dict[str, float]:
        """The replica's counters, by name (label sets summed)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out


class Router:
    """vllm-router over `workers`, with `policy`."""

    def __init__(
        self, port: int, workers: list[str], policy: str, extra: list[str] | None = None
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [router_binary(), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--worker-urls", *workers, "--policy", policy]
        cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        cmd += ["--log-level", "warning", *(extra or [])]
        self.process = Process("router", cmd)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"vllm-router exited:\n{self.process.tail()}")
            if _healthy(self.url):
                return
            time.sleep(0.2)
        raise TimeoutError(f"vllm-router not ready in {timeout:g} s:\n{self.process.tail()}")

    def stop(self) -> None:
        self.process.stop(20)


class Cluster:
    """Replicas, then a router in front of them; `stop()` ends both."""

    def __init__(
        self,
        replicas: int,
        server_args: list[str],
        *,
        policy: str = "cache_aware",
        port: int | None = None,
        replica_nnodes: int = 1,
        router_args: list[str] | None = None,
        kv_events: bool = False,
        timeout: float = 900,
    ) -> None:
        self.port = port or free_port()
        self.server_args = server_args
        kv_events = kv_events or policy == "kv_aware"
        self.replicas: list[Replica] = []
        self.router: Router | None = None
        try:
            for i in range(replicas):  # one by one: the later ones hit the compile cache
                port_i = self.port + 1 + i if port else free_port()
                replica = Replica(i, port_i, server_args, replica_nnodes, kv_events)
                self.replicas.append(replica)
                replica.wait_ready(timeout)
                log.info("replica %d ready at %s", i, replica.url)
            self.start_router(policy, router_args)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.router.url

    def kv_event_args(self) -> list[str]:
        """vllm-router's flags for the replicas' KV event sources (the kv_aware policy)."""
        if any(r.kv_endpoints is None for r in self.replicas):
            raise ValueError("kv_aware routing needs replicas started with kv_events=True")
        args = []
        for r in self.replicas:
            args += ["--kv-event-source", f"{r.url}={r.kv_endpoints[0]}"]
            args += ["--kv-event-replay-source", f"{r.url}={r.kv_endpoints[1]}"]
        model = _flag(self.server_args, "--model") or "jinfer"
        block_size = self.replicas[0].block_size()
        return [*args, "--kv-event-block-size", str(block_size), "--kv-event-model", model]

    def start_router(self, policy: str, extra: list[str] | None = None) -> None:
        """(Re)starts the router with `policy` over the replicas."""
        if self.router is not None:
            self.router.stop()
        extra = list(extra or [])
        if policy == "kv_aware":
            extra += self.kv_event_args()
        self.router = Router(self.port, [r.url for r in self.replicas], policy, extra)
        self.router.wait_ready()
        log.info("vllm-router (%s) at %s over %d replicas", policy, self.url, len(self.replicas))

    def reset_prefix_caches(self) -> None:
        for r in self.replicas:
            if r.alive():
                httpx.post(r.url + "/reset_prefix_cache", timeout=30).raise_for_status()

    def stop(self) -> dict[str, Any]:
        codes: dict[str, Any] = {}
        if self.router is not None:
            self.router.stop()
        for r in self.replicas:
            codes[f"replica{r.index}"] = r.stop()
        return codes


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policy", choices=POLICIES, default="cache_aware")
    p.add_argument("--port", type=int, default=8000, help="the router's; replicas take the next")
    p.add_argument("--replica-nnodes", type=int, default=1, help="ranks per replica (processes)")
    p.add_argument(
        "--router-arg", action="append", default=[], help="a flag for vllm-router (repeat)"
    )
    p.add_argument(
        "--kv-events",
        action="store_true",
        help="replicas publish KV cache events (always with --policy kv_aware)",
    )
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas must be at least 1, got {args.replicas}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    router_binary()  # before anything starts
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(
        args.replicas,
        server_args,
        policy=args.policy,
        port=args.port,
        replica_nnodes=args.replica_nnodes,
        router_args=args.router_arg,
        kv_events=args.kv_events,
    )
    log.info("serving on %s (Ctrl-C stops)", cluster.url)
    while not stop.wait(1.0):
        if not cluster.router.process.alive():
            log.error("vllm-router exited:\n%s", cluster.router.process.tail())
            break
    log.info("stopping: %s", cluster.stop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
