"""One decode step of the jitted model on random weights, against the weight-read floor.

    python scripts/bench_step.py --shape llama3-1b --dtype bfloat16 --batch 1 8 64 --context 1024
    python scripts/bench_step.py --shape llama3-8b --attention-backend xla pallas --json out.jsonl
    python scripts/bench_step.py --small      # CPU smoke run (pallas = the kernels interpreted)
    python scripts/bench_step.py --shape llama3-8b --batch 1 64 --engine --tokenizer DIR
    python scripts/bench_step.py --shape smollm2-135m --dtype float32 --batch 4 --drafts 2 8

`--engine` also runs the decode step in a running engine (`LLM.from_params` on the same random
weights, `batch` greedy requests at `context` tokens, async scheduling: its scheduling, inputs,
sampling and output processing included) and reports its wall time per step against the bare
jitted step with the engine's attention backend and against the floor; the vocabulary is the
tokenizer's (the engine detokenizes what it samples).

Needs no model files (weights are drawn on the device), so it runs on a GPU machine where the
real models do not travel. The floor is (weight bytes + KV bytes read) / measured copy bandwidth;
`weight_floor_ms` leaves the KV bytes out (the issue's "weight-read floor"). For a mixture of
experts the weight bytes are those the step reads: the dense weights and the experts its tokens
pick (`weights_read`: at batch 1 the active weights, at batch 64 most experts).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import copy_bandwidth

from jinfer.attention import BACKENDS, get_backend
from jinfer.attention.kv_cache import init_cache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.config.model import ModelConfig
from jinfer.models import decoder
from jinfer.models.params import init_params

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
    ),
    "llama3-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # Qwen3-30B-A3B: 128 experts of width 768, top 8, every layer sparse (61 GB in bf16).
    "qwen3-30b-a3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        qk_norm=True,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        tie_word_embeddings=False,
    ),
    "moe-tiny": dict(  # a CPU smoke run of the MoE path
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
    ),
}


def weights_read(cfg: ModelConfig, batch: int, itemsize: int) -> float:
    """Bytes of weights a decode step of `batch` tokens reads: all of a dense model; of a
    mixture, every dense weight and the experts the batch's tokens pick (their expected count
    under uniform routing, E * (1 - (1 - X/E) ** batch), per sparse layer)."""
    if not cfg.num_experts:
        return cfg.num_params() * itemsize
    e, x = cfg.num_experts, cfg.num_experts_per_tok
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    used = e * (1 - (1 - x / e) ** batch)
    sparse = sum(cfg.moe_layers)
    return (cfg.num_params() - sparse * (e - used) * expert) * itemsize


def read_floor(cfg: ModelConfig, batch: int, context: int, itemsize: int, bw: float):
    """Seconds a decode step of `batch` requests at `context` tokens needs to read its weights
    and KV once at `bw` bytes/s, and the weight bytes among them."""
    kv_bytes = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * itemsize
    read = weights_read(cfg, batch, itemsize)  # (a mixture: the experts used)
    return (read + kv_bytes) / bw, read


def emit(row: dict, path: str | None) -> None:
    """Prints a row, and appends it at once to `path` (a stage cut short keeps what it
    measured)."""
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


# The whole step as one jitted program, inputs already on the device (no packing).
_forward = jax.jit(decoder.forward, static_argnums=(1,), donate_argnums=(4,))


def bench(
    cfg: ModelConfig,
    params,
    dtype,
    batch: int,
    context: int,
    page: int,
    backend: str = "xla",
    drafts: int = 0,
) -> float:
    """Seconds of one step of `batch` requests at `context`, each with `drafts` speculative
    drafts verified (1 + drafts rows per request, per token, as the engine lays them out)."""
    rows_each = 1 + drafts
    pages_per_seq = -(-(context + rows_each) // page)
    attention = get_backend(backend)
    stored = attention.storage_dtype(dtype)
    cache = init_cache(cfg, batch * pages_per_seq + 1, page, stored, layout=attention.layout)
    tables = 1 + np.arange(batch * pages_per_seq, dtype=np.int32).reshape(batch, pages_per_seq)
    seq_ids = np.repeat(np.arange(batch, dtype=np.int32), rows_each)  # [T]
    pos = context + np.tile(np.arange(rows_each, dtype=np.int32), batch)  # [T]
    slots = tables[seq_ids, pos // page] * page + pos % page
    meta = AttentionMetadata(pos, seq_ids, slots, tables, attention)
    tokens = np.ones(len(pos), np.int32)
    idx = np.arange(len(pos), dtype=np.int32)
    # On the device once: the time is the step's program, not the host-to-device copies.
    tokens, meta, idx = jax.device_put((tokens, meta, idx))
    for _ in range(2):
        logits, cache = _forward(params, cfg, tokens, meta, cache, idx)
    logits.block_until_ready()
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        logits, cache = _forward(params, cfg, tokens, meta, cache, idx)
    logits.block_until_ready()
    return (time.perf_counter() - t0) / n


def engine_step(
    cfg: ModelConfig, params, tokenizer, dtype_name: str, batch: int, context: int, steps: int
) -> tuple[float, str, int]:
    """Wall seconds per decode step of a running engine at `batch` requests of `context` tokens
    (after their prefill and `steps` decode steps to settle), its attention backend, and the
    programs it compiled while timed (0: every step ran a program built before)."""
    from jinfer import LLM, SamplingParams

    kv_per_token = (
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype_name).itemsize
    )
    max_len = context + 4 * steps
    llm = LLM.from_params(
        cfg,
        params,
        tokenizer,
        dtype=dtype_name,
        max_num_seqs=batch,
        max_model_len=max_len,
        kv_cache_memory_gb=1.25 * batch * max_len * kv_per_token / 1e9 + 0.01,
        enable_prefix_caching=False,
        warmup=False,  # the programs this run uses compile as it reaches them, before timing
    )
    engine = llm.engine
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0, max_tokens=3 * steps, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", rng.integers(100, cfg.vocab_size - 1, context).tolist(), greedy)
    while engine.stats.num_generated_tokens < batch:  # the prefill
        engine.step(finished_only=True)
    for _ in range(steps):
        engine.step(finished_only=True)
    compiles = engine.num_compiles
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(finished_only=True)
    sec = (time.perf_counter() - t0) / steps
    assert engine.num_running() == batch, "every request decodes through the timed steps"
    return sec, engine.config.attention_backend, engine.num_compiles - compiles


def matmul_only(cfg: ModelConfig, params, batch: int) -> float:
    """Seconds per call of just the step's weight matmuls (every projection of every layer and
    the LM head, chained through x as in the model): what XLA's GEMMs make of the weight read."""

    @jax.jit
    def run(params, x):
        for p in params.layers:
            q = jnp.einsum("td,dnh->tnh", x, p.wq)
            k = jnp.einsum("td,dkh->tkh", x, p.wk)
            v = jnp.einsum("td,dkh->tkh", x, p.wv)
            x = x + jnp.einsum("tnh,nhd->td", q, p.wo) + (k.sum() + v.sum()).astype(x.dtype)
            x = x + (jax.nn.silu(x @ p.w_gate) * (x @ p.w_up)) @ p.w_down
        head = params.embed.T if params.lm_head is None else params.lm_head
        return x @ head

    x = jnp.ones((batch, cfg.hidden_size), params.embed.dtype)
    run(params, x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        out = run(params, x)
    out.block_until_ready()
    return (time.perf_counter() - t0) / 10


def engine_row(args, cfg, params, tokenizer, dtype, batch: int, ctx: int, bw: float) -> dict:
    """The engine's decode step beside the bare step (the engine's backend) and the floor."""
    sec, backend, compiles = engine_step(
        cfg, params, tokenizer, dtype.name, batch, ctx, args.engine_steps
    )
    bare = bench(cfg, params, dtype, batch, ctx, get_backend(backend).default_page_size, backend)
    floor, _ = read_floor(cfg, batch, ctx, dtype.itemsize, bw)
    return dict(
        bench="engine_step",
        shape=args.shape,
        device=jax.devices()[0].device_kind,
        attention=backend,
        batch=batch,
        context=ctx,
        vocab=cfg.vocab_size,
        engine_ms=round(sec * 1e3, 3),
        step_ms=round(bare * 1e3, 3),
        floor_ms=round(floor * 1e3, 3),
        ratio=round(sec / floor, 2),
        of_bare=round(sec / bare, 2),
        compiles_while_timed=compiles,
        xla_flags=os.environ.get("XLA_FLAGS", ""),  # e.g. command buffers (CUDA graphs) off
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[1024])
    ap.add_argument("--page-size", type=int, default=None, help="default: the backend's")
    ap.add_argument("--attention-backend", nargs="+", default=["xla"], choices=list(BACKENDS))
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    ap.add_argument("--matmul-only", action="store_true", help="also time the bare matmuls")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run")
    ap.add_argument("--engine", action="store_true", help="also the step in a running engine")
    ap.add_argument("--tokenizer", help="with --engine: a GGUF file or HF dir (its vocabulary)")
    ap.add_argument("--engine-steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    ap.add_argument(
        "--drafts", type=int, nargs="+", default=[0], help="drafts verified per request (rows)"
    )
    args = ap.parse_args()
    if args.small:
        args.shape, args.dtype, args.batch, args.context = "smollm2-135m", "float32", [2], [40]
        args.attention_backend, args.copy_bytes = ["xla", "pallas"], 1 << 20
    dtype = jnp.dtype(args.dtype)
    shape = dict(SHAPES[args.shape])
    if args.small:
        shape["num_layers"] = 2
    tokenizer = None
    if args.engine:
        from jinfer.tokenizer.tokenizer import load_tokenizer

        if not args.tokenizer:
            ap.error("--engine needs --tokenizer (the engine detokenizes its samples)")
        tokenizer = load_tokenizer(args.tokenizer)
        shape["vocab_size"] = tokenizer.vocab_size
    cfg = ModelConfig(arch="llama", **shape)
    params = init_params(cfg, dtype=dtype, on_device=True)
    bw = copy_bandwidth(args.copy_bytes)
    weight_bytes = cfg.num_params() * dtype.itemsize
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB", flush=True)
    if args.matmul_only and cfg.num_experts:
        print("(--matmul-only: dense shapes only; a mixture's floor counts the experts read)")
    elif args.matmul_only:
        for b in args.batch:
            sec = matmul_only(cfg, params, b)
            floor = weight_bytes / bw
            emit(
                dict(bench="step", shape=args.shape, device=jax.devices()[0].device_kind,
                     attention="none (matmuls only)", batch=b, context=0,
                     step_ms=round(sec * 1e3, 3), floor_ms=round(floor * 1e3, 3),
                     weight_floor_ms=round(floor * 1e3, 3), ratio=round(sec / floor, 2),
                     tok_s=round(b / sec, 1)),
                args.json,
            )  # fmt: skip
    for ctx in args.context:
        for b in args.batch:
            for backend, drafts in itertools.product(args.attention_backend, args.drafts):
                try:
                    page = args.page_size or get_backend(backend).default_page_size
                    step = bench(cfg, params, dtype, b, ctx, page, backend, drafts)
                except Exception as e:  # report and go on to the next configuration
                    print(f"FAILED {backend} b{b} ctx{ctx}: {type(e).__name__}: {e}"[:600])
                    continue
                floor, read = read_floor(cfg, b, ctx, dtype.itemsize, bw)
                emit(
                    dict(
                        bench="step",
                        shape=args.shape,
                        device=jax.devices()[0].device_kind,
                        attention=backend,
                        batch=b,
                        context=ctx,
                        drafts=drafts,
                        step_ms=round(step * 1e3, 3),
                        floor_ms=round(floor * 1e3, 3),
                        weight_floor_ms=round(read / bw * 1e3, 3),
                        ratio=round(step / floor, 2),
                        tok_s=round(b / step, 1),
                    ),
                    args.json,
                )
            if args.engine:
                emit(engine_row(args, cfg, params, tokenizer, dtype, b, ctx, bw), args.json)


if __name__ == "__main__":
    main()
