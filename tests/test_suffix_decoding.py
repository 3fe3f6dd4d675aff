"""Suffix decoding (`jinfer/spec_decode/suffix*.py`): drafts from a request's own tokens and
from earlier outputs of its `cache_salt`, greedy tokens identical to decoding without them.

The fast tests hold the index to a brute-force reading of the suffix tree it stands for, the
output cache to its LRU bound and its tenants apart, and the drafter to its match, factor and
probability rules; the engine tests compare whole generations with speculation on and off."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jinfer.config.engine import EngineConfig, OptionError
from jinfer.config.speculative import SpeculativeConfig
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.sequence import Sequence
from jinfer.spec_decode.suffix import OutputCache, SuffixDrafter
from jinfer.spec_decode.suffix_index import SEP, SuffixIndex
from jinfer.spec_decode.verify import make_drafter, propose

SUFFIX = {"method": "suffix", "num_speculative_tokens": 8}


# --------------------------------------------------------------------------------- index
def _index(docs: list[list[int]]) -> SuffixIndex:
    index = SuffixIndex()
    for doc in docs:
        index.new_document()
        index.extend(np.asarray(doc, np.int32))
    return index


def _brute_match(text: list[int], pattern: list[int], max_len: int):
    for m in range(min(max_len, len(pattern)), 0, -1):
        want = pattern[-m:]
        ends = [e for e in range(m - 1, len(text) - 1) if text[e - m + 1 : e + 1] == want]
        if ends:
            return m, ends
    return 0, []


def _brute_walk(text: list[int], ends: list[int], k: int, min_prob: float):
    """The suffix tree's rule read off the text: per step the most frequent next token of the
    occurrences left (ties: the latest occurrence), while count / parent count multiplied
    along the path stays >= min_prob."""
    drafts, prob = [], 1.0
    for i in range(1, k + 1):
        nxt = [(text[e + i] if e + i < len(text) else SEP, e) for e in ends]
        live = [(t, e) for t, e in nxt if t != SEP]
        if not live:
            break
        counts = collections.Counter(t for t, _ in live)
        best = max(counts, key=lambda t: (counts[t], max(e for u, e in live if u == t)))
        if prob * counts[best] / len(ends) < min_prob:
            break
        prob *= counts[best] / len(ends)
        drafts.append(best)
        ends = [e for t, e in live if t == best]
    return drafts


@pytest.mark.parametrize("seed", range(40))
def test_the_index_matches_and_walks_as_a_suffix_tree_would(seed: int):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 6))  # few tokens: many repeats, ties and deep matches
    docs = [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(4)]
    index = _index(docs)
    erased = int(rng.integers(0, 4))  # a document forgotten: SEP in place, as if never there
    starts = np.cumsum([1] + [len(d) + 1 for d in docs[:-1]])
    index.erase(int(starts[erased]), int(starts[erased]) + len(docs[erased]))
    kept = [d if i != erased else [SEP] * len(d) for i, d in enumerate(docs)]
    text = [t for d in kept for t in [SEP, *d]]
    assert index.text.tolist() == text
    pattern = rng.integers(0, vocab, int(rng.integers(1, 12))).tolist()
    max_len, k = int(rng.integers(1, 10)), int(rng.integers(1, 12))
    min_prob = float(rng.choice([0.0, 0.1, 0.4, 0.7]))
    m, ends = index.match(np.asarray(pattern, np.int32), max_len)
    assert (m, ends.tolist()) == _brute_match(text, pattern, max_len)
    if m:
        drafts, score, _ = index.walk(ends, k, min_prob)
        assert drafts == _brute_walk(text, ends.tolist(), k, min_prob)
        assert len(drafts) == 0 or 0 < score <= len(drafts)


def test_the_walk_follows_the_most_frequent_path_while_its_probability_holds():
    index = _index([[1, 2, 3, 5], [1, 2, 3, 6], [1, 2, 4, 7]])
    m, ends = index.match(np.asarray([9, 1, 2], np.int32), 8)
    assert m == 2 and len(ends) == 3
    assert index.walk(ends, 4, 0.1)[0] == [3, 6]  # 3: 2/3; then 5 or 6 (1/3): the latest
    assert index.walk(ends, 4, 0.5)[0] == [3]
    assert index.walk(ends, 4, 0.7)[0] == []
    drafts, score, left = index.walk(ends, 4, 0.0)
    assert drafts == [3, 6] and score == pytest.approx(2 / 3 + 1 / 3) and len(left) == 1


def test_tokens_added_step_by_step_index_as_tokens_added_at_once():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 5, 300).astype(np.int32)
    whole, steps = _index([tokens.tolist()]), _index([[]])
    for cut in np.array_split(tokens, 37):  # runs of 8 and 9: the short path and the sort
        steps.extend(cut)
    for p in range(1, 300, 7):
        pattern = tokens[max(0, p - 6) : p]
        a, b = whole.match(pattern, 6), steps.match(pattern, 6)
        assert a[0] == b[0] and a[1].tolist() == b[1].tolist()


# ---------------------------------------------------------------------------- the cache
def _lookup(cache: OutputCache, salt, pattern, k: int = 8):
    return cache.lookup(salt, np.asarray(pattern, np.int32), 24, lambda m: k, 0.0)[0]


def test_earlier_outputs_draft_only_for_requests_of_their_cache_salt():
    cache = OutputCache(100)
    cache.add("alice", np.asarray([1, 2, 3, 4, 5], np.int32))
    assert _lookup(cache, "alice", [9, 1, 2]) == [3, 4, 5]
    assert _lookup(cache, "bob", [9, 1, 2]) == []
    assert _lookup(cache, None, [9, 1, 2]) == []
    cache.add(None, np.asarray([1, 2, 7], np.int32))
    assert _lookup(cache, None, [1, 2]) == [7] and _lookup(cache, "alice", [1, 2]) == [3, 4, 5]


def test_the_cache_keeps_the_most_recently_used_outputs_up_to_its_bound():
    cache = OutputCache(2)
    cache.add("a", np.asarray([1, 1, 1], np.int32))
    cache.add("b", np.asarray([2, 2, 2], np.int32))
    assert _lookup(cache, "a", [1]) == [1, 1]  # "a" drafted: used last now
    cache.add("c", np.asarray([3, 3, 3], np.int32))  # "b" leaves, and its tenant with it
    assert len(cache) == 2 and cache.num_tokens == 6
    assert _lookup(cache, "b", [2]) == [] and _lookup(cache, "a", [1]) == [1, 1]
    off = OutputCache(0)  # suffix_decoding_max_cached_requests 0: nothing kept
    off.add("a", np.asarray([1, 2], np.int32))
    assert len(off) == 0 and _lookup(off, "a", [1]) == []


def test_an_index_rebuilt_after_evictions_drafts_as_one_built_from_what_is_kept():
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 6, 1500).astype(np.int32) for _ in range(9)]
    cache, fresh = OutputCache(2), OutputCache(2)
    for doc in docs:  # 7 evicted: 10500 dead tokens, past the rebuild threshold
        cache.add("t", doc)
    for doc in docs[-2:]:
        fresh.add("t", doc)
    assert cache._tenants["t"].dead < 4096 and cache.num_tokens == 3000
    for pattern in rng.integers(0, 6, (30, 5)).tolist():
        assert _lookup(cache, "t", pattern) == _lookup(fresh, "t", pattern)


# -------------------------------------------------------------------------- the drafter
def _spec(**kw) -> SpeculativeConfig:
    return SpeculativeConfig.parse({"method": "suffix", **kw})


def _seq(prompt: list[int], output: list[int] = (), salt: str | None = None) -> Sequence:
    params = SamplingParams(temperature=0, cache_salt=salt)
    return Sequence("r", list(prompt), params, 0, 0, output_token_ids=list(output))


def test_a_request_drafts_from_its_own_tokens_up_to_the_spec_factor():
    drafter = SuffixDrafter(_spec())
    seq = _seq([5, 6, 7, 8, 9, 10, 11, 12, 1, 5, 6, 7])  # [5, 6, 7] occurred at the start
    assert drafter.propose(seq, 8) == [8, 9, 10]  # a 3-token match: 3 drafts (factor 1)
    twice = SuffixDrafter(_spec(suffix_decoding_max_spec_factor=2.0))
    assert twice.propose(seq, 8) == [8, 9, 10, 11, 12, 1]
    assert drafter.propose(seq, 2) == [8, 9]  # and at most what the engine asks for
    seq.output_token_ids += [8, 9]  # the index catches up with the new tokens
    assert drafter.propose(seq, 8) == [10, 11, 12, 1, 5]
    assert drafter.propose(_seq([1, 2, 3, 4]), 8) == []


def test_a_finished_output_drafts_for_the_next_request_of_its_salt():
    drafter = SuffixDrafter(_spec())
    agent = [11, 12, 13, 14, 15, 16]  # the prompt's tail, then the output it got
    first = _seq(agent, [21, 22, 23, 24, 25], salt="a")
    drafter.propose(first, 8)
    drafter.finish(first)
    assert first.drafter_state is None and len(drafter.outputs) == 1
    again = [*agent, 21, 22, 23]  # the next turn's context so far
    assert drafter.propose(_seq(again[:3], again[3:], salt="a"), 8) == [24, 25]
    assert drafter.propose(_seq(again[:3], again[3:], salt="b"), 8) == []
    assert drafter.propose(_seq(again[:3], again[3:]), 8) == []
    own_only = SuffixDrafter(_spec(suffix_decoding_max_cached_requests=0))
    own_only.finish(_seq(agent, [21, 22, 23, 24, 25], salt="a"))
    assert own_only.propose(_seq(again[:3], again[3:], salt="a"), 8) == []


def test_the_tree_sets_suffix_drafts_lengths_where_prompt_lookup_is_paced():
    """After a verification that kept nothing, prompt lookup proposes one draft; suffix
    decoding drafts what its match and path allow."""
    for method, want in (("ngram", [8]), ("suffix", [8, 9, 10])):
        spec = SpeculativeConfig.parse({"method": method, "num_speculative_tokens": 8})
        seq = _seq([5, 6, 7, 8, 9, 10, 11, 12, 1, 5, 6, 7])
        seq.num_computed_tokens, seq.num_drafts_wanted = seq.num_tokens - 1, 1
        propose([seq], make_drafter(spec), spec, max_model_len=64)
        assert seq.draft_token_ids == want, method


# -------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "raw, error",
    [
        ({"suffix_decoding_min_token_prob": 1.5}, r"probability in \[0, 1\], got 1.5"),
        ({"suffix_decoding_max_spec_factor": 0}, "positive number, got 0"),
        ({"suffix_decoding_max_cached_requests": -1}, "non-negative integer, got -1"),
        ({"suffix_decoding_max_tree_depth": 2.5}, "positive integer, got 2.5"),
        ({"prompt_lookup_max": 3}, "prompt_lookup_max is a setting of method 'ngram'"),
        (
            {"method": "ngram", "num_speculative_tokens": 3, "suffix_decoding_max_tree_depth": 4},
            "suffix_decoding_max_tree_depth is a setting of method 'suffix', not 'ngram'",
        ),
    ],
)
def test_a_bad_suffix_setting_is_refused_naming_it(raw, error):
    with pytest.raises(OptionError, match=f"speculative_config .*{error}"):
        EngineConfig(speculative_config=json.dumps({"method": "suffix", **raw}))


def test_suffix_drafts_as_many_tokens_as_its_tree_is_deep_by_default():
    assert _spec().num_speculative_tokens == 24 and _spec().enabled
    spec = _spec(suffix_decoding_max_tree_depth=12, suffix_decoding_min_token_prob=0.0)
    assert spec.num_speculative_tokens == 12 and spec.suffix_decoding_min_token_prob == 0.0
    assert _spec(num_speculative_tokens=5).num_speculative_tokens == 5


# ----------------------------------------------------------------------------- engine
def test_greedy_tokens_equal_speculation_off_as_earlier_outputs_draft(make_tiny_llm):
    """Four requests (one with n = 2) through 16 pages, then the same four again:
    the rerun drafts from the first run's outputs and accepts most of them, every output
    equals speculation off, no program compiles after warm-up, no page leaks. Another salt's
    rerun drafts only from its own tokens, as the first run did."""
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 49152, n).tolist()} for n in (30, 50, 9, 70)]

    def params(salt: str):
        kw = dict(temperature=0, ignore_eos=True, cache_salt=salt)
        limits = ((40, 1), (33, 2), (24, 1), (40, 1))  # (max_tokens, n)
        return [SamplingParams(max_tokens=m, n=n, **kw) for m, n in limits]

    def run(llm, salt: str):
        """The outputs' tokens, and the drafts the run verified and accepted."""
        stats = llm.engine.stats
        before = stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens
        outs = llm.generate(prompts, params(salt), use_tqdm=False)
        counts = stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens
        got = [[c.token_ids for c in o.outputs] for o in outs]
        return got, (counts[0] - before[0], counts[1] - before[1])

    # Rows for 8 drafts each (drafts take only rows no request needs: `Scheduler.draft_rows`).
    kw = dict(max_num_seqs=48, max_num_batched_tokens=64, num_pages=16, max_model_len=160)
    want, _ = run(make_tiny_llm(**kw), "a")
    on = make_tiny_llm(**kw, speculative_config=SUFFIX)
    compiles = on.engine.num_compiles
    got, cold = run(on, "a")
    assert got == want
    got, warm = run(on, "a")  # the same requests: drafted from the outputs they had
    assert got == want
    produced = sum(len(t) for o in want for t in o)
    # Nearly every draft holds, and they bring a third of the tokens or more (each request
    # starts at the engine's acceptance, which the first run left low: its first drafts are few).
    assert warm[1] >= 0.9 * warm[0] and warm[1] > produced / 3 and warm[1] > 2 * cold[1]
    got, other = run(on, "b")
    # Salt b's drafts hold no more than the first run's did: none came from a's outputs.
    assert got == want and other[1] == cold[1] < warm[1]
    assert on.engine.num_compiles == compiles
    on.engine.check_invariants()
    assert on.engine.kv_cache_usage() == 0
