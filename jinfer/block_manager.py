"""The host half of the paged KV cache: which pages each request owns.

Pages are numbered 1..num_pages-1 (page 0 is the device's scratch page and never handed out).
Each page has a reference count, so that a later prefix cache can share full pages between
requests: a page returns to the free list only when its count drops to zero.

    seq.block_table = [7, 3, 12]      page_size Z = 16
    positions 0..15 -> page 7, 16..31 -> page 3, 32..47 -> page 12

Verbs read as a protocol: `can_allocate` / `allocate` before computing tokens, `free` when a
request finishes, is aborted or is preempted.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from jinfer.kv_cache import SCRATCH_PAGE
from jinfer.sequence import Sequence


class BlockManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (one is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.ref_counts = np.zeros(num_pages, np.int32)
        self.free_pages: deque[int] = deque(p for p in range(num_pages) if p != SCRATCH_PAGE)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def usage(self) -> float:
        """Fraction of usable pages in use."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_new_pages(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` still needs to hold its first `num_tokens` positions."""
        return max(0, self.pages_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_pages(seq, num_tokens) <= self.num_free_pages

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows `seq.block_table` to cover `num_tokens` positions."""
        needed = self.num_new_pages(seq, num_tokens)
        if needed > self.num_free_pages:
            raise RuntimeError(
                f"out of KV pages: request {seq.request_id} needs {needed}, "
                f"{self.num_free_pages} free"
            )
        for _ in range(needed):
            page = self.free_pages.popleft()
            self.ref_counts[page] = 1
            seq.block_table.append(page)

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references; pages nobody references go back to the free list."""
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] < 0:
                raise RuntimeError(f"page {page} freed more often than allocated")
            if self.ref_counts[page] == 0:
                self.free_pages.append(page)
        seq.block_table = []

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every usable page is either free (count 0) or owned, and owned as often as counted."""
        owned = np.zeros(self.num_pages, np.int32)
        for seq in live:
            for page in seq.block_table:
                owned[page] += 1
        free = np.zeros(self.num_pages, np.int32)
        for page in self.free_pages:
            free[page] += 1
        if free[SCRATCH_PAGE] or owned[SCRATCH_PAGE]:
            raise AssertionError("scratch page was handed out")
        if np.any(free > 1):
            raise AssertionError(f"pages on the free list twice: {np.nonzero(free > 1)[0]}")
        if not np.array_equal(owned, self.ref_counts):
            raise AssertionError("reference counts disagree with the block tables")
        both = np.nonzero((free > 0) & (owned > 0))[0]
        if both.size:
            raise AssertionError(f"pages both free and owned: {both}")
        if int(free.sum()) + int(np.count_nonzero(owned)) != self.num_usable_pages:
            raise AssertionError("pages leaked: neither free nor owned")
