"""The shared engine flags: each is an `LLM` option, and bad values name their flag."""

from __future__ import annotations

import argparse
import inspect

import pytest

from jinfer.config.cli import OPTIONS, add_engine_args, check_engine_args, engine_options
from jinfer.llm import LLM


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(argv)
    check_engine_args(p, args)
    return args


def test_every_flag_is_an_llm_option_with_the_same_default():
    setup = inspect.signature(LLM._setup).parameters
    init = inspect.signature(LLM.__init__).parameters
    args = _parse([])
    for name in OPTIONS:
        param = init[name] if name == "model" else setup[name]
        assert getattr(args, name) == param.default, name


def test_flags_reach_the_options():
    args = _parse(
        ["--max-num-seqs", "4", "--no-enable-prefix-caching", "--no-warmup", "--dtype", "float32"]
    )
    options = engine_options(args)
    assert options["max_num_seqs"] == 4 and options["dtype"] == "float32"
    assert options["enable_prefix_caching"] is False and options["warmup"] is False


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--num-pages", "-3"], "--num-pages"),
        (["--kv-cache-memory-gb", "0"], "--kv-cache-memory-gb"),
    ],
)
def test_out_of_range_values_name_their_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err
