"""`llama2 bench serve --quick` runs end to end (a smoke test: benchmarks are not tests, no timings
are checked); without llama-cpp-python it says why the peer is skipped."""

import io
import json

import pytest

from conftest import asset

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def test_bench_serve_quick():
    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    code = main(["bench", "serve", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")),
                 "--quick", "--json", "--gguf", str(asset("stories260K.bin")) + ".missing"],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    results = [json.loads(line) for line in out.getvalue().decode().splitlines()]
    assert [(r["server"], r["streams"]) for r in results] == [("llama2 serve", 1), ("llama2 serve", 2)]
    assert all(r["tokens"] > 0 and r["aggregate_tok_s"] > 0 for r in results)
    assert "skipping llama-cpp-python" in err.getvalue()


def test_bench_serve_usage_error():
    from llama2.cli import main
    err = io.StringIO()
    code = main(["bench", "serve", str(asset("stories260K.bin")), "--streams", "a,b"],
                stdout=io.BytesIO(), stderr=err)
    assert code == 2 and "--streams 'a,b'" in err.getvalue()
