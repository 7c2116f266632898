"""Conformance with llama2.c's run.c: every case of the golden files, byte for byte."""

import io

import pytest

from conftest import asset, golden, golden_cases
from llama2.cli import main
from llama2.tokenizer import Tokenizer


def run_cli(argv, stdin=""):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("threads", [None, 1])
@pytest.mark.parametrize("case", golden_cases("runc.jsonl"))
def test_runc_golden(case, threads, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray tokenizer.bin in the working folder
    model, tok = asset(case["model"]), asset(case["tokenizer"])
    extra = [] if threads is None else ["--threads", str(threads)]
    code, out, err = run_cli(["run", str(model), "-z", str(tok), *case["args"], *extra])
    assert code == 0, err
    assert out == bytes.fromhex(case["stdout_hex"])


@pytest.mark.parametrize("case", golden_cases("encode.jsonl"))
def test_encode_golden(case):
    tok = Tokenizer.load(asset(case["tokenizer"]))
    assert tok.encode(case["text"], bos=True, eos=False) == case["ids"]


@pytest.mark.parametrize("case", [c for c in golden_cases("runc.jsonl")
                                  if c.values and c.values[0] and c.values[0]["model"] == "stories260K.bin"])
def test_v1_file_gives_same_bytes(case, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tok = asset(case["tokenizer"])
    code, out, err = run_cli(["run", str(asset("stories260K_v1.bin")), "-z", str(tok), *case["args"]])
    assert code == 0, err
    assert out == bytes.fromhex(case["stdout_hex"])
