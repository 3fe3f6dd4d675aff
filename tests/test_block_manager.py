"""Property tests: whatever happens, no page is leaked or owned twice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jinfer.block_manager import BlockManager
from jinfer.sampling_params import SamplingParams
from jinfer.sequence import Sequence

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
