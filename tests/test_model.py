"""The weight product (`models/layers.py: dense`): float32 accumulation, and the CPU padding of
bf16 GEMVs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models.layers import BF16_MIN_ROWS_CPU, dense


@pytest.mark.parametrize("rows", [1, BF16_MIN_ROWS_CPU - 1, BF16_MIN_ROWS_CPU, 9])
def test_dense_is_the_float32_product_of_its_rows(rows):
    """Any row count, including single rows (padded on CPU), gives the float32 product of the
    bf16 inputs rounded to bf16, or unrounded with out_dtype=float32."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((96, 40)), jnp.bfloat16)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)  # [rows, 40]
    got = dense("td,df->tf", x, w)
    assert got.shape == (rows, 40) and got.dtype == jnp.bfloat16
    # Within one bf16 step of the rounded exact product (summation order may differ).
    rounded = np.asarray(jnp.asarray(exact).astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), rounded, rtol=2**-7, atol=1e-6)
    wide = dense("td,df->tf", x, w, jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wide), exact, rtol=1e-5, atol=1e-5)


def test_dense_keeps_float32_inputs_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 16)), jnp.float32)  # [T, N, H] against [N, H, D]
    w = jnp.asarray(rng.standard_normal((8, 16, 24)), jnp.float32)
    got = dense("tnh,nhd->td", x, w)
    assert got.dtype == jnp.float32
    want = np.einsum("tnh,nhd->td", np.asarray(x), np.asarray(w))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
