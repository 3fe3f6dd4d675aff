"""Soak test for a running OpenAI-compatible server: well-formed, malformed and aborted requests
mixed at a fixed concurrency for a set time, to show that nothing is lost, memory stays flat and
the KV cache pages come back.

    python scripts/soak_server.py --launch --duration 600 --concurrency 16
    python scripts/soak_server.py --url http://127.0.0.1:8000 --model NAME --duration 60

Each client picks its next request at random (seeded) from three kinds:

    well-formed   completions and chat, streamed or not, greedy or sampled, n 1-2, logprobs;
                  it must answer 200 with a complete result (a stream ends with [DONE])
    malformed     hostile bodies (values past int32 and float32, NaN, lone surrogates, JSON
                  nested 10,000 deep, a multi-megabyte prompt, more prompts than the server
                  holds, wrong types, unknown models, invalid JSON); each must be a 4xx with an
                  error message, never a 5xx
    aborted       a well-formed stream the client closes after its first chunks, or a request
                  that times out on the client's side; the server must free what it held

Meanwhile a probe times `GET /health` twice a second (a request that blocks the event loop shows
up there). Before (after a warm-up, which compiles) and after, once the server is idle, it reads
`/metrics`: the process's RSS (`process_resident_memory_bytes`) and the KV pages in use
(`jinfer:kv_cache_pages_in_use`). The report: requests by kind and outcome, p50/p99 latency of
the well-formed ones, /health latency, RSS and pages at start and end. Exit status 1 if any
well-formed request was lost, any answer was a 5xx, or pages are still in use at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import sys
import time
from typing import Any

import httpx
import numpy as np
from bench_serving import launch

log = logging.getLogger("soak_server")

WORDS = "the of and to in is that for it as was with be by on not this are or from at".split()


# --------------------------------------------------------------- requests
def well_formed(rng: random.Random, model: str) -> tuple[str, dict]:
    """A valid request: (path, body)."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 48)}
    if rng.random() < 0.5:
        path, body["prompt"] = "/v1/completions", text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    if rng.random() < 0.5:
        body["temperature"] = round(rng.uniform(0.1, 1.5), 2)
        body["top_p"] = rng.choice([1.0, 0.9, 0.5])
        body["top_k"] = rng.choice([-1, 1, 20, 200])
        body["seed"] = rng.randint(0, 2**31)
    else:
        body["temperature"] = 0.0
    if rng.random() < 0.15:
        body["n"] = 2
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.1:
        body["presence_penalty"] = 0.5
    body["stream"] = rng.random() < 0.5
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return path, body


def _deep(levels: int) -> bytes:
    return b'{"prompt": "x", "x": ' + b"[" * levels + b"]" * levels + b"}"


def malformed_bodies(model: str) -> list[tuple[str, str, bytes]]:
    """(name, path, raw body) of each hostile request, built once."""
    c, chat = "/v1/completions", "/v1/chat/completions"

    def j(**fields: Any) -> bytes:
        return json.dumps({"model": model, "max_tokens": 4, **fields}).encode()

    huge = "lorem ipsum " * 300_000  # 3.6 MB: refused by its length, before tokenizing
    return [
        ("top_k past int32", c, j(prompt="x", top_k=2**40)),
        ("n past int32", c, j(prompt="x", n=2**40)),
        ("seed past int64", c, j(prompt="x", seed=2**70)),
        ("min_tokens past int32", c, j(prompt="x", min_tokens=2**40, max_tokens=None)),
        ("stop_token_ids past int32", c, j(prompt="x", stop_token_ids=[2**40])),
        ("logit_bias id past int32", c, j(prompt="x", logit_bias={str(2**40): 1})),
        ("temperature past float32", c, j(prompt="x", temperature=1e300)),
        ("temperature NaN", c, j(prompt="x").replace(b"}", b', "temperature": NaN}')),
        ("top_p Infinity", c, j(prompt="x").replace(b"}", b', "top_p": Infinity}')),
        ("repetition_penalty tiny", c, j(prompt="x", repetition_penalty=1e-30)),
        ("stop string 5000 chars", c, j(prompt="x", stop=["y" * 5000])),
        ("max_tokens negative", c, j(prompt="x", max_tokens=-1)),
        ("max_tokens a string", c, j(prompt="x", max_tokens="many")),
        ("prompt a dict", c, j(prompt={"a": 1})),
        ("prompt token past vocab", c, j(prompt=[1, 2, 2**40])),
        ("prompt lone surrogate", c, j(prompt="a\ud800b")),
        ("model lone surrogate", c, j(prompt="x", model="\ud800")),
        ("unknown model", c, j(prompt="x", model="<script>gpt-5</script>")),
        ("prompts past capacity", c, j(prompt=["x"] * 2000)),
        ("prompt 3.6 MB", c, j(prompt=huge)),
        ("json 10,000 deep", c, _deep(10_000)),
        ("invalid json", c, b'{"prompt": "x", "max_tokens": '),
        ("body not an object", c, b'["prompt", "x"]'),
        ("body not utf-8", c, b'{"prompt": "\xff\xfe"}'),
        ("unsupported field", c, j(prompt="x", response_format={"type": "json_object"})),
        ("messages empty", chat, j(messages=[])),
        ("message role unknown", chat, j(messages=[{"role": "nobody", "content": "x"}])),
        ("message lone surrogate", chat, j(messages=[{"role": "user", "content": "\udfff"}])),
        ("message content an int", chat, j(messages=[{"role": "user", "content": 7}])),
        ("top_logprobs huge", chat, j(messages=[{"role": "user", "content": "x"}],
                                      logprobs=True, top_logprobs=2**40)),
        ("tokenize surrogate", "/tokenize", j(prompt="\ud800")),
        ("tokenize 3.6 MB", "/tokenize", j(prompt=huge)),
        ("detokenize past vocab", "/detokenize", j(tokens=[2**40])),
    ]  # fmt: skip


# ----------------------------------------------------------------- client
class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[tuple[str, str], str] = {}  # one detail per bad outcome
        self.latency: list[float] = []  # well-formed, seconds
        self.health: list[float] = []
        self.malformed = malformed_bodies(args.model)
        self.record = True

    def count(self, kind: str, outcome: str, detail: str = "") -> None:
        if self.record:
            self.outcomes[kind, outcome] += 1
            if detail and (kind, outcome) not in self.examples:
                self.examples[kind, outcome] = detail[:300]

    async def client(self, rng: random.Random, http: httpx.AsyncClient, until: float) -> None:
        a = self.args
        while time.monotonic() < until:
            roll = rng.random()
            if roll < a.malformed:
                await self.send_malformed(rng, http)
            elif roll < a.malformed + a.aborted:
                await self.send_aborted(rng, http)
            else:
                await self.send_well_formed(rng, http)

    async def send_well_formed(self, rng: random.Random, http: httpx.AsyncClient) -> None:
        path, body = well_formed(rng, self.args.model)
        t0 = time.perf_counter()
        try:
            async with http.stream("POST", path, json=body) as r:
                raw = (await r.aread()).decode()
        except httpx.HTTPError as e:
            return self.count("well-formed", "lost: transport", repr(e))
        if r.status_code == 429:
            return self.count("well-formed", "429 busy")
        if r.status_code != 200:
            return self.count("well-formed", f"lost: {r.status_code}", raw)
        problem = _incomplete(raw, body)
        if problem:
            return self.count("well-formed", "lost: incomplete", problem)
        if self.record:
            self.latency.append(time.perf_counter() - t0)
        self.count("well-formed", "200")

    async def send_malformed(self, rng: random.Random, http: httpx.AsyncClient) -> None:
        name, path, content = rng.choice(self.malformed)
        try:
            r = await http.post(path, content=content, headers={"content-type": "application/json"})
        except httpx.HTTPError as e:
            return self.count("malformed", "transport error", f"{name}: {e!r}")
        if r.status_code >= 500:
            return self.count("malformed", f"{r.status_code}", f"{name}: {r.text}")
        if r.status_code < 400:
            return self.count("malformed", f"{r.status_code} accepted", f"{name}: {r.text}")
        try:
            ok = isinstance(r.json()["error"]["message"], str)
        except (ValueError, KeyError, TypeError):
            ok = False
        self.count("malformed", f"{r.status_code}" if ok else "no error message", name)

    async def send_aborted(self, rng: random.Random, http: httpx.AsyncClient) -> None:
        path, body = well_formed(rng, self.args.model)
        body["max_tokens"] = rng.randint(32, 256)
        try:
            if rng.random() < 0.7:  # a stream closed after its first chunks
                body["stream"] = True
                async with http.stream("POST", path, json=body) as r:
                    chunks = rng.randint(1, 4)
                    async for _ in r.aiter_lines():
                        chunks -= 1
                        if chunks <= 0:
                            break
                self.count("aborted", "closed mid-stream")
            else:  # a client that gives up waiting
                body["stream"] = False
                await http.post(path, json=body, timeout=rng.uniform(0.05, 1.0))
                self.count("aborted", "finished before the timeout")
        except httpx.TimeoutException:
            self.count("aborted", "timed out")
        except httpx.HTTPError as e:
            self.count("aborted", "transport error", repr(e))

    async def probe(self, http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                await http.get("/health", timeout=30)
                if self.record:
                    self.health.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                self.count("health", "transport error")
            await asyncio.sleep(0.5)

    async def run(self, seconds: float, seed: int) -> None:
        until = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=self.args.concurrency + 4)
        timeout = httpx.Timeout(300.0)
        async with httpx.AsyncClient(base_url=self.args.url, limits=limits, timeout=timeout) as h:
            rngs = [random.Random(seed * 1000 + i) for i in range(self.args.concurrency)]
            await asyncio.gather(self.probe(h, until), *(self.client(r, h, until) for r in rngs))


def _incomplete(raw: str, body: dict) -> str | None:
    """Why `raw` is not a complete answer to `body`, or None."""
    if body.get("stream"):
        events = [ln[6:] for ln in raw.splitlines() if ln.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream did not end with [DONE]: {raw[-200:]}"
        chunks = [json.loads(e) for e in events[:-1]]
        if any("error" in c for c in chunks):
            return f"stream error: {raw[-300:]}"
        finished = {
            ch["index"] for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")
        }
        if len(finished) != body.get("n", 1):
            return f"{len(finished)} of {body.get('n', 1)} choices finished"
        return None
    out = json.loads(raw)
    if len(out.get("choices", [])) != body.get("n", 1):
        return f"choices: {raw[:300]}"
    if any(not c.get("finish_reason") for c in out["choices"]):
        return f"unfinished: {raw[:300]}"
    return None


# ---------------------------------------------------------------- metrics
WANTED = {
    "process_resident_memory_bytes",
    "jinfer:kv_cache_pages_in_use",
    "jinfer:kv_cache_pages_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
}


def parse_metrics(text: str) -> dict[str, float]:
    """The /metrics samples this report reads (WANTED), by name without labels."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            if name.split("{")[0] in WANTED:
                out[name.split("{")[0]] = float(value)
    return out


def scrape(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", timeout=30).text)


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (aborted streams are freed a step later)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = not m.get("vllm:num_requests_running") and not m.get("vllm:num_requests_waiting")
        if idle and not m.get("jinfer:kv_cache_pages_in_use") or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def report(soak: Soak, start: dict, end: dict, rss_series: list[float], args) -> dict:
    lat = np.asarray(soak.latency) * 1000
    health = np.asarray(soak.health) * 1000
    mb = 2**20
    result = {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "outcomes": {f"{k} / {o}": n for (k, o), n in sorted(soak.outcomes.items())},
        "examples": {f"{k} / {o}": d for (k, o), d in soak.examples.items()},
        "well_formed_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "well_formed_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "health_p50_ms": float(np.percentile(health, 50)) if health.size else None,
        "health_p99_ms": float(np.percentile(health, 99)) if health.size else None,
        "health_max_ms": float(health.max()) if health.size else None,
        "rss_start_mib": start.get("process_resident_memory_bytes", float("nan")) / mb,
        "rss_end_mib": end.get("process_resident_memory_bytes", float("nan")) / mb,
        "rss_max_mib": max(rss_series, default=float("nan")) / mb,
        "pages_in_use_start": start.get("jinfer:kv_cache_pages_in_use"),
        "pages_in_use_end": end.get("jinfer:kv_cache_pages_in_use"),
        "pages_total": end.get("jinfer:kv_cache_pages_total"),
    }
    bad = [
        f"{k} / {o}"
        for (k, o), n in soak.outcomes.items()
        if o.startswith("lost") or o[:1] == "5" or o in ("transport error", "no error message")
        or o.endswith("accepted")
    ]  # fmt: skip
    if result["pages_in_use_end"]:
        bad.append("pages still in use at the end")
    result["failures"] = bad
    return result


def print_report(r: dict) -> None:
    print(f"\nsoak: {r['duration_s']:.0f} s at concurrency {r['concurrency']}")
    print("| kind / outcome | requests |\n|---|---|")
    for name, n in r["outcomes"].items():
        print(f"| {name} | {n} |")
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    print(
        f"\nwell-formed latency p50 {fmt(r['well_formed_p50_ms'])} ms, "
        f"p99 {fmt(r['well_formed_p99_ms'])} ms; /health p50 {fmt(r['health_p50_ms'], '{:.1f}')}"
        f" ms, p99 {fmt(r['health_p99_ms'], '{:.1f}')} ms, max {fmt(r['health_max_ms'])} ms"
    )
    print(
        f"RSS {r['rss_start_mib']:.0f} MiB after warm-up -> {r['rss_end_mib']:.0f} MiB at the end"
        f" (max {r['rss_max_mib']:.0f}); KV pages in use {fmt(r['pages_in_use_start'])} -> "
        f"{fmt(r['pages_in_use_end'])} of {fmt(r['pages_total'])}"
    )
    for name, detail in r["examples"].items():
        if name in r["failures"]:
            print(f"  {name}: {detail}")
    print("FAILED: " + ", ".join(r["failures"]) if r["failures"] else "nothing lost")


async def _sample_rss(url: str, until: float, every: float, out: list[float]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.monotonic() < until:
            await asyncio.sleep(every)
            try:
                text = (await http.get("/metrics")).text
            except httpx.HTTPError:
                continue
            rss = parse_metrics(text).get("process_resident_memory_bytes")
            if rss is not None:
                out.append(rss)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--launch", action="store_true", help="start `python -m jinfer.serve`")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of soak")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of the mix before start")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--malformed", type=float, default=0.25, help="share of malformed requests")
    p.add_argument("--aborted", type=float, default=0.15, help="share of aborted requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("server_args", nargs="*", help="extra server flags (after --) with --launch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    proc = launch(args) if args.launch else None
    try:
        soak = Soak(args)
        if args.warmup > 0:
            soak.record = False
            log.info("warm-up: %.0f s", args.warmup)
            asyncio.run(soak.run(args.warmup, seed=args.seed + 1))
            soak.record = True
        start = wait_idle(args.url)
        log.info("soak: %.0f s at concurrency %d", args.duration, args.concurrency)
        rss: list[float] = [start.get("process_resident_memory_bytes", 0.0)]

        async def both() -> None:
            until = time.monotonic() + args.duration
            await asyncio.gather(
                soak.run(args.duration, args.seed), _sample_rss(args.url, until, 15, rss)
            )

        asyncio.run(both())
        end = wait_idle(args.url)
        rss.append(end.get("process_resident_memory_bytes", 0.0))
        result = report(soak, start, end, rss, args)
        result["rss_series_mib"] = [round(v / 2**20, 1) for v in rss]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
