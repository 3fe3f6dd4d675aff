"""From weights in host memory to a warm engine: resolve, place, size the pool, compile.

config.resolve(model, platform)   every `auto` settled (config/engine.py)
mesh, place_params                the weights on their devices, in the model dtype
init_cache                        the page pool, in the attention backend's layout
Engine(...), warmup()             every program compiled before the first request
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jinfer.attention.kv_cache import init_cache
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.distributed.multihost import ProcessGroup, group_devices
from jinfer.distributed.sharding import cache_sharding, make_mesh, place_params
from jinfer.engine.engine import Engine
from jinfer.engine.kv_events import KVEventPublisher
from jinfer.models.params import Params
from jinfer.runner.compilation import bound_compiled_programs, enable_persistent_cache
from jinfer.tokenizer.tokenizer import Tokenizer


def build_engine(
    cfg: ModelConfig,
    host_params: Params,
    tokenizer: Tokenizer,
    config: EngineConfig,
    group: ProcessGroup | None = None,
    kv_events: KVEventPublisher | None = None,
) -> Engine:
    """An `Engine` for `cfg` with `host_params` placed per `config` (resolved here), warmed up
    unless `config.warmup` is off. `group`: the processes the model spans (`multihost.join`);
    on a follower the engine's runner then only runs what the leader sends (`runner/mirror.py`).
    `kv_events`: where the engine announces its prefix cache's changes (`kv_events.py`)."""
    enable_persistent_cache()
    bound_compiled_programs()  # before this engine compiles its own
    config = config.resolve(cfg, jax.default_backend())
    if cfg.num_experts:  # how the experts are split over the mesh (models/moe.py)
        cfg = dataclasses.replace(
            cfg,
            tensor_parallel_size=config.tensor_parallel_size,
            expert_parallel=config.enable_expert_parallel,
        )
    devices = None
    if group is not None:
        devices = group_devices(config.tensor_parallel_size, config.nnodes)
    mesh = make_mesh(config.tensor_parallel_size, devices)
    params = place_params(host_params, cfg, mesh, jnp.dtype(config.dtype))
    backend = config.backend
    sharding = cache_sharding(cfg, mesh, config.num_pages, config.page_size, backend.layout)
    stored = backend.storage_dtype(jnp.dtype(config.kv_cache_dtype))
    cache = init_cache(
        cfg, config.num_pages, config.page_size, stored, sharding, layout=backend.layout
    )
    engine = Engine(cfg, params, cache, tokenizer, config)
    if group is not None:
        engine.group = group
        engine.runner.mirror_to(group)  # (followers record the same table, then follow it)
    if config.warmup:
        engine.warmup()
    engine.kv_events = kv_events
    return engine
