"""Serving latency: TTFT and inter-token latency percentiles at several concurrency levels.

Drives a live `python -m jinfer.serve` over real HTTP with streaming chat requests: C clients in
a closed loop (each sends its next request as soon as its last one ends), C in --concurrency.

    # launches the server itself (and stops it at the end)
    python scripts/bench_serving.py --launch --concurrency 1 8 32
    # or measures a server that is already up
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct

TTFT is from sending the request to the first content chunk; ITL is the gap between content
chunks (one token each on this server); both in milliseconds. Output length is fixed with
ignore_eos so every level does the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

log = logging.getLogger("bench_serving")

TOPICS = [
    "the water cycle", "how vaccines work", "the history of the printing press",
    "why the sky is blue", "how a compiler works", "the rules of chess",
    "photosynthesis", "plate tectonics", "the causes of inflation", "how bees communicate",
    "the theory of relativity", "how to bake bread", "the French revolution",
    "how GPS finds your position", "why cats purr", "the life of a star",
]  # fmt: skip


@dataclass
class Sample:
    ttft: float
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, i: int) -> Sample:
    topic = TOPICS[i % len(TOPICS)]
    body = {
        "model": args.model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in detail."},
            {"role": "user", "content": f"Request {i}: explain {topic} to a curious student."},
        ],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    last = None
    sample = Sample(ttft=float("nan"))
    async with client.stream("POST", args.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"] or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if last is None:
                sample.ttft = now - t0
            else:
                sample.itls.append(now - last)
            last = now
            sample.tokens += 1
    sample.e2e = time.perf_counter() - t0
    return sample


async def run_level(args: argparse.Namespace, concurrency: int) -> dict:
    total = max(args.requests_per_client * concurrency, concurrency)
    counter = iter(range(total))
    samples: list[Sample] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            samples.append(await one_request(client, args, i))

    limits = httpx.Limits(max_connections=concurrency + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = np.array([s.ttft for s in samples]) * 1e3
    itl = np.array([x for s in samples for x in s.itls]) * 1e3
    tokens = sum(s.tokens for s in samples)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "itl_p50_ms": float(np.percentile(itl, 50)),
        "itl_p99_ms": float(np.percentile(itl, 99)),
        "output_tok_s": tokens / wall,
        "wall_s": wall,
    }


def launch(args: argparse.Namespace) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jinfer.serve", "--model", args.model, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max(args.concurrency)), "--log-level", "warning"]
    cmd += args.server_args
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env={**os.environ})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(args.url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--launch", action="store_true", help="start the server for the run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("server_args", nargs="*", help="extra server flags after --")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    proc = launch(args) if args.launch else None
    try:
        asyncio.run(run_level(args, 1))  # warm the path (first-request costs are not latency)
        results = [asyncio.run(run_level(args, c)) for c in args.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    cols = ["concurrency", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    print("| " + " | ".join(cols + ["out tok/s"]) + " |")
    print("|" + "---|" * 7)
    for r in results:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
            f"{r['output_tok_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "max_tokens": args.max_tokens, "results": results}, f)


if __name__ == "__main__":
    main()
