"""`llama2 run --draft/--lookup` prints exactly the bytes of plain decoding at temperature 0 (chat
mode too); bad
speculation flags are one-line errors with exit 2 (usage) or 1 (a file); `llama2 bench spec` runs its
pairs on stories260K (plumbing only: --reps 1, no timing asserted)."""

import io
import json

import pytest

from conftest import ASSETS, asset
from llama2.cli import main


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


def base():
    return [str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "-t", "0", "-n", "200"]


@pytest.mark.parametrize("prompt", ["Once upon a time", "Lily and Tom went to the park. Lily and Tom"])
@pytest.mark.parametrize("flags", [["--draft", "stories260K-q8.bin", "--draft-max", "3"], ["--lookup", "2"],
                                   ["--draft", "stories260K.bin"]])
def test_run_speculative_prints_plain_bytes(prompt, flags):
    flags = [str(asset(f)) if f.endswith(".bin") else f for f in flags]
    code, plain, _ = run_cli(["run", *base(), "-i", prompt])
    assert code == 0
    code, fast, err = run_cli(["run", *base(), "-i", prompt, *flags])
    assert code == 0, err
    assert fast == plain


def test_chat_speculative_prints_plain_bytes():
    argv = ["run", *base(), "-n", "400", "-m", "chat", "-y", ""]
    stdin = "Tell me a story about Lily and Lily\nAnd then what did Lily do\n"
    outs = []
    for flags in ([], ["--lookup", "2"], ["--draft", str(asset("stories260K-q8.bin"))]):
        out, err = io.BytesIO(), io.StringIO()
        assert main(argv + flags, stdout=out, stderr=err, stdin=io.StringIO(stdin)) == 0, err.getvalue()
        outs.append(out.getvalue())
    assert outs[1] == outs[0] and outs[2] == outs[0]


@pytest.mark.parametrize("flags, code, message", [
    (["--lookup", "0"], 2, "--lookup 0: expected an n-gram size of at least 1"),
    (["--draft-max", "0", "--lookup", "2"], 2, "--draft-max 0: expected at least 1"),
    (["--draft", "x.bin", "--lookup", "2"], 2, "not allowed with argument"),
    (["--draft", "nowhere/x.bin"], 1, "nowhere/x.bin: no such draft model file"),
    (["--draft", "rand-gqa-unshared.bin"], 1, "the draft's vocabulary differs from the model's (32000 tokens"),
])
def test_bad_speculation_flags(flags, code, message):
    flags = [str(asset(f)) if f == "rand-gqa-unshared.bin" else f for f in flags]
    got, out, err = run_cli(["run", *base(), *flags])
    assert got == code
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_spec_plumbing(tmp_path, monkeypatch):
    asset("stories260K-q8.bin")
    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    out = tmp_path / "spec.json"
    code, text, err = run_cli(["bench", "spec", "--pairs", "stories260K-q8,stories260K-lookup", "--reps", "1",
                               "--max-tokens", "24", "--json", str(out)])
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["pair"] for r in rows] == ["stories260K-q8", "stories260K-lookup"]
    for r in rows:
        assert r["same_text"] is True and r["tokens"] > 0 and r["plain_tok_s"] > 0 and r["spec_tok_s"] > 0
        assert 0 <= r["break_even"] <= 1 and r["verify_pass"] > 0
    assert "stories260K-lookup" in text.decode()
    code, _, err = run_cli(["bench", "spec", "--pairs", "stories7B"])
    assert code == 2 and "unknown pair 'stories7B'" in err
    code, _, err = run_cli(["bench", "spec", "--model", str(asset("stories260K.bin"))])
    assert code == 2 and "--model: give --draft MODEL or --lookup N" in err
