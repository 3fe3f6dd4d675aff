"""Prefix caching on the engine (tiny random-weight models): with the cache on, every request's
greedy tokens and logprobs are those it gets with the cache off, whatever was cached before;
hits happen where the design says (full pages, last token recomputed, same salt only); the pool
keeps serving when it is too small to cache everything."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import SamplingParams

PAGE = 16  # make_tiny_llm's page size
LOGPROB_TOL = 1e-5
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 49000, n).tolist()


def _generate(llm, prompts: list[list[int]], params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _assert_same_outputs(got, want, tol=LOGPROB_TOL):
    """Greedy tokens equal; every reported logprob equal within `tol`."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g, w = g.outputs[0], w.outputs[0]
        assert g.token_ids == w.token_ids
        for g_step, w_step in zip(g.logprobs, w.logprobs, strict=True):
            assert g_step.keys() == w_step.keys()
            for tok, lp in w_step.items():
                assert abs(g_step[tok].logprob - lp.logprob) < tol


def _cached_after(prompt: list[int], output: list[int]) -> int:
    """Tokens a finished request leaves cached: its full pages whose KV was computed (the last
    sampled token never goes through the model)."""
    return (len(prompt) + len(output) - 1) // PAGE * PAGE


def _multi_turn(llm, num_sessions: int, num_turns: int, seed: int = 0):
    """Runs sessions turn by turn (all sessions' turn k in one batch); each turn's prompt is
    the previous prompt + its answer + new user tokens. Returns outputs per turn."""
    rng = np.random.default_rng(seed)
    prompts = [_ids(int(rng.integers(20, 60)), seed * 100 + s) for s in range(num_sessions)]
    turns = []
    for t in range(num_turns):
        outs = _generate(llm, prompts)
        turns.append((prompts, outs))
        prompts = [
            p + o.outputs[0].token_ids + _ids(int(rng.integers(5, 40)), 1000 * t + s)
            for s, (p, o) in enumerate(zip(prompts, outs, strict=True))
        ]
    return turns


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding window 8 < page size
def test_multi_turn_sessions_match_the_cache_off_outputs(make_tiny_llm, arch):
    on = make_tiny_llm(arch)
    off = make_tiny_llm(arch, enable_prefix_caching=False)
    compiles = on.engine.num_compiles
    turns_on = _multi_turn(on, num_sessions=3, num_turns=3)
    turns_off = _multi_turn(off, num_sessions=3, num_turns=3)
    assert on.engine.num_compiles == compiles
    for (_, outs_on), (_, outs_off) in zip(turns_on, turns_off, strict=True):
        _assert_same_outputs(outs_on, outs_off)
    # Turn k reuses every full page turn k-1 computed, and nothing more.
    for (prev_prompts, prev_outs), (_, outs) in zip(turns_on[:-1], turns_on[1:], strict=True):
        for p, prev, out in zip(prev_prompts, prev_outs, outs, strict=True):
            assert out.num_cached_tokens == _cached_after(p, prev.outputs[0].token_ids) > 0
    assert all(o.num_cached_tokens == 0 for o in turns_on[0][1])
    assert all(o.num_cached_tokens == 0 for _, outs in turns_off for o in outs)
    stats = on.engine.stats
    assert stats.prefix_cache_hits == sum(o.num_cached_tokens for _, outs in turns_on for o in outs)
    assert stats.prefix_cache_queries == sum(len(p) for prompts, _ in turns_on for p in prompts)
    assert off.engine.stats.prefix_cache_queries == 0 and off.engine.blocks.num_cached_pages == 0
    on.engine.check_invariants()
    assert on.engine.kv_cache_usage() == 0.0 and on.engine.blocks.num_cached_pages > 0


def test_shared_system_prompt_is_computed_once(make_tiny_llm):
    system = _ids(50, seed=7)
    prompts = [system + _ids(5 + 3 * i, seed=i) for i in range(8)]
    on = make_tiny_llm()
    off = make_tiny_llm(enable_prefix_caching=False)
    first = _generate(on, prompts[:1])
    rest = _generate(on, prompts[1:])
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in rest] == [48] * 7  # 3 full pages of the 50
    _assert_same_outputs(first + rest, _generate(off, prompts))
    on.engine.check_invariants()


@pytest.mark.parametrize("length", [3 * PAGE, 3 * PAGE + 5, PAGE, 1, 2 * PAGE + 1])
def test_a_fully_cached_prompt_recomputes_its_last_token(make_tiny_llm, length):
    """A prompt seen before is cached whole, but its last token must run through the model for
    logits, into a page of its own: on a page boundary the last full page is not reused."""
    prompt = _ids(length, seed=length)
    on = make_tiny_llm()
    first = _generate(on, [prompt])
    again = _generate(on, [prompt])
    assert again[0].num_cached_tokens == (length - 1) // PAGE * PAGE
    _assert_same_outputs(again, first)
    _assert_same_outputs(again, _generate(make_tiny_llm(enable_prefix_caching=False), [prompt]))
    on.engine.check_invariants()


def test_preemption_with_a_tiny_pool_keeps_outputs_and_reuses_own_pages(make_tiny_llm):
    base = _ids(70, seed=3)
    prompts = [base + _ids(n, seed=n) for n in (5, 40, 90, 130, 160)]
    want = _generate(make_tiny_llm(enable_prefix_caching=False), prompts)
    # 23 usable pages of 16 cannot hold all five requests at once: preemption must kick in.
    small = make_tiny_llm(num_pages=24, max_model_len=320)
    _assert_same_outputs(_generate(small, prompts), want)
    eng = small.engine
    assert eng.stats.num_preemptions > 0 and eng.stats.prefix_cache_hits > 0
    eng.check_invariants()
    assert eng.kv_cache_usage() == 0.0


def test_eviction_under_pressure_keeps_serving_correctly(make_tiny_llm):
    """Five sessions of ~100-200 tokens each cannot all stay cached in 23 pages: idle pages are
    evicted least recently used first, later turns hit less, and every output stays right."""
    small = make_tiny_llm(num_pages=24, max_model_len=368)
    turns_small = _multi_turn(small, num_sessions=5, num_turns=3, seed=4)
    turns_off = _multi_turn(make_tiny_llm(enable_prefix_caching=False), 5, 3, seed=4)
    for (_, a), (_, b) in zip(turns_small, turns_off, strict=True):
        _assert_same_outputs(a, b)
    blocks = small.engine.blocks
    assert blocks.num_evictions > 0 and small.engine.stats.prefix_cache_hits > 0
    assert blocks.num_cached_pages <= blocks.num_usable_pages
    small.engine.check_invariants()
    assert small.engine.kv_cache_usage() == 0.0


def test_different_cache_salts_never_share_pages(make_tiny_llm):
    prompt = _ids(70, seed=11)
    llm = make_tiny_llm()
    salted = lambda salt: SamplingParams(  # noqa: E731
        temperature=0, max_tokens=4, ignore_eos=True, cache_salt=salt
    )
    gen = lambda salt: llm.generate([{"prompt_token_ids": prompt}], salted(salt), use_tqdm=False)  # noqa: E731
    a = gen("tenant-a")[0]
    assert a.num_cached_tokens == 0
    assert gen("tenant-b")[0].num_cached_tokens == 0
    assert gen(None)[0].num_cached_tokens == 0
    assert gen("tenant-a")[0].num_cached_tokens == 64
    assert gen(None)[0].num_cached_tokens == 64

    # Running side by side, two tenants with warm caches hold no page in common.
    eng = llm.engine
    eng.add_request("a", prompt, salted("tenant-a"))
    eng.add_request("b", prompt, salted("tenant-b"))
    eng.step()
    seq_a, seq_b = (eng.requests[r].states[0].seq for r in ("a", "b"))
    assert seq_a.num_cached_tokens == 64 and seq_b.num_cached_tokens == 64
    assert not set(seq_a.block_table) & set(seq_b.block_table)
    while eng.has_unfinished_requests():
        eng.step()
    eng.check_invariants()


def test_shared_pages_never_change_while_others_use_them(make_tiny_llm):
    llm = make_tiny_llm()
    eng = llm.engine
    prompt = _ids(100, seed=5)
    _generate(llm, [prompt])
    pages = sorted(eng.blocks.cache.key_of)
    snapshot = [np.asarray(layer[np.asarray(pages)]) for layer in eng.runner.cache.k]
    followers = [prompt + _ids(n, seed=n) for n in (1, 30, 77)]
    outs = _generate(llm, followers, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert all(o.num_cached_tokens == 96 for o in outs)
    for layer, before in zip(eng.runner.cache.k, snapshot, strict=True):
        np.testing.assert_array_equal(np.asarray(layer[np.asarray(pages)]), before)


def test_generated_tokens_are_cached_for_the_next_turn(make_tiny_llm):
    llm = make_tiny_llm()
    prompt = _ids(20, seed=2)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = _generate(llm, [prompt], long)[0]
    follow_up = prompt + out.outputs[0].token_ids + [5, 6, 7]
    again = _generate(llm, [follow_up])[0]
    assert again.num_cached_tokens == 48 > len(prompt)  # 59 computed tokens -> 3 full pages


def test_reset_and_flag_off_mean_no_hits(make_tiny_llm):
    prompt = _ids(40, seed=9)
    llm = make_tiny_llm()
    _generate(llm, [prompt])
    llm.reset_prefix_cache()
    assert llm.engine.blocks.num_cached_pages == 0
    assert _generate(llm, [prompt])[0].num_cached_tokens == 0
    off = make_tiny_llm(enable_prefix_caching=False)
    _generate(off, [prompt])
    assert _generate(off, [prompt])[0].num_cached_tokens == 0
    assert off.engine.blocks.num_cached_pages == 0 and off.engine.stats.prefix_cache_hits == 0


def test_cache_salt_must_be_a_non_empty_string():
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt=3)  # type: ignore[arg-type]
    assert SamplingParams(cache_salt="t").cache_salt == "t"


@pytest.mark.slow
def test_second_chat_turn_on_a_real_model_hits_the_cache_and_matches_cache_off(
    smollm2_gguf_path,
):
    from jinfer import LLM

    # No warm-up: compile only the buckets this test uses (CI time).
    opts = dict(max_model_len=512, max_num_seqs=2, max_num_batched_tokens=64, warmup=False)
    on = LLM(smollm2_gguf_path, **opts)
    # Same device weights, same compiled programs: only the cache flag differs.
    off = LLM.from_params(
        on.model_config,
        on.engine.runner.params,
        on.get_tokenizer(),
        enable_prefix_caching=False,
        **opts,
    )
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    conv = [
        {
            "role": "system",
            "content": "You are a terse assistant for engineers who run language model servers "
            "in production. Answer every question in one sentence, without lists, headings or "
            "code, and say so plainly when you do not know.",
        },
        {"role": "user", "content": "What does a prefix cache in an LLM server store?"},
    ]
    first = on.chat(conv, params, use_tqdm=False)[0]
    conv += [
        {"role": "assistant", "content": first.outputs[0].text},
        {"role": "user", "content": "And when is it evicted?"},
    ]
    second_on = on.chat(conv, params, use_tqdm=False)
    second_off = off.chat(conv, params, use_tqdm=False)
    page = on.engine.config.page_size  # the default: 64 for the XLA attention
    assert second_on[0].num_cached_tokens >= len(first.prompt_token_ids) // page * page > 0
    assert second_off[0].num_cached_tokens == 0
    # 30 float32 layers: starting the prefill at a page edge instead of 0 changes the chunk
    # boundaries, hence the matmul shapes, which moves logprobs by ~1e-5 (measured 1.0e-5).
    _assert_same_outputs(second_on, second_off, tol=1e-4)
    on.engine.check_invariants()
