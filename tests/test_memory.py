"""Memory failures are user errors: the estimate of what a model needs (a pure function), the
verdict line, and `llama2 run` / `llama2 serve` refusing a model that cannot fit, before loading it
and when loading runs out of memory anyway."""

import io
import os
import subprocess
import sys

import pytest

from conftest import REPO, asset
from llama2 import memory
from llama2.checkpoint import tensor_shapes
from llama2.cli import main
from llama2.config import PRESETS

SMALL = PRESETS["stories260K"]
SEVEN_B = PRESETS["llama2-7b"]


def params(c, matrices_only=False):
    total = 0
    for name, shape in tensor_shapes(c).items():
        if matrices_only and name.startswith("rms"):
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def test_estimate_counts_every_weight_and_the_cache():
    fp32 = memory.estimate(SMALL, {n: "fp32" for n in tensor_shapes(SMALL)})
    assert fp32.weights == fp32.address_weights == 4 * params(SMALL)
    c = SMALL
    assert fp32.cache == 2 * 4 * c.n_layers * c.seq_len * c.kv_dim
    four = memory.estimate(SMALL, {n: "fp32" for n in tensor_shapes(SMALL)}, slots=4)
    assert four.cache == 4 * fp32.cache and four.weights == fp32.weights


def test_estimate_by_storage():
    m = params(SEVEN_B, matrices_only=True)
    norms = 4 * (params(SEVEN_B) - m)
    names = [n for n in tensor_shapes(SEVEN_B) if not n.startswith("rms")]
    bf16 = memory.estimate(SEVEN_B, {n: "bf16" for n in names})
    assert bf16.weights == 4 * m + norms and bf16.address_weights == 6 * m + norms  # widened; file mapped
    q8 = memory.estimate(SEVEN_B, {n: "q8_0:32" for n in names})
    assert q8.weights == pytest.approx(1.125 * m + norms)
    quantized = memory.estimate(SEVEN_B, {n: "fp32" for n in names}, quantize=True)
    assert quantized.weights == pytest.approx(1.125 * m + norms)  # the fp32 map is not resident after
    assert quantized.address_weights == pytest.approx(5.125 * m + norms)
    hf_q = memory.estimate(SEVEN_B, {n: "hf" for n in names}, quantize=True)
    assert hf_q.weights == pytest.approx(5.125 * m + norms)  # float copies stay referenced


def test_seven_b_hf_under_a_20_gb_address_limit_is_refused_with_what_would_fit():
    """The issue's case: a Llama-2-7B-shaped HF bf16 folder under a 20 GB address-space limit."""
    stored = {n: "hf" for n in tensor_shapes(SEVEN_B)}
    have = memory.Available(memory=100 << 30, address=19 << 30, limit=20 << 30)
    line = memory.verdict("Llama-2-7b-hf", SEVEN_B, stored, False, 1, have)
    assert line is not None and "\n" not in line
    need = memory.estimate(SEVEN_B, stored)
    assert f"needs about {memory.gb(need.address)}" in line and memory.gb(19 << 30) in line
    assert "would fit" in line and "--dtype q8_0" in line


def test_verdict_names_fewer_slots_and_quantize():
    stored = {n: "fp32" for n in tensor_shapes(SEVEN_B)}
    one, four = (memory.estimate(SEVEN_B, stored, slots=n) for n in (1, 4))
    have = memory.Available(memory=(one.resident + four.resident) // 2)
    line = memory.verdict("m.bin", SEVEN_B, stored, False, 4, have, slots_flag="--max-batch")
    assert "--quantize q8_0" in line and "--max-batch" in line
    assert memory.verdict("m.bin", SEVEN_B, stored, False, 1, memory.Available(memory=one.resident)) is None
    tiny = memory.Available(memory=1 << 20)
    assert "even an int8 file" in memory.verdict("m.bin", SEVEN_B, stored, False, 1, tiny)


def test_describe_reads_headers_only(tmp_path):
    config, stored = memory.describe(asset("stories260K.bin"))
    assert config.dim == 64 and set(stored.values()) == {"fp32"}
    _, stored = memory.describe(asset("stories260K-q8.bin"))
    assert stored["wq"] == "q8_0:8"
    config, stored = memory.describe(asset("stories260K.gguf"))
    assert config.dim == 64 and stored["wq"] == "fp32"
    (tmp_path / "empty.bin").write_bytes(b"")
    assert memory.describe(tmp_path / "empty.bin") is None  # no estimate: the loader says what is wrong
    assert memory.describe(tmp_path / "missing.bin") is None


def test_available_reads_the_machine():
    have = memory.available()
    if os.path.exists("/proc/meminfo"):
        assert have.memory > 0


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=io.BytesIO(), stderr=err)
    return code, err.getvalue()


@pytest.mark.parametrize("command", ["run", "serve"])
def test_cli_refuses_a_model_that_does_not_fit(command, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: memory.Available(memory=10 << 20))
    code, err = run_cli([command, str(asset("stories260K.bin")), "-z", str(asset("tok512.bin"))])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "needs about" in err and "10 MB of memory is available" in err


def test_memory_error_while_loading_is_one_line(monkeypatch):
    from llama2.llama import Llama

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 25.0 GiB for an array")
    monkeypatch.setattr(Llama, "load", no_memory)
    code, err = run_cli(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin"))])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "ran out of memory while loading" in err and "needs about" in err and "Unable" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_real_address_space_limit_is_read():
    """A process under `ulimit -v` just above what it maps is refused with the limit in the line."""
    script = (
        "import resource, sys\n"
        "import llama2.llama, llama2.memory, llama2.cli.run, llama2.loader, llama2.checkpoint\n"
        "mapped = llama2.memory._kib('/proc/self/status', 'VmSize')\n"
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + (40 << 20), resource.RLIM_INFINITY))\n"
        "from llama2.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-c", script, "run", str(asset("stories260K.bin")), "-z",
                        str(asset("tok512.bin"))], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "address-space limit" in p.stderr and "Traceback" not in p.stderr
