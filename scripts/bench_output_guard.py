"""What an output guard costs: the same batch of free requests through an engine without a
guard and one with the built-in regex deny list (a pattern that never matches, so every token
is checked and the text runs to max_tokens), interleaved round by round in one process;
output tokens/s (medians) and the guard's own host time per step.

    python scripts/bench_output_guard.py                 # SmolLM2, batch 16
    python scripts/bench_output_guard.py --batch 32 --pattern 'password|api[_-]?key'
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from jinfer import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pattern", default=r"\b(password|secret key|api[_-]?key)\b")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = dict(max_model_len=512, max_num_seqs=args.batch, max_num_batched_tokens=256)
    engines = {
        "none": LLM(args.model, **options),
        "regex": LLM(args.model, output_guard=f"regex:{args.pattern}", **options),
    }
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [f"Write a short story about a robot, number {i}." for i in range(args.batch)]
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for llm in engines.values():
        llm.generate(prompts, params, use_tqdm=False)  # caches
    guard = engines["regex"].engine.stats
    guard_time0, steps0 = guard.guard_time, guard.num_steps
    for _ in range(args.rounds):
        for name, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(tokens / (time.perf_counter() - t0))
    per_step = (guard.guard_time - guard_time0) / (guard.num_steps - steps0)
    print(f"{args.model}, batch {args.batch}, {args.max_tokens} tokens, medians of {args.rounds}")
    for name, r in rates.items():
        print(f"  guard {name:>5}: {statistics.median(r):7.1f} tok/s")
    print(f"  regex guard time: {per_step * 1e3:.3f} ms per step ({args.batch} rows)")


if __name__ == "__main__":
    main()
