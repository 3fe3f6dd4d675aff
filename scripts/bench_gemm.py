"""The model's weight products alone, at its own shapes: XLA (as `models/layers.py: dense` runs
them) and, where torch is installed, PyTorch on the same CPU threads.

    python scripts/bench_gemm.py                              # SmolLM2, 1 / 32 / 544 rows
    python scripts/bench_gemm.py --model gemma3-270m --rows 32

Per shape: GFLOP/s over `--copies` distinct weights used in turn, so that they stream from memory
as a step's 30 layers do (one weight re-used would sit in cache). Then the time of one step's
layer products (every layer's seven) at that many rows, and of the logits head at as many (a
decode step; a prefill step needs it only for its last tokens): what a step costs with attention,
norms and dispatch taken away. That bound, not the 1024-cubed GEMM rate behind
`bench_offline.py`'s compute roofline, is what a CPU step of this model can approach.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.loader import load_weights, named_models
from jinfer.models.layers import dense


def shapes(cfg) -> dict[str, tuple[int, int, int]]:
    """name -> (K, N, uses per step): the weight products of one step."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    n = cfg.num_layers
    return {
        "q": (d, q, n),
        "k, v": (d, kv, 2 * n),
        "o": (q, d, n),
        "gate, up": (d, f, 2 * n),
        "down": (f, d, n),
        "head": (d, cfg.vocab_size, 1),
    }


def _median_s(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def xla_rate(rows: int, k: int, n: int, copies: int) -> float:
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((k, n), np.float32)) for _ in range(copies)]
    x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
    f = jax.jit(lambda x, w: dense("td,df->tf", x, w))

    def run() -> None:
        jax.block_until_ready([f(x, w) for w in ws])

    return 2 * rows * k * n * copies / _median_s(run)


def torch_rate(rows: int, k: int, n: int, copies: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    ws = [torch.randn(k, n) for _ in range(copies)]
    x = torch.randn(rows, k)
    with torch.inference_mode():
        return 2 * rows * k * n * copies / _median_s(lambda: [x @ w for w in ws])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=named_models.DEFAULT_MODEL)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32, 544])
    ap.add_argument("--copies", type=int, default=8, help="distinct weights per shape")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    cfg, _ = load_weights(named_models.resolve_model(args.model))
    try:
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    except ImportError:
        pass
    print(f"{args.model} float32 weight products, GFLOP/s (XLA / torch)")
    for rows in args.rows:
        layers = {"xla": 0.0, "torch": 0.0}  # seconds of one step's layer products
        head = {"xla": 0.0, "torch": 0.0}
        cells = []
        for name, (k, n, uses) in shapes(cfg).items():
            rates = {"xla": xla_rate(rows, k, n, args.copies)}
            rates["torch"] = torch_rate(rows, k, n, args.copies)
            for engine, rate in rates.items():
                if rate is not None:
                    (head if name == "head" else layers)[engine] += 2 * rows * k * n * uses / rate
            torch_txt = "-" if rates["torch"] is None else f"{rates['torch'] / 1e9:.0f}"
            cells.append(f"{name} [{k}x{n}] {rates['xla'] / 1e9:.0f} / {torch_txt}")
            row = dict(model=args.model, rows=rows, product=name, k=k, n=n, **rates)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"rows {rows}: " + ", ".join(cells))
        for engine in layers:
            if layers[engine]:
                print(
                    f"  {engine}: one step's layer products {layers[engine] * 1e3:.1f} ms, "
                    f"the head at {rows} rows {head[engine] * 1e3:.1f} ms"
                )


if __name__ == "__main__":
    main()
