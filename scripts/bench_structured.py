"""What constrained decoding costs, per part, on a real vocabulary: the vocabulary handed to
llguidance (once per process), a grammar's first compile (a 5-field JSON schema, a regex, a
choice), a batch's rows advanced by a token and their masks filled on the host (rows 1, 16,
32, each mid-way through its own JSON object), and the mask applied to [rows, V] logits on
the device, against the greedy argmax of the same logits.

    python scripts/bench_structured.py                   # SmolLM2's vocabulary
    python scripts/bench_structured.py --model gemma3-270m

The host fill is what the engine will run while the device computes a step's forward pass;
the apply runs inside the sampler program.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.loader.named_models import resolve_model
from jinfer.sampling_params import StructuredOutputsParams as SO
from jinfer.structured import bitmask
from jinfer.structured.grammar import GrammarCompiler
from jinfer.tokenizer.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "email", "admin", "tags"],
}


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    tok = load_tokenizer(str(resolve_model(args.model)))
    vocab = tok.vocab_size
    compiler = GrammarCompiler(tok, cache_size=1)
    t0 = time.perf_counter()
    compiler.lltokenizer  # noqa: B018
    print(f"{args.model}: vocabulary {vocab}, handed to llguidance in "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms (once per process)")  # fmt: skip

    print("\n| constraint | first compile ms (median) |\n|---|---|")
    constraints = {
        "JSON schema, 5 fields": lambda i: SO(json={**SCHEMA, "title": f"t{i}"}),
        "regex": lambda i: SO(regex=rf"[A-Z]{{2}}-\d{{3,{i + 3}}}"),
        "choice of 4": lambda i: SO(choice=["yes", "no", "maybe", f"ask {i}"]),
    }
    for name, make in constraints.items():
        times = []
        for i in range(11):  # a new grammar each time (cache_size 1 and a distinct key)
            t0 = time.perf_counter()
            compiler.compile(make(i))
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times[1:]) * 1e3:.2f} |")

    compiled = compiler.compile(SO(json=SCHEMA))
    prefix = tok.encode('{"name": "Ada', add_special_tokens=False)  # inside a string
    words = " the of and to in is that for it as was with be by on not this are or from".split()
    pieces = [t for w in words for t in tok.encode(" " + w, add_special_tokens=False)[:1]]
    filler = bitmask.MaskFiller()
    apply = jax.jit(bitmask.apply_bitmask)
    greedy = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    masked_greedy = jax.jit(lambda x, m: jnp.argmax(bitmask.apply_bitmask(x, m), axis=-1))
    print(
        "\n| rows | host: advance + fill ms | device argmax ms | mask + argmax ms | allowed |"
        "\n|---|---|---|---|---|"
    )
    for rows in args.rows:
        matchers = []
        for _ in range(rows):
            m = compiled.matcher()
            assert m.consume_tokens(prefix), m.get_error()
            matchers.append(m)
        mask = bitmask.allocate(rows, vocab)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        turn = iter(range(10**9))

        def step() -> None:
            # What one decode step asks: each row takes its sampled token (a word of the name,
            # a different one each time: a matcher caches masks of states it has seen), then
            # its next mask.
            t = pieces[next(turn) % len(pieces)]  # noqa: B023
            for m in matchers:  # noqa: B023
                assert m.consume_token(t), m.get_error()
            filler.fill(mask, pairs)  # noqa: B023
            for m in matchers:  # noqa: B023
                m.rollback(1)

        fill_ms = median_ms(step, args.reps)
        logits = jnp.asarray(np.random.default_rng(0).standard_normal((rows, vocab)), jnp.float32)
        dmask = jnp.asarray(mask)
        jax.block_until_ready((apply(logits, dmask), masked_greedy(logits, dmask)))
        jax.block_until_ready(greedy(logits))
        plain = median_ms(lambda: jax.block_until_ready(greedy(logits)), args.reps)  # noqa: B023
        masked = median_ms(
            lambda: jax.block_until_ready(masked_greedy(logits, dmask)),  # noqa: B023
            args.reps,
        )
        allowed = int(bitmask.allowed_tokens(mask[0], vocab).sum())
        print(f"| {rows} | {fill_ms:.3f} | {plain:.3f} | {masked:.3f} | {allowed} |")
    compiler.close()


if __name__ == "__main__":
    main()
