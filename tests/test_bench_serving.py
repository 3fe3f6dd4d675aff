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
    sys.path.insert(0, str(SCRIPT.parent))  # as running it does: its own modules (_workloads)
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
    assert 0 < multi["prefix_hit_rate_turn2plus"] <= 1  # follow-ups reuse their history's KV
    assert next(r for r in rows if r["workload"] == "chat")["prefix_hit_rate_turn2plus"] is None
    assert all(r["goodput_req_s"] == pytest.approx(r["request_throughput"]) for r in rows)


def _peer_without_usage():
    """An OpenAI-style server as llama-cpp-python's was seen to be: it streams text but no
    usage, and every other request gets an empty stream."""
    import itertools

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    calls = itertools.count()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        empty = next(calls) % 2 == 1

        async def events():
            for word in [] if empty else ["Hello", " there", ",", " friend"]:
                chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_a_peer_without_usage_is_counted_with_the_tokenizer_and_empty_streams_fail(
    bench, smollm2_gguf_path, smollm2_tokenizer
):
    common = ["--model", "peer", "--workload", "chat", "--scale", "0.01", "--concurrency", "1"]
    common += ["--num-sessions", "4", "--no-warmup"]
    with LiveServer(_peer_without_usage()) as server:
        server.wait_ready()
        counted = bench.main(["--url", server.url, "--tokenizer", smollm2_gguf_path, *common])[0]
        uncounted = bench.main(["--url", server.url, "--tokenizer", "none", *common])[0]
    want = len(smollm2_tokenizer.encode("Hello there, friend", add_special_tokens=False))
    for row in (counted, uncounted):
        assert (row["requests"], row["failed"]) == (4, 2)  # the empty streams
        assert row["errors"] == ["the stream ended without a token"]
        assert row["ttft_p50_ms"] > 0  # from the two that streamed, not the empty ones
    assert counted["mean_output_tokens"] == want and counted["output_tok_s"] > 0
    assert "tpot_p50_ms" in counted
    # Nothing counted the tokens: the figures are missing, not 0.
    assert uncounted["output_tok_s"] is None and uncounted["mean_output_tokens"] is None
    assert uncounted["prefix_hit_rate_turn2plus"] is None  # (single turns, no usage)
    assert "tpot_p50_ms" not in uncounted
