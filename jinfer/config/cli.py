"""The engine's command-line flags, derived from the options `EngineConfig` declares.

`python -m jinfer.serve` and `scripts/generate.py` both add them: `--model` names what to load,
and every other flag is the option of the same name (`--max-num-seqs` -> `max_num_seqs`, with
its default, choices and help), so `LLM(**engine_options(args))` builds the engine the command
line describes. Booleans take `--x` / `--no-x`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from jinfer.config.engine import EngineConfig, OptionError, options
from jinfer.loader.named_models import DEFAULT_MODEL

_ADDED = "engine_option_flags"  # the namespace attribute naming the options add_engine_args added


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser | Any, exclude: Iterable[str] = ()) -> None:
    """Adds `--model` and a flag per engine option, but those in `exclude` (a script whose own
    flag of that name means something else), to `parser` or an argument group;
    `parser.set_defaults` may change a default afterwards (generate.py's `--max-model-len`)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a named model or a path")
    added = tuple(name for name in options() if name not in exclude)
    parser.set_defaults(**{_ADDED: added})  # which flags are the engine's (engine_options)
    for name in added:
        field, opt = options()[name]
        if opt.type is bool:
            parser.add_argument(
                flag(name),
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=opt.help,
            )
            continue
        parser.add_argument(
            flag(name), type=opt.type, default=field.default, choices=opt.choices, help=opt.help
        )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM` keyword arguments (`model` and the engine options) the flags describe."""
    return {name: getattr(args, name) for name in ("model", *getattr(args, _ADDED))}


def check_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through `parser.error` naming the first flag whose value the option refuses."""
    values = engine_options(args)
    values.pop("model")
    try:
        EngineConfig(**values)
    except OptionError as e:
        parser.error(f"{flag(e.option)} {e.reason}")
