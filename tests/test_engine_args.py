"""The engine options: declared once, each an `LLM` keyword and a flag, bad values named."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from conftest import tiny_config

from jinfer.config.cli import add_engine_args, check_engine_args, engine_options
from jinfer.config.engine import EngineConfig, options


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(argv)
    check_engine_args(p, args)
    return args


def test_every_option_is_a_flag_with_the_option_default():
    args = _parse([])
    for name, (field, _) in options().items():
        assert getattr(args, name) == field.default, name
    assert engine_options(args).keys() == {"model", *options()}


def test_flags_reach_the_options():
    args = _parse(
        ["--max-num-seqs", "4", "--no-enable-prefix-caching", "--no-warmup", "--dtype", "float32"]
    )
    opts = engine_options(args)
    assert opts["max_num_seqs"] == 4 and opts["dtype"] == "float32"
    assert opts["enable_prefix_caching"] is False and opts["warmup"] is False


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--num-pages", "-3"], "--num-pages"),
        (["--kv-cache-memory-gb", "0"], "--kv-cache-memory-gb"),
        (["--nnodes", "2", "--node-rank", "3"], "--node-rank"),
        (["--nnodes", "2", "--tensor-parallel-size", "2"], "--dist-init-addr"),
    ],
)
def test_out_of_range_values_name_their_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_num_seqs=0), "max_num_seqs must be at least 1"),
        (dict(max_num_seqs=2.5), "max_num_seqs must be an integer"),
        (dict(max_num_seqs=None), "max_num_seqs must be set"),
        (dict(dtype="float8"), "dtype must be one of auto, float32"),
        (dict(warmup="yes"), "warmup must be true or false"),
        (dict(kv_cache_memory_gb=-1.0), "kv_cache_memory_gb must be positive"),
        (dict(nnodes=2, node_rank=2), "node_rank must be below nnodes=2, got 2"),
        (dict(nnodes=2), "dist_init_addr must be set"),
        (dict(nnodes=2, dist_init_addr="localhost"), "dist_init_addr must be HOST:PORT"),
        (dict(nnodes=2, dist_init_addr="h:99999"), "dist_init_addr must be HOST:PORT"),
        (dict(nnodes=2, dist_init_addr="h:1", warmup=False), "warmup must be on"),
        (
            dict(nnodes=2, dist_init_addr="h:1", tensor_parallel_size=3),
            "tensor_parallel_size must be a multiple of nnodes=2",
        ),
    ],
)
def test_a_value_an_option_does_not_take_is_named(options, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**options)


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="max_num_sequences"):
        EngineConfig(max_num_sequences=4)


def test_resolve_settles_every_auto_from_the_model_and_platform():
    cfg = dataclasses.replace(tiny_config(), max_position_embeddings=32768)
    cpu = EngineConfig().resolve(cfg, "cpu")
    assert cpu.is_resolved and not EngineConfig().is_resolved
    assert (cpu.dtype, cpu.kv_cache_dtype, cpu.attention_backend) == ("float32",) * 2 + ("xla",)
    assert (cpu.page_size, cpu.compile_unit, cpu.max_model_len) == (64, "layer", 4096)
    assert cpu.resolve(cfg, "cpu") == cpu  # resolving twice changes nothing
    gpu = EngineConfig(kv_cache_memory_gb=0.001).resolve(cfg, "gpu")
    assert (gpu.dtype, gpu.attention_backend, gpu.page_size) == ("bfloat16", "pallas", 16)
    assert gpu.compile_unit == "step" and gpu.num_pages >= 2
    # The pool never outgrows every slot at full length (+ the scratch page).
    small = EngineConfig(max_model_len=128, max_num_seqs=2).resolve(cfg, "cpu")
    assert small.num_pages == 2 * 128 // 64 + 1
    with pytest.raises(ValueError, match="max_position_embeddings=32768"):
        EngineConfig(max_model_len=40000).resolve(cfg, "cpu")
