"""Engine micro-benchmark: warm-up time, prefill tok/s, decode tok/s at several batch sizes.

    python scripts/bench_engine.py --model smollm2-135m-instruct --batch-sizes 1 32

Decode is timed over steady-state steps only (all requests past prefill), with the prompts
prefilled first; prefill is one long prompt timed to its first token.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from _bench_util import decode_rate, prefill_rate, random_ids

from jinfer import LLM
from jinfer.config.engine import COMPILE_UNITS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--compile-unit", default="auto", choices=COMPILE_UNITS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        max_model_len=2048,
        max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=args.max_num_batched_tokens,
        compile_unit=args.compile_unit,
        # The prefill rate reruns one prompt: with the cache on, the timed run would be hits.
        enable_prefix_caching=False,
    )
    results = {
        "model": args.model,
        "load_s": round(llm.load_time, 1),
        "warmup_s": round(llm.warmup_time, 1),
        "ready_s": round(time.perf_counter() - t0, 1),
        "buckets": list(llm.engine.runner.buckets),
        "prefill_tok_s": round(prefill_rate(llm, random_ids(args.prefill_len)), 1),
    }
    for b in args.batch_sizes:
        results[f"decode_tok_s_b{b}"] = round(
            decode_rate(llm, b, args.prompt_len, args.decode_steps), 1
        )
    stats = llm.engine.stats
    results["host_fraction"] = round(stats.host_fraction, 4)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
