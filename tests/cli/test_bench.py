"""`llama2 bench` runs end to end (ours only, the smallest model) and writes the documented JSON."""

import io
import json

import pytest

from conftest import ASSETS, asset
from llama2.cli import main


@pytest.mark.slow
def test_bench_smoke_writes_rows(tmp_path, monkeypatch):
    asset("stories260K.bin")
    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    out, err = io.BytesIO(), io.StringIO()
    code = main(["bench", "--models", "stories260K", "--threads", "1", "--reps", "1", "--no-peer",
                 "--no-first-run", "--dir", str(tmp_path / "models"), "--json", str(tmp_path / "bench.json")],
                stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    info = json.loads((tmp_path / "bench.json").read_text())
    assert set(info) == {"machine", "versions", "rows", "checks", "errors"}
    assert info["machine"]["cpu_level"] and info["machine"]["ours_level"]
    assert info["machine"]["cores"] >= 1 and "llama2" in info["versions"]
    metrics = {(r["weights"], r["metric"]) for r in info["rows"]}
    assert metrics == {(w, m) for w in ("fp32", "int8")
                       for m in ("decode", "prefill128", "prefill512", "ttft", "rss")}
    for row in info["rows"]:
        assert row["model"] == "stories260K" and row["threads"] == 1
        assert row["ours"] > 0 and row["peer"] is None and row["ratio"] is None
    assert "| stories260K | fp32 | 1 | decode |" in out.getvalue().decode()


def test_bench_rejects_unknown_model():
    err = io.StringIO()
    assert main(["bench", "--models", "stories7B", "--no-peer"], stdout=io.BytesIO(), stderr=err) == 2
    assert "unknown shape 'stories7B'" in err.getvalue()


@pytest.mark.slow
def test_bench_batch_adds_the_multi_row_decode_rows(tmp_path, monkeypatch):
    from llama2.benchmarks.engine import BATCH_METRICS

    asset("stories260K.bin")
    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    out, err = io.BytesIO(), io.StringIO()
    code = main(["bench", "--models", "stories260K", "--threads", "1", "--reps", "1", "--no-peer", "--batch",
                 "--weights", "int8", "--no-first-run", "--dir", str(tmp_path / "models"), "--json",
                 str(tmp_path / "bench.json")], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == ["decode", "prefill128", "prefill512", "ttft", "rss", *BATCH_METRICS]
    assert all(r["ours"] > 0 for r in rows)
    assert "| stories260K | int8 | 1 | decode16 |" in out.getvalue().decode()
