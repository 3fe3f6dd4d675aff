"""Property tests: whatever happens, no page is leaked or owned twice."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.block_manager import BlockManager
from jinfer.scheduler.sequence import Sequence

ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "append", "free", "abort"]),
        st.integers(0, 7),
        st.integers(1, 40),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(num_pages=st.integers(2, 24), page_size=st.sampled_from([1, 4, 16]), steps=ops)
def test_no_page_is_leaked_or_owned_twice(num_pages, page_size, steps):
    bm = BlockManager(num_pages, page_size)
    seqs = [Sequence(str(i), [1], SamplingParams(), seed=0, arrival=i) for i in range(8)]
    lengths = [0] * 8
    for op, i, n in steps:
        seq = seqs[i]
        if op in ("allocate", "append"):
            target = lengths[i] + (n if op == "allocate" else 1)
            if bm.can_allocate(seq, target):
                bm.allocate(seq, target)
                lengths[i] = target
            else:
                with pytest.raises(RuntimeError, match="out of KV pages"):
                    bm.allocate(seq, target)
        else:  # free and abort both hand everything back
            bm.free(seq)
            lengths[i] = 0
        assert len(seq.block_table) == bm.pages_for(lengths[i])
        bm.check_invariants(seqs)
    for seq in seqs:
        bm.free(seq)
    bm.check_invariants(seqs)
    assert bm.num_free_pages == num_pages - 1


def test_scratch_page_is_never_handed_out():
    bm = BlockManager(5, 2)
    seq = Sequence("a", [1], SamplingParams(), seed=0, arrival=0)
    bm.allocate(seq, 8)
    assert 0 not in seq.block_table and sorted(seq.block_table) == [1, 2, 3, 4]


def test_double_free_is_detected():
    bm = BlockManager(4, 2)
    seq = Sequence("a", [1], SamplingParams(), seed=0, arrival=0)
    bm.allocate(seq, 3)
    pages = list(seq.block_table)
    bm.free(seq)
    seq.block_table = pages
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(seq)


# ---------------------------------------------------------------------------- prefix caching
# A miniature scheduler drives the block manager with random request streams. Prompts are drawn
# from a few shared prefixes over a two-token alphabet, so hits, sharing and eviction are common.
# A host model of the KV pool records, for every written slot, the (salt, token prefix) whose KV
# it holds: every slot a request can read must hold exactly its own prefix.

cache_ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["add", "admit", "admit", "compute", "compute", "compute", "generate", "finish"]
            + ["preempt", "reset"]
        ),
        st.integers(0, 7),
        st.integers(1, 24),
    ),
    min_size=20,
    max_size=100,
)
BASES = [[3, 4, 3, 3, 4, 4, 3, 4] * 3, [4] * 20, [3, 4] * 9]


def _check_kv(kv, seq, page_size):
    """Every computed position of `seq` reads KV computed for its own salt and token prefix."""
    ids = seq.all_token_ids()
    for p in range(seq.num_computed_tokens):
        slot = (seq.block_table[p // page_size], p % page_size)
        assert kv.get(slot) == (seq.params.cache_salt, tuple(ids[: p + 1])), (seq.request_id, p)


@settings(max_examples=200, deadline=None)
@given(
    num_pages=st.integers(2, 40),
    page_size=st.sampled_from([1, 2, 4]),
    steps=cache_ops,
)
def test_prefix_cache_accounting_holds_over_random_request_streams(num_pages, page_size, steps):
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=True)
    evict = bm.cache.evict
    live: list[Sequence] = []

    def checked_evict():
        page = evict()
        assert bm.ref_counts[page] == 0, "evicted a referenced page"
        assert all(page not in s.block_table for s in live), "evicted a page in a block table"
        return page

    bm.cache.evict = checked_evict
    kv: dict[tuple[int, int], tuple] = {}
    waiting: list[Sequence] = []
    running: list[Sequence] = []
    turns: dict[int, list[int]] = {}  # conversation i -> its tokens so far
    conversation: dict[str, int] = {}  # request id -> conversation i
    num_hits = 0
    for n_added, (op, i, n) in enumerate(steps):
        live[:] = waiting + running
        if op == "add":  # a new request, or the next turn of an earlier one (same i)
            salt = None if i < 5 else "tenant-a"
            prompt = list(turns.get(i, BASES[i % len(BASES)][: n + 4]))
            prompt += [3 + (n >> k & 1) for k in range(n % 4)]
            seq = Sequence(f"s{n_added}", prompt, SamplingParams(cache_salt=salt), 0, n_added)
            conversation[seq.request_id] = i
            waiting.append(seq)
        elif op == "admit" and waiting:
            seq = waiting[i % len(waiting)]
            cached = bm.lookup(seq)
            num_cached = len(cached) * page_size
            assert num_cached < seq.num_tokens  # the last token is always recomputed
            num_new = min(n, seq.num_tokens - num_cached)
            if bm.can_allocate(seq, num_cached + num_new, cached):
                bm.allocate(seq, num_cached + num_new, cached)
                seq.num_computed_tokens = num_cached
                num_hits += bool(cached)
                waiting.remove(seq)
                running.append(seq)
                _check_kv(kv, seq, page_size)  # the shared pages hold this request's prefix
            else:
                with pytest.raises(RuntimeError, match="out of KV pages"):
                    bm.allocate(seq, num_cached + num_new, cached)
        elif op == "compute" and running:
            seq = running[i % len(running)]
            target = min(seq.num_computed_tokens + n, seq.num_tokens)
            if bm.can_allocate(seq, target):
                bm.allocate(seq, target)
                ids = seq.all_token_ids()
                for p in range(seq.num_computed_tokens, target):  # the step writes KV
                    page = seq.block_table[p // page_size]
                    assert bm.ref_counts[page] == 1, "wrote into a shared page"
                    kv[(page, p % page_size)] = (seq.params.cache_salt, tuple(ids[: p + 1]))
                seq.num_computed_tokens = target
                bm.cache_full_pages(seq)
        elif op == "generate" and running:
            seq = running[i % len(running)]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(3 + n % 2)
        elif op in ("finish", "preempt") and running:
            seq = running.pop(i % len(running))
            bm.free(seq)
            if op == "preempt":
                seq.num_computed_tokens = 0
                waiting.append(seq)
            else:
                turns[conversation[seq.request_id]] = seq.all_token_ids()
        elif op == "reset" and n == 1:
            bm.reset_prefix_cache()
        live[:] = waiting + running
        bm.check_invariants(live)
        assert bm.ref_counts.min() >= 0
        for seq in running:
            _check_kv(kv, seq, page_size)
    event(f"cache hits: {min(num_hits, 3)}+, evictions: {min(bm.num_evictions, 3)}+")
    for seq in running:
        bm.free(seq)
    bm.check_invariants(waiting)
    assert bm.num_free_pages == num_pages - 1 and bm.usage == 0.0
    assert len(bm.free_pages) + bm.cache.num_evictable == num_pages - 1


def _seq(name, ids, salt=None):
    return Sequence(name, ids, SamplingParams(cache_salt=salt), seed=0, arrival=0)


def _run_to_end(bm, seq):
    """Admits `seq` with its cache hit, computes all its tokens and frees it."""
    cached = bm.lookup(seq)
    bm.allocate(seq, seq.num_tokens, cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_pages(seq)
    pages = list(seq.block_table)
    bm.free(seq)
    seq.num_computed_tokens = 0
    return cached, pages


def test_different_salts_never_share_pages():
    bm = BlockManager(64, 4)
    prompt = list(range(10, 30))  # 5 full pages
    _, pages = _run_to_end(bm, _seq("a", prompt, "tenant-a"))
    assert bm.lookup(_seq("b", prompt, "tenant-b")) == []
    assert bm.lookup(_seq("none", prompt)) == []
    assert bm.lookup(_seq("a2", prompt, "tenant-a")) == pages[:4]  # last token recomputed


def test_prompt_ending_on_a_page_boundary_reuses_all_but_its_last_page():
    bm = BlockManager(64, 4)
    prompt = list(range(10, 26))  # exactly 4 pages
    _, pages = _run_to_end(bm, _seq("a", prompt))
    assert bm.num_cached_pages == 4
    again = bm.lookup(_seq("b", prompt))
    assert again == pages[:3]
    longer = bm.lookup(_seq("c", prompt + [7]))
    assert longer == pages


def test_evictions_take_idle_cached_pages_least_recently_used_first_and_tail_first():
    bm = BlockManager(9, 2)  # 8 usable pages
    a, b = _seq("a", [5, 6, 7, 8, 9]), _seq("b", [1, 2, 3, 4, 9])
    _, pages_a = _run_to_end(bm, a)  # 2 full pages cached, the partial one free
    _, pages_b = _run_to_end(bm, b)
    assert bm.num_cached_pages == 4 and len(bm.free_pages) == 4
    assert bm.usage == 0.0  # idle cached pages are reclaimable
    big = _seq("big", [42] * 12)
    bm.allocate(big, 12)  # 6 pages: the 4 uncached ones, then evictions
    assert bm.num_evictions == 2
    # a was freed first (least recently used), its tail page before its head page.
    assert bm.lookup(_seq("a2", [5, 6, 7, 8, 9])) == []
    assert not bm.cache.is_cached(pages_a[1]) and not bm.cache.is_cached(pages_a[0])
    assert bm.lookup(_seq("b2", [1, 2, 3, 4, 9])) == pages_b[:2]
    bm.check_invariants([big])


def test_a_cache_hit_revives_an_idle_page_and_it_is_not_evicted_while_in_use():
    bm = BlockManager(5, 2)  # 4 usable pages
    _, pages = _run_to_end(bm, _seq("a", [5, 6, 7, 8, 9]))
    b = _seq("b", [5, 6, 7, 8, 1])
    cached = bm.lookup(b)
    assert cached == pages[:2]
    assert bm.can_allocate(b, 5, cached)
    bm.allocate(b, 5, cached)
    b.num_computed_tokens = 4
    assert bm.num_free_pages == 1  # the two revived pages and one fresh page are in use
    hog = _seq("hog", [1, 1, 1])
    assert not bm.can_allocate(hog, 3)  # only one page left: the shared ones are not evictable
    bm.check_invariants([b])
