"""Weight types: one module per way a matrix can be stored, each with its block layout (one numpy
dtype), its numpy dequantization (the reference, bit-equal to the `gguf` package's) and its Matrix,
which multiplies and looks up rows through the native kernels, reading the stored bytes in place.

The model asks this package for a Matrix per tensor (`matrix`) and never looks at the type.
Loaders build matrices with `from_buffer` (a view of the memory-mapped file) or a module's Matrix.
Type ids are ggml's (GGUF tensor types); names are ours (`f32` ... `q6_k`, and `q8_v2` for
llama2.c's version-2 int8 layout).
"""

import numpy as np

from ..errors import Llama2Error
from . import bf16, f16, f32, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0, q8_v2
from .base import Matrix

MODULES = (f32, f16, bf16, q8_0, q8_v2, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)
BY_GGML_TYPE = {m.GGML_TYPE: m for m in MODULES if m.GGML_TYPE is not None}
BY_NAME = {m.NAME: m for m in MODULES}
ALIASES = {"fp32": "f32", "fp16": "f16"}  # llama2.c version-3 dtype names (its "q8_0" is q8_v2)
GGML_NAMES = {m.GGML_TYPE: m.NAME.upper() for m in BY_GGML_TYPE.values()}

# --quantize at load: q8_0 means our version-2 int8 layout (groups of `group_size`), which the numba
# fused decode layer reads; other names go to llama2.quantize (see `quantize`).
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


def quantizer(name, group_size=None):
    """The function float32 [out, in] -> Matrix that `--quantize NAME` applies at load to every
    matrix stored as floats; Llama2Error at once for a name nobody quantizes to.

    q8_0 here is our version-2 layout with `group_size` (default config.Q8_GROUP_SIZE), which the
    numba fused decode layer reads. Any other name is handed to the quantizers' package:
    `llama2.quantize.quantize(name, array)` must return (ggml type id, uint8 [out, row_bytes] in
    that type's block layout), and `llama2.quantize.NAMES` lists the names it takes.
    """
    if name == "q8_0":
        from ..config import Q8_GROUP_SIZE
        return lambda array: q8_v2.quantize(array, group_size or Q8_GROUP_SIZE)
    try:
        from .. import quantize as quantizers
        names = tuple(quantizers.NAMES)
    except (ImportError, AttributeError):
        quantizers, names = None, ()
    if name not in names:
        raise Llama2Error(f"--quantize {name!r}: expected one of {', '.join((*LOAD_QUANTIZE, *names))}")

    def run(array):
        kind, data = quantizers.quantize(name, np.ascontiguousarray(array, dtype=np.float32))
        m = module(kind).Matrix
        return m(np.ascontiguousarray(data).view(m.DTYPE).reshape(array.shape[0], -1))

    return run


def quantize(name, array, group_size=None) -> Matrix:
    """One float32 matrix [out, in] quantized to type `name` (see `quantizer`)."""
    return quantizer(name, group_size)(array)


__all__ = ["Matrix", "MODULES", "module", "from_buffer", "matrix", "dense", "quantizer", "quantize",
           "supported"]
