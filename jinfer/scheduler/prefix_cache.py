"""Automatic prefix caching: the index of full KV pages that are worth keeping after use.

Multi-turn chat and agents resend everything they sent before plus a little more. Every *full*
page of a request's tokens gets a key chained from the key of the page before it:

    root   = H("jinfer-prefix-v1", cache_salt)
    key[0] = H(root,     tokens[0 : Z])            Z = page size
    key[i] = H(key[i-1], tokens[i*Z : (i+1)*Z])

so a key names the whole token prefix up to the end of its page, and the salt. With one model
per engine the tokens and the salt are all that determine a page's KV: equal keys, equal KV.
H is BLAKE2b (256 bits): a collision would silently hand a request someone else's KV, so the
key is a cryptographic digest, not Python's `hash()`.

A new request reuses the longest run of leading pages whose keys are in the index and computes
only the rest. Only full pages whose KV has been computed are indexed, and nothing writes to a
position below a request's `num_computed_tokens` again, so an indexed page is immutable: sharing
needs no copy on write. A partial last page is never indexed, hence never shared.

Pages nobody references stay indexed (their KV intact) in least-recently-used order; the
allocator takes them back, oldest first, only when no never-cached page is left. Taking one
back drops its key: that is an eviction. Pages in use are never evicted.

KV cache events (`record_events`): the index's changes as vLLM's KV-event publisher names them,
for a KV-aware router: `BlockStored` (pages indexed: their keys, the key before them, their
tokens), `BlockRemoved` (keys dropped: evicted or reset). Pages of requests with a `cache_salt`
are never announced: a tenant's prompts stay private from the router too.

Isolation between tenants: a cached page's KV is reachable only through its key, and only a
request carrying the same salt and the same tokens up to the end of that page can produce the
key. So a request reads only pages it wrote itself or pages whose full content (and salt) it
already holds; tenants with different `cache_salt` values never share a page, and cannot time
each other's hits. A page handed out again still holds its last owner's KV, but attention masks
every slot past the new owner's own length, and each slot below it the new owner wrote itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

PageKey = bytes

_DIGEST_SIZE = 32


def root_key(cache_salt: str | None) -> PageKey:
    """The chain's start: separates requests that must not share (different salts)."""
    h = hashlib.blake2b(b"jinfer-prefix-v1", digest_size=_DIGEST_SIZE)
    if cache_salt is not None:
        h.update(b"\x00salt\x00" + cache_salt.encode("utf-8"))
    return h.digest()


def extend_page_keys(
    keys: list[PageKey],
    token_ids: list[int],
    page_size: int,
    cache_salt: str | None,
    num_pages: int,
) -> list[PageKey]:
    """Appends to `keys` (in place) until it holds the keys of the first `num_pages` full pages
    of `token_ids`, and returns it. Keys already there are kept: token lists only grow."""
    num_pages = min(num_pages, len(token_ids) // page_size)
    if len(keys) >= num_pages:
        return keys
    start = len(keys)
    ids = np.asarray(token_ids[start * page_size : num_pages * page_size], "<i4")  # [n * Z]
    parent = keys[-1] if keys else root_key(cache_salt)
    for i in range(num_pages - start):
        h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE)
        h.update(ids[i * page_size : (i + 1) * page_size].tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Key <-> page index over the pool, plus the LRU order of cached pages nobody references.

    The allocator (`BlockManager`) owns reference counts; it tells the index when a cached
    page's count drops to zero (`park`) or rises from zero (`unpark`), and asks it for the
    least recently used unreferenced page when it must evict (`evict`).
    """

    def __init__(self, record_events: bool = False) -> None:
        self.page_of: dict[PageKey, int] = {}
        self.key_of: dict[int, PageKey] = {}
        # Cached pages with reference count 0, least recently used first. An OrderedDict gives
        # O(1) removal from the middle when a hit revives a page.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0
        # KV cache events not yet taken (None: not recorded), and the keys announced stored.
        self.events: list[dict[str, Any]] | None = [] if record_events else None
        self._announced: set[PageKey] = set()

    @property
    def num_cached_pages(self) -> int:
        return len(self.key_of)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    def is_cached(self, page: int) -> bool:
        return page in self.key_of

    def match(self, keys: list[PageKey]) -> list[int]:
        """Pages of the longest run of leading `keys` that are all in the index."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, key: PageKey, page: int) -> bool:
        """Indexes a full, computed, referenced page. False (and no change) when the key is
        already cached elsewhere: two requests computed the same page; the first one is kept."""
        if key in self.page_of:
            return False
        if page in self.key_of:
            raise RuntimeError(f"page {page} is already cached under another key")
        self.page_of[key] = page
        self.key_of[page] = key
        return True

    def announce(
        self, keys: list[PageKey], parent: PageKey | None, token_ids: list[int], page_size: int
    ) -> None:
        """Records a run of pages just indexed, in order: `keys` (each in the index), the key of
        the page before the first (None: the run starts the prompt), their tokens."""
        if self.events is None or not keys:
            return
        self.events.append(
            {
                "type": "BlockStored",
                "block_hashes": list(keys),
                "parent_block_hash": parent,
                "token_ids": [int(t) for t in token_ids],
                "block_size": page_size,
                "lora_id": None,
                "medium": None,  # the device's memory (vLLM's "GPU" tier)
                "lora_name": None,
            }
        )
        self._announced.update(keys)

    def take_events(self) -> list[dict[str, Any]]:
        """The events recorded since the last call, oldest first."""
        if not self.events:
            return []
        events, self.events = self.events, []
        return events

    def _removed(self, keys: list[PageKey]) -> None:
        if self.events is None:
            return
        gone = [k for k in keys if k in self._announced]
        if gone:
            self._announced.difference_update(gone)
            self.events.append({"type": "BlockRemoved", "block_hashes": gone, "medium": None})

    def park(self, page: int) -> None:
        """A cached page lost its last reference: it becomes evictable, most recently used."""
        self.evictable[page] = None

    def unpark(self, page: int) -> None:
        """A cache hit revived an unreferenced page: it is no longer evictable."""
        del self.evictable[page]

    def evict(self) -> int:
        """Drops the least recently used unreferenced page from the index and returns it."""
        page, _ = self.evictable.popitem(last=False)
        key = self.key_of.pop(page)
        del self.page_of[key]
        self.num_evictions += 1
        self._removed([key])
        return page

    def clear_idle(self) -> list[int]:
        """Forgets the keys of every page nobody references and returns those pages (now plain
        free pages). Pages in use keep their keys: a page shared by two requests must stay
        known as a full, immutable cached page until its last user lets go."""
        freed = list(self.evictable)
        keys = [self.key_of.pop(page) for page in freed]
        for key in keys:
            del self.page_of[key]
        self.evictable.clear()
        self._removed(keys)
        return freed
