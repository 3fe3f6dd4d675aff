"""jinfer's GGUF reader against the `gguf` package's: same metadata, same tensors, clear errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from jinfer.loader import gguf_file

Q = gguf.GGMLQuantizationType


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("test.u32", 7)
    w.add_int64("test.i64", -5)
    w.add_float32("test.f32", 0.25)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.strs", ["a", "", "ünï"])
    w.add_array("test.ints", [1, 2, 3])
    for name, (arr, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif qtype == Q.BF16:
            bits = (arr.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact below
            w.add_tensor(name, bits, raw_shape=arr.shape, raw_dtype=Q.BF16)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_small_file_of_every_plain_type_and_q8_0_reads_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bf16_exact = (rng.standard_normal((4, 64), np.float32).view(np.uint32) & 0xFFFF0000).view(
        np.float32
    )
    tensors = {
        "a.f32": (rng.standard_normal((3, 5, 32), np.float32), Q.F32),
        "b.f16": (rng.standard_normal((8, 32)).astype(np.float16).astype(np.float32), Q.F16),
        "c.bf16": (bf16_exact, Q.BF16),
        "d.q8_0": (rng.standard_normal((6, 64), np.float32), Q.Q8_0),
    }
    path = tmp_path / "small.gguf"
    _write(path, tensors)
    f = gguf_file.read(path)
    assert f.metadata["test.u32"] == 7 and f.metadata["test.i64"] == -5
    assert f.metadata["test.f32"] == 0.25 and f.metadata["test.bool"] is True
    assert f.metadata["test.str"] == "héllo"
    assert f.metadata["test.strs"] == ["a", "", "ünï"] and f.metadata["test.ints"] == [1, 2, 3]
    assert f.metadata["general.architecture"] == "llama"
    assert set(f.tensors) == set(tensors)
    for name, (want, qtype) in tensors.items():
        got = gguf_file.dequantize(f.tensors[name])
        assert got.shape == want.shape and got.dtype == np.float32
        tol = 0.02 * np.abs(want).max() if qtype == Q.Q8_0 else 0.0
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert gguf_file.read_metadata(path) == f.metadata


def test_real_model_file_matches_the_gguf_package(smollm2_gguf_path: str) -> None:
    ours = gguf_file.read(smollm2_gguf_path)
    theirs = gguf.GGUFReader(smollm2_gguf_path)
    assert ours.metadata.keys() == theirs.fields.keys() - {
        k for k in theirs.fields if k.startswith("GGUF.")
    }
    for key in ("general.architecture", "llama.block_count", "tokenizer.ggml.tokens"):
        assert ours.metadata[key] == theirs.fields[key].contents()
    by_name = {t.name: t for t in theirs.tensors}
    assert ours.tensors.keys() == by_name.keys()
    seen = set()
    for name, t in ours.tensors.items():  # one tensor of each type: Q4_1, Q8_0, F32
        ref = by_name[name]
        if ref.tensor_type in seen:
            continue
        seen.add(ref.tensor_type)
        want = gguf.quants.dequantize(ref.data, ref.tensor_type)
        want = want.reshape(tuple(int(x) for x in reversed(ref.shape)))
        np.testing.assert_array_equal(gguf_file.dequantize(t), want)
    assert len(seen) == 3


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:100], "past the end"),
        (lambda b: b"GGUF" + (9).to_bytes(4, "little") + b[8:], "unsupported GGUF version 9"),
        (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path: Path, mangle, message: str) -> None:
    path = tmp_path / "m.gguf"
    _write(path, {"x": (np.ones((2, 32), np.float32), Q.F32)})
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        gguf_file.read(path)
