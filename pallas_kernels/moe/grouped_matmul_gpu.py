"""Grouped matmul for NVIDIA GPUs (Pallas, Triton lowering): `lax.ragged_dot`'s contract, run
as tiles of one expert each.

Why not `lax.ragged_dot` itself on GPU: XLA:GPU's `RaggedDotRewriter` expands it into a dense
dot over a group-masked, group-broadcast copy of the rows ([M, K] becomes [M, E, K]) unless the
cuDNN ragged-dot fusion is on: E times the FLOPs, and for Qwen3-30B-A3B's 128 experts at a
64-token decode step a 256 MB temporary per projection. A mixture of experts is bandwidth-bound
at decode, so the kernel's job is to read each used expert's weights once and the rows once.

Rows come sorted by group (group g: `group_sizes[g]` rows after group g - 1's); rows past the
last group are not computed and come back zero (as `ragged_dot`'s). The work list is tiles of
`block_m` rows of one group (a group's last tile partial), at most ceil(M / block_m) + min(E, M)
of them: a static bound, so one program serves any routing; tiles past the list's end do nothing.
Grid: (tiles, N / block_n); a program multiplies its rows [block_m, K] (a masked row gather) by
its group's weight tile [K, block_n] in `block_k` steps, accumulating in float32. Tiles
partition each group's rows, so no two programs write the same output row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_DOT = 16  # Triton's dot wants every tile side >= 16


def reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The kernel's contract in plain JAX: `lax.ragged_dot` accumulated in float32."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def work_list(group_sizes: jax.Array, m: int, block_m: int):
    """(group, first row, rows) [NT] int32 of every tile, NT = ceil(m / block_m) + min(E, m)
    (static); rows 0 past the used tiles."""
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    tiles = (sizes + block_m - 1) // block_m  # [E] tiles of each group
    tile_ends = jnp.cumsum(tiles)
    row_starts = jnp.cumsum(sizes) - sizes  # [E] each group's first row
    nt = -(-m // block_m) + min(e, m)
    t = jnp.arange(nt, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), e - 1).astype(jnp.int32)
    within = t - (tile_ends[group] - tiles[group])  # tile index inside its group
    first = row_starts[group] + within * block_m
    rows = jnp.clip(sizes[group] - within * block_m, 0, block_m)
    rows = jnp.where(t < tile_ends[-1], rows, 0).astype(jnp.int32)
    return group, first.astype(jnp.int32), rows


def _tile_kernel(
    group_ref,  # [NT] int32
    first_ref,  # [NT] int32
    rows_ref,  # [NT] int32
    lhs_ref,  # [M + Bm, K] (padded: every tile's rows are in range)
    rhs_ref,  # [E, K, N]
    zeros_ref,  # [M + Bm, N] float32 (aliased to out_ref: rows no tile writes stay zero)
    out_ref,  # [M + Bm, N] float32
    *,
    block_m: int,
    block_n: int,
    block_k: int,
):
    del zeros_ref
    t, j = pl.program_id(0), pl.program_id(1)
    rows = rows_ref[t]

    @pl.when(rows > 0)
    def _():
        g, first = group_ref[t], first_ref[t]
        row_ok = (jnp.arange(block_m, dtype=jnp.int32) < rows)[:, None]  # [Bm, 1]
        f32 = lhs_ref.dtype == jnp.float32

        def body(i, acc):
            a = plgpu.load(
                lhs_ref.at[pl.ds(first, block_m), pl.ds(i * block_k, block_k)],
                mask=row_ok,
                other=0.0,
            )  # [Bm, Bk]: the next tile's rows masked off
            b = rhs_ref[g, pl.ds(i * block_k, block_k), pl.ds(j * block_n, block_n)]  # [Bk, Bn]
            return acc + plgpu.dot(a, b, allow_tf32=False if f32 else None)

        k = lhs_ref.shape[1]
        acc = jax.lax.fori_loop(0, k // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        dst = out_ref.at[pl.ds(first, block_m), pl.ds(j * block_n, block_n)]
        plgpu.store(dst, acc, mask=row_ok)  # the rows of this tile only


def _block(size: int, most: int) -> int:
    """The largest power of two <= `most` dividing `size` (at least MIN_DOT)."""
    b = most
    while b > MIN_DOT and size % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("block_m", "interpret"))
def grouped_matmul(
    lhs: jax.Array,  # [M, K], rows sorted by group
    rhs: jax.Array,  # [E, K, N]
    group_sizes: jax.Array,  # [E] int32, sum <= M
    *,
    block_m: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] float32
    """Row r of group g times rhs[g], for the rows the groups count (the rest zero).

    Args:
      lhs: [M, K] rows, group 0's first, then group 1's, ...
      rhs: [E, K, N] each group's weights.
      group_sizes: [E] rows per group.
      block_m: rows per tile (default: 16, up to 64 when groups average that many rows).
      interpret: run on CPU through Pallas's interpreter (tests).
    """
    m, k = lhs.shape
    e, k2, n = rhs.shape
    if k2 != k:
        raise ValueError(f"lhs has K={k}, rhs [E, K, N] has K={k2}")
    if k % MIN_DOT or n % MIN_DOT:
        raise ValueError(f"K={k} and N={n} must be multiples of {MIN_DOT} (Triton's dot tiles)")
    if block_m is None:
        block_m = max(MIN_DOT, min(64, 1 << max(0, (m // max(e, 1)).bit_length() - 1)))
    block_n, block_k = _block(n, 128), _block(k, 64)
    group, first, rows = work_list(group_sizes, m, block_m)
    nt = group.shape[0]
    kernel = functools.partial(_tile_kernel, block_m=block_m, block_n=block_n, block_k=block_k)
    padded = jnp.pad(lhs, ((0, block_m), (0, 0)))  # [M + Bm, K]: a tile never runs off the end
    out = pl.pallas_call(
        kernel,
        grid=(nt, n // block_n),
        out_shape=jax.ShapeDtypeStruct((m + block_m, n), jnp.float32),
        input_output_aliases={5: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(group, first, rows, padded, rhs, jnp.zeros((m + block_m, n), jnp.float32))
    return out[:m]
