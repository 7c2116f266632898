"""The benchmark's model files for the TinyLlama-1.1B, Llama-2-7B and Llama-3.2-1B shapes: one set
per shape, written once into the bench folder and reused (a run that stops part-way resumes where it
stopped).

Weights are random from a fixed seed, at the scale of trained Llama weights so that quantization
behaves as on real ones: matrices N(0, 0.02), norms 1 + N(0, 0.02). Every value is rounded to one
that bfloat16 and float16 both hold exactly, so the HF bf16 folder and the F16 GGUF are the same
model bit for bit (a row on the folder can stand against llama.cpp on the F16 GGUF). Files:

    f16      {shape}-f16.gguf     our GGUF exporter, streamed one tensor at a time
    bf16     {shape}-hf-bf16/     config.json + safetensors shards (the safetensors package)
    q8_0, q4_0, q4_k_m, q6_k      {shape}-{kind}.gguf, made from the F16 GGUF by llama.cpp's own
                                  quantizer (llama-cpp-python's llama_model_quantize, in a child)

The GGUFs carry the shape's vocabulary: Llama 2's sentencepiece one (tokenizer.bin), or for
Llama 3.2 Meta's tiktoken tokenizer.model as the llama-models package ships it, written as a GGUF
byte-level BPE vocabulary (gpt2 model, llama-bpe pre-tokenizer, as llama.cpp's converter writes it).
Every file is written under a temporary name and renamed when complete.
"""

import json
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import tensor_shapes
from ..weights.bf16 import f32_to_bf16
from ..config import ModelConfig, RopeScaling
from ..errors import Llama2Error
from ..formats.hf import config_json
from .child import child_command, last_line

FILES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k")
QUANTIZED = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q6_k": "Q6_K"}  # LLAMA_FTYPE_MOSTLY_*
# bytes per weight, for the disk check (Q4_K_M mixes Q4_K and Q6_K: about 4.85 bits a weight)
BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k_m": 0.61,
                    "q6_k": 210 / 256}
SEED = 1234
STD = 0.02
SHARD_BYTES = 1 << 30  # safetensors shard size of the HF folder (one shard is held in memory)
DISK_MARGIN = 1 << 30  # left free after the files are written


@dataclass(frozen=True)
class Shape:
    config: ModelConfig
    # the GGUF's vocabulary: a file of the assets or the cache (tokenizer.bin), or "PACKAGE:PATH", a
    # file an installed package ships
    tokenizer: str
    decode_tokens: int  # tokens timed for decode tok/s
    files: tuple  # the files measured unless --weights says otherwise
    named_only: bool = False  # measured only when named in --models


SHAPES = {
    "tinyllama-1.1b": Shape(ModelConfig(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4,
                                        vocab_size=32000, seq_len=2048, shared_classifier=False,
                                        rope_theta=10000.0),
                            "tokenizer.bin", 128, FILES),
    "llama2-7b": Shape(ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                                   vocab_size=32000, seq_len=4096, shared_classifier=False),
                       "tokenizer.bin", 64, ("q8_0", "q4_k_m"), named_only=True),
    # Llama 3.2 1B: tied embeddings, Meta's 128256-token vocabulary, llama3 RoPE scaling. Context
    # 8192 (the scaling's original one), not the real 131072: at 131072 `llama2 run`'s memory check
    # counts a whole-context prompt's activations (28.6 GB) and refuses the first-run row here.
    "llama3.2-1b": Shape(ModelConfig(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                                     vocab_size=128256, seq_len=8192, shared_classifier=True,
                                     rope_theta=500000.0, bos_id=128000, eos_id=128001,
                                     rope_scaling=RopeScaling("llama3", factor=32.0, original_context=8192,
                                                              low_freq_factor=1.0, high_freq_factor=4.0)),
                         "llama_models:llama3/tokenizer.model", 128, ("f16", "q8_0", "q4_k_m"),
                         named_only=True),
    # a plumbing check (seconds): rows of 256 so the k-quants apply, stories260K's tokenizer
    "tiny": Shape(ModelConfig(dim=256, hidden_dim=768, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                              seq_len=1024, shared_classifier=False),
                  "tok512.bin", 32, FILES, named_only=True),
}


def package_file(spec: str) -> Path:
    """"PACKAGE:PATH" -> the file PATH inside installed package PACKAGE, or a one-line error."""
    import importlib.util

    package, inner = spec.split(":", 1)
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise Llama2Error(f"bench: the tokenizer {inner} comes from the {package} package, which is not "
                          f"installed; pip install {package.replace('_', '-')}")
    path = Path(next(iter(found.submodule_search_locations))) / inner
    if not path.is_file():
        raise Llama2Error(f"bench: {path} not found in the installed {package} package")
    return path


def paths(shape: str, directory) -> dict:
    """kind -> where that file of `shape` lives (a folder for bf16)."""
    directory = Path(directory)
    return {kind: directory / (f"{shape}-hf-bf16" if kind == "bf16" else f"{shape}-{kind}.gguf")
            for kind in FILES}


def n_weights(config: ModelConfig) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(config).values())  # wcls included if not shared


def to_write(shape: str, kinds, directory) -> list:
    """The files `kinds` of `shape` needs that are not there yet (the F16 GGUF if a quantized file
    is to be made from it), in the order they are made."""
    where = paths(shape, directory)
    missing = [k for k in FILES if k in kinds and not where[k].exists()]
    if any(k in QUANTIZED for k in missing) and "f16" not in missing and not where["f16"].exists():
        missing.insert(0, "f16")
    return missing


def needed_bytes(shape: str, kinds, directory) -> int:
    n = n_weights(SHAPES[shape].config)
    return int(sum(n * BYTES_PER_WEIGHT[k] for k in to_write(shape, kinds, directory)))


def _free_bytes(directory) -> int:
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(plan: dict, directory):
    """Refuse (one line) before writing anything when the files `plan` ({shape: kinds}) still
    needs do not fit on the disk of `directory` with DISK_MARGIN to spare."""
    need = {s: needed_bytes(s, kinds, directory) for s, kinds in plan.items()}
    total = sum(need.values())
    if total == 0:
        return
    free = _free_bytes(directory)
    if total + DISK_MARGIN > free:
        what = ", ".join(f"{s} {b / 1e9:.1f} GB" for s, b in need.items() if b)
        raise Llama2Error(f"bench: the model files need {total / 1e9:.1f} GB more disk in {directory} "
                          f"({what}) and {free / 1e9:.1f} GB is free (keeping {DISK_MARGIN / 1e9:.1f} GB "
                          f"spare); free some space or pick another --dir")


# -- random weights ------------------------------------------------------------------------------

def exact_in_bf16_and_f16(a: np.ndarray) -> np.ndarray:  # float32 [...] -> the same, in place
    """Round to bfloat16 (nearest even), then to float16: the result is held exactly by both
    (an 8-bit significand fits float16's 11 bits; values float16 holds only as subnormals land on
    its 2^-24 grid, which needs at most 7 significant bits)."""
    u = a.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    u &= np.uint32(0xFFFF0000)
    a[...] = a.astype(np.float16)
    return a


def random_tensor(config: ModelConfig, name: str, layer=None) -> np.ndarray:
    """One tensor (our layout and names, per layer for stacked ones), the same on every call."""
    shape = tensor_shapes(config).get(name, (config.vocab_size, config.dim))  # wcls if not shared
    if layer is not None:
        shape = shape[1:]
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), 0 if layer is None else layer + 1])
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(STD)
    if name.startswith("rms"):
        a += np.float32(1.0)
    return exact_in_bf16_and_f16(a)


class RandomSource:
    """The random model as an export.py tensor source."""

    def __init__(self, config: ModelConfig, vocab=None):
        self.config, self.vocab, self.chat_template = config, vocab, None

    def tensor(self, name, layer=None) -> np.ndarray:
        return random_tensor(self.config, name, layer)


# -- writers -------------------------------------------------------------------------------------

def write_gguf_f16(config: ModelConfig, path, vocab):
    """The F16 GGUF, by our exporter (`llama2 export --format gguf --dtype fp16`): one tensor in
    memory at a time, written to a temporary file and renamed."""
    from ..export import export

    export(path, RandomSource(config, vocab), fmt="gguf", dtype="fp16", vocab=vocab, warn=lambda text: None)


def hf_config(config: ModelConfig) -> dict:
    """The bf16 folder's config.json: the exporter's own (formats.hf.config_json)."""
    return config_json(config, "bf16")


def _hf_tensors(config: ModelConfig) -> list:
    """(HF name, our name, layer, shape) in the order transformers' checkpoints list them."""
    from ..formats.hf import NAMES

    shapes = tensor_shapes(config)
    out = [(NAMES["token_embedding"], "token_embedding", None, shapes["token_embedding"])]
    for layer in range(config.n_layers):
        for name in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w3", "w2"):
            out.append((NAMES[name].format(layer), name, layer, shapes[name][1:]))
    out.append((NAMES["rms_final"], "rms_final", None, shapes["rms_final"]))
    if not config.shared_classifier:
        out.append((NAMES["wcls"], "wcls", None, (config.vocab_size, config.dim)))
    return out


def _save_safetensors(arrays: dict, path):
    """{HF name: uint16 bf16 bits} -> one .safetensors file, through the safetensors package."""
    import safetensors

    if not hasattr(safetensors, "TensorSpec"):
        raise Llama2Error(f"bench: writing {path} needs safetensors 0.8 or later (found "
                          f"{safetensors.__version__}); pip install -U safetensors")
    specs = {name: safetensors.TensorSpec(dtype="bfloat16", shape=list(a.shape), data_ptr=a.ctypes.data,
                                          data_len=a.nbytes)
             for name, a in arrays.items()}
    safetensors.serialize_file(specs, str(path), {"format": "pt"})  # `arrays` keeps the buffers alive


def write_hf_bf16(config: ModelConfig, folder, shard_bytes: int = SHARD_BYTES, spm_model=None):
    """A Hugging Face folder in bf16: config.json, safetensors shards of about `shard_bytes` (one
    shard held in memory at a time) with their index when there are several, and `spm_model` (a
    sentencepiece tokenizer.model) when given. q/k are stored in HF's rotate-half order. Written
    into a temporary folder renamed when complete."""
    from ..formats.hf import permute

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for entry in _hf_tensors(config):
        nbytes = 2 * int(np.prod(entry[3]))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        weight_map, total = {}, 0
        for shard, file_name in zip(shards, names):
            arrays = {}
            for hf_name, name, layer, _ in shard:
                a = random_tensor(config, name, layer)
                if name in ("wq", "wk"):
                    a = permute(a, config.n_heads if name == "wq" else config.n_kv_heads)
                arrays[hf_name] = f32_to_bf16(a).reshape(a.shape)
                weight_map[hf_name] = file_name
                total += arrays[hf_name].nbytes
            _save_safetensors(arrays, tmp / file_name)
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        if spm_model is not None:
            shutil.copyfile(spm_model, tmp / "tokenizer.model")
        os.chmod(tmp, 0o755)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quantize(source, out, kind: str, threads: int, python: str = None):
    """`out` = llama.cpp's quantizer applied to the GGUF `source` (LLAMA_FTYPE_MOSTLY_{kind}), run
    in a child of `python` (the peer's interpreter: the quantizer of the llama.cpp being measured)."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        cmd, env = child_command("quantize", python)
        cmd += ["quantize", str(source), tmp, QUANTIZED[kind], str(threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise Llama2Error(f"bench: llama.cpp's quantizer failed on {source} -> {kind}: {last_line(p)}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare(shape: str, kinds, directory, tokenizer, spm_model=None, threads: int = 2, python: str = None,
            log=lambda text: None) -> dict:
    """Make the files `kinds` of `shape` that are missing (resumable: what exists is kept);
    returns kind -> path for every kind asked."""
    from ..formats.vocab import load_vocab

    config = SHAPES[shape].config
    where = paths(shape, directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    for kind in to_write(shape, kinds, directory):
        log(f"{shape}: writing {where[kind].name} ...")
        if kind == "f16":
            write_gguf_f16(config, where[kind], load_vocab(tokenizer, config.vocab_size))
        elif kind == "bf16":
            write_hf_bf16(config, where[kind], spm_model=spm_model)
        else:
            quantize(where["f16"], where[kind], kind, threads, python)
    return {k: where[k] for k in kinds}
