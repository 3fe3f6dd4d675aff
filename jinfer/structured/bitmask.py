"""Token masks: a batch's allowed tokens as packed bits, int32 [rows, ceil(V/32)] (token t is
bit t % 32 of word t // 32), filled on the host from each row's matcher and applied to the
logits on the device. A row without a constraint is all ones (-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par


def mask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate(rows: int, vocab_size: int) -> np.ndarray:
    """[rows, W] int32, every token allowed."""
    return np.full((rows, mask_width(vocab_size)), -1, np.int32)


class MaskFiller:
    """Fills the rows of constrained requests, in parallel on llguidance's own threads (it
    releases the GIL), so the host's share of a step stays small."""

    def __init__(self, num_threads: int | None = None) -> None:
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(self, bitmask: np.ndarray, rows: list[tuple[llguidance.LLMatcher, int]]) -> None:
        """Each (matcher, row) writes its allowed tokens into `bitmask[row]`; other rows keep
        what they hold."""
        if rows:
            fill_next_token_bitmask_par(self._executor, rows, bitmask)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [R, V] f32 with every token whose bit is 0 in bitmask [R, W] i32 set to -inf."""
    vocab = logits.shape[-1]
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [R, W, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, :vocab] != 0  # [R, V]
    return jnp.where(allowed, logits, -jnp.inf)


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """Host view of one row: bool [V]."""
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
