"""The GPU grouped matmul (`pallas_kernels/moe/grouped_matmul_gpu.py`) in Pallas's interpreter:
`lax.ragged_dot`'s contract for any routing (empty groups, every row in one group, rows past
the groups, partial tiles), and it lowers for CUDA to a Triton kernel with no branch outside.
On a GPU (scripts/gpu_check.sh) the same cases run compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.runner.lowering import control_flow
from pallas_kernels.moe.grouped_matmul_gpu import grouped_matmul, reference, work_list

INTERPRET = jax.default_backend() != "gpu"  # compiled on a GPU (scripts/gpu_check.sh)

CASES = {  # rows M, experts E, K, N, group sizes (None: random)
    "random": (37, 8, 64, 32, None),
    "empty-groups": (8, 4, 32, 48, [3, 0, 5, 0]),
    "one-group-has-all": (40, 4, 16, 16, [0, 0, 40, 0]),
    "rows-past-the-groups": (20, 4, 16, 16, [2, 3, 0, 1]),  # 14 rows in no group: zero
    "one-row": (1, 8, 32, 32, [0, 0, 0, 0, 0, 1, 0, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernel_is_ragged_dot(case: str, dtype: str):
    m, e, k, n, sizes = CASES[case]
    rng = np.random.default_rng(0)
    if sizes is None:
        sizes = np.bincount(rng.integers(0, e, m), minlength=e)
    sizes = jnp.asarray(np.asarray(sizes, np.int32))
    lhs = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    rhs = jnp.asarray(rng.standard_normal((e, k, n), np.float32), dtype)
    got = np.asarray(grouped_matmul(lhs, rhs, sizes, interpret=INTERPRET))
    want = np.asarray(reference(lhs, rhs, sizes))
    tol = 1e-4 if dtype == "float32" else 2e-2 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    np.testing.assert_array_equal(got[int(sizes.sum()) :], 0.0)


@pytest.mark.parametrize("block_m", [16, 64])
def test_the_work_list_covers_every_grouped_row_once(block_m: int):
    rng = np.random.default_rng(1)
    for _ in range(20):
        e, m = int(rng.integers(1, 40)), int(rng.integers(1, 300))
        sizes = np.bincount(rng.integers(0, e, int(rng.integers(0, m + 1))), minlength=e)
        group, first, rows = (np.asarray(a) for a in work_list(jnp.asarray(sizes), m, block_m))
        assert len(group) == -(-m // block_m) + min(e, m)  # the static bound holds
        covered = np.concatenate([np.arange(f, f + r) for f, r in zip(first, rows, strict=True)])
        np.testing.assert_array_equal(np.sort(covered), np.arange(sizes.sum()))
        owner = np.repeat(np.arange(e), sizes)  # each row's group
        for g, f, r in zip(group, first, rows, strict=True):
            assert r == 0 or np.all(owner[f : f + r] == g)


def test_the_kernel_lowers_for_cuda_to_one_triton_call_and_no_branch():
    args = (
        jax.ShapeDtypeStruct((64, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((32, 256, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((32,), jnp.int32),
    )
    lowered = jax.jit(grouped_matmul).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text.lower()
    flow = control_flow(lowered)
    assert flow.cases == 0 and flow.ifs == 0 and flow.dynamic_loops == 0, flow
