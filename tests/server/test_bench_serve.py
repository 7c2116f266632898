"""`llama2 bench serve --quick` runs end to end (a smoke test: benchmarks are not tests, no timings
are checked); without llama-cpp-python it says why the peer is skipped."""

import io
import json

import pytest

from conftest import asset

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.mark.slow
def test_bench_serve_quick(tmp_path):
    """Concurrent chats with a shared system prompt, the second turn against a fresh server without
    prefix reuse, the table and the --json report (machine, settings, results, ratios)."""
    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    report = tmp_path / "serve.json"
    code = main(["bench", "serve", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "--threads", "1",
                 "--quick", "--json", str(report), "--gguf", str(asset("stories260K.bin")) + ".missing"],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    data = json.loads(report.read_text())
    assert [(r["server"], r["streams"]) for r in data["results"]] == [("llama2 serve", 1), ("llama2 serve", 2)]
    for r in data["results"]:
        assert r["tokens"] > 0 and r["aggregate_decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["requests"] == r["streams"]
    [turn] = data["second_turn"]
    assert turn["server"] == "llama2 serve" and turn["history_tokens"] > data["settings"]["system_tokens"]
    assert turn["turn2_ttft_ms"] > 0 and turn["recompute_ttft_ms"] > 0
    assert data["settings"]["context"] == 512 and 1 <= data["settings"]["system_tokens"] <= 16
    assert data["machine"]["cores"] >= 1
    assert [what for what, _ in data["ratios"]] == ["llama2 serve at 2 chats / at 1 (aggregate decode tok/s)"]
    text = out.getvalue().decode()
    assert "machine:" in text and "second turn" in text and "agg decode tok/s" in text
    assert "skipping llama-cpp-python" in err.getvalue()
    assert not list(tmp_path.glob(".*.part"))


def test_system_prompt_has_at_most_the_tokens_asked():
    from llama2.benchmarks.serve import system_prompt
    from llama2.tokenizer import Tokenizer
    tok = Tokenizer.load(asset("tokenizer.bin"))
    for n in (8, 64, 200):
        count = len(tok.encode(system_prompt(tok, n), bos=False))
        assert n - 3 <= count <= n, (n, count)


@pytest.mark.parametrize("argv, expected", [
    (["--shape", "nope"], "--shape nope: expected one of"),
    (["MODEL", "--shape", "tiny"], "give MODEL or --shape, not both"),
    ([], "give MODEL or --shape"),
    (["--shape", "tiny", "--weights", "bf16"], "--weights bf16: expected one of"),
])
def test_bench_serve_model_errors(argv, expected):
    from llama2.cli import main
    err = io.StringIO()
    argv = [str(asset("stories260K.bin")) if a == "MODEL" else a for a in argv]
    code = main(["bench", "serve", *argv, "--no-peer"], stdout=io.BytesIO(), stderr=err)
    assert code == 2 and expected in err.getvalue(), err.getvalue()


def test_bench_serve_usage_error():
    from llama2.cli import main
    err = io.StringIO()
    code = main(["bench", "serve", str(asset("stories260K.bin")), "--streams", "a,b"],
                stdout=io.BytesIO(), stderr=err)
    assert code == 2 and "--streams 'a,b'" in err.getvalue()
