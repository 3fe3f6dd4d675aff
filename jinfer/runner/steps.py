"""The model's jitted entry points: one program per token bucket, or per bucket and layer kind.

The model compiles apart from the sampler (`sample/sampler.py`): a new sampling variant costs a
small compile, never a recompile of the model. The programs are module-level, so engines with
the same config and shapes share them. They take the step's small inputs packed
(`packing.py`): one int32 and one float32 buffer per call instead of ~30 separate host-to-device
copies. The cache is donated to every program: the page pool is updated in place, never copied.

A step may compute tokens the previous step sampled and the host has not read yet (async
scheduling): the host leaves them as placeholders and says where each comes from (`prev_idx`,
an index into the previous sampler's `next_tokens`, or -1), and the step takes them from the
device. Every step takes `next_tokens`, so the programs do not depend on whether it does.

    tokens     [T]  int32   the host's tokens; PLACEHOLDER where the host does not know them
    prev_idx   [T]  int32   the row of the previous step's `next_tokens` to take instead, or -1
    prev_tokens [R] int32   the previous step's sampled tokens (any [R] array when unused)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention.kv_cache import KVCache
from jinfer.config.model import LayerKind, ModelConfig
from jinfer.models import decoder
from jinfer.models.params import Params
from jinfer.runner import packing


def _tokens(tokens: jax.Array, prev_idx: jax.Array, prev_tokens: jax.Array) -> jax.Array:
    """The step's tokens [T], those still on the device taken from the previous step."""
    return jnp.where(prev_idx >= 0, prev_tokens[jnp.maximum(prev_idx, 0)], tokens)


# compile_unit="step": the whole forward pass of a bucket as one program, the cache donated.
def _forward_packed(params, cfg, layout, ibuf, fbuf, prev_tokens, cache):
    tokens, prev_idx, meta, logits_idx = packing.unpack(layout, ibuf, fbuf)
    tokens = _tokens(tokens, prev_idx, prev_tokens)
    return decoder.forward(params, cfg, tokens, meta, cache, logits_idx)


_forward_step = jax.jit(_forward_packed, static_argnums=(1, 2), donate_argnums=(6,))


# compile_unit="layer": the same step as one program per layer kind (plus embed and head), run
# layer by layer from Python. Each program is ~1/L of the whole step, and every layer of a kind
# shares it, so warm-up compiles (and a restart loads) ~L times less code.
def _embed_packed(edge_params, cfg, layout, ibuf, fbuf, prev_tokens):
    tokens, prev_idx, _, _ = packing.unpack(layout, ibuf, fbuf)
    return decoder.embed(edge_params, cfg, _tokens(tokens, prev_idx, prev_tokens))


def _layer_packed(p, cfg, kind, layout, ibuf, fbuf, x, k_pages, v_pages):
    _, _, meta, _ = packing.unpack(layout, ibuf, fbuf)
    return decoder.decoder_layer(cfg, kind, p, x, k_pages, v_pages, meta)


def _head_packed(edge_params, cfg, layout, ibuf, fbuf, x):
    _, _, _, logits_idx = packing.unpack(layout, ibuf, fbuf)
    return decoder.logits_head(edge_params, cfg, x, logits_idx)


_embed_step = jax.jit(_embed_packed, static_argnums=(1, 2))
_layer_step = jax.jit(_layer_packed, static_argnums=(1, 2, 3), donate_argnums=(7, 8))
_head_step = jax.jit(_head_packed, static_argnums=(1, 2))


def forward(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    layout: packing.Layout,  # of the step's inputs (tokens [T], prev_idx [T],
    ibuf: np.ndarray,  # [Ni] int32     AttentionMetadata, logits_idx [rows]), packed
    fbuf: np.ndarray,  # [Nf] float32   on the host: `packing.pack`
    prev_tokens: jax.Array,  # [R] int32: the previous step's sampled tokens, on the device
    compile_unit: str,  # "step" or "layer"
    layer_kinds: tuple[LayerKind, ...],  # cfg.layer_kind(i) of every layer, for "layer"
    num_layers: int | None = None,  # layer programs: run only the first n layers (warm-up)
) -> tuple[jax.Array, KVCache]:  # logits [rows, V] float32, the updated cache
    """Dispatches one step's forward pass (it returns before the device is done). The runner
    packs the inputs, so a process group's followers get the very buffers it runs."""
    if compile_unit == "step":
        return _forward_step(params, cfg, layout, ibuf, fbuf, prev_tokens, cache)
    ibuf, fbuf = jax.device_put((ibuf, fbuf))  # once, not once per layer
    edges = dataclasses.replace(params, layers=())  # embed, final norm, lm_head
    x = _embed_step(edges, cfg, layout, ibuf, fbuf, prev_tokens)  # [T, D]
    ks, vs = list(cache.k), list(cache.v)
    for i, p in enumerate(params.layers[:num_layers]):
        x, ks[i], vs[i] = _layer_step(p, cfg, layer_kinds[i], layout, ibuf, fbuf, x, ks[i], vs[i])
    cache = KVCache(k=tuple(ks), v=tuple(vs), layout=cache.layout)
    return _head_step(edges, cfg, layout, ibuf, fbuf, x), cache


def lower(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    inputs: tuple,  # as `forward` takes them
    prev_tokens: jax.Array | jax.ShapeDtypeStruct,
    compile_unit: str,
    layer_kinds: tuple[LayerKind, ...],
    lowering_platform: str,  # "cpu", "cuda", "rocm" or "tpu"
) -> dict[str, jax.stages.Lowered]:
    """The programs `forward` runs for these inputs, lowered for `lowering_platform` and not
    compiled (any machine can lower for any platform): the whole step, or the embedding, one
    program per layer kind and the head."""
    layout, ibuf, fbuf = packing.pack(inputs)
    on = dict(lowering_platforms=(lowering_platform,))
    if compile_unit == "step":
        args = (params, cfg, layout, ibuf, fbuf, prev_tokens, cache)
        return {"step": _forward_step.trace(*args).lower(**on)}
    edges = dataclasses.replace(params, layers=())
    x = jax.ShapeDtypeStruct((len(inputs[0]), cfg.hidden_size), params.embed.dtype)  # [T, D]
    out = {"embed": _embed_step.trace(edges, cfg, layout, ibuf, fbuf, prev_tokens).lower(**on)}
    for i, kind in enumerate(layer_kinds):
        name = f"layer (window {kind.window})"
        if name not in out:
            args = (params.layers[i], cfg, kind, layout, ibuf, fbuf, x, cache.k[i], cache.v[i])
            out[name] = _layer_step.trace(*args).lower(**on)
    out["head"] = _head_step.trace(edges, cfg, layout, ibuf, fbuf, x).lower(**on)
    return out
