"""The decoder forward pass: free functions over `Params`, config-driven.

One code path covers the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM2) and Gemma 3
(sliding/global layers with their own rope bases, QK-norm, sandwich norms, scaled embeddings,
GeGLU, soft-caps). Dimension letters are declared in `config.py`.

The model reads and writes the paged KV cache but knows nothing of requests: the runner hands
it a flat token batch and `AttentionMetadata`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jinfer.attention import paged_attention, write_kv
from jinfer.attention.kv_cache import KVCache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.config.model import LayerKind, ModelConfig, RopeScaling
from jinfer.models.params import LayerParams, Params


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32; `scale` is the full multiplier (Gemma's 1 + w folded in at load)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [H/2] (float32), with linear or Llama 3 scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, NeoX/HF layout (halves rotate). x: [T, heads, H], positions: [T]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
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


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.hidden_act == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def attention_block(
    cfg: ModelConfig,
    kind: LayerKind,
    p: LayerParams,
    x: jax.Array,  # [T, D]
    k_pages: jax.Array,  # one layer's pools, in the layout of meta.backend (kv_cache.py)
    v_pages: jax.Array,
    meta: AttentionMetadata,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = dense("td,dnh->tnh", x, p.wq)  # [T, N, H]
    k = dense("td,dkh->tkh", x, p.wk)  # [T, K, H]
    v = dense("td,dkh->tkh", x, p.wv)  # [T, K, H]
    if p.bq is not None:
        q, k, v = q + p.bq, k + p.bk, v + p.bv
    if p.q_norm is not None:
        q = rms_norm(q, p.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, p.k_norm, cfg.rms_norm_eps)
    inv_freq = rope_frequencies(cfg.head_dim, kind.rope_theta, kind.rope_scaling)
    q = apply_rope(q, meta.positions, inv_freq)
    k = apply_rope(k, meta.positions, inv_freq)
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta)
    out = paged_attention(
        q * jnp.asarray(cfg.scale, q.dtype),
        k_pages,
        v_pages,
        meta,
        window=kind.window,
        softcap=cfg.attn_logit_softcap,
    )  # [T, N, H]
    # As one [T, N*H] x [N*H, D] product: with the einsum over (n, h) XLA:CPU laid the
    # attention output out h-major and so transposed the whole weight on every step
    # (SmolLM2: 1.3 MB per layer, ~0.15 ms of a 1.3 ms one-token layer).
    t, n, h = out.shape
    return dense("tf,fd->td", out.reshape(t, n * h), p.wo.reshape(n * h, -1)), k_pages, v_pages


def mlp_block(cfg: ModelConfig, p: LayerParams, x: jax.Array) -> jax.Array:
    gate = _activation(cfg, dense("td,df->tf", x, p.w_gate))  # [T, F]
    return dense("tf,fd->td", gate * dense("td,df->tf", x, p.w_up), p.w_down)  # [T, D]


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:  # [T, D]
    x = params.embed[tokens]  # [T, D]
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    return x


def decoder_layer(
    cfg: ModelConfig,
    kind: LayerKind,
    p: LayerParams,
    x: jax.Array,  # [T, D]
    k_pages: jax.Array,  # one layer's pools (see attention_block)
    v_pages: jax.Array,
    meta: AttentionMetadata,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # x [T, D], updated k_pages, v_pages
    h = rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    h, k_pages, v_pages = attention_block(cfg, kind, p, h, k_pages, v_pages, meta)
    if p.post_attn_norm is not None:
        h = rms_norm(h, p.post_attn_norm, cfg.rms_norm_eps)
    x = x + h
    h = mlp_block(cfg, p, rms_norm(x, p.mlp_norm, cfg.rms_norm_eps))
    if p.post_mlp_norm is not None:
        h = rms_norm(h, p.post_mlp_norm, cfg.rms_norm_eps)
    return x + h, k_pages, v_pages


def logits_head(
    params: Params,
    cfg: ModelConfig,
    x: jax.Array,  # [T, D]
    logits_idx: jax.Array,  # [B] int32: which tokens produce next-token logits
) -> jax.Array:  # [B, V] float32
    x = rms_norm(x[logits_idx], params.final_norm, cfg.rms_norm_eps)  # [B, D]
    if params.lm_head is None:
        logits = dense("bd,vd->bv", x, params.embed, jnp.float32)  # [B, V]
    else:
        logits = dense("bd,dv->bv", x, params.lm_head, jnp.float32)
    if cfg.final_logit_softcap is not None:
        cap = cfg.final_logit_softcap
        logits = cap * jnp.tanh(logits / cap)
    return logits


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,  # [T] int32
    meta: AttentionMetadata,
    cache: KVCache,
    logits_idx: jax.Array,  # [B] int32: which tokens produce next-token logits
) -> tuple[jax.Array, KVCache]:  # logits [B, V] float32, updated cache
    """The whole step as one program: embed, every layer, the logits of `logits_idx`."""
    x = embed(params, cfg, tokens)
    new_k, new_v = [], []
    for i, p in enumerate(params.layers):
        x, k_pages, v_pages = decoder_layer(
            cfg, cfg.layer_kind(i), p, x, cache.k[i], cache.v[i], meta
        )
        new_k.append(k_pages)
        new_v.append(v_pages)
    return logits_head(params, cfg, x, logits_idx), KVCache(
        k=tuple(new_k), v=tuple(new_v), layout=cache.layout
    )
