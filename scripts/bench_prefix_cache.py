"""Prefix-cache benchmark: time to first token of follow-up turns, cache on vs off.

    python scripts/bench_prefix_cache.py --workload coding-agent agentic-multi-turn
    python scripts/bench_prefix_cache.py --kv-events     # + what publishing KV events costs

Workloads (chat template applied, greedy, short answers):

- `coding-agent`: one session; turn 1 sends ~`--context-tokens` of code, each later turn appends
  the previous answer and ~`--turn-tokens` of new tool output (a test log) and asks again.
- `agentic-multi-turn`: `--sessions` sessions sharing a system prompt of tool specs; each turn
  appends the previous answer and a new user message; all sessions' turn k arrive together.

Both engines share the device weights and compiled programs; only `enable_prefix_caching`
differs. The cache-on engine plays every turn; the cache-off engine replays turns 2+ with the
very same prompt token ids (greedy answers are identical, which the script checks), since a
cold turn 1 costs the same either way. TTFT is measured from `add_request` to the engine step
that returns the request's first token, driving `Engine.step()` directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import time

from jinfer import LLM, SamplingParams
from jinfer.engine.engine import Engine
from jinfer.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("bench_prefix_cache")

WORDS = "parse load cache page token batch index merge split render check build".split()


def _text_of_tokens(tok: Tokenizer, num_tokens: int, seed: int, make_block) -> str:
    """Concatenates `make_block(rng, i)` blocks until the text is about `num_tokens` long."""
    rng = random.Random(seed)
    blocks: list[str] = []
    while True:
        for _ in range(8):
            blocks.append(make_block(rng, len(blocks)))
        n = len(tok.encode("".join(blocks), add_special_tokens=False))
        if n >= num_tokens:
            break
    while len(blocks) > 1:  # trim back to the target
        shorter = "".join(blocks[:-1])
        if len(tok.encode(shorter, add_special_tokens=False)) < num_tokens:
            break
        blocks.pop()
    return "".join(blocks)


def _code_block(rng: random.Random, i: int) -> str:
    a, b = rng.sample(WORDS, 2)
    return (
        f"def {a}_{b}_{i}(items, limit={rng.randint(2, 99)}):\n"
        f'    """{a.title()} the items, then {b} them up to `limit`."""\n'
        f"    out = [x * {rng.randint(2, 9)} for x in items if x % {rng.randint(2, 7)}]\n"
        f"    return out[:limit]\n\n"
    )


def _log_block(rng: random.Random, i: int) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"FAILED tests/test_{a}.py::test_{b}_{i} - AssertionError: {rng.randint(0, 999)}\n"


def _chat_block(rng: random.Random, i: int) -> str:
    return f"Please {rng.choice(WORDS)} the {rng.choice(WORDS)} step {i}. "


def _tool_block(rng: random.Random, i: int) -> str:
    a, b = rng.sample(WORDS, 2)
    return f'{{"name": "{a}_{b}_{i}", "description": "Tool that will {a} and {b}."}}\n'


def _serve(eng: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict:
    """Submits all prompts at once, steps to completion; per request: TTFT, tokens, hits."""
    added = {}
    for rid, ids in prompts.items():
        eng.add_request(rid, ids, params)
        added[rid] = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, object] = {}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = now - added[out.request_id]
            if out.finished:
                done[out.request_id] = out
    return {
        rid: {
            "ttft_s": first[rid],
            "tokens": done[rid].outputs[0].token_ids,
            "text": done[rid].outputs[0].text,
            "cached": done[rid].num_cached_tokens,
            "prompt_tokens": len(prompts[rid]),
        }
        for rid in prompts
    }


def _sessions(args, tok: Tokenizer, workload: str) -> tuple[list[list[dict]], list[list[str]]]:
    """Opening conversations and the new user text of each later turn, per session."""
    if workload == "coding-agent":
        code = _text_of_tokens(tok, args.context_tokens, 1, _code_block)
        opening = [
            [
                {"role": "system", "content": "You are a coding agent. Answer briefly."},
                {"role": "user", "content": f"Repository:\n```python\n{code}```\nSummarize it."},
            ]
        ]
        follow = [
            [
                "Test run:\n"
                + _text_of_tokens(tok, args.turn_tokens, 100 + t, _log_block)
                + "Which function is wrong?"
                for t in range(args.turns - 1)
            ]
        ]
        return opening, follow
    tools = _text_of_tokens(tok, args.system_tokens, 2, _tool_block)
    system = f"You are an agent with these tools:\n{tools}Answer briefly."
    opening, follow = [], []
    for s in range(args.sessions):
        ask = _text_of_tokens(tok, args.turn_tokens, 200 + s, _chat_block)
        opening.append([{"role": "system", "content": system}, {"role": "user", "content": ask}])
        follow.append(
            [
                _text_of_tokens(tok, args.turn_tokens, 300 + 10 * s + t, _chat_block)
                for t in range(args.turns - 1)
            ]
        )
    return opening, follow


def run_workload(args, on: LLM, off: LLM, workload: str) -> dict:
    tok = on.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    convs, follow = _sessions(args, tok, workload)
    turns = []
    for t in range(args.turns):
        prompts = {
            f"{workload}-s{s}-t{t}": tok.apply_chat_template(conv, tokenize=True)
            for s, conv in enumerate(convs)
        }
        res_on = _serve(on.engine, prompts, params)
        row = {
            "turn": t + 1,
            "context_tokens": [r["prompt_tokens"] for r in res_on.values()],
            "cached_tokens": [r["cached"] for r in res_on.values()],
            "ttft_on_s": [round(r["ttft_s"], 3) for r in res_on.values()],
        }
        if t > 0:
            res_off = _serve(off.engine, {k + "-off": v for k, v in prompts.items()}, params)
            row["ttft_off_s"] = [round(r["ttft_s"], 3) for r in res_off.values()]
            row["same_tokens"] = all(
                res_off[k + "-off"]["tokens"] == res_on[k]["tokens"] for k in prompts
            )
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            row["ttft_ratio_off_on"] = round(mean(row["ttft_off_s"]) / mean(row["ttft_on_s"]), 1)
        log.info("%s turn %d: %s", workload, t + 1, row)
        turns.append(row)
        for s, (conv, r) in enumerate(zip(convs, res_on.values(), strict=True)):
            if t + 1 < args.turns:
                conv.append({"role": "assistant", "content": r["text"]})
                conv.append({"role": "user", "content": follow[s][t]})
    return {"workload": workload, "turns": turns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--workload",
        nargs="+",
        default=["coding-agent", "agentic-multi-turn"],
        choices=["coding-agent", "agentic-multi-turn"],
    )
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--context-tokens", type=int, default=7400, help="coding-agent turn 1")
    ap.add_argument("--turn-tokens", type=int, default=200, help="new user tokens per turn")
    ap.add_argument("--system-tokens", type=int, default=600, help="agentic shared system")
    ap.add_argument("--sessions", type=int, default=3, help="agentic sessions")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16, help="answer length")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    ap.add_argument(
        "--kv-events",
        action="store_true",
        help="the cache-on engine publishes KV cache events (localhost); report their cost",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    opts = dict(
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.sessions, 1),
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gb=args.kv_cache_memory_gb,  # two engines: keep each pool modest
    )
    events = {}
    if args.kv_events:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            endpoint = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        events = {"kv_events_config": {"enable_kv_cache_events": True, "endpoint": endpoint}}
    on = LLM(args.model, **opts, **events)
    # Same device weights and compiled programs; only the cache flag differs.
    off = LLM.from_params(
        on.model_config,
        on.engine.runner.params,
        on.get_tokenizer(),
        enable_prefix_caching=False,
        **opts,
    )
    results = {
        "model": args.model,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "workloads": [run_workload(args, on, off, w) for w in args.workload],
        "prefix_cache_queries": on.engine.stats.prefix_cache_queries,
        "prefix_cache_hits": on.engine.stats.prefix_cache_hits,
        "cached_pages": on.engine.blocks.num_cached_pages,
        "evictions": on.engine.blocks.num_evictions,
    }
    publisher = on.engine.kv_events
    if publisher is not None:
        stats = on.engine.stats
        results["kv_events"] = {
            "batches": publisher.seq,
            "events": publisher.num_events,
            "publish_ms_per_batch": publisher.publish_time / max(1, publisher.seq) * 1e3,
            "share_of_step_time": publisher.publish_time / stats.step_time,
        }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
