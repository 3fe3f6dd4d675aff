"""Serving benchmark for any OpenAI-compatible server, with vLLM `bench serve`'s metric definitions.

Workloads are seeded and follow real traffic (lengths in tokens, before --scale):

    chat                short/medium prompts (50-800) and answers (30-300)
    coding-agent        10k-30k-token prompts over a shared repository, 20-200-token answers
    summarization       2k-8k in, 200-500 out
    agentic-multi-turn  sessions of 3-10 turns; each turn resends the whole context plus a tool
                        result, after a random think gap
    json-schema         (--structured) a staff record under response_format json_schema; the
                        answer must parse
    tool-call           (--structured) two tools, tool_choice "required"; a call must come back

Load is either a fixed number of clients in a closed loop (--concurrency C ...) or Poisson arrivals
(--request-rate R ...); each value is one level. Per level: TTFT, TPOT, ITL and end-to-end latency
p50/p90/p99 (ms), request and token throughput, and goodput under --slo. JSON with every level, and
a PNG (latency against throughput) when matplotlib is installed.

    python scripts/bench_serving.py --launch --workload chat --concurrency 1 8 32
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --model NAME --workload all \
        --scale 0.1 --request-rate 0.5 1 2 --json out.json --plot out.png
    python scripts/bench_serving.py --launch --workload chat --structured --scale 0.1

Metric definitions (as vLLM's): TTFT = send to first content chunk; TPOT = (E2E - TTFT) /
(output tokens - 1), per request; ITL = every gap between content chunks; E2E = send to last
byte. Output tokens come from the server's usage report (stream_options.include_usage); a
server that sends none has its text counted with the model's tokenizer (--tokenizer, by default
the named model's), as vLLM's `bench serve` does. A request that produced no token counts as
failed, and a figure nothing measured is shown as missing (`-`), never as 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from _workloads import STRUCTURED, WORKLOADS, Session, Turn, make_sessions

log = logging.getLogger("bench_serving")


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int | None = None  # None: the server reported none, and nothing counted them
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    turn: int = 0  # its place in its session (0: the first turn)
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    messages: list[dict],
    max_tokens: int,
    turn: Turn | None = None,
) -> Result:
    body = {
        "model": args.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(turn.extra if turn is not None else {}),
    }
    calls = 0
    res = Result(ok=False)
    t0 = last = time.perf_counter()
    first = True
    try:
        async with client.stream("POST", args.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    res.ok = True
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))[:200]
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens")
                if not chunk.get("choices"):
                    continue
                delta = chunk["choices"][0].get("delta", {})
                content = delta.get("content")
                calls += len(delta.get("tool_calls") or [])
                if not content and not delta.get("tool_calls"):
                    continue
                now = time.perf_counter()
                if first:
                    res.ttft, first = now - t0, False
                else:
                    res.itls.append(now - last)
                last = now
                res.text += content or ""
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    if first:  # no visible text at all (e.g. only special tokens): first token = the end
        res.ttft = res.e2e
    if res.output_tokens is None and args.tokenizer is not None:  # no usage: count the text
        res.output_tokens = len(args.tokenizer.encode(res.text, add_special_tokens=False))
    if res.ok and not res.error and not res.text and not res.output_tokens:
        res.error = "the stream ended without a token"
    if res.ok and turn is not None and turn.expect == "json":
        try:
            json.loads(res.text)
        except ValueError:
            res.error = f"not JSON: {res.text[:80]!r}"
    if res.ok and turn is not None and turn.expect == "tool_call" and not calls:
        res.error = "no tool call came back"
    res.ok = res.ok and not res.error
    return res


async def run_session(
    client: httpx.AsyncClient, args: argparse.Namespace, s: Session, out: list[Result]
) -> None:
    messages = [{"role": "system", "content": s.system}]
    for number, turn in enumerate(s.turns):
        if turn.think_s:
            await asyncio.sleep(turn.think_s * args.think_scale)
        messages.append({"role": "user", "content": turn.user})
        res = await send(client, args, messages, turn.max_tokens, turn)
        res.turn = number
        out.append(res)
        if not res.ok:
            return
        messages.append({"role": "assistant", "content": res.text})


async def run_level(
    args: argparse.Namespace, sessions: list[Session], concurrency: int | None, rate: float | None
) -> tuple[list[Result], float]:
    results: list[Result] = []
    limits = httpx.Limits(max_connections=1000)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        if concurrency is not None:
            queue = iter(sessions)

            async def worker() -> None:
                for s in queue:
                    await run_session(client, args, s, results)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = np.random.default_rng(args.seed)
            tasks = []
            for s in sessions:
                tasks.append(asyncio.create_task(run_session(client, args, s, results)))
                if rate != float("inf"):
                    await asyncio.sleep(rng.exponential(1.0 / rate))
            await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def summarize(results: list[Result], wall: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: np.asarray(xs, np.float64) * 1e3  # noqa: E731

    def pct(name: str, xs: np.ndarray) -> dict:
        if xs.size == 0:
            return {}
        return {f"{name}_p{p}_ms": float(np.percentile(xs, p)) for p in (50, 90, 99)} | {
            f"{name}_mean_ms": float(xs.mean())
        }

    ttft = ms([r.ttft for r in ok])
    tpot = ms([r.tpot for r in ok if r.tpot is not None])
    itl = ms([x for r in ok for x in r.itls])
    e2e = ms([r.e2e for r in ok])
    counted = [r.output_tokens for r in ok if r.output_tokens is not None]
    out_tokens = sum(counted) if ok and len(counted) == len(ok) else None  # None: not measured
    in_tokens = sum(r.prompt_tokens for r in ok)

    # The prefix cache's share of follow-up turns' prompts, from the servers' usage (None: a
    # server sent no cached_tokens, or no session had a second turn).
    later = [r for r in ok if r.turn > 0]
    hit_rate = None
    if later and all(r.cached_tokens is not None for r in later):
        hit_rate = sum(r.cached_tokens for r in later) / max(1, sum(r.prompt_tokens for r in later))

    def good(r: Result) -> bool:
        checks = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}
        return all(checks[k] * 1e3 <= v for k, v in slo.items())

    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tok_s": None if out_tokens is None else out_tokens / wall,
        "total_tok_s": None if out_tokens is None else (in_tokens + out_tokens) / wall,
        "mean_prompt_tokens": in_tokens / max(1, len(ok)),
        "mean_output_tokens": None if out_tokens is None else out_tokens / len(ok),
        "goodput_req_s": sum(good(r) for r in ok) / wall if slo else None,
        "prefix_hit_rate_turn2plus": hit_rate,
        **pct("ttft", ttft),
        **pct("tpot", tpot),
        **pct("itl", itl),
        **pct("e2e", e2e),
    }


# ------------------------------------------------------------------- harness
def launch(args: argparse.Namespace) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jinfer.serve", "--model", args.model, "--port", str(port)]
    cmd += ["--log-level", "warning", *args.server_args]
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


def token_counter(name: str | None, model: str) -> Any:
    """The tokenizer `--tokenizer` names (None: `model`'s, if jinfer knows it by name)."""
    from jinfer.loader.named_models import NAMED_MODELS, resolve_model
    from jinfer.tokenizer.tokenizer import load_tokenizer

    if name == "none" or (name is None and model not in NAMED_MODELS):
        return None
    return load_tokenizer(str(resolve_model(name or model)))


def print_table(rows: list[dict]) -> None:
    cols = [
        ("workload", "{}"), ("load", "{}"), ("req", "{}"), ("fail", "{}"),
        ("ttft_p50_ms", "{:.0f}"), ("ttft_p99_ms", "{:.0f}"), ("tpot_p50_ms", "{:.1f}"),
        ("itl_p50_ms", "{:.1f}"), ("itl_p99_ms", "{:.1f}"), ("e2e_p50_ms", "{:.0f}"),
        ("output_tok_s", "{:.1f}"), ("goodput_req_s", "{:.2f}"),
        ("prefix_hit_rate_turn2plus", "{:.2f}"),
    ]  # fmt: skip
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c, fmt in cols:
            v = row.get({"req": "requests", "fail": "failed"}.get(c, c))
            cells.append("-" if v is None else fmt.format(v))
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        rs = [
            r for r in rows
            if r["workload"] == workload and "ttft_p50_ms" in r and r["output_tok_s"] is not None
        ]  # fmt: skip
        x = [r["output_tok_s"] for r in rs]
        axes[0].plot(x, [r["ttft_p50_ms"] for r in rs], "o-", label=workload)
        axes[1].plot(x, [r.get("tpot_p50_ms", np.nan) for r in rs], "o-", label=workload)
    for ax, name in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("latency against throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log.info("plot written to %s", path)


def parse_slo(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise SystemExit(f"--slo takes ttft:MS tpot:MS e2e:MS, got {item!r}")
        slo[key] = float(value)
    return slo


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--tokenizer",
        help="counts the output tokens of a server that reports no usage: a GGUF file, an HF "
        "directory or a named model (default: --model, if it names one; 'none': do not count)",
    )
    p.add_argument(
        "--launch", action="store_true", help="start `python -m jinfer.serve` for the run"
    )
    p.add_argument(
        "--workload",
        nargs="+",
        default=None,
        help=f"{', '.join(WORKLOADS + STRUCTURED)} or all (the first four; default chat)",
    )
    p.add_argument(
        "--structured",
        action="store_true",
        help="add the constrained workloads: json-schema (response_format) and tool-call "
        "(tool_choice required); every answer is checked to parse",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", help="closed-loop clients per level")
    load.add_argument("--request-rate", type=float, nargs="+", help="Poisson sessions/s per level")
    p.add_argument("--num-sessions", type=int, default=None, help="per level (default 2x load)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every length (CPU: 0.1)")
    p.add_argument("--think-scale", type=float, default=1.0, help="multiply think gaps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", nargs="*", default=[], help="goodput SLOs, e.g. ttft:2000 tpot:200")
    p.add_argument("--json", help="write every level's metrics here")
    p.add_argument("--plot", help="write a PNG of latency against throughput here")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("server_args", nargs="*", help="extra server flags (after --) with --launch")
    args = p.parse_args(argv)
    args.tokenizer = token_counter(args.tokenizer, args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workloads = list(WORKLOADS) if args.workload == ["all"] else list(args.workload or [])
    if args.structured:
        workloads += [w for w in STRUCTURED if w not in workloads]
    workloads = workloads or ["chat"]
    slo = parse_slo(args.slo)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = [1, 8, 32]
    levels: list[tuple[str, int | None, float | None]] = [
        (f"c={c}", c, None) for c in args.concurrency or []
    ] + [(f"rate={r}", None, r) for r in args.request_rate or []]

    proc = launch(args) if args.launch else None
    rows: list[dict] = []
    try:
        if not args.no_warmup:
            asyncio.run(run_level(args, make_sessions("chat", 1, 999, 0.1), 1, None))
        for workload in workloads:
            for label, conc, rate in levels:
                n = args.num_sessions or max(2, 2 * (conc or int(np.ceil(rate * 10))))
                sessions = make_sessions(workload, n, args.seed, args.scale)
                log.info("%s %s: %d sessions", workload, label, n)
                results, wall = asyncio.run(run_level(args, sessions, conc, rate))
                rows.append({"workload": workload, "load": label, **summarize(results, wall, slo)})
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print_table(rows)
    if args.json:
        meta = {
            "model": args.model,
            "url": args.url,
            "scale": args.scale,
            "seed": args.seed,
            "slo_ms": slo,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d"),
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "levels": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
