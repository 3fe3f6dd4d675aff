"""The decoder's building blocks: RMSNorm, rotary embeddings, weight products, activations.

Free functions over arrays, shared by every model family (and, later, mixture-of-experts
layers). Dimension letters are declared in `config/model.py`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.config.model import ModelConfig
from jinfer.config.rope import RopeScaling


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32; `scale` is the full multiplier (Gemma's 1 + w folded in at load)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [H/2] (float32), with linear, Llama 3 or YaRN scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "yarn":
        return _yarn_frequencies(inv, head_dim, theta, scaling)
    # llama3: long wavelengths scaled by `factor`, short kept, a smooth ramp between.
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (1 - smooth) * inv / scaling.factor + smooth * inv
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, mid, scaled)


def _yarn_frequencies(
    inv: jax.Array, head_dim: int, theta: float, scaling: RopeScaling
) -> jax.Array:  # [H/2]
    """YaRN: dimensions that turn fewer than `beta_slow` times over the original context are
    interpolated (divided by factor), those turning more than `beta_fast` times kept, a linear
    ramp between (transformers' `_compute_yarn_parameters`)."""
    old = scaling.original_max_position_embeddings

    def dimension(rotations: float) -> float:  # the dimension turning `rotations` times
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return inv / scaling.factor * ramp + inv * (1 - ramp)


def rope_scale(scaling: RopeScaling | None) -> float:
    """What the rotated q and k are multiplied by (YaRN's attention factor; else 1)."""
    return scaling.attention_factor if scaling is not None and scaling.kind == "yarn" else 1.0


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
) -> jax.Array:
    """Rotary embedding, NeoX/HF layout (halves rotate), the result times `scale`.
    x: [T, heads, H], positions: [T]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :] * scale
    sin = jnp.sin(angles)[:, None, :] * scale
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# XLA:CPU's bfloat16 product of a single row (a GEMV) misses its fast path: [1, 576] x
# [576, 1536] takes 1.4 ms against 0.2 ms for 2 rows (float32, 1 row: 0.1 ms). Products of
# fewer rows are padded to this many on CPU (SmolLM2 in bfloat16, one stream decoding: 9.3 ->
# 25.8 tok/s; 4 or 8 rows: the same).
BF16_MIN_ROWS_CPU = 2


def dense(spec: str, x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """A weight product `jnp.einsum(spec, x, w)` accumulated in float32, returned in
    `out_dtype` (default: x's dtype). `spec` puts x's rows first (`"td,df->tf"`).

    Asking for the float32 result matters on CPU: XLA:CPU runs a bfloat16 product that returns
    bfloat16 on a slow generic path, and one that returns float32 on its fast one (AVX512-BF16 /
    AMX). [32, 576] x [576, 1536]: 35 against 330 GFLOP/s (float32 inputs: ~110). For float32
    inputs this is the plain product."""
    rows = x.shape[0]
    if x.dtype == jnp.bfloat16 and rows < BF16_MIN_ROWS_CPU and jax.default_backend() == "cpu":
        x = jnp.pad(x, [(0, BF16_MIN_ROWS_CPU - rows)] + [(0, 0)] * (x.ndim - 1))
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return out[:rows].astype(out_dtype or x.dtype)


def activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.hidden_act == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)
