"""`llama2 bench finetune` runs both sides (ours and PEFT, fp32 and bf16) on a tiny shape and prints
their ratios; its mistakes get one line."""

import io
import json

import pytest

from conftest import ASSETS, asset
from llama2.cli import main


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue()


@pytest.mark.slow
def test_quick_runs_ours_and_peft_and_prints_ratios(tmp_path, monkeypatch):
    """--quick with --qlora-7b: the QLoRA row on the tiny shape's Q4_K_M (llama.cpp's quantizer)."""
    pytest.importorskip("peft", reason="peft is not installed")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the quantizer) is not installed")
    pytest.importorskip("torch", reason="torch is not installed")
    asset("tok512.model")
    monkeypatch.setenv("LLAMA2_ASSETS", str(ASSETS))
    code, out, err = run_cli(["bench", "finetune", "--quick", "--qlora-7b", "--dir", tmp_path / "models",
                              "--json", tmp_path / "ft.json"])
    assert code == 0, err
    info = json.loads((tmp_path / "ft.json").read_text())
    assert set(info) == {"machine", "versions", "settings", "rows", "qlora"}
    assert info["versions"]["peft"] and info["versions"]["torch"]
    [row] = info["rows"]
    assert row["model"] == "tiny" and row["trainable"] > 0  # both sides train as many values
    for side in ("ours", "peft_fp32", "peft_bf16"):
        assert row[f"{side}_tok_s"] > 0 and row[f"{side}_rss_mb"] > 100  # torch alone takes more
    assert row["ratio_fp32"] == pytest.approx(row["ours_tok_s"] / row["peft_fp32_tok_s"], rel=1e-2)
    assert row["ratio_bf16"] == pytest.approx(row["ours_tok_s"] / row["peft_bf16_tok_s"], rel=1e-2)
    assert row["rss_ratio_bf16"] == pytest.approx(row["ours_rss_mb"] / row["peft_bf16_rss_mb"], rel=1e-2)
    line = next(x for x in out.splitlines() if x.startswith("| tiny |"))
    assert f"{row['ratio_fp32']:.3g}x" in line and f"{row['rss_ratio_bf16']:.3g}x" in line
    assert "machine:" in out and "peft" in out
    q = info["qlora"]
    assert (q["model"], q["weights"], q["checkpointing"]) == ("tiny", "q4_k_m", True)
    assert q["s_per_step"] > 0 and q["rss_mb"] > q["file_mb"] > 0
    assert f"QLoRA tiny q4_k_m ({q['file_mb']:,.0f} MB file)" in out


@pytest.mark.parametrize("argv, message", [
    (["--models", "stories7B"], "--models: unknown shape 'stories7B'"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
])
def test_mistakes_get_one_line(argv, message, tmp_path):
    code, out, err = run_cli(["bench", "finetune", "--dir", tmp_path, *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out
