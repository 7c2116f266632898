"""GGUF files (llama.cpp): read a Llama model into a Checkpoint by mmap, and write one tensor by tensor.

Format: github.com/ggml-org/ggml docs/gguf.md (version 3). Only the "llama" architecture is supported;
tensors may be of any type in `weights` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K), mixed per tensor as the file says, and are used as stored: views of the memory map. GGUF keeps
Meta's interleaved q/k layout, as llama2.c does, so tensors map one to one. Written from the spec with
numpy only; the `gguf` package is not needed. Writing covers F32, F16, BF16 and llama.cpp's
quantized file types (quantize.MIXES).
"""

import mmap
import struct
from pathlib import Path

import numpy as np

from .. import chat_template as templates, quantize, rope, weights
from ..checkpoint import LAYER_MATRICES, Checkpoint, matrix_kinds, tensor_shapes
from ..config import ModelConfig, RopeScaling
from ..errors import FormatError
from ..fileio import atomic_write, user_file
from .vocab import Vocab

MAGIC = b"GGUF"
ALIGNMENT = 32
F32, F16, Q8_0, BF16 = (weights.module(t).GGML_TYPE for t in ("f32", "f16", "q8_0", "bf16"))  # ggml ids
Q8_BLOCK = weights.q8_0.BLOCK  # values per Q8_0 block: float16 scale + 32 int8
Q8_DTYPE = weights.q8_0.DTYPE  # one block, 34 bytes: float16 scale + 32 int8
TYPE_NAMES = weights.GGML_NAMES
FLOAT_TYPES = {"fp32": F32, "fp16": F16, "bf16": BF16}  # written as is
# general.file_type ("mostly ..."): the float types, then llama.cpp's quantized file types
FILE_TYPES = {"fp32": 0, "fp16": 1, "bf16": 32, **quantize.FILE_TYPES}
WRITE_DTYPES = ("fp32", "fp16", "bf16", *quantize.MIXES)  # what `write` accepts (FILE_TYPES' names)
FILES = "GGUF files"  # in messages
KV_TYPE = "f16"  # the KV cache its models get by default: llama.cpp's

# metadata value types
U8, I8, U16, I16, U32, I32, F32V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALARS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?",
            U64: "<Q", I64: "<q", F64: "<d"}

# our tensor name -> GGUF name ("{}" is the block index)
NAMES = {
    "token_embedding": "token_embd.weight", "rms_final": "output_norm.weight", "wcls": "output.weight",
    "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight", "wv": "blk.{}.attn_v.weight",
    "wo": "blk.{}.attn_output.weight", "rms_att": "blk.{}.attn_norm.weight",
    "w1": "blk.{}.ffn_gate.weight", "w2": "blk.{}.ffn_down.weight", "w3": "blk.{}.ffn_up.weight",
    "rms_ffn": "blk.{}.ffn_norm.weight",
}
BLOCK_ORDER = ("wq", "wk", "wv", "wo", "rms_att", "w1", "w2", "w3", "rms_ffn")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama 3.1's scaling), F32 [hd/2]


_LENGTH = struct.Struct("<Q")  # a string's byte count


class _Reader:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise FormatError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def fits(self, count, least, what):
        """The header's `count` of things of at least `least` bytes each must fit in the rest of
        the file (a 10 GB file of zeros claims nothing; a count of 2^60 would loop for hours)."""
        if count * least > len(self.buf) - self.pos:
            raise FormatError(f"{self.path}: {count} {what} at byte {self.pos} cannot fit in the "
                              f"{len(self.buf) - self.pos} bytes left of the file")

    def string(self):
        return self.strings(1)[0]

    def strings(self, count):
        """`count` strings in a row, in one loop: a Llama 3 vocabulary and its merges are 400k."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), _LENGTH.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise FormatError(f"{self.path}: truncated GGUF header at byte {pos}")
            (n,) = length(buf, pos)
            pos += 8
            if n > end - pos:
                raise FormatError(f"{self.path}: truncated GGUF string at byte {pos}")
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, kind):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            self.fits(count, struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8, "array items")
            if item in _SCALARS:  # read numeric arrays in one go
                dt = np.dtype(_SCALARS[item])
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            if item == STRING:
                return self.strings(count)
            return [self.value(item) for _ in range(count)]
        raise FormatError(f"{self.path}: unknown GGUF metadata type {kind} at byte {self.pos}")


def read(path):
    """Parse a GGUF file: (metadata dict, {name: (ggml type, numpy shape, absolute offset)}, buffer)."""
    path = Path(path)
    with user_file(path, "GGUF file") as f:
        if f.seek(0, 2) < 24:
            raise FormatError(f"{path}: too short to be a GGUF file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(buf, "madvise"):  # the tensors are used in place: have the kernel read ahead
        buf.madvise(mmap.MADV_WILLNEED)
    r = _Reader(buf, path)
    if buf[:4] != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic at byte 0 is {bytes(buf[:4])!r})")
    r.pos = 4
    version = r.unpack("<I")
    if version not in (2, 3):
        raise FormatError(f"{path}: unsupported GGUF version {version} at byte 4 (expected 2 or 3)")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    r.fits(n_kv, 8 + 4 + 1, "metadata entries")  # key length, type, a one-byte value at least
    r.fits(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor infos")  # name length, n_dims, a dimension, type, offset
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.unpack("<I"))
    infos = {}
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
        kind, offset = r.unpack("<I"), r.unpack("<Q")
        infos[name] = (kind, tuple(reversed(dims)), offset)  # GGUF lists the fastest axis first
    align = int(meta.get("general.alignment", ALIGNMENT))
    data = -(-r.pos // align) * align
    for name, (kind, shape, offset) in infos.items():
        infos[name] = (kind, shape, data + offset)
    return meta, infos, buf


def _tensor(buf, path, name, kind, shape, offset):
    """The tensor as stored, a view of the map: a float32 array for F32, else a weights.Matrix
    (2-D) or, for another type's 1-D tensor (a norm), its float32 values."""
    if not weights.supported(int(kind)):
        raise FormatError(f"{path}: tensor {name} has ggml type {kind}; supported: "
                          f"{', '.join(TYPE_NAMES.values())}")
    what = f"{path}: tensor {name}"
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    m = weights.from_buffer(int(kind), buf, offset, (rows, cols), what)
    if kind == F32:
        return m.w if len(shape) == 2 else m.w[0]
    return m if len(shape) == 2 else m.dequantize()[0]


def vocab_from_metadata(meta):
    """The tokenizer a GGUF carries: sentencepiece-style ("llama") or byte-level BPE ("gpt2", with
    its merges and pre-tokenizer name); None when it has none or another kind."""
    model = meta.get("tokenizer.ggml.model")
    if model not in ("llama", "gpt2") or "tokenizer.ggml.tokens" not in meta:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    eos_ids = tuple(int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                    if k in meta)
    extra = {}
    if model == "gpt2":
        extra = dict(merges=list(meta.get("tokenizer.ggml.merges") or []),
                     pre=meta.get("tokenizer.ggml.pre", "default"))
    return Vocab(list(tokens), [float(s) for s in scores], list(types),
                 int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                 int(meta.get("tokenizer.ggml.eos_token_id", 2)),
                 int(meta.get("tokenizer.ggml.unknown_token_id", 0)), model=model, eos_ids=eos_ids, **extra)


class GGUFModel:
    """A Llama GGUF file as a tensor source (export.py): config and vocabulary from its metadata,
    tensors read on demand from the memory map."""

    def __init__(self, path):
        self.path = path
        meta, self.infos, self.buf = read(path)
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported (expected 'llama')")

        def key(name, default=None):
            value = meta.get(f"llama.{name}", default)
            if value is None:
                raise FormatError(f"{path}: GGUF metadata lacks llama.{name}")
            return value

        if "token_embd.weight" not in self.infos:
            raise FormatError(f"{path}: GGUF has no tensor token_embd.weight")
        heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", 0)) or None
        if int(key("attention.value_length", head_dim or 0)) != (head_dim or 0):
            raise FormatError(f"{path}: llama.attention.value_length {meta['llama.attention.value_length']} "
                              f"!= key_length {head_dim} is not supported")
        if head_dim is not None and head_dim * heads == int(key("embedding_length")):
            head_dim = None  # the usual dim / n_heads
        window = meta.get("llama.attention.sliding_window")
        self.config = ModelConfig(
            dim=int(key("embedding_length")), hidden_dim=int(key("feed_forward_length")),
            n_layers=int(key("block_count")), n_heads=heads,
            n_kv_heads=int(key("attention.head_count_kv", heads)),
            vocab_size=self.infos["token_embd.weight"][1][0], seq_len=int(key("context_length")),
            shared_classifier="output.weight" not in self.infos,
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=self._rope_scaling(meta),
            explicit_head_dim=head_dim, sliding_window=None if window is None else int(window),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)))
        self.config.validate(str(path))
        if int(key("rope.dimension_count", self.config.head_dim)) != self.config.head_dim:
            raise FormatError(f"{path}: partial rotary embeddings (llama.rope.dimension_count "
                              f"{meta['llama.rope.dimension_count']} != head size "
                              f"{self.config.head_dim}) are not supported")
        self.shapes = tensor_shapes(self.config)
        self.vocab = vocab_from_metadata(meta)
        self.chat_template = templates.from_model_files(meta.get("tokenizer.chat_template"), str(path))

    def _rope_scaling(self, meta) -> RopeScaling:
        """llama.cpp's keys: rope.scaling.type (none, linear; yarn and others are not supported)
        with rope.scaling.factor (older files: rope.scale_linear), and the rope_freqs tensor, whose
        divisors Llama 3.1-style files carry instead of a type."""
        kind = meta.get("llama.rope.scaling.type", "linear" if "llama.rope.scale_linear" in meta else "none")
        factor = float(meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0)))
        if kind not in ("none", "linear"):
            raise FormatError(f"{self.path}: RoPE scaling {kind!r} (llama.rope.scaling.type) is not supported "
                              "(expected none or linear)")
        if ROPE_FREQS in self.infos:
            if kind != "none":
                raise FormatError(f"{self.path}: has both {ROPE_FREQS} and RoPE scaling {kind!r}")
            kind_id, shape, offset = self.infos[ROPE_FREQS]
            if kind_id != F32 or len(shape) != 1:
                raise FormatError(f"{self.path}: tensor {ROPE_FREQS} must be a float32 vector")
            factors = np.frombuffer(self.buf, "<f4", shape[0], offset)
            return RopeScaling("factors", freq_factors=tuple(float(f) for f in factors))
        if kind == "none" or factor == 1.0:
            return RopeScaling()
        return RopeScaling("linear", factor=factor)

    def kind(self, name, layer=None) -> int:
        gname = NAMES[name].format(layer)
        if gname not in self.infos:
            raise FormatError(f"{self.path}: GGUF is missing tensor {gname}")
        return self.infos[gname][0]

    def raw(self, name, layer=None):
        """The tensor as stored, a view of the map: float32 array (F32) or weights.Matrix."""
        self.kind(name, layer)  # present?
        gname = NAMES[name].format(layer)
        kind, shape, offset = self.infos[gname]
        want = self.shapes[name][1:] if layer is not None else self.shapes[name]
        if tuple(shape) != tuple(want):
            raise FormatError(f"{self.path}: tensor {gname} has shape {list(shape)}, "
                              f"expected {list(want)}")
        return _tensor(self.buf, self.path, gname, kind, shape, offset)

    def tensor(self, name, layer=None) -> np.ndarray:
        return weights.dense(self.raw(name, layer))


def matches(path, head) -> bool:
    return head is not None and head[:4] == MAGIC


def source(path) -> GGUFModel:
    return GGUFModel(path)


def describe(path):
    """(ModelConfig, {matrix name: its weights type's name, a list per layer}) from the header alone:
    the types the file gives each tensor."""
    m = GGUFModel(path)
    return m.config, matrix_kinds(m.config, lambda name, layer: weights.module(m.kind(name, layer)).NAME)


def load(path) -> Checkpoint:
    """A Llama GGUF as a Checkpoint. Every matrix keeps its stored type, as a view of the file (F32
    as float32 arrays, the others as weights.Matrix); per-layer lists, norms stacked."""
    m = GGUFModel(path)
    c = m.config
    w = {}
    for name in m.shapes:
        if name in ("rms_att", "rms_ffn"):
            w[name] = np.stack([m.tensor(name, i) for i in range(c.n_layers)])
        elif name in LAYER_MATRICES:
            w[name] = [m.raw(name, i) for i in range(c.n_layers)]
        else:
            w[name] = m.raw(name) if name != "rms_final" else m.tensor(name)
    kinds = {m.kind(n, i if n in LAYER_MATRICES else None)
             for n in m.shapes if not n.startswith("rms")
             for i in (range(c.n_layers) if n in LAYER_MATRICES else [None])}
    first = m.kind("wq", 0)
    dtype = "mixed" if len(kinds) > 1 else {F32: "fp32", F16: "fp16"}.get(first, TYPE_NAMES[first].lower())
    return Checkpoint(c, w, 1, str(path), Q8_BLOCK if Q8_0 in kinds else 0, dtype=dtype,
                      vocab=m.vocab, chat_template=m.chat_template, format="gguf", kv_type=KV_TYPE)


# --- writing ------------------------------------------------------------------------------------

def _pack_string(s):
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(value):
    """(type, bytes) of a metadata value; ints are written as uint32, floats as float32."""
    if isinstance(value, str):
        return STRING, _pack_string(value)
    if isinstance(value, bool):
        return BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        return U32, struct.pack("<I", value)
    if isinstance(value, float):
        return F32V, struct.pack("<f", value)
    if isinstance(value, tuple):  # (item type, list)
        item, items = value
        head = struct.pack("<IQ", item, len(items))
        if item == STRING:
            return ARRAY, head + b"".join(_pack_string(s) for s in items)
        return ARRAY, head + np.asarray(items, dtype=_SCALARS[item]).tobytes()
    raise TypeError(f"unsupported metadata value {value!r}")


def _encode(arr, kind):  # float32 [rows, cols] -> a contiguous array of ggml type `kind`'s bytes
    arr = np.asarray(arr, np.float32)
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(1, -1)
    return weights.module(kind).quantize(rows)  # for the quantized types llama.cpp's reference rule


def write(path, config: ModelConfig, tensor, vocab: Vocab = None, dtype="fp32", chat_template=None,
          name="llama"):
    """Write a GGUF v3 file asking `tensor(name, layer)` (our names, float32) for one tensor at a
    time. Norms stay F32; matrices are F32, F16, BF16, or for a quantized `dtype` (q8_0, q4_0, q4_1,
    q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m, q5_k_m) the type llama.cpp's rule gives each tensor
    (quantize.tensor_type), quantized as llama.cpp's reference does. A shared classifier is
    token_embd.weight alone, without output.weight (tied, as llama.cpp's convert_hf_to_gguf writes
    Llama 3.2; llama.cpp then gives token_embd the classifier's type)."""
    if dtype not in FILE_TYPES:
        raise FormatError(f"cannot write {path}: GGUF dtype {dtype!r} is not one of "
                          f"{', '.join(FILE_TYPES)}")
    c = config
    if c.rope_scaling.kind == "dynamic":
        raise FormatError(f"cannot write {path}: GGUF has no dynamic RoPE scaling (llama.cpp does not "
                          "run it); run the model from its Hugging Face folder")
    shapes = tensor_shapes(c)
    rope_freqs = rope.divisors(c)  # llama3 scaling: written as llama.cpp's converter does
    order = [("rope_freqs", None)] if rope_freqs is not None else []
    order += [("token_embedding", None), ("rms_final", None)]
    order += [] if c.shared_classifier else [("wcls", None)]
    order += [(n, i) for i in range(c.n_layers) for n in BLOCK_ORDER]
    shapes["rope_freqs"] = (c.head_dim // 2,)

    def type_of(name, layer):  # -> a weight type's name
        if name.startswith("rms"):
            return "f32"
        return quantize.tensor_type(dtype, name, layer, c.n_layers, cols=shapes[name][-1],
                                    has_output=not c.shared_classifier, n_heads=c.n_heads,
                                    n_kv_heads=c.n_kv_heads)

    kinds = {}
    for name, layer in order:
        if dtype in FLOAT_TYPES or name == "rope_freqs":
            kinds[name, layer] = F32 if name.startswith(("rms", "rope")) else FLOAT_TYPES[dtype]
            continue
        kind = type_of(name, layer)
        block, cols = weights.module(kind).BLOCK, shapes[name][-1]
        if cols % block:
            raise FormatError(f"cannot write {path}: GGUF {kind.upper()} needs dim ({c.dim}) and "
                              f"hidden_dim ({c.hidden_dim}) to be multiples of {block}; use "
                              f"--dtype fp16 or fp32")
        kinds[name, layer] = weights.module(kind).GGML_TYPE
    meta = {
        "general.architecture": "llama", "general.name": name,
        "general.file_type": FILE_TYPES[dtype],
        "llama.context_length": c.seq_len, "llama.embedding_length": c.dim,
        "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads, "llama.block_count": c.n_layers,
        "llama.rope.dimension_count": c.head_dim, "llama.rope.freq_base": float(c.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(c.norm_eps),
        "llama.attention.key_length": c.head_dim, "llama.attention.value_length": c.head_dim,
    }
    if c.rope_scaling.kind == "linear":
        meta.update({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": float(c.rope_scaling.factor)})
    if c.sliding_window:  # the key llama.cpp reads for the architectures it runs windowed
        meta["llama.attention.sliding_window"] = c.sliding_window
    if vocab is not None:
        meta.update({
            "tokenizer.ggml.model": vocab.model,
            "tokenizer.ggml.tokens": (STRING, vocab.pieces),
            "tokenizer.ggml.scores": (F32V, vocab.scores),
            "tokenizer.ggml.token_type": (I32, vocab.types),
            "tokenizer.ggml.bos_token_id": vocab.bos_id, "tokenizer.ggml.eos_token_id": vocab.eos_id,
            "tokenizer.ggml.unknown_token_id": vocab.unk_id,
        })
        if vocab.model == "gpt2":
            meta["tokenizer.ggml.pre"] = vocab.pre
            meta["tokenizer.ggml.merges"] = (STRING, vocab.merges)
    if chat_template is not None:  # a built-in name, or the model's own ChatTemplate
        meta["tokenizer.chat_template"] = templates.resolve(chat_template).source

    parts = [MAGIC, struct.pack("<IQQ", 3, len(order), len(meta))]
    for key, value in meta.items():
        kind, raw = _pack_value(value)
        parts += [_pack_string(key), struct.pack("<I", kind), raw]
    offset, sizes = 0, []
    for name, layer in order:
        shape = shapes[name][1:] if layer is not None else shapes[name]
        kind = kinds[name, layer]
        numel = int(np.prod(shape))
        size = weights.stored_bytes(kind, numel // shape[-1], shape[-1])
        dims = list(reversed(shape))
        gname = ROPE_FREQS if name == "rope_freqs" else NAMES[name].format(layer)
        parts += [_pack_string(gname), struct.pack("<I", len(dims)),
                  struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", kind, offset)]
        sizes.append(size)
        offset += -(-size // ALIGNMENT) * ALIGNMENT
    header = b"".join(parts)
    with atomic_write(path) as f:
        f.write(header + b"\0" * (-len(header) % ALIGNMENT))
        for (name, layer), size in zip(order, sizes):
            arr = np.asarray(rope_freqs if name == "rope_freqs" else tensor(name, layer), dtype=np.float32)
            want = shapes[name][1:] if layer is not None else shapes[name]
            if arr.shape != tuple(want):
                raise FormatError(f"cannot write {path}: tensor {name} has shape {arr.shape}, "
                                  f"expected {want}")
            f.write(_encode(arr, kinds[name, layer]))
            f.write(b"\0" * (-size % ALIGNMENT))


def export(path, config: ModelConfig, tensor, vocab: Vocab = None, dtype="fp32", version=None,
           group_size=None, chat_template=None, warn=print):
    """export.py's writer: `write`, then a warning when the file has no vocabulary. `version` and
    `group_size` are llama2.c's (export.py has made version 2 a q8_0 `dtype`)."""
    write(path, config, tensor, vocab, dtype, chat_template)
    if vocab is None:
        warn("llama2: warning: no tokenizer given (--tokenizer): the GGUF has no vocabulary")


def write_tensors(path, meta: dict, tensors: dict):
    """A GGUF v3 file of float32 `tensors` (GGUF name -> array, written F32 in the given order) and
    `meta` (key -> a value as `_pack_value` takes it): what LoRA adapter files hold."""
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for key, value in meta.items():
        kind, raw = _pack_value(value)
        parts += [_pack_string(key), struct.pack("<I", kind), raw]
    offset, blobs = 0, []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, "<f4")
        dims = list(reversed(data.shape))
        parts += [_pack_string(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                  struct.pack("<IQ", F32, offset)]
        blobs.append(data)
        offset += -(-data.nbytes // ALIGNMENT) * ALIGNMENT
    header = b"".join(parts)
    with atomic_write(path) as f:
        f.write(header + b"\0" * (-len(header) % ALIGNMENT))
        for data in blobs:
            f.write(data.tobytes())
            f.write(b"\0" * (-data.nbytes % ALIGNMENT))
