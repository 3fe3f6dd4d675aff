"""Speculative decoding (prompt lookup, suffix decoding) against plain decoding, interleaved.

    python scripts/bench_spec_decode.py                          # SmolLM2, every workload
    python scripts/bench_spec_decode.py --workload agentic --method suffix --rounds 5

Engines of the same model, plain and one per `--method` (`speculative_config={"method": M,
"num_speculative_tokens": K}`), run each workload in turn for `--rounds` rounds (off, ngram,
suffix, off, ...: drift hits all alike); medians of the rounds. Before every round each engine's
prefix cache and suffix decoding's earlier outputs are reset: a round never drafts from the one
before it. Workloads:

    code-edit   one stream: a source file of this repository in the prompt, the model asked for
                the whole file back with one identifier renamed (greedy, up to --max-tokens):
                output that repeats its prompt, as coding agents' edits do
    chat        --concurrency short chat requests at once (greedy, 64 tokens): a busy batch,
                where drafts get no spare rows and speculation must cost nothing
    agentic     bench_serving.py's agentic-multi-turn sessions (--sessions of them, lengths times
                --scale), all sessions' turn t at once, turn after turn: each turn resends the
                whole conversation (the model's own earlier answers included) plus a tool result

Prints, per workload and engine: output tok/s and against off, TPOT (median over requests of
(finished - first token) / (tokens - 1), ms), the drafts' acceptance (accepted / verified, and
tokens per verification step), and whether the engine's tokens are identical to off's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from jinfer import LLM, SamplingParams
from jinfer.spec_decode.verify import make_drafter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _workloads import make_sessions  # noqa: E402

# The file the code edit rewrites: jinfer/spec_decode/ngram.py as it was when this benchmark
# was first run (a fixed prompt: the figures in docs/benchmarks.md stay comparable).
SOURCE = "scripts/code_edit_source.txt"
QUESTIONS = [
    "Name three colours.", "What is the capital of France?", "Give me a haiku about rain.",
    "How do I reverse a list in Python?", "What is 17 times 23?", "Define entropy briefly.",
    "Suggest a name for a cat.", "Why is the sky blue?",
]  # fmt: skip


def workload(kind: str) -> list[tuple[list, list[SamplingParams]]]:
    """The workload's batches, in order; agentic's are built turn by turn (see `run`)."""
    if kind == "code-edit":
        source = (ROOT / ARGS.source).read_text()
        ask = "Rename the function `propose` to `draft` in this file and output the whole file."
        chat = [{"role": "user", "content": f"{ask}\n\n```python\n{source}```"}]
        return [([chat], [SamplingParams(temperature=0, max_tokens=ARGS.max_tokens)])]
    if kind == "chat":
        n = ARGS.concurrency
        chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
        return [(chats, [SamplingParams(temperature=0, max_tokens=64)] * n)]
    raise ValueError(f"unknown workload {kind!r}")


def run(llm: LLM, kind: str) -> tuple[float, list[float], list, dict]:
    """One pass: output tok/s, each request's TPOT (s), the tokens, the drafts' counts."""
    s = llm.engine.stats
    before = (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens)
    outs = []
    t0 = time.perf_counter()
    if kind == "agentic":
        sessions = make_sessions("agentic-multi-turn", ARGS.sessions, 0, ARGS.scale)
        history = [[{"role": "system", "content": x.system}] for x in sessions]
        for t in range(max(len(x.turns) for x in sessions)):
            live = [i for i, x in enumerate(sessions) if t < len(x.turns)]
            for i in live:
                history[i].append({"role": "user", "content": sessions[i].turns[t].user})
            params = [SamplingParams(temperature=0, max_tokens=sessions[i].turns[t].max_tokens)
                      for i in live]  # fmt: skip
            turn = llm.chat([history[i] for i in live], params, use_tqdm=False)
            for i, o in zip(live, turn, strict=True):
                history[i].append({"role": "assistant", "content": o.outputs[0].text})
            outs += turn
    else:
        for chats, params in workload(kind):
            outs += llm.chat(chats, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / (len(t) - 1)
        for o, t in zip(outs, tokens, strict=True)
        if len(t) > 1
    ]
    after = (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens)
    drafts, verified, accepted = (a - b for a, b in zip(after, before, strict=True))
    spec = dict(verifications=drafts, verified=verified, accepted=accepted)
    return sum(map(len, tokens)) / wall, tpot, tokens, spec


def reset(llm: LLM) -> None:
    """Nothing a round leaves behind helps the next: KV pages, suffix decoding's outputs."""
    llm.engine.reset_prefix_cache()
    llm.engine.drafter = make_drafter(llm.engine.speculative)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", nargs="+", default=["code-edit", "chat", "agentic"])
    ap.add_argument("--method", nargs="+", default=["ngram", "suffix"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=8, help="agentic: sessions at once")
    ap.add_argument("--scale", type=float, default=0.5, help="agentic: lengths times this")
    ap.add_argument("--max-model-len", type=int, help="default: 8192 with agentic, else 2048")
    ap.add_argument("--source", default=SOURCE, help="code-edit: the file (from the root)")
    ap.add_argument("--json", help="append the results here")
    global ARGS
    ARGS = ap.parse_args()
    k = ARGS.num_speculative_tokens
    specs = {m: {"method": m, "num_speculative_tokens": k} for m in ARGS.method}
    max_model_len = ARGS.max_model_len or (8192 if "agentic" in ARGS.workload else 2048)
    kw = dict(max_model_len=max_model_len, max_num_seqs=32, max_num_batched_tokens=512)
    engines = {"off": LLM(ARGS.model, **kw)}
    for method, spec in specs.items():
        engines[method] = LLM(ARGS.model, **kw, speculative_config=spec)
    print(f"{ARGS.model}, num_speculative_tokens {k}, medians of {ARGS.rounds} rounds")
    print("| workload | engine | tok/s | vs off | TPOT ms | accepted / verified | tokens per "
          "verification | same tokens as off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for kind in ARGS.workload:
        for llm in engines.values():
            run(llm, kind)  # first pass: caches, lazy work
        rates: dict[str, list[float]] = {name: [] for name in engines}
        tpots: dict[str, list[float]] = {name: [] for name in engines}
        counts: dict[str, list[dict]] = {name: [] for name in engines}
        tokens = {}
        for _ in range(ARGS.rounds):
            for name, llm in engines.items():
                reset(llm)
                rate, tpot, tokens[name], spec_stats = run(llm, kind)
                rates[name].append(rate)
                tpots[name].append(statistics.median(tpot) * 1e3)
                counts[name].append(spec_stats)
        off = statistics.median(rates["off"])
        for name in engines:
            rate, tpot = statistics.median(rates[name]), statistics.median(tpots[name])
            verified = sum(c["verified"] for c in counts[name])
            accepted = sum(c["accepted"] for c in counts[name])
            steps = sum(c["verifications"] for c in counts[name])
            per_step = f"{(accepted + steps) / steps:.2f}" if steps else "-"
            share = f"{accepted} / {verified} ({accepted / verified:.0%})" if verified else "-"
            same = tokens[name] == tokens["off"]
            print(f"| {kind} | {name} | {rate:.1f} | {rate / off:.2f}x | {tpot:.1f} | {share} | "
                  f"{per_step} | {same} |", flush=True)  # fmt: skip
            if ARGS.json:
                with open(ARGS.json, "a") as f:
                    row = dict(bench="spec_decode", model=ARGS.model, workload=kind, engine=name,
                               spec=specs.get(name), tok_s=rate, tpot_ms=tpot, rounds=rates[name],
                               same_tokens=same, accepted=accepted, verified=verified,
                               verifications=steps)  # fmt: skip
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
