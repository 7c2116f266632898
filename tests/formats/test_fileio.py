"""fileio's safe reading of user files: the bound is exact, a prefix read stops at its bound, and
text must be UTF-8; each failure is a FormatError naming the file."""

import pytest

from llama2.errors import FormatError
from llama2.fileio import read_user_file, read_user_text


def test_the_bound_is_exact(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_user_file(path, "thing", 10) == b"x" * 10
    with pytest.raises(FormatError, match=rf"^{path}: 10 bytes, more than a thing can be \(9 bytes at most\)$"):
        read_user_file(path, "thing", 9)


def test_a_prefix_read_stops_at_its_bound(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(10)))
    assert read_user_file(path, "thing", 4, exact=False) == bytes(range(4))
    assert read_user_file(path, "thing", 40, exact=False) == bytes(range(10))


def test_text_must_be_utf8(tmp_path):
    path = tmp_path / "f"
    path.write_bytes("é".encode() + b"\xff")
    with pytest.raises(FormatError, match=rf"^{path}: schema is not UTF-8 text \(byte 2\)$"):
        read_user_text(path, "schema")
    path.write_text("é ok", encoding="utf-8")
    assert read_user_text(path, "schema") == "é ok"


def test_a_missing_file(tmp_path):
    with pytest.raises(FormatError, match=r"nope: no such file \(expected a thing\)$"):
        read_user_file(tmp_path / "nope", "thing")
