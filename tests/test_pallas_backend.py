"""attention_backend="pallas" end to end: the kernels (interpreted on CPU) give the XLA backend's
greedy tokens, on the tiny random models and on the real ones."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import LLM, SamplingParams
from jinfer.attention import resolve_backend
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.pallas import PALLAS, ragged_layout
from jinfer.attention.xla import XLA
from jinfer.loader import load_weights, named_models
from jinfer.tokenizer.tokenizer import load_tokenizer


def test_auto_picks_kernels_on_accelerators_and_xla_on_cpu():
    assert resolve_backend("auto", "gpu") is PALLAS
    assert resolve_backend("auto", "tpu") is PALLAS
    assert resolve_backend("auto", "cpu") is XLA
    assert resolve_backend("pallas", "cpu") is PALLAS
    assert resolve_backend("auto", "gpu", head_dim=80) is XLA
    assert resolve_backend("auto", "tpu", tensor_parallel_size=4) is XLA
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("triton", "cpu")


def test_a_model_with_attention_sinks_gets_xla_and_pallas_asked_for_is_refused():
    """The kernels have no sinks yet (gpt-oss): auto takes XLA everywhere, and asking for the
    kernels is an error that names what they lack, not a model computed without its sinks."""
    for platform in ("gpu", "tpu", "cpu"):
        assert resolve_backend("auto", platform, head_dim=64, sinks=True) is XLA
    with pytest.raises(ValueError, match="'pallas' has no attention sinks.*use xla"):
        resolve_backend("pallas", "gpu", head_dim=64, sinks=True)


def test_engine_batch_becomes_one_run_per_request():
    # row 3: a 3-token chunk at 7..9; row 5: a decode at 4; row 1: a first token; 2 padding tokens
    meta = AttentionMetadata(
        positions=jnp.array([7, 8, 9, 4, 0, 0, 0], jnp.int32),
        seq_ids=jnp.array([3, 3, 3, 5, 1, 0, 0], jnp.int32),
        slot_mapping=jnp.zeros(7, jnp.int32),
        block_tables=jnp.arange(6 * 4, dtype=jnp.int32).reshape(6, 4),
        backend=PALLAS,
    )
    kv_lens, rows, cu_q_lens = ragged_layout(meta)
    assert cu_q_lens.tolist() == [0, 3, 4, 5, 6, 7, 7, 7]
    assert kv_lens.tolist() == [10, 5, 1, 1, 1, 0, 0]
    assert rows[:5].tolist() == [3, 5, 1, 0, 0]


def test_query_block_padding_looks_like_padding_to_the_ragged_layout():
    # Bq = 4, region A = 4: a decode (row 5) + 3 padding; row 2 at 4..6 + 1 padding; row 0 at
    # 0..4 over two blocks (its first token follows a padding token of row 0, position 0).
    positions = [9, 0, 0, 0, 4, 5, 6, 0, 0, 1, 2, 3, 4, 0, 0, 0]
    seq_ids = [5, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    meta = AttentionMetadata(
        positions=jnp.array(positions, jnp.int32),
        seq_ids=jnp.array(seq_ids, jnp.int32),
        slot_mapping=jnp.zeros(16, jnp.int32),
        block_tables=jnp.arange(6 * 4, dtype=jnp.int32).reshape(6, 4),
        backend=PALLAS,
        block_rows=jnp.array([2, 0, 0], jnp.int32),
        block_lens=jnp.array([3, 4, 1], jnp.int32),
        query_block=4,
    )
    kv_lens, rows, cu_q_lens = ragged_layout(meta)
    assert cu_q_lens[:11].tolist() == [0, 1, 2, 3, 4, 7, 8, 13, 14, 15, 16]
    assert kv_lens[:10].tolist() == [10, 1, 1, 1, 7, 1, 5, 1, 1, 1]
    assert rows[:10].tolist() == [5, 0, 0, 0, 2, 0, 0, 0, 0, 0]


PROMPT_LENGTHS = [5, 16, 37]


def _prompts(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 49000, n).tolist()} for n in PROMPT_LENGTHS]


def _generate(llm: LLM, prompts, max_tokens: int):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    first = [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
    return tokens, first


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pallas_backend_greedy_tokens_equal_xla_tiny(make_tiny_llm, arch):
    # 16-token steps: the 37-token prompt is prefilled in chunks next to the others' decodes.
    opts = dict(max_model_len=128, max_num_batched_tokens=16)
    want, want_lp = _generate(make_tiny_llm(arch, attention_backend="xla", **opts), _prompts(), 8)
    llm = make_tiny_llm(arch, attention_backend="pallas", **opts)
    programs = llm.engine.runner.step_programs()
    assert {decode_only for _, decode_only in programs} == {False, True}  # both kernels run
    compiles = llm.engine.num_compiles
    got, got_lp = _generate(llm, _prompts(), 8)
    assert got == want
    assert llm.engine.num_compiles == compiles  # warm-up built the decode-only programs too
    for g, w in zip(got_lp, want_lp, strict=True):
        assert g.keys() == w.keys()
        np.testing.assert_allclose([g[t] for t in w], list(w.values()), atol=1e-4)
    llm.engine.check_invariants()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_pallas_backend_greedy_tokens_equal_xla_real_models(model):
    # Short prompts and one 8-token bucket: each backend compiles one 30/18-layer step.
    path = named_models.resolve_model(model)
    cfg, params = load_weights(path)
    tokenizer = load_tokenizer(str(path))
    opts = dict(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=8, warmup=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    tokens = {}
    for backend in ("xla", "pallas"):
        llm = LLM.from_params(cfg, params, tokenizer, attention_backend=backend, **opts)
        tokens[backend], _ = _generate(llm, prompts, 4)
    assert tokens["pallas"] == tokens["xla"]
