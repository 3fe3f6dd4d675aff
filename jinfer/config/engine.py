"""Every engine option, declared once: its name, default, check, help and how `auto` resolves.

`EngineConfig`'s fields are the options. From them come `LLM(model, **options)`'s keywords (an
unknown one is a TypeError, a bad value a ValueError that names it), the engine flags of
`python -m jinfer.serve` and `scripts/generate.py` (`cli.py`: `--max-num-seqs` sets
`max_num_seqs`), and the configuration the engine, the runner and the builder read.

A config holds what was asked (`auto`, None: "derive it") until `resolve(model, platform)`
settles every field for one model on one platform. Fields resolve in declaration order, so a
field's rule may read the fields above it (the KV dtype follows the model dtype, the page size
the attention backend, the pool size all of them). Engine code reads resolved configs only.
"""

from __future__ import annotations

import builtins
import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jinfer.attention import (
    ATTENTION_BACKENDS,
    BACKENDS,
    check_cache_dtype,
    get_backend,
    resolve_backend,
)
from jinfer.attention.backend import AttentionBackend
from jinfer.config.cache import num_pages_to_fit
from jinfer.config.kv_events import KVEventsConfig
from jinfer.config.model import ModelConfig
from jinfer.config.speculative import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")  # the choices of dtype and kv_cache_dtype
COMPILE_UNITS = ("auto", "step", "layer")
# max_model_len when unset: the model's max_position_embeddings, up to this many tokens (the
# block tables and the penalty history are sized by it).
DEFAULT_MAX_MODEL_LEN = 4096
# max_num_batched_tokens is raised to this: the smallest token bucket on accelerators.
MIN_BATCHED_TOKENS = 8

# A rule: (the value asked, the config resolved so far, the model, the platform) -> the value.
Rule = Callable[[Any, "EngineConfig", ModelConfig, str], Any]


@dataclasses.dataclass(frozen=True)
class Option:
    help: str
    type: type  # of the value (int, float, str, bool); None is allowed where the default is None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # values must be at least this
    positive: bool = False  # values must be above 0
    resolve: Rule | None = None  # None: the value is used as given


def option(default: Any, help: str, type: type | None = None, **kwargs: Any) -> Any:
    """A field of `EngineConfig` that is an engine option (`type`: the default's, if not None)."""
    opt = Option(help, type or builtins.type(default), **kwargs)
    return dataclasses.field(default=default, metadata={"option": opt})


def options() -> dict[str, tuple[dataclasses.Field, Option]]:
    """Every option by name, in declaration order."""
    return {f.name: (f, f.metadata["option"]) for f in dataclasses.fields(EngineConfig)}


# ------------------------------------------------------------------------------- the rules
def _auto_dtype(value: str, c: EngineConfig, model: ModelConfig, platform: str) -> str:
    """float32 on CPU (token for token with a float32 reference), bfloat16 on accelerators.
    bfloat16 also runs ~2x faster on CPUs with AVX512-BF16 or AMX (docs/benchmarks.md)."""
    if value != "auto":
        return value
    return "float32" if platform == "cpu" else "bfloat16"


def _max_model_len(value: int | None, c: EngineConfig, model: ModelConfig, platform: str) -> int:
    if value is None:
        return min(model.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if value > model.max_position_embeddings:
        raise ValueError(
            f"max_model_len={value} exceeds the model's "
            f"max_position_embeddings={model.max_position_embeddings}"
        )
    return value


def _batched_tokens(value: int, c: EngineConfig, model: ModelConfig, platform: str) -> int:
    return max(value, MIN_BATCHED_TOKENS)


def _expert_parallel(value: bool, c: EngineConfig, model: ModelConfig, platform: str) -> bool:
    if not value:
        return False
    if not model.num_experts:
        raise OptionError(
            "enable_expert_parallel", "needs a mixture of experts; this model has none"
        )
    if model.num_experts % c.tensor_parallel_size:
        raise OptionError(
            "enable_expert_parallel",
            f"needs num_experts={model.num_experts} to split evenly over "
            f"tensor_parallel_size={c.tensor_parallel_size} devices",
        )
    return True


def _attention_backend(value: str, c: EngineConfig, model: ModelConfig, platform: str) -> str:
    """`auto`: the Pallas kernels on GPU/TPU, XLA on CPU and wherever the kernels do not serve
    (`jinfer.attention.resolve_backend`, from what each backend declares)."""
    return resolve_backend(
        value, platform, model.head_dim, c.tensor_parallel_size, sinks=model.attention_sinks
    ).name


def _kv_cache_dtype(value: str, c: EngineConfig, model: ModelConfig, platform: str) -> str:
    """`auto`: the model's dtype. A narrower cache (bfloat16 next to float32 weights) halves the
    KV memory and the bytes decode attention reads, where the backend reads it."""
    kv = c.dtype if value == "auto" else value
    check_cache_dtype(c.backend, kv, c.dtype)
    return kv


def _page_size(value: int | None, c: EngineConfig, model: ModelConfig, platform: str) -> int:
    return c.backend.default_page_size if value is None else value


def _compile_unit(value: str, c: EngineConfig, model: ModelConfig, platform: str) -> str:
    """`auto`: per layer on CPU (compile time, not dispatch, is what costs there), the whole
    step as one program on GPU/TPU (per-kernel launches and fusion across layers matter)."""
    if value != "auto":
        return value
    return "layer" if platform == "cpu" else "step"


def _num_pages(value: int | None, c: EngineConfig, model: ModelConfig, platform: str) -> int:
    if value is not None:
        return value
    itemsize = jnp.dtype(c.kv_cache_dtype).itemsize
    return num_pages_to_fit(
        model, c.page_size, itemsize, c.kv_cache_memory_gb, c.max_num_seqs, c.max_model_len
    )


# ----------------------------------------------------------------------------- the options
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine options. `EngineConfig(**options)` checks each value; `resolve` settles `auto`
    and None for a model and a platform."""

    dtype: str = option(
        "auto",
        "weights and activations; auto: float32 on CPU, bfloat16 elsewhere",
        choices=DTYPES,
        resolve=_auto_dtype,
    )
    tensor_parallel_size: int = option(1, "devices to shard the model over", minimum=1)
    enable_expert_parallel: bool = option(
        False,
        "a mixture of experts: split the experts over the tensor-parallel devices (each holds "
        "its share whole) instead of every expert's width",
        resolve=_expert_parallel,
    )
    max_model_len: int | None = option(
        None,
        f"prompt + output tokens (default: the model's, up to {DEFAULT_MAX_MODEL_LEN})",
        type=int,
        minimum=1,
        resolve=_max_model_len,
    )
    max_num_seqs: int = option(32, "requests running at once", minimum=1)
    max_num_batched_tokens: int = option(
        512,
        f"token budget per step, the prefill chunk (at least {MIN_BATCHED_TOKENS})",
        minimum=1,
        resolve=_batched_tokens,
    )
    attention_backend: str = option(
        "auto",
        "auto: Pallas kernels on GPU/TPU, XLA on CPU",
        choices=ATTENTION_BACKENDS,
        resolve=_attention_backend,
    )
    kv_cache_dtype: str = option(
        "auto",
        "auto: the model's dtype; bfloat16 halves KV memory next to float32 weights",
        choices=DTYPES,
        resolve=_kv_cache_dtype,
    )
    page_size: int | None = option(
        None,
        "tokens per KV-cache page (default: the attention backend's, "
        + ", ".join(f"{b.name} {b.default_page_size}" for b in BACKENDS.values())
        + ")",
        type=int,
        minimum=1,
        resolve=_page_size,
    )
    kv_cache_memory_gb: float = option(2.0, "KV-cache size", positive=True)
    num_pages: int | None = option(
        None, "KV-cache pages (overrides the size in GB)", type=int, minimum=2, resolve=_num_pages
    )
    compile_unit: str = option(
        "auto",
        "one program per step, or per layer kind (fast warm-up); auto: layer on CPU",
        choices=COMPILE_UNITS,
        resolve=_compile_unit,
    )
    enable_prefix_caching: bool = option(
        True, "reuse the KV of earlier requests' full pages (default on)"
    )
    async_scheduling: bool = option(
        True,
        "plan and dispatch each step before the previous one's tokens reach the host, so the "
        "device never waits for the host's bookkeeping (outputs are the same either way)",
    )
    seed: int = option(0, "the engine's seed: it draws the seeds of requests that bring none")
    output_guard: str = option(
        "",
        "a check on each request's text before it is released: 'module:attr' (a guard, or what "
        "makes one) or 'regex:PATTERN' (the built-in deny list); matches end the request with "
        "finish_reason content_filter (jinfer/engine/output_guard.py)",
    )
    warmup: bool = option(
        True, "compile every batch shape up front (off: each compiles on first use)"
    )
    # One model over several processes (SGLang's names): rank 0 schedules and serves, the
    # others run the same programs on their devices (jinfer/distributed/multihost.py).
    nnodes: int = option(1, "processes (hosts) the model spans", minimum=1)
    node_rank: int = option(0, "this process's rank among --nnodes (0: the leader)", minimum=0)
    dist_init_addr: str | None = option(
        None,
        "HOST:PORT of rank 0, where every rank meets (jax.distributed's coordinator on PORT, "
        "the step channel on PORT+1); needed when nnodes > 1",
        type=str,
    )
    dist_timeout: float = option(
        300.0, "seconds a rank waits for the others to join before it gives up", positive=True
    )
    kv_events_config: str | None = option(
        None,
        'vLLM\'s KV cache events as JSON, for a KV-aware router: {"enable_kv_cache_events": '
        'true, "endpoint": "tcp://127.0.0.1:5557", "replay_endpoint", "buffer_steps", '
        '"topic", "hwm"} (jinfer/config/kv_events.py)',
        type=str,
    )

    speculative_config: str | None = option(
        None,
        'vLLM\'s speculative decoding settings as JSON: {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4} drafts '
        'from each request\'s own context, {"method": "suffix"} also from earlier outputs of '
        "its cache_salt; verified in the step (jinfer/config/speculative.py)",
        type=str,
    )

    def __post_init__(self) -> None:
        for name, (field, opt) in options().items():
            value = getattr(self, name)
            _check(name, value, field.default, opt)
            if value is not None and opt.type in (int, float):
                object.__setattr__(self, name, opt.type(value))  # numpy scalars -> Python
        _check_group(self)
        try:
            KVEventsConfig.parse(self.kv_events_config)
        except ValueError as e:
            raise OptionError("kv_events_config", str(e)) from None
        try:
            SpeculativeConfig.parse(self.speculative_config)
        except ValueError as e:
            raise OptionError("speculative_config", str(e)) from None

    @property
    def is_resolved(self) -> bool:
        return not any(
            getattr(self, name) in (None, "auto")
            for name, (_, opt) in options().items()
            if opt.resolve is not None
        )

    def resolve(self, model: ModelConfig, platform: str) -> EngineConfig:
        """Every `auto` and None settled for `model` on `platform` ("cpu", "gpu", "tpu"), and
        the values checked against the model; ValueError names an option that cannot hold."""
        config = self
        for name, (_, opt) in options().items():
            if opt.resolve is not None:
                value = opt.resolve(getattr(config, name), config, model, platform)
                config = dataclasses.replace(config, **{name: value})
        return config

    @property
    def kv_events(self) -> KVEventsConfig:
        return KVEventsConfig.parse(self.kv_events_config)

    @property
    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig.parse(self.speculative_config)

    @property
    def backend(self) -> AttentionBackend:
        """The attention backend (once `attention_backend` is resolved)."""
        return get_backend(self.attention_backend)


class OptionError(ValueError):
    """A value an option does not take; `str(e)` is "<option> <reason>"."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


def _check(name: str, value: Any, default: Any, opt: Option) -> None:
    """OptionError naming `name` when `value` is not one the option takes."""
    if value is None:
        if default is not None:
            raise OptionError(name, "must be set (None is not a value it takes)")
        return  # derived when the config is resolved
    kind = {int: numbers.Integral, float: numbers.Real}.get(opt.type, opt.type)
    if not isinstance(value, kind) or (isinstance(value, bool) and opt.type is not bool):
        raise OptionError(name, f"must be {_KINDS[opt.type]}, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise OptionError(name, f"must be one of {', '.join(opt.choices)}; got {value!r}")
    if opt.minimum is not None and value < opt.minimum:
        raise OptionError(name, f"must be at least {opt.minimum}, got {value}")
    if opt.positive and value <= 0:
        raise OptionError(name, f"must be positive, got {value}")


def _check_group(c: EngineConfig) -> None:
    """OptionError for a multi-process configuration that cannot start (before anything loads)."""
    if c.node_rank >= c.nnodes:
        raise OptionError("node_rank", f"must be below nnodes={c.nnodes}, got {c.node_rank}")
    if c.nnodes == 1:
        return
    if c.dist_init_addr is None:
        raise OptionError(
            "dist_init_addr", f"must be set (HOST:PORT of rank 0) when nnodes={c.nnodes}"
        )
    host, _, port = c.dist_init_addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise OptionError("dist_init_addr", f"must be HOST:PORT, got {c.dist_init_addr!r}")
    if not c.warmup:
        raise OptionError(
            "warmup", "must be on when nnodes > 1 (every rank builds the same programs)"
        )
    if c.tensor_parallel_size % c.nnodes:
        raise OptionError(
            "tensor_parallel_size",
            f"must be a multiple of nnodes={c.nnodes} (each process holds an equal share of the "
            f"devices), got {c.tensor_parallel_size}",
        )


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
