"""The decoder forward pass: free functions over `Params`, config-driven.

One code path covers the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM2; the sparse
layers of Qwen3-MoE, Mixtral and gpt-oss run `moe_block`, gpt-oss's attention has sinks, biases
and YaRN rope) and Gemma 3
(sliding/global layers with their own rope bases, QK-norm, sandwich norms, scaled embeddings,
GeGLU, soft-caps), from the blocks of `layers.py`. Dimension letters are declared in
`config/model.py`.

The model reads and writes the paged KV cache but knows nothing of requests: the runner hands
it a flat token batch and `AttentionMetadata`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.attention import paged_attention, write_kv
from jinfer.attention.kv_cache import KVCache
from jinfer.attention.metadata import AttentionMetadata
from jinfer.config.model import LayerKind, ModelConfig
from jinfer.models.layers import (
    activation,
    apply_rope,
    dense,
    rms_norm,
    rope_frequencies,
    rope_scale,
)
from jinfer.models.moe import moe_block
from jinfer.models.params import LayerParams, Params


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
    scale = rope_scale(kind.rope_scaling)
    q = apply_rope(q, meta.positions, inv_freq, scale)
    k = apply_rope(k, meta.positions, inv_freq, scale)
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta)
    out = paged_attention(
        q * jnp.asarray(cfg.scale, q.dtype),
        k_pages,
        v_pages,
        meta,
        window=kind.window,
        softcap=cfg.attn_logit_softcap,
        sinks=p.sinks,
    )  # [T, N, H]
    # As one [T, N*H] x [N*H, D] product: with the einsum over (n, h) XLA:CPU laid the
    # attention output out h-major and so transposed the whole weight on every step
    # (SmolLM2: 1.3 MB per layer, ~0.15 ms of a 1.3 ms one-token layer).
    t, n, h = out.shape
    out = dense("tf,fd->td", out.reshape(t, n * h), p.wo.reshape(n * h, -1))  # [T, D]
    if p.bo is not None:
        out = out + p.bo
    return out, k_pages, v_pages


def mlp_block(cfg: ModelConfig, p: LayerParams, x: jax.Array) -> jax.Array:
    gate = activation(cfg, dense("td,df->tf", x, p.w_gate))  # [T, F]
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
    h = rms_norm(x, p.mlp_norm, cfg.rms_norm_eps)
    h = moe_block(cfg, p, h, meta.platform) if kind.moe else mlp_block(cfg, p, h)
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
