"""Loading weights from the files users have: GGUF, HF safetensors directories, orbax checkpoints.

Every loader yields `(ModelConfig, Params of numpy float32 arrays)`; placement on devices (dtype
cast, sharding) happens afterwards in one place (`sharding.place_params`). Each tensor is checked
against `params.param_specs`, so a file that does not match the config is an error, never
silently wrong weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.loader import gguf_file
from jinfer.models.params import LayerParams, Params, check_shapes

log = logging.getLogger(__name__)

CONFIG_FILE = "jinfer_config.json"  # marks an orbax checkpoint written by jinfer
PARAMS_DIR = "params"


class WeightsError(ValueError):
    """A weights file is unreadable, truncated or does not match its config."""


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


def _to_layer(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray | None],
    label: Callable[[str], str] = lambda field: field,
) -> LayerParams:
    """Builds one LayerParams from torch-layout [out, in] matrices fetched by field name.

    `label(field)` is the tensor's name in the file, for error messages."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def tensor(field: str, shape: tuple[int, ...]) -> np.ndarray:
        return _require(get(field), label(field), shape)

    def proj(field: str, heads: int) -> np.ndarray:  # [heads*H, D] -> [D, heads, H]
        return np.ascontiguousarray(tensor(field, (heads * h, d)).T.reshape(d, heads, h))

    def mat(field: str, shape: tuple[int, int]) -> np.ndarray:  # [out, in] -> [in, out]
        return np.ascontiguousarray(tensor(field, shape).T)

    layer = LayerParams(
        attn_norm=tensor("attn_norm", (d,)),
        wq=proj("wq", n),
        wk=proj("wk", k),
        wv=proj("wv", k),
        wo=np.ascontiguousarray(tensor("wo", (d, n * h)).T.reshape(n, h, d)),
        mlp_norm=tensor("mlp_norm", (d,)),
        w_gate=mat("w_gate", (cfg.intermediate_size, d)),
        w_up=mat("w_up", (cfg.intermediate_size, d)),
        w_down=mat("w_down", (d, cfg.intermediate_size)),
    )
    if cfg.qkv_bias:
        layer.bq = tensor("bq", (n * h,)).reshape(n, h)
        layer.bk = tensor("bk", (k * h,)).reshape(k, h)
        layer.bv = tensor("bv", (k * h,)).reshape(k, h)
    if cfg.qk_norm:
        layer.q_norm = tensor("q_norm", (h,))
        layer.k_norm = tensor("k_norm", (h,))
    if cfg.post_norms:
        layer.post_attn_norm = tensor("post_attn_norm", (d,))
        layer.post_mlp_norm = tensor("post_mlp_norm", (d,))
    return layer


def _require(x: np.ndarray | None, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`x` as float32, present, finite and (when given) of `shape`; else a WeightsError."""
    if x is None:
        raise WeightsError(f"weights file has no tensor for {name!r}")
    x = np.asarray(x, np.float32)
    if shape is not None:
        _expect(x, shape, name)
    if not np.all(np.isfinite(x)):
        raise WeightsError(f"tensor {name!r} contains NaN or Inf: corrupt weights")
    return x


def _expect(x: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise WeightsError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")


@contextlib.contextmanager
def _errors_name(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises what a malformed file causes as a WeightsError that names `path`."""
    try:
        yield
    except WeightsError as e:
        if str(path) in str(e):
            raise
        raise WeightsError(f"{path}: {e}") from e
    except KeyError as e:
        raise WeightsError(f"{path}: missing {e}") from e
    except (ValueError, TypeError) as e:  # config adapters, check_shapes, odd metadata
        raise WeightsError(f"{path}: {e}") from e


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
    with _errors_name(path):
        return _load_gguf(path, file)


def _load_gguf(path: str | os.PathLike, file: gguf_file.GGUFFile) -> tuple[ModelConfig, Params]:
    meta = file.metadata
    tensors = file.tensors
    cfg = ModelConfig.from_gguf_fields(meta)
    cfg = dataclasses.replace(cfg, tie_word_embeddings="output.weight" not in tensors)
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

    def layer(i: int) -> LayerParams:
        def name(field: str) -> str:
            suffix = fields[field]
            return f"blk.{i}.{suffix}" + ("" if "." in suffix else ".weight")

        def get(field: str) -> np.ndarray | None:
            w = fetch(name(field))
            if w is not None and permuted and field in ("wq", "wk"):
                heads = cfg.num_heads if field == "wq" else cfg.num_kv_heads
                _expect(w, (heads * cfg.head_dim, cfg.hidden_size), name(field))
                w = _unpermute_rope(w, heads)
            return w

        return _to_layer(cfg, get, name)

    d, v = cfg.hidden_size, cfg.vocab_size
    embed = _require(fetch("token_embd.weight"), "token_embd.weight", (v, d))
    final_norm = _require(fetch("output_norm.weight"), "output_norm.weight", (d,))
    head = fetch("output.weight")
    if head is not None:
        head = np.ascontiguousarray(_require(head, "output.weight", (v, d)).T)
    params = Params(
        embed=embed,
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=final_norm,
        lm_head=head,
    )
    check_shapes(params, cfg)
    return cfg, params


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
}
_HF_LAYER_LLAMA = {"mlp_norm": "post_attention_layernorm.weight"}
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
    with _errors_name(config_path):
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
    with _errors_name(directory):
        return cfg, _hf_params(cfg, raw, names)


def _hf_params(cfg: ModelConfig, raw: dict[str, np.ndarray], names: dict[str, str]) -> Params:
    gemma = cfg.arch == "gemma3"
    table = _HF_LAYER | (_HF_LAYER_GEMMA if gemma else _HF_LAYER_LLAMA)
    d, v = cfg.hidden_size, cfg.vocab_size

    def label(key: str) -> str:
        return names.get(key, key)

    def tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return _require(raw.get(key), label(key), shape)

    def norm(w: np.ndarray | None) -> np.ndarray | None:
        if w is None:
            return None
        w = np.asarray(w, np.float32)
        return w + 1.0 if gemma else w  # Gemma's RMSNorm multiplies by (1 + w)

    def layer(i: int) -> LayerParams:
        def get(field: str) -> np.ndarray | None:
            w = raw.get(f"layers.{i}.{table[field]}")
            return norm(w) if field.endswith("norm") else w

        return _to_layer(cfg, get, lambda field: label(f"layers.{i}.{table[field]}"))

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


# -------------------------------------------------------------------------------- orbax
def save_orbax(directory: str | os.PathLike, cfg: ModelConfig, params: Params) -> None:
    """Writes `jinfer_config.json` and `params/` (orbax) under `directory`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(cfg.to_json())
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, params, force=True)


def load_orbax(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    import jax
    import orbax.checkpoint as ocp

    from jinfer.models.params import map_specs, param_specs

    directory = Path(directory).absolute()
    try:
        cfg = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read {directory / CONFIG_FILE}: {e}") from e
    # Restore to host memory: placement (dtype, sharding) is `sharding.place_params`' job.
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = map_specs(
        lambda s: jax.ShapeDtypeStruct(s.shape, np.float32, sharding=host), param_specs(cfg)
    )
    if not (directory / PARAMS_DIR).is_dir():
        raise WeightsError(f"orbax checkpoint {directory} has no {PARAMS_DIR}/ directory")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            stored = ckpt.metadata(directory / PARAMS_DIR)
            # Check shapes first: a failed restore leaves orbax's pending reads to the GC.
            _check_orbax_shapes(getattr(stored, "item_metadata", stored), target, directory)
            params = ckpt.restore(directory / PARAMS_DIR, target)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"cannot restore orbax checkpoint {directory}: {e}") from e
    # Shapes were checked against the config before restoring (_check_orbax_shapes).
    return cfg, jax.tree_util.tree_map(np.asarray, params)


def _check_orbax_shapes(stored: Any, target: Any, directory: Path) -> None:
    """Every parameter the config implies is stored, with its shape, and nothing else is."""
    import jax

    def flat(tree: Any) -> dict[tuple, tuple[int, ...]]:
        def key(path: tuple) -> tuple:
            return tuple(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)

        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {key(path): tuple(leaf.shape) for path, leaf in leaves if leaf is not None}

    def show(k: tuple) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in k)

    expected, have = flat(target), flat(getattr(stored, "tree", stored))
    for k, shape in expected.items():
        if k not in have:
            raise WeightsError(f"orbax checkpoint {directory} has no parameter {show(k)}")
        if have[k] != shape:
            raise WeightsError(
                f"orbax checkpoint {directory}: parameter {show(k)} has shape {have[k]}, "
                f"{CONFIG_FILE} implies {shape}"
            )
    extra = sorted(show(k) for k in have.keys() - expected.keys())
    if extra:
        raise WeightsError(
            f"orbax checkpoint {directory} has parameters {CONFIG_FILE} does not describe: "
            f"{', '.join(extra[:5])}"
        )


def load_weights(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Loads a GGUF file, an HF safetensors directory or a jinfer orbax checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path} is a file but not a .gguf file")
        return load_gguf(path)
    if (path / CONFIG_FILE).exists():
        return load_orbax(path)
    if (path / "config.json").exists():
        return load_hf_dir(path)
    raise WeightsError(
        f"{path}: not a GGUF file, an HF directory (config.json) or a jinfer orbax "
        f"checkpoint ({CONFIG_FILE})"
    )
