"""The engine's command-line flags, declared once for every entry point that builds an `LLM`.

`python -m jinfer.serve` and `scripts/generate.py` both add them; each flag is the `LLM`
option of the same name (`--max-num-seqs` -> `max_num_seqs`), so `LLM(**engine_options(args))`
builds the engine the command line describes.
"""

from __future__ import annotations

import argparse
from typing import Any

from jinfer.attention import ATTENTION_BACKENDS
from jinfer.llm import DTYPES
from jinfer.loader.named_models import DEFAULT_MODEL
from jinfer.runner.model_runner import COMPILE_UNITS

# The flags whose values must be whole numbers >= 1 (None, where allowed, means "derive it").
POSITIVE = (
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "page_size",
    "num_pages",
)
OPTIONS = (
    "model",
    "dtype",
    *POSITIVE,
    "kv_cache_memory_gb",
    "kv_cache_dtype",
    "attention_backend",
    "compile_unit",
    "enable_prefix_caching",
    "warmup",
)


def add_engine_args(parser: argparse.ArgumentParser | Any) -> None:
    """Adds the engine flags to `parser` (or an argument group); `parser.set_defaults` may
    change a default afterwards (generate.py's shorter `--max-model-len`)."""
    p = parser
    p.add_argument("--model", default=DEFAULT_MODEL, help="a named model or a path")
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="auto: float32 on CPU, bfloat16 elsewhere"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + output tokens (default: %(default)s; None: the model's, up to 4096)",
    )
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="devices to shard over")
    p.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="tokens per KV-cache page (default: 64 for the XLA attention, 16 for Pallas)",
    )
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0, help="KV-cache size")
    p.add_argument("--num-pages", type=int, default=None, help="KV-cache pages (overrides GB)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=DTYPES,
        help="auto: the model's dtype; bfloat16 halves KV memory next to float32 weights",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="auto: Pallas kernels on GPU/TPU, XLA on CPU",
    )
    p.add_argument(
        "--compile-unit",
        default="auto",
        choices=COMPILE_UNITS,
        help="one program per step, or per layer kind (fast warm-up); auto: layer on CPU",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of earlier requests' full pages (default on)",
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip compiling every batch shape up front (each compiles on first use instead)",
    )


def check_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through `parser.error` naming the first flag out of range."""
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.kv_cache_memory_gb <= 0:
        parser.error(f"--kv-cache-memory-gb must be positive, got {args.kv_cache_memory_gb}")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM` keyword arguments the flags describe."""
    return {name: getattr(args, name) for name in OPTIONS}
