"""JAX's persistent compilation cache, on by default: a restart loads compiled steps from disk.

Where: `$JINFER_COMPILE_CACHE` if set, else `~/.cache/jinfer/xla`. Set it to an empty string to
turn the cache off. A directory the user already gave JAX (`jax_compilation_cache_dir`) wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

_DEFAULT = Path.home() / ".cache" / "jinfer" / "xla"


def enable_persistent_cache() -> str | None:
    """Points JAX at the cache directory (once per process); returns it, or None when off."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.environ.get("JINFER_COMPILE_CACHE", str(_DEFAULT))
    if not path:
        return None
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program, not just slow ones: the many small step variants add up at start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("XLA compilation cache: %s", path)
    return path
