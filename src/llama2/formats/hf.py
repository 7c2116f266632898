"""Hugging Face Llama model directories: config.json, safetensors (or pytorch_model.bin), tokenizer.

Two ways in. `load` runs a folder in place: safetensors are memory-mapped and every matrix is used
in its stored type (bf16, f16, f32: weights.Matrix over a view of the map), q/k included: the config
says rope_style "halves" and the forward pass rotates HF's (i, i + hd/2) pairs instead of
un-permuting a copy. `HFModel.tensor` is the export source: one tensor at a time (pread, so exported
tensors' pages are freed), converted to float32 and, for q/k, un-permuted back to Meta's interleaved
RoPE layout that llama2.c and GGUF use. pytorch_model.bin goes through torch, imported only then.
References: transformers' convert_llama_weights_to_hf.py (the permutation undone here), the
safetensors format (8-byte header length, JSON header, raw little-endian data).
"""

import contextlib
import dataclasses
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .. import chat_template as templates, weights
from ..checkpoint import LAYER_MATRICES, Checkpoint, matrix_kinds, tensor_shapes
from ..config import ModelConfig, RopeScaling
from ..errors import FormatError
from ..fileio import atomic_write, open_user_file, read_user_text
from ..weights.bf16 import bf16_to_f32, f32_to_bf16
from .vocab import UNUSED, from_tokenizer_json, load_vocab, to_sentencepiece, to_tokenizer_json

# our name -> Hugging Face name ("{}" is the layer)
NAMES = {
    "token_embedding": "model.embed_tokens.weight",
    "rms_att": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight",
    "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
    "w1": "model.layers.{}.mlp.gate_proj.weight",
    "w2": "model.layers.{}.mlp.down_proj.weight",
    "w3": "model.layers.{}.mlp.up_proj.weight",
    "rms_final": "model.norm.weight",
    "wcls": "lm_head.weight",
}
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
STORED_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # safetensors dtype -> weights type
MODEL_TYPES = ("llama", "mistral")
KV_TYPE = "f16"  # the KV cache its models get by default: as llama.cpp's for the same model


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n_heads*hd, D] -> [n_heads*hd, D]
    """Undo HF's q/k permutation: per head, HF puts the real halves of the RoPE pairs first and the
    imaginary halves second ("rotate half"); Meta and llama2.c interleave them (x0, y0, x1, y1...)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:  # the inverse of unpermute (Meta -> HF)
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class SafetensorsFile:
    """One .safetensors file; `get(name)` reads one tensor (pread, not mmap: the bytes of tensors
    already converted are freed, so a streaming export never holds the whole file) as float32."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd = open_user_file(self.path, "safetensors file")
        self.size = os.fstat(self.fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > self.size - 8:
                raise ValueError
            self.header = json.loads(os.pread(self.fd, n, 8))
        except (struct.error, ValueError):
            raise FormatError(f"{self.path}: not a safetensors file (bad header)") from None
        self.header.pop("__metadata__", None)
        self.names = list(self.header)
        self.data = 8 + n
        self.map = None  # the whole file, mapped on the first `stored` call

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self.fd)

    def _info(self, name):  # -> (safetensors dtype, numpy dtype, shape, absolute offset, bytes)
        info = self.header.get(name)
        if info is None:
            raise FormatError(f"{self.path}: has no tensor {name}")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise FormatError(f"{self.path}: tensor {name} has dtype {info['dtype']}; supported: "
                              f"{', '.join(SAFETENSORS_DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape))
        if end - begin != count * np.dtype(dtype).itemsize or self.data + end > self.size:
            raise FormatError(f"{self.path}: tensor {name} has {end - begin} bytes at offset "
                              f"{self.data + begin}, which does not fit shape {list(shape)}")
        return info["dtype"], dtype, shape, self.data + begin, end - begin

    def get(self, name) -> np.ndarray:
        kind, dtype, shape, offset, nbytes = self._info(name)
        raw = bytearray(nbytes)  # writable, so the float32 case needs no further copy
        if os.preadv(self.fd, [raw], offset) != len(raw):
            raise FormatError(f"{self.path}: truncated at tensor {name}")
        arr = np.frombuffer(raw, dtype).reshape(shape)
        if kind == "BF16":
            return bf16_to_f32(arr)
        return arr if kind == "F32" else arr.astype(np.float32)

    def stored(self, name):
        """The tensor as stored, a view of the mapped file: a weights.Matrix for 2-D bf16/f16/f32
        tensors, float32 values for 1-D ones (norms: small) and for F64."""
        kind, dtype, shape, offset, nbytes = self._info(name)
        if self.map is None:
            self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            if hasattr(self.map, "madvise"):  # used in place: have the kernel read it ahead
                self.map.madvise(mmap.MADV_WILLNEED)
        if kind in STORED_TYPES and len(shape) == 2:
            return weights.from_buffer(STORED_TYPES[kind], self.map, offset, shape, f"{self.path}: {name}")
        arr = np.frombuffer(self.map, dtype, int(np.prod(shape)), offset).reshape(shape)
        return bf16_to_f32(arr) if kind == "BF16" else arr.astype(np.float32)


def write_safetensors(path, entries, tensor, metadata=None):
    """Write a .safetensors file streaming: `entries` [(name, safetensors dtype, shape)] in file
    order, `tensor(name)` -> its array in that dtype (BF16: uint16 bits), asked one at a time."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in entries:
        size = int(np.prod(shape)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as the format recommends
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in entries:
            arr = np.ascontiguousarray(tensor(name), SAFETENSORS_DTYPES[dtype])
            if arr.shape != tuple(shape):
                raise FormatError(f"cannot write {path}: tensor {name} has shape {list(arr.shape)}, "
                                  f"expected {list(shape)}")
            f.write(arr.tobytes())


class TorchFile:
    """A pytorch_model.bin shard, loaded lazily by mmap through torch (imported only here)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise FormatError(f"{self.path}: reading pytorch_model.bin needs torch "
                              "(pip install torch), or convert the model to safetensors") from None
        os.close(open_user_file(self.path, "PyTorch file"))  # torch maps it by name: check it first
        try:
            self.state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise FormatError(f"{self.path}: cannot read PyTorch file ({str(e).splitlines()[0]})") from None
        self.names = list(self.state)

    def get(self, name) -> np.ndarray:
        return self._raw(name).float().numpy()

    def stored(self, name):
        """The tensor in its stored type, a numpy view of torch's mapped storage, for 2-D bf16
        (through its 16 bits), f16 and f32 tensors; float32 otherwise."""
        import torch
        t = self._raw(name)
        if t.dim() != 2 or t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return t.float().numpy()
        if t.dtype == torch.bfloat16:
            return weights.bf16.Matrix(t.view(torch.int16).numpy().view("<u2"))
        return (weights.f16.Matrix if t.dtype == torch.float16 else weights.f32.Matrix)(t.numpy())

    def _raw(self, name):
        if name not in self.state:
            raise FormatError(f"{self.path}: has no tensor {name}")
        t = self.state[name]
        if not t.is_floating_point():
            raise FormatError(f"{self.path}: tensor {name} has dtype {t.dtype}; expected a float type")
        return t


def _read_json(path, what):
    if not os.path.lexists(path):
        raise FormatError(f"{path}: missing {what}")
    text = read_user_text(path, what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path}: cannot read {what} ({e})") from None


def read_config(directory) -> ModelConfig:
    """A ModelConfig from config.json, rejecting the Llama variants our forward pass does not do."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise FormatError(f"{directory}: no such directory (models are not downloaded here: fetch one "
                          f"with `huggingface-cli download REPO --local-dir DIR` and pass DIR)")
    if not os.path.lexists(path):
        raise FormatError(f"{directory}: no config.json (expected a Hugging Face model directory with "
                          "config.json and model.safetensors)")
    cfg = _read_json(path, "config.json")
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise FormatError(f"{path}: model_type {model_type!r} is not supported (expected one of "
                          f"{', '.join(MODEL_TYPES)})")
    try:
        dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        context = int(cfg["max_position_embeddings"])
        theta, scaling = _rope(cfg, context, path)
        head_dim = cfg.get("head_dim")
        window = cfg.get("sliding_window")
        config = ModelConfig(
            dim=dim, hidden_dim=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            # dynamic scaling is there to run past the trained context: up to factor times it
            seq_len=int(context * scaling.factor) if scaling.kind == "dynamic" else context,
            shared_classifier=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=theta, rope_scaling=scaling,
            explicit_head_dim=None if head_dim is None or int(head_dim) * heads == dim else int(head_dim),
            # a window as long as the context is no window (Mistral's configs often say 4096 or 32768)
            sliding_window=None if window is None or int(window) >= context else int(window),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            bos_id=_first(cfg.get("bos_token_id"), 1), eos_id=_first(cfg.get("eos_token_id"), 2))
    except KeyError as e:
        raise FormatError(f"{path}: missing field {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: bad field value ({e})") from None
    config.validate(str(path))
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise FormatError(f"{path}: {flag} is true; biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (expected silu)")
    return config


ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}


def _rope(cfg, context, path) -> tuple:
    """(rope_theta, RopeScaling): transformers 5 keeps them in rope_parameters, older versions in
    rope_theta and rope_scaling ("type" before 4.45, then "rope_type")."""
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise FormatError(f"{path}: RoPE scaling {kind!r} is not supported (expected one of "
                          f"{', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, RopeScaling()
    if "factor" not in rope:
        raise FormatError(f"{path}: rope_scaling {kind!r} lacks its factor")
    # dynamic: transformers measures the growth from max_position_embeddings itself
    original = rope.get("original_max_position_embeddings") if kind == "llama3" else context
    return theta, RopeScaling(
        ROPE_TYPES[kind], factor=float(rope["factor"]), original_context=int(original or 0),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)))


def _first(value, default) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


class HFModel:
    """A Hugging Face directory as a tensor source: `tensor(name, layer)` -> float32, our layout."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.config = read_config(self.dir)
        self.files = {}  # file name -> opened SafetensorsFile / TorchFile
        self.where = self._index()  # HF tensor name -> file name
        if not self.config.shared_classifier and NAMES["wcls"] not in self.where:
            # some exports tie the classifier without saying so
            self.config = dataclasses.replace(self.config, shared_classifier=True)
        self.vocab = self._vocab()
        self.chat_template = self._template()

    def _index(self) -> dict:
        for index, opener in (("model.safetensors.index.json", SafetensorsFile),
                              ("pytorch_model.bin.index.json", TorchFile)):
            if (self.dir / index).is_file():
                weight_map = _read_json(self.dir / index, "index file").get("weight_map")
                if not isinstance(weight_map, dict):
                    raise FormatError(f"{self.dir / index}: no weight_map")
                for shard in sorted(set(weight_map.values())):
                    if not (self.dir / shard).is_file():
                        raise FormatError(f"{self.dir / shard}: shard listed in {index} is missing")
                self.opener = opener
                return weight_map
        for single, opener in (("model.safetensors", SafetensorsFile), ("pytorch_model.bin", TorchFile)):
            if (self.dir / single).is_file():
                self.opener = opener
                return {name: single for name in self._open(single).names}
        raise FormatError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")

    def _open(self, name):
        if name not in self.files:
            self.files[name] = self.opener(self.dir / name)
        return self.files[name]

    def _read(self, name, layer, how):  # one tensor through its file's `get` or `stored`, shape-checked
        hf_name = NAMES[name].format(layer)
        if hf_name not in self.where:
            raise FormatError(f"{self.dir}: tensor {hf_name} not found")
        arr = getattr(self._open(self.where[hf_name]), how)(hf_name)
        shape = tensor_shapes(self.config)[name]
        want = shape[1:] if layer is not None else shape
        if tuple(arr.shape) != tuple(want):
            raise FormatError(f"{self.dir}: tensor {hf_name} has shape {list(arr.shape)}, "
                              f"config.json implies {list(want)}")
        return arr

    def stored(self, name, layer=None):
        """The tensor as stored and in HF's layout (q/k rows keep their halves order): a
        weights.Matrix over the mapped file for matrices, float32 for norms."""
        return self._read(name, layer, "stored")

    def tensor(self, name, layer=None) -> np.ndarray:
        c = self.config
        arr = self._read(name, layer, "get")
        if name == "wq":
            arr = unpermute(arr, c.n_heads)
        elif name == "wk":
            arr = unpermute(arr, c.n_kv_heads)
        return arr

    def _vocab(self):
        """tokenizer.model (exact: sentencepiece scores) if present, else tokenizer.json. When the
        embedding has more rows than the tokenizer has tokens (padded for speed), the extra ids get
        placeholder pieces so every id the model can produce decodes to something."""
        # a name that is there but no regular file (a FIFO, a loop) is an error, not skipped
        if os.path.lexists(self.dir / "tokenizer.model"):  # sentencepiece, or Meta's tiktoken (Llama 3)
            vocab = load_vocab(self.dir / "tokenizer.model")
        elif os.path.lexists(self.dir / "tokenizer.json"):
            vocab = from_tokenizer_json(self.dir / "tokenizer.json", self.config.bos_id, self.config.eos_id)
        else:
            return None
        vocab.eos_ids = tuple(sorted(set(vocab.eos_ids) | eos_ids(self.dir)))
        for i in range(len(vocab), self.config.vocab_size):
            vocab.pieces.append(f"<unused{i}>")
            vocab.scores.append(0.0)
            vocab.types.append(UNUSED)
        return vocab

    def _template(self):
        return read_chat_template(self.dir)


def eos_ids(directory) -> set:
    """Every id config.json and generation_config.json name as eos_token_id (an id or a list)."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(directory) / name
        if os.path.lexists(path):
            eos = _read_json(path, name).get("eos_token_id")
            try:
                ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
            except (TypeError, ValueError):
                raise FormatError(f"{path}: eos_token_id: expected an id or a list of ids, got {eos!r}") from None
    return ids


def read_chat_template(directory):
    """The chat template of a Hugging Face folder (chat_template.jinja, else tokenizer_config.json's
    chat_template) with tokenizer_config.json's BOS / EOS texts, as a chat_template.ChatTemplate;
    None when it has none."""
    directory = Path(directory)
    tc = directory / "tokenizer_config.json"
    # a name that is there but no regular file (a FIFO, a loop) is an error, not skipped
    spec = _read_json(tc, "tokenizer_config.json") if os.path.lexists(tc) else {}
    jinja = directory / "chat_template.jinja"
    text, origin = ((read_user_text(jinja, "chat template"), jinja) if os.path.lexists(jinja)
                    else (spec.get("chat_template"), tc))
    return templates.from_model_files(text, str(origin), spec.get("bos_token"), spec.get("eos_token"))


def matches(path, head) -> bool:
    """Any directory is taken for a Hugging Face model (read_config says when it is not one)."""
    return head is None


def source(directory) -> HFModel:
    return HFModel(directory)


def describe(directory):
    """(ModelConfig, {matrix name: f32, f16 or bf16, a list per layer}) from config.json and the
    safetensors headers alone: each tensor's stored type, used in place (other dtypes are widened to
    float32). A pytorch_model.bin folder is read through torch into float32."""
    folder = Path(directory)
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        config = read_config(folder)
        return config, {name: "f32" for name in tensor_shapes(config) if not name.startswith("rms")}
    model = HFModel(folder)

    def kind(name, layer):
        hf_name = NAMES[name].format(layer)
        return STORED_TYPES.get(model._open(model.where[hf_name]).header[hf_name]["dtype"], "f32")

    return model.config, matrix_kinds(model.config, kind)


def load(directory) -> Checkpoint:
    """A Hugging Face model directory as a Checkpoint, in place: matrices in their stored type over
    the mapped safetensors (per-layer lists), q/k in HF's layout (config.rope_style "halves"), norms
    as float32 stacked per layer."""
    model = HFModel(directory)
    c = model.config
    w = {}
    for name in tensor_shapes(c):
        if name in ("rms_att", "rms_ffn"):
            w[name] = np.stack([model.stored(name, l) for l in range(c.n_layers)])
        elif name in LAYER_MATRICES:
            w[name] = [model.stored(name, l) for l in range(c.n_layers)]
        else:
            w[name] = model.stored(name)
    kinds = {m.NAME for v in w.values() for m in (v if isinstance(v, list) else [v])
             if isinstance(m, weights.Matrix)}
    names = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
    dtype = names[next(iter(kinds))] if len(kinds) == 1 else "mixed"
    return Checkpoint(dataclasses.replace(c, rope_style="halves"), w, 1, str(directory), dtype=dtype,
                      vocab=model.vocab, chat_template=model.chat_template, format="hf",
                      kv_type=KV_TYPE)


# --- writing (export.py's writer): a folder transformers' LlamaForCausalLM loads ------------------

WRITE_DTYPES = ("fp32", "fp16", "bf16")
FILES = "Hugging Face folders"
SAFETENSORS_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _rope_scaling_json(c: ModelConfig, path) -> dict:
    """config.json's rope_scaling for c's RoPE scaling (none: no key), as _rope reads it back."""
    rs = c.rope_scaling
    if rs.kind == "none":
        return {}
    if rs.kind == "factors":
        raise FormatError(f"cannot write {path}: the source scales RoPE by per-frequency factors (a GGUF "
                          "rope_freqs tensor), which config.json has no field for")
    kind = {ours: hf for hf, ours in ROPE_TYPES.items()}[rs.kind]
    scaling = {"rope_type": kind, "factor": rs.factor}
    if rs.kind == "llama3":
        scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                       original_max_position_embeddings=rs.original_context)
    return {"rope_scaling": scaling}


def config_json(c: ModelConfig, dtype="fp32", path="config.json") -> dict:
    """config.json for a model of `c`: what read_config reads back, and transformers' LlamaConfig."""
    return {**_rope_scaling_json(c, path),
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.shared_classifier,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": TORCH_DTYPES[dtype],
    }


def export(path, config: ModelConfig, tensor, vocab=None, dtype="fp32", version=None, group_size=None,
           chat_template=None, warn=print):
    """Write folder `path`: model.safetensors (HF names, q/k rows permuted to HF's rotate-half order,
    streamed a tensor at a time), config.json, generation_config.json, and the tokenizer as
    tokenizer.json (byte-level vocabularies made from one) or tokenizer.model (sentencepiece)."""
    if config.rope_style != "interleaved":
        raise FormatError(f"cannot write {path}: the source's q/k are not in the interleaved layout")
    settings = config_json(config, dtype, path)  # before any tensor: it may refuse the config
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: exists and is not a directory (--format hf writes a folder)")
    out.mkdir(parents=True, exist_ok=True)
    c = config
    kind = SAFETENSORS_TYPES[dtype]
    shapes = tensor_shapes(c)
    entries, ours = [], {}
    for name in ("token_embedding", *(("wcls",) if not c.shared_classifier else ()), "rms_final"):
        ours[NAMES[name]] = (name, None)
    for layer in range(c.n_layers):
        for name in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"):
            ours[NAMES[name].format(layer)] = (name, layer)
    for hf_name, (name, layer) in ours.items():
        shape = shapes[name][1:] if layer is not None else shapes[name]
        entries.append((hf_name, "F32" if name.startswith("rms") else kind, shape))

    def get(hf_name):
        name, layer = ours[hf_name]
        arr = np.asarray(tensor(name, layer) if layer is not None else tensor(name), np.float32)
        if name in ("wq", "wk"):
            arr = permute(arr, c.n_heads if name == "wq" else c.n_kv_heads)
        if name.startswith("rms") or dtype == "fp32":
            return arr
        return f32_to_bf16(arr) if dtype == "bf16" else arr.astype("<f2")

    write_safetensors(out / "model.safetensors", entries, get, {"format": "pt"})
    with atomic_write(out / "config.json", "w") as f:
        json.dump(settings, f, indent=2)
    with atomic_write(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": c.bos_id, "eos_token_id": c.eos_id}, f, indent=2)
    if vocab is None:
        warn("llama2: warning: no tokenizer given (--tokenizer): the folder has no tokenizer files")
        return
    _write_tokenizer(out, vocab, chat_template, warn)


def _write_tokenizer(out, vocab, chat_template, warn):
    import shutil

    if vocab.model == "gpt2":
        if vocab.source is None:
            warn(f"llama2: warning: {out}: the byte-level vocabulary came without its tokenizer.json; "
                 "no tokenizer files written")
            return
        shutil.copyfile(vocab.source, out / "tokenizer.json")
    else:  # both: transformers reads tokenizer.json without protobuf; sentencepiece reads the .model
        with atomic_write(out / "tokenizer.model") as f:
            f.write(to_sentencepiece(vocab))
        with atomic_write(out / "tokenizer.json", "w") as f:
            json.dump(to_tokenizer_json(vocab), f, ensure_ascii=False)
    spec = {"tokenizer_class": "LlamaTokenizerFast" if vocab.model == "gpt2" else "LlamaTokenizer",
            "bos_token": vocab.pieces[vocab.bos_id], "eos_token": vocab.pieces[vocab.eos_id],
            "add_bos_token": True, "add_eos_token": False, "legacy": True}
    if vocab.model != "gpt2":
        spec["unk_token"] = vocab.pieces[vocab.unk_id]
    if chat_template is not None:
        spec["chat_template"] = templates.resolve(chat_template).source
    with atomic_write(out / "tokenizer_config.json", "w") as f:
        json.dump(spec, f, indent=2)
