"""Mixture-of-experts models against transformers: tiny random Qwen3-MoE checkpoints (a
dense layer among the sparse ones) and Mixtral ones (a sliding window too), written by
transformers, load and give its logits at every position, and its greedy tokens through the
engine; each grouped product runs every row through its own expert, whatever the routing (all
tokens on the same experts, experts with none); bad checkpoints are refused naming the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_weights import ATOL, SEQ_LEN, TINY, hf_logits, jinfer_logits

from jinfer.config.model import ModelConfig
from jinfer.loader import WeightsError, load_weights
from jinfer.models import moe
from jinfer.models.params import LayerParams

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

MOE = dict(
    num_hidden_layers=3,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    mlp_only_layers=[1],  # layers 0 and 2 sparse, 1 dense
    decoder_sparse_step=1,
    tie_word_embeddings=False,
)


MIXTRAL = dict(
    num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
    tie_word_embeddings=False,
)  # fmt: skip


# gpt-oss: sliding (window 8 < SEQ_LEN) and full layers, YaRN rope over a context short enough
# that its ramp falls inside the 8 frequencies of head_dim 16, and a SwiGLU limit low enough to
# clamp.
GPT_OSS = dict(
    num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
    sliding_window=8, swiglu_limit=0.4, tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
        truncate=False, original_max_position_embeddings=4096,
    ),
)  # fmt: skip

KINDS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", MOE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", MIXTRAL),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", GPT_OSS),
}


def write_moe(directory: Path, seed: int = 0, kind: str = "qwen3_moe", **overrides):
    """A random-weight Qwen3-MoE, Mixtral or gpt-oss CausalLM saved as safetensors (norms,
    biases and sinks off their init); the torch model."""
    config_cls, model_cls, extra = KINDS[kind]
    config = getattr(tf, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    hf = getattr(tf, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases off their init
            if "sinks" in name:
                p.copy_(torch.randn_like(p) * 2.0)  # sinks that take a share of the softmax
    hf.save_pretrained(directory, safe_serialization=True)
    return hf


@pytest.mark.parametrize(
    "norm_topk_prob, gather_max_rows", [(True, 64), (False, 64), (True, 0)]
)  # (0: the blocked product, as for many tokens)
def test_qwen3_moe_matches_transformers(
    norm_topk_prob: bool, gather_max_rows: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(moe, "GATHER_MAX_ROWS", gather_max_rows)
    hf = write_moe(tmp_path, norm_topk_prob=norm_topk_prob)
    cfg, params = load_weights(tmp_path)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    assert cfg.moe_layers == (True, False, True) and cfg.norm_topk_prob == norm_topk_prob
    assert params.layers[0].w_gate.shape == (8, 64, 32) and params.layers[1].router is None
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], SEQ_LEN).astype(np.int32)
    expected = hf_logits(hf, tokens)
    assert np.abs(expected).max() > 0.5, "logits too small to make the tolerance meaningful"
    np.testing.assert_allclose(jinfer_logits(cfg, params, tokens), expected, rtol=0, atol=ATOL)


def test_every_token_on_the_same_experts_is_dropless(tmp_path: Path) -> None:
    """A router that sends every token to experts 3 and 5 (the other six get none): each of
    the two runs all T tokens, no capacity limit, and the logits still match."""
    hf = write_moe(tmp_path)
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 10.0  # one residual dimension positive everywhere
        for layer in (0, 2):
            gate = hf.model.layers[layer].mlp.gate.weight  # [E, D]
            gate.zero_()
            gate[3, 0], gate[5, 0] = 5.0, 2.5  # scores 5x, 2.5x, 0, ...: experts 3 then 5
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokens = np.random.default_rng(2).integers(0, TINY["vocab_size"], SEQ_LEN).astype(np.int32)
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens[None]), output_router_logits=True, use_cache=False)
    for logits in out.router_logits:  # (transformers agrees: every token on 3 and 5)
        assert {tuple(sorted(r)) for r in logits.topk(2).indices.tolist()} == {(3, 5)}
    cfg, params = load_weights(tmp_path)
    np.testing.assert_allclose(
        jinfer_logits(cfg, params, tokens), hf_logits(hf, tokens), rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("window", [None, 8])  # 8 < SEQ_LEN: Mixtral's sliding window binds
def test_mixtral_matches_transformers(window: int | None, tmp_path: Path) -> None:
    hf = write_moe(tmp_path, kind="mixtral", sliding_window=window)
    cfg, params = load_weights(tmp_path)
    assert cfg.moe_layers == (True, True) and cfg.moe_intermediate_size == 32
    assert cfg.sliding_window == window and cfg.norm_topk_prob
    tokens = np.random.default_rng(4).integers(0, TINY["vocab_size"], SEQ_LEN).astype(np.int32)
    expected = hf_logits(hf, tokens)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(jinfer_logits(cfg, params, tokens), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("gather_max_rows", [64, 0])  # the gathered and the blocked products
def test_gpt_oss_matches_transformers(gather_max_rows: int, tmp_path: Path, monkeypatch) -> None:
    """Attention sinks, q/k/v/o biases, alternating sliding and full layers, YaRN rope, the
    biased router and experts, the clamped SwiGLU, gate and up interleaved in one tensor."""
    monkeypatch.setattr(moe, "GATHER_MAX_ROWS", gather_max_rows)
    hf = write_moe(tmp_path, kind="gpt_oss")
    cfg, params = load_weights(tmp_path)
    assert cfg.layer_types == ("sliding", "full") and cfg.sliding_window == 8
    assert cfg.attention_sinks and cfg.o_bias and cfg.router_bias and cfg.expert_bias
    assert cfg.swiglu_limit == pytest.approx(0.4) and cfg.rope_scaling.kind == "yarn"
    assert cfg.rope_scaling.attention_factor == pytest.approx(0.1 * np.log(32) + 1)
    assert params.layers[0].w_gate.shape == (8, 64, 32) and params.layers[0].sinks.shape == (4,)
    tokens = np.random.default_rng(5).integers(0, TINY["vocab_size"], SEQ_LEN).astype(np.int32)
    expected = hf_logits(hf, tokens)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(jinfer_logits(cfg, params, tokens), expected, rtol=0, atol=ATOL)


def test_a_bfloat16_gpt_oss_checkpoint_loads_as_its_exact_upcast(tmp_path: Path) -> None:
    """bfloat16 safetensors (how gpt-oss ships without MXFP4): the interleaved gate/up and every
    bias come out as the float32 upcast of the bfloat16 weights."""
    hf = write_moe(tmp_path / "f32", kind="gpt_oss")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    hf.to(torch.bfloat16).float().save_pretrained(tmp_path / "upcast", safe_serialization=True)
    (_, bf16), (_, upcast) = load_weights(tmp_path / "bf16"), load_weights(tmp_path / "upcast")
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(bf16), leaves(upcast), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gpt_oss_without_its_sinks_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    write_moe(tmp_path, kind="gpt_oss")
    _edit_checkpoint(tmp_path, drop="model.layers.1.self_attn.sinks")
    with pytest.raises(WeightsError, match="no tensor for 'model.layers.1.self_attn.sinks'"):
        load_weights(tmp_path)


def test_gpt_oss_stacked_experts_of_another_count_are_named(tmp_path: Path) -> None:
    write_moe(tmp_path, kind="gpt_oss")
    _edit_checkpoint(tmp_path, config={"num_local_experts": 4})
    with pytest.raises(WeightsError, match=r"mlp.router.weight' has shape \(8, 64\)"):
        load_weights(tmp_path)


ROUTINGS = {
    "random": lambda rng, t, e, x: np.stack([rng.choice(e, x, replace=False) for _ in range(t)]),
    "two-experts-only": lambda rng, t, e, x: np.tile([3, 5], (t, 1)),
    "one-token": lambda rng, t, e, x: np.arange(x)[None, :],
    # Expert parallelism: rows of another device's experts come as expert e (none here); the
    # others must still be right.
    "some-elsewhere": lambda rng, t, e, x: np.stack(
        [rng.choice(e + 1, x, replace=False) for _ in range(t)]
    ),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("method", ["_ragged", "_gathered", "_blocked"])
@pytest.mark.parametrize("tokens", [1, 7, 33])  # 33 x 2 rows: not a whole number of blocks
def test_the_grouped_products_run_each_row_through_its_expert(method, routing, tokens):
    e, top, d, c = 8, 2, 16, 12
    rng = np.random.default_rng(0)
    cfg = ModelConfig(
        arch="llama", vocab_size=8, hidden_size=d, intermediate_size=8, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=d, num_experts=e, num_experts_per_tok=top,
        moe_intermediate_size=c,
    )  # fmt: skip
    if routing == "one-token":
        tokens = 1
    ids = ROUTINGS[routing](rng, tokens, e, top).astype(np.int32)  # [T, X]
    w = {k: rng.standard_normal(s, np.float32) for k, s in
         (("w_gate", (e, d, c)), ("w_up", (e, d, c)), ("w_down", (e, c, d)))}  # fmt: skip
    x = rng.standard_normal((tokens, d), np.float32)
    p = LayerParams(*[None] * 6, **w)
    got = np.asarray(getattr(moe, method)(cfg, p, x, ids.reshape(-1), top))  # [T*X, D]
    assert np.all(np.isfinite(got))
    for i, expert in enumerate(ids.reshape(-1)):
        if expert == e:  # another device's: the caller masks it
            continue
        row = x[i // top]
        g, u = row @ w["w_gate"][expert], row @ w["w_up"][expert]
        want = (g / (1 + np.exp(-g)) * u) @ w["w_down"][expert]
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_greedy_tokens_through_the_engine_match_transformers(
    kind: str, tmp_path: Path, smollm2_tokenizer
):
    """Chunked prefill (query blocks, one request's and several) and decodes: for gpt-oss every
    XLA attention path starts from the sinks."""
    from jinfer import LLM, SamplingParams

    hf = write_moe(tmp_path, kind=kind, vocab_size=49152)  # SmolLM2's tokenizer over its vocab
    cfg, params = load_weights(tmp_path)
    llm = LLM.from_params(
        cfg, params, smollm2_tokenizer, max_model_len=128, max_num_seqs=4,
        max_num_batched_tokens=32, dtype="float32", page_size=16,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 49152, n).tolist() for n in (5, 19, 40)]
    params_ = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    compiles = llm.engine.num_compiles
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params_, use_tqdm=False)
    assert llm.engine.num_compiles == compiles  # warm-up built every MoE program
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
            )
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def _edit_checkpoint(directory: Path, drop: str | None = None, config: dict | None = None):
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(path))
    if config:
        raw = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**raw, **config}))


def test_a_missing_router_is_named(tmp_path: Path) -> None:
    write_moe(tmp_path)
    _edit_checkpoint(tmp_path, drop="model.layers.2.mlp.gate.weight")
    with pytest.raises(WeightsError, match="no tensor for 'model.layers.2.mlp.gate.weight'"):
        load_weights(tmp_path)


def test_a_missing_expert_is_named(tmp_path: Path) -> None:
    write_moe(tmp_path)
    _edit_checkpoint(tmp_path, drop="model.layers.0.mlp.experts.7.up_proj.weight")
    with pytest.raises(WeightsError, match="model.layers.0.mlp.experts.7.up_proj.weight"):
        load_weights(tmp_path)


def test_an_expert_count_the_tensors_disagree_with_is_named(tmp_path: Path) -> None:
    write_moe(tmp_path)
    _edit_checkpoint(tmp_path, config={"num_experts": 4, "num_local_experts": 4})
    with pytest.raises(
        WeightsError, match="shape|is expert [4-7], but the config has num_experts=4"
    ):
        load_weights(tmp_path)


def test_a_mixture_counts_all_its_weights_and_reads_only_the_active_ones():
    from conftest import tiny_config

    cfg = tiny_config("moe")  # layer 0: 8 experts of width 32, top 2; layer 1 dense (128)
    d, v = cfg.hidden_size, cfg.vocab_size
    attn = 2 * d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    dense = 3 * d * 128
    assert cfg.num_params() == attn + d * 8 + 3 * d * 32 * 8 + dense + v * d
    assert cfg.num_params(active=True) == attn + d * 8 + 3 * d * 32 * 2 + dense + v * d
    # (Tied: the embedding, counted once, is the head's product.) Two FLOPs per active weight.
    assert cfg.flops_per_token() == 2 * cfg.num_params(active=True)


def _to_gguf(directory: Path, path: Path, hf_config) -> None:
    """The Qwen3-MoE checkpoint in `directory` as llama.cpp's converter writes it: arch
    qwen3moe, each sparse layer's experts stacked (`ffn_gate_exps` [E, C, D] and friends)."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    raw = {
        k.removeprefix("model."): v for k, v in load_file(directory / "model.safetensors").items()
    }
    c = hf_config
    w = gguf.GGUFWriter(str(path), arch="qwen3moe")
    for key, value in {
        "block_count": c.num_hidden_layers, "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads, "attention.key_length": c.head_dim,
        "context_length": 4096, "vocab_size": c.vocab_size, "expert_count": c.num_experts,
        "expert_used_count": c.num_experts_per_tok,
        "expert_feed_forward_length": c.moe_intermediate_size,
    }.items():  # fmt: skip
        w.add_uint32(f"qwen3moe.{key}", int(value))
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32("qwen3moe.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_bool("qwen3moe.expert_weights_norm", bool(c.norm_topk_prob))
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate": "ffn_gate_inp",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    tensors = {
        "token_embd.weight": raw["embed_tokens.weight"],
        "output_norm.weight": raw["norm.weight"],
        "output.weight": raw["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            if f"layers.{i}.{hf_name}.weight" in raw:
                tensors[f"blk.{i}.{gguf_name}.weight"] = raw[f"layers.{i}.{hf_name}.weight"]
        for proj, gguf_name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            experts = [raw.get(f"layers.{i}.mlp.experts.{e}.{proj}.weight") for e in range(8)]
            if experts[0] is not None:
                tensors[f"blk.{i}.ffn_{gguf_name}_exps.weight"] = np.stack(experts)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_mixture_of_experts_with_stacked_experts_matches_transformers(tmp_path: Path):
    """llama.cpp's MoE tensors (`ffn_gate_inp`, `ffn_{gate,up,down}_exps`), a dense layer where a
    layer has no router."""
    hf = write_moe(tmp_path / "hf")
    _to_gguf(tmp_path / "hf", tmp_path / "moe.gguf", hf.config)
    cfg, params = load_weights(tmp_path / "moe.gguf")
    assert cfg.moe_layers == (True, False, True) and cfg.num_experts == 8
    tokens = np.random.default_rng(6).integers(0, TINY["vocab_size"], SEQ_LEN).astype(np.int32)
    np.testing.assert_allclose(
        jinfer_logits(cfg, params, tokens), hf_logits(hf, tokens), rtol=0, atol=ATOL
    )
