"""Routing policies on replicas of jinfer: where conversations' prefix-cache hits go.

    python scripts/bench_router.py                        # 2 SmolLM2 replicas, 3 rounds
    python scripts/bench_router.py --policies cache_aware round_robin --rounds 5 --kill

One cluster (`serve_cluster.Cluster`: N replicas and vllm-router) serves bench_serving.py's
`agentic-multi-turn` sessions (each comes back with its growing history) once per policy per
round, policies interleaved, every replica's prefix cache reset before each run. `single` is
one replica alone, without the router: the hit rate a conversation gets when it cannot be sent
anywhere else. `kv_aware` routes on the KV cache events the replicas publish (what each one
really holds, page by page), `cache_aware` on the router's own guess from the text it sent.
Per policy, medians over rounds:

    hit_rate_turn2plus   cached / prompt tokens of turns 2+, from the responses' usage
                         (`prompt_tokens_details.cached_tokens`)
    hit_rate_metrics     vllm:prefix_cache_hits / _queries over every turn, summed over the
                         replicas' /metrics (the counters a dashboard shows)
    ttft_p50_ms, e2e_p50_ms, output_tok_s

`warmed`: documents whose KV a replica computed for traffic that did not pass this router (sent
to it directly: another router's clients, a warm-up), then one follow-up per document through
the router; the share of their prompts served from cache. Only KV events tell a router that.

`--kill`: at the end, sessions run through the router while one replica is killed (SIGKILL)
mid-run; requests are counted by outcome (ok, error, cut short, hung: none may hang).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import statistics
import sys
import time

import bench_serving
import httpx
from serve_cluster import Cluster

log = logging.getLogger("bench_router")


def run_policy(cluster: Cluster, policy: str, args: argparse.Namespace) -> dict:
    cluster.reset_prefix_caches()
    if policy == "single":
        url = cluster.replicas[0].url
    else:
        cluster.start_router(policy)
        url = cluster.url
    before = [r.metrics() for r in cluster.replicas]
    rows = bench_serving.main(
        ["--url", url, "--model", args.model, "--workload", "agentic-multi-turn",
         "--concurrency", str(args.concurrency), "--num-sessions", str(args.sessions),
         "--scale", str(args.scale), "--think-scale", str(args.think_scale),
         "--seed", str(args.seed), "--no-warmup", "--tokenizer", "none"]
    )  # fmt: skip
    after = [r.metrics() for r in cluster.replicas]

    def delta(name: str) -> float:
        return sum(a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True))

    row = rows[0]
    queries = delta("vllm:prefix_cache_queries_total")
    served = [a.get("vllm:request_success_total", 0.0) - b.get("vllm:request_success_total", 0.0)
              for a, b in zip(after, before, strict=True)]  # fmt: skip
    return {
        "policy": policy,
        "failed": row["failed"],
        "hit_rate_turn2plus": row["prefix_hit_rate_turn2plus"],
        "hit_rate_metrics": delta("vllm:prefix_cache_hits_total") / queries if queries else None,
        "requests_per_replica": served,
        "ttft_p50_ms": row.get("ttft_p50_ms"),
        "e2e_p50_ms": row.get("e2e_p50_ms"),
        "output_tok_s": row["output_tok_s"],
    }


def warmed_run(cluster: Cluster, policy: str, args: argparse.Namespace) -> float:
    """Documents cached on replicas behind the router's back, then asked about through it:
    the follow-ups' prefix-cache hit rate (usage)."""
    import random

    cluster.reset_prefix_caches()
    cluster.start_router(policy, list(args.router_args))
    rng = random.Random(args.seed)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    docs = [" ".join(rng.choice(words) for _ in range(args.doc_words)) for _ in range(8)]
    for doc in docs:  # a replica drawn at random computes each, for someone else
        replica = rng.choice(cluster.replicas)
        body = {"model": args.model, "prompt": doc, "max_tokens": 1}
        httpx.post(replica.url + "/v1/completions", json=body, timeout=120).raise_for_status()
    time.sleep(1.0)  # (the events reach the router)
    cached = prompt = 0
    for doc in docs:
        body = {"model": args.model, "prompt": doc + " Summarize.", "max_tokens": 1}
        r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        usage = r.json()["usage"]
        cached += usage["prompt_tokens_details"]["cached_tokens"]
        prompt += usage["prompt_tokens"]
    return cached / prompt


def kill_run(cluster: Cluster, args: argparse.Namespace) -> dict:
    """Requests through the router while replica 1 dies; each one's outcome."""
    cluster.reset_prefix_caches()
    cluster.start_router("cache_aware")
    outcomes: list[tuple[float, str]] = []
    t_kill = [float("inf")]

    def one(i: int) -> None:
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True,
        }  # fmt: skip
        t0 = time.monotonic()
        try:
            with httpx.stream(
                "POST", cluster.url + "/v1/chat/completions", json=body, timeout=120
            ) as r:
                if r.status_code != 200:
                    outcomes.append((t0, f"error {r.status_code}"))
                    return
                done = any(line == "data: [DONE]" for line in r.iter_lines())
                outcomes.append((t0, "ok" if done else "cut short"))
        except httpx.TimeoutException:
            outcomes.append((t0, "hung"))
        except httpx.TransportError as e:
            outcomes.append((t0, f"cut short ({type(e).__name__})"))

    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(args.kill_requests)]
        time.sleep(args.kill_after)
        t_kill[0] = time.monotonic()
        cluster.replicas[1].kill()
        log.info("killed replica 1")
        concurrent.futures.wait(futures)
    counts: dict[str, int] = {}
    after: dict[str, int] = {}
    for t0, what in outcomes:
        counts[what] = counts.get(what, 0) + 1
        if t0 > t_kill[0] + 5:  # sent well after the kill
            after[what] = after.get(what, 0) + 1
    return {"requests": len(outcomes), "outcomes": counts, "sent_5s_after_kill": after}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--policies", nargs="+", default=["single", "cache_aware", "kv_aware", "round_robin"]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--think-scale", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-words", type=int, default=300, help="warmed documents' length")
    p.add_argument("--router-arg", dest="router_args", action="append", default=[])
    p.add_argument("--kill", action="store_true", help="then kill a replica mid-run")
    p.add_argument("--kill-requests", type=int, default=24)
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds into the kill run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("server_args", nargs="*", help="replica flags (after --)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = ["--model", args.model, "--log-level", "warning", *args.server_args]
    cluster = Cluster(args.replicas, server, kv_events="kv_aware" in args.policies)
    runs: dict[str, list[dict]] = {p: [] for p in args.policies}
    try:
        for r in range(args.rounds):
            order = args.policies if r % 2 == 0 else args.policies[::-1]
            for policy in order:
                runs[policy].append(run_policy(cluster, policy, args))
                if policy != "single":
                    runs[policy][-1]["hit_rate_warmed"] = warmed_run(cluster, policy, args)
                log.info("round %d %s: %s", r, policy, runs[policy][-1])
        killed = kill_run(cluster, args) if args.kill else None
    finally:
        cluster.stop()
    table = {}
    for policy, rs in runs.items():
        med = {}
        for k in ("hit_rate_turn2plus", "hit_rate_metrics", "hit_rate_warmed", "ttft_p50_ms",
                  "e2e_p50_ms", "output_tok_s"):  # fmt: skip
            xs = [x[k] for x in rs if x.get(k) is not None]
            med[k] = statistics.median(xs) if xs else None
        med["failed"] = sum(x["failed"] for x in rs)
        med["requests_per_replica"] = rs[-1]["requests_per_replica"]
        table[policy] = med
    cols = [
        ("hit rate turns 2+ (usage)", "hit_rate_turn2plus", "{:.3f}"),
        ("hit rate (metrics)", "hit_rate_metrics", "{:.3f}"),
        ("warmed hit rate", "hit_rate_warmed", "{:.3f}"),
        ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
        ("E2E p50 ms", "e2e_p50_ms", "{:.0f}"),
        ("out tok/s", "output_tok_s", "{:.1f}"),
        ("failed", "failed", "{}"),
    ]
    print("| policy | " + " | ".join(c for c, _, _ in cols) + " | requests per replica |")
    print("|---" * (len(cols) + 2) + "|")
    for policy, m in table.items():
        cells = ["-" if m[k] is None else fmt.format(m[k]) for _, k, fmt in cols]
        per_replica = ", ".join(str(int(x)) for x in m["requests_per_replica"])
        print(f"| {policy} | " + " | ".join(cells) + f" | {per_replica} |")
    result = {"policies": table, "runs": runs, "killed": killed, "argv": sys.argv[1:]}
    if killed is not None:
        print("kill run:", json.dumps(killed))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
