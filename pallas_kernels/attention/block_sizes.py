"""Block sizes of the kernels, derived from head_dim, page size and the GQA group, in one place.

Why these numbers (GPU, Triton lowering):

- Tiles must have power-of-two sides, and `tl.dot` wants every side >= 16.
- The query tile is `block_q` tokens x `g_pad` query heads of one kv head: all heads that share a
  kv head are processed together, so each key/value row is read once per kv head, not per query
  head. Its height M = block_q * g_pad is 32 for the ragged kernel: enough rows for prefill
  chunks to use the tensor cores, few enough that a decode row (1 valid token of 32) wastes only
  compute, which decode has to spare (it is bound by KV reads).
- The key tile holds `block_kv` keys of width H in registers/shared memory twice (K and V):
  block_kv * H = 8192 elements (16 KiB in bf16 per tile) keeps two tiles plus the fp32
  accumulator [M, H] inside one SM's budget at num_warps=4: block_kv = 128 / 64 / 32 for
  H = 64 / 128 / 256. Keys are gathered slot by slot through the block table, so block_kv need
  not be a multiple of the page size; when it is (page sizes 16/32) every tile reads whole pages.
- Split-K (decode): enough splits that sequences x kv heads x splits fills the GPU about twice
  (~2 x 132 SMs on an H100), never more splits than key tiles in the longest sequence.

TPU (Mosaic): the kernel DMAs whole pages [Z, K, H] (all kv heads of a page are contiguous in the
[P, Z, K, H] pool) into VMEM, `pages_per_block` at a time, so that one block holds ~256 keys
(>= the 128-lane MXU width) without exceeding ~2 MiB of VMEM per buffer.
"""

from __future__ import annotations

import dataclasses

GPU_TILE_ELEMENTS = 8192  # block_kv * head_dim
GPU_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs
TPU_KEYS_PER_BLOCK = 256
TPU_BLOCK_BYTES = 2 << 20


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def floor_pow2(x: int) -> int:
    return 1 << max(0, x.bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    g_pad: int  # query heads per kv head, padded to a power of two
    block_q: int  # query tokens per tile
    block_kv: int  # keys per tile
    num_warps: int
    num_stages: int

    @property
    def block_m(self) -> int:
        return self.block_q * self.g_pad


def gpu_blocks(head_dim: int, num_q_per_kv: int, *, rows: int = 32) -> GpuBlocks:
    """Tiles for the Triton kernels; `rows` is the target query-tile height M."""
    g_pad = next_pow2(num_q_per_kv)
    block_q = max(1, rows // g_pad)
    block_kv = min(128, max(16, floor_pow2(GPU_TILE_ELEMENTS // head_dim)))
    num_warps = 8 if head_dim >= 256 else 4
    return GpuBlocks(g_pad, block_q, block_kv, num_warps, num_stages=2)


def decode_splits(num_seqs: int, num_kv_heads: int, max_kv_len: int, block_kv: int) -> int:
    """How many key ranges (split-K) each (sequence, kv head) of a decode batch is cut into."""
    programs = num_seqs * num_kv_heads
    want = -(-GPU_TARGET_PROGRAMS // programs)
    most = max(1, -(-max_kv_len // block_kv))
    return max(1, min(want, most))


def tpu_pages_per_block(page_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Pages per KV block of the TPU kernel: ~256 keys, under ~2 MiB per buffer."""
    page_bytes = page_size * num_kv_heads * head_dim * itemsize
    by_keys = max(1, TPU_KEYS_PER_BLOCK // page_size)
    by_bytes = max(1, TPU_BLOCK_BYTES // page_bytes)
    return max(1, min(by_keys, by_bytes))
