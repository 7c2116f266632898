"""llama2.c checkpoint files: read by mmap (versions 0, 1 and 2) and write (atomically).

Layouts follow karpathy/llama2.c run.c (version 0), export.py legacy_export / version1_export /
version2_export. Tensors are stacked per layer; int8 (Q8_0) tensors are kept quantized.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import FormatError
from .fileio import atomic_write

MAGIC = 0x616B3432  # "ak42" as little-endian uint32
HEADER_BYTES = 256  # versions 1 and 2
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, 7 params, shared_classifier
V2_HEADER = struct.Struct("<Ii7iBi")  # ... plus group_size at byte 37

# Tensor names in a checkpoint, with shapes in terms of the config; "L" stacked layers.
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tensor_shapes(c: ModelConfig) -> dict:
    """name -> shape (per layer for stacked tensors: the leading n_layers axis is included)."""
    L, D, H, KV, V = c.n_layers, c.dim, c.hidden_dim, c.kv_dim, c.vocab_size
    shapes = {
        "token_embedding": (V, D),
        "rms_att": (L, D),
        "wq": (L, D, D),
        "wk": (L, KV, D),
        "wv": (L, KV, D),
        "wo": (L, D, D),
        "rms_ffn": (L, D),
        "w1": (L, H, D),
        "w2": (L, D, H),
        "w3": (L, H, D),
        "rms_final": (D,),
    }
    if not c.shared_classifier:
        shapes["wcls"] = (V, D)
    return shapes


@dataclass
class QuantizedTensor:
    """Q8_0: int8 values with one float32 scale per group of `group_size` consecutive values of the
    flattened tensor (a row may straddle two groups; the last group may be short)."""
    q: np.ndarray  # int8 [out, in]
    s: np.ndarray  # float32 [ceil(out*in / group_size)]
    group_size: int

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self) -> np.ndarray:  # -> float32 [out, in]
        flat = self.q.reshape(-1).astype(np.float32)
        scales = np.repeat(self.s, self.group_size)[: flat.size]
        return (flat * scales).reshape(self.q.shape)


def n_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def quantize_q80(w: np.ndarray, group_size: int) -> QuantizedTensor:
    """Symmetric int8 quantization over groups of the flattened tensor, tail group included."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    ng = n_groups(flat.size, group_size)
    padded = np.zeros(ng * group_size, np.float32)
    padded[: flat.size] = flat
    groups = padded.reshape(ng, group_size)
    scale = (np.abs(groups).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.round(groups / safe[:, None]).astype(np.int8)
    return QuantizedTensor(q.reshape(-1)[: flat.size].reshape(w.shape), scale, group_size)


@dataclass
class Checkpoint:
    """A loaded model file: its config, tensors (numpy views of the mmap where possible), version."""
    config: ModelConfig
    weights: dict  # name -> float32 array (stacked) or list of QuantizedTensor per layer
    version: int
    path: str
    group_size: int = 0  # Q8_0 group size for version 2, else 0

    @property
    def quantized(self) -> bool:
        return self.version == 2

    def dense(self, name) -> np.ndarray:
        """A tensor as float32 (dequantized if stored as int8)."""
        w = self.weights[name]
        if isinstance(w, QuantizedTensor):
            return w.dequantize()
        if isinstance(w, list):
            return np.stack([t.dequantize() for t in w])
        return w

    @property
    def classifier(self):
        return self.weights["token_embedding"] if self.config.shared_classifier else self.weights["wcls"]


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


def _expected_size(c: ModelConfig, version: int, group_size: int) -> int:
    shapes = tensor_shapes(c)
    if version == 0:
        floats = sum(int(np.prod(s)) for s in shapes.values()) + c.seq_len * c.head_dim
        return V0_HEADER.size + 4 * floats
    if version == 1:
        return HEADER_BYTES + 4 * sum(int(np.prod(s)) for s in shapes.values())
    size = HEADER_BYTES
    for name, shape in shapes.items():
        if name.startswith("rms"):
            size += 4 * int(np.prod(shape))
        else:
            per = shape[1:] if name in LAYER_MATRICES else shape
            count = shape[0] if name in LAYER_MATRICES else 1
            numel = int(np.prod(per))
            size += count * (numel + 4 * n_groups(numel, group_size))
    return size


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
            group_size = 0
        elif version == 2:
            _, _, *params, shared, group_size = V2_HEADER.unpack_from(buf, 0)
            if group_size <= 0:
                raise FormatError(f"{path}: group_size at byte 37 must be positive, got {group_size}")
        else:
            raise FormatError(f"{path}: unsupported checkpoint version {version} at byte 4 "
                              "(expected 1 or 2)")
        if shared not in (0, 1):
            raise FormatError(f"{path}: shared_classifier byte at offset 36 must be 0 or 1, got {shared}")
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = params
        offset = HEADER_BYTES
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = V0_HEADER.unpack_from(buf, 0)
        version, group_size, offset = 0, 0, V0_HEADER.size
        # Legacy convention: a negative vocab_size means the classifier is stored separately.
        shared = vocab > 0
        vocab = abs(vocab)
        if dim <= 0 or dim > 1 << 20 or layers <= 0 or layers > 4096:
            raise FormatError(f"{path}: not a llama2.c checkpoint (unknown magic 0x{magic:08x} "
                              "and no plausible version-0 header)")
    config = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                         n_kv_heads=kv_heads, vocab_size=vocab, seq_len=seq_len,
                         shared_classifier=bool(shared))
    config.validate(str(path))
    return config, version, group_size, offset


def _map(path):
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise FormatError(f"{path}: file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a checkpoint file") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None


def load(path) -> Checkpoint:
    """Memory-map a llama2.c checkpoint (version 0, 1 or 2) and validate its length."""
    buf = _map(path)
    config, version, group_size, offset = read_header(path, buf)
    expected = _expected_size(config, version, group_size)
    if len(buf) != expected:
        raise FormatError(f"{path}: file is {len(buf)} bytes but its version-{version} header implies "
                          f"{expected} bytes ({'truncated' if len(buf) < expected else 'trailing data'})")
    cur = _Cursor(buf, offset, path)
    shapes = tensor_shapes(config)
    w = {}
    if version == 0:
        for name in ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                     "rms_final"):
            w[name] = cur.take(np.float32, shapes[name])
        cur.skip(4 * config.seq_len * config.head_dim)  # legacy freq_cis_real and freq_cis_imag
        if not config.shared_classifier:
            w["wcls"] = cur.take(np.float32, shapes["wcls"])
    elif version == 1:
        for name in ("rms_att", "rms_ffn", "rms_final", "token_embedding", *LAYER_MATRICES):
            w[name] = cur.take(np.float32, shapes[name])
        if not config.shared_classifier:
            w["wcls"] = cur.take(np.float32, shapes["wcls"])
    else:
        for name in ("rms_att", "rms_ffn", "rms_final"):
            w[name] = cur.take(np.float32, shapes[name])

        def qt(shape):
            numel = int(np.prod(shape))
            q = cur.take(np.int8, shape)
            s = cur.take(np.float32, (n_groups(numel, group_size),))
            return QuantizedTensor(q, s, group_size)

        w["token_embedding"] = qt(shapes["token_embedding"])
        for name in LAYER_MATRICES:
            w[name] = [qt(shapes[name][1:]) for _ in range(config.n_layers)]
        if not config.shared_classifier:
            w["wcls"] = qt(shapes["wcls"])
    return Checkpoint(config, w, version, str(path), group_size)


def _rope_tables(c: ModelConfig):
    """The freq_cis_real/imag tables that legacy (version 0) files carry: [seq_len, head_dim/2] each."""
    hs = c.head_dim
    # float32 throughout, as llama2.c's model.py precompute_freqs_cis computes them
    exponent = np.arange(0, hs, 2, dtype=np.float32)[: hs // 2] / np.float32(hs)
    freqs = np.float32(1.0) / (np.float32(c.rope_theta) ** exponent)
    angles = np.outer(np.arange(c.seq_len, dtype=np.float32), freqs)
    return np.cos(angles), np.sin(angles)


def _f32(a) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def write(path, config: ModelConfig, weights: dict, version: int = 1, group_size: int = 64):
    """Write a llama2.c checkpoint of `version` 0, 1 or 2 (Q8_0, `group_size`) atomically.

    `weights` maps the names of tensor_shapes() to float32 arrays of those shapes (stacked per layer)
    or to per-layer lists of arrays. Files are exactly what llama2.c's readers expect.
    """
    config.validate("config")
    shapes = tensor_shapes(config)

    def get(name):
        if name not in weights:
            raise FormatError(f"cannot write {path}: missing tensor {name}")
        value = weights[name]
        arr = np.stack([np.asarray(x) for x in value]) if isinstance(value, list) else np.asarray(value)
        if arr.shape != shapes[name]:
            raise FormatError(f"cannot write {path}: tensor {name} has shape {arr.shape}, "
                              f"expected {shapes[name]}")
        return arr

    if version not in (0, 1, 2):
        raise FormatError(f"cannot write {path}: unknown version {version} (expected 0, 1 or 2)")
    if version == 2 and group_size <= 0:
        raise FormatError(f"cannot write {path}: group size must be positive, got {group_size}")
    c = config
    params = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads)
    with atomic_write(path) as f:
        if version == 0:
            vocab = c.vocab_size if c.shared_classifier else -c.vocab_size
            f.write(V0_HEADER.pack(*params, vocab, c.seq_len))
            for name in ("token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2",
                         "w3", "rms_final"):
                f.write(_f32(get(name)))
            for table in _rope_tables(c):
                f.write(_f32(table))
            if not c.shared_classifier:
                f.write(_f32(get("wcls")))
            return
        if version == 1:
            header = V1_HEADER.pack(MAGIC, 1, *params, c.vocab_size, c.seq_len, int(c.shared_classifier))
        else:
            header = V2_HEADER.pack(MAGIC, 2, *params, c.vocab_size, c.seq_len,
                                    int(c.shared_classifier), group_size)
        f.write(header + b"\0" * (HEADER_BYTES - len(header)))
        for name in ("rms_att", "rms_ffn", "rms_final"):
            f.write(_f32(get(name)))
        names = ["token_embedding", *LAYER_MATRICES] + ([] if c.shared_classifier else ["wcls"])
        for name in names:
            arr = get(name)
            if version == 1:
                f.write(_f32(arr))
                continue
            for layer in (arr if name in LAYER_MATRICES else [arr]):
                qt = quantize_q80(layer, group_size)
                f.write(qt.q.astype(np.int8).tobytes())
                f.write(_f32(qt.s))
