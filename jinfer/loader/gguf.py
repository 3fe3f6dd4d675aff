"""GGUF files: llama.cpp's format, dequantized to float32 (any block type `gguf` knows)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.loader import gguf_file
from jinfer.loader.tensors import WeightsError, errors_name, expect, require, to_layer
from jinfer.models.params import LayerParams, Params, check_shapes


# ------------------------------------------------------------------------------- shared
def _layer_fields(cfg: ModelConfig) -> dict[str, str]:
    """Field of LayerParams <- per-layer tensor suffix, for GGUF names."""
    fields = {
        "attn_norm": "attn_norm",
        "wq": "attn_q",
        "wk": "attn_k",
        "wv": "attn_v",
        "wo": "attn_output",
        "mlp_norm": "ffn_norm",
        "w_gate": "ffn_gate",
        "w_up": "ffn_up",
        "w_down": "ffn_down",
    }
    if cfg.qk_norm:
        fields |= {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    if cfg.post_norms:
        fields |= {"post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}
    return fields


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved rope -> HF's half-split layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------- GGUF
def read_gguf(path: str | os.PathLike) -> gguf_file.GGUFFile:
    """Opens a GGUF file, turning any parse failure into a WeightsError naming the file."""
    try:
        return gguf_file.read(path)
    except Exception as e:  # truncated or garbage files fail in assorted ways
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise WeightsError(
            f"cannot read GGUF file {path} ({size} bytes; truncated or not GGUF?): {e}"
        ) from e


def load_gguf(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Dequantizes a GGUF file (any block type the `gguf` package knows) to float32."""
    file = read_gguf(path)
    with errors_name(path):
        return _load_gguf(path, file)


def _load_gguf(path: str | os.PathLike, file: gguf_file.GGUFFile) -> tuple[ModelConfig, Params]:
    meta = file.metadata
    tensors = file.tensors
    cfg = ModelConfig.from_gguf_fields(meta)
    cfg = dataclasses.replace(cfg, tie_word_embeddings="output.weight" not in tensors)
    if cfg.num_experts:  # a layer is sparse where it has a router
        sparse = tuple(f"blk.{i}.ffn_gate_inp.weight" in tensors for i in range(cfg.num_layers))
        cfg = dataclasses.replace(cfg, moe_layers=sparse)
    permuted = meta.get("general.architecture") in ("llama", "mistral")
    # Gemma's norms are stored as (1 + w) in GGUF already: nothing to fold.

    def fetch(name: str) -> np.ndarray | None:
        t = tensors.get(name)
        if t is None:
            return None
        try:
            return gguf_file.dequantize(t)
        except Exception as e:
            raise WeightsError(f"{path}: cannot dequantize {name} ({t.type_name}): {e}") from e

    fields = _layer_fields(cfg)
    fields |= {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
    fields["router"] = "ffn_gate_inp"

    def layer(i: int) -> LayerParams:
        def name(field: str) -> str:
            if field.startswith("experts."):  # ffn_gate_exps [E, C, D]; older Mixtral files:
                _, *expert, w = field.split(".")  # one tensor per expert, ffn_gate.{e}
                if expert:
                    return f"blk.{i}.{fields[w]}.{expert[0]}.weight"
                return f"blk.{i}.{fields[w]}_exps.weight"
            suffix = fields[field]
            return f"blk.{i}.{suffix}" + ("" if "." in suffix else ".weight")

        def label(field: str) -> str:  # a missing expert: as today's files name experts
            return name(f"experts.{field.split('.')[-1]}") if field.count(".") == 2 else name(field)

        def get(field: str) -> np.ndarray | None:
            w = fetch(name(field))
            if w is not None and permuted and field in ("wq", "wk"):
                heads = cfg.num_heads if field == "wq" else cfg.num_kv_heads
                expect(w, (heads * cfg.head_dim, cfg.hidden_size), name(field))
                w = _unpermute_rope(w, heads)
            if w is not None and field.startswith("experts.") and field.count(".") == 1:
                w = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # [E, out, in] -> [E, in, out]
            return w

        return to_layer(cfg, get, label, i)

    d, v = cfg.hidden_size, cfg.vocab_size
    embed = require(fetch("token_embd.weight"), "token_embd.weight", (v, d))
    final_norm = require(fetch("output_norm.weight"), "output_norm.weight", (d,))
    head = fetch("output.weight")
    if head is not None:
        head = np.ascontiguousarray(require(head, "output.weight", (v, d)).T)
    params = Params(
        embed=embed,
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=final_norm,
        lm_head=head,
    )
    check_shapes(params, cfg)
    return cfg, params
