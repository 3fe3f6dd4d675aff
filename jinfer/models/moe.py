"""A mixture-of-experts MLP, dropless, in static shapes: every token runs its top X experts.

The router scores each token over the E experts (float32 softmax, a bias first for gpt-oss),
keeps the top X and, with `norm_topk_prob`, renormalizes their weights (for gpt-oss, which
takes the softmax of the top X scores, the same thing). The T*X (token, expert) rows are then
run through their experts' SwiGLU MLPs (gpt-oss: clamped, biased) as grouped products, and
summed back per token with the router's weights. No capacity factor, no token dropped, one
program for any routing. The grouped product is chosen by platform and row count (at trace
time: T is the step's bucket, static), from `scripts/bench_moe.py`'s measurements:

    kernel    (GPU) rows sorted by expert through `pallas_kernels/moe/grouped_matmul_gpu.py`,
              tiles of one expert each: XLA:GPU expands `lax.ragged_dot` into a dense product
              over every expert (E times the FLOPs, an [R, E, D] temporary).
    ragged    (TPU, and GPU widths the kernel does not tile) rows sorted by expert,
              `lax.ragged_dot` with the group sizes counted on the device. XLA:CPU lowers it
              densely too, 3-32x the floor.
    gather    (CPU, few rows) each row times its own expert's weights, gathered per row: reads
              exactly the active weights, 1.0x the floor for one token; per-row copies make it
              slow for many.
    blocked   (CPU, many rows) the sorted rows padded to whole blocks of `BLOCK` rows per expert,
              each block one batched product with its expert's weights: at most
              ceil(T*X / BLOCK) + min(E, T*X) blocks, 1.5-2.3x the floor at 32-128 tokens.

Over n > 1 tensor-parallel devices (`ModelConfig.tensor_parallel_size`) the experts run inside
`shard_map`, each device its share, and one all-reduce of [T, D] (float32) sums the shares per
token. Tensor parallelism gives each device 1/n of every expert's width; expert parallelism
(`ModelConfig.expert_parallel`, `enable_expert_parallel`) gives each device E / n experts whole
and runs only the rows routed to them (the others masked: the same static shapes, no capacity).
Attention is tensor parallel, so every device already holds every token's activations: an
all-to-all dispatch would move tokens to devices that have them (it pays once attention is data
parallel and tokens are split over devices), so both reduce once, after the rows are combined
per token. GSPMD left to itself reduces the [T*X, D] rows (or the blocked product's padded
blocks) instead: `scripts/bench_expert_parallel.py`, 8 devices, 32 experts, top 4, D 1024, KiB
per layer at T = 1 / 32 / 128: GSPMD 16 / 1536 / 3072, shard_map 4 / 128 / 512. On CPU expert
parallelism computes ~n times more than tensor parallelism (XLA:CPU's static products run
another device's rows too, masked: 4-14x slower there); the GPU kernel runs only the rows its
group sizes count, a device's own (another device's sort last, in no group; TPU's ragged_dot:
to be measured). Widths the mesh does not divide stay with GSPMD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from jinfer.config.model import ModelConfig
from jinfer.distributed.sharding import TP
from jinfer.models.layers import activation, dense
from jinfer.models.params import LayerParams
from pallas_kernels.moe import grouped_matmul_gpu
from pallas_kernels.moe.grouped_matmul_gpu import MIN_DOT

BLOCK = 8  # rows per block of the blocked product
GATHER_MAX_ROWS = 64  # CPU: up to this many (token, expert) rows, gather; beyond, blocked
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")  # [E, ...] each


def moe_block(
    cfg: ModelConfig, p: LayerParams, x: jax.Array, platform: str | None = None
) -> jax.Array:  # [T, D]
    """`platform`: what the step is compiled for ("gpu", "tpu", "cpu"; None: the default
    backend), which picks the grouped product."""
    platform = platform or jax.default_backend()
    t, top = x.shape[0], cfg.num_experts_per_tok
    scores = dense("td,de->te", x, p.router, jnp.float32)  # [T, E]
    if p.router_bias is not None:
        scores = scores + p.router_bias.astype(jnp.float32)
    weights, experts = jax.lax.top_k(jax.nn.softmax(scores, axis=-1), top)  # [T, X]
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    flat = experts.reshape(-1)  # [R] R = T*X rows, token-major
    w = weights.reshape(t * top, 1)  # [R, 1]
    n = cfg.tensor_parallel_size
    if n > 1 and (cfg.expert_parallel or cfg.moe_intermediate_size % n == 0):
        return _sharded(cfg, p, x, flat, w, platform)
    # (one device, or widths the mesh does not divide: GSPMD partitions the products)
    return _combine(_experts(cfg, p, x, flat, top, platform), w, top, x.dtype)


def _combine(out: jax.Array, w: jax.Array, top: int, dtype) -> jax.Array:  # [R, D] -> [T, D]
    """Each token's X rows summed with the router's weights w [R, 1]."""
    r, d = out.shape
    return jnp.sum((out * w).reshape(r // top, top, d), axis=1).astype(dtype)


def _experts(
    cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int, platform: str
):
    """[R, D] float32: row r (token r // X) through expert flat[r] of p's experts (p's arrays
    may be one device's share: the shapes are read from them)."""
    if platform == "gpu" and _kernel_fits(p):
        return _ragged(cfg, p, x, flat, top, _kernel_product)
    if platform != "cpu":
        return _ragged(cfg, p, x, flat, top)
    if flat.shape[0] <= GATHER_MAX_ROWS:
        return _gathered(cfg, p, x, flat, top)
    return _blocked(cfg, p, x, flat, top)


def _sharded(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat, w, platform: str):
    """The experts over the n tensor-parallel devices, inside shard_map: each device runs its
    share (expert parallelism: its E / n experts' rows, whole; else every row through its 1/n
    of every expert's width), and one all-reduce of [T, D] sums the shares per token."""
    n, top = cfg.tensor_parallel_size, cfg.num_experts_per_tok
    local = cfg.num_experts // n  # experts per device (expert parallelism)
    if cfg.expert_parallel:  # every expert weight by its experts axis [E, ...]
        split = {k: (TP,) for k in EXPERT_WEIGHTS}
    else:  # by the width C: gate, up [E, D, C], their biases [E, C], down [E, C, D]; the down
        # bias [E, D] is added after the all-reduce (once, not once per device)
        split = {"w_gate": (None, None, TP), "w_up": (None, None, TP), "w_down": (None, TP),
                 "b_gate": (None, TP), "b_up": (None, TP)}  # fmt: skip
    weights = {k: getattr(p, k) for k in split if getattr(p, k) is not None}
    specs = {k: PartitionSpec(*split[k]) for k in weights}

    def run(x, flat, w, weights):  # one device's share of the experts
        ids, mine = flat, None
        if cfg.expert_parallel:
            lo = jax.lax.axis_index(TP) * local
            mine = (flat >= lo) & (flat < lo + local)  # [R]
            # Another device's rows go to expert `local` (none: the products leave them out or
            # compute garbage that the mask drops).
            ids = jnp.where(mine, flat - lo, local)
        out = _experts(cfg, LayerParams(*[None] * 6, **weights), x, ids, top, platform)
        if mine is not None:
            out = jnp.where(mine[:, None], out, 0.0)  # [R, D] float32
        return jax.lax.psum(_combine(out, w, top, jnp.float32), TP)

    y = jax.shard_map(
        run,
        mesh=AbstractMesh((n,), (TP,)),
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(), specs),
        out_specs=PartitionSpec(),
    )(x, flat, w, weights)  # [T, D] float32
    if "b_down" not in weights and p.b_down is not None:
        y = y + _combine(jnp.take(p.b_down, flat, axis=0).astype(jnp.float32), w, top, y.dtype)
    return y.astype(x.dtype)


def _glu(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:  # float32 [R, C]
    if cfg.swiglu_limit is None:
        return activation(cfg, gate) * up
    limit = cfg.swiglu_limit  # gpt-oss: clamped, and up shifted by one
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(cfg.swiglu_alpha * gate)


def _swiglu(cfg: ModelConfig, product, rows: jax.Array, row_expert, p: LayerParams) -> jax.Array:
    """down(glu(gate(rows), up(rows))) with `product(lhs, w)` the grouped weight product and
    `row_expert` [rows] each row's expert (for the experts' biases, where they have them)."""

    def bias(b: jax.Array | None):
        if b is None:
            return 0.0
        return jnp.take(b, row_expert, axis=0, mode="clip").astype(jnp.float32)  # [rows, C|D]

    gate = product(rows, p.w_gate) + bias(p.b_gate)  # [R, C] float32
    up = product(rows, p.w_up) + bias(p.b_up)
    return product(_glu(cfg, gate, up).astype(rows.dtype), p.w_down) + bias(p.b_down)  # [R, D]


# Each product takes `flat` [R] with values in [0, e], e = p's expert count: a row of expert e
# (another device's, under expert parallelism) runs nowhere or on garbage, for the caller to mask.


def _kernel_fits(p: LayerParams) -> bool:
    """The GPU kernel tiles D and C by 16 (Triton's dot); other widths keep ragged_dot."""
    _, d, c = p.w_gate.shape
    return d % MIN_DOT == 0 and c % MIN_DOT == 0


def _kernel_product(lhs: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    return grouped_matmul_gpu.grouped_matmul(lhs, w, sizes)  # [R, out] float32


def _ragged_dot(lhs: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, w, sizes, preferred_element_type=jnp.float32)


def _ragged(
    cfg: ModelConfig,
    p: LayerParams,
    x: jax.Array,
    flat: jax.Array,
    top: int,
    grouped=_ragged_dot,  # (rows sorted by expert, [E, in, out], sizes [E]) -> [R, out]
):
    e = p.w_gate.shape[0]
    order = jnp.argsort(flat, stable=True)  # rows by expert (expert e's last)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E] (expert e's not counted)

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # run i times expert i's weight
        return grouped(lhs, w, sizes)

    out = _swiglu(cfg, product, x[order // top], flat[order], p)  # [R, D] in expert order
    return jnp.zeros_like(out).at[order].set(out)  # back to token order


def _gathered(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int):
    rows = jnp.repeat(x, top, axis=0)  # [R, D]

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # [R, in] x [R, in, out]
        mine = jnp.take(w, flat, axis=0, mode="clip")  # [R, in, out] (expert e's: e - 1's)
        return jnp.einsum("ri,rio->ro", lhs, mine, preferred_element_type=jnp.float32)

    return _swiglu(cfg, product, rows, flat, p)


def _blocked(cfg: ModelConfig, p: LayerParams, x: jax.Array, flat: jax.Array, top: int):
    e, r = p.w_gate.shape[0], flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)  # [E] (expert e's rows not counted: no blocks)
    padded = (sizes + BLOCK - 1) // BLOCK * BLOCK  # each expert's rows to whole blocks
    ends = jnp.cumsum(padded)
    starts, firsts = ends - padded, jnp.cumsum(sizes) - sizes
    by_expert = flat[order]
    nb = -(-r // BLOCK) + min(e, r)  # the most blocks any routing needs (static)
    dest = starts[by_expert] + jnp.arange(r) - firsts[by_expert]  # [R] row in the blocks
    dest = jnp.where(by_expert < e, dest, nb * BLOCK)  # expert e's rows: nowhere
    block_expert = jnp.searchsorted(ends, jnp.arange(nb) * BLOCK, side="right")
    block_expert = jnp.minimum(block_expert, e - 1)  # [NB] (past the last: empty blocks)
    rows = jnp.zeros((nb * BLOCK, x.shape[1]), x.dtype).at[dest].set(x[order // top], mode="drop")

    def product(lhs: jax.Array, w: jax.Array) -> jax.Array:  # blocks x their experts' weights
        blocks = lhs.reshape(nb, BLOCK, -1)
        out = jnp.einsum(
            "bni,bio->bno", blocks, w[block_expert], preferred_element_type=jnp.float32
        )
        return out.reshape(nb * BLOCK, -1)

    row_expert = jnp.repeat(block_expert, BLOCK)  # [NB * BLOCK]
    out = _swiglu(cfg, product, rows, row_expert, p)[jnp.minimum(dest, nb * BLOCK - 1)]
    return jnp.zeros_like(out).at[order].set(out)  # [R, D] in token order
