"""Random ragged paged-attention batches for the kernel tests.

Every batch has KV lengths that hit the page edges (1, Z-1, Z, Z+1, multiples of Z), pages
scattered at random over the pool, and every pool page that no sequence owns (the scratch page 0
included) filled with NaN: a kernel that reads past a sequence's keys produces NaN.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class PagedCase:
    q: jnp.ndarray  # [T, N, H]
    k_pages: jnp.ndarray  # [P, Z, K, H]
    v_pages: jnp.ndarray  # [P, Z, K, H]
    kv_lens: jnp.ndarray  # [S] int32
    page_indices: jnp.ndarray  # [S, Pmax] int32
    cu_q_lens: jnp.ndarray  # [S + 1] int32

    @property
    def args(self) -> tuple:
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_indices, self.cu_q_lens)


def edge_lengths(page: int) -> list[int]:
    """KV lengths every test batch includes."""
    return [1, page - 1, page, page + 1, 2 * page, 3 * page - 1]


def make_case(
    seed: int,
    *,
    kv_lens: list[int],
    q_lens: list[int],
    page: int,
    kv_heads: int,
    q_per_kv: int,
    head_dim: int,
    dtype=jnp.float32,
    extra_rows: int = 1,
    max_pages: int | None = None,
) -> PagedCase:
    """One batch; q_lens[s] <= kv_lens[s] tokens of sequence s are this step's queries.

    `extra_rows` unused rows (q_len 0, kv_len 0, pages all 0) follow the real ones, as in the
    engine's padded batches.
    """
    rng = np.random.default_rng(seed)
    pages_needed = [-(-n // page) for n in kv_lens]
    max_pages = max_pages or max(pages_needed) + 1
    num_pages = sum(pages_needed) + 3  # a few pages nobody owns, besides scratch page 0
    shape = (num_pages, page, kv_heads, head_dim)
    k_pages = rng.standard_normal(shape).astype(np.float32)
    v_pages = rng.standard_normal(shape).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    rows = len(kv_lens) + extra_rows
    tables = np.zeros((rows, max_pages), np.int32)
    for s, n in enumerate(pages_needed):
        tables[s, :n] = [free.pop() for _ in range(n)]
    owned = set(tables.ravel().tolist()) - {0}
    for p in range(num_pages):
        if p not in owned:
            k_pages[p] = np.nan
            v_pages[p] = np.nan
    lens = np.zeros(rows, np.int32)
    lens[: len(kv_lens)] = kv_lens
    cu = np.zeros(rows + 1, np.int32)
    cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1 :] = cu[len(q_lens)]
    t = int(cu[-1])
    q = rng.standard_normal((t, kv_heads * q_per_kv, head_dim)).astype(np.float32)
    q /= np.sqrt(head_dim)
    return PagedCase(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        kv_lens=jnp.asarray(lens),
        page_indices=jnp.asarray(tables),
        cu_q_lens=jnp.asarray(cu),
    )


# float32 kernels agree with the float32 reference to rounding; bfloat16 inputs and the bf16
# probabilities in the P @ V matmul (as on the GPU's tensor cores) cost ~3 significant digits.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def assert_close(got, want, dtype) -> None:
    got = np.asarray(got, np.float32)
    assert np.all(np.isfinite(got)), "kernel output has NaN/inf (read an unowned page?)"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=tol, rtol=tol)
