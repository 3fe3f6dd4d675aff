"""Prompt lookup ("ngram"): a request's next tokens drafted from its own context.

Coding agents write what they have read: an edited file repeats the original, a tool call
repeats a path. If the request's last n tokens occurred before in its prompt or output, the
tokens that followed that occurrence are a likely continuation. The longest n in
[prompt_lookup_min, prompt_lookup_max] with a match wins, and among its matches the most recent
(vLLM's and llama.cpp's rule). Host-side numpy, a few microseconds per request for contexts of
thousands of tokens: off the device's critical path.
"""

from __future__ import annotations

import numpy as np

from jinfer.config.speculative import SpeculativeConfig
from jinfer.scheduler.sequence import Sequence


class NgramDrafter:
    """`propose(seq, k)` for the engine each step; nothing kept between steps."""

    # A match says nothing of how far its continuation holds: the engine paces each request's
    # drafts by its last verification (`verify.propose`).
    paced = True

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return propose(np.asarray(seq.all_token_ids(), np.int32), k, self.min_n, self.max_n)

    def finish(self, seq: Sequence) -> None:
        pass


def propose(
    tokens: np.ndarray,  # [S] int32: the request's prompt and known output
    k: int,  # drafts wanted, at most
    min_n: int,
    max_n: int,
) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest suffix
    of `tokens` (of min_n..max_n tokens) that occurs earlier; [] when none does."""
    s = len(tokens)
    for n in range(min(max_n, s - 1), min_n - 1, -1):
        suffix = tokens[s - n :]
        # Windows starting at 0 .. s - n - 1 (the suffix itself excluded), newest first.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: s - 1], n)
        hits = np.flatnonzero(np.all(windows == suffix, axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # what followed the newest match
            return tokens[start : start + k].tolist()
    return []
