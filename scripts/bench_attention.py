"""Decode attention kernels: achieved GB/s on KV reads vs a measured device-to-device copy.

    python scripts/bench_attention.py --json out/attention.jsonl            # GPU: the full sweep
    python scripts/bench_attention.py --small                               # CPU: a tiny smoke run

Llama-3-shaped heads (8 kv heads, 4 query heads each), bf16 pool of 16-token pages scattered at
random, every sequence at the full context. GB/s counts the K and V bytes the step must read
(batch x context x kv heads x head_dim x 2 x 2 bytes) over the kernel's time; `of_copy` is that
over the bandwidth of a jitted copy (read + write) of a 1 GiB buffer on the same device.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import copy_bandwidth, timed

from jinfer.attention.kv_cache import to_layout
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla import XLA, xla_paged_attention
from pallas_kernels.attention import decode_gpu, ragged_gpu

KV_HEADS, Q_PER_KV, PAGE = 8, 4, 16


def looped(fn: Callable, n: int) -> Callable:
    """`fn` run n times inside one jitted program, each call's output the next call's query:
    the per-call time is the kernel's, free of Python dispatch (~50 us a call)."""

    def run(q, *rest):
        return jax.lax.fori_loop(0, n, lambda _, q: fn(q, *rest).astype(q.dtype), q)

    return jax.jit(run)


def make_batch(batch: int, context: int, head_dim: int, dtype, seed: int = 0):
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    key = jax.random.key(seed)
    shape = (num_pages, PAGE, KV_HEADS, head_dim)
    k_pages = jax.random.normal(key, shape, dtype)
    v_pages = jax.random.normal(jax.random.fold_in(key, 1), shape, dtype)
    perm = 1 + np.random.default_rng(seed).permutation(batch * pages_per_seq)
    tables = jnp.asarray(perm.reshape(batch, pages_per_seq).astype(np.int32))
    q = jax.random.normal(key, (batch, KV_HEADS * Q_PER_KV, head_dim), dtype) / head_dim**0.5
    kv_lens = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, kv_lens, tables


def bench_config(args, batch: int, context: int, head_dim: int, bw: float) -> list[dict]:
    """Times each kernel on one (batch, context, head_dim); the pool is freed on return."""
    interpret = jax.default_backend() != "gpu"
    dtype = jnp.dtype(args.dtype)
    data = make_batch(batch, context, head_dim, dtype)
    q, k_pages, v_pages, kv_lens, tables = data
    kernels = {
        "decode": lambda *a: decode_gpu.paged_decode_attention(*a, interpret=interpret),
    }
    if args.ragged:
        cu = jnp.arange(batch + 1, dtype=jnp.int32)
        kernels["ragged"] = lambda q, k, v, n, t: ragged_gpu.ragged_paged_attention(
            q, k, v, n, t, cu, interpret=interpret
        )
    if args.xla:
        meta = AttentionMetadata(
            positions=kv_lens - 1,
            seq_ids=jnp.arange(batch, dtype=jnp.int32),
            slot_mapping=jnp.zeros(batch, jnp.int32),
            block_tables=tables,
            backend=XLA,
        )
        kernels["xla"] = lambda q, k, v, n, t: xla_paged_attention(q, k, v, meta)
    # The XLA path reads its pools in the "head" layout (kv_cache.py), the kernels in "token".
    head = (q, to_layout(k_pages, "head", "k"), to_layout(v_pages, "head", "v"), kv_lens, tables)
    kv_bytes = 2 * batch * context * KV_HEADS * head_dim * dtype.itemsize
    rows = []
    for name, fn in kernels.items():
        try:
            run = looped(fn, args.inner)
            args_ = head if name == "xla" else data
            sec = timed(lambda run=run, a=args_: run(*a), args.reps) / args.inner
        except Exception as e:  # one failing config (a compile error, say) must not end the sweep
            print(f"FAILED {name} b{batch} ctx{context} h{head_dim}: {type(e).__name__}: {e}"[:600])
            continue
        rows.append(
            dict(
                bench="attention",
                kernel=name,
                device=jax.devices()[0].device_kind,
                batch=batch,
                context=context,
                head_dim=head_dim,
                us=round(sec * 1e6, 1),
                gb_s=round(kv_bytes / sec / 1e9, 1),
                of_copy=round(kv_bytes / sec / bw, 3),
                copy_gb_s=round(bw / 1e9, 1),
            )
        )
        emit(rows[-1], args.json)
    return rows


def emit(row: dict, path: str | None) -> None:
    """Prints the row and appends it to `path` at once: a stage cut off by its timeout keeps
    every measurement it finished."""
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(args: argparse.Namespace) -> list[dict]:
    bw = copy_bandwidth(args.copy_bytes)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s on {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for head_dim in args.head_dim:
        for context in args.context:
            for batch in args.batch:
                rows += bench_config(args, batch, context, head_dim, bw)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5, help="timed calls (after a warm-up)")
    ap.add_argument("--inner", type=int, default=20, help="kernel runs inside each call")
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    ap.add_argument("--ragged", action="store_true", help="also time the ragged kernel")
    ap.add_argument("--xla", action="store_true", help="also time the XLA attention path")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    if args.small:
        args.batch, args.context, args.head_dim = [1, 2], [40], [64]
        args.reps, args.inner, args.copy_bytes, args.ragged, args.xla = 1, 2, 1 << 20, True, True
    run(args)


if __name__ == "__main__":
    main()
