"""Checkpoint files: versions 0-2 read by mmap, written back exactly, and malformed files rejected."""

import struct

import numpy as np
import pytest

from conftest import TINY, asset, random_weights
from llama2 import Llama, formats
from llama2.errors import FormatError
from llama2.formats import llama2c


def test_three_versions_hold_the_same_weights():
    v0 = llama2c.load(asset("stories260K.bin"))
    v1 = llama2c.load(asset("stories260K_v1.bin"))
    assert (v0.version, v1.version) == (0, 1)
    assert v0.config == v1.config
    for name in v0.weights:
        np.testing.assert_array_equal(v0.dense(name), v1.dense(name))
    assert isinstance(v0.weights["wq"], np.memmap) or v0.weights["wq"].base is not None  # a view


def test_q8_dequantized_within_half_a_scale():
    fp = llama2c.load(asset("stories260K.bin"))
    q8 = llama2c.load(asset("stories260K-q8.bin"))
    assert q8.version == 2 and q8.group_size == 8
    for name, value in q8.weights.items():
        if name.startswith("rms"):
            np.testing.assert_array_equal(value, fp.weights[name])
            continue
        tensors = value if isinstance(value, list) else [value]
        refs = fp.weights[name] if isinstance(value, list) else [fp.weights[name]]
        for qt, ref in zip(tensors, refs):
            err = np.abs(qt.dequantize() - ref).reshape(-1)
            half_scale = np.repeat(qt.s, qt.group_size)[: err.size] / 2
            assert (err <= half_scale * (1 + 1e-6) + 1e-12).all(), name


def test_q8_greedy_story_matches_fp32_first_sentence():
    tok = asset("tok512.bin")
    fp = "".join(Llama.load(str(asset("stories260K.bin")), str(tok)).generate("", steps=60, temperature=0))
    q8 = "".join(Llama.load(str(asset("stories260K-q8.bin")), str(tok)).generate("", steps=60, temperature=0))
    first = fp.split(".")[0] + "."
    assert len(first) > 20 and q8.startswith(first)


@pytest.mark.parametrize("group_size", [4, 8, 7, 64])
def test_quantize_tail_groups(group_size):
    w = np.random.default_rng(1).standard_normal((5, 13)).astype(np.float32)  # 65 values
    qt = llama2c.quantize_q80(w, group_size)
    assert len(qt.s) == -(-65 // group_size)
    err = np.abs(qt.dequantize() - w).reshape(-1)
    assert (err <= np.repeat(qt.s, group_size)[:65] / 2 + 1e-7).all()


@pytest.mark.parametrize("version", [0, 1, 2])
def test_write_read_round_trip(tmp_path, version):
    w = random_weights(TINY)
    path = tmp_path / f"v{version}.bin"
    llama2c.write(path, TINY, w, version=version, group_size=16)
    back = llama2c.load(path)
    assert back.config == TINY and back.version == version
    for name, value in w.items():
        tol = 0 if version < 2 else np.abs(value).max() / 127
        np.testing.assert_allclose(back.dense(name), value, atol=tol)


def test_written_files_equal_llama2c_exports(tmp_path):
    v0 = llama2c.load(asset("stories260K.bin"))
    weights = {n: v0.dense(n) for n in v0.weights}
    for version, ref in ((1, "stories260K_v1.bin"), (2, "stories260K-q8.bin")):
        out = tmp_path / f"out{version}.bin"
        llama2c.write(out, v0.config, weights, version=version, group_size=8)
        assert out.read_bytes() == asset(ref).read_bytes()


def _write(tmp_path, data, name="bad.bin"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_truncated_file_names_sizes(tmp_path):
    data = asset("stories260K_v1.bin").read_bytes()
    with pytest.raises(FormatError, match=r"bad\.bin: file is \d+ bytes but its version-1 header implies"):
        llama2c.load(_write(tmp_path, data[:-100]))
    with pytest.raises(FormatError, match="trailing data"):
        llama2c.load(_write(tmp_path, data + b"\0\0\0\0"))


def test_bad_version_and_magic(tmp_path):
    data = bytearray(asset("stories260K_v1.bin").read_bytes())
    data[4:8] = struct.pack("<i", 7)
    with pytest.raises(FormatError, match="unsupported checkpoint version 7 at byte 4"):
        llama2c.load(_write(tmp_path, bytes(data)))
    with pytest.raises(FormatError, match="unknown magic"):
        llama2c.load(_write(tmp_path, b"\xff" * 300))
    with pytest.raises(FormatError, match="too short"):
        llama2c.load(_write(tmp_path, b"abc"))
    with pytest.raises(FormatError, match="empty"):
        llama2c.load(_write(tmp_path, b""))


@pytest.mark.parametrize("params,message", [
    ((64, 172, 5, 6, 2, 512, 512), "dim 64 is not a multiple of n_heads 6"),
    ((64, 172, 5, 8, 3, 512, 512), "n_heads 8 is not a multiple of n_kv_heads 3"),
    ((64, 0, 5, 8, 4, 512, 512), "hidden_dim must be a positive integer"),
    ((64, 172, 5, 8, 4, 512, -1), "seq_len must be a positive integer"),
])
def test_inconsistent_dimensions(tmp_path, params, message):
    with pytest.raises(FormatError, match=message):
        llama2c.load(_write(tmp_path, struct.pack("<7i", *params) + b"\0" * 64))


def test_missing_file():
    with pytest.raises(FormatError, match="no such file"):
        llama2c.load("/nonexistent/model.bin")


@pytest.mark.parametrize("name,fmt", [("stories260K.bin", "llama2c"), ("stories260K.gguf", "gguf")])
def test_checkpoint_load_picks_the_format_by_content(name, fmt):
    """docs/python-api.md's `llama2.formats.load_checkpoint` reads any format, chosen by content."""
    ckpt = formats.load_checkpoint(asset(name))
    assert ckpt.format == fmt and formats.model_kind(asset(name)) == fmt
    np.testing.assert_array_equal(ckpt.dense("wq"), formats.reader(fmt).load(asset(name)).dense("wq"))
