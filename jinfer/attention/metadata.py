"""`AttentionMetadata`: where each token of a step sits, as the attention backends read it."""

from __future__ import annotations

import dataclasses

import jax

from jinfer.attention.backend import AttentionBackend


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    positions: jax.Array  # [T] int32
    seq_ids: jax.Array  # [T] int32: row of block_tables (padding -> 0)
    # [T] int32: flat cache slot to write. Padding -> the scratch page, which is also how
    # attention tells padding from real tokens and skips it.
    slot_mapping: jax.Array
    block_tables: jax.Array  # [R, Pmax] int32
    backend: AttentionBackend = dataclasses.field(metadata=dict(static=True))
    # Query blocks of the prefill region (the batch's last NB * Bq tokens); None: no blocks.
    block_rows: jax.Array | None = None  # [NB] int32: block-table row of each block (padding -> 0)
    block_lens: jax.Array | None = None  # [NB] int32: real tokens at the block's front (0..Bq)
    query_block: int = dataclasses.field(default=16, metadata=dict(static=True))  # Bq
    # What the host knew when it planned the step, so that the device never branches on it:
    # the platform the step is compiled for (its kernels are chosen for it; None: the default
    # backend's), and whether every token is its request's only token of the step (a
    # decode-only step: backends with a decode kernel take it, `AttentionBackend.decode_kernel`).
    platform: str | None = dataclasses.field(default=None, metadata=dict(static=True))
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_blocked_tokens(self) -> int:
        """NB * Bq: how many tokens at the end of the batch the blocked path takes (static)."""
        return 0 if self.block_rows is None else self.block_rows.shape[0] * self.query_block
