"""The TPU ragged paged-attention kernel in Pallas's TPU interpreter (simulated DMAs and
semaphores, NaN-filled VMEM, race detection) vs its pure-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # races_found lives here
from jax.experimental.pallas import tpu as pltpu
from paged_cases import assert_close, edge_lengths, make_case

from pallas_kernels.attention import ragged_tpu

PAGE = 4

CASES = [
    dict(q_per_kv=1, head_dim=64, window=None, softcap=None, dtype=jnp.float32, block_q=4),
    dict(q_per_kv=3, head_dim=128, window=5, softcap=20.0, dtype=jnp.float32, block_q=8),
    dict(q_per_kv=4, head_dim=64, window=7, softcap=None, dtype=jnp.bfloat16, block_q=4),
    dict(q_per_kv=8, head_dim=256, window=None, softcap=30.0, dtype=jnp.bfloat16, block_q=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "gqa{q_per_kv}-h{head_dim}".format(**c))
def test_tpu_kernel_matches_reference_without_races(case):
    kv = edge_lengths(PAGE) + [37, 9]
    q = [1] * len(edge_lengths(PAGE)) + [20, 9]
    q[4] = PAGE  # a one-page chunk ending on a page edge
    c = make_case(
        case["q_per_kv"] * 7 + case["head_dim"],
        kv_lens=kv,
        q_lens=q,
        page=PAGE,
        kv_heads=2,
        q_per_kv=case["q_per_kv"],
        head_dim=case["head_dim"],
        dtype=case["dtype"],
    )
    opts = dict(window=case["window"], softcap=case["softcap"])
    got = ragged_tpu.ragged_paged_attention(
        *c.args,
        **opts,
        block_q=case["block_q"],
        pages_per_block=2,  # several double-buffered key blocks per sequence
        interpret=pltpu.InterpretParams(detect_races=True),
    )
    assert_close(got, ragged_tpu.reference(*c.args, **opts), case["dtype"])
    assert not interpret_pallas_call.races.races_found


def test_sequences_may_share_block_table_rows():
    """The engine's padding tokens are one-token sequences that all read block-table row 0."""
    c = make_case(5, kv_lens=[6, 3], q_lens=[2, 3], page=PAGE, kv_heads=1, q_per_kv=2, head_dim=64)
    q, k_pages, v_pages, kv_lens, pages, cu_q_lens = c.args
    # Sequence 2 re-reads row 0 (as a one-token run at position 0).
    kv_lens3 = jnp.array([6, 3, 1], jnp.int32)
    cu3 = jnp.array([0, 2, 5, 6], jnp.int32)
    rows = jnp.array([0, 1, 0], jnp.int32)
    q3 = jnp.concatenate([q, q[:1]])
    got = ragged_tpu.ragged_paged_attention(
        q3, k_pages, v_pages, kv_lens3, pages, cu3, rows, block_q=4, interpret=True
    )
    want = ragged_tpu.reference(q3, k_pages, v_pages, kv_lens3, pages[rows], cu3)
    assert_close(got, want, jnp.float32)


def test_tpu_kernel_lowers_to_mosaic():
    """JAX's Mosaic lowering runs on CPU (the Mosaic compiler itself needs a TPU)."""
    c = make_case(
        2, kv_lens=[17, 40], q_lens=[1, 30], page=16, kv_heads=2, q_per_kv=4, head_dim=128,
        dtype=jnp.bfloat16,
    )  # fmt: skip
    fn = jax.jit(lambda *a: ragged_tpu.ragged_paged_attention(*a, window=8, softcap=30.0))
    text = fn.trace(*c.args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
