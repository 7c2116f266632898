"""Memory failures are user errors: the estimate of what a model needs (a pure function), the
verdict line, and `llama2 run` / `llama2 serve` refusing a model that cannot fit, before loading it
and when loading runs out of memory anyway."""

import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, asset
from llama2 import memory, native
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
    fp32 = memory.estimate(SMALL, {n: "f32" for n in tensor_shapes(SMALL)})
    assert fp32.weights == fp32.address_weights == 4 * params(SMALL)
    c = SMALL
    assert fp32.cache == memory.kv_cache_bytes(SMALL) == 2 * 4 * c.n_layers * c.seq_len * c.kv_dim
    four = memory.estimate(SMALL, {n: "f32" for n in tensor_shapes(SMALL)}, slots=4)
    assert four.cache == 4 * fp32.cache and four.weights == fp32.weights


def test_the_kv_cache_by_type_and_positions():
    """Bytes per position from the KV type modules (f32 4, f16/bf16 2, q8_0 34/32 bytes a value),
    whole blocks of positions: one context for run, the token budget for the server's pool."""
    from llama2 import kvcache

    c = SEVEN_B
    values = 2 * c.n_layers * c.kv_dim  # keys and values of every layer, per position
    assert memory.kv_position_bytes(c, "f32") == 4 * values
    assert memory.kv_position_bytes(c, "f16") == memory.kv_position_bytes(c, "bf16") == 2 * values
    assert memory.kv_position_bytes(c, "q8_0") == 34 * values // 32
    for t in kvcache.TYPES:
        assert memory.kv_position_bytes(c, t) == kvcache.bytes_per_token(c, t)
        assert memory.kv_cache_bytes(c, t) == c.seq_len * memory.kv_position_bytes(c, t)
    bt = kvcache.BLOCK_TOKENS
    assert memory.kv_cache_bytes(c, "f16", 1) == bt * 2 * values  # a block at least
    assert memory.kv_cache_bytes(c, "f16", 8 * 512 + 1) == (8 * 512 + bt) * 2 * values
    names = [n for n in tensor_shapes(c) if not n.startswith("rms")]
    q4 = {n: "q4_k" for n in names}
    pool = memory.estimate(c, q4, kv_type="q8_0", kv_positions=8 * 4096)  # 8 chats of 4096, q8_0
    assert pool.cache == 8 * 4096 * 34 * values // 32
    assert memory.estimate(c, q4, kv_type="f16").cache == 4096 * 2 * values  # llama2 run: one context
    assert memory.estimate(c, q4, kv_type="f16", kv_positions=8 * 4096).weights == pool.weights


def test_verdict_names_the_kv_type_and_a_budget_that_fits():
    c = SEVEN_B
    stored = {n: "q4_k" for n in tensor_shapes(c) if not n.startswith("rms")}
    small = memory.estimate(c, stored, kv_type="f16", kv_positions=4096)
    have = memory.Available(memory=small.resident + (1 << 20))
    line = memory.verdict("m.gguf", c, stored, None, 1, have, kv_type="f16", kv_positions=16 * 4096,
                          budget_flag="--kv-budget")
    assert "f16 KV cache" in line and f"for {16 * 4096} positions" in line
    budget = int(line.rsplit("--kv-budget ", 1)[1].split()[0].rstrip(","))
    assert 4096 <= budget < 16 * 4096 and budget % 16 == 0
    assert memory.verdict("m.gguf", c, stored, None, 1, have, kv_type="f16", kv_positions=budget) is None
    assert memory.verdict("m.gguf", c, stored, None, 1, have, kv_type="f16", kv_positions=budget + 16) is not None


def test_guard_takes_the_formats_kv_type():
    """GGUF models get an f16 cache by default, llama2.c checkpoints f32 (kvcache.default_type)."""
    assert memory.default_kv_type(asset("stories260K.gguf")) == "f16"
    assert memory.default_kv_type(asset("stories260K.bin")) == "f32"
    config, stored = memory.describe(asset("stories260K.gguf"))
    f16 = memory.estimate(config, stored, kv_type="f16")
    have = memory.Available(memory=f16.resident)  # enough for f16's cache, not f32's
    assert memory.estimate(config, stored, kv_type="f32").resident > have.memory
    with memory.guard(asset("stories260K.gguf"), have=have):
        pass
    with pytest.raises(Exception, match="f32 KV cache"):
        with memory.guard(asset("stories260K.gguf"), have=have, kv_type="f32"):
            pass


def test_estimate_by_storage():
    """Every tensor costs its stored bytes (used in place); quantizing at load costs the quantized
    bytes resident, and the float file stays mapped."""
    m = params(SEVEN_B, matrices_only=True)
    norms = 4 * (params(SEVEN_B) - m)
    names = [n for n in tensor_shapes(SEVEN_B) if not n.startswith("rms")]
    bf16 = memory.estimate(SEVEN_B, {n: "bf16" for n in names})
    assert bf16.weights == bf16.address_weights == 2 * m + norms  # in place, not widened
    q8 = memory.estimate(SEVEN_B, {n: "q8_0" for n in names})  # GGUF Q8_0: 34 bytes per 32 values
    assert q8.weights == q8.address_weights == 34 * m // 32 + norms
    v2 = memory.estimate(SEVEN_B, {n: "int8_groups:64" for n in names})  # llama2.c int8, scale per 64
    assert v2.weights == pytest.approx(m * (1 + 4 / 64) + norms, abs=len(names) * 32 * 4)
    q6 = memory.estimate(SEVEN_B, {n: "q6_k" for n in names})
    assert q6.weights == 210 * m // 256 + norms
    quantized = memory.estimate(SEVEN_B, {n: "f16" for n in names}, quantize="q8_0")
    assert quantized.weights == pytest.approx((1 + 4 / 32) * m + norms, rel=1e-6)  # the f16 map is not resident
    assert quantized.address_weights == pytest.approx((2 + 1 + 4 / 32) * m + norms, rel=1e-6)
    assert quantized.scratch > bf16.scratch  # a matrix widened while it is quantized


@pytest.mark.parametrize("level", native.supported())
def test_a_matrix_regrouped_at_load_costs_its_address_space_again(level, restore_level):
    """Q4_K regrouped at load (weights.interleaved, AVX-512): resident the same (the file's pages
    handed back), its size again in address space (the file stays mapped); other levels as stored."""
    native.select(level)
    for c in (SEVEN_B, dataclasses.replace(SEVEN_B, shared_classifier=False)):
        m = params(c, matrices_only=True)
        norms = 4 * (params(c) - m)
        names = [n for n in tensor_shapes(c) if not n.startswith("rms")]
        q4 = memory.estimate(c, {n: "q4_k" for n in names})
        assert q4.weights == 144 * m // 256 + norms
        # the embedding's lookups read the file: regrouped only as the classifier
        embedding = 0 if c.shared_classifier else 144 * c.vocab_size * c.dim // 256
        extra = 144 * m // 256 - embedding if level == "avx512" else 0
        assert q4.address_weights == q4.weights + extra, c.shared_classifier


@pytest.mark.slow
def test_quantize_estimate_follows_the_quantizers():
    """A mix at load: each tensor's bytes are those of the type llama.cpp's rule gives it."""
    from llama2 import quantize
    from llama2.formats import gguf
    from llama2.checkpoint import LAYER_MATRICES
    from llama2.model import Transformer

    ckpt = gguf.load(asset("kquant/rand256-f16.gguf"))
    c = ckpt.config
    stored = {n: "f16" for n in tensor_shapes(c) if not n.startswith("rms")}
    for mix in ("q4_k_m", "q5_k_m", "q4_0", "q6_k", "q8_0"):
        model = Transformer(ckpt, quantize=mix)
        held = model.embedding.nbytes + (0 if c.shared_classifier else model.classifier.nbytes)
        held += sum(layer_m.nbytes for layer in model.layers for layer_m in layer.matrices())
        norms = 4 * (params(c) - params(c, matrices_only=True))
        assert memory.estimate(c, stored, quantize=mix).weights == held + norms, mix
    on_disk = memory.estimate(c, memory.describe(asset("kquant/rand256-q4_k_m.gguf"))[1])
    assert on_disk.weights == memory.estimate(c, stored, quantize="q4_k_m").weights  # same tensors
    assert quantize.tensor_type("q4_k_m", "wv", 1, 2) == "q6_k" and LAYER_MATRICES  # a real mix


def test_seven_b_bf16_folder_fits_where_it_used_not_to():
    """A Llama-2-7B-shaped HF bf16 folder on a 24 GB machine: used in place it needs its 13.5 GB
    plus the KV cache, so it fits (widened to float32 it needed 27 GB); under a 16 GB address-space
    limit it is refused with what would fit."""
    stored = {n: "bf16" for n in tensor_shapes(SEVEN_B) if not n.startswith("rms")}
    roomy = memory.Available(memory=24 << 30)
    assert memory.verdict("Llama-2-7b-hf", SEVEN_B, stored, None, 1, roomy) is None
    tight = memory.Available(memory=100 << 30, address=15 << 30, limit=16 << 30)
    line = memory.verdict("Llama-2-7b-hf", SEVEN_B, stored, None, 1, tight)
    assert line is not None and "\n" not in line
    need = memory.estimate(SEVEN_B, stored)
    assert f"needs about {memory.gb(need.address)}" in line and memory.gb(15 << 30) in line
    assert "would fit" in line and "--dtype q8_0" in line


def test_verdict_names_fewer_slots_and_quantize():
    stored = {n: "f32" for n in tensor_shapes(SEVEN_B) if not n.startswith("rms")}
    one, four = (memory.estimate(SEVEN_B, stored, slots=n) for n in (1, 4))
    have = memory.Available(memory=(one.resident + four.resident) // 2)
    line = memory.verdict("m.bin", SEVEN_B, stored, None, 4, have, slots_flag="--max-batch")
    assert "--quantize q8_0" in line and "--max-batch" in line
    assert memory.verdict("m.bin", SEVEN_B, stored, None, 1, memory.Available(memory=one.resident)) is None
    q4 = memory.estimate(SEVEN_B, stored, quantize="q4_k_m")
    line = memory.verdict("m.bin", SEVEN_B, stored, None, 1, memory.Available(memory=q4.resident + (1 << 20)))
    assert "--quantize q4_k_m" in line  # q8_0 would not fit, the mix does
    tiny = memory.Available(memory=1 << 20)
    assert "even an int8 file" in memory.verdict("m.bin", SEVEN_B, stored, None, 1, tiny)


def test_describe_reads_headers_only(tmp_path):
    config, stored = memory.describe(asset("stories260K.bin"))
    assert config.dim == 64 and set(stored.values()) == {"f32"}
    _, stored = memory.describe(asset("stories260K-q8.bin"))
    assert stored["wq"] == "int8_groups:8"
    config, stored = memory.describe(asset("stories260K.gguf"))
    assert config.dim == 64 and stored["wq"] == ["f32"] * config.n_layers
    config, stored = memory.describe(asset("kquant/rand256-q4_k_m.gguf"))
    assert stored["wv"] == ["q4_k", "q6_k"] and stored["wcls"] == "q6_k"  # per layer, as the file says
    (tmp_path / "empty.bin").write_bytes(b"")
    assert memory.describe(tmp_path / "empty.bin") is None  # no estimate: the loader says what is wrong
    assert memory.describe(tmp_path / "missing.bin") is None


@pytest.mark.parametrize("name", ["stories260K.bin", "stories260K-q8.bin", "stories260K.gguf",
                                  "kquant/rand256-q4_k_m.gguf", "kquant/rand256-f16.gguf",
                                  "kquant/rand256-q8_0.gguf"])
def test_estimate_equals_what_the_loader_holds(name):
    """The estimate's weights are the bytes of the matrices the loaded model holds, plus norms."""
    from llama2 import formats
    from llama2.model import Transformer

    ckpt = formats.load_checkpoint(asset(name))
    c = ckpt.config
    model = Transformer(ckpt)
    held = model.embedding.nbytes + (0 if c.shared_classifier else model.classifier.nbytes)
    held += sum(m.nbytes for layer in model.layers for m in layer.matrices())
    norms = 4 * (params(c) - params(c, matrices_only=True))
    assert memory.estimate(c, memory.describe(asset(name))[1]).weights == held + norms


def test_hf_folder_is_described_by_its_safetensors(tmp_path):
    """An HF folder's matrices are used in place: the estimate takes each tensor's safetensors dtype
    and equals what the loaded model holds."""
    import json

    from safetensors.numpy import save_file

    from llama2.formats import hf
    from llama2.model import Transformer

    c = SMALL
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in tensor_shapes(c).items():
        dtype = np.float32 if name.startswith("rms") or name == "w2" else np.float16  # a mixed folder
        for layer in (range(c.n_layers) if len(shape) == 3 or name in ("rms_att", "rms_ffn") else [None]):
            s = shape[1:] if layer is not None else shape
            tensors[hf.NAMES[name].format(layer)] = rng.standard_normal(s).astype(dtype)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len, "tie_word_embeddings": c.shared_classifier}))
    config, stored = memory.describe(folder)
    assert stored["wq"] == ["f16"] * c.n_layers and stored["w2"] == ["f32"] * c.n_layers
    model = Transformer(hf.load(folder))
    held = model.embedding.nbytes + sum(m.nbytes for layer in model.layers for m in layer.matrices())
    norms = 4 * (params(c) - params(c, matrices_only=True))
    assert memory.estimate(config, stored).weights == held + norms


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
    assert err.count("ran out of memory") == 1  # not again inside the suggested export command


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_real_address_space_limit_is_read():
    """A process under `ulimit -v` just above what it maps is refused with the limit in the line."""
    script = (
        "import resource, sys\n"
        "import llama2.llama, llama2.memory, llama2.cli.run, llama2.formats, llama2.checkpoint\n"
        "mapped = llama2.memory._kib('/proc/self/status', 'VmSize')\n"
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + (40 << 20), resource.RLIM_INFINITY))\n"
        "from llama2.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.run([sys.executable, "-c", script, "run", str(asset("stories260K.bin")), "-z",
                        str(asset("tok512.bin"))], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "address-space limit" in p.stderr and "Traceback" not in p.stderr


def test_serve_refuses_a_kv_budget_that_does_not_fit(monkeypatch):
    """`llama2 serve --kv-budget N` needs the pool of N positions to fit beside the weights; the
    line names the budget that would."""
    config, stored = memory.describe(asset("stories260K.bin"))
    one = memory.estimate(config, stored, kv_type="f32", kv_positions=config.seq_len)
    monkeypatch.setattr(memory, "available", lambda: memory.Available(memory=one.resident))
    code, err = run_cli(["serve", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")),
                         "--kv-budget", "10000000"])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "f32 KV cache" in err and "for 10000000 positions" in err
    budget = int(err.rsplit("--kv-budget ", 1)[1].split()[0].rstrip(",;"))
    assert config.seq_len <= budget < 10000000


def test_each_record_gives_its_own_figure(monkeypatch):
    """memory.py asks the records: a format's default KV type is its reader's KV_TYPE (a new format
    is budgeted with its own), a matrix costs its weight type's stored bytes, a cache its KV type's."""
    from llama2 import formats, kvcache, weights
    from llama2.formats import gguf

    monkeypatch.setattr(gguf, "KV_TYPE", "q8_0")
    assert memory.default_kv_type(asset("stories260K.gguf")) == "q8_0"
    config, stored = memory.describe(asset("stories260K.gguf"))
    have = memory.Available(memory=memory.estimate(config, stored, kv_type="q8_0").resident)
    with memory.guard(asset("stories260K.gguf"), have=have):  # f16's cache would not fit here
        pass
    assert formats.load_checkpoint(asset("stories260K.gguf")).kv_type == "q8_0"
    for m in weights.MODULES:
        if m.NAME != "int8_groups":
            assert weights.stored_bytes(m.NAME, 3, 512) == 3 * 512 // m.BLOCK * m.DTYPE.itemsize
    assert weights.stored_bytes("int8_groups:64", 3, 512) == weights.int8_groups.quantize(np.ones((3, 512)), 64).nbytes
    assert memory.kv_cache_bytes(SMALL, "bf16", 17) == kvcache.pool_bytes(SMALL, "bf16", 17)


def test_a_sliding_window_bounds_the_cache_estimate():
    """Mistral 7B v0.1's shape: a 32768-position context attended through a 4096-position window;
    the cache frees the blocks before the window, so a sequence holds at most 4096 + 32 positions."""
    import dataclasses
    from llama2.config import PRESETS
    c = dataclasses.replace(PRESETS["llama2-7b"], n_kv_heads=8, seq_len=32768, sliding_window=4096)
    assert memory.held_positions(c) == 4096 + 32
    assert memory.held_positions(dataclasses.replace(c, sliding_window=None)) == 32768
    need = memory.estimate(c, {}, slots=2, kv_type="f16")
    assert need.cache == memory.kv_cache_bytes(c, "f16", 2 * (4096 + 32))
