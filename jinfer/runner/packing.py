"""One host-to-device copy per buffer: a step's small numpy arrays packed end to end.

A jitted call given ~30 small numpy arrays copies each to the device on its own; on a GPU that is
most of a decode step's host time. `pack` lays the leaves of a pytree (int32, uint32, bool and
float32 arrays) into one int32 and one float32 buffer; `unpack`, inside jit, slices them back at
static offsets. The `Layout` (tree structure, shapes, dtypes) is a hashable static argument, so
each bucket still compiles once.

Nothing is wrapped or rounded on the way: numpy refuses a Python int a leaf's dtype cannot hold
when the arrays are filled, and `pack` refuses a float32 leaf holding inf or NaN and any dtype it
does not pack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INT_KINDS = ("int32", "uint32", "bool")


@dataclasses.dataclass(frozen=True)
class Layout:
    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str, int], ...]  # (shape, dtype, offset in its buffer)


def pack(tree: Any) -> tuple[Layout, np.ndarray, np.ndarray]:
    """(layout, int32 buffer [Ni], float32 buffer [Nf]) holding every leaf of `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    specs = []
    n_int = n_float = 0
    for leaf in leaves:
        a = np.asarray(leaf)
        kind = a.dtype.name
        if kind == "float32":
            specs.append((a.shape, kind, n_float))
            floats.append(a.ravel())
            n_float += a.size
        elif kind in _INT_KINDS:
            flat = a.astype(np.int32) if kind == "bool" else a.view(np.int32)
            specs.append((a.shape, kind, n_int))
            ints.append(flat.ravel())
            n_int += a.size
        else:
            raise TypeError(f"cannot pack a {kind} array (int32, uint32, bool, float32 only)")
    ibuf = np.concatenate(ints) if ints else np.zeros(0, np.int32)
    fbuf = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    if not np.isfinite(fbuf).all():
        _refuse_non_finite(tree)
    return Layout(treedef, tuple(specs)), ibuf, fbuf


def _refuse_non_finite(tree: Any) -> None:
    """ValueError naming the float32 leaf that holds inf or NaN: a value that overflowed on
    its way in (the request checks keep values in range; this is the last line)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if a.dtype == np.float32 and not np.isfinite(a).all():
            raise ValueError(f"cannot pack {jax.tree_util.keystr(path)}: inf or NaN in float32")


def unpack(layout: Layout, ibuf: jax.Array, fbuf: jax.Array) -> Any:
    """The tree `pack` was given, rebuilt from the two buffers (call inside jit)."""
    leaves = []
    for shape, kind, offset in layout.leaves:
        size = math.prod(shape)
        if kind == "float32":
            leaves.append(fbuf[offset : offset + size].reshape(shape))
            continue
        a = ibuf[offset : offset + size].reshape(shape)
        if kind == "bool":
            a = a != 0
        elif kind == "uint32":
            a = jax.lax.bitcast_convert_type(a, jnp.uint32)
        leaves.append(a)
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)
