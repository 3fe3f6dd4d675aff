"""Replicas behind vllm-router (scripts/serve_cluster.py), real servers and the real router on
localhost: cache-aware routing keeps conversations where their KV is, and a killed replica
costs only the requests it held."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # as running them does: serve_cluster, bench_serving

import bench_router  # noqa: E402
from serve_cluster import Cluster  # noqa: E402

MODEL = "smollm2-135m-instruct"
WORKLOAD = argparse.Namespace(
    model=MODEL, concurrency=2, sessions=4, scale=0.1, think_scale=0.1, seed=0,
    kill_requests=12, kill_after=3.0, doc_words=300, router_args=[],
)  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    server = ["--model", MODEL, "--max-num-seqs", "8", "--log-level", "warning"]
    c = Cluster(2, server, kv_events=True)  # (the replicas publish KV events for kv_aware)
    yield c
    c.stop()


def test_cache_aware_routing_keeps_follow_up_turns_hitting_the_prefix_cache(cluster):
    runs = {p: bench_router.run_policy(cluster, p, WORKLOAD) for p in ("single", "round_robin")}
    runs["cache_aware"] = bench_router.run_policy(cluster, "cache_aware", WORKLOAD)
    assert all(r["failed"] == 0 for r in runs.values()), runs
    hit = {p: r["hit_rate_turn2plus"] for p, r in runs.items()}
    # As high as one replica that sees every turn, and well above spreading turns blindly.
    assert hit["cache_aware"] >= 0.97 * hit["single"], runs
    assert hit["cache_aware"] >= hit["round_robin"] + 0.05, runs
    assert min(runs["cache_aware"]["requests_per_replica"]) > 0  # both replicas served
    # The replicas' own counters agree with what the clients were told.
    assert runs["cache_aware"]["hit_rate_metrics"] > runs["round_robin"]["hit_rate_metrics"]


def test_kv_aware_routing_sends_requests_where_their_kv_really_is(cluster):
    # The replicas' KV events tell the router what each computed, even for traffic that never
    # passed through it: follow-ups on 8 documents cached that way, each on a replica drawn at
    # random, all find their KV (a router guessing would be right for all 8 once in 256).
    assert bench_router.warmed_run(cluster, "kv_aware", WORKLOAD) >= 0.8
    # And on conversations through it, as well as cache_aware does.
    single = bench_router.run_policy(cluster, "single", WORKLOAD)
    kv = bench_router.run_policy(cluster, "kv_aware", WORKLOAD)
    assert kv["failed"] == 0, kv
    assert kv["hit_rate_turn2plus"] >= 0.97 * single["hit_rate_turn2plus"], (kv, single)


def test_a_killed_replica_fails_only_its_requests_and_none_hangs(cluster):
    killed = bench_router.kill_run(cluster, WORKLOAD)
    outcomes = killed["outcomes"]
    assert killed["requests"] == WORKLOAD.kill_requests
    assert "hung" not in outcomes, killed
    assert outcomes.get("ok", 0) >= WORKLOAD.kill_requests // 2, killed
    # Once the router has seen it go, every request goes to the live replica.
    assert set(killed["sent_5s_after_kill"]) <= {"ok"}, killed
    assert cluster.replicas[0].alive()


def test_serve_cluster_refuses_a_bad_count_before_starting_anything():
    r = subprocess.run(
        [sys.executable, str(SCRIPTS / "serve_cluster.py"), "--replicas", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "--replicas must be at least 1" in r.stderr
