"""`llama2 run --lora DIR [--lora-scale S]` in-process: the adapter's story is the Python API's with
that adapter, scale 0 gives the base's bytes, two adapters sum, and mistakes get one line (exit 2
for a flag, 1 for an adapter that does not fit the model); `llama2 export --lora` into Q4_K_M."""

import io

import pytest

from conftest import asset, random_adapter
from llama2 import Llama
from llama2.cli import main

PROMPT = "Once upon a time, there was a little girl named"


def run_cli(*flags):
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset("stories260K.bin")), PROMPT, "-z", str(asset("tok512.bin")), "-t", "0",
                 "-n", "60", *map(str, flags)], stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("adapters")
    return [random_adapter(root / f"a{i}", llama.config, seed=i, scale=0.2) for i in range(2)]


def api_story(lora) -> bytes:
    llama = Llama.load(asset("stories260K.bin"), asset("tok512.bin"), lora=lora)
    return (PROMPT + "".join(llama.generate(PROMPT, steps=60, temperature=0.0)) + "\n").encode()


def test_run_with_adapters_prints_the_api_s_story(adapters):
    code, base, err = run_cli()
    assert code == 0, err
    code, adapted, err = run_cli("--lora", adapters[0])
    assert code == 0, err
    assert adapted != base and adapted == api_story(adapters[0])
    code, zero, err = run_cli("--lora", adapters[0], "--lora-scale", "0")
    assert code == 0 and zero == base, err
    code, both, err = run_cli("--lora", adapters[0], "--lora", adapters[1] / "adapter.gguf", "--lora-scale", "0.5")
    assert code == 0, err
    assert both == api_story([adapters[0], (adapters[1] / "adapter.gguf", 0.5)])


def test_lora_mistakes_get_one_line(adapters, tmp_path):
    for flags, code_expected, words in [
        (["--lora", tmp_path / "missing"], 2, ["--lora", "no such file"]),
        (["--lora-scale", "2", "--lora", adapters[0]], 2, ["--lora-scale 2.0", "after each --lora"]),
        (["--lora", adapters[0], "--lora-scale", "1", "--lora-scale", "2"], 2, ["--lora-scale 2.0"]),
        (["--lora", adapters[0], "--lora-scale", "nan"], 2, ["--lora-scale nan", "finite"]),
    ]:
        code, out, err = run_cli(*flags)
        assert code == code_expected and out == b"", (flags, err)
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), (flags, err)
    other = random_adapter(tmp_path / "other", Llama.load(asset("kquant/rand256-q8_0.gguf")).config)
    for source in (other, other / "adapter.gguf"):
        code, out, err = run_cli("--lora", source)
        assert code == 1 and out == b"" and len(err.strip().splitlines()) == 1, err
        assert str(source) in err and ("another model" in err or "does not fit this model" in err), err


def test_export_merges_an_adapter_into_q4_k_m(tmp_path):
    """`export --lora --dtype q4_k_m`: the merged weights quantized as a merged float file would be
    (the same tensors, byte for byte), Q4_K_M's own mix of Q4_K and Q6_K, and the adapter is in the
    result (its logits are nearer the unmerged adapter's than the base's)."""
    import numpy as np
    from llama2 import formats

    base = asset("kquant/rand256-f16.gguf")
    config = formats.load_checkpoint(base).config
    adapter = random_adapter(tmp_path / "a", config, scale=0.1)

    def export(out, *flags):
        out_, err = io.BytesIO(), io.StringIO()
        code = main(["export", str(out), *map(str, flags)], stdout=out_, stderr=err, stdin=io.StringIO(""))
        assert code == 0, err.getvalue()
        return out

    direct = export(tmp_path / "direct.gguf", "--from", base, "--lora", adapter, "--format", "gguf",
                    "--dtype", "q4_k_m")
    merged = export(tmp_path / "merged.gguf", "--from", base, "--lora", adapter, "--format", "gguf", "--dtype", "fp32")
    twice = export(tmp_path / "twice.gguf", "--from", merged, "--format", "gguf", "--dtype", "q4_k_m")
    a, b = formats.load_checkpoint(direct), formats.load_checkpoint(twice)
    types = set()
    for name, value in a.weights.items():
        other = b.weights[name]
        for m, n in zip(*((v if isinstance(v, list) else [v]) for v in (value, other))):
            if hasattr(m, "blocks"):
                types.add(m.NAME)
                assert m.NAME == n.NAME and np.array_equal(np.asarray(m.blocks), np.asarray(n.blocks)), name
    assert {"q4_k", "q6_k"} <= types
    ids = list(range(1, 40))
    quantized = Llama.load(direct).logits(ids)
    unmerged = Llama.load(base, lora=adapter).logits(ids)
    plain = Llama.load(base).logits(ids)
    assert np.abs(quantized - unmerged).max() < 0.5 * np.abs(plain - unmerged).max()
