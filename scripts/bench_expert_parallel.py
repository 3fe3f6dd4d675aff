"""Expert parallelism against tensor parallelism for one sparse layer, on simulated devices.

    python scripts/bench_expert_parallel.py                  # 8 CPU devices, moe-cpu's layer
    python scripts/bench_expert_parallel.py --devices 4 --experts 64 --top 8 --tokens 1 64

`jinfer.models.moe.moe_block` on one layer's random weights, jitted over an N-device mesh three
ways: `gspmd` (every device holds every expert, 1/N of each one's width, and GSPMD partitions
the grouped products: what moe_block does when the mesh does not divide the width), `tp` (the
same weights, each device's share run inside shard_map, one all-reduce of [T, D] after the
tokens' rows are combined) and `ep` (`enable_expert_parallel`: each device holds E/N experts
whole and runs the rows routed to them, the same all-reduce). For each token
count T it prints the median time of a call (the two interleaved, medians of `--rounds`) and,
from the compiled program, the collectives each runs and the bytes they move per device.

On CPU the N devices share the machine's cores, so the times are the sum of every device's
work, not a step's latency; the bytes are what an accelerator's interconnect would carry.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

if "jax" not in sys.modules:  # the simulated devices must exist before jax starts
    count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if count is None and "--devices" in sys.argv:
        count = sys.argv[sys.argv.index("--devices") + 1]
    flag = f"--xla_force_host_platform_device_count={count or 8}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jinfer.config.model import ModelConfig  # noqa: E402
from jinfer.distributed.sharding import make_mesh, place_params  # noqa: E402
from jinfer.models.moe import moe_block  # noqa: E402
from jinfer.models.params import init_params  # noqa: E402

OPS = "all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute"
COLLECTIVE = re.compile(r"= (\w+\[[^\]]*\])[^=]*? (" + OPS + r")\(")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collectives(hlo: str) -> tuple[int, int]:
    """(collective ops, bytes of their results per device) in a compiled program's HLO text."""
    count, total = 0, 0
    for shape, _ in COLLECTIVE.findall(hlo):
        dtype, dims = shape.split("[")
        size = int(np.prod([int(d) for d in dims.rstrip("]").split(",") if d] or [1]))
        count += 1
        total += size * DTYPE_BYTES.get(dtype, 4)
    return count, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n = args.devices
    cfg = ModelConfig(
        arch="llama", vocab_size=256, hidden_size=args.hidden, intermediate_size=256,
        num_layers=1, num_heads=8, num_kv_heads=8, head_dim=args.hidden // 8,
        num_experts=args.experts, num_experts_per_tok=args.top,
        moe_intermediate_size=args.expert_width,
    )  # fmt: skip
    mesh = make_mesh(n)
    host = init_params(cfg, seed=0, std=args.hidden**-0.5)
    ways = {}
    for name, tp, ep in (("gspmd", 1, False), ("tp", n, False), ("ep", n, True)):
        c = dataclasses.replace(cfg, tensor_parallel_size=tp, expert_parallel=ep)
        layer = place_params(host, c, mesh, jnp.float32).layers[0]
        ways[name] = (jax.jit(lambda p, x, c=c: moe_block(c, p, x)), layer)
    print(f"{n} {jax.default_backend()} devices; experts {args.experts}, top {args.top}, "
          f"hidden {args.hidden}, expert width {args.expert_width}")  # fmt: skip
    names = tuple(ways)
    print("| tokens | " + " | ".join(f"{k} ms" for k in names) + " | "
          + " | ".join(f"{k} collectives (KiB)" for k in names) + " |")  # fmt: skip
    print("|---" * (1 + 2 * len(names)) + "|")
    rng = np.random.default_rng(1)
    for t in args.tokens:
        x = jax.device_put(rng.standard_normal((t, args.hidden)).astype(np.float32))
        outs, comm = {}, {}
        for name, (fn, layer) in ways.items():
            outs[name] = np.asarray(fn(layer, x))
            comm[name] = collectives(fn.lower(layer, x).compile().as_text())
        for name in ("tp", "ep"):
            np.testing.assert_allclose(outs[name], outs["gspmd"], rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, (fn, layer) in ways.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = fn(layer, x)
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - t0) / args.reps * 1e3)
        ms = [f"{statistics.median(times[k]):.2f}" for k in names]
        kib = [f"{comm[k][0]} ops, {comm[k][1] / 1024:.1f}" for k in names]
        print(f"| {t} | " + " | ".join(ms + kib) + " |")


if __name__ == "__main__":
    main()
