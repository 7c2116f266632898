"""Weight types: one module per way a matrix can be stored, each with its block layout (one numpy
dtype), its numpy dequantization (the reference, bit-equal to the `gguf` package's), its
quantization (llama.cpp's reference rule, its bytes) and its Matrix, which multiplies and looks up
rows through the native kernels, reading the stored bytes in place.

The model asks this package for a Matrix per tensor (`matrix`) and never looks at the type.
Loaders build matrices with `from_buffer` (a view of the memory-mapped file) or a module's Matrix.
Type ids are ggml's (GGUF tensor types); names are ours (`f32` ... `q6_k`, and `int8_groups` for
llama2.c's version-2 int8 layout). The ggml types are the extension's list (native/blocks.h
WEIGHT_TYPES): each has its module here, weights/<name>.py, found by its name.
"""

from importlib import import_module

import numpy as np

from .. import native
from ..config import Q8_GROUP_SIZE
from ..errors import Llama2Error, UsageError
from ..quantize import mix
from . import int8_groups
from .base import Matrix

MODULES = (*(import_module(f".{name}", __name__) for name in native.WEIGHT_TYPES), int8_groups)
BY_GGML_TYPE = {m.GGML_TYPE: m for m in MODULES if m.GGML_TYPE is not None}
BY_NAME = {m.NAME: m for m in MODULES}
ALIASES = {"fp32": "f32", "fp16": "f16"}  # llama2.c version-3 dtype names (its "q8_0" is int8_groups)
GGML_NAMES = {m.GGML_TYPE: m.NAME.upper() for m in BY_GGML_TYPE.values()}

# --quantize at load: q8_0 means our version-2 int8 layout (float32 scale per group of `group_size`
# values, config.Q8_GROUP_SIZE: native integer products, like GGUF Q8_0's 8.5 bits per weight but any shape);
# the others are llama.cpp's file types, each tensor getting the type llama.cpp's quantizer gives it.
LOAD_QUANTIZE = ("q8_0",)


def module(kind):
    """The module of a ggml type id or a type name; KeyError for one we do not have."""
    if isinstance(kind, (int, np.integer)):
        return BY_GGML_TYPE[int(kind)]
    return BY_NAME[ALIASES.get(kind, kind)]


def supported(kind) -> bool:
    try:
        module(kind)
        return True
    except KeyError:
        return False


def stored_type(kind) -> tuple:
    """How a matrix is stored, as a format's `describe` names it (a type name or ggml id, or
    "int8_groups:GROUP") -> (its Matrix class, that class's parameters: (GROUP,) for int8_groups, else ())."""
    if isinstance(kind, str) and ":" in kind:
        name, _, param = kind.partition(":")
        return module(name).Matrix, (int(param),)
    return module(kind).Matrix, ()


def stored_bytes(kind, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] matrix stored as `kind` (see `stored_type`): what it costs loaded."""
    cls, params = stored_type(kind)
    return cls.stored_bytes(rows, cols, *params)


def encode(kind, w) -> Matrix:
    """float32 w [rows, cols] stored as ggml weight type `kind` (a name or id) by its module's rule
    (for the quantized types llama.cpp's reference, its bytes). ValueError for rows that are not
    whole blocks of the type, or a kind that is not a ggml type."""
    if not supported(kind):
        raise ValueError(f"unknown weight type {kind!r} (expected one of {', '.join(native.WEIGHT_TYPES)})")
    m = module(kind)
    if m.GGML_TYPE is None:
        raise ValueError(f"{m.NAME} is not a ggml type (quantize it with weights.{m.NAME}.quantize)")
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"{m.NAME}: expected a matrix [rows, cols], got shape {w.shape}")
    if w.shape[1] % m.BLOCK:
        raise ValueError(f"{m.NAME} needs rows of a multiple of {m.BLOCK} values, got {w.shape[1]}")
    return m.Matrix(m.quantize(w))


def from_buffer(kind, buf, offset, shape, what="tensor") -> Matrix:
    """A matrix [out, in] of ggml type or name `kind` stored at byte `offset` of `buf`: a view."""
    return module(kind).Matrix.from_buffer(buf, offset, tuple(shape), what)


def matrix(value) -> Matrix:
    """A Matrix for what a Checkpoint holds: a float32 array (f32, used in place) or a Matrix."""
    if isinstance(value, Matrix):
        return value
    return f32.Matrix(np.asarray(value, dtype=np.float32))


def dense(value) -> np.ndarray:
    """float32 of a tensor as a Checkpoint holds it (array, Matrix, or a list of those per layer)."""
    if isinstance(value, list):
        return np.stack([dense(v) for v in value])
    if isinstance(value, Matrix):
        return value.dequantize()
    return np.asarray(value, dtype=np.float32)


def quantizer(name, group_size=None, config=None):
    """The function `--quantize NAME` applies at load to every matrix stored as floats:
    fn(array float32 [out, in], tensor=None, layer=None) -> Matrix, where `tensor` is the tensor's
    name (ours, e.g. "wv", or GGUF's) and `layer` its block. Llama2Error at once for a name nobody
    quantizes to; UsageError (one line) for a tensor whose rows the chosen type cannot hold.

    q8_0 is our version-2 layout with `group_size` (default config.Q8_GROUP_SIZE). Every other name
    is a file type of llama2.quantize (QUANTIZE_TYPES: q4_0 ... q6_k, q4_k_m, q5_k_m): each tensor
    gets `quantize.tensor_type`'s answer for its name and layer (a mix's attn_v / ffn_down get Q6_K
    in llama.cpp's layers, the classifier Q6_K, k-quants on rows that do not fill their blocks fall
    back as llama.cpp's do), so a float file quantized at load holds exactly the tensors, types and
    bytes of llama.cpp's file of that type. `config` (a ModelConfig) gives the layer and head counts
    and whether the classifier is the embedding.
    """
    if name == "q8_0":
        return lambda array, tensor=None, layer=None: int8_groups.quantize(array, group_size or Q8_GROUP_SIZE)
    if name not in mix.QUANTIZE_TYPES:
        names = (*LOAD_QUANTIZE, *(n for n in mix.QUANTIZE_TYPES if n not in LOAD_QUANTIZE))
        raise Llama2Error(f"--quantize {name!r}: expected one of {', '.join(names)}")
    c = config

    def run(array, tensor=None, layer=None):
        rows, cols = np.shape(array)
        kind = quantized_kind(name, tensor, layer, cols, c)
        block = module(kind).BLOCK
        if cols % block:
            where = mix.base_name(tensor) if tensor else "a matrix"
            where = f"blk.{layer}.{where}" if layer is not None else where
            raise UsageError(f"--quantize {name}: {where} [{rows}, {cols}] has rows of {cols} values, "
                             f"not a multiple of {kind}'s block of {block}; q8_0 and the k-quant "
                             f"types take any shape")
        return encode(kind, array)

    return run


def quantized_kind(name, tensor, layer, cols: int, config=None, group_size=None) -> str:
    """What `--quantize name` turns float matrix `tensor` (of block `layer`, rows of `cols` values)
    into, as `stored_type` takes it: "int8_groups:GROUP" for q8_0, else `quantize.tensor_type`'s answer
    (`quantizer` applies it; memory.py's estimate asks it before loading)."""
    if name == "q8_0":
        return f"int8_groups:{group_size or Q8_GROUP_SIZE}"
    c = config
    return mix.tensor_type(name, tensor or "matrix", layer, c.n_layers if c else None, cols=cols,
                       has_output=not (c and c.shared_classifier), n_heads=c.n_heads if c else None,
                       n_kv_heads=c.n_kv_heads if c else None)


def quantize(name, array, group_size=None, tensor=None, layer=None, config=None) -> Matrix:
    """One float32 matrix [out, in] quantized as `--quantize name` would (see `quantizer`)."""
    return quantizer(name, group_size, config)(array, tensor, layer)


__all__ = ["Matrix", "MODULES", "module", "from_buffer", "matrix", "dense", "encode", "quantizer", "quantize",
           "quantized_kind", "stored_bytes", "stored_type", "supported"]
