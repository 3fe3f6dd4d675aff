"""Speculative decoding (prompt lookup) against plain decoding, in one process, interleaved.

    python scripts/bench_spec_decode.py                          # SmolLM2, both workloads
    python scripts/bench_spec_decode.py --workload code-edit --rounds 5 --num-speculative-tokens 8

Two engines of the same model, one with `speculative_config={"method": "ngram", ...}`, run
each workload in turn for `--rounds` rounds (off, on, off, on, ...: drift hits both alike);
medians of the rounds. Workloads:

    code-edit   one stream: a source file of this repository in the prompt, the model asked for
                the whole file back with one identifier renamed (greedy, up to --max-tokens):
                output that repeats its prompt, as coding agents' edits do
    chat        --concurrency short chat requests at once (greedy, 64 tokens): a busy batch,
                where drafts get no spare rows and speculation must cost nothing

Prints output tok/s off and on, the speedup, the drafts' acceptance (accepted / verified, and
tokens per verification step), and whether the two engines' tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from jinfer import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "jinfer/spec_decode/ngram.py"  # the file the code edit rewrites
QUESTIONS = [
    "Name three colours.", "What is the capital of France?", "Give me a haiku about rain.",
    "How do I reverse a list in Python?", "What is 17 times 23?", "Define entropy briefly.",
    "Suggest a name for a cat.", "Why is the sky blue?",
]  # fmt: skip


def workload(kind: str, concurrency: int) -> tuple[list, list[SamplingParams]]:
    if kind == "code-edit":
        source = (ROOT / SOURCE).read_text()
        ask = "Rename the function `propose` to `draft` in this file and output the whole file."
        chat = [{"role": "user", "content": f"{ask}\n\n```python\n{source}```"}]
        return [chat], [SamplingParams(temperature=0, max_tokens=ARGS.max_tokens)]
    chats = [
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(concurrency)
    ]
    return chats, [SamplingParams(temperature=0, max_tokens=64)] * concurrency


def run(llm: LLM, chats, params) -> tuple[float, list, dict]:
    s = llm.engine.stats
    before = (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens)
    t0 = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    after = (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens)
    drafts, verified, accepted = (a - b for a, b in zip(after, before, strict=True))
    spec = dict(verifications=drafts, verified=verified, accepted=accepted)
    return sum(map(len, tokens)) / wall, tokens, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", nargs="+", default=["code-edit", "chat"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", help="append the results here")
    global ARGS
    ARGS = ap.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": ARGS.num_speculative_tokens}
    kw = dict(max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512)
    engines = {
        "off": LLM(ARGS.model, **kw),
        "ngram": LLM(ARGS.model, **kw, speculative_config=spec),
    }
    print(f"{ARGS.model}, {json.dumps(spec)}, medians of {ARGS.rounds} rounds")
    print("| workload | off tok/s | ngram tok/s | speedup | accepted / verified | tokens per "
          "verification | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind in ARGS.workload:
        chats, params = workload(kind, ARGS.concurrency)
        for llm in engines.values():
            run(llm, chats, params)  # first pass: caches, lazy work
        rates: dict[str, list[float]] = {name: [] for name in engines}
        tokens, specs = {}, []
        for _ in range(ARGS.rounds):
            for name, llm in engines.items():
                llm.engine.reset_prefix_cache()  # every round prefills from scratch
                rate, tokens[name], spec_stats = run(llm, chats, params)
                rates[name].append(rate)
                if name == "ngram":
                    specs.append(spec_stats)
        off, on = (statistics.median(rates[n]) for n in ("off", "ngram"))
        verified = sum(s["verified"] for s in specs)
        accepted = sum(s["accepted"] for s in specs)
        steps = sum(s["verifications"] for s in specs)
        per_step = (accepted + steps) / steps if steps else float("nan")
        share = f"{accepted} / {verified} ({accepted / verified:.0%})" if verified else "-"
        same = tokens["off"] == tokens["ngram"]
        print(f"| {kind} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {share} | {per_step:.2f} | "
              f"{same} |")  # fmt: skip
        if ARGS.json:
            with open(ARGS.json, "a") as f:
                row = dict(bench="spec_decode", model=ARGS.model, workload=kind, spec=spec,
                           off_tok_s=off, on_tok_s=on, rounds=rates, same_tokens=same,
                           accepted=accepted, verified=verified, verifications=steps)  # fmt: skip
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
