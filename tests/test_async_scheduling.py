"""Async scheduling: step N+1 is planned and dispatched before step N's tokens reach the host,
and every request's output is what the synchronous loop gives, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import SamplingParams


def _prompts(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 49000, n).tolist()} for n in lengths]


def _summary(outs) -> list:
    """What a client reads, logprobs aside (`_assert_same`)."""
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs
    ]


def _assert_same(got, want) -> None:
    """The same tokens, texts and reasons; the same logprob entries, to float rounding (steps
    hold other batches when scheduled ahead, and batch invariance holds to ~1e-6)."""
    assert _summary(got) == _summary(want)
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert (gc.logprobs is None) == (wc.logprobs is None)
            for ge, we in zip(gc.logprobs or [], wc.logprobs or [], strict=True):
                assert ge.keys() == we.keys()
                np.testing.assert_allclose(
                    [ge[t].logprob for t in we], [e.logprob for e in we.values()], atol=1e-4
                )


def _both(make_tiny_llm, prompts, params, **options):
    """The outputs with async scheduling on and off, and the async engine."""
    out = {}
    for mode in (True, False):
        llm = make_tiny_llm(async_scheduling=mode, **options)
        out[mode] = llm.generate(prompts, params, use_tqdm=False)
        engine = llm.engine
        assert not engine.has_unfinished_requests() and not engine.requests
        assert engine.kv_cache_usage() == 0.0  # nothing in flight keeps a page
        engine.check_invariants()
        if mode:
            async_engine = engine
    return out[True], out[False], async_engine


def test_async_outputs_equal_sync_under_chunking_preemption_and_prefix_hits(make_tiny_llm):
    # A shared 70-token prefix (prefix-cache hits on 16-token pages), prompts longer than the
    # 64-token step (chunked prefill next to decodes), and 23 pages (368 tokens) for them all.
    shared = _prompts([70])[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in _prompts([3, 9])]
    prompts += _prompts([100, 5, 40, 1, 250], seed=1)
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=5, n=3, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, logprobs=4, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=11, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, min_tokens=5, max_tokens=15),
        SamplingParams(temperature=1.0, seed=2, max_tokens=25, ignore_eos=True),
    ]
    got, want, engine = _both(make_tiny_llm, prompts, params, num_pages=24, max_model_len=320)
    _assert_same(got, want)
    assert engine.stats.num_preemptions > 0 and engine.stats.prefix_cache_hits > 0


def test_async_outputs_equal_sync_with_stops_and_length_limits(make_tiny_llm):
    prompts = _prompts([4, 12, 30])
    free = make_tiny_llm(async_scheduling=False).generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )
    # Stops that end each request mid-way: a string spanning tokens, a token id, and the end
    # of max_model_len (the last request's prompt + output would pass it).
    text = free[0].outputs[0].text
    stop_string = text[len(text) // 2 : len(text) // 2 + 3]
    stop_token = free[1].outputs[0].token_ids[7]
    params = [
        SamplingParams(temperature=0, max_tokens=24, stop=[stop_string], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
    ]
    got, want, _ = _both(make_tiny_llm, prompts, params, max_model_len=48)
    _assert_same(got, want)
    reasons = [o.outputs[0].finish_reason for o in got]
    assert reasons == ["stop", "stop", "length"]
    assert len(got[2].prompt_token_ids) + len(got[2].outputs[0].token_ids) == 48


def test_penalties_wait_for_the_tokens_they_read_and_equal_sync(make_tiny_llm):
    params = SamplingParams(
        temperature=0.8, seed=9, max_tokens=16, repetition_penalty=1.5, frequency_penalty=0.7,
        presence_penalty=0.4, ignore_eos=True,
    )  # fmt: skip
    got, want, _ = _both(make_tiny_llm, _prompts([6, 20]), params)
    _assert_same(got, want)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_an_abort_with_a_step_in_flight_frees_everything(make_tiny_llm, async_scheduling):
    llm = make_tiny_llm(async_scheduling=async_scheduling)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(_prompts([10, 30, 5])):
        engine.add_request(str(i), p["prompt_token_ids"], params)
    for _ in range(4):
        engine.step()
        engine.check_invariants()
    assert engine.abort("1")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "1"  # nothing of an aborted request comes back
            if out.finished:
                finished[out.request_id] = out
        engine.check_invariants()
    assert sorted(finished) == ["0", "2"]
    assert all(len(o.outputs[0].token_ids) == 40 for o in finished.values())
    assert engine.kv_cache_usage() == 0.0


def test_async_scheduling_is_an_engine_option_with_a_flag():
    import argparse

    from jinfer.config.cli import add_engine_args, engine_options

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_options(p.parse_args([]))["async_scheduling"] is True
    assert engine_options(p.parse_args(["--no-async-scheduling"]))["async_scheduling"] is False
