"""The large-shape benchmark's files (llama2.benchmarks.files), its agreement check and `llama2 bench`'s
flags. Tiny shapes only; the llama.cpp side runs only where llama-cpp-python is installed."""

import collections
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import asset
from llama2.benchmarks import child, engine, files
from llama2.weights.bf16 import bf16_to_f32, f32_to_bf16
from llama2.cli import main
from llama2.errors import Llama2Error
from llama2.formats import load_checkpoint, open_source
from llama2.model import Transformer

TINY = files.SHAPES["tiny"].config
Usage = collections.namedtuple("Usage", "total used free")  # as shutil.disk_usage answers


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue()


def llama_cpp_or_skip():
    why = engine.peer_available()
    if why:
        pytest.skip(why)


# -- the random weights ----------------------------------------------------------------------------

def test_values_are_exact_in_bf16_and_f16():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * np.float32(0.02),
                        rng.standard_normal(10_000).astype(np.float32) * np.float32(1e-6),  # f16 subnormals
                        np.float32([0.0, -0.0, 1.0, 3.14159, 1e-8])])
    b = files.exact_in_bf16_and_f16(a.copy())
    assert np.array_equal(bf16_to_f32(f32_to_bf16(b)), b)
    assert np.array_equal(b.astype(np.float16).astype(np.float32), b)
    big = np.abs(a) > 1e-4  # away from float16's subnormals the rounding is bfloat16's alone
    assert np.abs(b[big] - a[big]).max() <= np.abs(a[big]).max() * 2.0 ** -8


def test_random_tensors_are_seeded_and_at_trained_scale():
    w = files.random_tensor(TINY, "w1", 1)
    assert w.shape == (TINY.hidden_dim, TINY.dim) and w.dtype == np.float32
    assert np.array_equal(w, files.random_tensor(TINY, "w1", 1))
    assert not np.array_equal(w, files.random_tensor(TINY, "w1", 0))
    assert not np.array_equal(w, files.random_tensor(TINY, "w3", 1))
    assert abs(w.std() - files.STD) < 0.001 and abs(w.mean()) < 0.001
    norm = files.random_tensor(TINY, "rms_att", 0)
    assert norm.shape == (TINY.dim,) and abs(norm.mean() - 1) < 0.01 and 0.005 < norm.std() < 0.05
    assert files.random_tensor(TINY, "wcls").shape == (TINY.vocab_size, TINY.dim)


def test_weight_counts_of_the_published_shapes():
    assert files.n_weights(files.SHAPES["llama2-7b"].config) == 6_738_415_616
    assert files.n_weights(files.SHAPES["tinyllama-1.1b"].config) == 1_100_048_384
    assert files.n_weights(files.SHAPES["llama3.2-1b"].config) == 1_235_814_400  # tied


def test_llama3_shape_reads_back_from_its_hf_config(tmp_path):
    """The llama3.2-1b shape's config.json (a bf16 folder's) gives back its RoPE scaling."""
    from llama2.formats import hf

    c = files.SHAPES["llama3.2-1b"].config
    (tmp_path / "config.json").write_text(json.dumps(files.hf_config(c)))
    back = hf.read_config(tmp_path)
    assert back.rope_scaling == c.rope_scaling and back.shared_classifier and back.rope_theta == 500000.0
    assert (back.bos_id, back.eos_id, back.vocab_size, back.n_kv_heads) == (128000, 128001, 128256, 8)


def test_llama3_vocabulary_comes_from_the_llama_models_package():
    pytest.importorskip("llama_models")
    path = engine._tokenizers("llama3.2-1b", None)[0]
    assert path.name == "tokenizer.model" and path.parent.name == "llama3"
    with pytest.raises(Llama2Error, match="^bench: the tokenizer x.model comes from the no_such_pkg "
                                          "package, which is not installed; pip install no-such-pkg$"):
        files.package_file("no_such_pkg:x.model")


# -- the writers -----------------------------------------------------------------------------------

def expected(name, layer=None):
    return files.random_tensor(TINY, name, layer)


def test_gguf_f16_and_hf_bf16_hold_the_same_model(tmp_path):
    tok = asset("tok512.bin")
    where = files.prepare("tiny", ["f16", "bf16"], tmp_path, tok, asset("tok512.model"))
    assert where["f16"] == tmp_path / "tiny-f16.gguf" and where["f16"].is_file()
    assert (where["bf16"] / "model.safetensors").is_file() and (where["bf16"] / "tokenizer.model").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    config = json.loads((where["bf16"] / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == TINY.n_kv_heads
    for path in where.values():
        source = open_source(path)
        c = source.config
        assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
            TINY.dim, TINY.hidden_dim, TINY.n_layers, TINY.n_heads, TINY.n_kv_heads, TINY.vocab_size,
            TINY.seq_len)
        assert not c.shared_classifier and c.rope_theta == TINY.rope_theta
        assert len(source.vocab) == TINY.vocab_size
        for name, layer in (("token_embedding", None), ("wq", 0), ("wk", 1), ("wv", 1), ("wo", 0),
                            ("w1", 1), ("w2", 0), ("w3", 1), ("rms_att", 0), ("rms_ffn", 1),
                            ("rms_final", None), ("wcls", None)):
            assert np.array_equal(source.tensor(name, layer), expected(name, layer)), (path, name, layer)
    # our engine reads both: the same values give the same logits
    prompt = [1, 5, 77, 300, 12, 9]
    logits = []
    for path in where.values():
        model = Transformer(load_checkpoint(path))
        logits.append(model.forward(prompt, model.new_cache(), all_logits=True))
        assert logits[-1].shape == (len(prompt), TINY.vocab_size)
    assert np.abs(logits[0] - logits[1]).max() < 1e-4


def test_hf_folder_in_shards_with_an_index(tmp_path):
    folder = tmp_path / "hf"
    files.write_hf_bf16(TINY, folder, shard_bytes=400_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == 2 * files.n_weights(TINY)
    source = open_source(folder)
    assert np.array_equal(source.tensor("wq", 1), expected("wq", 1))
    assert np.array_equal(source.tensor("wcls"), expected("wcls"))


def test_prepare_resumes_and_keeps_what_exists(tmp_path):
    tok = asset("tok512.bin")
    files.prepare("tiny", ["f16"], tmp_path, tok)
    path = tmp_path / "tiny-f16.gguf"
    before = path.stat().st_mtime_ns
    logged = []
    files.prepare("tiny", ["f16"], tmp_path, tok, log=logged.append)
    assert path.stat().st_mtime_ns == before and logged == []


def test_bench_prepare_makes_the_files_and_times_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_ASSETS", str(asset("tok512.bin").parent))
    directory = tmp_path / "bench"
    argv = ["bench", "--models", "tiny", "--weights", "f16,bf16", "--no-peer", "--prepare",
            "--dir", str(directory)]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert out.splitlines() == [f"tiny f16: {directory / 'tiny-f16.gguf'}",
                                f"tiny bf16: {directory / 'tiny-hf-bf16'}"]
    assert "tiny: writing tiny-f16.gguf" in err and "tiny: writing tiny-hf-bf16" in err
    code, out2, err = run_cli(argv)  # the second time: nothing to write
    assert code == 0 and out2 == out and "writing" not in err


def test_files_to_write_and_their_size(tmp_path):
    assert files.to_write("llama2-7b", ["q8_0", "q4_k_m"], tmp_path) == ["f16", "q8_0", "q4_k_m"]
    (tmp_path / "llama2-7b-f16.gguf").write_bytes(b"")
    assert files.to_write("llama2-7b", ["q8_0", "q4_k_m"], tmp_path) == ["q8_0", "q4_k_m"]
    n = files.n_weights(files.SHAPES["llama2-7b"].config)
    assert files.needed_bytes("llama2-7b", ["q8_0", "q4_k_m"], tmp_path) == int(n * 34 / 32 + n * 0.61)
    assert engine.files_to_make(["bf16"], with_peer=True) == ["f16", "bf16"]
    assert engine.files_to_make(["bf16"], with_peer=False) == ["bf16"]
    plan = engine.files_plan(["stories15M", "tinyllama-1.1b", "llama2-7b"], None, True)
    assert plan == {"tinyllama-1.1b": list(files.FILES), "llama2-7b": ["q8_0", "q4_k_m"]}
    assert engine.files_plan(["llama2-7b"], ["fp32", "q4_0"], True) == {"llama2-7b": ["q4_0"]}


# -- the disk check --------------------------------------------------------------------------------

def test_bench_refuses_when_the_disk_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**9, 10**9))
    directory = tmp_path / "bench"
    code, out, err = run_cli(["bench", "--models", "llama2-7b", "--weights", "f16,bf16", "--no-peer",
                              "--dir", str(directory)])
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "llama2-7b" in lines[0] and "1.0 GB is free" in lines[0], err
    assert str(directory) in lines[0] and "--dir" in lines[0]
    assert not directory.exists()  # refused before writing anything


def test_disk_check_counts_only_missing_files(tmp_path, monkeypatch):
    need = files.needed_bytes("tiny", files.FILES, tmp_path)
    assert need == int(sum(files.n_weights(TINY) * files.BYTES_PER_WEIGHT[k] for k in files.FILES))
    free = [files.DISK_MARGIN + need]
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(10**12, 10**12, free[0]))
    files.check_disk({"tiny": list(files.FILES)}, tmp_path)  # just fits
    free[0] -= 1
    with pytest.raises(files.Llama2Error):
        files.check_disk({"tiny": list(files.FILES)}, tmp_path)
    for kind, path in files.paths("tiny", tmp_path).items():
        path.mkdir() if kind == "bf16" else path.write_bytes(b"")
    free[0] = 0
    files.check_disk({"tiny": list(files.FILES)}, tmp_path)  # nothing left to write


def test_disk_check_refuses_by_the_margin(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(10**12, 10**12, files.DISK_MARGIN))
    with pytest.raises(files.Llama2Error, match="tiny 0.0 GB"):
        files.check_disk({"tiny": ["f16"]}, tmp_path / "not" / "yet")


# -- the agreement check ---------------------------------------------------------------------------

def test_agreement_counts_positions_and_the_common_greedy_prefix():
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((16, 50)).astype(np.float32)
    peer = ours + np.float32(0.001)
    peer[3, ours[3].argmin()] = 100.0  # position 3's argmax moves
    c = engine.agreement(ours, peer, [4, 5, 6, 7], [4, 5, 9, 7])
    assert c["positions"] == 16 and c["argmax_agree"] == 15
    assert c["greedy_same"] == 2 and c["greedy"] == 4
    assert c["max_abs_diff"] == pytest.approx(100.0 - ours[3].min(), rel=1e-6)
    assert c["max_abs_logit"] == 100.0
    assert "argmax 15/16 positions" in engine.check_text(c) and "greedy ids 2/4" in engine.check_text(c)


def test_first_run_times_llama2_run_to_its_first_token():
    took = engine.first_run(asset("stories260K.bin"), asset("tok512.bin"), 1)
    assert 0 < took < 60


def test_plan_drops_quantized_files_only_the_missing_quantizer_could_make(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "peer_available", lambda python=None: "llama_cpp is not importable")
    logged = []
    plan = engine.without_unmakeable({"tiny": ["f16", "q8_0", "q4_0"]}, tmp_path, None, logged.append)
    assert plan == {"tiny": ["f16"]} and "tiny: skipping q8_0, q4_0" in logged[0]
    (tmp_path / "tiny-q4_0.gguf").write_bytes(b"")  # made earlier: measured
    plan = engine.without_unmakeable({"tiny": ["f16", "q8_0", "q4_0"]}, tmp_path, None, logged.append)
    assert plan == {"tiny": ["f16", "q4_0"]}
    monkeypatch.setattr(engine, "peer_available", lambda python=None: "")
    assert engine.without_unmakeable({"tiny": ["q8_0"]}, tmp_path, None, logged.append) == {"tiny": ["q8_0"]}


def test_first_run_failure_is_one_line(tmp_path):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(child.ChildError, match="first run of llama2 run on broken.bin failed: llama2: "):
        engine.first_run(bad, asset("tok512.bin"), 1)


def test_cpu_level_and_machine():
    m = engine.machine()
    assert m["cpu_level"].split()[0] in ("avx512", "avx2", "scalar", "unknown")
    assert m["cores"] >= 1 and m["memory_gib"] > 0


# -- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--models", "stories7B"], "unknown shape 'stories7B'"),
    (["--models", "tiny,TINY"], "a shape is named twice"),
    (["--models", "tiny", "--weights", "q5_k"], "--weights 'q5_k': expected a comma-separated list of fp32"),
    (["--models", "stories15M", "--weights", "q4_0"], "none applies to stories15M (expected fp32, int8)"),
    (["--models", "tiny", "--threads", "two"], "--threads 'two': expected a comma-separated list"),
    (["--models", "tiny", "--threads", "0"], "--reps and --threads must be at least 1"),
    (["--models", "tiny", "--isa", "sse2"], "argument --isa: invalid choice: 'sse2'"),
    (["--models", "tiny", "--peer-python", "/no/such/python"],
     "--peer-python /no/such/python: not an executable file"),
    (["--models", "tiny", "--peer-python", sys.executable, "--no-peer"], "contradict each other"),
])
def test_bench_flag_errors_are_one_line(argv, message, tmp_path):
    code, out, err = run_cli(["bench", *argv, "--dir", str(tmp_path / "b")])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "b").exists()


def test_peer_python_that_lacks_llama_cpp(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named llama_cpp' >&2\nexit 1\n")
    fake.chmod(0o755)
    code, out, err = run_cli(["bench", "--models", "tiny", "--peer-python", str(fake),
                              "--dir", str(tmp_path / "b")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--peer-python {fake}: llama-cpp-python is not importable by {fake}" in err


def test_peer_children_run_a_script_that_imports_nothing_of_llama2():
    cmd, env = child.child_command("llama_cpp", "/some/python")
    assert cmd == ["/some/python", str(child.PEER_SCRIPT)]
    assert env.get("PYTHONPATH") == os.environ.get("PYTHONPATH")
    assert child.child_command("ours", "/some/python")[0] == [sys.executable, "-m",
                                                               "llama2.benchmarks.engine"]
    code = ("import runpy, sys\n"
            f"runpy.run_path({str(child.PEER_SCRIPT)!r}, run_name='peer')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama2'))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
    p = subprocess.run([sys.executable, str(child.PEER_SCRIPT), "dance"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown mode 'dance'" in p.stderr


# -- llama.cpp on the same files (only where llama-cpp-python is installed) ----------------------------

def test_llama_cpp_quantizes_and_agrees_on_the_same_file(tmp_path):
    llama_cpp_or_skip()
    tok = asset("tok512.bin")
    where = files.prepare("tiny", ["q8_0", "q4_k_m"], tmp_path, tok, threads=1, python=sys.executable)
    assert (tmp_path / "tiny-f16.gguf").is_file()  # made first, as the quantizer's input
    from llama2.formats import gguf

    _, infos, _ = gguf.read(where["q8_0"])
    assert {kind for name, (kind, _, _) in infos.items() if not name.endswith("norm.weight")} == {gguf.Q8_0}
    _, infos, _ = gguf.read(where["q4_k_m"])
    assert {12, 14} <= {kind for kind, _, _ in infos.values()}  # Q4_K and Q6_K mixed
    # Q8_0 by llama.cpp: within half a step of the F16 values
    source = open_source(where["q8_0"])
    w, ref = source.tensor("w2", 1), expected("w2", 1)
    step = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(w - ref).reshape(-1, 32) <= step * 0.6)  # fp16 scale: 2^-11 of amax more
    # the two engines on the F16 GGUF, llama.cpp under --peer-python's child environment
    f16 = tmp_path / "tiny-f16.gguf"
    check = engine.check_file(f16, f16, "llama_cpp", 1, python=sys.executable)
    assert check["positions"] == engine.CHECK_PROMPT and check["argmax_agree"] == engine.CHECK_PROMPT
    assert check["greedy_same"] == engine.CHECK_GREEDY and check["max_abs_diff"] < 1e-2


@pytest.mark.slow
def test_bench_end_to_end_on_the_tiny_shape(tmp_path):
    llama_cpp_or_skip()
    asset("tok512.bin")
    code, out, err = run_cli(["bench", "--models", "tiny", "--weights", "f16,q4_0", "--reps", "1",
                              "--threads", "1", "--no-first-run", "--dir", str(tmp_path / "b"),
                              "--json", str(tmp_path / "bench.json")])
    assert code == 0, err
    info = json.loads((tmp_path / "bench.json").read_text())
    assert set(info) == {"machine", "versions", "rows", "checks", "errors"}
    assert "AVX" in info["versions"]["llama_cpp_system_info"]
    f16 = [r for r in info["rows"] if r["weights"] == "f16"]
    assert [r["metric"] for r in f16] == list(engine.METRICS)
    assert all(r["ours"] > 0 and r["peer"] > 0 and r["ratio"] > 0 and r["peer_file"] == "f16" for r in f16)
    assert f16[0]["file_mb"] == round((tmp_path / "b" / "tiny-f16.gguf").stat().st_size / 2**20, 1)
    assert [c["weights"] for c in info["checks"] if "positions" in c][0] == "f16"
    q4 = [r for r in info["rows"] if r["weights"] == "q4_0"]
    assert all(r["peer"] > 0 for r in q4)
    # ours either runs Q4_0 or says why not, one line per failure, on the table's footer
    assert all(r["ours"] is not None for r in q4) or any(e["weights"] == "q4_0" for e in info["errors"])
    assert "| tiny | f16 | 1 | decode |" in out and "agreement before timing" in out
