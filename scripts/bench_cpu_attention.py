"""The XLA attention path on decode batches: ms per layer, for the CPU's per-token loops.

    python scripts/bench_cpu_attention.py                       # SmolLM2 heads, a small sweep
    python scripts/bench_cpu_attention.py --heads gemma3 --batch 32 --context 300
    PYTHONPATH=OTHER_CHECKOUT python scripts/bench_cpu_attention.py   # the same sweep, other code

Every sequence of the batch is one decode token at its own context (`--context` minus 0-15, so
the loop groups see a realistic spread), `--page-size` pages (the XLA default: 64) scattered at
random in a pool in the "head" layout the XLA path reads (`kv_cache.py`), float32. The
function is jitted alone and timed as the median of `--rounds` rounds; `gb_s` is the K and V
bytes the batch must read over that time. Two checkouts compare best alternated in time
(`PYTHONPATH` picks the `jinfer` package), as this machine's speed drifts by tens of percent.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import timed

from jinfer.attention.kv_cache import to_layout
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla import XLA, xla_paged_attention

HEADS = {  # kv heads, query heads per kv head, head_dim
    "smollm2": (3, 3, 64),
    "gemma3": (1, 4, 256),
    "llama3": (8, 4, 128),
}


def bench(batch: int, context: int, heads: tuple[int, int, int], rounds: int, page: int) -> dict:
    kv_heads, q_per_kv, head_dim = heads
    rng = np.random.default_rng(batch * 100_003 + context)
    lengths = context - rng.integers(0, 16, batch)
    lengths = np.maximum(lengths, 1)
    max_pages = -(-context // page)
    num_pages = batch * max_pages + 1
    shape = (num_pages, page, kv_heads, head_dim)
    k_pages = to_layout(jnp.asarray(rng.standard_normal(shape, np.float32)), "head", "k")
    v_pages = to_layout(jnp.asarray(rng.standard_normal(shape, np.float32)), "head", "v")
    tables = (1 + rng.permutation(batch * max_pages)).reshape(batch, max_pages).astype(np.int32)
    positions = (lengths - 1).astype(np.int32)
    seqs = np.arange(batch, dtype=np.int32)
    slots = tables[seqs, positions // page] * page + positions % page
    meta = AttentionMetadata(
        positions=jnp.asarray(positions),
        seq_ids=jnp.asarray(seqs),
        slot_mapping=jnp.asarray(slots),
        block_tables=jnp.asarray(tables),
        backend=XLA,
    )
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * q_per_kv, head_dim), np.float32))
    fn = jax.jit(xla_paged_attention)
    sec = timed(lambda: fn(q, k_pages, v_pages, meta), reps=10, rounds=rounds)
    kv_bytes = 2 * int(lengths.sum()) * kv_heads * head_dim * 4
    return dict(
        batch=batch,
        context=context,
        ms=round(sec * 1e3, 3),
        gb_s=round(kv_bytes / sec / 1e9, 2),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="smollm2", choices=sorted(HEADS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[160, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=XLA.default_page_size)
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    for context in args.context:
        for batch in args.batch:
            heads = HEADS[args.heads]
            row = dict(
                heads=args.heads, **bench(batch, context, heads, args.rounds, args.page_size)
            )
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
