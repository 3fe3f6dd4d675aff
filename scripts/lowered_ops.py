"""The control flow left in every step program the runner would build for a platform.

    python scripts/lowered_ops.py                                     # SmolLM2 shapes, GPU + TPU
    python scripts/lowered_ops.py --shape llama3-8b --platform gpu --max-num-seqs 64
    python scripts/lowered_ops.py --model gemma3-270m --platform cpu --attention-backend xla

Lowers (does not compile) each model and sampler program warm-up would build on that platform,
from abstract weights of the model's shapes, and prints per program the conditionals
(`stablehlo.case`, `stablehlo.if`) and the loops, those with a constant trip count apart from
those whose trip count the device computes. On an accelerator the last two kinds make the device
wait for the host inside the step (`jinfer/runner/lowering.py`). Any machine can run it: the
engine flags are the server's (`--max-num-seqs`, `--attention-backend`, `--compile-unit`, ...).
"""

from __future__ import annotations

import argparse
import logging

from bench_offline import RANDOM_SHAPES

from jinfer.config.cli import add_engine_args, check_engine_args, engine_options
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.runner.lowering import LOWERING_PLATFORM, control_flow, runner_for


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.shape:
        return ModelConfig(arch="llama", vocab_size=args.vocab_size, **RANDOM_SHAPES[args.shape])
    from jinfer.loader import load_weights
    from jinfer.loader.named_models import resolve_model

    return load_weights(resolve_model(args.model))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", nargs="+", default=["gpu", "tpu"], choices=LOWERING_PLATFORM)
    ap.add_argument("--shape", choices=sorted(RANDOM_SHAPES), help="a model shape, not --model")
    ap.add_argument("--vocab-size", type=int, default=128256, help="with --shape")
    add_engine_args(ap)
    args = ap.parse_args()
    check_engine_args(ap, args)
    logging.basicConfig(level=logging.WARNING)
    cfg = model_config(args)
    options = engine_options(args)
    options.pop("model")
    print("| platform | program | cases | ifs | constant loops | device-bounded loops |")
    print("|---|---|---|---|---|---|")
    for platform in args.platform:
        runner = runner_for(cfg, EngineConfig(**options), platform)
        total = 0
        for name, lowered in runner.lower(LOWERING_PLATFORM[platform]).items():
            f = control_flow(lowered)
            total += f.device_decided
            print(
                f"| {platform} | {name} | {f.cases} | {f.ifs} | {f.static_loops} | "
                f"{f.dynamic_loops} |"
            )
        print(f"| {platform} | **device-decided, all programs** | | | | {total} |")


if __name__ == "__main__":
    main()
