"""scripts/bench_serving.py against a live server (echo engine): every workload runs, the metrics
add up, and the JSON report is written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from server_util import LiveServer, make_echo_engine

from jinfer.server.app import ServerConfig, create_app

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_workloads_are_seeded_and_scaled(bench):
    a = bench.make_sessions("agentic-multi-turn", 3, seed=1, scale=0.1)
    b = bench.make_sessions("agentic-multi-turn", 3, seed=1, scale=0.1)
    assert [t.user for s in a for t in s.turns] == [t.user for s in b for t in s.turns]
    assert all(3 <= len(s.turns) <= 10 for s in a)
    assert all(t.think_s > 0 for s in a for t in s.turns[1:])
    big = bench.make_sessions("coding-agent", 2, seed=0, scale=1.0)
    assert all(len(s.system) > 30_000 for s in big)  # 10k+ tokens of code
    with pytest.raises(ValueError, match="unknown workload"):
        bench.make_sessions("nope", 1, 0, 1.0)


def test_every_workload_runs_against_a_live_server(bench, smollm2_tokenizer, tmp_path):
    engine = make_echo_engine(smollm2_tokenizer, max_model_len=2048, num_pages=600)
    app = create_app(ServerConfig("echo"), lambda: (engine, smollm2_tokenizer))
    with LiveServer(app) as server:
        server.wait_ready()
        out = tmp_path / "bench.json"
        rows = bench.main(
            ["--url", server.url, "--model", "echo", "--workload", "all", "--scale", "0.01",
             "--concurrency", "2", "--num-sessions", "2", "--think-scale", "0",
             "--slo", "ttft:60000", "--json", str(out), "--no-warmup"]
        )  # fmt: skip
        rate_rows = bench.main(
            ["--url", server.url, "--model", "echo", "--workload", "chat", "--scale", "0.05",
             "--request-rate", "inf", "--num-sessions", "3", "--no-warmup"]
        )  # fmt: skip
    report = json.loads(out.read_text())
    assert [r["workload"] for r in report["levels"]] == list(bench.WORKLOADS)
    for row in rows + rate_rows:
        assert row["failed"] == 0, row["errors"]
        assert row["ttft_p50_ms"] <= row["e2e_p50_ms"]
        assert row["output_tok_s"] > 0
    multi = next(r for r in rows if r["workload"] == "agentic-multi-turn")
    assert multi["requests"] >= 6  # two sessions of 3+ turns
    assert all(r["goodput_req_s"] == pytest.approx(r["request_throughput"]) for r in rows)
