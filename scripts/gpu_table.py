"""Prints the JSON-lines rows of bench_attention.py and bench_step.py as one markdown table.

    python scripts/gpu_table.py out/attention.jsonl out/step.jsonl

One table, one row per measurement; `vs floor` is the kernel's share of the copy bandwidth for
attention rows, and step time over the (weights + KV) read floor for step rows (bench_step.py
--engine: the running engine's step, also against the bare jitted step). Goals are flagged:
decode attention >= 0.80 of copy at batch 64 x 4k, the bare 8B step within 1.25x of its floor,
and the 8B engine step within 1.3x of it at batch 64 and 1.35x at batch 1.
"""

from __future__ import annotations

import json
import sys


def _row(r: dict) -> str:
    if r["bench"] == "attention":
        what = f"attention/{r['kernel']}"
        shape = f"b{r['batch']} ctx{r['context']} h{r['head_dim']}"
        time_ms, rate = r["us"] / 1e3, f"{r['gb_s']:.0f} GB/s"
        vs = f"{r['of_copy']:.2f} of copy"
        goal = r["kernel"] == "decode" and (r["batch"], r["context"], r["head_dim"]) == (
            64,
            4096,
            128,
        )
        ok = r["of_copy"] >= 0.8
    elif r["bench"] == "engine_step":
        what = f"engine step/{r['attention']}"
        shape = f"{r['shape']} b{r['batch']} ctx{r['context']} vocab {r['vocab']}"
        if r.get("xla_flags"):
            shape += f" `{r['xla_flags']}`"
        time_ms, rate = r["engine_ms"], f"{r['batch'] / r['engine_ms'] * 1e3:.0f} tok/s"
        vs = (
            f"{r['ratio']:.2f}x w+KV floor ({r['floor_ms']:.2f} ms), {r['of_bare']:.2f}x the "
            f"bare step ({r['step_ms']:.2f} ms), {r['compiles_while_timed']} compiles"
        )
        goal = r["shape"] == "llama3-8b" and r["batch"] in (1, 64) and not r.get("xla_flags")
        ok = r["ratio"] <= (1.3 if r["batch"] == 64 else 1.35) and not r["compiles_while_timed"]
    else:
        what = f"step/{r['attention']}"
        shape = f"{r['shape']} b{r['batch']} ctx{r['context']}"
        time_ms, rate = r["step_ms"], f"{r['tok_s']:.0f} tok/s"
        by_weights = r["step_ms"] / r["weight_floor_ms"]
        vs = f"{r['ratio']:.2f}x w+KV floor ({r['floor_ms']:.2f} ms), {by_weights:.2f}x weights"
        goal = r["shape"] == "llama3-8b" and r["attention"] == "pallas"
        ok = r["ratio"] <= 1.25
    mark = ("MET" if ok else "not met") if goal else ""
    return f"| {what} | {shape} | {time_ms:.3f} | {rate} | {vs} | {mark} |"


def main(paths: list[str]) -> None:
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            print(f"(no {path})")
    device = rows[0]["device"] if rows else "?"
    print(f"\n{device}: {len(rows)} measurements")
    print("| what | shape | ms | rate | vs floor | goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))


if __name__ == "__main__":
    main(sys.argv[1:])
