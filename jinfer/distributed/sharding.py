"""Meshes and logical axis rules: the one place that maps model axes onto devices.

Model code names logical axes (`params.py`); this module maps them to the mesh's `tp` axis for
tensor parallelism. A logical axis whose size the mesh does not divide stays replicated (for
example SmolLM2's 3 KV heads on 4 devices): GSPMD keeps the math identical either way.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer.attention import kv_cache
from jinfer.config.model import ModelConfig
from jinfer.models.params import Params, map_specs, param_specs

log = logging.getLogger(__name__)

TP = "tp"
# logical axis -> mesh axis
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": TP,
    "heads": TP,
    "kv_heads": TP,
    "mlp": TP,
    "embed": None,
    "head_dim": None,
    # Under tensor parallelism every device holds every expert, each a slice of its width
    # ("mlp"); expert parallelism moves the experts axis onto the mesh instead (below).
    "experts": None,
}
# Expert parallelism (ModelConfig.expert_parallel): each device holds E / tp experts
# whole (an axis already on the mesh is not split again, so their width stays whole).
EXPERT_PARALLEL_RULES = LOGICAL_RULES | {"experts": TP}


def make_mesh(tensor_parallel_size: int = 1, devices: list[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} but only {len(devices)} "
            f"{devices[0].platform} device(s) are visible"
        )
    return Mesh(np.asarray(devices[:tensor_parallel_size]), (TP,))


def logical_to_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: dict[str, str | None] = LOGICAL_RULES,
) -> PartitionSpec:
    parts: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and (size % mesh.shape[mesh_axis] or mesh_axis in parts):
            mesh_axis = None  # not divisible (or already used): replicate this dimension
        parts.append(mesh_axis)
    return PartitionSpec(*parts)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    rules = EXPERT_PARALLEL_RULES if cfg.expert_parallel else LOGICAL_RULES
    return map_specs(
        lambda s: NamedSharding(mesh, logical_to_spec(s.axes, s.shape, mesh, rules)),
        param_specs(cfg),
    )


def place_params(params: Params, cfg: ModelConfig, mesh: Mesh, dtype: Any) -> Params:
    """Casts every weight to `dtype` and puts it on the mesh with its logical sharding."""
    shardings = param_shardings(cfg, mesh)

    def put(x: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array):  # already on a device: no round trip through the host
            return jax.device_put(x.astype(dtype), sharding)
        return jax.device_put(np.asarray(x).astype(jnp.dtype(dtype)), sharding)

    return jax.tree_util.tree_map(put, params, shardings)


def cache_sharding(
    cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int, layout: str
) -> tuple[NamedSharding, NamedSharding]:
    """The (k, v) pools' shardings in `layout`: split over kv heads (or head width)."""
    logical = {"P": None, "Z": None, "K": "kv_heads", "H": "head_dim"}
    shapes = kv_cache.pool_shapes(cfg, num_pages, page_size, layout)
    return tuple(
        NamedSharding(mesh, logical_to_spec(tuple(logical[a] for a in axes), shape, mesh))
        for axes, shape in zip(kv_cache.pool_axes(layout), shapes, strict=True)
    )


__all__ = ["make_mesh", "place_params", "cache_sharding", "param_shardings"]
