"""What a step's broadcast to the other ranks costs, on two processes on this machine.

    python scripts/bench_multihost.py                 # the step channel against multihost_utils
    python scripts/bench_multihost.py --engine        # the leader's time per step, SmolLM2 over 2

Default: two processes join as a real group (`multihost.join`: the step channel, then
jax.distributed with gloo) and send the same step messages (an int32 and a float32 buffer, at
sizes spanning a decode step's to a long prefill's) two ways, in alternating rounds:

    channel_send_ms       the leader's time in `ProcessGroup.broadcast` per message (what its
                          step loop waits for)
    channel_delivered_ms  per message, from the first send until the follower acknowledges the
                          last of the round (so delivery through the reader thread counts too)
    broadcast_ms          `jax.experimental.multihost_utils.broadcast_one_to_all` per message, a
                          collective, so both ranks wait for it (its first call per size compiles:
                          `broadcast_compile_ms`)

Medians over rounds. `--engine`: a real two-process group serves a greedy workload on SmolLM2
(tensor parallel over both) and reports steps, messages, bytes and the leader's send time per
step against the wall time per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

log = logging.getLogger("bench_multihost")

SIZES = (256, 4096, 65536)  # int32 elements per message; the float32 buffer is an eighth


def _group(rank: int, port: int):
    from jinfer.config.engine import EngineConfig
    from jinfer.distributed import multihost

    config = EngineConfig(
        nnodes=2, node_rank=rank, dist_init_addr=f"127.0.0.1:{port}", tensor_parallel_size=2
    )
    return multihost.join(config, "bench_multihost")


def micro(args: argparse.Namespace) -> dict:
    from jax.experimental import multihost_utils

    group = _group(args.rank, args.port)
    leader = group.is_leader
    out: dict = {"sizes": {}}
    for size in SIZES:
        ibuf = np.arange(size, dtype=np.int32)
        fbuf = np.linspace(0, 1, max(1, size // 8), dtype=np.float32)
        t0 = time.perf_counter()
        multihost_utils.broadcast_one_to_all((ibuf, fbuf), is_source=leader)
        compile_ms = (time.perf_counter() - t0) * 1e3
        rows: dict[str, list[float]] = {"send": [], "delivered": [], "broadcast": []}
        for r in range(args.rounds):
            order = ("channel", "broadcast") if r % 2 == 0 else ("broadcast", "channel")
            for method in order:
                if method == "broadcast":
                    t0 = time.perf_counter()
                    for _ in range(args.messages):
                        got = multihost_utils.broadcast_one_to_all((ibuf, fbuf), is_source=leader)
                    rows["broadcast"].append((time.perf_counter() - t0) / args.messages)
                    assert int(np.asarray(got[0])[-1]) == size - 1
                elif leader:
                    t0 = time.perf_counter()
                    send0 = group.send_time
                    for _ in range(args.messages):
                        group.broadcast({"op": "step"}, ibuf, fbuf)
                    rows["send"].append((group.send_time - send0) / args.messages)
                    group._next(1, 60)  # the follower's ack of the round's last message
                    rows["delivered"].append((time.perf_counter() - t0) / args.messages)
                else:
                    for _ in range(args.messages):
                        _, (ib, _) = group.recv()
                    assert int(ib[-1]) == size - 1
                    group.leader.send({"op": "ack"})
        out["sizes"][size] = {
            "bytes": ibuf.nbytes + fbuf.nbytes,
            "channel_send_ms": statistics.median(rows["send"]) * 1e3 if leader else None,
            "channel_delivered_ms": statistics.median(rows["delivered"]) * 1e3 if leader else None,
            "broadcast_ms": statistics.median(rows["broadcast"]) * 1e3,
            "broadcast_compile_ms": compile_ms,
        }
    if not leader:
        header, _ = group.recv()  # the leader's stop: leaving first would look like a loss
        assert header["op"] == "stop", header
    return out, group


def engine(args: argparse.Namespace) -> dict:
    from jinfer import LLM, SamplingParams

    llm = LLM(
        args.model,
        nnodes=2,
        node_rank=args.rank,
        dist_init_addr=f"127.0.0.1:{args.port}",
        tensor_parallel_size=2,
        max_num_seqs=args.batch,
        max_model_len=512,
    )  # a follower serves the leader's steps inside LLM() and exits with it
    group, stats = llm.engine.group, llm.engine.stats
    prompts = [f"Write a short story about the number {i}." for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # settle
    steps0, msgs0, bytes0 = stats.num_steps, group.num_messages, group.num_bytes
    send0, step0 = group.send_time, stats.step_time
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    steps = stats.num_steps - steps0
    return {
        "model": args.model,
        "batch": args.batch,
        "tokens": args.tokens,
        "steps": steps,
        "messages_per_step": (group.num_messages - msgs0) / steps,
        "bytes_per_step": (group.num_bytes - bytes0) / steps,
        "send_ms_per_step": (group.send_time - send0) / steps * 1e3,
        "step_ms": (stats.step_time - step0) / steps * 1e3,
        "wall_s": wall,
    }, group


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", action="store_true", help="a real two-process engine's steps")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--messages", type=int, default=50, help="messages per round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run = engine if args.engine else micro
    if args.rank == 1:
        run(args)  # (--engine: LLM() follows the leader, then exits)
        return
    with socket.socket() as s:  # a free port for the group's coordinator and channel
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    cmd = [sys.executable, *sys.argv, "--rank", "1", "--port", str(args.port)]
    follower = subprocess.Popen(cmd)
    try:
        result, group = run(args)
        print(json.dumps(result, indent=None if args.json else 2), flush=True)
        group.close()  # tells the follower to stop
        import jax

        jax.distributed.shutdown()  # a barrier with the follower's own shutdown at its exit
        follower.wait(120)
    finally:
        if follower.poll() is None:
            follower.kill()


if __name__ == "__main__":
    main()
