"""Ragged paged attention for NVIDIA GPUs (Pallas, Triton lowering): prefill chunks and decodes of
one step in one call.

Why Triton and not Mosaic GPU (checked on the H200 machine, jax 0.11.2): both lowerings import
and run there. JAX 0.11 deprecated the Triton backend (and the Pallas-Triton ops) in favour of
Mosaic GPU, so Mosaic GPU is where GPU Pallas is going. We still lower through Triton today:

- Paged attention is a gather: every key tile is read slot by slot through the block table.
  Triton loads a tile from a vector of row addresses with a mask in one instruction
  (`plgpu.load(ref.at[slots, head, :], mask=...)`), which is exactly this access pattern.
  Mosaic GPU wants TMA copies of rectangular tiles into shared memory and warpgroup-level
  layouts; a paged gather there is a pipeline of per-page TMA copies plus barriers: several
  times the code, and its `pl.pallas_call` entry point is itself deprecated for `plgpu.kernel`.
- The kernel body uses only portable Pallas (refs, `pl.ds`, `jnp`, `jnp` math);
  the two Triton-specific pieces are the masked load/store and `CompilerParams`. Porting to
  Mosaic GPU replaces those, and the reference and tests below stay as they are.
- No GPU is available when these kernels are written: the lowering with the smaller surface
  and the longest track record is the one most likely to be right on the first GPU run.

`scripts/gpu_check.sh` prints which Pallas GPU modules import and any deprecation warning, so a
JAX upgrade that removes Triton shows up there first; the XLA backend remains the fallback.

Grid: (query blocks, kv heads). A program owns `block_q` consecutive tokens of one sequence and
all `G` query heads that share one kv head: the query tile is [block_q * g_pad, H] (rows are
token-major, head-minor), so each key/value row read from the pool serves G query heads. It walks
the sequence's keys in tiles of `block_kv` from the window start to its last token with an
online softmax in float32. Keys outside [window start, last position] are never loaded (masked
loads), so pool pages a sequence does not own never reach the arithmetic even if they hold NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.block_sizes import GpuBlocks, gpu_blocks
from pallas_kernels.attention.reference import NEG_INF, ragged_paged_attention_reference
from pallas_kernels.attention.schedule import query_blocks

reference = ragged_paged_attention_reference


def online_softmax_step(
    q: jax.Array,  # [M, H]
    k: jax.Array,  # [C, H], zero where not loaded
    v: jax.Array,  # [C, H], zero where not loaded
    visible: jax.Array,  # [M, C] bool
    carry: tuple[jax.Array, jax.Array, jax.Array],  # m [M], l [M], acc [M, H] (float32)
    softcap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One key tile of flash attention; shared by the GPU ragged and decode kernels."""
    m_prev, l_prev, acc = carry
    f32 = q.dtype == jnp.float32
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=False if f32 else None)  # [M, C] float32
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m_prev, s.max(axis=-1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)  # [M, C]
    corr = jnp.exp(m_prev - m_new)
    l_new = l_prev * corr + p.sum(axis=-1)
    pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=False if f32 else None)  # [M, H]
    return m_new, l_new, acc * corr[:, None] + pv


def _ragged_kernel(
    seq_ref,  # [B] int32: sequence of each query block
    q_start_ref,  # [B] int32: first token of the block
    q_len_ref,  # [B] int32: tokens in the block (0 = unused entry)
    kv_lens_ref,  # [S] int32
    cu_q_lens_ref,  # [S + 1] int32
    pages_ref,  # [S, Pmax] int32
    q_ref,  # [K, T' * g_pad, H]  (T' = T + block_q)
    k_ref,  # [P * Z, K, H]
    v_ref,  # [P * Z, K, H]
    o_ref,  # [K, T' * g_pad, H]
    *,
    page_size: int,
    blocks: GpuBlocks,
    window: int | None,
    softcap: float | None,
):
    b, kh = pl.program_id(0), pl.program_id(1)
    block_m, g_pad, block_kv = blocks.block_m, blocks.g_pad, blocks.block_kv
    max_pages = pages_ref.shape[1]
    q_len = q_len_ref[b]

    @pl.when(q_len > 0)
    def _():
        seq, q_start = seq_ref[b], q_start_ref[b]
        seq_start = cu_q_lens_ref[seq]
        seq_q_len = cu_q_lens_ref[seq + 1] - seq_start
        first_pos = kv_lens_ref[seq] - seq_q_len + (q_start - seq_start)
        last_pos = first_pos + q_len - 1
        token = jnp.arange(block_m, dtype=jnp.int32) // g_pad  # [M] token of each row
        q_pos = first_pos + token  # [M]
        row_ok = token < q_len  # [M]
        q = q_ref[kh, pl.ds(q_start * g_pad, block_m), :]  # [M, H]
        lanes = jnp.arange(q.shape[-1], dtype=jnp.int32)[None, :]  # [1, H]
        lo = jnp.int32(0) if window is None else jnp.maximum(first_pos - window + 1, 0)

        def body(i, carry):
            k_pos = i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [C]
            k_ok = (k_pos >= lo) & (k_pos <= last_pos)  # [C]
            page = pages_ref[seq, jnp.minimum(k_pos // page_size, max_pages - 1)]  # [C]
            slot = (page * page_size + k_pos % page_size)[:, None]  # [C, 1]
            # All-array indices (a row gather); masked rows are never read.
            k = plgpu.load(k_ref.at[slot, kh, lanes], mask=k_ok[:, None], other=0.0)  # [C, H]
            v = plgpu.load(v_ref.at[slot, kh, lanes], mask=k_ok[:, None], other=0.0)  # [C, H]
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            if window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - window
            return online_softmax_step(q, k, v, visible, carry, softcap)

        init = (
            jnp.full((block_m,), NEG_INF, jnp.float32),
            jnp.zeros((block_m,), jnp.float32),
            jnp.zeros((block_m, q.shape[-1]), jnp.float32),
        )
        _, denom, acc = jax.lax.fori_loop(lo // block_kv, last_pos // block_kv + 1, body, init)
        out = acc / jnp.maximum(denom, 1e-30)[:, None]
        dst = o_ref.at[kh, pl.ds(q_start * g_pad, block_m), :]
        plgpu.store(dst, out.astype(o_ref.dtype), mask=row_ok[:, None])


def check_shapes(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array) -> None:
    t, n, h = q.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k/v pages must both be [P, Z, K, H]; got {k_pages.shape}, {v_pages.shape}"
        )
    _, _, k, hk = k_pages.shape
    if hk != h or n % k:
        raise ValueError(
            f"q {q.shape} does not fit pages {k_pages.shape}: need H equal, N % K == 0"
        )
    if h & (h - 1) or h < 16:
        raise ValueError(f"the GPU kernels need a power-of-two head_dim >= 16; got {h}")


@functools.partial(jax.jit, static_argnames=("window", "softcap", "blocks", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    kv_lens: jax.Array,  # [S] int32
    page_indices: jax.Array,  # [S, Pmax] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    *,
    window: int | None = None,
    softcap: float | None = None,
    blocks: GpuBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """Causal attention of each sequence's query run over its paged keys and values.

    Args:
      q: [T, N, H] queries, scaled by 1/sqrt(H) (or the model's scale) already.
      k_pages, v_pages: [P, Z, K, H] page pool; this step's keys/values are already written.
      kv_lens: [S] keys of each sequence after this step (0 for unused rows).
      page_indices: [S, Pmax] pages of each sequence in order.
      cu_q_lens: [S + 1] query run of sequence s is tokens cu_q_lens[s]:cu_q_lens[s + 1].
      window: sliding window (keys s > position - window), or None.
      softcap: logit soft-cap (cap * tanh(s / cap)), or None.
      blocks: tile sizes; by default `gpu_blocks(H, N // K)`.
      interpret: run on CPU through Pallas's interpreter (tests).
    Tokens past cu_q_lens[S] get zeros.
    """
    check_shapes(q, k_pages, v_pages)
    t, n, h = q.shape
    p, z, k, _ = k_pages.shape
    g = n // k
    blocks = blocks or gpu_blocks(h, g)
    g_pad, block_q = blocks.g_pad, blocks.block_q
    sched = query_blocks(cu_q_lens, t, block_q)
    # [T, N, H] -> [K, T' * g_pad, H]: a block's rows are contiguous and never run off the end.
    qk = q.reshape(t, k, g, h)
    qk = jnp.pad(qk, ((0, block_q), (0, 0), (0, g_pad - g), (0, 0)))
    qk = qk.transpose(1, 0, 2, 3).reshape(k, (t + block_q) * g_pad, h)
    kernel = functools.partial(
        _ragged_kernel, page_size=z, blocks=blocks, window=window, softcap=softcap
    )
    out = pl.pallas_call(
        kernel,
        grid=(sched.q_len.shape[0], k),
        out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
    )(
        sched.seq,
        sched.q_start,
        sched.q_len,
        kv_lens,
        cu_q_lens,
        page_indices,
        qk,
        k_pages.reshape(p * z, k, h),
        v_pages.reshape(p * z, k, h),
    )
    out = out.reshape(k, t + block_q, g_pad, h)[:, :t, :g].transpose(1, 0, 2, 3)
    out = out.reshape(t, n, h)
    return jnp.where((jnp.arange(t) < cu_q_lens[-1])[:, None, None], out, 0)
