"""The GPU ragged paged-attention kernel (interpret mode on CPU) vs its pure-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from paged_cases import assert_close, edge_lengths, make_case

from pallas_kernels.attention import ragged_gpu
from pallas_kernels.attention.block_sizes import GpuBlocks, gpu_blocks

PAGE = 4
# On a GPU machine (scripts/gpu_check.sh) the same cases run the compiled kernels.
INTERPRET = jax.default_backend() != "gpu"


def _mixed_batch(page: int) -> tuple[list[int], list[int]]:
    """Decodes at every page edge, a one-page chunk, a long prefill chunk, a whole prompt."""
    kv = edge_lengths(page) + [37, 9]
    q = [1] * len(edge_lengths(page)) + [20, 9]
    q[4] = page  # a chunk of exactly one page ending on a page edge
    return kv, q


# Each required value appears at least once: GQA 1/3/4/8, head_dim 64/128/256, window on/off,
# soft-cap on/off, float32/bfloat16, small tiles (many key tiles and query blocks) and defaults.
CASES = [
    dict(q_per_kv=1, head_dim=64, window=None, softcap=None, dtype=jnp.float32, small=True),
    dict(q_per_kv=3, head_dim=128, window=5, softcap=None, dtype=jnp.float32, small=True),
    dict(q_per_kv=4, head_dim=256, window=None, softcap=30.0, dtype=jnp.bfloat16, small=False),
    dict(q_per_kv=8, head_dim=64, window=7, softcap=20.0, dtype=jnp.bfloat16, small=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "gqa{q_per_kv}-h{head_dim}".format(**c))
def test_ragged_kernel_matches_reference(case):
    kv, q = _mixed_batch(PAGE)
    c = make_case(
        case["q_per_kv"] * 10 + case["head_dim"],
        kv_lens=kv,
        q_lens=q,
        page=PAGE,
        kv_heads=2,
        q_per_kv=case["q_per_kv"],
        head_dim=case["head_dim"],
        dtype=case["dtype"],
    )
    blocks = None
    if case["small"]:
        g_pad = gpu_blocks(case["head_dim"], case["q_per_kv"]).g_pad
        blocks = GpuBlocks(
            g_pad, block_q=max(1, 16 // g_pad), block_kv=16, num_warps=4, num_stages=2
        )
    opts = dict(window=case["window"], softcap=case["softcap"])
    got = ragged_gpu.ragged_paged_attention(*c.args, **opts, blocks=blocks, interpret=INTERPRET)
    want = ragged_gpu.reference(*c.args, **opts)
    assert_close(got, want, case["dtype"])


def test_tokens_past_the_last_sequence_get_zeros():
    c = make_case(1, kv_lens=[5, 3], q_lens=[2, 1], page=PAGE, kv_heads=1, q_per_kv=2, head_dim=64)
    q = jnp.concatenate([c.q, jnp.ones_like(c.q[:2])])  # two trailing tokens no sequence owns
    got = ragged_gpu.ragged_paged_attention(q, *c.args[1:], interpret=INTERPRET)
    assert_close(got[:3], ragged_gpu.reference(*c.args), jnp.float32)
    assert not got[3:].any()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_ragged_kernel_lowers_to_triton(head_dim):
    """Lowering (not compiling) for CUDA runs on CPU: catches unsupported ops before a GPU run."""
    c = make_case(
        2,
        kv_lens=[17, 40],
        q_lens=[1, 30],
        page=16,
        kv_heads=2,
        q_per_kv=4,
        head_dim=head_dim,
        dtype=jnp.bfloat16,
    )
    fn = jax.jit(lambda *a: ragged_gpu.ragged_paged_attention(*a, window=8, softcap=30.0))
    text = fn.trace(*c.args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
