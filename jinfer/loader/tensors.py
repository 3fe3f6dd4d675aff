"""What every weights loader shares: its error, tensor checks, torch-layout layers to `LayerParams`.

Every loader yields `(ModelConfig, Params of numpy float32 arrays)`; placement on devices (dtype
cast, sharding) happens afterwards in one place (`distributed/sharding.py: place_params`). Each
tensor is checked against `models/params.py`'s specs, so a file that does not match the config
is an error, never silently wrong weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np

from jinfer.config.model import ModelConfig
from jinfer.models.params import LayerParams


class WeightsError(ValueError):
    """A weights file is unreadable, truncated or does not match its config."""


def to_layer(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray | None],
    label: Callable[[str], str] = lambda field: field,
    layer: int = 0,
) -> LayerParams:
    """Builds layer `layer`'s LayerParams from torch-layout [out, in] matrices fetched by field
    name (a sparse layer's experts as "experts.{e}.w_gate" and so on, or all of them stacked
    [E, in, out] as "experts.w_gate"; their biases "experts.b_gate"; the router "router").

    `label(field)` is the tensor's name in the file, for error messages."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def tensor(field: str, shape: tuple[int, ...]) -> np.ndarray:
        return require(get(field), label(field), shape)

    def proj(field: str, heads: int) -> np.ndarray:  # [heads*H, D] -> [D, heads, H]
        return np.ascontiguousarray(tensor(field, (heads * h, d)).T.reshape(d, heads, h))

    def mat(field: str, shape: tuple[int, int]) -> np.ndarray:  # [out, in] -> [in, out]
        return np.ascontiguousarray(tensor(field, shape).T)

    layer_params = LayerParams(
        attn_norm=tensor("attn_norm", (d,)),
        wq=proj("wq", n),
        wk=proj("wk", k),
        wv=proj("wv", k),
        wo=np.ascontiguousarray(tensor("wo", (d, n * h)).T.reshape(n, h, d)),
        mlp_norm=tensor("mlp_norm", (d,)),
        w_gate=None,
        w_up=None,
        w_down=None,
    )
    if cfg.is_moe_layer(layer):
        e, c = cfg.num_experts, cfg.moe_intermediate_size
        layer_params.router = mat("router", (e, d))  # [D, E]

        def stacked(w: str, shape: tuple[int, int]) -> np.ndarray:  # [E, in, out]
            whole = get(f"experts.{w}")  # a checkpoint of stacked experts: [E, in, out] as is
            if whole is not None:
                return require(whole, label(f"experts.{w}"), (e, shape[1], shape[0]))
            return np.stack([mat(f"experts.{i}.{w}", shape) for i in range(e)])

        layer_params.w_gate = stacked("w_gate", (c, d))
        layer_params.w_up = stacked("w_up", (c, d))
        layer_params.w_down = stacked("w_down", (d, c))
        if cfg.router_bias:
            layer_params.router_bias = tensor("router_bias", (e,))
        if cfg.expert_bias:
            layer_params.b_gate = tensor("experts.b_gate", (e, c))
            layer_params.b_up = tensor("experts.b_up", (e, c))
            layer_params.b_down = tensor("experts.b_down", (e, d))
    else:
        layer_params.w_gate = mat("w_gate", (cfg.intermediate_size, d))
        layer_params.w_up = mat("w_up", (cfg.intermediate_size, d))
        layer_params.w_down = mat("w_down", (d, cfg.intermediate_size))
    if cfg.qkv_bias:
        layer_params.bq = tensor("bq", (n * h,)).reshape(n, h)
        layer_params.bk = tensor("bk", (k * h,)).reshape(k, h)
        layer_params.bv = tensor("bv", (k * h,)).reshape(k, h)
    if cfg.qk_norm:
        layer_params.q_norm = tensor("q_norm", (h,))
        layer_params.k_norm = tensor("k_norm", (h,))
    if cfg.post_norms:
        layer_params.post_attn_norm = tensor("post_attn_norm", (d,))
        layer_params.post_mlp_norm = tensor("post_mlp_norm", (d,))
    if cfg.o_bias:
        layer_params.bo = tensor("bo", (d,))
    if cfg.attention_sinks:
        layer_params.sinks = tensor("sinks", (n,))
    return layer_params


def require(x: np.ndarray | None, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`x` as float32, present, finite and (when given) of `shape`; else a WeightsError."""
    if x is None:
        raise WeightsError(f"weights file has no tensor for {name!r}")
    x = np.asarray(x, np.float32)
    if shape is not None:
        expect(x, shape, name)
    if not np.all(np.isfinite(x)):
        raise WeightsError(f"tensor {name!r} contains NaN or Inf: corrupt weights")
    return x


def expect(x: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise WeightsError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")


@contextlib.contextmanager
def errors_name(path: str | os.PathLike) -> Iterator[None]:
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
