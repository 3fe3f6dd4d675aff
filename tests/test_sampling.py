"""The device sampler: each setting does what it says, and seeded rows ignore their neighbours."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jinfer.sample.metadata import SamplerVariant, SamplingBatch
from jinfer.sample.sampler import argmax, sample
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.sequence import Sequence

V = 50


def _seq(params: SamplingParams, seed: int = 0, prompt=(1, 2, 3), outputs=()) -> Sequence:
    s = Sequence("r", list(prompt), params, seed=seed, arrival=0)
    s.output_token_ids = list(outputs)
    return s


def _sample(logits: np.ndarray, seqs: list[Sequence], rows: int | None = None):
    rows = rows or len(seqs)
    batch = SamplingBatch.from_sequences(seqs, rows, history_len=64)
    padded = np.zeros((rows, logits.shape[1]), np.float32)
    padded[: len(logits)] = logits
    out = sample(padded, batch)
    return np.asarray(out.tokens)[: len(seqs)], out


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, V)).astype(np.float32) * 3


def test_greedy_takes_the_argmax(logits):
    tokens, _ = _sample(logits, [_seq(SamplingParams(temperature=0)) for _ in range(4)])
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_argmax_matches_numpy_on_ties_infinities_and_nan():
    rows = np.random.default_rng(1).standard_normal((6, 1000)).astype(np.float32)
    rows[1, [7, 300, 999]] = 50.0  # a tie: the first index wins
    rows[2] = -np.inf  # nothing finite: index 0
    rows[3, 500] = np.inf
    rows[4, [20, 40]] = np.nan  # NaN counts as the maximum, as in numpy
    rows[5, :] = 0.0
    np.testing.assert_array_equal(np.asarray(argmax(rows)), rows.argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
    ],
)
def test_filters_narrowed_to_one_token_equal_greedy(logits, params):
    tokens, _ = _sample(logits, [_seq(params, seed=i) for i in range(4)])
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_only_samples_from_the_k_best(logits):
    seqs = [_seq(SamplingParams(temperature=5.0, top_k=3), seed=s) for s in range(4)]
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    for counter in range(20):
        for s in seqs:
            s.output_token_ids = [0] * counter
        tokens, _ = _sample(logits, seqs)
        assert all(tokens[i] in top3[i] for i in range(4))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)], np.float32))
    seen = set()
    for seed in range(200):
        tokens, _ = _sample(logits, [_seq(SamplingParams(temperature=1.0, top_p=0.7), seed)])
        seen.add(int(tokens[0]))
    assert seen == {0, 1}


def test_seeded_rows_do_not_depend_on_the_batch(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    alone, _ = _sample(logits[2:3], [_seq(params, seed=7)])
    others = [_seq(SamplingParams(temperature=0.5), seed=s) for s in (1, 2)]
    together, _ = _sample(logits[[0, 1, 2]], others + [_seq(params, seed=7)], rows=8)
    assert alone[0] == together[2]


def test_repetition_penalty_avoids_seen_tokens(logits):
    best = int(logits[0].argmax())
    s = _seq(SamplingParams(temperature=0, repetition_penalty=100.0), prompt=[best])
    tokens, _ = _sample(logits[:1], [s])
    assert tokens[0] != best


def test_frequency_penalty_counts_outputs_only(logits):
    best = int(logits[0].argmax())
    in_prompt = _seq(SamplingParams(temperature=0, frequency_penalty=2.0), prompt=[best] * 5)
    tokens, _ = _sample(logits[:1], [in_prompt])
    assert tokens[0] == best
    in_output = _seq(SamplingParams(temperature=0, frequency_penalty=2.0), outputs=[best] * 10)
    tokens, _ = _sample(logits[:1], [in_output])
    assert tokens[0] != best


def test_min_tokens_bans_stop_tokens(logits):
    best = int(logits[0].argmax())
    s = _seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[best]))
    tokens, _ = _sample(logits[:1], [s])
    assert tokens[0] != best
    s.output_token_ids = [5, 5]
    tokens, _ = _sample(logits[:1], [s])
    assert tokens[0] == best


def test_logprobs_are_the_raw_distribution(logits):
    s = _seq(SamplingParams(temperature=0, logprobs=5))
    _, out = _sample(logits[:1], [s])
    want = logits[0] - np.log(np.exp(logits[0]).sum())
    order = np.argsort(-want)[:5]
    np.testing.assert_array_equal(np.asarray(out.top_ids)[0, :5], order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0, :5], want[order], atol=1e-5)
    np.testing.assert_allclose(float(out.logprobs[0]), want[order[0]], atol=1e-5)


def _many_rows(params: SamplingParams, probs: np.ndarray, n: int) -> np.ndarray:
    """n draws from one distribution: n rows with seeds 0..n-1 in one batch."""
    logits = np.tile(np.log(probs).astype(np.float32), (n, 1))
    tokens, _ = _sample(logits, [_seq(params, seed=s) for s in range(n)])
    return np.bincount(tokens, minlength=len(probs)) / n


def test_sampled_frequencies_follow_the_tempered_distribution():
    # 600 tokens (3 blocks of 256 minus padding): the two-level inverse CDF crosses blocks.
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(600, 0.05))
    freq = _many_rows(SamplingParams(temperature=2.0), probs, 8192)
    want = probs**0.5 / np.sum(probs**0.5)
    # The same statistic for exact draws (numpy's multinomial): ours must be no worse than noise.
    noise = [np.abs(rng.multinomial(8192, want) / 8192 - want).sum() for _ in range(50)]
    assert np.abs(freq - want).sum() < np.quantile(noise, 0.99) * 1.1


def test_top_p_draws_follow_the_renormalized_nucleus():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04] + [1e-30] * (V - 6))
    freq = _many_rows(SamplingParams(temperature=1.0, top_p=0.75), probs, 8192)
    want = np.array([0.4, 0.25, 0.15] + [0] * (V - 3)) / 0.8
    np.testing.assert_allclose(freq, want, atol=0.025)


def _reference_kept(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """How many tokens each row keeps, as vLLM and transformers filter: sort, keep the top k,
    renormalize, keep the smallest prefix of them reaching top_p."""
    order = np.sort(scaled, axis=-1)[:, ::-1][:, : top_k or scaled.shape[1]]
    p = np.exp(order - order[:, :1])
    p /= p.sum(-1, keepdims=True)
    return (np.cumsum(p, -1) - p < top_p).sum(-1)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.999), (300, 1.0), (40, 0.95), (700, 0.5)])
def test_filters_beyond_the_candidates_keep_what_the_candidates_keep(top_k, top_p):
    """A flat-ish distribution: the nucleus and k exceed 2 candidates, forcing CPU's bisection
    (top-k) and its test after the draw (top-p); an accelerator's radix searches settle both."""
    import jax.numpy as jnp

    from jinfer.sample.filtering import top_k_top_p_threshold

    rng = np.random.default_rng(top_k)
    scaled = jnp.asarray(rng.standard_normal((3, 1000)).astype(np.float32))
    temp = jnp.ones((3, 1))
    hi = scaled.max(-1, keepdims=True)
    weights = np.asarray(jnp.exp(scaled - hi))
    seqs = [_seq(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))] * 3
    batch = SamplingBatch.from_sequences(seqs, 3, history_len=8)

    def kept(f):
        """[B, V]: what the threshold keeps, and of that, a nucleus left to the draw: the tokens
        whose heavier tokens weigh less than its share of its mass (`sample/nucleus.py`)."""
        w = np.where(np.asarray(scaled) >= np.asarray(f.threshold), weights, 0.0)
        mass = np.asarray(f.mass)
        target = np.asarray(f.share) * np.where(mass > 0, mass, weights.sum(-1))
        heavier = np.where(w[:, None, :] > w[:, :, None], w[:, None, :], 0.0).sum(-1)
        return (w > 0) & (heavier < target[:, None])

    got = {c: kept(top_k_top_p_threshold(scaled, temp, hi, batch, candidates=c)) for c in (1000, 2)}
    np.testing.assert_array_equal(got[2], got[1000])
    # An accelerator's "top_p" variant: the radix search for every row, no candidates.
    radix = dataclasses.replace(batch, variant=SamplerVariant(penalties=False, filtering="top_p"))
    f = top_k_top_p_threshold(scaled, temp, hi, radix)
    assert np.all(np.asarray(f.share) == np.inf)  # the threshold settles every row
    np.testing.assert_array_equal(np.asarray(scaled >= f.threshold), got[1000])
    np.testing.assert_array_equal(
        got[1000].sum(-1), _reference_kept(np.asarray(scaled), top_k, top_p)
    )


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0)] * 3,
        [SamplingParams(temperature=0.8), SamplingParams(temperature=0)],
        [SamplingParams(temperature=1.0, top_k=40), SamplingParams(temperature=0.7, top_k=5)],
        [
            SamplingParams(temperature=1.0, top_k=50, top_p=0.6),
            SamplingParams(temperature=0, logprobs=3),
        ],
        [SamplingParams(temperature=1.0, top_k=300), SamplingParams(temperature=0.5, min_p=0.1)],
        [SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5)],
    ],
    ids=["greedy", "sampled", "top_k", "top_p+logprobs", "wide_top_k+min_p", "penalties"],
)
def test_host_decided_variants_sample_what_the_device_decided_program_does(params):
    """Accelerators pick a `SamplerVariant` per batch on the host (no conditional in any
    program); CPU's one program decides on the device. Both give the same tokens and logprobs
    (a top-p without a top-k is drawn otherwise on CPU: the next test)."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    seqs = [_seq(p, seed=i, outputs=[5, 9]) for i, p in enumerate(params)]
    results = []
    for on_host in (False, True):
        batch = SamplingBatch.from_sequences(seqs, 4, history_len=64, decide_on_host=on_host)
        assert (batch.variant is not None) == on_host
        out = sample(logits, batch)
        n = len(seqs)
        results.append((np.asarray(out.tokens)[:n], np.asarray(out.logprobs)[:n]))
        if any(p.logprobs for p in params):
            results[-1] += (np.asarray(out.top_ids)[:n], np.asarray(out.top_logprobs)[:n])
    for device, host in zip(*results, strict=True):
        np.testing.assert_array_equal(device, host)


def test_top_p_alone_draws_the_same_nucleus_on_cpu_as_on_accelerators():
    """CPU draws from the whole row and redraws a token outside the nucleus; an accelerator's
    "top_p" variant draws inside an exact threshold. Other tokens for a seed, one distribution:
    the renormalized nucleus, which no draw leaves."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(300) * 2).astype(np.float32)  # a nucleus of ~100 tokens
    n = 4096
    probs = np.exp(logits - logits.max()).astype(np.float64)
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = order[(np.cumsum(probs[order]) - probs[order]) < 0.8]
    want = np.zeros_like(probs)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    noise = [np.abs(rng.multinomial(n, want) / n - want).sum() for _ in range(50)]
    seqs = [_seq(SamplingParams(temperature=1.0, top_p=0.8), seed=i) for i in range(n)]
    for on_host in (False, True):
        batch = SamplingBatch.from_sequences(seqs, n, history_len=8, decide_on_host=on_host)
        tokens = np.asarray(sample(np.tile(logits, (n, 1)), batch).tokens)
        assert set(tokens.tolist()) <= set(nucleus.tolist())
        freq = np.bincount(tokens, minlength=len(probs)) / n
        assert np.abs(freq - want).sum() < np.quantile(noise, 0.99) * 1.1


def test_filtered_rows_draw_the_same_whatever_shares_the_batch():
    """On CPU a top-k row draws from its candidates and a top-p row is redrawn outside its
    nucleus: each the same alone as beside rows that widen the candidates read (a larger
    top-k) or are redrawn themselves."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((5, 1000)).astype(np.float32)  # flat: many redraws
    mine = [
        _seq(SamplingParams(temperature=1.0, top_k=20), seed=3),
        _seq(SamplingParams(temperature=1.0, top_p=0.5), seed=4),
    ]
    others = [
        _seq(SamplingParams(temperature=1.0, top_k=100), seed=5),
        _seq(SamplingParams(temperature=0.7, top_p=0.3), seed=6),
        _seq(SamplingParams(temperature=0)),
    ]
    batch = [others[0], mine[0], others[1], mine[1], others[2]]
    for counter in range(20):
        for s in mine + others:
            s.output_token_ids = [0] * counter
        alone, _ = _sample(logits[:2], mine)
        together, _ = _sample(logits[[2, 0, 3, 1, 4]], batch, rows=8)
        assert alone.tolist() == together[[1, 3]].tolist()


def test_top_k_keeps_every_token_tied_at_its_kth_value():
    """As a threshold keeps them (vLLM too): 5 tokens at 2.0, then 400 tied at 1.0, so a top-k
    of 10 keeps 405 tokens, more than any candidates CPU reads hold: those rows draw from the
    whole row."""
    logits = np.full(1000, -np.inf, np.float32)
    logits[:5] = 2.0
    logits[100:500] = 1.0
    n = 2048
    seqs = [_seq(SamplingParams(temperature=1.0, top_k=10), seed=i) for i in range(n)]
    tokens, _ = _sample(np.tile(logits, (n, 1)), seqs)
    tied = set(tokens.tolist()) - set(range(5))
    assert tied <= set(range(100, 500)) and len(tied) > 300


def test_the_host_picks_the_variant_a_batch_needs():
    def variant(*params):
        seqs = [_seq(p) for p in params]
        v = SamplingBatch.from_sequences(seqs, 4, history_len=8, decide_on_host=True).variant
        return v.penalties, v.filtering

    greedy, hot = SamplingParams(temperature=0, top_k=5), SamplingParams(temperature=0.8)
    assert variant(greedy) == (False, "none")  # a greedy row's top_k filters nothing
    assert variant(greedy, hot) == (False, "none")
    assert variant(hot, SamplingParams(temperature=1, top_k=128)) == (False, "top_k")
    assert variant(SamplingParams(temperature=1, top_k=129)) == (False, "top_p")  # beyond
    assert variant(SamplingParams(temperature=1, top_k=5, top_p=0.9)) == (False, "top_k")
    assert variant(SamplingParams(temperature=1, top_p=0.9)) == (False, "top_p")
    assert variant(SamplingParams(temperature=0, frequency_penalty=1.0)) == (True, "none")


def test_a_row_without_top_k_keeps_every_token_beside_rows_with_one():
    """A batch mixing plain sampling with top-k rows: the plain row's distribution is not cut to
    the top-k candidates (host-decided "top_k" variant and device-decided program alike)."""
    logits = np.tile(-1e-3 * np.arange(1000, dtype=np.float32), (2, 1))  # about flat, ids in order
    seqs = [
        _seq(SamplingParams(temperature=1.0), seed=0),
        _seq(SamplingParams(temperature=1.0, top_k=5), seed=1),
    ]
    for on_host in (False, True):
        drawn = set()
        for counter in range(200):
            for s in seqs:
                s.output_token_ids = [0] * counter
            batch = SamplingBatch.from_sequences(seqs, 2, history_len=8, decide_on_host=on_host)
            tokens = np.asarray(sample(logits, batch).tokens)
            assert tokens[1] < 5  # the top-k are the first ids
            drawn.add(int(tokens[0]))
        assert max(drawn) >= 128, sorted(drawn)[-5:]  # beyond the 128 candidates


def test_top_p_applies_to_what_top_k_keeps():
    """top_k=2, top_p=0.5 over [0.4, 0.3, 0.2, 0.1]: renormalized, the top two are [4/7, 3/7],
    and 4/7 alone reaches 0.5, so only the best token is ever drawn (vLLM and transformers
    filter so); top-p over the whole distribution would keep two (0.4 < 0.5)."""
    probs = np.array([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)[None, :]
    seen = set()
    for seed in range(300):
        params = SamplingParams(temperature=1.0, top_k=2, top_p=0.5)
        tokens, _ = _sample(logits, [_seq(params, seed)])
        seen.add(int(tokens[0]))
    assert seen == {0}


@pytest.mark.parametrize("weighted", [False, True], ids=["count", "mass"])
def test_radix_search_finds_the_largest_value_reaching_the_target(weighted):
    """Against a brute force over each row's own values: ties, negative and zero values (-0.0
    too), -inf, a floor above some values, a target nothing reaches."""
    import jax
    import jax.numpy as jnp

    from jinfer.sample.filtering import radix_search

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 300)) * 4).astype(np.float32)
    x[0, :100] = 1.5  # ties at the answer
    x[1, :50] = -np.inf
    x[2, ::3] = 0.0
    x[2, 1::3] = -0.0
    x[3] = np.round(x[3])  # few distinct values
    w = np.exp(x - x.max(-1, keepdims=True)) if weighted else np.ones_like(x)
    total = w.sum(-1)
    target = np.array([0.3, 0.9, 0.5, 0.7, 0.99, 2.0])[:, None] * total[:, None]
    if not weighted:
        target = np.round(target / total[:, None] * 120)
    floor = np.array([-50.0, -50.0, -1.0, -2.0, 0.5, -50.0], np.float32)[:, None]
    got = jax.jit(radix_search)(
        jnp.asarray(x),
        jnp.asarray(w) if weighted else None,
        jnp.asarray(target, jnp.float32),
        jnp.asarray(floor),
    )
    for r in range(len(x)):
        values = sorted({float(v) for v in x[r] if v >= floor[r, 0]}, reverse=True)
        reach = [v for v in values if w[r][x[r] >= v].sum() >= np.float32(target[r, 0])]
        want = reach[0] if reach else floor[r, 0]
        assert got[r, 0] == want, (r, float(got[r, 0]), want)


@pytest.mark.parametrize("c", [1, 5, 40, 128])
def test_best_tokens_are_top_ks_values_and_their_tokens(c):
    """The two-stage read (block maxima, then the best blocks) gives lax.top_k's values, and
    distinct tokens that hold them: ties across and within blocks, -inf, a vocabulary that is
    no whole number of blocks."""
    import jax

    from jinfer.sample.filtering import best_tokens

    rng = np.random.default_rng(c)
    x = rng.standard_normal((5, 3001)).astype(np.float32)
    x[1, ::7] = 2.5  # many ties at the top
    x[2, :2990] = -np.inf
    x[3] = np.round(x[3] * 2)  # few distinct values
    x[4, -1] = 9.0  # the best token in the last, partial block
    want = np.asarray(jax.lax.top_k(x, c)[0])
    values, ids = (np.asarray(a) for a in best_tokens(x, c))
    np.testing.assert_array_equal(values, want)
    for row, value, token in zip(x, values, ids, strict=True):
        finite = np.isfinite(value)
        assert len(set(token.tolist())) == c
        np.testing.assert_array_equal(row[token[finite]], value[finite])
