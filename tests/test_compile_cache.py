"""The persistent XLA compilation cache: on by default, where the environment says, or off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jinfer.runner import compilation

TESTS = Path(__file__).parent

BUILD_TINY = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_config
from jinfer import LLM
from jinfer.models.params import init_params
from jinfer.tokenizer.tokenizer import load_tokenizer
cfg = tiny_config()
LLM.from_params(cfg, init_params(cfg, seed=0), load_tokenizer(sys.argv[1]),
                max_num_batched_tokens=16, max_num_seqs=4)
"""


def _run(code: str, cache: str, *args: str) -> None:
    env = {**os.environ, "JINFER_COMPILE_CACHE": cache, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, timeout=300)


def test_an_engine_fills_the_cache_directory(tmp_path, smollm2_gguf_path):
    _run(BUILD_TINY, str(tmp_path / "xla"), smollm2_gguf_path)
    assert any((tmp_path / "xla").iterdir())


def test_an_empty_setting_turns_the_cache_off():
    code = (
        "import jax; from jinfer.runner.compilation import enable_persistent_cache as e\n"
        "assert e() is None and not jax.config.jax_compilation_cache_dir"
    )
    _run(code, "")


def test_compiled_programs_are_dropped_only_near_the_memory_map_limit():
    maps = compilation.memory_maps()
    if maps is None:
        pytest.skip("no /proc/self/maps here")
    used, limit = maps
    assert 0 < used < limit
    f = jax.jit(lambda x: x + 1)
    f(jnp.ones(3))
    assert f._cache_size() == 1
    assert not compilation.bound_compiled_programs(headroom=1)  # plenty left: kept
    assert f._cache_size() == 1
    assert compilation.bound_compiled_programs(headroom=limit)  # fewer than `limit` left
    assert f._cache_size() == 0
