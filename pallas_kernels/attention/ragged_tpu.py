"""Ragged paged attention for TPUs (Pallas, Mosaic TPU lowering): prefill chunks and decodes in
one call, decode being the one-query case.

Grid: one program per aligned block of `block_q` tokens of the flat batch (so output blocks never
overlap and the standard blocked out_spec applies). A block may hold the tail of one sequence,
several whole decodes and the head of a prefill chunk; the program loops over the sequences that
own any of its tokens:

    tokens   | s0 s0 s1 s2 | s2 s2 s2 s2 | s2 s3 -- -- |      block_q = 4
    program  0: s0, s1, s2   1: s2         2: s2, s3

For each sequence it walks the keys from the window start to its last query token in blocks of
`pages_per_block` pages, DMA'd from the HBM pool into VMEM (double-buffered: the next block's
pages are in flight while this one is computed), and updates an online softmax kept in VMEM
scratch for all rows of the block; rows of other sequences are masked out. Every kv head's G query
heads are one matmul: [block_q * G, H] x [H, keys].

Why whole pages: a page [Z, K, H] of the [P, Z, K, H] pool is contiguous, so one DMA per page
brings all kv heads. (JAX's TPU paged attention uses [K, P, Z, H], one DMA per page per head.)

Scalars (query runs, lengths, block tables) are prefetched into SMEM; block tables stay [R, Pmax]
with a row index per sequence, because the engine's padded batches have many more sequences
(one per padding token) than block-table rows. Tested on CPU with `pltpu.InterpretParams`
(simulated DMAs and semaphores, NaN-filled uninitialized VMEM, race detection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.block_sizes import tpu_pages_per_block
from pallas_kernels.attention.reference import NEG_INF, ragged_paged_attention_reference

reference = ragged_paged_attention_reference


def _ragged_kernel(
    # scalar prefetch (SMEM)
    cu_q_lens_ref,  # [S + 1] int32
    kv_lens_ref,  # [S] int32
    rows_ref,  # [S] int32: block-table row of each sequence
    tables_ref,  # [R * Pmax] int32 (flattened block tables)
    # inputs
    q_ref,  # [block_q, N, H] (VMEM block)
    k_hbm,  # [P, Z, K, H] (HBM)
    v_hbm,  # [P, Z, K, H] (HBM)
    # output
    o_ref,  # [block_q, N, H]
    # scratch
    k_buf,  # [2, pages_per_block, Z, K, H]
    v_buf,  # [2, pages_per_block, Z, K, H]
    sems,  # DMA semaphores [2, 2]: (k/v, buffer slot)
    m_ref,  # [K, M, 1] float32, M = block_q * G
    l_ref,  # [K, M, 1] float32
    acc_ref,  # [K, M, H] float32
    *,
    max_pages: int,
    window: int | None,
    softcap: float | None,
):
    i = pl.program_id(0)
    block_q, n, h = q_ref.shape
    _, ppb, z, k, _ = k_buf.shape
    g = n // k
    rows_m = block_q * g
    block_kv = ppb * z
    num_seqs = kv_lens_ref.shape[0]
    t0 = i * block_q
    m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    token = t0 + _div(jax.lax.broadcasted_iota(jnp.int32, (rows_m, 1), 0), g)  # [M, 1]

    def copies(seq, blk, slot):
        """The DMAs of key block `blk` of sequence `seq` into buffer `slot`."""
        out = []
        row = rows_ref[seq]
        for j in range(ppb):
            idx = jnp.minimum(blk * ppb + j, max_pages - 1)
            page = tables_ref[row * max_pages + idx]
            out.append(pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, j], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, j], sems.at[1, slot]))
        return out

    def seq_body(seq, _):
        start, end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        first_pos = kv_len - (end - start)  # position of the sequence's first query token
        lo_t, hi_t = jnp.maximum(start, t0), jnp.minimum(end, t0 + block_q)  # its rows here
        last_pos = first_pos + (hi_t - 1 - start)
        lo = jnp.int32(0)
        if window is not None:
            lo = jnp.maximum(first_pos + (lo_t - start) - window + 1, 0)
        q_pos = first_pos + (token - start)  # [M, 1]
        mine = (token >= lo_t) & (token < hi_t)  # [M, 1]
        first_blk, stop_blk = _div(lo, block_kv), _div(last_pos, block_kv) + 1

        @pl.when(hi_t > lo_t)
        def _():
            for c in copies(seq, first_blk, 0):
                c.start()

            def kv_body(blk, _):
                slot = jax.lax.rem(blk - first_blk, 2)

                @pl.when(blk + 1 < stop_blk)
                def _():
                    for c in copies(seq, blk + 1, 1 - slot):
                        c.start()

                for c in copies(seq, blk, slot):
                    c.wait()
                k_pos = blk * block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
                key_ok = (k_pos >= lo) & (k_pos < kv_len)  # [1, C]
                visible = mine & key_ok & (k_pos <= q_pos)  # [M, C]
                if window is not None:
                    visible &= k_pos > q_pos - window
                for kh in range(k):
                    keys = k_buf[slot, :, :, kh, :].reshape(block_kv, h)  # [C, H]
                    vals = v_buf[slot, :, :, kh, :].reshape(block_kv, h)  # [C, H]
                    _update(kh, keys, vals, key_ok, visible)
                return None

            jax.lax.fori_loop(first_blk, stop_blk, kv_body, None)

        return None

    def _update(kh, kk, vv, key_ok, visible):
        # Unloaded or foreign slots may hold anything (NaN): zero them before any arithmetic.
        kk = jnp.where(key_ok.reshape(-1, 1), kk, 0).astype(q_ref.dtype)  # [C, H]
        vv = jnp.where(key_ok.reshape(-1, 1), vv, 0).astype(q_ref.dtype)  # [C, H]
        q = q_ref[:, kh * g : (kh + 1) * g, :].reshape(rows_m, h)  # [M, H]
        s = jax.lax.dot_general(
            q, kk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [M, C]
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(visible, s, NEG_INF)
        m_prev = m_ref[kh]  # [M, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_ref[kh] = l_ref[kh] * corr + p.sum(axis=-1, keepdims=True)
        pv = jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)  # [M, H]
        acc_ref[kh] = acc_ref[kh] * corr + pv
        m_ref[kh] = m_new

    # Sequences owning tokens [t0, t0 + block_q): from the one holding t0 to the one holding
    # the block's last token (past-the-end tokens belong to no sequence and are skipped).
    first_seq = _seq_of(cu_q_lens_ref, num_seqs, t0)
    last_seq = _seq_of(cu_q_lens_ref, num_seqs, t0 + block_q - 1)
    jax.lax.fori_loop(first_seq, last_seq + 1, seq_body, None)
    for kh in range(k):
        out = acc_ref[kh] / jnp.maximum(l_ref[kh], 1e-30)  # [M, H]
        o_ref[:, kh * g : (kh + 1) * g, :] = out.reshape(block_q, g, h).astype(o_ref.dtype)


def _div(a, b: int):
    """Division of non-negative int32s. (`//` is floor division, which Mosaic lowers through
    `sign`, a rule that needs to know the TPU generation; for a, b >= 0 it equals truncation.)"""
    return jax.lax.div(a, jnp.int32(b))


def _seq_of(cu_q_lens_ref, num_seqs: int, t):
    """The sequence s with cu_q_lens[s] <= t < cu_q_lens[s + 1] (num_seqs - 1 past the end),
    by binary search over the SMEM copy."""

    def body(_, bounds):
        lo, hi = bounds  # invariant: cu[lo] <= t, answer in [lo, hi)
        mid = _div(lo + hi, 2)
        go_right = cu_q_lens_ref[mid] <= t
        return jnp.where(go_right, mid, lo), jnp.where(go_right, hi, mid)

    steps = max(1, num_seqs.bit_length())
    lo, _ = jax.lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(num_seqs)))
    return lo


@functools.partial(
    jax.jit, static_argnames=("window", "softcap", "block_q", "pages_per_block", "interpret")
)
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H], already scaled
    k_pages: jax.Array,  # [P, Z, K, H]
    v_pages: jax.Array,  # [P, Z, K, H]
    kv_lens: jax.Array,  # [S] int32
    page_indices: jax.Array,  # [R, Pmax] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    seq_rows: jax.Array | None = None,  # [S] int32: row of page_indices (default: s)
    *,
    window: int | None = None,
    softcap: float | None = None,
    block_q: int = 16,
    pages_per_block: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:  # [T, N, H]
    """Same contract as `ragged_gpu.ragged_paged_attention` (tokens past cu_q_lens[S] get
    zeros), plus `seq_rows`: sequences may share or skip block-table rows.

    block_q: tokens per program (16: a [16 * G, H] query tile; G >= 8 fills the MXU's rows).
    pages_per_block: pages per DMA'd key block (default `tpu_pages_per_block`: ~256 keys).
    interpret: False on TPU; `pltpu.InterpretParams(...)` (or True) on CPU.
    """
    t, n, h = q.shape
    p, z, k, hk = k_pages.shape
    if hk != h or n % k or k_pages.shape != v_pages.shape:
        raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape} / {v_pages.shape}")
    num_seqs = kv_lens.shape[0]
    rows, max_pages = page_indices.shape
    if seq_rows is None:
        seq_rows = jnp.arange(num_seqs, dtype=jnp.int32)
    ppb = pages_per_block or tpu_pages_per_block(z, k, h, jnp.dtype(k_pages.dtype).itemsize)
    ppb = min(ppb, max_pages)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    num_blocks = -(-t // block_q)
    qp = jnp.pad(q, ((0, num_blocks * block_q - t), (0, 0), (0, 0)))
    g = n // k
    block = pl.BlockSpec((block_q, n, h), lambda i, *_: (i, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(num_blocks,),
        in_specs=[block, hbm, hbm],
        out_specs=block,
        scratch_shapes=[
            pltpu.VMEM((2, ppb, z, k, h), k_pages.dtype),
            pltpu.VMEM((2, ppb, z, k, h), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((k, block_q * g, 1), jnp.float32),
            pltpu.VMEM((k, block_q * g, 1), jnp.float32),
            pltpu.VMEM((k, block_q * g, h), jnp.float32),
        ],
    )
    kernel = functools.partial(_ragged_kernel, max_pages=max_pages, window=window, softcap=softcap)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(cu_q_lens, kv_lens, seq_rows, page_indices.reshape(rows * max_pages), qp, k_pages, v_pages)
    return jnp.where((jnp.arange(t) < cu_q_lens[-1])[:, None, None], out[:t], 0)
