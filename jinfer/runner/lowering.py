"""What the device is asked to do: every step program lowered for a platform, and its control flow.

A conditional inside a step program (`stablehlo.case` / `stablehlo.if`), or a loop whose trip
count is computed on the device, makes XLA:GPU copy a predicate to the host and wait for it: the
accelerator stops and restarts inside the step. Whatever the host can decide (decode-only or
mixed, which sampler features a batch uses) it decides when it plans the step, choosing among
programs warm-up built. This module lowers those programs for any platform on any machine (no
accelerator needed: lowering does not compile) and counts what is left:

    runner = runner_for(cfg, EngineConfig(...), "gpu")     # compiles for the GPU, here
    for name, lowered in runner.lower("cuda").items():
        print(name, control_flow(lowered))

`scripts/lowered_ops.py` prints the table for a model and configuration; `tests/test_lowering.py`
holds the GPU and TPU programs to no conditionals and no device-bounded loops.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxlib.mlir import ir

from jinfer.attention.kv_cache import KVCache, pool_shapes
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.models.params import map_specs, param_specs
from jinfer.runner.model_runner import ModelRunner

# A device platform ("gpu") and the name programs are lowered for ("cuda").
LOWERING_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class ControlFlow:
    """The control flow of one lowered program, callees included."""

    cases: int = 0  # stablehlo.case (lax.cond, lax.switch)
    ifs: int = 0  # stablehlo.if
    static_loops: int = 0  # stablehlo.while from a constant to a constant (fori_loop(0, 32))
    dynamic_loops: int = 0  # stablehlo.while with a trip count the device computes

    @property
    def device_decided(self) -> int:
        """The constructs that make the device decide, and an accelerator wait for it."""
        return self.cases + self.ifs + self.dynamic_loops


def _is_constant(value: ir.Value) -> bool:
    return getattr(value.owner, "name", None) == "stablehlo.constant"


def _static_trip_count(loop: ir.Operation) -> bool:
    """Whether a stablehlo.while counts a carried value from a constant up to a constant (as
    `lax.fori_loop` with Python bounds lowers)."""
    for op in loop.regions[0].blocks[0].operations:  # the condition
        if op.name == "stablehlo.compare" and len(op.operands) == 2:
            counter, bound = op.operands
            if isinstance(counter, ir.BlockArgument) and _is_constant(bound):
                return _is_constant(loop.operands[counter.arg_number])
    return False


def control_flow(lowered: jax.stages.Lowered) -> ControlFlow:
    counts = dict(cases=0, ifs=0, static_loops=0, dynamic_loops=0)

    def visit(op: ir.Operation) -> ir.WalkResult:
        if op.name == "stablehlo.case":
            counts["cases"] += 1
        elif op.name == "stablehlo.if":
            counts["ifs"] += 1
        elif op.name == "stablehlo.while":
            counts["static_loops" if _static_trip_count(op) else "dynamic_loops"] += 1
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return ControlFlow(**counts)


def runner_for(cfg: ModelConfig, config: EngineConfig, platform: str) -> ModelRunner:
    """A runner that builds its programs for `platform` ("gpu", "tpu", "cpu") from abstract
    weights and cache (shapes and dtypes only: nothing is allocated), for lowering."""
    config = config.resolve(cfg, platform)
    dtype = jnp.dtype(config.dtype)
    params = map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg))
    backend = config.backend
    stored = backend.storage_dtype(jnp.dtype(config.kv_cache_dtype))
    k_shape, v_shape = pool_shapes(cfg, config.num_pages, config.page_size, backend.layout)
    n = cfg.num_layers
    cache = KVCache(
        k=tuple(jax.ShapeDtypeStruct(k_shape, stored) for _ in range(n)),
        v=tuple(jax.ShapeDtypeStruct(v_shape, stored) for _ in range(n)),
        layout=backend.layout,
    )
    return ModelRunner(cfg, params, cache, config, platform=platform)
