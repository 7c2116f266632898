"""The compiled kernels (native/, built by `pip install .`): matrix products on the weights as the
file stores them, row dequantization and activation quantization, on a thread pool of their own.

    level()                          active instruction-set level: scalar, avx2 or avx512
    select(level)                    switch it in-process, every type (tests cover every level this way)
    cpu(), choose(cpu)               this CPU's id; the variants per weight type (prompts, decode rows)
                                     llama2.kernel_choice's table picks for a CPU (the widest, unless
                                     a narrower one is faster there): a Kernels
    select_for_cpu(cpu)              make choose(cpu) active (what import does)
    kernels(), select_kernels(k)     the active Kernels, and making one active
    describe()                       it in words, e.g. "avx512vnni; avx2 for F16; avx2 decode for Q8_0"
    set_threads(n)                   size of the native pool (llama2.threads.set_threads calls it)
    matmul(wtype, w, x, out)         out [N, rows] = x [N, cols] @ dequantize(w [rows, row_bytes]).T
    interleave(layout, w, out)       w's rows regrouped into a layout of LAYOUTS (at load)
    dequantize_rows(wtype, w, ids, out)   out [R, cols] = dequantize(w[ids]), bit-equal to gguf's
    matmul_int8_rows(q, s, group_size, x, out)   the same for llama2.c int8 (weights.int8_groups)
                                     whose rows hold whole groups of a multiple of 32 values
    quantize_q8_0(x), quantize_q8_k(x)    activation blocks, as matmul makes them
    matmul_int8_flat(q, s, group_size, x, out)   llama2.c int8 in any layout, float activations
    dequantize_int8(q, s, group_size, ids, out)  rows of llama2.c int8, any layout
    rmsnorm(x, w, eps, out)          out [N, D] = run.c's rmsnorm of x [N, D] with weight w [D]
    rope(x, cos, sin, style)         x [N, H, hd] rotated in place (style "interleaved" or "halves")
    silu_mul(a, b)                   a [N, H] = silu(a) * b in place
    WEIGHT_TYPES                     our type name -> WeightType(id, name, block_values,
                                     block_bytes, activations): native/blocks.h's records
    LAYOUTS                          name -> Layout(id, name, base, group): the layouts made at
                                     load (a type's rows interleaved; llama2.weights.interleaved)
    TYPES                            ggml type id -> (name, block_values, block_bytes)
    attention_decode(kvtype, q, k_pool, v_pool, tables, lens, out)   decode attention through
                                     block tables over a paged KV cache (llama2.kvcache)
    attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out[, window])   a pass's attention,
                                     prompts (causal) and decode rows, with decode's bits per row
    kv_types(), kv_row_bytes(kvtype, hd), kv_encode(kvtype, x, out)   the KV types' records
                                     (native/kv.h), as llama2.kvcache reads them
    forward_plan(...), forward(plan, ...)   a whole forward pass in one call (llama2.plan)
    rmsnorm_einsum(x, w, eps, out)   RMSNorm summing squares in numpy's einsum order

`wtype` is a ggml type id; `w` a C-contiguous uint8 [rows, row_bytes] (or, for F32/F16/BF16, its
float32/float16/uint16 view [rows, cols]), usually a view of a memory-mapped file. matmul and
dequantize_rows are the C functions themselves: they check shapes once, release the GIL and
allocate nothing per call. The level is the best the CPU runs, each weight type on the variant
llama2.kernel_choice picks for this CPU model, unless $LLAMA2_ISA names one level for every type; a
level the CPU lacks is a one-line error. native/README.md says how the build and dispatch work.
"""

import os
from typing import NamedTuple

import numpy as np

from . import kernel_choice
from . import threads as _threads
from .errors import UsageError

try:
    from . import _native
except ImportError as e:  # a source checkout that was never built
    raise ImportError(f"llama2's compiled kernels are not built ({e}); run `pip install -e .` "
                      "(or `python setup.py build_ext --inplace`) in the checkout") from e

LEVELS = ("scalar", "avx2", "avx512")
ENV = "LLAMA2_ISA"

# A level's variants, preferred first: avx512 uses the VNNI build where the CPU has AVX512_VNNI.
_LEVEL_VARIANTS = {"scalar": ("scalar",), "avx2": ("avx2",), "avx512": ("avx512vnni", "avx512")}



class WeightType(NamedTuple):
    """One weight type's record (native/blocks.h WEIGHT_TYPES), as the extension reports it."""
    id: int  # ggml type id (GGUF tensor type)
    name: str  # GGUF's name (F32, Q4_K, ...); ours is its lower case, weights/<ours>.py its module
    block_values: int
    block_bytes: int
    activations: str  # how matmul hands it x: None (float32 rows), "q8_0" or "q8_k" blocks


class Layout(NamedTuple):
    """A layout made at load (native/blocks.h WEIGHT_TYPES, group > 1): `base`'s rows interleaved in
    groups of `group` rows, read by kernels of its own with the base type's bits."""
    id: int  # ours, from 64 on: no file stores it
    name: str
    base: str  # the weight type whose blocks it holds, e.g. "q4_k"
    group: int


_ACTIVATIONS = (None, "q8_0", "q8_k")  # native/kernels.h ACT_F32, ACT_Q8_0, ACT_Q8_K
_RECORDS = _native.types()
WEIGHT_TYPES = {name.lower(): WeightType(t, name, values, nbytes, _ACTIVATIONS[act])
                for t, (name, values, nbytes, act, group) in _RECORDS.items() if group == 1}
TYPES = {t.id: (t.name, t.block_values, t.block_bytes) for t in WEIGHT_TYPES.values()}
LAYOUTS = {name.lower(): Layout(t, name.lower(), name.lower().rpartition("_")[0], group)
           for t, (name, values, nbytes, act, group) in _RECORDS.items() if group > 1}

matmul = _native.matmul
dequantize_rows = _native.dequantize_rows
# interleave(layout, w, out): out uint8 [rows, row_bytes] = w (the layout's base type, as stored) in
# layout `layout`'s groups of rows (an id of LAYOUTS; native/blocks.h says where each dword goes);
# rows a multiple of the group. llama2.weights.interleaved calls it at load.
interleave = _native.interleave
# Beyond the contract: llama2.c version-2 Q8 read in place, q int8 [rows, cols] and s float32
# [rows * cols / group_size] (a scale per group of the flattened matrix; whole groups per row and
# group_size a multiple of 32, else ValueError): out = x @ (q * s per group).T, with x quantized
# to Q8_0 blocks as for GGUF Q8_0.
matmul_int8_rows = _native.matmul_int8_rows
# One new query per sequence over its cached rows, read through its block table in the cache's
# type (kvtype: llama2.kvcache.<type>.ID): q float32 [B, H, hd]; k_pool, v_pool uint8 [blocks,
# kv_heads, block_tokens, row_bytes] (one layer); tables int32 [B, max_blocks]; lens int64 [B]
# (rows attended, the query's own included) -> out float32 [B, H * hd]. Scores, softmax and the sum
# of values in float32; each (sequence, head) is one call's own arithmetic whatever the batch or
# thread count. Block ids are checked against the pool (IndexError).
attention_decode = _native.attention_decode
# A pass's attention, prompt rows and decode rows alike: segments of consecutive rows of one
# sequence each, segment s holding counts[s] rows at positions starts[s]... (keys and values already
# cached); q float32 [N, H, hd] and out float32 [N, H * hd] hold the segments' rows one after the
# other; tables int32 [S, max_blocks]; starts, counts int64 [S]. Row p attends rows 0..p (with
# window W > 0: rows p-W+1..p; the blocks before are not read, so a cache may free them), each
# (row, head) with exactly attention_decode's arithmetic (a prompt row gets the bits a decode row at
# its position gets), whatever the thread count or the other segments.
attention = _native.attention
# Version-2 Q8 in any layout (a group of any size, rows may start or end inside one; the tail group
# may be short), for what matmul_int8_rows refuses: q int8 [rows, cols], s float32
# [ceil(rows * cols / group_size)]. matmul_int8_flat: out [N, rows] = x [N, cols] @ W.T with x as floats,
# each row summed segment by segment (a segment is the part of the row in one group: s[g] * the
# segment's dot, the dot in eight fixed lanes), the same bits at every level and thread count.
# dequantize_int8: out [R, cols] = W[ids] as float32, bit-equal to weights.int8_groups.dequantize.
matmul_int8_flat = _native.matmul_int8_flat
dequantize_int8 = _native.dequantize_int8

# The KV cache types, one record each in native/kv.h (llama2.kvcache builds its registry from them).
# kv_types() -> ((name, needs), ...) in id order: needs says what head_dim must be ("" for any).
# kv_row_bytes(kvtype, hd) -> bytes of one cached row of hd values, -1 when the type cannot hold it.
# kv_encode(kvtype, x float32 [..., hd], out uint8 [..., row_bytes]): each row in the type's
#   encoding, exactly as the decode step writes it into the cache.
kv_types = _native.kv_types
kv_row_bytes = _native.kv_row_bytes
kv_encode = _native.kv_encode

# The elementwise operations of a forward pass (native/ops_elementwise.c), float32 C-contiguous,
# the same bits at every level. Each returns its output array.
# rmsnorm(x [N, D], w [D], eps, out [N, D]) -> out (may be x): w * (x * (1 / sqrt(ss / D + eps)))
#   with ss = x[0]*x[0] + x[1]*x[1] + ... summed in that order in float32, as run.c does.
# rope(x [N, H, hd], cos [N, hd/2], sin [N, hd/2], style) -> x, in place: pair i of each head is
#   (2i, 2i+1) for style "interleaved" (llama2.c), (i, i + hd/2) for "halves" (Hugging Face),
#   x0' = x0*c - x1*s, x1' = x0*s + x1*c, products rounded (bit-equal to tests/forward_reference.py's rope).
# silu_mul(a [N, H], b [N, H]) -> a, in place: a / (1 + expf(-a)) * b with libm's expf.
rmsnorm = _native.rmsnorm
rope = _native.rope
silu_mul = _native.silu_mul

# The forward pass in one call (native/layer.c; llama2.plan builds the plan and documents it).
# forward_plan((n_heads, n_kv_heads, hidden_dim, vocab_size, eps, halves[, window, dim]), layers,
#   rms_final, classifier, cos, sin[, adapters]) -> plan (window > 0: each row attends its last `window`
#   positions; dim: the model's width, when its heads are not dim / n_heads wide): layers a
#   sequence of (rms_att, rms_ffn, wq, wk, wv, wo, w1, w2, w3), each matrix a spec from
#   Matrix.native_product(): ("type", ggml type, w), ("int8_rows", q, s, group_size) or
#   ("int8_flat", q, s, group_size); norms float32 [dim]; cos, sin
#   float32 [seq_len, head_dim / 2]. Every shape is checked here (ValueError, one line); the plan
#   holds the arrays' buffers for its life. An optional 7th argument: LoRA adapters, a list (one per
#   adapter) of (layer, matrix index in wq wk wv wo w1 w2 w3 order, A float32 [rank, in], B float32
#   [out, rank], scale) pairs, applied unmerged (y += scale * B (A x)) to the rows that pick them.
# forward(plan, x, k_pool, v_pool, kvtype, tables, starts, counts, logits[, adapter]): x float32 [N, dim] the
#   rows' embeddings (overwritten); k_pool, v_pool uint8 [n_layers, blocks, kv_heads, block_tokens,
#   row_bytes] of KV type kvtype; S segments: tables int32 [S, max_blocks], starts, counts int64 [S]
#   (segment s: counts[s] rows of one sequence at positions starts[s]..., their keys and values
#   written there; each row attends its sequence's rows up to its own, the plan's window of them);
#   logits float32 [N, vocab] (every row's) or [S, vocab] (each segment's last row's) out. Block
#   ids and positions are checked (IndexError, ValueError), those out of the window not at all
#   (a cache may have freed them). An optional 10th argument: None, or int32 [N], each row's
#   adapter in the plan (-1: none).
# rmsnorm_einsum(x [N, D], w [D], eps, out [N, D]) -> out: the RMSNorm of the forward pass (native/layer.c), with the sum
#   of squares in numpy's einsum order on x86-64 (four float lanes over sixteen values a step,
#   products rounded before their adds, lanes combined (l0 + l1) + (l2 + l3)).
forward_plan = _native.forward_plan
forward = _native.forward
rmsnorm_einsum = _native.rmsnorm_einsum


def variants() -> tuple:
    """The compiled variants this CPU runs, best first (of avx512vnni, avx512, avx2, scalar)."""
    return tuple(name for name, runs in _native.variants() if runs)


def supported() -> tuple:
    """The levels this CPU runs, in LEVELS order."""
    have = set(variants())
    return tuple(lv for lv in LEVELS if any(v in have for v in _LEVEL_VARIANTS[lv]))


def resolve(level: str, available: tuple, label: str = None) -> str:
    """`level` checked against the levels `available`; raises UsageError (one line starting with
    `label`, by default "LLAMA2_ISA=<level>") otherwise."""
    label = label or f"{ENV}={level}"
    if level not in LEVELS:
        raise UsageError(f"{label}: expected one of {', '.join(LEVELS)}")
    if level not in available:
        raise UsageError(f"{label}: this CPU cannot run the {level} kernels "
                         f"(it runs: {', '.join(available)})")
    return level


def select(level: str, label: str = None) -> str:
    """Make `level` the active level of this process, for every weight type; returns it."""
    resolve(level, supported(), label or f"native.select({level!r})")
    have = variants()
    _native.select_variant(next(v for v in _LEVEL_VARIANTS[level] if v in have))
    return level


def select_variant(name: str) -> str:
    """Make one compiled variant active for every type (tests use it for avx512 without VNNI)."""
    _native.select_variant(name)
    return name


class Cpu(NamedTuple):
    vendor: str  # CPUID's vendor string: AuthenticAMD, GenuineIntel; "" off x86
    family: int  # display family and model, as /proc/cpuinfo shows them
    model: int


def cpu() -> Cpu:
    return Cpu(*_native.cpu_id())


class Kernels(NamedTuple):
    """Which compiled variant runs what (native/kernels.h by_type, decode_by_type)."""
    base: str  # everything not below: attention, norms, activation quantization, ...
    types: dict  # GGUF type name -> the variant of its prompts (3+ rows) and dequantization
    decode: dict  # GGUF type name -> the variant of its decode rows (1 or 2)


def _variant_of(level: str, have: tuple) -> str:
    return next(v for v in _LEVEL_VARIANTS[level] if v in have)


def choose(cpu_id: Cpu) -> Kernels:
    """The kernels for a CPU of that id with this CPU's features: the best variant, unless
    kernel_choice's table names a level for a type (or for its decode rows) there."""
    have, levels = variants(), supported()
    both, decode = kernel_choice.levels_for(*cpu_id)
    types = {t.name: _variant_of(both[t.name], have) if both.get(t.name) in levels else have[0]
             for t in WEIGHT_TYPES.values()}
    return Kernels(have[0], types, {name: _variant_of(decode[name], have) if decode.get(name) in levels else v
                                    for name, v in types.items()})


def select_kernels(k: Kernels) -> Kernels:
    """Make k active. A type's decode rows may run on another variant than its prompts only where
    both give it the same bits (a quantized type on two SIMD variants: level.h), so a row's bits do
    not depend on its pass; otherwise ValueError."""
    k = Kernels(*k)
    have = variants()
    for v in (k.base, *k.types.values(), *k.decode.values()):
        if v not in have:
            raise ValueError(f"variant {v!r}: this CPU runs {', '.join(have)}")
    for name, v in k.decode.items():
        p = k.types.get(name, k.base)
        if v != p and (WEIGHT_TYPES[name.lower()].activations is None or "scalar" in (v, p)):
            raise ValueError(f"{name}: decode on {v} and prompts on {p} would give a row other bits in a "
                             "prompt than in decode (only the quantized types' SIMD variants agree)")
    _native.select_variant(k.base, _ids(k.types), _ids(k.decode))
    return k


def _ids(by_name: dict) -> dict:
    """Type name -> variant, as type id -> variant, each layout (LAYOUTS) on its base type's."""
    ids = {WEIGHT_TYPES[t.lower()].id: v for t, v in by_name.items()}
    ids.update({lay.id: ids[WEIGHT_TYPES[lay.base].id] for lay in LAYOUTS.values()
                if WEIGHT_TYPES[lay.base].id in ids})
    return ids


def select_for_cpu(cpu_id: Cpu) -> Kernels:
    """Make choose(cpu_id) active; returns it."""
    return select_kernels(choose(cpu_id))


def kernels() -> Kernels:
    """The active choice."""
    by_type = {TYPES[t][0]: pair for t, pair in _native.type_variants().items() if t in TYPES}  # layouts follow
    return Kernels(_native.variant(), {t: p for t, (p, _) in by_type.items()},
                   {t: d for t, (_, d) in by_type.items()})


def describe() -> str:
    """The active choice in words: the base variant, then the types that run on another
    ("avx512vnni; avx2 for F16; avx2 decode for Q8_0")."""
    k = kernels()
    other = {}
    for t in sorted(k.types):
        p, d = k.types[t], k.decode[t]
        if p == d != k.base:
            other.setdefault(f"{p} for", []).append(t)
        else:
            if p != k.base:
                other.setdefault(f"{p} prompts for", []).append(t)
            if d != k.base:
                other.setdefault(f"{d} decode for", []).append(t)
    return "; ".join([k.base] + [f"{what} {', '.join(ts)}" for what, ts in other.items()])


def variant() -> str:
    return _native.variant()


def level() -> str:
    """The active level (the base's: kernels() says which types run on another)."""
    v = _native.variant()
    return next(lv for lv, vs in _LEVEL_VARIANTS.items() if v in vs)


def set_threads(n: int) -> int:
    """Size the native pool to `n` threads (the caller included)."""
    return _native.set_threads(max(1, int(n)))


def _quantize(k_quants: bool, x: np.ndarray, block: int, block_bytes: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % block:
        raise ValueError(f"x must be float32 [N, cols] with cols a multiple of {block}, got {x.shape}")
    out = np.empty((x.shape[0], x.shape[1] // block * block_bytes), np.uint8)
    _native.quantize(k_quants, x, out)
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """x f32 [N, cols] -> uint8 [N, cols/32*34] of block_q8_0 {f16 d; int8 qs[32]}:
    d = max|x| / 127 per block, q = rint(x * (1 / d)) (half to even, all in float32) clamped to
    +-127, d stored as fp16 (native/act.c)."""
    return _quantize(False, x, 32, 34)


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """x f32 [N, cols] -> uint8 [N, cols/256*292] of block_q8_K {f32 d; int8 qs[256]; int16 bsums[16]},
    the same rule as quantize_q8_0 with d kept as f32 and bsums the sums of 16 consecutive q."""
    return _quantize(True, x, 256, 292)


def _init():
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        select(forced, f"{ENV}={forced}")
    else:
        select_for_cpu(cpu())
    set_threads(_threads.threads())


_init()
