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
    """Two stories260K pairs, one run each; the lookup pair also runs llama-cpp-python's
    LlamaPromptLookupDecoding on the same GGUF (its greedy text is ours: F32 weights), or says
    why it does not."""
    asset("stories260K-q8.bin")
    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    out = tmp_path / "spec.json"
    code, text, err = run_cli(["bench", "spec", "--pairs", "stories260K-q8,stories260K-lookup", "--reps", "1",
                               "--max-tokens", "24", "--threads", "1", "--json", str(out)])
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["pair"] for r in rows] == ["stories260K-q8", "stories260K-lookup"]
    for r in rows:
        assert r["same_text"] is True and r["tokens"] > 0 and r["plain_tok_s"] > 0 and r["spec_tok_s"] > 0
        assert 0 <= r["break_even"] <= 1 and r["verify_pass"] > 0
    assert rows[0]["acceptance"] is None or rows[0]["acceptance"] > 0.5  # int8 of the same weights
    text = text.decode()
    assert "stories260K-lookup" in text and "than plain decoding (ratio >= 0.95)" in text
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "skipping llama-cpp-python's lookup runs" in err
    else:
        lookup = rows[1]
        assert lookup["peer_same_text"] is True and lookup["peer_lookup_tok_s"] > 0 and lookup["vs_peer"] > 0
        assert "LlamaPromptLookupDecoding" in text
    assert "vs_peer" not in rows[0]
    code, _, err = run_cli(["bench", "spec", "--pairs", "stories7B"])
    assert code == 2 and "unknown pair 'stories7B'" in err
    code, _, err = run_cli(["bench", "spec", "--model", str(asset("stories260K.bin"))])
    assert code == 2 and "--model: give --draft MODEL or --lookup N" in err


@pytest.mark.slow
def test_bench_spec_trains_its_draft_once(tmp_path, monkeypatch):
    """The stories260K-trained pair: `llama2 train` makes the draft (here a few iterations) into the
    bench folder, the pair runs with it, and a second run reuses the file."""
    from llama2.benchmarks import spec

    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    monkeypatch.setattr(spec, "DRAFT_RECIPE", {**spec.DRAFT_RECIPE, "max_iters": 2, "eval_interval": 2,
                                               "warmup_iters": 1, "batch_size": 4, "eval_iters": 1})
    argv = ["bench", "spec", "--pairs", "stories260K-trained", "--reps", "1", "--max-tokens", "16",
            "--threads", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "spec.json")]
    code, _, err = run_cli(argv)
    assert code == 0, err
    [made] = tmp_path.glob("stories260K-draft-48x2-2-*/model.bin")
    assert f"training {made.parent.name}" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    [row] = json.loads((tmp_path / "spec.json").read_text())["rows"]
    assert row["pair"] == "stories260K-trained" and row["same_text"] is True and row["tokens"] > 0
    stamp = made.stat().st_mtime_ns
    code, _, err = run_cli(argv)
    assert code == 0 and "training" not in err and made.stat().st_mtime_ns == stamp
