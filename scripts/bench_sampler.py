"""The sampler alone, per setting: ms per call on [rows, vocab] logits, against greedy's.

    python scripts/bench_sampler.py                      # 32 x 49152 (SmolLM2's), std-3 logits
    python scripts/bench_sampler.py --rows 64 --vocab 262144 --host-decided

The sampler's program as the runner dispatches it (`Sampler.run_packed`: the batch built and
packed beforehand, as the engine builds it), for greedy, temperature, top-k, top-p, both,
min-p, penalties and logprobs batches (every row the same setting, seeded): --rounds rounds,
each timing every setting --reps calls in turn (interleaved, so a drift of the machine's speed
reaches every setting alike); the median over all of a setting's calls. `--host-decided`
picks each batch's `SamplerVariant` on the host, as on accelerators; by default the device
decides, as on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jinfer.runner import packing
from jinfer.sample.metadata import SamplingBatch
from jinfer.sample.sampler import Sampler
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.sequence import Sequence

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "top_k 50": dict(temperature=0.8, top_k=50),
    "top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "top_k 50 + top_p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
    "penalties": dict(temperature=0.8, repetition_penalty=1.2, frequency_penalty=0.5),
    "logprobs 5": dict(temperature=0.0, logprobs=5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--std", type=float, default=3.0, help="of the random logits")
    ap.add_argument("--history", type=int, default=512, help="penalty history width")
    ap.add_argument("--reps", type=int, default=7, help="calls per setting per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--host-decided", action="store_true", help="the accelerators' variants")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    logits = jax.device_put((rng.standard_normal((args.rows, args.vocab)) * args.std).astype("f4"))
    history = rng.integers(0, args.vocab, 64).tolist()
    side = "host" if args.host_decided else "device"
    print(f"sampler on {args.rows} x {args.vocab} logits (std {args.std}), {side}-decided")
    print("| setting | ms per call | x greedy |")
    print("|---|---|---|")
    sampler = Sampler(args.history, args.rows, decide_on_host=args.host_decided)
    batches = {}
    for name, fields in SETTINGS.items():
        params = SamplingParams(max_tokens=None, seed=1, **fields)
        seqs = [
            Sequence(str(i), history[:32], params, seed=i, arrival=i, output_token_ids=history[32:])
            for i in range(args.rows)
        ]
        mask = sampler._bitmask(seqs, args.rows, args.vocab)  # CPU: all ones, as the engine's
        batch = SamplingBatch.from_sequences(
            seqs, args.rows, args.history, args.host_decided, bitmask=mask
        )
        batches[name] = packing.pack(batch)
        jax.block_until_ready(sampler.run_packed(logits, *batches[name]))  # compiles
    times = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, batch in batches.items():
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(sampler.run_packed(logits, *batch))
                times[name].append(time.perf_counter() - t0)
    greedy = statistics.median(times["greedy"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms * 1e3:.2f} | {ms / greedy:.2f} |")


if __name__ == "__main__":
    main()
