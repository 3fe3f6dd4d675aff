"""Hugging Face directories: `config.json` and `*.safetensors` (index files for sharded ones)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.loader.tensors import WeightsError, errors_name, require, to_layer
from jinfer.models.params import LayerParams, Params, check_shapes

# ----------------------------------------------------------------- HF safetensors dirs
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "router": "mlp.gate.weight",
}
_HF_EXPERT = {"w_gate": "gate_proj.weight", "w_up": "up_proj.weight", "w_down": "down_proj.weight"}
# Mixtral names its sparse MLP `block_sparse_moe` and its experts' projections w1, w3, w2.
_MIXTRAL_EXPERT = {"w_gate": "w1.weight", "w_up": "w3.weight", "w_down": "w2.weight"}


_HF_LAYER_LLAMA = {"mlp_norm": "post_attention_layernorm.weight"}
# gpt-oss: its attention's extras, a biased router and its experts stacked [E, in, out], gate
# and up interleaved in one tensor (gate the even columns, up the odd).
_HF_LAYER_LLAMA |= {
    "bo": "self_attn.o_proj.bias",
    "sinks": "self_attn.sinks",
}
_GPT_OSS = {
    "router": ("mlp.router.weight", lambda w: w),
    "router_bias": ("mlp.router.bias", lambda w: w),
    "experts.w_gate": ("mlp.experts.gate_up_proj", lambda w: w[..., ::2]),
    "experts.w_up": ("mlp.experts.gate_up_proj", lambda w: w[..., 1::2]),
    "experts.w_down": ("mlp.experts.down_proj", lambda w: w),
    "experts.b_gate": ("mlp.experts.gate_up_proj_bias", lambda w: w[..., ::2]),
    "experts.b_up": ("mlp.experts.gate_up_proj_bias", lambda w: w[..., 1::2]),
    "experts.b_down": ("mlp.experts.down_proj_bias", lambda w: w),
}


_HF_LAYER_GEMMA = {
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}


_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")


def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [directory / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"cannot read {index}: {e!r}") from e
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory} has no *.safetensors files")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="np") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except WeightsError:
            raise
        except Exception as e:
            if "bfloat16" in str(e) or "bf16" in str(e).lower():
                yield from _iter_safetensors_torch(f)
                continue
            raise WeightsError(f"cannot read {f}: {e}") from e


def _iter_safetensors_torch(f: Path) -> Iterator[tuple[str, np.ndarray]]:
    """bfloat16 files: numpy has no bf16, so read through ml_dtypes via raw bytes."""
    import ml_dtypes
    from safetensors import safe_open

    with safe_open(str(f), framework="flax") as handle:
        for name in handle.keys():
            yield name, np.asarray(handle.get_tensor(name)).astype(ml_dtypes.bfloat16)


def load_hf_dir(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise WeightsError(f"{directory} has no config.json")
    with errors_name(config_path):
        try:
            hf_config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"cannot read {config_path}: {e}") from e
        if not isinstance(hf_config, dict):
            raise WeightsError(f"{config_path} is not a JSON object")
        cfg = ModelConfig.from_hf_config(hf_config)
    raw: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}  # stripped name -> name in the file
    for name, arr in _iter_safetensors(_safetensor_files(directory)):
        for prefix in _HF_PREFIXES:
            if name.startswith(prefix):
                raw[name[len(prefix) :]] = arr
                names[name[len(prefix) :]] = name
                break
    with errors_name(directory):
        return cfg, _hf_params(cfg, raw, names)


def _hf_params(cfg: ModelConfig, raw: dict[str, np.ndarray], names: dict[str, str]) -> Params:
    gemma = cfg.arch == "gemma3"
    table = _HF_LAYER | (_HF_LAYER_GEMMA if gemma else _HF_LAYER_LLAMA)
    d, v = cfg.hidden_size, cfg.vocab_size

    stripped = next((n[: -len(k)] for k, n in names.items() if k.startswith("layers.")), "")

    def label(key: str) -> str:  # the name in the file (a missing one: as the others are named)
        return names.get(key, stripped + key)

    def tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return require(raw.get(key), label(key), shape)

    def norm(w: np.ndarray | None) -> np.ndarray | None:
        if w is None:
            return None
        w = np.asarray(w, np.float32)
        return w + 1.0 if gemma else w  # Gemma's RMSNorm multiplies by (1 + w)

    mixtral = any(".block_sparse_moe." in k for k in raw)
    sparse, expert_names = ("block_sparse_moe", _MIXTRAL_EXPERT) if mixtral else ("mlp", _HF_EXPERT)
    fused = cfg.expert_bias  # gpt-oss: every layer's experts in four stacked tensors

    def hf_name(field: str) -> str:
        if fused and field in _GPT_OSS:
            return _GPT_OSS[field][0]
        if field.startswith("experts."):  # experts.{e}.w_gate -> mlp.experts.{e}.gate_proj.weight
            _, e, w = field.split(".")
            return f"{sparse}.experts.{e}.{expert_names[w]}"
        if field == "router":
            return f"{sparse}.gate.weight"
        return table[field]

    def layer(i: int) -> LayerParams:
        def get(field: str) -> np.ndarray | None:
            if field.startswith("experts.") and (field.count(".") == 1) != fused:
                return None  # experts stacked (one dot) where the file names each, or back
            w = raw.get(f"layers.{i}.{hf_name(field)}")
            if fused and field in _GPT_OSS and w is not None:
                w = np.ascontiguousarray(_GPT_OSS[field][1](w))
            return norm(w) if field.endswith("norm") else w

        return to_layer(cfg, get, lambda field: label(f"layers.{i}.{hf_name(field)}"), i)

    for key in raw:  # an expert the config does not have: the two disagree
        match = re.match(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.", key)
        if match and int(match.group(2)) >= cfg.num_experts:
            raise WeightsError(
                f"tensor {label(key)!r} is expert {match.group(2)}, but the config has "
                f"num_experts={cfg.num_experts}"
            )

    head = None
    if not cfg.tie_word_embeddings:
        if "lm_head.weight" not in raw:
            raise WeightsError("untied model (tie_word_embeddings false) has no lm_head.weight")
        head = np.ascontiguousarray(tensor("lm_head.weight", (v, d)).T)
    params = Params(
        embed=tensor("embed_tokens.weight", (v, d)),
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=norm(tensor("norm.weight", (d,))),
        lm_head=head,
    )
    check_shapes(params, cfg)
    return params
