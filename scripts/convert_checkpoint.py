"""Convert a model (GGUF file, HF safetensors directory or named model) to a jinfer checkpoint.

The output directory holds everything `jinfer.LLM` needs and loads faster than the source::

    <out>/jinfer_config.json     the ModelConfig
    <out>/params/                the float32 weights (orbax)
    <out>/tokenizer.json         (or tokenizer.model) and tokenizer_config.json

Usage::

    .venv/bin/python scripts/convert_checkpoint.py --model smollm2-135m-instruct
    .venv/bin/python scripts/convert_checkpoint.py --model gemma3-270m --out /tmp/gemma
    .venv/bin/python scripts/convert_checkpoint.py --model path/to/model.gguf --out ckpt/

A named model (see `jinfer.loader.named_models.NAMED_MODELS`) is always converted from its
package's GGUF file, never from an existing converted checkpoint; its default output is
`checkpoints/<name>` (`$JINFER_CHECKPOINT_DIR/<name>` when set), where `LLM(model=<name>)` then
finds it. After writing, the checkpoint is loaded back, compared with the source weights and
both load times are logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.loader import load_weights, named_models
from jinfer.loader.orbax import CONFIG_FILE, save_orbax
from jinfer.models.params import Params
from jinfer.tokenizer.tokenizer import load_tokenizer

log = logging.getLogger("convert_checkpoint")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclasses.dataclass
class ConvertResult:
    out: Path
    source: Path
    cfg: ModelConfig
    params: Params  # the source weights (numpy float32), as written
    source_load_s: float  # load_weights(source)
    save_s: float  # save_orbax + tokenizer
    converted_load_s: float  # load_weights(out)


def source_path(model: str) -> Path:
    """A named model's package GGUF file, else `model` as a path (resolve_model's checks)."""
    if model in named_models.NAMED_MODELS:
        return named_models.NAMED_MODELS[model]()
    return named_models.resolve_model(model)


def default_out(model: str, source: Path) -> Path:
    name = (
        model if model in named_models.NAMED_MODELS else source.stem if source.is_file() else None
    )
    return named_models.checkpoint_dir() / (name or source.resolve().name)


def _check_same(cfg: ModelConfig, params: Params, cfg2: ModelConfig, params2: Params) -> None:
    if cfg2 != cfg:
        raise RuntimeError(f"converted config differs from the source:\n{cfg2}\nvs\n{cfg}")
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves2 = dict(jax.tree_util.tree_flatten_with_path(params2)[0])
    for path, a in leaves:
        b = leaves2.get(path)
        if b is None or not np.array_equal(np.asarray(a), np.asarray(b)):
            raise RuntimeError(f"converted parameter {jax.tree_util.keystr(path)} differs")


def _prepare_out(out: Path) -> None:
    """Refuses a non-empty directory that is not a jinfer checkpoint; clears stale tokenizers."""
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} exists, is not empty and is not a jinfer checkpoint")
    for name in _TOKENIZER_FILES:  # a different tokenizer kind left behind would win on load
        (out / name).unlink(missing_ok=True)


def convert(model: str, out: str | Path | None = None) -> ConvertResult:
    """Converts `model` into an orbax checkpoint plus tokenizer at `out`; returns timings."""
    source = source_path(model)
    out = Path(out) if out is not None else default_out(model, source)
    if out.resolve() == source.resolve():
        raise ValueError(f"output directory {out} is the source itself")
    log.info("loading %s", source)
    t0 = time.perf_counter()
    cfg, params = load_weights(source)
    source_load_s = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers) in %.2f s", source, cfg.arch, cfg.num_layers, source_load_s)
    tokenizer = load_tokenizer(source)

    _prepare_out(out)
    t0 = time.perf_counter()
    save_orbax(out, cfg, params)
    tokenizer.save_pretrained(out)
    save_s = time.perf_counter() - t0
    log.info("wrote %s in %.2f s", out, save_s)

    t0 = time.perf_counter()
    cfg2, params2 = load_weights(out)
    converted_load_s = time.perf_counter() - t0
    _check_same(cfg, params, cfg2, params2)
    del params2
    reloaded = load_tokenizer(out)
    probe = "Hello, world! Converting checkpoints."
    if reloaded.encode(probe) != tokenizer.encode(probe):
        raise RuntimeError(f"tokenizer saved to {out} encodes differently from the source's")
    log.info(
        "load time: source %s %.2f s, converted orbax %.2f s (%.1fx)",
        "GGUF" if source.is_file() else "directory",
        source_load_s,
        converted_load_s,
        source_load_s / max(converted_load_s, 1e-9),
    )
    return ConvertResult(out, source, cfg, params, source_load_s, save_s, converted_load_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=named_models.DEFAULT_MODEL,
        help=f"named model ({', '.join(named_models.NAMED_MODELS)}), GGUF file or HF directory",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: checkpoints/<name>)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # orbax (via absl) and jax log every step of a save at INFO
        for name in ("absl", "jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = convert(args.model, args.out)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    print(result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
