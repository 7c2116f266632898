"""`llama2 train` options: llama2.c's key names as flags (dashed too), TOML/YAML files, precedence,
the learning-rate schedule and one-line errors. No torch needed: parsing only."""

import io
import math

import pytest

from llama2.cli import build_parser, main
from llama2.cli.train import resolve
from llama2.errors import Llama2Error, UsageError
from llama2.train import options


def parse(*argv):
    return resolve(build_parser().parse_args(["train", *argv]))


def test_defaults_are_llama2c_stories15m():
    m, t = parse()
    assert (m.dim, m.n_layers, m.n_heads, m.max_seq_len) == (288, 6, 6, 256)
    assert m.resolved_hidden_dim() == 768  # stories15M's hidden_dim from multiple_of 32
    assert (t.batch_size, t.gradient_accumulation_steps, t.learning_rate) == (128, 4, 5e-4)
    assert t.compile is False and t.init_from == "scratch"


def test_flags_underscored_dashed_and_booleans():
    m, t = parse("--dim", "64", "--n-layers", "3", "--n_kv_heads=2", "--max-seq-len", "128",
                 "--learning_rate=1e-3", "--compile", "--decay_lr=False", "--eval-only", "no")
    assert (m.dim, m.n_layers, m.n_kv_heads, m.max_seq_len) == (64, 3, 2, 128)
    assert t.learning_rate == 1e-3 and t.compile is True and t.decay_lr is False and t.eval_only is False


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('out_dir = "runs/a"\nmax_iters = 500\n[model]\ndim = 128\nn_heads = 8\n'
                   '[train]\nlearning_rate = 1\n')
    m, t = parse("--config", str(cfg), "--max_iters", "700")
    assert (m.dim, m.n_heads, t.out_dir, t.max_iters, t.learning_rate) == (128, 8, "runs/a", 700, 1.0)
    yml = tmp_path / "run.yaml"
    yml.write_text("dim: 96\nbatch-size: 8\n")
    pytest.importorskip("yaml")
    m, t = parse("--config", str(yml))
    assert (m.dim, t.batch_size) == (96, 8)


@pytest.mark.parametrize("text, message", [
    ("dimm = 3\n", "unknown option 'dimm'"),
    ("dim = \"big\"\n", "dim must be int, got 'big'"),
    ("compile = 1\n", "compile must be bool"),
    ("dim = \n", "invalid TOML"),
])
def test_bad_config_file(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(Llama2Error, match=message):
        parse("--config", str(cfg))


def test_cli_errors_are_one_line(tmp_path):
    err = io.StringIO()
    assert main(["train", "--dim", "abc"], stdout=io.BytesIO(), stderr=err) == 2
    assert err.getvalue().count("\n") == 1 and "--dim" in err.getvalue()
    err = io.StringIO()
    assert main(["train", "--dropout", "1.5"], stdout=io.BytesIO(), stderr=err) == 2
    assert "--dropout must be in [0, 1)" in err.getvalue()
    with pytest.raises(UsageError, match="--dtype"):
        parse("--dtype", "int8")


def test_lr_schedule():
    t = options.TrainOptions(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert t.lr_at(0) == pytest.approx(1 / 11) and t.lr_at(9) == pytest.approx(10 / 11)
    assert t.lr_at(10) == pytest.approx(1.0)
    assert t.lr_at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert t.lr_at(110) == t.lr_at(500) == 0.1
    assert options.TrainOptions(decay_lr=False, learning_rate=0.3).lr_at(5) == 0.3


def test_cli_works_without_torch(tmp_path):
    """Inference and data preparation never import torch; training says it needs it in one line."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    code = ("import sys; sys.modules['torch'] = None\n"
            "import io, llama2, llama2.cli, llama2.train.data, llama2.evaluate\n"
            "err = io.StringIO()\n"
            "rc = llama2.cli.main(['train', '--data', 'x'], stdout=io.BytesIO(), stderr=err)\n"
            "print(rc, err.getvalue().strip())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src), "PATH": ""}, timeout=120)
    assert out.stdout.strip() == "1 llama2: error: training needs PyTorch: pip install torch", out.stderr
