"""Expert parallelism: `tensor_parallel_size=8, enable_expert_parallel=True` on a simulated
8-device CPU mesh, each device holding one of the 8 experts whole, gives transformers' greedy
tokens for Qwen3-MoE (a dense layer among the sparse ones), Mixtral and gpt-oss.

The mesh needs XLA_FLAGS before jax starts, so the engine runs in a child process; the
checkpoints and transformers' tokens come from this one.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_moe import write_moe
from test_tensor_parallel import run_on_8_devices

from jinfer.config.engine import EngineConfig, OptionError
from jinfer.config.model import ModelConfig

torch = pytest.importorskip("torch")

KINDS = ("qwen3_moe", "mixtral", "gpt_oss")
MAX_TOKENS = 8

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    from jax.sharding import PartitionSpec
    from jinfer import LLM, SamplingParams
    from jinfer.loader import load_weights
    from jinfer.loader.named_models import resolve_model
    from jinfer.tokenizer.tokenizer import load_tokenizer

    assert len(jax.devices()) == 8, jax.devices()
    directories, prompts, max_tokens = json.loads(sys.argv[1])
    tok = load_tokenizer(str(resolve_model("smollm2-135m-instruct")))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    result = {}
    for kind, directory in directories.items():
        cfg, weights = load_weights(directory)
        llm = LLM.from_params(
            cfg, weights, tok, tensor_parallel_size=8, enable_expert_parallel=True,
            max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, dtype="float32",
            num_pages=64,
        )
        runner = llm.engine.runner
        assert runner.cfg.expert_parallel and runner.cfg.tensor_parallel_size == 8
        sparse = next(p for p in runner.params.layers if p.router is not None)
        spec = sparse.w_gate.sharding.spec
        assert spec == PartitionSpec("tp", None, None), spec  # experts whole, split over devices
        compiles = llm.engine.num_compiles
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.num_compiles == compiles, "compiled after warm-up"
        result[kind] = [o.outputs[0].token_ids for o in outs]
    print("RESULT" + json.dumps(result))
    """
)


@pytest.mark.slow
def test_expert_parallel_over_8_devices_gives_transformers_greedy_tokens(tmp_path: Path):
    import numpy as np

    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 49152, n).tolist() for n in (5, 19, 40)]
    directories, expected = {}, {}
    for kind in KINDS:
        directory = tmp_path / kind
        hf = write_moe(directory, kind=kind, vocab_size=49152)
        directories[kind] = str(directory)
        expected[kind] = []
        for prompt in prompts:
            with torch.no_grad():
                out = hf.generate(
                    torch.as_tensor([prompt]),
                    max_new_tokens=MAX_TOKENS,
                    min_new_tokens=MAX_TOKENS,
                    do_sample=False,
                )
            expected[kind].append(out[0, len(prompt) :].tolist())
    got = run_on_8_devices(CHILD, json.dumps([directories, prompts, MAX_TOKENS]))
    assert got == expected


def test_expert_parallel_needs_experts_that_split_evenly():
    from conftest import tiny_config

    moe = tiny_config("moe")  # 8 experts
    with pytest.raises(OptionError, match="enable_expert_parallel needs num_experts=8 to split"):
        EngineConfig(tensor_parallel_size=3, enable_expert_parallel=True).resolve(moe, "cpu")
    with pytest.raises(OptionError, match="enable_expert_parallel needs a mixture of experts"):
        EngineConfig(enable_expert_parallel=True).resolve(tiny_config("llama"), "cpu")
    assert EngineConfig(tensor_parallel_size=4, enable_expert_parallel=True).resolve(moe, "cpu")
    with pytest.raises(ValueError, match="num_experts=8 does not split evenly over 3"):
        ModelConfig(**{**moe.__dict__, "tensor_parallel_size": 3, "expert_parallel": True})
