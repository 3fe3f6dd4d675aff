"""Paged decode attention for NVIDIA GPUs (Pallas, Triton lowering), split-K (flash-decoding).

One query token per sequence. Grid: (sequences, kv heads, splits). A program reads one kv head's
keys of one sequence, restricted to its split (a contiguous range of key positions), for all G
query heads of that kv head at once (query tile [max(16, g_pad), H]: `tl.dot` needs 16 rows).
Each split writes its unnormalized output with its running max and denominator; a few `jnp` ops
merge the splits afterwards:

    m = max_j m_j      w_j = exp(m_j - m)      out = sum_j w_j acc_j / sum_j w_j l_j

Why split: at batch 1-8 there are only S x K programs (8 for Llama-3-8B at batch 1) on a GPU
with 132 SMs; splitting the key axis gives every SM a share of the KV reads, which is all a
decode step's attention is. At batch 64 the split count drops to 1 (`block_sizes.decode_splits`).

Why Triton: see `ragged_gpu.py`. Keys outside [window start, kv_len) are never loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.block_sizes import GpuBlocks, decode_splits, gpu_blocks
from pallas_kernels.attention.ragged_gpu import check_shapes, online_softmax_step
from pallas_kernels.attention.reference import NEG_INF, decode_paged_attention_reference

reference = decode_paged_attention_reference

MIN_DOT_ROWS = 16


def _decode_kernel(
    kv_lens_ref,  # [S] int32
    pages_ref,  # [S, Pmax] int32
    q_ref,  # [S, K, M, H]
    k_ref,  # [P * Z, K, H]
    v_ref,  # [P * Z, K, H]
    acc_ref,  # [S, K, splits, M, H] float32
    m_ref,  # [S, K, splits, M] float32
    l_ref,  # [S, K, splits, M] float32
    *,
    page_size: int,
    block_kv: int,
    split_len: int,
    window: int | None,
    softcap: float | None,
):
    s, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = pages_ref.shape[1]
    rows, h = q_ref.shape[2], q_ref.shape[3]
    kv_len = kv_lens_ref[s]
    lo = jnp.int32(0) if window is None else jnp.maximum(kv_len - window, 0)
    start = jnp.maximum(lo, j * split_len)
    end = jnp.minimum(kv_len, (j + 1) * split_len)  # keys [start, end) of this split
    q = q_ref[s, kh, :, :]  # [M, H]
    lanes = jnp.arange(h, dtype=jnp.int32)[None, :]  # [1, H]

    def body(i, carry):
        k_pos = i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [C]
        k_ok = (k_pos >= start) & (k_pos < end)  # [C]
        page = pages_ref[s, jnp.minimum(k_pos // page_size, max_pages - 1)]  # [C]
        slot = (page * page_size + k_pos % page_size)[:, None]  # [C, 1]
        k = plgpu.load(k_ref.at[slot, kh, lanes], mask=k_ok[:, None], other=0.0)  # [C, H]
        v = plgpu.load(v_ref.at[slot, kh, lanes], mask=k_ok[:, None], other=0.0)  # [C, H]
        visible = jnp.broadcast_to(k_ok[None, :], (rows, block_kv))
        return online_softmax_step(q, k, v, visible, carry, softcap)

    init = (
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, h), jnp.float32),
    )
    first, stop = start // block_kv, (end + block_kv - 1) // block_kv
    m, denom, acc = jax.lax.fori_loop(first, jnp.maximum(first, stop), body, init)
    acc_ref[s, kh, j, :, :] = acc
    m_ref[s, kh, j, :] = m
    l_ref[s, kh, j, :] = denom


@functools.partial(
    jax.jit, static_argnames=("window", "softcap", "blocks", "num_splits", "interpret")
)
def paged_decode_attention(
    q: jax.Array,  # [S, N, H], one token per sequence, already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    kv_lens: jax.Array,  # [S] int32 (0 = unused row)
    page_indices: jax.Array,  # [S, Pmax] int32
    *,
    window: int | None = None,
    softcap: float | None = None,
    blocks: GpuBlocks | None = None,
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [S, N, H]
    """Attention of each sequence's newest token over its whole paged context.

    Args:
      q: [S, N, H] scaled queries, the token at position kv_lens[s] - 1 of each sequence.
      k_pages, v_pages: [P, Z, K, H] page pool, this step's keys/values already written.
      kv_lens: [S] keys per sequence; page_indices: [S, Pmax] its pages in order.
      window, softcap: as in `ragged_gpu.ragged_paged_attention`.
      blocks: tiles (default `gpu_blocks`); num_splits: split-K count (default
        `decode_splits`, from S, K and the longest possible context Pmax * Z).
      interpret: run on CPU through Pallas's interpreter (tests).
    """
    check_shapes(q, k_pages, v_pages)
    num_seqs, n, h = q.shape
    p, z, k, _ = k_pages.shape
    g = n // k
    blocks = blocks or gpu_blocks(h, g)
    rows = max(MIN_DOT_ROWS, blocks.g_pad)
    max_kv = page_indices.shape[1] * z
    splits = num_splits or decode_splits(num_seqs, k, max_kv, blocks.block_kv)
    split_len = -(-max_kv // (splits * blocks.block_kv)) * blocks.block_kv
    qk = jnp.pad(q.reshape(num_seqs, k, g, h), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    kernel = functools.partial(
        _decode_kernel,
        page_size=z,
        block_kv=blocks.block_kv,
        split_len=split_len,
        window=window,
        softcap=softcap,
    )
    part = (num_seqs, k, splits, rows)
    acc, m, denom = pl.pallas_call(
        kernel,
        grid=(num_seqs, k, splits),
        out_shape=(
            jax.ShapeDtypeStruct((*part, h), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
    )(kv_lens, page_indices, qk, k_pages.reshape(p * z, k, h), v_pages.reshape(p * z, k, h))
    m_all = m.max(axis=2, keepdims=True)  # [S, K, 1, M]
    w = jnp.exp(m - m_all)  # [S, K, splits, M]
    denom = (w * denom).sum(axis=2)  # [S, K, M]
    out = (w[..., None] * acc).sum(axis=2) / jnp.maximum(denom, 1e-30)[..., None]
    return out[:, :, :g].reshape(num_seqs, n, h).astype(q.dtype)
