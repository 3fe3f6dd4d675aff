"""The GPU split-K decode kernel (interpret mode on CPU) vs its pure-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from paged_cases import assert_close, edge_lengths, make_case

from pallas_kernels.attention import decode_gpu
from pallas_kernels.attention.block_sizes import GpuBlocks, decode_splits

PAGE = 4
# On a GPU machine (scripts/gpu_check.sh) the same cases run the compiled kernels.
INTERPRET = jax.default_backend() != "gpu"

CASES = [
    dict(q_per_kv=1, head_dim=128, window=None, softcap=None, dtype=jnp.float32, splits=3),
    dict(q_per_kv=3, head_dim=64, window=6, softcap=None, dtype=jnp.float32, splits=4),
    dict(q_per_kv=4, head_dim=64, window=None, softcap=25.0, dtype=jnp.bfloat16, splits=1),
    dict(q_per_kv=8, head_dim=256, window=9, softcap=None, dtype=jnp.bfloat16, splits=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "gqa{q_per_kv}-h{head_dim}".format(**c))
def test_decode_kernel_matches_reference(case):
    kv = edge_lengths(PAGE) + [29]
    c = make_case(
        case["q_per_kv"] + case["head_dim"],
        kv_lens=kv,
        q_lens=[1] * len(kv),
        page=PAGE,
        kv_heads=2,
        q_per_kv=case["q_per_kv"],
        head_dim=case["head_dim"],
        dtype=case["dtype"],
    )
    q, k_pages, v_pages, kv_lens, pages, _ = c.args
    q = jnp.concatenate([q, q[:1]])  # the padding row (kv_len 0) gets a query too
    opts = dict(window=case["window"], softcap=case["softcap"])
    blocks = GpuBlocks(g_pad=8, block_q=1, block_kv=16, num_warps=4, num_stages=2)
    got = decode_gpu.paged_decode_attention(
        q, k_pages, v_pages, kv_lens, pages, **opts, blocks=blocks,
        num_splits=case["splits"], interpret=INTERPRET,
    )  # fmt: skip
    want = decode_gpu.reference(q, k_pages, v_pages, kv_lens, pages, **opts)
    assert_close(got, want, case["dtype"])


def test_split_count_fills_the_gpu_only_when_batch_is_small():
    assert decode_splits(1, 8, 16384, 64) == 33  # batch 1, Llama-3-8B: ~2 waves of 132 SMs
    assert decode_splits(64, 8, 4096, 64) == 1  # batch 64: already 512 programs
    assert decode_splits(1, 8, 64, 64) == 1  # never more splits than key tiles


def test_decode_kernel_lowers_to_triton():
    c = make_case(
        3, kv_lens=[17, 40], q_lens=[1, 1], page=16, kv_heads=2, q_per_kv=4, head_dim=128,
        dtype=jnp.bfloat16,
    )  # fmt: skip
    q, k_pages, v_pages, kv_lens, pages, _ = c.args
    fn = jax.jit(lambda *a: decode_gpu.paged_decode_attention(*a, window=8, num_splits=2))
    text = fn.trace(q, k_pages, v_pages, kv_lens, pages).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in text.as_text()
