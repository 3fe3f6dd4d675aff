"""Cold long-context prefill throughput: one prompt of N random token ids, timed to its first token.

    PYTHONPATH=. python scripts/bench_prefill.py --lengths 1024 4096 8192

Prefix caching is off, so every run computes the whole prompt (chunked by
max_num_batched_tokens); compile time is excluded by the engine's warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging

from _bench_util import prefill_rate, random_ids

from jinfer import LLM
from jinfer.attention.xla import XLA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--query-block", type=int, help="Bq of the prefill layout (1: per token)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.query_block is not None:
        XLA.query_block = args.query_block
    llm = LLM(
        args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    runner = llm.engine.runner
    results = {"model": args.model, "query_block": runner.query_block, "buckets": runner.buckets}
    results["warmup_s"] = round(llm.warmup_time, 1)
    for i, n in enumerate(args.lengths):
        results[f"prefill_tok_s_{n}"] = round(
            prefill_rate(llm, random_ids(min(n, args.max_model_len - 1), i), warm=False), 1
        )
        print(json.dumps(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
