"""Constrained against free decoding through the whole engine: output tokens/s of a batch of
requests under a JSON schema against the same batch unconstrained, at several batch sizes, in
one process, interleaved round by round (medians: this machine drifts by tens of percent).

    python scripts/bench_constrained.py                          # SmolLM2, batches 1 16 32
    python scripts/bench_constrained.py --batch 16 --rounds 7 --no-async-scheduling

Every request decodes `--max-tokens` tokens: free ones ignore EOS, constrained ones follow a
schema that cannot end sooner (an array of at least 100 five-field user objects), so both sides
run the same steps and differ only by the constraint: its masks filled on the host each step,
the masked sampler program, and a loop that lands each step's tokens before sampling the next.
The constrained outputs are checked to be the schema's prefix (JSON that a continuation can
complete) for the numbers to count.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from jinfer import LLM, SamplingParams, StructuredOutputsParams

USER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 32},
        "admin": {"type": "boolean"},
        "role": {"enum": ["dev", "ops", "pm"]},
    },
    "required": ["name", "age", "email", "admin", "role"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": USER, "minItems": 100}
PROMPT = "Write a JSON array of user records for our staff directory:\n"


def run(llm: LLM, batch: int, params: SamplingParams) -> tuple[float, int, list[str]]:
    """(seconds, output tokens, texts) of `batch` copies of the prompt (distinct seeds)."""
    prompts = [f"{PROMPT}(batch {i})\n" for i in range(batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return elapsed, tokens, [o.outputs[0].text for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    llm = LLM(
        args.model,
        max_model_len=512,
        max_num_seqs=max(args.batch),
        max_num_batched_tokens=max(256, max(args.batch)),
        async_scheduling=args.async_scheduling,
    )
    common = dict(temperature=0, max_tokens=args.max_tokens)
    free = SamplingParams(ignore_eos=True, **common)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    constrained = SamplingParams(structured_outputs=so, **common)
    run(llm, max(args.batch), constrained)  # the grammar's first compile, the caches
    compiles = llm.engine.num_compiles
    print(f"{args.model}, {args.max_tokens} tokens per request, async_scheduling="
          f"{args.async_scheduling}, medians of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'batch':>5} {'free tok/s':>11} {'constrained':>12} {'ratio':>6}")
    for batch in args.batch:
        rates: dict[str, list[float]] = {"free": [], "constrained": []}
        for _ in range(args.rounds):
            for name, params in (("free", free), ("constrained", constrained)):
                seconds, tokens, texts = run(llm, batch, params)
                if name == "constrained":
                    assert all(t.startswith('[{"name":"') for t in texts), texts[0][:80]
                    assert tokens == batch * args.max_tokens, "a constrained request ended early"
                rates[name].append(tokens / seconds)
        f, c = (statistics.median(rates[k]) for k in ("free", "constrained"))
        print(f"{batch:>5} {f:>11.1f} {c:>12.1f} {c / f:>6.2f}")
    assert llm.engine.num_compiles == compiles, "a program was compiled after warm-up"


if __name__ == "__main__":
    main()
