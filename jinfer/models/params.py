"""Parameter pytrees: every weight described once (shape, logical axes).

`param_specs(config)` is the single description; random init, sharding and the loaders all derive
from it. Layers are kept as separate per-layer arrays (a tuple of `LayerParams`), not stacked:
slicing stacked weights inside the jitted layer loop measured ~8x slower on CPU.

Logical axis names (mapped to mesh axes in `sharding.py`, never here):
  vocab, embed, heads, kv_heads, head_dim, mlp, experts, and None (replicated).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.config.model import ModelConfig

Axes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: Axes
    init: str = "normal"  # "normal" | "ones" | "zeros"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    attn_norm: Any  # [D]
    wq: Any  # [D, N, H]
    wk: Any  # [D, K, H]
    wv: Any  # [D, K, H]
    wo: Any  # [N, H, D]
    mlp_norm: Any  # [D]
    w_gate: Any  # [D, F]; a sparse layer's experts: [E, D, C]
    w_up: Any  # [D, F]; [E, D, C]
    w_down: Any  # [F, D]; [E, C, D]
    bq: Any = None  # [N, H]        (qkv_bias)
    bk: Any = None  # [K, H]
    bv: Any = None  # [K, H]
    q_norm: Any = None  # [H]       (qk_norm)
    k_norm: Any = None  # [H]
    post_attn_norm: Any = None  # [D]  (post_norms)
    post_mlp_norm: Any = None  # [D]
    router: Any = None  # [D, E]   (a sparse layer: each token's scores over the experts)
    bo: Any = None  # [D]           (o_bias)
    sinks: Any = None  # [N]        (attention_sinks: each head's sink logit)
    router_bias: Any = None  # [E]  (router_bias)
    b_gate: Any = None  # [E, C]    (expert_bias)
    b_up: Any = None  # [E, C]
    b_down: Any = None  # [E, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: Any  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: Any  # [D]
    lm_head: Any = None  # [D, V]; None when tied to `embed`


def layer_specs(cfg: ModelConfig, layer: int = 0) -> LayerParams:
    d, f, n, k, h = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    norm = ParamSpec((d,), ("embed",), "ones")
    specs = LayerParams(
        attn_norm=norm,
        wq=ParamSpec((d, n, h), ("embed", "heads", "head_dim")),
        wk=ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        wv=ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        wo=ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
        mlp_norm=norm,
        w_gate=ParamSpec((d, f), ("embed", "mlp")),
        w_up=ParamSpec((d, f), ("embed", "mlp")),
        w_down=ParamSpec((f, d), ("mlp", "embed")),
    )
    if cfg.qkv_bias:
        specs.bq = ParamSpec((n, h), ("heads", "head_dim"), "zeros")
        specs.bk = ParamSpec((k, h), ("kv_heads", "head_dim"), "zeros")
        specs.bv = ParamSpec((k, h), ("kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        specs.q_norm = ParamSpec((h,), ("head_dim",), "ones")
        specs.k_norm = ParamSpec((h,), ("head_dim",), "ones")
    if cfg.post_norms:
        specs.post_attn_norm = norm
        specs.post_mlp_norm = norm
    if cfg.o_bias:
        specs.bo = ParamSpec((d,), ("embed",), "zeros")
    if cfg.attention_sinks:
        specs.sinks = ParamSpec((n,), ("heads",))
    if cfg.is_moe_layer(layer):
        e, c = cfg.num_experts, cfg.moe_intermediate_size
        specs.router = ParamSpec((d, e), ("embed", None))
        specs.w_gate = ParamSpec((e, d, c), ("experts", "embed", "mlp"))
        specs.w_up = ParamSpec((e, d, c), ("experts", "embed", "mlp"))
        specs.w_down = ParamSpec((e, c, d), ("experts", "mlp", "embed"))
        if cfg.router_bias:
            specs.router_bias = ParamSpec((e,), (None,), "zeros")
        if cfg.expert_bias:
            specs.b_gate = ParamSpec((e, c), ("experts", "mlp"), "zeros")
            specs.b_up = ParamSpec((e, c), ("experts", "mlp"), "zeros")
            specs.b_down = ParamSpec((e, d), ("experts", "embed"), "zeros")
    return specs


def param_specs(cfg: ModelConfig) -> Params:
    """The shape and logical axes of every parameter, as a `Params` of `ParamSpec` leaves."""
    d, v = cfg.hidden_size, cfg.vocab_size
    return Params(
        embed=ParamSpec((v, d), ("vocab", "embed")),
        layers=tuple(layer_specs(cfg, i) for i in range(cfg.num_layers)),
        final_norm=ParamSpec((d,), ("embed",), "ones"),
        lm_head=None if cfg.tie_word_embeddings else ParamSpec((d, v), ("embed", "vocab")),
    )


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Params) -> Any:
    return jax.tree_util.tree_map(fn, specs, is_leaf=is_spec)


def init_params(
    cfg: ModelConfig,
    seed: int = 0,
    dtype: Any = jnp.float32,
    std: float = 0.02,
    on_device: bool = False,
) -> Params:
    """Random weights (normal with `std`, norms at one): for tests, benchmarks and GPU checks.

    `on_device` draws them with jax.random on the default device (no host copy: an 8B-shaped
    model in seconds); otherwise numpy draws them on the host.
    """
    rng = np.random.default_rng(seed)
    leaf_index = itertools.count()

    def make(spec: ParamSpec) -> jax.Array:
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if on_device:
            key = jax.random.fold_in(jax.random.key(seed), next(leaf_index))
            return (jax.random.normal(key, spec.shape, jnp.float32) * std).astype(dtype)
        return jnp.asarray(rng.standard_normal(spec.shape, np.float32) * std, dtype)

    return map_specs(make, param_specs(cfg))


def check_shapes(params: Params, cfg: ModelConfig) -> None:
    """Raises ValueError naming the first parameter whose shape disagrees with the config."""
    specs = param_specs(cfg)
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, spec in flat_specs:
        if path not in flat_params:
            raise ValueError(f"missing parameter {jax.tree_util.keystr(path)}")
        got = tuple(flat_params[path].shape)
        if got != spec.shape:
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} has shape {got}, expected {spec.shape}"
            )
