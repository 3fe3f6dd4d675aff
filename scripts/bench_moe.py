"""A mixture-of-experts layer's experts, timed against the matmul floor of the active weights.

    python scripts/bench_moe.py                                  # 64 experts, top 8, D 1024
    python scripts/bench_moe.py --experts 16 --top 2 --rows 1 32 256

For each token count T, ways to run the experts of one sparse layer (random float32 weights,
random routing; the router and the softmax excluded, the same for all):

    ragged    `jinfer.models.decoder.moe_block`'s way: the T*X (token, expert) rows sorted by
              expert, one `lax.ragged_dot` per projection (XLA:CPU lowers it densely: every
              expert's weight over every row, masked)
    blocked   the sorted rows padded to whole blocks of 8 per expert, each block one batched
              product with its expert's weights (gathered per block): static shapes, at most
              ceil(T*X / 8) + min(E, T*X) blocks
    pallas    (GPU only) the sorted rows through `pallas_kernels/moe/grouped_matmul_gpu.py`, the
              Triton grouped matmul jinfer runs on GPUs (XLA:GPU expands ragged_dot densely)
    gather    each row multiplies its own expert's weights, gathered: [T*X, D, C] reads
    floor     the ideal grouped product for that very routing: each used expert's rows times its
              weights, group sizes static (compiled for one routing: not servable, a bound)

Medians of `--rounds` rounds; the methods interleaved in each round. The outputs of ragged
and gather are compared (they must agree).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import grouped_matmul_gpu


def _experts(rng: np.random.Generator, e: int, d: int, c: int) -> tuple[jax.Array, ...]:
    def w(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, np.float32) * d**-0.5)

    return w(e, d, c), w(e, d, c), w(e, c, d)


@jax.jit
def ragged(x, ids, w_gate, w_up, w_down):  # x [T, D], ids [T, X]
    t, top = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    rows = x[order // top]
    g = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes))
    u = jax.lax.ragged_dot(rows, w_up, sizes)
    out = jax.lax.ragged_dot(g * u, w_down, sizes)
    return jnp.zeros_like(out).at[order].set(out).reshape(t, top, -1).sum(1)


@jax.jit
def pallas(x, ids, w_gate, w_up, w_down):  # GPU only: the Triton grouped matmul
    t, top = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    rows = x[order // top]
    g = jax.nn.silu(grouped_matmul_gpu.grouped_matmul(rows, w_gate, sizes))
    u = grouped_matmul_gpu.grouped_matmul(rows, w_up, sizes)
    out = grouped_matmul_gpu.grouped_matmul(g * u, w_down, sizes)
    return jnp.zeros_like(out).at[order].set(out).reshape(t, top, -1).sum(1)


@jax.jit
def gather(x, ids, w_gate, w_up, w_down):
    t, top = ids.shape
    rows = jnp.repeat(x, top, axis=0)  # [T*X, D]
    flat = ids.reshape(-1)
    g = jax.nn.silu(jnp.einsum("rd,rdc->rc", rows, w_gate[flat]))
    u = jnp.einsum("rd,rdc->rc", rows, w_up[flat])
    out = jnp.einsum("rc,rcd->rd", g * u, w_down[flat])
    return out.reshape(t, top, -1).sum(1)


@functools.partial(jax.jit, static_argnames="block")
def blocked(x, ids, w_gate, w_up, w_down, block: int = 8):
    t, top = ids.shape
    e = w_gate.shape[0]
    flat = ids.reshape(-1)  # [R]
    r = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)
    padded = (sizes + block - 1) // block * block  # each group to whole blocks
    ends = jnp.cumsum(padded)
    starts = ends - padded
    first = jnp.cumsum(sizes) - sizes
    sorted_ids = flat[order]
    dest = starts[sorted_ids] + jnp.arange(r) - first[sorted_ids]  # [R] row in the blocks
    nb = -(-r // block) + min(e, r)  # static bound on the blocks any routing needs
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb) * block, side="right"), e - 1)
    xs = jnp.zeros((nb * block, x.shape[1]), x.dtype).at[dest].set(x[order // top])
    xs = xs.reshape(nb, block, -1)
    g = jax.nn.silu(jnp.einsum("bnd,bdc->bnc", xs, w_gate[block_expert]))
    u = jnp.einsum("bnd,bdc->bnc", xs, w_up[block_expert])
    out = jnp.einsum("bnc,bcd->bnd", g * u, w_down[block_expert]).reshape(nb * block, -1)
    out = jnp.zeros((r, out.shape[1]), out.dtype).at[order].set(out[dest])
    return out.reshape(t, top, -1).sum(1)


def floor_for(ids: np.ndarray):
    """The ideal grouped product for this routing: each expert's rows times its weights, the
    groups' sizes static (compiled for this routing only)."""
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    groups = [(int(e), int(n)) for e, n in zip(*np.unique(flat, return_counts=True), strict=True)]

    @jax.jit
    def run(x, ids_, w_gate, w_up, w_down):
        rows = x[order // ids.shape[1]]
        outs, start = [], 0
        for e, n in groups:
            xe = rows[start : start + n]
            outs.append((jax.nn.silu(xe @ w_gate[e]) * (xe @ w_up[e])) @ w_down[e])
            start += n
        out = jnp.zeros_like(rows).at[order].set(jnp.concatenate(outs))
        return out.reshape(ids.shape[0], ids.shape[1], -1).sum(1)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    e, top, d, c = args.experts, args.top, args.hidden, args.expert_width
    weights = _experts(rng, e, d, c)
    rows_out = []
    for t in args.rows:
        x = jnp.asarray(rng.standard_normal((t, d), np.float32))
        ids = jnp.asarray(
            np.stack([rng.choice(e, top, replace=False) for _ in range(t)]).astype(np.int32)
        )
        methods = {"ragged": ragged, "blocked": blocked, "gather": gather,
                   "floor": floor_for(np.asarray(ids))}  # fmt: skip
        if jax.default_backend() == "gpu":
            methods["pallas"] = pallas
        outs = {name: jax.block_until_ready(fn(x, ids, *weights)) for name, fn in methods.items()}
        for name in set(methods) - {"floor"}:
            err = float(jnp.max(jnp.abs(outs[name] - outs["floor"])))
            assert err < 1e-3 * float(jnp.max(jnp.abs(outs["floor"]))), (name, err)
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = fn(x, ids, *weights)
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - t0) / args.reps)
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        rows_out.append({"tokens": t, **{f"{k}_ms": v for k, v in ms.items()}})
    meta = {"experts": e, "top": top, "hidden": d, "expert_width": c,
            "backend": jax.default_backend()}  # fmt: skip
    if args.json:
        print(json.dumps({**meta, "rows": rows_out}))
        return
    print(json.dumps(meta))
    names = tuple(n for n in ("ragged", "pallas", "blocked", "gather") if f"{n}_ms" in rows_out[0])
    print("| tokens | floor ms | " + " | ".join(f"{n} ms (x floor)" for n in names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for r in rows_out:
        cells = [f"{r[n + '_ms']:.2f} ({r[n + '_ms'] / r['floor_ms']:.1f}x)" for n in names]
        print(f"| {r['tokens']} | {r['floor_ms']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
