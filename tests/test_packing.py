"""Packing a step's inputs into two buffers loses nothing: every leaf comes back bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jinfer.runner.packing import pack, unpack
from jinfer.sample.metadata import SamplingBatch
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler.sequence import Sequence


def test_pack_round_trips_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    tree = {
        "tokens": rng.integers(-5, 50000, 37).astype(np.int32),
        "tables": rng.integers(0, 900, (4, 9)).astype(np.int32),
        "seed": np.array([0, 1, 2**32 - 1, 2**31], np.uint32),
        "mask": rng.random((3, 5)) < 0.5,
        "flag": np.bool_(True),
        "temps": rng.random(4).astype(np.float32),
        "bias": np.full((2, 3), -1e30, np.float32),
        "empty": np.zeros((0,), np.int32),
    }
    layout, ibuf, fbuf = pack(tree)
    assert ibuf.dtype == np.int32 and fbuf.dtype == np.float32
    back = jax.jit(unpack, static_argnums=0)(layout, ibuf, fbuf)
    for name, want in tree.items():
        got = np.asarray(back[name])
        assert got.dtype == np.asarray(want).dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_layout_is_a_static_key_equal_for_equal_shapes():
    a, _, _ = pack({"x": np.zeros(3, np.int32), "y": np.ones(2, np.float32)})
    b, _, _ = pack({"x": np.ones(3, np.int32), "y": np.zeros(2, np.float32)})
    c, _, _ = pack({"x": np.zeros(4, np.int32), "y": np.ones(2, np.float32)})
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_pack_names_an_unsupported_dtype():
    with pytest.raises(TypeError, match="float64"):
        pack({"x": np.zeros(2, np.float64)})


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_pack_refuses_a_non_finite_float_naming_its_leaf(bad):
    temps = np.ones(4, np.float32)
    temps[2] = bad
    with pytest.raises(ValueError, match=r"\['temps'\]: inf or NaN"):
        pack({"ids": np.zeros(2, np.int32), "temps": temps})


def _escaped(**values) -> Sequence:
    """A sequence whose params hold values the request checks would have refused."""
    params = SamplingParams(temperature=1.0)
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return Sequence("r", [1, 2], params, seed=0, arrival=0)


def test_a_sampling_value_past_int32_is_refused_where_it_is_packed_never_wrapped():
    with pytest.raises(OverflowError):
        SamplingBatch.from_sequences([_escaped(top_k=2**40)], 2, history_len=8)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_sampling_value_past_float32_is_refused_where_it_is_packed():
    batch = SamplingBatch.from_sequences([_escaped(temperature=1e300)], 2, history_len=8)
    with pytest.raises(ValueError, match="temperature.*inf or NaN"):
        pack(batch)
