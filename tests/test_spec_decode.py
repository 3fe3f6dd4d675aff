"""Speculative decoding with prompt lookup (`jinfer/spec_decode/`): drafts found in a request's
own context, verified in the step, greedy tokens identical to decoding without them.

The fast tests cover the proposer, the config, where a verification sits in a step, and what a
verification accepts; the engine tests compare whole generations with speculation on and off
(batched, chunked prefill, preemption, stops and limits mid-draft, prefix-cache hits after it),
on a tiny random model and on both real models (SmolLM2 drafting by suffix decoding: its own
tests are in test_suffix_decoding.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.config.engine import EngineConfig, OptionError
from jinfer.config.speculative import SpeculativeConfig
from jinfer.engine.stats import EngineStats
from jinfer.runner.buckets import place
from jinfer.runner.model_runner import StepResult
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.sequence import Sequence
from jinfer.spec_decode import ngram, verify
from jinfer.spec_decode.budget import DraftBudget, StepCost, choose_drafts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


# ------------------------------------------------------------------------------ proposer
@pytest.mark.parametrize(
    "tokens, k, want",
    [
        ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, [4, 5, 9]),  # the 3-gram [1, 2, 3] occurred at 0
        ([7, 1, 2, 8, 3, 1, 2, 9, 5, 1, 2], 2, [9, 5]),  # of two matches, the most recent
        ([1, 2, 3, 7, 2, 3, 8, 1, 2, 3], 2, [7, 2]),  # the longest n first (3 beats 2's later hit)
        ([5, 6, 7, 8], 3, []),  # no earlier occurrence of any suffix
        ([4, 4, 4, 4], 8, [4]),  # a match overlapping the suffix: what follows it, up to the end
    ],
)
def test_prompt_lookup_drafts_what_followed_the_longest_most_recent_match(tokens, k, want):
    assert ngram.propose(np.asarray(tokens, np.int32), k, 2, 4) == want


def test_matches_shorter_than_prompt_lookup_min_draft_nothing():
    tokens = np.asarray([1, 2, 9, 8, 7, 2], np.int32)  # only the 1-gram [2] occurred before
    assert ngram.propose(tokens, 3, 2, 4) == []
    assert ngram.propose(tokens, 3, 1, 4) == [9, 8, 7]


# -------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "raw, error",
    [
        ('{"method": "eagle", "num_speculative_tokens": 3}', "method must be one of ngram"),
        ('{"method": "ngram"}', "needs num_speculative_tokens"),
        ('{"num_speculative_tokens": 3}', "needs a method"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "positive integer, got 0"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "k": 1}', "has no key 'k'"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5}', "exceeds"),
        ("[1]", "must be a JSON object"),
        ("{method: ngram}", "is not JSON"),
    ],
)
def test_a_bad_speculative_config_is_refused_naming_the_problem(raw: str, error: str):
    with pytest.raises(OptionError, match=f"speculative_config .*{error}"):
        EngineConfig(speculative_config=raw)


def test_the_speculative_config_reads_vllms_keys():
    spec = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 5, '
                        '"prompt_lookup_min": 1, "prompt_lookup_max": 3}').speculative  # fmt: skip
    assert spec == SpeculativeConfig("ngram", 5, 1, 3) and spec.enabled
    assert not EngineConfig().speculative.enabled


# ------------------------------------------------------------------------ step layout
def test_a_verification_runs_per_token_in_region_a_not_in_query_blocks():
    # Bucket 48 with 16-token query blocks and max_num_seqs 16: region A is the first 16.
    runs, rows = [1, 5, 20], [0, 1, 2]  # a decode, a token with 4 drafts, a prefill chunk
    p = place(runs, rows, 48, 16, 16, per_token=[False, True, False])
    assert p.starts == [0, 1, 16]  # the verification right after the decode, per token
    assert list(p.block_lens) == [16, 4]  # only the chunk takes blocks
    assert place(runs, rows, 48, 16, 16) is None  # as a prefill run it needs a block of its own


# -------------------------------------------------------------------------- acceptance
def _seq(drafts: list[int]) -> Sequence:
    seq = Sequence("r", [1, 2, 3], SamplingParams(temperature=0), seed=0, arrival=0)
    seq.num_computed_tokens = 3
    seq.draft_token_ids = list(drafts)
    seq.add_placeholder()  # what the engine adds once per sampled sequence
    return seq


def _result(seqs: list[Sequence], tokens: list[int]) -> StepResult:
    n = len(tokens)
    return StepResult(seqs, np.asarray(tokens, np.int32), np.zeros(n, np.float32), None, None,
                      0.0, 0.0)  # fmt: skip


@pytest.mark.parametrize(
    "drafts, rows, kept",
    [
        ([7, 8, 9], [7, 8, 9, 4], [7, 8, 9, 4]),  # all accepted, and the token after them
        ([7, 8, 9], [7, 5, 9, 4], [7, 5]),  # the second is wrong: one accepted, then the fix
        ([7, 8, 9], [6, 8, 9, 4], [6]),  # the first is wrong: a plain decode's token
    ],
)
def test_a_verification_keeps_the_accepted_drafts_and_the_token_after_them(drafts, rows, kept):
    other = _seq([])  # a plain decode in the same step passes through
    seq = _seq(drafts)
    stats = EngineStats()
    out = verify.accept(_result([other, *[seq] * len(rows)], [11, *rows]), stats)
    assert out.tokens.tolist() == [11, *kept] and out.seqs == [other, *[seq] * len(kept)]
    accepted = len(kept) - 1
    assert seq.num_placeholders == len(kept) and seq.num_computed_tokens == 3 + accepted
    assert seq.draft_token_ids == [] and other.num_placeholders == 1
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens) == (1, 3)
    assert stats.spec_num_accepted_tokens == accepted
    assert stats.spec_accepted_per_pos == [1] * accepted + [0] * (3 - accepted)


# ----------------------------------------------------------------------- draft budget
def _cost(per_row: float, per_context: float, per_shared: float, buckets=(1, 2, 4, 8, 16)):
    """The timings a step of `b` rows would give, in ms: 40 + b * per_row, plus per_context
    per token of each request's context, plus per_shared per token of every further row's."""

    def ms(b: int, context: int, requests: int) -> float:
        further = (b - requests) * context
        return (40 + b * per_row + per_context * requests * context + per_shared * further) / 1e3

    timings = {
        b: {
            "short": (64, ms(b, 64, b)),
            "long": (2048, ms(b, 2048, b)),
            "shared": (2048, ms(b, 2048, 1)),
        }
        for b in buckets
    }
    return StepCost.fit(timings)


def test_step_cost_reads_the_bucket_a_step_runs_in_and_never_falls_with_more_rows():
    cost = _cost(1.0, 0.01, 0.004)
    # Three requests and two drafts of the first: a bucket of 8 with three padding rows.
    want = 40 + 8 * 1.0 + 0.01 * 3000 + 0.004 * (2 * 1000 + 3 * 1000)
    assert cost.seconds([1000] * 3, [2, 0, 0]) == pytest.approx(want / 1e3)
    assert cost.seconds([64] * 16, [1] + [0] * 15) == float("inf")  # no bucket holds 17 rows
    noisy = StepCost.fit(
        {
            1: {"short": (64, 0.020), "long": (2048, 0.040), "shared": (2048, 0.040)},
            2: {"short": (64, 0.018), "long": (2048, 0.030), "shared": (2048, 0.025)},
        }
    )
    assert noisy.seconds([2048, 2048], [0, 0]) >= noisy.seconds([2048], [0])


# Costs as measured on SmolLM2 on a 2-core CPU (ms; bench_step.py and a server's steps): rows
# cost their share of the matmuls and their attention; accelerators' rows cost next to nothing.
CPU = _cost(1.7, 0.0067, 0.005)
ACCELERATOR = _cost(0.01, 0.0001, 0.00001)


@pytest.mark.parametrize(
    "contexts, alphas, cost, check",
    [
        # Four decodes at coding agents' contexts, drafts holding about half the time (prompt
        # lookup): on a CPU none pays...
        ([6800] * 4, [0.46] * 4, CPU, lambda k: k == [0, 0, 0, 0]),
        # ... drafts that nearly always hold (suffix decoding on repeated answers) do.
        ([6800] * 4, [0.9] * 4, CPU, lambda k: min(k) >= 1),
        # Where a row costs next to nothing, the half-holding drafts pay too.
        ([6800] * 4, [0.46] * 4, ACCELERATOR, lambda k: min(k) >= 1),
        # A lone stream at a short context whose drafts hold: as many as the bucket allows.
        ([500], [0.9], CPU, lambda k: k[0] >= 7),
        # ... and one whose drafts never hold: none.
        ([500], [0.02], CPU, lambda k: k == [0]),
        # Two requests, one drafting well: the rows go to it.
        ([500, 500], [0.9, 0.1], CPU, lambda k: k[0] >= 3 and k[1] <= 1),
    ],
    ids=["busy-half", "busy-holding", "cheap-rows", "lone-good", "lone-bad", "to-the-good-one"],
)
def test_drafts_are_kept_where_they_raise_tokens_per_second(contexts, alphas, cost, check):
    kept = choose_drafts(contexts, alphas, [8] * len(contexts), 16 - len(contexts), cost)
    assert check(kept), kept


def test_drafts_fill_rows_the_bucket_would_pad_anyway():
    """Three decodes run in a bucket of 4: a fourth row costs the same as its padding, so even a
    draft that rarely holds takes it; a fifth row would take a bucket of 8."""
    assert sum(choose_drafts([2000] * 3, [0.05] * 3, [8] * 3, 13, CPU)) == 1


def test_a_requests_acceptance_starts_at_the_engines_and_follows_its_own():
    budget = DraftBudget(CPU)
    a, b = (Sequence(r, [1, 2], SamplingParams(), seed=0, arrival=0) for r in "ab")
    assert budget.alpha(a) == 0.8  # nothing verified yet: optimistic
    for _ in range(5):
        budget.record(a, 4, 4)  # every draft held
    assert budget.alpha(a) > 0.9
    budget.record(b, 4, 0)
    fresh = budget.alpha(Sequence("c", [1], SamplingParams(), 0, 0))
    assert budget.alpha(b) < 0.8 * fresh < 1
    # Decoding on without drafts, it returns toward the engine's (and may draft again).
    b.output_token_ids += [7] * 60
    assert 0.95 * fresh < budget.alpha(b) < fresh


# ----------------------------------------------------------------------------- engine
def _generate(llm, prompts, params):
    """Each completion's tokens, text, finish reason and logprobs (rounded: a verification row
    and a decode compute the same logits in products of other shapes)."""
    outs = llm.generate(prompts, params, use_tqdm=False)

    def logprobs(c):
        if c.logprobs is None:
            return None
        return [{t: round(lp.logprob, 3) for t, lp in entry.items()} for entry in c.logprobs]

    return [[(c.token_ids, c.text, c.finish_reason, logprobs(c)) for c in o.outputs] for o in outs]


def _requests(rng, vocab: int):
    """Prompts that repeat themselves (what prompt lookup drafts from) and limits that fall
    mid-draft: a stop token, max_tokens, n = 2, and a seeded sampled request."""
    base = rng.integers(3, vocab, 24).tolist()
    prompts = [
        {"prompt_token_ids": base * 3},
        {"prompt_token_ids": rng.integers(3, vocab, 90).tolist()},  # chunked (budget 64)
        {"prompt_token_ids": base[:12] * 4},
        {"prompt_token_ids": rng.integers(3, vocab, 7).tolist()},
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=33, ignore_eos=True, n=2),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[base[5]]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True, top_p=0.9),
    ]
    return prompts, params


def _oracle(prompts, outputs, every: int = 3):
    """A proposer that knows each greedy request's output (speculation off's): it drafts the
    true next tokens, and on every `every`-th call gets the last one wrong, so verifications
    accept all, some and none of their drafts."""
    expected = {
        tuple(p["prompt_token_ids"]): o[0][0] for p, o in zip(prompts, outputs, strict=True)
    }
    calls = [0]

    def propose(tokens, k, min_n, max_n):
        for prompt, out in expected.items():
            n = len(prompt)
            done = tokens[n:].tolist()
            if tuple(tokens[:n].tolist()) == prompt and out[: len(done)] == done:
                drafts = list(out[len(done) : len(done) + k])
                calls[0] += 1
                if drafts and calls[0] % every == 0:
                    drafts[-1] = (drafts[-1] + 1) % 49152
                return drafts
        return []

    return propose


def test_greedy_tokens_equal_speculation_off_through_preemption_and_prefix_hits(
    make_tiny_llm, monkeypatch
):
    """Drafts right, partly right and wrong, verified while requests prefill in chunks, stop
    mid-draft (a stop token, max_tokens), share a prompt (n = 2) and are preempted (12 pages
    for four requests): every output equals speculation off, no program compiles after
    warm-up, no page leaks, and a rerun that hits the prefix cache (pages written while drafts
    were rejected) gives the same tokens."""
    kw = dict(max_num_seqs=8, max_num_batched_tokens=64, num_pages=12, max_model_len=160)
    prompts, params = _requests(np.random.default_rng(0), 49152)
    off = make_tiny_llm(**kw)
    want = _generate(off, prompts, params)
    monkeypatch.setattr(ngram, "propose", _oracle(prompts, want))
    on = make_tiny_llm(**kw, speculative_config=NGRAM)
    compiles = on.engine.num_compiles
    assert _generate(on, prompts, params) == want
    assert on.engine.num_compiles == compiles
    stats = on.engine.stats
    assert stats.spec_num_accepted_tokens > 20 and stats.num_preemptions > 0
    assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # some were rejected
    on.engine.check_invariants()
    assert on.engine.kv_cache_usage() == 0  # every page back (cached ones count as free)
    assert _generate(on, prompts, params) == want  # from the prefix cache this time


def test_warm_up_times_the_decode_buckets_with_their_own_programs(make_tiny_llm):
    """The draft budget's cost model covers every bucket a decode-only step runs in, measured
    with the programs warm-up built (timing compiles nothing)."""
    llm = make_tiny_llm(speculative_config=NGRAM)
    runner, cost = llm.engine.runner, llm.engine.draft_budget.cost
    assert cost.buckets == tuple(b for b in runner.buckets if b <= runner.max_num_seqs)
    assert all(0 < cost.seconds([100] * b, [0] * b) < 10 for b in cost.buckets)
    compiles = llm.engine.num_compiles
    runner.step_cost(reps=1)
    assert llm.engine.num_compiles == compiles


def _step_through(llm, prompts, params, arrive_at: int):
    """Steps the engine by hand: the first request at once, the second at step `arrive_at`;
    each request's final tokens."""
    engine, done = llm.engine, {}
    engine.add_request("a", prompts[0]["prompt_token_ids"], params)
    for i in range(400):
        if i == arrive_at:
            engine.add_request("b", prompts[1]["prompt_token_ids"], params)
        for out in engine.step(finished_only=True):
            done[out.request_id] = out.outputs[0].token_ids
        if i >= arrive_at and not engine.has_unfinished_requests():
            return done
    raise AssertionError("the requests did not finish")


@pytest.mark.parametrize("max_num_seqs", [2, 8])  # the arrival fills the batch / needs a prefill
def test_a_step_planned_while_drafts_are_verified_waits_for_how_many_held(
    make_tiny_llm, monkeypatch, max_num_seqs: int
):
    """A request arrives while another's drafts are on the device: the next step drafts
    nothing (no rows left, or a prompt to prefill), yet where the first request's next token
    goes depends on how many drafts held, so their step lands before the next is planned.
    Both outputs equal speculation off."""
    kw = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=160)
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, 49152, n).tolist()} for n in (20, 40)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _step_through(make_tiny_llm(**kw), prompts, params, arrive_at=5)
    outputs = [[(list(want[r]),)] for r in "ab"]  # (the oracle's shape: `_generate`'s)
    monkeypatch.setattr(ngram, "propose", _oracle(prompts, outputs, every=2))
    on = make_tiny_llm(**kw, speculative_config=NGRAM)
    assert _step_through(on, prompts, params, arrive_at=5) == want
    assert on.engine.stats.spec_num_accepted_tokens > 0
    on.engine.check_invariants()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, spec",
    [("smollm2-135m-instruct", {"method": "suffix"}), ("gemma3-270m", NGRAM)],  # one method each
)
def test_real_model_greedy_code_edit_equals_speculation_off(model: str, spec: dict):
    """A code edit (the file in the prompt, the edited file out), chat, and a stop string that
    falls inside an accepted draft: the same text and tokens with speculation as without."""
    from pathlib import Path

    from jinfer import LLM

    code = Path(ngram.__file__).read_text()
    chats = [
        [{"role": "user", "content": f"Rename `propose` to `draft` in this file:\n\n{code}"}],
        [{"role": "user", "content": "Name three colours."}],
        [{"role": "user", "content": f"Copy this file exactly:\n\n{code}"}],
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=64, stop=["occurrence"]),  # mid-copy
    ]
    kw = dict(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=128)
    results = {}
    for name, extra in (("off", {}), ("on", {"speculative_config": spec})):
        llm = LLM(model, **kw, **extra)
        compiles = llm.engine.num_compiles
        outs = llm.chat(chats, params, use_tqdm=False)
        assert llm.engine.num_compiles == compiles
        results[name] = [
            (o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs
        ]
        if name == "on":
            assert llm.engine.stats.spec_num_accepted_tokens > 10
    assert results["on"] == results["off"]


def test_sampled_requests_draw_the_target_models_tokens_with_drafts(make_tiny_llm, monkeypatch):
    """Rejection sampling of one-token drafts: 64 seeded requests at temperature 1, the even
    seeds drafted with their own tokens, the odd ones with another seed's (plausible, mostly
    wrong), give for every seed exactly the tokens speculation off gives. The target's
    distribution is then reproduced with no sampling error at all (a bound of zero: each draw
    is the one decoding would make)."""
    prompt = np.random.default_rng(5).integers(3, 49152, 12).tolist()
    seeds = list(range(64))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=6, ignore_eos=True) for s in seeds]
    prompts = [{"prompt_token_ids": prompt}] * len(seeds)
    kw = dict(max_num_seqs=16, max_num_batched_tokens=64)
    off = make_tiny_llm(**kw)
    want = [o.outputs[0].token_ids for o in off.generate(prompts, params, use_tqdm=False)]
    assert len({tuple(w) for w in want}) > 32  # the draws differ from seed to seed

    def propose(seqs, drafter, spec, max_model_len):
        for seq in seqs:
            seq.draft_token_ids = []
            if seq.num_uncomputed_tokens == 1 and verify.drafts_allowed(seq):
                source = want[seq.seed if seq.seed % 2 == 0 else (seq.seed + 1) % 64]
                done = seq.num_output_tokens
                seq.draft_token_ids = source[done : min(done + 4, len(source) - 1)]

    monkeypatch.setattr(verify, "propose", propose)
    on = make_tiny_llm(**kw, speculative_config=NGRAM)
    got = [o.outputs[0].token_ids for o in on.generate(prompts, params, use_tqdm=False)]
    stats = on.engine.stats
    assert got == want
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
