"""The host half of the paged KV cache: which pages each request owns.

Pages are numbered 1..num_pages-1 (page 0 is the device's scratch page and never handed out).
Each page has a reference count, so that the prefix cache can share full pages between
requests: a page is free again only when its count drops to zero.

    seq.block_table = [7, 3, 12]      page_size Z = 16
    positions 0..15 -> page 7, 16..31 -> page 3, 32..47 -> page 12

With prefix caching (`prefix_cache.py`) every usable page is in exactly one of three states:

    referenced   ref > 0, in some block tables; may also be cached (then it is full, immutable)
    evictable    ref 0, cached: keeps its KV for a later hit until the allocator needs it
    free         ref 0, not cached: holds nothing anyone can ask for

Allocation takes free pages first and evicts the least recently used evictable page only when
none is left; both count as available (`num_free_pages`), so `usage` is the referenced share.

Verbs read as a protocol: `lookup` the cached prefix of a request being admitted,
`can_allocate` / `allocate` before computing tokens, `cache_full_pages` once they are computed,
`free` when a request finishes, is aborted or is preempted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Pages

import numpy as np

from jinfer.config.cache import SCRATCH_PAGE, pages_for
from jinfer.scheduler.prefix_cache import PrefixCache, extend_page_keys
from jinfer.scheduler.sequence import Sequence


class BlockManager:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (one is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.ref_counts = np.zeros(num_pages, np.int32)
        self.free_pages: deque[int] = deque(p for p in range(num_pages) if p != SCRATCH_PAGE)
        self.cache = PrefixCache(record_events) if enable_prefix_caching else None

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: free ones plus cached ones nobody references."""
        return len(self.free_pages) + (self.cache.num_evictable if self.cache else 0)

    @property
    def num_used_pages(self) -> int:
        """Pages referenced by requests (cached idle pages are reclaimable, so not counted)."""
        return self.num_usable_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by requests."""
        return self.num_used_pages / self.num_usable_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix-cache index, referenced or not (a gauge)."""
        return self.cache.num_cached_pages if self.cache else 0

    @property
    def num_evictions(self) -> int:
        """Cached pages taken back for other content since start (a counter)."""
        return self.cache.num_evictions if self.cache else 0

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def num_new_pages(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` still needs to hold its first `num_tokens` positions."""
        return max(0, self.pages_for(num_tokens) - len(seq.block_table))

    # ------------------------------------------------------------- prefix cache
    def lookup(self, seq: Sequence) -> list[int]:
        """Cached pages holding the longest prefix of `seq`'s tokens, for its admission.

        At most (num_tokens - 1) // Z pages: the last token is always computed (its logits pick
        the next token), and it must be written to a page of the request's own, never into a
        shared one. So a prompt of exactly k full pages reuses at most k - 1 of them.
        """
        if self.cache is None:
            return []
        assert not seq.num_placeholders, "a sequence is admitted once its tokens are known"
        max_pages = (seq.num_tokens - 1) // self.page_size
        keys = extend_page_keys(
            seq.page_keys, seq.all_token_ids(), self.page_size, seq.params.cache_salt, max_pages
        )
        return self.cache.match(keys[:max_pages])

    def cache_full_pages(self, seq: Sequence) -> None:
        """Indexes `seq`'s pages that are full and computed, generated tokens included."""
        if self.cache is None:
            return
        known = min(seq.num_computed_tokens, seq.num_known_tokens)  # placeholders: not yet
        num_full = min(known // self.page_size, len(seq.block_table))
        if num_full <= seq.num_indexed_pages:
            return
        keys = extend_page_keys(
            seq.page_keys, seq.all_token_ids(), self.page_size, seq.params.cache_salt, num_full
        )
        start = seq.num_indexed_pages
        stored = [
            i for i in range(start, num_full) if self.cache.insert(keys[i], seq.block_table[i])
        ]
        seq.num_indexed_pages = num_full
        if stored and self.cache.events is not None and seq.params.cache_salt is None:
            self._announce(seq, keys, stored)

    def _announce(self, seq: Sequence, keys: list[bytes], stored: list[int]) -> None:
        """KV events for pages `stored` (indices into `keys`), one per run of consecutive
        pages: a page another request indexed first was announced by it."""
        tokens = seq.all_token_ids()
        z = self.page_size
        runs: list[list[int]] = []
        for i in stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            parent = keys[run[0] - 1] if run[0] else None
            ids = tokens[run[0] * z : (run[-1] + 1) * z]
            self.cache.announce([keys[i] for i in run], parent, ids, z)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached page nobody is using (they become free). Pages in use stay
        cached until their requests end, then become evictable as usual; on an idle engine
        this forgets everything."""
        if self.cache is None:
            return
        self.free_pages.extend(self.cache.clear_idle())

    # --------------------------------------------------------------- allocation
    def can_allocate(self, seq: Sequence, num_tokens: int, cached: Pages[int] = ()) -> bool:
        """Whether `allocate(seq, num_tokens, cached)` would succeed."""
        return self._pages_needed(seq, num_tokens, cached) <= self.num_free_pages

    def _pages_needed(self, seq: Sequence, num_tokens: int, cached: Pages[int]) -> int:
        fresh = max(0, self.pages_for(num_tokens) - len(seq.block_table) - len(cached))
        revived = sum(1 for p in cached if self.ref_counts[p] == 0)  # taken off the LRU
        return fresh + revived

    def allocate(self, seq: Sequence, num_tokens: int, cached: Pages[int] = ()) -> None:
        """Grows `seq.block_table` to cover `num_tokens` positions: first the `cached` pages
        (a `lookup` result, shared read-only), then fresh ones."""
        needed = self._pages_needed(seq, num_tokens, cached)
        if needed > self.num_free_pages:
            raise RuntimeError(
                f"out of KV pages: request {seq.request_id} needs {needed}, "
                f"{self.num_free_pages} free"
            )
        if cached:
            if seq.block_table:
                raise RuntimeError("cached pages can only start an empty block table")
            for page in cached:
                if self.ref_counts[page] == 0:
                    self.cache.unpark(page)
                self.ref_counts[page] += 1
                seq.block_table.append(page)
            seq.num_indexed_pages = len(cached)
        for _ in range(self.num_new_pages(seq, num_tokens)):
            page = self.free_pages.popleft() if self.free_pages else self.cache.evict()
            self.ref_counts[page] = 1
            seq.block_table.append(page)

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references. Unreferenced cached pages stay cached, evictable; the
        tail goes first into the LRU order, so it is evicted before the shared head."""
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] < 0:
                raise RuntimeError(f"page {page} freed more often than allocated")
            if self.ref_counts[page] == 0:
                if self.cache is not None and self.cache.is_cached(page):
                    self.cache.park(page)
                else:
                    self.free_pages.append(page)
        seq.block_table = []
        seq.num_indexed_pages = 0

    # --------------------------------------------------------------- invariants
    def check_invariants(self, live: list[Sequence]) -> None:
        """Raises AssertionError unless the page accounting is exact:

        - reference counts equal the number of live block tables holding each page;
        - every usable page is exactly one of referenced (ref > 0), free (ref 0, uncached,
          on the free list once) or evictable (ref 0, cached, in the LRU once);
        - the index is a bijection between keys and pages; a page referenced twice is cached
          (only full, immutable pages are shared); a cached page in a live block table sits
          where its key says and is fully computed.
        """
        owned = np.zeros(self.num_pages, np.int32)
        for seq in live:
            for page in seq.block_table:
                owned[page] += 1
        free = np.zeros(self.num_pages, np.int32)
        for page in self.free_pages:
            free[page] += 1
        evictable = np.zeros(self.num_pages, np.int32)
        cached = np.zeros(self.num_pages, bool)
        if self.cache is not None:
            for page in self.cache.evictable:
                evictable[page] += 1
            cached[list(self.cache.key_of)] = True
            if any(self.cache.key_of.get(p) != k for k, p in self.cache.page_of.items()) or len(
                self.cache.page_of
            ) != len(self.cache.key_of):
                raise AssertionError("prefix index is not a key <-> page bijection")
        if free[SCRATCH_PAGE] or owned[SCRATCH_PAGE] or evictable[SCRATCH_PAGE]:
            raise AssertionError("scratch page was handed out")
        if np.any(self.ref_counts < 0):
            raise AssertionError(f"negative reference counts: {np.nonzero(self.ref_counts < 0)[0]}")
        if not np.array_equal(owned, self.ref_counts):
            raise AssertionError("reference counts disagree with the block tables")
        if np.any(free > 1) or np.any(evictable > 1):
            raise AssertionError("a page is on the free list or the LRU twice")
        for name, mask in (("free", free > 0), ("evictable", evictable > 0)):
            both = np.nonzero(mask & (owned > 0))[0]
            if both.size:
                raise AssertionError(f"pages both {name} and referenced: {both}")
        if np.any((free > 0) & cached):
            raise AssertionError(
                f"cached pages on the free list: {np.nonzero((free > 0) & cached)}"
            )
        if np.any((evictable > 0) & ~cached):
            raise AssertionError("uncached pages in the LRU")
        if np.any((evictable > 0) & (free > 0)):
            raise AssertionError("pages both free and evictable")
        accounted = int(free.sum()) + int(evictable.sum()) + int(np.count_nonzero(owned))
        if accounted != self.num_usable_pages:
            raise AssertionError("pages leaked: neither free, evictable nor referenced")
        shared = np.nonzero((owned > 1) & ~cached)[0]
        if shared.size:
            raise AssertionError(f"uncached pages shared between requests: {shared}")
        for seq in live:
            for i, page in enumerate(seq.block_table):
                if not cached[page]:
                    continue
                if i >= len(seq.page_keys) or self.cache.key_of[page] != seq.page_keys[i]:
                    raise AssertionError(f"{seq.request_id}: page {page} cached under another key")
                if (i + 1) * self.page_size > seq.num_computed_tokens:
                    raise AssertionError(f"{seq.request_id}: cached page {page} not computed")
