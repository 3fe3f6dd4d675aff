"""Compilation: JAX's persistent cache (on by default), and the compile counter.

The persistent cache makes a restart load compiled steps from disk. Where:
`$JINFER_COMPILE_CACHE` if set, else `~/.cache/jinfer/xla`. Set it to an empty string to turn
the cache off. A directory the user already gave JAX (`jax_compilation_cache_dir`) wins.

`num_compiles` counts XLA compilations in the process: after warm-up it must stay still.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

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


_MAPS = Path("/proc/self/maps")
_MAX_MAPS = Path("/proc/sys/vm/max_map_count")


def memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the kernel's limit), or None where /proc has neither."""
    try:
        return _MAPS.read_bytes().count(b"\n"), int(_MAX_MAPS.read_text())
    except (OSError, ValueError):
        return None


def bound_compiled_programs(headroom: int = 20_000) -> bool:
    """Drops JAX's in-memory compilation caches when fewer than `headroom` memory maps are left.

    XLA:CPU maps each compiled program's code in ~50 regions, and JAX keeps every program it has
    compiled (jinfer's step functions are module-level jits, shared by engines of one shape). A
    process that builds many engines -- a sweep over configurations, a test suite -- reaches the
    kernel's limit (vm.max_map_count, 65530 by default) and the next compile aborts the process.
    Programs still in use afterwards compile again on their next call (or load from the
    persistent cache). Returns whether it dropped them."""
    maps = memory_maps()
    if maps is None or maps[1] - maps[0] >= headroom:
        return False
    log.warning(
        "%d of %d memory maps in use: dropping JAX's compiled programs to stay under the limit",
        *maps,
    )
    jax.clear_caches()
    return True


_compiles = 0


_compiles_lock = threading.Lock()


_listener_installed = False


def _on_event(event: str, duration: float, **_: Any) -> None:
    global _compiles
    if event == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles += 1


def num_compiles() -> int:
    """XLA compilations in this process since jinfer started counting."""
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listener_installed = True
    return _compiles


num_compiles()  # start counting at import
