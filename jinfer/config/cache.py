"""The paged KV cache's geometry, shared by the host allocator and the device pool (no JAX).

The host (`scheduler/block_manager.py`) numbers pages and hands them to requests; the device
(`attention/kv_cache.py`) holds them. Both read the rules here:

    pool: pages 0 .. num_pages - 1, each `page_size` token slots, per layer, keys and values
    page 0 (SCRATCH_PAGE) is never handed out: padding tokens write there, and the attention
    tells padding from real tokens by it, so padded shapes never touch a request's data
"""

from __future__ import annotations

from jinfer.config.model import ModelConfig

SCRATCH_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` positions."""
    return -(-num_tokens // page_size)


def bytes_per_page(cfg: ModelConfig, page_size: int, itemsize: int) -> int:
    """Bytes one page costs across all layers, keys and values, at `itemsize` bytes a value."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def num_pages_to_fit(
    cfg: ModelConfig,
    page_size: int,
    itemsize: int,
    memory_gb: float,
    max_num_seqs: int,
    max_model_len: int,
) -> int:
    """The pool that fits in `memory_gb`, but never more than every request slot at full length
    needs (plus the scratch page), and at least 2 pages."""
    fit = int(memory_gb * 2**30 // bytes_per_page(cfg, page_size, itemsize))
    full = max_num_seqs * pages_for(max_model_len, page_size) + 1
    return max(2, min(fit, full))
