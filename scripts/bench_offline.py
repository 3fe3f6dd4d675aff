"""Offline throughput: jinfer against Hugging Face transformers (and llama.cpp) on one workload.

    python scripts/bench_offline.py                                   # SmolLM2, mixed, every peer
    python scripts/bench_offline.py --workload uniform                # 32 x 64 in, 64 out
    python scripts/bench_offline.py --model gemma3-270m
    python scripts/bench_offline.py --workload uniform --repeat 3     # medians of 3 rounds
    python scripts/bench_offline.py --workload code-edit --num-prompts 4 \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 8}'
    python scripts/bench_offline.py --random-shape llama3-1b --tokenizer DIR   # GPU, random weights

One seeded workload (token-id prompts, fixed output lengths, ignore_eos, greedy) is run by every
engine in the same process, one after the other, each after its own warm-up:
- jinfer: `LLM.generate` over all prompts (continuous batching);
- Hugging Face transformers: batched `generate` (left padding, batches of --hf-batch-size in
  order; a batch runs to its longest output, as static batching does), in jinfer's dtype;
- llama.cpp (where `llama-cpp-python` is installed, GGUF models only): one sequence at a time,
  which is what its Python API offers, on the first --llamacpp-prompts prompts.
Output tok/s counts only the tokens each prompt asked for. Prefill tok/s is one separate prompt of
--prefill-len tokens run to its first token. The machine's ceilings are measured here too (a
GEMM in the model dtype, a read and a copy of 1 GiB) and turned into this model's floors: the
compute roofline (GEMM rate / FLOPs per token) and the single-stream bandwidth floor (weight bytes
/ read rate), against which jinfer's single-stream decode is measured. jinfer's share of the
roofline is printed twice: in output tokens, and in every token it ran (prompt + output), each
of which costs the FLOPs the roofline counts. Prints one markdown table; --json writes every
number. `--device-trace` runs jinfer's workload once more under JAX's profiler and prints the
device's busy share of that wall time from the device's own kernel and copy timings (GPU/TPU:
the honest measure of an overlapped loop; the host's blocked time is not).

This machine's speed drifts by tens of percent between minutes, so one run of each engine can
put either ahead. `--repeat N` runs the engines in N interleaved rounds (jinfer, transformers,
llama.cpp, jinfer, ...) and reports each number's median, with the range of output tok/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _bench_util import (
    copy_bandwidth,
    decode_rate,
    device_busy_share,
    gemm_rate,
    prefill_rate,
    read_bandwidth,
)
from _offline_peers import load_hf, run_hf, run_llamacpp

from jinfer import LLM, SamplingParams
from jinfer.config.engine import COMPILE_UNITS, DTYPES
from jinfer.config.model import ModelConfig
from jinfer.config.rope import RopeScaling
from jinfer.loader import named_models

log = logging.getLogger("bench_offline")

RANDOM_SHAPES = {  # GPU runs: bigger shapes with random weights (no files travel); tiny: smoke
    "tiny": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    # Mixtures of experts: one scaled to a 2-core CPU, and Qwen3-30B-A3B's (fits one H200).
    "moe-cpu": dict(hidden_size=1024, intermediate_size=2048, num_layers=4, num_heads=16,
                    num_kv_heads=4, head_dim=64, qk_norm=True, num_experts=32,
                    num_experts_per_tok=4, moe_intermediate_size=256, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, qk_norm=True, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768,
                          tie_word_embeddings=False),
    # gpt-oss-20b's (bfloat16: ~42 GB, one H200): sinks, alternating 128-token windows, YaRN.
    "gpt-oss-20b": dict(hidden_size=2880, intermediate_size=2880, num_layers=24, num_heads=64,
                        num_kv_heads=8, head_dim=64, num_experts=32, num_experts_per_tok=4,
                        moe_intermediate_size=2880, layer_types=("sliding", "full") * 12,
                        sliding_window=128, attention_sinks=True, qkv_bias=True, o_bias=True,
                        router_bias=True, expert_bias=True, swiglu_limit=7.0, rope_theta=150000.0,
                        rope_scaling=RopeScaling("yarn", 32.0, attention_factor=1.3466,
                                                 original_max_position_embeddings=4096,
                                                 truncate=False),
                        max_position_embeddings=131072, tie_word_embeddings=False),
}  # fmt: skip


@dataclass
class Work:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def make_workload(kind: str, num_prompts: int, vocab: int, seed: int = 0) -> Work:
    """`mixed`: prompt lengths log-normal around 200 (16..1024), outputs 16..256 uniform;
    `uniform`: every prompt 64 tokens in, 64 out. Token ids avoid the first 100 (specials)."""
    rng = np.random.default_rng(seed)
    if kind == "mixed":
        p_lens = np.clip(rng.lognormal(np.log(200), 0.8, num_prompts), 16, 1024).astype(int)
        o_lens = rng.integers(16, 257, num_prompts)
    elif kind == "uniform":
        p_lens = np.full(num_prompts, 64)
        o_lens = np.full(num_prompts, 64)
    else:
        raise ValueError(f"unknown workload {kind!r} (mixed, uniform)")
    prompts = [rng.integers(100, vocab, n).tolist() for n in p_lens]
    return Work(prompts, [int(n) for n in o_lens])


def make_code_edit(tokenizer, num_prompts: int) -> Work:
    """`code-edit`: a source file of this repository (300..1500 tokens, in path order) in a
    chat prompt, the model asked for the whole file back with one name changed; each output as
    long as its file. Output that repeats its prompt, as coding agents' edits do: what
    speculative decoding (--speculative-config) drafts from."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for path in sorted((root / "jinfer").rglob("*.py")):
        source = path.read_text()
        n = len(tokenizer.encode(source))
        if 300 <= n <= 1500:
            files.append((source, n))
    prompts, lens = [], []
    for i in range(num_prompts):
        source, n = files[i % len(files)]
        ask = "Rename the first function in this file to `run` and output the whole file."
        chat = [{"role": "user", "content": f"{ask}\n\n```python\n{source}```"}]
        prompts.append(
            tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        )
        lens.append(n)
    return Work(prompts, lens)


# ------------------------------------------------------------------------------ ceilings
def measure_ceilings(dtype, gemm_n: int, nbytes: int) -> dict:
    """GEMM FLOP/s in `dtype` (an n x n x n product), read bytes/s (a sum) and copy bytes/s
    (read + write) over `nbytes`."""
    gemm, read, copy = gemm_rate(gemm_n, dtype), read_bandwidth(nbytes), copy_bandwidth(nbytes)
    return {
        "gemm_gflop_s": round(gemm / 1e9, 1),
        "read_gb_s": round(read / 1e9, 1),
        "copy_gb_s": round(copy / 1e9, 1),
    }


def model_floors(cfg: ModelConfig, itemsize: int, work: Work, ceilings: dict) -> dict:
    """Compute roofline tok/s (matmul + attention FLOPs at the workload's mean context) and the
    single-stream decode ceiling (every weight read once per token)."""
    pairs = zip(work.prompts, work.output_lens, strict=True)
    mean_ctx = np.mean([len(p) + o / 2 for p, o in pairs])
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_ctx  # QK^T and PV
    flops = cfg.flops_per_token() + attn
    weight_bytes = cfg.num_params(active=True) * itemsize  # (a mixture: the experts a token runs)
    return {
        "gflop_per_token": round(flops / 1e9, 3),
        "compute_roofline_tok_s": round(ceilings["gemm_gflop_s"] * 1e9 / flops, 1),
        "weight_gb": round(weight_bytes / 1e9, 3),
        # A decode step reads every weight once and writes none: the read rate bounds it.
        "bandwidth_floor_tok_s": round(ceilings["read_gb_s"] * 1e9 / weight_bytes, 1),
    }


# ------------------------------------------------------------------------------ engines
def generate_workload(llm: LLM, work: Work) -> list:
    """jinfer's outputs for the workload: greedy, every output its length."""
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    return llm.generate(prompts, params, use_tqdm=False)


def run_jinfer(llm: LLM, work: Work, prefill_prompt: list[int]) -> dict:
    stats = llm.engine.stats
    step0, dev0 = stats.step_time, stats.device_time
    by_bucket0 = {key: list(tally) for key, tally in stats.steps_by_bucket.items()}
    compiles0 = llm.engine.num_compiles
    t0 = time.perf_counter()
    outs = generate_workload(llm, work)
    wall = time.perf_counter() - t0
    steps = {  # this workload's steps only, by (bucket, kind): [steps, seconds, tokens]
        key: [a - b for a, b in zip(tally, by_bucket0.get(key, [0, 0.0, 0]), strict=True)]
        for key, tally in stats.steps_by_bucket.items()
    }
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == work.num_output_tokens, (got, work.num_output_tokens)
    step, dev = stats.step_time - step0, stats.device_time - dev0
    return {
        "output_tok_s": work.num_output_tokens / wall,
        # Every token the model ran (prompt + output) costs the FLOPs the roofline counts.
        "total_tok_s": (work.num_prompt_tokens + work.num_output_tokens) / wall,
        "wall_s": wall,
        "prefill_tok_s": prefill_rate(llm, prefill_prompt),
        "single_stream_tok_s": decode_rate(llm, 1, 128, 32),
        "host_fraction": (step - dev) / step if step else 0.0,
        "compiles_after_warmup": llm.engine.num_compiles - compiles0,  # should stay 0
        "steps": {key: tally for key, tally in steps.items() if tally[0]},
    }


def print_steps(rounds: list[dict]) -> None:
    """jinfer's step time by compiled program (bucket) and kind, over every round."""
    total: dict[tuple[int, str], list[float]] = {}
    for steps in rounds:
        for key, tally in steps.items():
            acc = total.setdefault(key, [0, 0.0, 0])
            for i, x in enumerate(tally):
                acc[i] += x
    print("\njinfer steps by bucket (all rounds)")
    print("| bucket | kind | steps | seconds | ms / step | real tokens / step |")
    print("|---|---|---|---|---|---|")
    for (bucket, kind), (n, sec, tokens) in sorted(total.items()):
        print(f"| {bucket} | {kind} | {n} | {sec:.2f} | {1e3 * sec / n:.1f} | {tokens / n:.1f} |")


# ------------------------------------------------------------------------------ main
def summarize(runs: list[dict]) -> dict:
    """One engine's rounds: the median of every number, plus each round's output tok/s."""
    out = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    if "prompts" in runs[0]:
        out["prompts"] = runs[0]["prompts"]
    out["output_tok_s_runs"] = [r["output_tok_s"] for r in runs]
    return out


def _spread(r: dict) -> str:
    """The median output tok/s, with the rounds' range when there were several."""
    runs = r["output_tok_s_runs"]
    spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
    return f"{r['output_tok_s']:.1f}{spread}"


def print_table(name: str, results: dict, floors: dict, ceilings: dict, work: Work) -> None:
    ref = results["jinfer"]
    print(
        f"\n{name} on {jax.devices()[0].device_kind}: {len(work.prompts)} prompts, "
        f"{work.num_prompt_tokens} prompt + {work.num_output_tokens} output tokens"
    )
    print("| engine | output tok/s | prefill tok/s | wall s | jinfer is x faster (out / prefill) |")
    print("|---|---|---|---|---|")
    for engine, r in results.items():
        ratio = (
            "-"
            if engine == "jinfer"
            else f"{ref['output_tok_s'] / r['output_tok_s']:.2f} / "
            f"{ref['prefill_tok_s'] / r['prefill_tok_s']:.2f}"
        )
        note = f" ({r['prompts']} prompts, one at a time)" if "prompts" in r else ""
        print(
            f"| {engine}{note} | {_spread(r)} | {r['prefill_tok_s']:.1f} | "
            f"{r['wall_s']:.1f} | {ratio} |"
        )
    roof = floors["compute_roofline_tok_s"]
    print(
        f"\nceilings: GEMM {ceilings['gemm_gflop_s']} GFLOP/s, read {ceilings['read_gb_s']} GB/s, "
        f"copy {ceilings['copy_gb_s']} GB/s"
        f" -> compute roofline {roof} tok/s ({floors['gflop_per_token']} GFLOP/token), "
        f"single-stream floor {floors['bandwidth_floor_tok_s']} tok/s "
        f"({floors['weight_gb']} GB of weights)"
    )
    single, floor = ref["single_stream_tok_s"], floors["bandwidth_floor_tok_s"]
    print(
        f"jinfer: {ref['output_tok_s'] / roof:.0%} of the compute roofline in output tokens, "
        f"{ref['total_tok_s'] / roof:.0%} in all tokens run (prompt + output), "
        f"single-stream decode {single:.1f} tok/s ({single / floor:.0%} of its floor), "
        f"host busy {ref['host_fraction']:.1%} of step time (async scheduling: the device "
        "computes meanwhile)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=named_models.DEFAULT_MODEL)
    ap.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), help="random weights")
    ap.add_argument("--tokenizer", help="tokenizer (GGUF or HF dir) for --random-shape")
    ap.add_argument("--workload", default="mixed", choices=["mixed", "uniform", "code-edit"])
    ap.add_argument("--num-prompts", type=int, help="default: 64 mixed, 32 uniform, 8 code-edit")
    ap.add_argument("--speculative-config", help="jinfer's, as the server's flag (JSON)")
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU/TPU")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--compile-unit", default="auto", choices=COMPILE_UNITS)
    ap.add_argument(
        "--kv-cache-dtype", default="auto", choices=DTYPES, help="auto: the model's dtype"
    )
    ap.add_argument("--peers", nargs="*", default=["hf", "llama.cpp"])
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--llamacpp-prompts", type=int, default=16)
    ap.add_argument(
        "--profile-host",
        type=int,
        default=0,
        metavar="N",
        help="first run the workload under cProfile and print its N costliest functions",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every engine N times, interleaved, and report medians (and the output range)",
    )
    ap.add_argument("--small", action="store_true", help="a quick smoke run (8 prompts, short)")
    ap.add_argument("--steps", action="store_true", help="jinfer's step time by bucket")
    ap.add_argument(
        "--device-trace",
        action="store_true",
        help="run jinfer once more under JAX's profiler: the device's busy share of the wall "
        "time, from the device's own timings (GPU/TPU)",
    )
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from jinfer.loader import load_weights
    from jinfer.models.params import init_params
    from jinfer.tokenizer.tokenizer import load_tokenizer

    on_cpu = jax.default_backend() == "cpu"
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    options = dict(
        dtype=dtype_name,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        compile_unit=args.compile_unit,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=False,  # unique prompts; the prefill probe reruns one length
        speculative_config=args.speculative_config,
    )
    path = None
    if args.random_shape:
        tokenizer = load_tokenizer(args.tokenizer or str(named_models.resolve_model(args.model)))
        vocab = tokenizer.vocab_size
        cfg = ModelConfig(arch="llama", vocab_size=vocab, **RANDOM_SHAPES[args.random_shape])
        name = f"{args.random_shape} (random weights, vocab {vocab})"
        params = init_params(cfg, dtype=jnp.dtype(dtype_name), on_device=True)
        llm = LLM.from_params(cfg, params, tokenizer, **options)
        args.peers = [p for p in args.peers if p != "llama.cpp"]
    else:
        path = str(named_models.resolve_model(args.model))
        cfg = load_weights(path)[0]
        name = args.model
        llm = LLM(args.model, **options)
    vocab = cfg.vocab_size
    num = args.num_prompts or {"mixed": 64, "uniform": 32, "code-edit": 8}[args.workload]
    if args.small:
        num, args.prefill_len, args.llamacpp_prompts = 8, 128, 2
    if args.workload == "code-edit":
        work = make_code_edit(llm.get_tokenizer(), num)
    else:
        work = make_workload(args.workload, num, vocab)
    if args.small:
        work.output_lens = [min(n, 16) for n in work.output_lens]
    prefill_prompt = np.random.default_rng(1).integers(100, vocab, args.prefill_len).tolist()
    itemsize = jnp.dtype(dtype_name).itemsize
    ceilings = measure_ceilings(jnp.dtype(dtype_name), 1024 if on_cpu else 8192, 1 << 30)
    floors = model_floors(cfg, itemsize, work, ceilings)

    if args.profile_host:  # where the host time goes: the engine loop under cProfile
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(run_jinfer, llm, work, prefill_prompt)
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_host)
    engines: dict[str, Callable[[], dict]] = {
        "jinfer": lambda: run_jinfer(llm, work, prefill_prompt)
    }
    if "hf" in args.peers:
        try:
            import torch

            device = "cpu" if on_cpu else "cuda"
            if on_cpu:
                torch.set_num_threads(os.cpu_count() or 1)
            model = load_hf(path, cfg, device, dtype_name)
            engines["transformers"] = lambda: run_hf(
                model, work, args.hf_batch_size, prefill_prompt, device
            )
        except ImportError as e:
            log.warning("transformers peer skipped: %s", e)
    if "llama.cpp" in args.peers and path and path.endswith(".gguf"):
        try:
            import llama_cpp  # noqa: F401

            engines["llama.cpp"] = lambda: run_llamacpp(
                path, work, args.llamacpp_prompts, prefill_prompt
            )
        except ImportError:
            log.warning("llama.cpp peer skipped: llama-cpp-python is not installed")
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for r in range(args.repeat):  # rounds interleave the engines: drift hits them alike
        for engine, run in engines.items():
            runs[engine].append(run())
            log.info("%s, round %d: %s", engine, r + 1, runs[engine][-1])
    step_rounds = [r.pop("steps") for r in runs["jinfer"]]
    results = {engine: summarize(rs) for engine, rs in runs.items()}
    print_table(name, results, floors, ceilings, work)
    if args.steps:
        print_steps(step_rounds)
    if args.device_trace:
        busy, wall = device_busy_share(lambda: generate_workload(llm, work))
        results["jinfer"]["device_busy"] = busy
        shown = "-" if busy is None else f"{busy:.1%}"
        print(
            f"\njinfer device busy: {shown} of {wall:.2f} s wall (the workload once more, traced "
            "by the profiler; the device's own kernel and copy times"
            + (", none on CPU: XLA:CPU runs on the host's threads)" if busy is None else ")")
        )
    if args.json:
        with open(args.json, "a") as f:
            row = dict(bench="offline", model=name, workload=args.workload, dtype=dtype_name,
                       speculative_config=args.speculative_config,
                       device=jax.devices()[0].device_kind, **ceilings, **floors,
                       results=results)  # fmt: skip
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
