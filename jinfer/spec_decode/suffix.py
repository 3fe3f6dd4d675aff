"""Suffix decoding ("suffix"): drafts from a request's own tokens and from earlier outputs.

Agents repeat themselves across requests as well as within one: the same tool-call scaffolding,
the same plan, the file they wrote last turn. Each step, a request's latest tokens (up to
`suffix_decoding_max_tree_depth`) are looked up twice (`suffix_index.py`): in its own prompt
and output, and in the outputs of earlier requests of the same `cache_salt`; the lookup whose
path scores higher (the tokens a verification should expect to keep) drafts. A path is at most
`suffix_decoding_max_spec_factor` tokens per matched token (a long match earns a long draft)
and ends where its estimated probability falls under `suffix_decoding_min_token_prob`: how
often a continuation held before sets how far it is drafted now.

Earlier outputs: each finished request's output, after its prompt's last max_tree_depth tokens
(what the output's first tokens follow), joins its tenant's index. At most
`suffix_decoding_max_cached_requests` are kept across tenants, the least recently used (drafted
from, else added) leaving first: memory <= 8 bytes x (max_tree_depth + max_model_len) per
request kept, ~0.2 MB for a 24k-token context, and an index leaves with its last request. A
tenant's index never holds another's tokens: no salt drafts from a salted request's output,
nor one salt from another's.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from jinfer.config.speculative import SpeculativeConfig
from jinfer.scheduler.sequence import Sequence
from jinfer.spec_decode.suffix_index import SuffixIndex


@dataclasses.dataclass
class _Tenant:
    index: SuffixIndex = dataclasses.field(default_factory=SuffixIndex)
    starts: list[int] = dataclasses.field(default_factory=list)  # each document's, ascending
    ids: list[int] = dataclasses.field(default_factory=list)  # ... and its cache entry
    live: int = 0  # tokens of documents kept
    dead: int = 0  # tokens of documents erased (SEP until the index is rebuilt)


class OutputCache:
    """Earlier requests' outputs by `cache_salt`, at most `max_requests`, LRU."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self._tenants: dict[str | None, _Tenant] = {}
        # entry id -> (salt, start, end) of its document, least recently used first
        self._entries: collections.OrderedDict[int, tuple[str | None, int, int]] = (
            collections.OrderedDict()
        )
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return sum(t.live for t in self._tenants.values())

    def add(self, salt: str | None, tokens: np.ndarray) -> None:
        """Keeps `tokens` ([n] int32: an output after its prompt's tail) for `salt`'s requests."""
        if self.max_requests == 0 or len(tokens) < 2:
            return
        tenant = self._tenants.setdefault(salt, _Tenant())
        start = tenant.index.new_document()
        tenant.index.extend(tokens)
        entry, self._next_id = self._next_id, self._next_id + 1
        tenant.starts.append(start)
        tenant.ids.append(entry)
        tenant.live += len(tokens)
        self._entries[entry] = (salt, start, start + len(tokens))
        while len(self._entries) > self.max_requests:
            self._evict()

    def lookup(
        self,
        salt: str | None,
        pattern: np.ndarray,  # [P] int32, newest last
        max_len: int,
        limit: Callable[[int], int],  # drafts allowed for a match of m tokens
        min_prob: float,
    ) -> tuple[list[int], float]:
        """Drafts for `pattern` from `salt`'s outputs (see `SuffixDrafter`), and their score;
        the outputs they came from count as used."""
        tenant = self._tenants.get(salt)
        if tenant is None:
            return [], 0.0
        drafts, score, ends = tenant.index.draft(pattern, max_len, limit, min_prob)
        if drafts:
            docs = np.searchsorted(tenant.starts, ends, side="right") - 1
            for doc in np.unique(docs).tolist():
                entry = tenant.ids[doc]
                if entry in self._entries:
                    self._entries.move_to_end(entry)
        return drafts, score

    def _evict(self) -> None:
        entry, (salt, start, end) = self._entries.popitem(last=False)
        tenant = self._tenants[salt]
        tenant.index.erase(start, end)
        tenant.live -= end - start
        tenant.dead += end - start
        if tenant.live == 0:
            del self._tenants[salt]
        elif tenant.dead > max(tenant.live, 4096):  # rebuilt: O(live), at most every ~live
            self._rebuild(salt, tenant)

    def _rebuild(self, salt: str | None, old: _Tenant) -> None:
        new = _Tenant()
        for entry, start in zip(old.ids, old.starts, strict=True):
            kept = self._entries.get(entry)
            if kept is None:
                continue
            end = kept[2]
            at = new.index.new_document()
            new.index.extend(old.index.text[start:end])
            new.starts.append(at)
            new.ids.append(entry)
            new.live += end - start
            self._entries[entry] = (salt, at, at + end - start)  # (keeps its LRU place)
        self._tenants[salt] = new


class SuffixDrafter:
    """`propose(seq, k)` for the engine each step, `finish(seq)` when a request ends."""

    # The tree sets each draft's length (the match's length, the path's probability), as
    # vLLM's does: not paced by the last verification (a replay of SmolLM2's agentic sessions
    # took 7% more steps paced: docs/benchmarks.md, session 16).
    paced = False

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.depth = spec.suffix_decoding_max_tree_depth
        self.factor = spec.suffix_decoding_max_spec_factor
        self.min_prob = spec.suffix_decoding_min_token_prob
        self.outputs = OutputCache(spec.suffix_decoding_max_cached_requests)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        own = seq.drafter_state
        if own is None:  # the prompt, indexed once; each step adds the new tokens
            own = seq.drafter_state = SuffixIndex()
            own.new_document()
        known = own.size - 1
        if seq.num_known_tokens > known:
            own.extend(np.asarray(seq.token_slice(known, seq.num_known_tokens), np.int32))
        pattern = own.text[max(1, own.size - self.depth) :]  # [<= depth] the latest tokens

        def limit(m: int) -> int:
            return min(k, int(m * self.factor))

        drafts, score, _ = own.draft(pattern, self.depth, limit, self.min_prob)
        theirs, their_score = self.outputs.lookup(
            seq.params.cache_salt, pattern, self.depth, limit, self.min_prob
        )
        return theirs if their_score > score else drafts

    def finish(self, seq: Sequence) -> None:
        """`seq`'s output (after its prompt's tail) joins its tenant's earlier outputs."""
        seq.drafter_state = None
        output = seq.known_output_token_ids()
        if output:
            tail = seq.prompt_token_ids[-self.depth :]
            self.outputs.add(seq.params.cache_salt, np.asarray(tail + output, np.int32))
