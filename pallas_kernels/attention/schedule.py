"""The work list of the ragged kernels: the flat batch cut into query blocks, one per program.

Each sequence's run of query tokens is cut into blocks of at most `block_q` tokens; a block never
spans two sequences (they read different pages). Block b of the list is

    seq[b]       which sequence (row of kv_lens / page_indices)
    q_start[b]   first token of the block in the flat batch
    q_len[b]     tokens in the block (0: an unused entry past the end of the list)

    cu_q_lens = [0, 3, 4, 14]   block_q = 4   ->   (seq, q_start, q_len) =
                (0, 0, 3) (1, 3, 1) (2, 4, 4) (2, 8, 4) (2, 12, 2) (-, -, 0) ...

The list has a static length (a bound over all batches of this shape), so one compiled kernel
serves every step; entries past the end are skipped by the kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    seq: jax.Array  # [B] int32
    q_start: jax.Array  # [B] int32
    q_len: jax.Array  # [B] int32


def num_blocks_bound(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Most blocks any batch of this shape can need: sum over seqs of ceil(q_len / block_q)."""
    return max(1, min(num_tokens, -(-num_tokens // block_q) + num_seqs))


def query_blocks(cu_q_lens: jax.Array, num_tokens: int, block_q: int) -> BlockSchedule:
    """The static-length work list for `cu_q_lens` [S + 1]."""
    num_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    blocks_per_seq = (q_lens + block_q - 1) // block_q  # [S]
    ends = jnp.cumsum(blocks_per_seq)  # [S]
    b = jnp.arange(num_blocks_bound(num_tokens, num_seqs, block_q), dtype=jnp.int32)
    seq = jnp.searchsorted(ends, b, side="right").astype(jnp.int32)  # [B]; S past the end
    used = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    j = b - (ends[seq] - blocks_per_seq[seq])  # block index within its sequence
    q_start = cu_q_lens[seq] + j * block_q
    q_len = jnp.clip(cu_q_lens[seq + 1] - q_start, 0, block_q)
    q_len = jnp.where(used, q_len, 0)
    q_start = jnp.where(used, q_start, 0)
    return BlockSchedule(seq=seq, q_start=q_start.astype(jnp.int32), q_len=q_len.astype(jnp.int32))
