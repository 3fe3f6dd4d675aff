"""Weight loading: HF safetensors directories against transformers, orbax round trips, bad files.

The HF tests write tiny random-weight checkpoints with transformers (every norm perturbed away
from its init, so a wrong norm convention shows), load them with `jinfer.loader.load_weights`
and compare jinfer's logits at every position with transformers' eager-attention logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention.kv_cache import init_cache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla import XLA
from jinfer.config.model import ModelConfig
from jinfer.loader import WeightsError, load_weights, named_models
from jinfer.loader.orbax import load_orbax, save_orbax
from jinfer.models import decoder
from jinfer.models.params import Params, init_params

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 20  # longer than the Gemma sliding window below
PAGE_SIZE = 4  # several pages (key steps) per sequence: the online softmax and window matter
ATOL = 1e-4
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,  # logits of order one, so 1e-4 is a tight tolerance
    attn_implementation="eager",
)


# ------------------------------------------------------------------------------ helpers
_forward = jax.jit(decoder.forward, static_argnums=(1,))


def jinfer_logits(cfg: ModelConfig, params: Params, tokens: np.ndarray) -> np.ndarray:
    """Logits [T, V] at every position of one request prefilled in a single step."""
    t = len(tokens)
    num_pages = -(-t // PAGE_SIZE)
    pages = np.arange(1, num_pages + 1, dtype=np.int32)  # page 0 is the scratch page
    positions = np.arange(t, dtype=np.int32)
    meta = AttentionMetadata(
        positions=positions,
        seq_ids=np.zeros(t, np.int32),
        slot_mapping=pages[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE,
        block_tables=pages[None, :],
        backend=XLA,
    )
    cache = init_cache(cfg, num_pages + 1, PAGE_SIZE)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    logits, _ = _forward(params, cfg, jnp.asarray(tokens, jnp.int32), meta, cache, jnp.arange(t))
    return np.asarray(logits)


def assert_params_equal(a: Params, b: Params) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype == np.float32, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _hf_config(kind: str, **overrides):
    tf = pytest.importorskip("transformers")
    if kind == "llama":
        return tf.LlamaConfig(**TINY, num_hidden_layers=2, **overrides)
    if kind == "qwen2":
        tiny = {k: v for k, v in TINY.items() if k != "head_dim"}  # Qwen2: hidden / heads
        return tf.Qwen2Config(**tiny, num_hidden_layers=2, **overrides)
    if kind == "qwen3":
        return tf.Qwen3Config(**TINY, num_hidden_layers=2, **overrides)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**TINY, **overrides)
    raise ValueError(kind)


def write_hf_checkpoint(directory: Path, config, seed: int = 0, **save_kwargs):
    """A random-weight CausalLM saved as safetensors; returns the torch model (eval, float32)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    classes = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "gemma3_text": tf.Gemma3ForCausalLM,
    }
    hf = classes[config.model_type](config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)  # norms off their init, biases non-zero
    hf.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return hf


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens[None, :], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


HF_CASES = {
    # Untied head, a non-default rope base.
    "llama-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=5000.0), {}),
    # Tied embeddings, Llama 3 rope scaling, sharded into several files with an index.
    "llama-tied-sharded": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        dict(max_shard_size="40KB"),
    ),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=False), {}),
    "qwen3-qk-norm": ("qwen3", dict(tie_word_embeddings=True), {}),
    # YaRN rope (its attention factor from mscale and mscale_all_dim, its ramp inside head_dim
    # 16's frequencies), attention_bias: q/k/v and o_proj biases.
    "llama-yarn-attention-bias": (
        "llama",
        dict(
            attention_bias=True,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=8.0,
                mscale=2.0,
                mscale_all_dim=1.0,
                original_max_position_embeddings=4096,
            ),
        ),
        {},
    ),  # fmt: skip
    # 4 layers mixing sliding (window 8 < SEQ_LEN) and global attention, final soft-capping, and
    # a query scale that is not head_dim ** -0.5. (No attn_logit_softcapping: transformers'
    # Gemma 3 reads it but never applies it, and real Gemma 3 configs have it null.)
    "gemma3-sliding": (
        "gemma3",
        dict(
            num_hidden_layers=4,
            sliding_window=8,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
        ),
        {},
    ),
}


# --------------------------------------------------------------------- HF safetensors dirs
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_dir_matches_transformers(case: str, tmp_path: Path) -> None:
    kind, overrides, save_kwargs = HF_CASES[case]
    config = _hf_config(kind, **overrides)
    hf = write_hf_checkpoint(tmp_path, config, **save_kwargs)
    if save_kwargs:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1

    cfg, params = load_weights(tmp_path)
    assert cfg.num_layers == config.num_hidden_layers
    assert cfg.tie_word_embeddings == (params.lm_head is None) == config.tie_word_embeddings
    if kind == "gemma3":
        assert cfg.layer_types == ("sliding", "full", "sliding", "full")
        assert cfg.sliding_window == 8 < SEQ_LEN

    tokens = np.random.default_rng(1).integers(0, config.vocab_size, SEQ_LEN).astype(np.int32)
    expected = hf_logits(hf, tokens)
    assert np.abs(expected).max() > 0.5, "logits too small to make the tolerance meaningful"
    got = jinfer_logits(cfg, params, tokens)
    np.testing.assert_allclose(got[-1], expected[-1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    if kind == "gemma3":  # the window matters: without it only the first `window` rows agree
        window = cfg.sliding_window
        no_window = jinfer_logits(dataclasses.replace(cfg, sliding_window=10**6), params, tokens)
        np.testing.assert_allclose(no_window[:window], expected[:window], rtol=0, atol=ATOL)
        assert np.abs(no_window[window:] - expected[window:]).max() > 100 * ATOL


def test_hf_bfloat16_checkpoint(tmp_path: Path) -> None:
    """bf16 safetensors (how most HF checkpoints ship) load as exact float32 upcasts."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    hf = write_hf_checkpoint(tmp_path / "f32", _hf_config("qwen2", tie_word_embeddings=False))
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    cfg, params = load_weights(tmp_path / "f32")
    cfg16, params16 = load_weights(tmp_path / "bf16")
    assert cfg16 == cfg
    rounded = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params
    )
    assert_params_equal(rounded, params16)


# ---------------------------------------------------------------------------------- orbax
def _tiny_config(**overrides) -> ModelConfig:
    base = dict(
        arch="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
        qk_norm=True,
        tie_word_embeddings=False,
        eos_token_ids=(1, 2),
    )
    return ModelConfig(**(base | overrides))


@pytest.mark.parametrize(
    "cfg",
    [
        _tiny_config(),
        _tiny_config(
            arch="gemma3",
            qkv_bias=False,
            post_norms=True,
            tie_word_embeddings=True,
            layer_types=("sliding", "full"),
            sliding_window=4,
            rope_local_theta=10000.0,
            hidden_act="gelu_tanh",
            embed_scale=32**0.5,
        ),
    ],
    ids=["llama-untied-bias", "gemma3-tied"],
)
def test_orbax_round_trip(cfg: ModelConfig, tmp_path: Path) -> None:
    params = init_params(cfg, seed=3)
    # Random norms too, so a restore that fell back to the spec's init would show.
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + np.random.default_rng(x.size).standard_normal(x.shape, "f4"),
        params,
    )
    save_orbax(tmp_path / "ckpt", cfg, params)
    cfg2, params2 = load_orbax(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert_params_equal(params, params2)
    cfg3, params3 = load_weights(tmp_path / "ckpt")  # dispatches on jinfer_config.json
    assert cfg3 == cfg
    assert_params_equal(params, params3)


def test_orbax_round_trip_of_hf_model(tmp_path: Path) -> None:
    """HF -> orbax keeps every array (incl. Gemma's folded norms) and the forward pass."""
    _, overrides, _ = HF_CASES["gemma3-sliding"]
    write_hf_checkpoint(tmp_path / "hf", _hf_config("gemma3", **overrides))
    cfg, params = load_weights(tmp_path / "hf")
    save_orbax(tmp_path / "ckpt", cfg, params)
    cfg2, params2 = load_weights(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert_params_equal(params, params2)


def _convert_script():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", ROOT / "scripts" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_convert_named_model_round_trip(smollm2_gguf_path: str, tmp_path: Path) -> None:
    from jinfer.tokenizer.tokenizer import load_tokenizer

    out = tmp_path / "smollm2"
    result = _convert_script().convert("smollm2-135m-instruct", out)
    assert result.out == out
    assert result.source.samefile(smollm2_gguf_path)  # the package's GGUF, not a checkpoint
    assert (out / "jinfer_config.json").is_file() and (out / "params").is_dir()
    assert result.source_load_s > 0 and result.converted_load_s > 0
    cfg, params = load_weights(out)
    assert cfg == result.cfg
    assert_params_equal(result.params, params)
    del params, result
    tok, ref = load_tokenizer(out), load_tokenizer(smollm2_gguf_path)
    text = "Hello! <|im_start|>user\nWhat's 2+2?<|im_end|>"
    assert tok.encode(text) == ref.encode(text)
    assert tok.stop_token_ids() == ref.stop_token_ids()
    assert tok.chat_template == ref.chat_template


def test_convert_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a jinfer checkpoint"):
        _convert_script()._prepare_out(tmp_path)


# ------------------------------------------------------------------------------ bad inputs
def test_truncated_gguf(smollm2_gguf_path: str, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(WeightsError, match="truncated.gguf"):
        load_weights(path)


def test_garbage_gguf(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="garbage.gguf"):
        load_weights(path)


def test_empty_gguf(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.gguf"):
        load_weights(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(WeightsError, match="weights.bin"):
        load_weights(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_weights(tmp_path / "nothing-here")


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=str(tmp_path)):
        load_weights(tmp_path)


def test_hf_dir_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(_hf_config("llama").to_json_string())
    with pytest.raises(WeightsError, match="safetensors"):
        load_weights(tmp_path)


def test_hf_dir_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(WeightsError, match="config.json"):
        load_weights(tmp_path)


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ],
)
def test_hf_tensor_of_wrong_shape(name: str, tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, _hf_config("llama", tie_word_embeddings=False))

    def edit(tensors: dict) -> None:
        tensors[name] = np.ascontiguousarray(tensors[name][:-1])

    _rewrite_safetensors(tmp_path / "model.safetensors", edit)
    short = name.removeprefix("model.")
    with pytest.raises(WeightsError, match=rf"{tmp_path}.*{short}.*shape"):
        load_weights(tmp_path)


def test_hf_bias_of_wrong_shape(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, _hf_config("qwen2"))
    name = "model.layers.0.self_attn.v_proj.bias"
    _rewrite_safetensors(
        tmp_path / "model.safetensors", lambda t: t.__setitem__(name, t[name][:-2].copy())
    )
    with pytest.raises(WeightsError, match=r"v_proj.bias.*shape"):
        load_weights(tmp_path)


def test_hf_missing_tensor(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, _hf_config("llama"))
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_safetensors(tmp_path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=r"layers.1.mlp.up_proj.weight"):
        load_weights(tmp_path)


def test_hf_truncated_safetensors(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, _hf_config("llama"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_weights(tmp_path)


def test_hf_shard_missing(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, _hf_config("llama"), max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises((WeightsError, FileNotFoundError), match=shards[-1].name):
        load_weights(tmp_path)


def test_orbax_missing_params(tmp_path: Path) -> None:
    cfg = _tiny_config()
    save_orbax(tmp_path, cfg, init_params(cfg))
    shutil.rmtree(tmp_path / "params")
    with pytest.raises(WeightsError, match=f"{tmp_path} has no params"):
        load_weights(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=48), r"\.embed has shape \(64, 32\)"),
        (dict(num_layers=3), r"no parameter \.layers\[2\]"),
        (dict(qkv_bias=False), r"does not describe: \.layers\[0\]\.bk"),
        (dict(tie_word_embeddings=True), r"does not describe: \.lm_head"),
    ],
    ids=["shape", "missing", "extra", "tied"],
)
def test_orbax_config_mismatch(change: dict, message: str, tmp_path: Path) -> None:
    """A checkpoint whose params do not match its jinfer_config.json is an error."""
    cfg = _tiny_config()
    save_orbax(tmp_path, cfg, init_params(cfg))
    (tmp_path / "jinfer_config.json").write_text(_tiny_config(**change).to_json())
    with pytest.raises(WeightsError, match=f"{tmp_path}.*{message}"):
        load_weights(tmp_path)


def test_unknown_model_name() -> None:
    with pytest.raises(FileNotFoundError) as info:
        named_models.resolve_model("no-such-model-xyz")
    for name in named_models.NAMED_MODELS:
        assert name in str(info.value)
