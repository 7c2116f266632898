"""llama2.c checkpoint files: read by mmap (versions 0-3) and written tensor by tensor (atomically).

Layouts 0-2 follow karpathy/llama2.c run.c (version 0), export.py legacy_export / version1_export /
version2_export exactly; version 3 is our extended header (docs/format.md). Tensors are stacked per
layer; int8 (Q8_0) tensors are kept quantized.
"""

import mmap
import struct
from pathlib import Path

import numpy as np

from ..checkpoint import (LAYER_MATRICES, MATRICES, NORMS, STACKED, Checkpoint, CheckpointSource,
                          tensor_shapes)
from ..config import ModelConfig
from ..errors import FormatError
from ..fileio import atomic_write, read_user_file, user_file
from ..weights import ALIASES, bf16, f16, int8_groups, dense as _dense
from ..weights.bf16 import f32_to_bf16

MAGIC = 0x616B3432  # "ak42" as little-endian uint32
HEADER_BYTES = 256  # versions 1 and 2
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, 7 params, shared_classifier
V2_HEADER = struct.Struct("<Ii7iBi")  # ... plus group_size at byte 37
# Version 3 is our extension (docs/format.md): v1's first 37 bytes, then dtype, chat template,
# group_size, BOS/EOS ids, rope_theta and norm_eps. llama2.c's readers reject it, as they should.
EXT_VERSION = 3
EXT_HEADER = struct.Struct("<Ii7iBBBxiii4xdd")
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2, "q8_0": 3}  # dtype byte (offset 37) of version 3
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "q8_0": 1}
CHAT_TEMPLATES = (None, "llama2", "chatml")  # chat template byte (offset 38) of version 3
VERSIONS = (0, 1, 2, EXT_VERSION)  # what `write_stream` writes: 0-2 llama2.c's, 3 ours
WRITE_DTYPES = tuple(DTYPES)  # what a version-3 file stores (export's --dtype)
FILES = "llama2.c files"  # in messages
KV_TYPE = "f32"  # the KV cache its models get by default: run.c's, so `llama2 run` prints run.c's bytes

# Q8_0 of llama2.c's version 2 (and our version 3's q8_0): int8 values with one float32 scale per
# group of the flattened tensor. The type lives in weights.int8_groups; these names are kept for callers.
QuantizedTensor = int8_groups.Matrix
quantize_q80 = int8_groups.quantize
n_groups = int8_groups.n_groups


class _Cursor:
    """Walks a read-only buffer handing out numpy views, tracking the byte offset for errors."""

    def __init__(self, buf, offset, path):
        self.buf, self.offset, self.path = buf, offset, path

    def take(self, dtype, shape):
        count = int(np.prod(shape))
        nbytes = count * np.dtype(dtype).itemsize
        if self.offset + nbytes > len(self.buf):
            raise FormatError(f"{self.path}: file is truncated: needs {nbytes} bytes at offset "
                              f"{self.offset}, has {len(self.buf) - self.offset}")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += nbytes
        return arr

    def skip(self, nbytes):
        self.offset += nbytes


def _expected_size(c: ModelConfig, version: int, group_size: int, dtype: str = "fp32") -> int:
    shapes = tensor_shapes(c)
    if version == 0:
        floats = sum(int(np.prod(s)) for s in shapes.values()) + c.seq_len * c.head_dim
        return V0_HEADER.size + 4 * floats
    size = HEADER_BYTES
    for name, shape in shapes.items():
        if name.startswith("rms"):
            size += 4 * int(np.prod(shape))
            continue
        per = shape[1:] if name in LAYER_MATRICES else shape
        count = shape[0] if name in LAYER_MATRICES else 1
        numel = int(np.prod(per))
        scales = 4 * n_groups(numel, group_size) if dtype == "q8_0" else 0
        size += count * (numel * DTYPE_BYTES[dtype] + scales)
    return size


def file_dtype(buf, version) -> str:
    """How a file stores its matrices: fp32 (versions 0, 1), q8_0 (version 2), or byte 37 of v3."""
    if version == EXT_VERSION:
        return {v: k for k, v in DTYPES.items()}[buf[37]]
    return "q8_0" if version == 2 else "fp32"


def read_header(path, buf) -> tuple:
    """Parse the header: (ModelConfig, version, group_size, data offset)."""
    if len(buf) < V0_HEADER.size:
        raise FormatError(f"{path}: file is too short ({len(buf)} bytes) to be a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic == MAGIC:
        if len(buf) < HEADER_BYTES:
            raise FormatError(f"{path}: file is truncated inside its 256-byte header")
        version = struct.unpack_from("<i", buf, 4)[0]
        if version == 1:
            _, _, *params, shared = V1_HEADER.unpack_from(buf, 0)
            group_size, extra = 0, {}
        elif version == 2:
            _, _, *params, shared, group_size = V2_HEADER.unpack_from(buf, 0)
            extra = {}
            if group_size <= 0:
                raise FormatError(f"{path}: group_size at byte 37 must be positive, got {group_size}")
        elif version == EXT_VERSION:
            (_, _, *params, shared, dtype_code, template_code, group_size, bos, eos, theta,
             eps) = EXT_HEADER.unpack_from(buf, 0)
            if dtype_code not in DTYPES.values():
                raise FormatError(f"{path}: unknown dtype {dtype_code} at byte 37 (expected 0-3)")
            if template_code >= len(CHAT_TEMPLATES):
                raise FormatError(f"{path}: unknown chat template {template_code} at byte 38")
            if (dtype_code == DTYPES["q8_0"]) != (group_size > 0):
                raise FormatError(f"{path}: group_size at byte 40 is {group_size}, which does not "
                                  f"fit dtype {dtype_code}")
            extra = dict(rope_theta=theta, norm_eps=eps, bos_id=bos, eos_id=eos)
        else:
            raise FormatError(f"{path}: unsupported checkpoint version {version} at byte 4 "
                              "(expected 1, 2 or 3)")
        if shared not in (0, 1):
            raise FormatError(f"{path}: shared_classifier byte at offset 36 must be 0 or 1, got {shared}")
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = params
        offset = HEADER_BYTES
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = V0_HEADER.unpack_from(buf, 0)
        version, group_size, offset = 0, 0, V0_HEADER.size
        extra = {}
        # Legacy convention: a negative vocab_size means the classifier is stored separately.
        shared = vocab > 0
        vocab = abs(vocab)
        if dim <= 0 or dim > 1 << 20 or layers <= 0 or layers > 4096:
            raise FormatError(f"{path}: not a llama2.c checkpoint (unknown magic 0x{magic:08x} "
                              "and no plausible version-0 header)")
    config = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                         n_kv_heads=kv_heads, vocab_size=vocab, seq_len=seq_len,
                         shared_classifier=bool(shared), **extra)
    config.validate(str(path))
    return config, version, group_size, offset


def _map(path):
    path = Path(path)
    with user_file(path, "checkpoint file") as f:
        if f.seek(0, 2) == 0:
            raise FormatError(f"{path}: file is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise"):  # start reading the file in now; the first forward needs all of it
        mm.madvise(mmap.MADV_WILLNEED)
    return mm


def matches(path, head) -> bool:
    """Any file: version 0 has no magic, and `load` names what is wrong with one that is not ours."""
    return head is not None


def source(path) -> CheckpointSource:
    return CheckpointSource(load(path))


def describe(path):
    """(ModelConfig, {matrix name: how it is stored}) from the header alone: f32, f16, bf16, or
    "int8_groups:GROUP" for int8 with a float32 scale per GROUP values (as weights.stored_type takes it)."""
    head = read_user_file(path, "checkpoint file", HEADER_BYTES, exact=False)
    config, version, group_size, _ = read_header(path, head)
    dtype = file_dtype(head, version)
    how = f"int8_groups:{group_size}" if dtype == "q8_0" else ALIASES.get(dtype, dtype)
    return config, {name: how for name in tensor_shapes(config) if not name.startswith("rms")}


def load(path) -> Checkpoint:
    """Memory-map a checkpoint (llama2.c version 0, 1 or 2, or our version 3) and validate its length.

    Every tensor is a view of the map, in its stored type: fp32 as float32 arrays, fp16/bf16
    (version 3) and int8 (version 2, version 3 q8_0) as weights.Matrix per layer.
    """
    buf = _map(path)
    config, version, group_size, offset = read_header(path, buf)
    dtype = file_dtype(buf, version)
    expected = _expected_size(config, version, group_size, dtype)
    if len(buf) != expected:
        raise FormatError(f"{path}: file is {len(buf)} bytes but its version-{version} header implies "
                          f"{expected} bytes ({'truncated' if len(buf) < expected else 'trailing data'})")
    cur = _Cursor(buf, offset, path)
    shapes = tensor_shapes(config)
    w = {}
    if version == 0:
        for name in V0_ORDER:
            w[name] = cur.take(np.float32, shapes[name])
        cur.skip(4 * config.seq_len * config.head_dim)  # legacy freq_cis_real and freq_cis_imag
        if not config.shared_classifier:
            w["wcls"] = cur.take(np.float32, shapes["wcls"])
        return Checkpoint(config, w, version, str(path), group_size, kv_type=KV_TYPE)
    for name in NORMS:
        w[name] = cur.take(np.float32, shapes[name])

    def qt(shape):
        numel = int(np.prod(shape))
        q = cur.take(np.int8, shape)
        s = cur.take(np.float32, (n_groups(numel, group_size),))
        return QuantizedTensor(q, s, group_size)

    def matrix(shape):
        if dtype == "fp16":
            return f16.Matrix(cur.take("<f2", shape))
        if dtype == "bf16":
            return bf16.Matrix(cur.take("<u2", shape))
        if dtype == "q8_0":
            return qt(shape)
        return cur.take(np.float32, shape)

    for name in (*MATRICES, *([] if config.shared_classifier else ["wcls"])):
        if name in LAYER_MATRICES and dtype != "fp32":
            w[name] = [matrix(shapes[name][1:]) for _ in range(config.n_layers)]
        else:
            w[name] = matrix(shapes[name])
    template = CHAT_TEMPLATES[buf[38]] if version == EXT_VERSION else None
    return Checkpoint(config, w, version, str(path), group_size, dtype=dtype, chat_template=template,
                      kv_type=KV_TYPE)


def _rope_tables(c: ModelConfig):
    """The freq_cis_real/imag tables that legacy (version 0) files carry: [seq_len, head_dim/2] each."""
    hs = c.head_dim
    # float32 throughout, as llama2.c's model.py precompute_freqs_cis computes them
    exponent = np.arange(0, hs, 2, dtype=np.float32)[: hs // 2] / np.float32(hs)
    freqs = np.float32(1.0) / (np.float32(c.rope_theta) ** exponent)
    angles = np.outer(np.arange(c.seq_len, dtype=np.float32), freqs)
    return np.cos(angles), np.sin(angles)


def _f32(a) -> np.ndarray:
    """A little-endian float32 C-contiguous array: file.write() takes its buffer without a copy."""
    return np.ascontiguousarray(a, dtype="<f4")


# The order tensors follow on disk, per layout. Stacked names are written layer by layer.
V0_ORDER = ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
            "rms_final")


def _header_bytes(c: ModelConfig, version: int, group_size: int, dtype: str, chat_template) -> bytes:
    params = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
    if version == 1:
        header = V1_HEADER.pack(MAGIC, 1, *params, int(c.shared_classifier))
    elif version == 2:
        header = V2_HEADER.pack(MAGIC, 2, *params, int(c.shared_classifier), group_size)
    else:
        header = EXT_HEADER.pack(MAGIC, EXT_VERSION, *params, int(c.shared_classifier), DTYPES[dtype],
                                 CHAT_TEMPLATES.index(chat_template), group_size, c.bos_id, c.eos_id,
                                 c.rope_theta, c.norm_eps)
    return header + b"\0" * (HEADER_BYTES - len(header))


def write_stream(path, config: ModelConfig, tensor, version: int = 1, group_size: int = 64,
                 dtype: str = "fp32", chat_template=None):
    """Write a checkpoint atomically, asking `tensor(name, layer)` for one layer at a time.

    `tensor(name, layer)` returns a float32 array of tensor_shapes(config)[name] without the layer
    axis (layer is None for unstacked tensors). Only one layer is held at once, so peak memory is one
    tensor plus its encoded bytes. `version` 0, 1 and 2 are exactly llama2.c's layouts; version 3 is
    our extended header (docs/format.md) with `dtype` fp32, fp16, bf16 or q8_0.
    """
    if version not in (0, 1, 2, EXT_VERSION):
        raise FormatError(f"cannot write {path}: unknown version {version} (expected 0, 1, 2 or 3)")
    if version == 2:
        dtype = "q8_0"
    elif version in (0, 1) and dtype != "fp32":
        raise FormatError(f"cannot write {path}: version {version} stores fp32 only, not {dtype} "
                          "(use version 3 for fp16/bf16)")
    if dtype not in DTYPES:
        raise FormatError(f"cannot write {path}: unknown dtype {dtype!r} (expected one of "
                          f"{', '.join(DTYPES)})")
    if chat_template not in CHAT_TEMPLATES:
        raise FormatError(f"cannot write {path}: unknown chat template {chat_template!r}")
    if dtype == "q8_0" and group_size <= 0:
        raise FormatError(f"cannot write {path}: group size must be positive, got {group_size}")
    if dtype != "q8_0":
        group_size = 0  # only Q8_0 has groups; the header says 0 otherwise
    config.validate("config")
    c = config
    shapes = tensor_shapes(c)

    def layers(name):
        return range(c.n_layers) if name in STACKED else [None]

    def get(name, layer):
        arr = np.asarray(tensor(name, layer))
        want = shapes[name][1:] if layer is not None else shapes[name]
        if arr.shape != want:
            where = f"{name}" if layer is None else f"{name} of layer {layer}"
            raise FormatError(f"cannot write {path}: tensor {where} has shape {arr.shape}, "
                              f"expected {want}")
        return arr

    def encode(arr):  # one matrix in the file's dtype, as buffers to write
        if dtype == "fp32":
            return [_f32(arr)]
        if dtype == "fp16":
            return [np.ascontiguousarray(arr, dtype="<f2")]
        if dtype == "bf16":
            return [f32_to_bf16(arr)]
        qt = quantize_q80(arr, group_size)
        return [np.ascontiguousarray(qt.q, dtype=np.int8), _f32(qt.s)]

    with atomic_write(path) as f:
        if version == 0:
            vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
            f.write(V0_HEADER.pack(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab,
                                   c.seq_len))
            for name in V0_ORDER:
                for layer in layers(name):
                    f.write(_f32(get(name, layer)))
            for table in _rope_tables(c):
                f.write(_f32(table))
            if not c.shared_classifier:
                f.write(_f32(get("wcls", None)))
            return
        f.write(_header_bytes(c, version, group_size, dtype, chat_template))
        for name in NORMS:  # norms stay float32 in every layout
            for layer in layers(name):
                f.write(_f32(get(name, layer)))
        for name in (*MATRICES, *([] if c.shared_classifier else ["wcls"])):
            for layer in layers(name):
                for chunk in encode(get(name, layer)):
                    f.write(chunk)


def write(path, config: ModelConfig, weights: dict, version: int = 1, group_size: int = 64,
          dtype: str = "fp32", chat_template=None):
    """Write a checkpoint from in-memory tensors: `weights` maps the names of tensor_shapes() to
    float32 arrays (stacked per layer), per-layer lists of arrays, or weights.Matrix (lists)."""

    def tensor(name, layer):
        if name not in weights:
            raise FormatError(f"cannot write {path}: missing tensor {name}")
        value = weights[name]
        if layer is not None:
            value = value[layer]
        return _dense(value)

    write_stream(path, config, tensor, version, group_size, dtype, chat_template)


_DEFAULTS = ModelConfig(1, 1, 1, 1, 1, 1, 1)  # what llama2.c's readers assume of the fields below


def lost_fields(config: ModelConfig) -> list:
    """Settings a version 0/1/2 header cannot carry that differ from what its readers assume."""
    return [f"{name}={getattr(config, name)}" for name in ("rope_theta", "norm_eps", "bos_id", "eos_id")
            if getattr(config, name) != getattr(_DEFAULTS, name)]


def export(path, config: ModelConfig, tensor, vocab=None, dtype="fp32", version=EXT_VERSION,
           group_size=64, chat_template=None, warn=print):
    """export.py's writer: llama2.c's layouts (versions 0 and 1 fp32, 2 Q8_0 in groups of
    `group_size`) or ours (3: any of WRITE_DTYPES, with the chat template and the fields the others
    lose, which they warn of). `vocab` is not stored: a llama2.c tokenizer is a file of its own."""
    if version in (0, 1) and dtype != "fp32":
        raise FormatError(f"--version {version} stores fp32 only; use --version 3 for {dtype}")
    if version != EXT_VERSION and lost_fields(config):
        warn(f"llama2: warning: llama2.c's version-{version} header cannot record "
             f"{', '.join(lost_fields(config))}; readers will assume the defaults (use --version 3)")
    if dtype == "q8_0" and group_size <= 0:
        raise FormatError(f"--group-size must be positive, got {group_size}")
    if chat_template is not None and not isinstance(chat_template, str):  # a model's Jinja template:
        if chat_template.name is None and version == EXT_VERSION:
            warn(f"llama2: warning: a version-3 header records only the llama2 or chatml chat template; "
                 f"{chat_template.origin}'s is left out (use --format gguf to keep it)")
        chat_template = chat_template.name  # the header records the built-in one it spells, if any
    write_stream(path, config, tensor, version, group_size if dtype == "q8_0" else 0, dtype,
                 chat_template if version == EXT_VERSION else None)
