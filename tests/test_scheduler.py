"""The scheduler against the runner's layout: every plan fits the bucket ladder's top rung, the
budget is kept in whole query blocks, and every request gets done (random request streams)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from jinfer.runner.buckets import place, prefill_granularity, region_a, token_buckets
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.block_manager import BlockManager
from jinfer.scheduler.scheduler import Scheduler, SchedulerConfig
from jinfer.scheduler.sequence import Sequence

MAX_MODEL_LEN = 320


def _seq(i: int, prompt_len: int, max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(f"r{i}", list(range(prompt_len)), params, seed=0, arrival=i)


@settings(max_examples=150, deadline=None)
@given(
    budget=st.sampled_from([16, 40, 64, 128, 512]),
    max_num_seqs=st.sampled_from([2, 8, 64]),
    query_block=st.sampled_from([1, 4, 16]),
    requests=st.lists(
        st.tuples(st.integers(1, 300), st.integers(1, 6), st.integers(0, 3)), max_size=24
    ),
    lag=st.sampled_from([0, 1]),
    pages=st.sampled_from([64, 4096]),
)
def test_every_plan_fits_the_top_bucket_and_every_request_finishes(
    budget, max_num_seqs, query_block, requests, lag, pages
):
    """`lag` 1 is async scheduling: a step's tokens reach the host after the next step was
    planned (placeholders meanwhile); 64 pages of 16 make requests preempt each other."""
    granularity = prefill_granularity(budget, max_num_seqs, query_block)
    config = SchedulerConfig(max_num_seqs, budget, MAX_MODEL_LEN, granularity)
    scheduler = Scheduler(config, BlockManager(pages, 16))
    top = token_buckets(budget, max_num_seqs, query_block, smallest=1)[-1]
    pending = [(_seq(i, p, o), delay) for i, (p, o, delay) in enumerate(requests)]
    live: list[Sequence] = []
    in_flight: list[list[Sequence]] = []  # per dispatched step: the sequences it sampled
    for step in range(4000):
        for seq, delay in [x for x in pending if x[1] <= step]:  # arrivals over time
            scheduler.add(seq)
            live.append(seq)
            pending.remove((seq, delay))
        if not pending and not scheduler.has_work() and not in_flight:
            break
        plan = scheduler.schedule()
        lengths = [n for _, n in plan.scheduled]
        cost = sum(n if n == 1 else -(-n // granularity) * granularity for n in lengths)
        assert cost <= budget
        rows = [seq.slot for seq, _ in plan.scheduled]
        assert place(lengths, rows, top, max_num_seqs, query_block) is not None, (lengths, top)
        for seq, n in plan.scheduled:
            assert seq.num_computed_tokens + n <= MAX_MODEL_LEN
        scheduler.on_dispatched(plan)
        sampled = [s for s, _ in plan.scheduled if s.num_uncomputed_tokens == 0]
        for seq in sampled:
            seq.add_placeholder()
        in_flight.append(sampled)
        if len(in_flight) > lag or not plan.scheduled:
            for seq in in_flight.pop(0):  # the step's tokens reach the host
                if seq.is_finished:
                    continue
                seq.fill_placeholder(7)
                scheduler.on_token_known(seq)
                if seq.num_output_tokens - seq.num_placeholders == seq.params.max_tokens:
                    scheduler.finish(seq, "length")
        if not plan.scheduled and not in_flight:
            assert not scheduler.running and not scheduler.waiting, "stalled with work left"
    assert all(seq.is_finished for seq in live)
    assert all(seq.output_token_ids == [7] * seq.params.max_tokens for seq in live)


def test_a_full_step_of_mixed_prompts_is_cut_to_whole_blocks():
    """221 + 179 + 112 real tokens would need 33 blocks of 16 for a budget of 32 blocks: the last
    prompt's chunk is cut to whole blocks so the step fits the top rung (A + 512)."""
    scheduler = Scheduler(SchedulerConfig(64, 512, MAX_MODEL_LEN, 16), BlockManager(1024, 16))
    for i, n in enumerate([221, 179, 333]):
        scheduler.add(_seq(i, n, 4))
    plan = scheduler.schedule()
    assert [n for _, n in plan.scheduled] == [221, 179, 96]
    a = region_a(576, 64, 16)
    assert a + 512 == 576 == token_buckets(512, 64, 16)[-1]
    rows = [seq.slot for seq, _ in plan.scheduled]
    assert place([221, 179, 96], rows, 576, 64, 16) is not None


def test_without_query_blocks_the_budget_counts_real_tokens():
    scheduler = Scheduler(
        SchedulerConfig(8, 64, MAX_MODEL_LEN, prefill_granularity(64, 8, 1)), BlockManager(64, 16)
    )
    for i, n in enumerate([30, 30, 30]):
        scheduler.add(_seq(i, n, 2))
    assert [n for _, n in scheduler.schedule().scheduled] == [30, 30, 4]


def test_the_scheduler_package_never_imports_jax():
    """The scheduler is host bookkeeping (numpy): it must import, and run, without JAX."""
    code = (
        "import sys\n"
        "import jinfer.scheduler.block_manager, jinfer.scheduler.prefix_cache\n"
        "import jinfer.scheduler.scheduler, jinfer.scheduler.sequence\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
