"""Async scheduling against the synchronous loop: decode throughput, in one process, interleaved.

    python scripts/bench_async.py                          # a small random model: host work shows
    python scripts/bench_async.py --model smollm2-135m-instruct --rounds 3
    python scripts/bench_async.py --shape llama3-1b --tokenizer DIR   # GPU

Two engines over the same weights, `async_scheduling=True` and `False`, run the same seeded
workload (token-id prompts, greedy, ignore_eos, fixed output lengths) in alternating rounds; the
table gives each one's median output tok/s over the rounds, its median share of step wall time
the host spent outside waiting for the device, and the ratio. The tokens are compared too: the
two loops must give the same outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
from bench_offline import RANDOM_SHAPES

from jinfer import LLM, SamplingParams
from jinfer.config.model import ModelConfig

log = logging.getLogger("bench_async")


def build(args: argparse.Namespace) -> dict[bool, LLM]:
    from jinfer.loader import load_weights
    from jinfer.loader.named_models import resolve_model
    from jinfer.models.params import init_params
    from jinfer.tokenizer.tokenizer import load_tokenizer

    path = None if (args.shape and args.tokenizer) else str(resolve_model(args.model))
    tokenizer = load_tokenizer(args.tokenizer or path)
    if args.shape:
        cfg = ModelConfig(
            arch="llama", vocab_size=tokenizer.vocab_size, **RANDOM_SHAPES[args.shape]
        )
        params = init_params(cfg, seed=0)
    else:
        cfg, params = load_weights(path)
    options = dict(
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(args.batch, args.prompt_len),
        max_model_len=args.prompt_len + args.output_len + 8,
        enable_prefix_caching=False,
    )
    return {
        mode: LLM.from_params(cfg, params, tokenizer, async_scheduling=mode, **options)
        for mode in (True, False)
    }


def run(llm: LLM, prompts: list[dict], params: SamplingParams) -> dict:
    stats = llm.engine.stats
    before = (stats.step_time, stats.device_time)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    step, device = stats.step_time - before[0], stats.device_time - before[1]
    return {
        "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
        "host_share": (step - device) / step if step else 0.0,
        "tokens": [o.outputs[0].token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="weights (or tokenizer)")
    ap.add_argument("--shape", default="tiny", help="random weights of this shape ('': --model)")
    ap.add_argument("--tokenizer", help="tokenizer for --shape (default: --model's)")
    ap.add_argument("--batch", type=int, default=8, help="requests decoding at once")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.shape and args.shape not in RANDOM_SHAPES:
        ap.error(f"--shape must be one of {sorted(RANDOM_SHAPES)} or ''")
    logging.basicConfig(level=logging.WARNING)
    engines = build(args)
    rng = np.random.default_rng(0)
    vocab = engines[True].model_config.vocab_size
    prompts = [
        {"prompt_token_ids": rng.integers(3, vocab, args.prompt_len).tolist()}
        for _ in range(args.batch)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for llm in engines.values():  # one round each first: any lazy setup out of the timing
        run(llm, prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    rounds: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(args.rounds):
        for mode in (True, False) if i % 2 == 0 else (False, True):
            rounds[mode].append(run(engines[mode], prompts, params))
    same = all(r["tokens"] == rounds[False][0]["tokens"] for rs in rounds.values() for r in rs)
    result = {}
    for mode, rs in rounds.items():
        result["async" if mode else "sync"] = {
            "output_tok_s": statistics.median(r["output_tok_s"] for r in rs),
            "range": [min(r["output_tok_s"] for r in rs), max(r["output_tok_s"] for r in rs)],
            "host_share": statistics.median(r["host_share"] for r in rs),
        }
    ratio = result["async"]["output_tok_s"] / result["sync"]["output_tok_s"]
    name = f"{args.shape} (random weights)" if args.shape else args.model
    print(f"{name}: {args.batch} x {args.prompt_len} in, {args.output_len} out, greedy")
    print("| loop | output tok/s, median (range) | step time not waiting for the device |")
    print("|---|---|---|")
    for key, r in result.items():
        lo, hi = r["range"]
        print(f"| {key} | {r['output_tok_s']:.1f} ({lo:.1f}-{hi:.1f}) | {r['host_share']:.1%} |")
    print(f"async / sync: {ratio:.2f}x over {args.rounds} interleaved rounds; same tokens: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result, "ratio": ratio, "same_tokens": same}, f)


if __name__ == "__main__":
    main()
