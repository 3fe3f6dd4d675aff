"""Engine invariants on a tiny random-weight model: batching, chunking and preemption change
nothing about a request's output; pages never leak; no compiles after warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import SamplingParams
from jinfer.attention.xla import XLA

PROMPT_LENGTHS = [5, 16, 37, 100, 250]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(n_tokens_list, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 49000, n).tolist()} for n in n_tokens_list]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_output_is_independent_of_batching_chunking_and_preemption(make_tiny_llm, arch):
    prompts = _prompts(PROMPT_LENGTHS)
    llm = make_tiny_llm(arch)
    alone = [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    together = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert together == alone
    llm.engine.check_invariants()
    assert llm.engine.kv_cache_usage() == 0.0

    chunked = make_tiny_llm(arch, max_num_batched_tokens=8)  # a 250-token prompt in 32 chunks
    assert _tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == alone

    # 23 usable pages of 16 cannot hold all five requests at once: preemption must kick in.
    small = make_tiny_llm(arch, num_pages=24, max_model_len=320)
    assert _tokens(small.generate(prompts, GREEDY, use_tqdm=False)) == alone
    assert small.engine.stats.num_preemptions > 0
    small.engine.check_invariants()
    assert small.engine.kv_cache_usage() == 0.0


def test_no_compiles_after_warmup_while_traffic_varies(make_tiny_llm):
    llm = make_tiny_llm()
    before = llm.engine.num_compiles
    mixes = [
        (_prompts([3]), GREEDY),
        (_prompts([40, 7, 130]), SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=5)),
        (_prompts([64] * 8), SamplingParams(temperature=1.0, top_k=5, logprobs=3, max_tokens=3)),
        (_prompts([9, 300]), SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=4)),
        (_prompts([20]), SamplingParams(min_tokens=2, stop_token_ids=list(range(10, 30)))),
        (_prompts([6, 9]), SamplingParams(logit_bias={t: -5.0 for t in range(100, 400)})),
    ]
    for prompts, params in mixes:
        llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.num_compiles == before


def test_warmup_runs_each_layer_program_once_and_still_covers_every_step(smollm2_tokenizer):
    """Layer programs: warm-up stops once every layer kind has run on another layer's output
    (here layers 0-2 of 4: sliding, sliding, full), and real steps then compile nothing."""
    import dataclasses

    from conftest import tiny_config

    from jinfer import LLM
    from jinfer.models.params import init_params

    cfg = dataclasses.replace(
        tiny_config("gemma3"), num_layers=4, layer_types=("sliding", "sliding", "full", "sliding")
    )
    llm = LLM.from_params(
        cfg, init_params(cfg, seed=1, std=0.2), smollm2_tokenizer, max_model_len=256,
        max_num_seqs=4, max_num_batched_tokens=32, dtype="float32", compile_unit="layer",
    )  # fmt: skip
    assert llm.engine.runner._warmup_layers() == 3
    before = llm.engine.num_compiles
    llm.generate(_prompts([5, 40, 90]), GREEDY, use_tqdm=False)
    assert llm.engine.num_compiles == before


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_tiny_llm):
    llm = make_tiny_llm()
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    prompt = _prompts([20], seed=5)
    alone = _tokens(llm.generate(prompt, seeded, use_tqdm=False))[0]
    noise = SamplingParams(temperature=1.0, max_tokens=10)
    mixed = llm.generate(_prompts([7, 90]) + prompt, [noise, noise, seeded], use_tqdm=False)
    assert _tokens(mixed)[2] == alone
    again = _tokens(llm.generate(prompt, seeded, use_tqdm=False))[0]
    assert again == alone


def test_n_completions_with_a_seed_differ_and_reproduce(make_tiny_llm):
    llm = make_tiny_llm()
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    first = llm.generate(_prompts([12]), params, use_tqdm=False)[0]
    second = llm.generate(_prompts([12]), params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_finish_reasons_and_stop_conditions(make_tiny_llm):
    llm = make_tiny_llm()
    prompt = _prompts([10], seed=9)
    base = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12

    stop_tok = base.token_ids[3]
    first = base.token_ids.index(stop_tok)
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == base.token_ids[: first + 1]

    # A stop string that spans a token boundary ends the text right before it.
    text = base.text
    tok = llm.get_tokenizer()
    cut = len(tok.decode(base.token_ids[:4]))
    stop = text[cut - 2 : cut + 2]
    assert len(stop) == 4
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == text[: text.index(stop) + len(stop)]

    # Generation also ends at max_model_len.
    long_prompt = _prompts([505])
    out = llm.generate(long_prompt, SamplingParams(max_tokens=100), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 7


def test_logprobs_per_generated_token(make_tiny_llm):
    llm = make_tiny_llm()
    out = llm.generate(
        _prompts([8]),
        SamplingParams(temperature=0.7, seed=1, max_tokens=5, logprobs=3),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp for lp in entry.values() if lp.rank), key=lambda lp: lp.rank)
        values = [lp.logprob for lp in ranked]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_abort_frees_pages_at_once(make_tiny_llm):
    llm = make_tiny_llm()
    eng = llm.engine
    for i, p in enumerate(_prompts([30, 60, 90])):
        eng.add_request(f"r{i}", p["prompt_token_ids"], SamplingParams(max_tokens=50))
    for _ in range(3):
        eng.step()
    assert eng.kv_cache_usage() > 0
    assert eng.abort("r1") and not eng.abort("nope")
    eng.check_invariants()
    while eng.has_unfinished_requests():
        eng.step()
    eng.check_invariants()
    assert eng.kv_cache_usage() == 0.0 and eng.num_running() == 0


def test_bad_inputs_raise_and_cost_nothing(make_tiny_llm):
    llm = make_tiny_llm()
    with pytest.raises(ValueError, match=r"513 tokens, more than max_model_len=512"):
        llm.generate(_prompts([513]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(_prompts([4]) + [{"prompt_token_ids": [1, 49152]}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must be"):
        llm.generate([42], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(_prompts([5]), GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12


def test_logit_bias_forces_and_bans_tokens(make_tiny_llm):
    llm = make_tiny_llm()
    prompts = _prompts([7, 30])
    forced = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=4, logit_bias={1234: 100}), use_tqdm=False
    )
    assert _tokens(forced) == [[1234] * 4, [1234] * 4]
    free = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    ban = {t: -100 for t in {free[0][0], free[1][0]}}
    banned = llm.generate(prompts, SamplingParams(temperature=0, logit_bias=ban), use_tqdm=False)
    assert all(o.outputs[0].token_ids[0] not in ban for o in banned)


def test_params_naming_tokens_outside_the_vocabulary_cost_nothing(make_tiny_llm):
    llm = make_tiny_llm()
    bad = [GREEDY, SamplingParams(logit_bias={49152: 1.0})]
    with pytest.raises(ValueError, match="logit_bias: token id 49152"):
        llm.generate(_prompts([4, 5]), bad, use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(_prompts([4]), SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_long_prompt_in_query_blocks_gives_the_per_token_tokens_and_logprobs(
    make_tiny_llm, arch, monkeypatch
):
    # A 450-token prompt in 64-token chunks (context >> Bq), next to short prompts and decodes.
    prompts = _prompts([450, 3, 40, 17])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)

    def run():
        outs = make_tiny_llm(arch).generate(prompts, params, use_tqdm=False)
        logprobs = [
            [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs] for o in outs
        ]
        return _tokens(outs), logprobs

    blocked_tokens, blocked_lps = run()
    monkeypatch.setattr(XLA, "query_block", 1)  # every token on its own
    per_token_tokens, per_token_lps = run()
    assert blocked_tokens == per_token_tokens
    for got_seq, want_seq in zip(blocked_lps, per_token_lps, strict=True):
        for got, want in zip(got_seq, want_seq, strict=True):
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[t] for t in want], list(want.values()), atol=1e-4)


def test_step_time_splits_into_device_and_host(make_tiny_llm):
    llm = make_tiny_llm()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate(_prompts([5, 40, 17]), params, use_tqdm=False)
    stats = llm.engine.stats
    assert stats.num_steps > 0
    assert 0 < stats.device_time < stats.step_time
    assert stats.host_time == stats.step_time - stats.device_time
    assert 0 < stats.host_fraction < 1


def test_finished_only_steps_return_just_the_finished_requests(make_tiny_llm):
    eng = make_tiny_llm().engine
    for i, n in enumerate([2, 5]):
        eng.add_request(str(i), [3, 4, 5, 6], SamplingParams(max_tokens=n, ignore_eos=True))
    seen = []
    while eng.has_unfinished_requests():
        outs = eng.step(finished_only=True)
        assert all(o.finished for o in outs)
        seen += [(o.request_id, len(o.outputs[0].token_ids)) for o in outs]
    assert seen == [("0", 2), ("1", 5)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_programs_give_the_whole_step_programs_tokens_and_logprobs(make_tiny_llm, arch):
    # Gemma's sliding and global layers are two layer kinds: two layer programs per bucket.
    prompts = _prompts([450, 3, 40, 17])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    runs = {}
    for unit in ("step", "layer"):
        llm = make_tiny_llm(arch, compile_unit=unit)
        assert llm.engine.runner.compile_unit == unit
        outs = llm.generate(prompts, params, use_tqdm=False)
        lps = [[{t: x.logprob for t, x in e.items()} for e in o.outputs[0].logprobs] for o in outs]
        runs[unit] = (_tokens(outs), lps)
    assert runs["layer"][0] == runs["step"][0]
    for got_seq, want_seq in zip(runs["layer"][1], runs["step"][1], strict=True):
        for got, want in zip(got_seq, want_seq, strict=True):
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[t] for t in want], list(want.values()), atol=1e-4)


def test_compile_unit_auto_is_per_layer_on_cpu_and_a_bad_value_is_named(make_tiny_llm):
    from conftest import tiny_config

    from jinfer.config.engine import EngineConfig

    cfg = tiny_config()
    for platform, unit in (("cpu", "layer"), ("gpu", "step"), ("tpu", "step")):
        assert EngineConfig().resolve(cfg, platform).compile_unit == unit
    with pytest.raises(ValueError, match="compile_unit.*'fused'"):
        make_tiny_llm(compile_unit="fused", warmup=False)


def test_bfloat16_kv_cache_next_to_float32_weights(make_tiny_llm):
    import jax.numpy as jnp

    prompts = _prompts([300, 3, 40])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    common = dict(kv_cache_memory_gb=0.0005, max_model_len=320, attention_backend="xla")
    full = make_tiny_llm(**common)
    half = make_tiny_llm(**common, kv_cache_dtype="bfloat16")
    assert half.engine.runner.cache.k[0].dtype == jnp.uint16  # bfloat16 bits (kv_cache.py)
    assert half.engine.runner.params.embed.dtype == jnp.float32
    # The same memory holds twice the pages.
    pages_full, pages_half = (x.engine.runner.cache.num_pages for x in (full, half))
    assert pages_half in (2 * pages_full, 2 * pages_full + 1)  # (fit rounds down)
    before = half.engine.num_compiles
    want, got = (llm.generate(prompts, params, use_tqdm=False) for llm in (full, half))
    assert half.engine.num_compiles == before
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want, strict=True):
        for ge, we in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            tok = next(iter(we))
            assert abs(ge[tok].logprob - we[tok].logprob) < 0.05  # bf16 keys: ~3 digits


def test_bad_kv_cache_dtypes_are_named(make_tiny_llm):
    with pytest.raises(ValueError, match="kv_cache_dtype.*'int8'"):
        make_tiny_llm(kv_cache_dtype="int8", warmup=False)
    with pytest.raises(ValueError, match="only attention_backend='xla'"):
        make_tiny_llm(kv_cache_dtype="bfloat16", attention_backend="pallas", warmup=False)


@pytest.mark.parametrize(
    "backend, layout, page_size",
    [("xla", "token", 64), ("pallas", "head", 16), ("xla", "head", 16)],
)
def test_a_cache_the_attention_backend_cannot_read_is_refused(
    smollm2_tokenizer, backend, layout, page_size
):
    """The XLA path reads the "head" layout, the Pallas kernels the "token" one (kv_cache.py),
    and the pages must be the configured size: anything else is a clear error at start-up,
    not a shape error inside the first step."""
    from conftest import tiny_config

    from jinfer.attention.kv_cache import init_cache
    from jinfer.config.engine import EngineConfig
    from jinfer.engine.engine import Engine

    cfg = tiny_config()
    config = EngineConfig(max_model_len=128, attention_backend=backend, page_size=64)
    config = config.resolve(cfg, "cpu")
    cache = init_cache(cfg, 8, page_size, layout=layout)
    with pytest.raises(ValueError, match=f"{page_size}-token pages in the '{layout}' layout"):
        Engine(cfg, None, cache, smollm2_tokenizer, config)


def test_step_time_is_tallied_by_bucket_and_kind(make_tiny_llm):
    """EngineStats.steps_by_bucket (bench_offline.py --steps): every step lands under the bucket
    it ran in, prefill or decode, with the tokens it scheduled."""
    llm = make_tiny_llm("llama", enable_prefix_caching=False)
    prompts = _prompts([40, 7, 23])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.stats
    tallies = stats.steps_by_bucket
    assert {kind for _, kind in tallies} == {"prefill", "decode"}
    assert {bucket for bucket, _ in tallies} <= set(llm.engine.runner.buckets)
    assert sum(n for n, _, _ in tallies.values()) == stats.num_steps
    assert all(seconds > 0 for _, seconds, _ in tallies.values())
    # Every prompt token once, every output token but the last fed back once.
    tokens = sum(t for _, _, t in tallies.values())
    assert tokens == stats.num_prompt_tokens + stats.num_generated_tokens - len(prompts)
    # A decode step schedules one token per request, never more than its bucket holds.
    for (bucket, kind), (n, _, t) in tallies.items():
        assert t <= n * bucket
        if kind == "decode":
            assert t <= n * len(prompts)
