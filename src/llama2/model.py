"""The Llama 2 transformer forward pass in numpy float32, over an explicit KV cache.

Weights come from a `Checkpoint` (any source the loader reads) and are used in place: float32 views
of the memory-mapped file, or int8 with group scales. A pass of up to SMALL_BATCH rows runs on
compiled kernels, one call per layer, that read each weight once for all rows; a longer prompt runs
as one [T, dim] block through BLAS (batched prefill). Float weights make one exception: a prompt
always runs on numpy and BLAS, so a cold process computes its first token without numba, whose
import and start take about 0.4 s; the kernels load with the first decode step. (int8 has no numpy
product that avoids dequantizing every weight, so int8 prompts of up to SMALL_BATCH rows stay
compiled.) Which path a pass takes depends only on its shape and the weights' type, never on what
has loaded, so results are reproducible. Reference: llama2.c run.c `forward`.
"""


from dataclasses import dataclass, field

import numpy as np

from . import kernels as K
from .checkpoint import LAYER_MATRICES, Checkpoint, QuantizedTensor, quantize_q80
from .config import Q8_GROUP_SIZE, ModelConfig
from .errors import Llama2Error


def _jit():
    """The compiled kernels, imported on first use: numba takes about 0.4 s to import and start."""
    from . import jit

    return jit


NO_SCALES = np.zeros(0, np.float32)  # the scales argument of a float32 matrix in the compiled kernels


@dataclass
class KVCache:
    """All mutable inference state: keys and values of every layer for `slots` sequences, and the
    number of positions each slot holds. Created up front with the model's dimensions."""
    k: np.ndarray  # [n_layers, slots, n_kv_heads, seq_len, head_dim] float32
    v: np.ndarray  # [n_layers, slots, n_kv_heads, seq_len, head_dim] float32
    pos: np.ndarray = field(default=None)  # [slots] int: positions filled per slot

    @classmethod
    def create(cls, config: ModelConfig, slots: int = 1, seq_len: int = None) -> "KVCache":
        shape = (config.n_layers, slots, config.n_kv_heads, seq_len or config.seq_len, config.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(slots, np.int64))

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    def reset(self, slot: int = 0):
        self.pos[slot] = 0


# Up to this many decode rows a pass runs on our compiled kernels, one call per layer (weights read
# once for all rows, no BLAS or Python overhead); more rows, or any prompt, go to BLAS gemm (int8
# weights dequantized for it).
SMALL_BATCH = 8

# Above SMALL_BATCH rows, an int8 matrix is dequantized into a scratch tile of at most this many
# float32 values (16 MiB: a whole matrix of the small models) and BLAS writes each tile's columns of
# the product in place. The tile is dequantized on the calling thread: right after a product BLAS's
# workers still spin on the other cores, and a parallel dequantization fighting them made a 2-thread
# 128-token int8 prompt 1.5x slower (stories15M: 4,000 against 6,000 tok/s).
DEQUANT_TILE = 1 << 22


class Dense:
    """A float32 weight matrix, used in place (a view of the memory-mapped file where possible)."""

    def __init__(self, w):
        self.w = w  # [out, in] float32
        self.shape = w.shape
        self.kernel_args = (w, NO_SCALES, 0)  # (w, s, gs) as the compiled kernels take a matrix

    def __call__(self, x):  # [N, in] -> [N, out] (BLAS)
        return x @ self.w.T

    def small(self, x):  # [N <= SMALL_BATCH, in] -> [N, out] (compiled)
        return _small_product(self, x)

    def rows(self, ids):  # [R] -> [R, in]
        return np.asarray(self.w[ids], dtype=np.float32)


class Q8:
    """An int8 weight matrix with Q8_0 group scales over the flattened matrix (QuantizedTensor)."""

    def __init__(self, qt: QuantizedTensor):
        self.q, self.s, self.gs = qt.q, qt.s, qt.group_size
        self.shape = qt.q.shape
        self.kernel_args = (self.q, self.s, self.gs)

    def __call__(self, x):  # [N, in] -> [N, out]: compiled up to SMALL_BATCH rows, else tiles + BLAS
        if len(x) <= SMALL_BATCH:  # int8 has no numpy product that avoids dequantizing every weight
            return self.small(x)
        m, n = self.shape
        step = max(4, DEQUANT_TILE // n)
        tile = np.empty((min(step, m), n), np.float32)
        out = np.empty((len(x), m), np.float32)
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            self._dequantize(np.arange(r0, r1), tile)
            np.matmul(x, tile[:r1 - r0].T, out=out[:, r0:r1])  # BLAS writes the column block in place
        return out

    def small(self, x):  # [N <= SMALL_BATCH, in] -> [N, out] (compiled, int8 in place)
        return _small_product(self, x)

    def rows(self, ids):  # [R] -> [R, in]
        out = np.empty((len(ids), self.shape[1]), np.float32)
        self._dequantize(np.asarray(ids, np.int64), out)
        return out

    def _dequantize(self, rows, out):  # [R] -> out[:R] float32
        _jit().dequantize_rows(0, self.q, self.s, self.gs, rows, out)


def _small_product(matrix, x):  # Dense or Q8, [N, in] -> [N, out] on the compiled kernel
    out = np.empty((len(x), matrix.shape[0]), np.float32)
    _jit().matmul(matrix.shape[0] * matrix.shape[1] * len(x), x, *matrix.kernel_args, out)
    return out


def _last_rows(x, spans, all_logits):  # [N, D] -> each segment's last row, unless all are wanted
    return x if all_logits else x[[r + T - 1 for _, _, r, T in spans]]


def _matrix(w, quantize_group: int):
    if isinstance(w, QuantizedTensor):
        return Q8(w)
    if quantize_group:
        return Q8(quantize_q80(w, quantize_group))
    return Dense(w)


@dataclass
class Layer:
    rms_att: np.ndarray  # [D]
    wq: object  # [D, D]  (Dense or Q8)
    wk: object  # [KV, D]
    wv: object  # [KV, D]
    wo: object  # [D, D]
    rms_ffn: np.ndarray  # [D]
    w1: object  # [H, D]
    w2: object  # [D, H]
    w3: object  # [H, D]

    def qkv(self, h):  # [N, D] -> q [N, D], k [N, KV], v [N, KV]
        return self.wq(h), self.wk(h), self.wv(h)

    def ffn(self, h):  # [N, D] -> [N, D]: w2(silu(w1 h) * w3 h)
        return self.w2(K.silu_mul(self.w1(h), self.w3(h)))

    def matrices(self) -> list:  # in LAYER_MATRICES order, as `jit.layer` takes them
        return [getattr(self, name) for name in LAYER_MATRICES]

    def kernel_args(self):
        """This layer's weights as `jit.layer` takes them, or None when its matrices are not all of
        one kind (float32, or int8 with one group size)."""
        mats = self.matrices()
        if len({(type(m), m.kernel_args[2]) for m in mats}) != 1:
            return None
        pairs = [a for m in mats for a in m.kernel_args[:2]]
        return (self.rms_att, self.rms_ffn, *pairs, mats[0].kernel_args[2])

    def size(self) -> int:  # multiply-adds per row
        return sum(m.shape[0] * m.shape[1] for m in self.matrices())


class Transformer:
    """Prepared weights plus `forward`. Stateless between calls: the KVCache holds the state.

    `quantize="q8_0"` turns float weights into int8 at load (groups of `group_size`); int8 (version 2)
    files always run on the int8 kernels. Float weights are used in place, without copies.
    """

    def __init__(self, ckpt: Checkpoint, quantize: str = None, group_size: int = Q8_GROUP_SIZE):
        c = self.config = ckpt.config
        if quantize not in (None, "q8_0"):
            raise Llama2Error(f"--quantize {quantize!r}: expected q8_0")
        gs = group_size if quantize else 0
        w = ckpt.weights
        self.layers = [
            Layer(rms_att=w["rms_att"][l], rms_ffn=w["rms_ffn"][l],
                  **{name: _matrix(w[name][l], gs) for name in LAYER_MATRICES})
            for l in range(c.n_layers)
        ]
        self.embedding = _matrix(w["token_embedding"], gs)  # [V, D]
        self.rms_final = w["rms_final"]  # [D]
        self.classifier = self.embedding if c.shared_classifier else _matrix(w["wcls"], gs)  # [V, D]
        self.cos, self.sin = K.rope_tables(c.head_dim, c.seq_len, c.rope_theta)
        self.layer_args = [layer.kernel_args() for layer in self.layers]  # for jit.layer
        self.layer_size = [layer.size() for layer in self.layers]
        self.compiled_layers = all(a is not None for a in self.layer_args)
        self.quantized = all(isinstance(layer.wq, Q8) for layer in self.layers)

    def new_cache(self, slots: int = 1) -> KVCache:
        return KVCache.create(self.config, slots)

    def forward(self, tokens, cache: KVCache, slot: int = 0, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` [T] of one sequence from its cached position on; returns logits [T, V]
        (or [1, V] for the last position only, the default) and advances the slot's position."""
        return self.forward_batch([(slot, tokens)], cache, all_logits)

    def forward_batch(self, segments, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """One pass for several sequences: `segments` is a list of (slot, tokens); each segment's
        tokens continue its slot's sequence. All rows share the matrix products; attention runs per
        segment over its own cache. Returns logits [len(segments), V] of each segment's last token,
        or [total tokens, V] with `all_logits`. A segment's result does not depend on the others."""
        c = self.config
        D, KV, hd = c.dim, c.kv_dim, c.head_dim
        spans, rows, start_row = [], [], 0
        if len({slot for slot, _ in segments}) != len(segments):
            raise ValueError("a slot may appear only once in a batch")
        for slot, tokens in segments:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
            T, start = len(tokens), int(cache.pos[slot])
            if T == 0:
                raise ValueError("forward needs at least one token per sequence")
            if start + T > cache.seq_len:
                raise Llama2Error(f"context is full: {start + T} positions exceed seq_len {cache.seq_len}")
            if tokens.min() < 0 or tokens.max() >= c.vocab_size:
                raise Llama2Error(f"token id out of range for a vocabulary of {c.vocab_size}")
            spans.append((slot, start, start_row, T))
            rows.append(tokens)
            start_row += T
        tokens = np.concatenate(rows)
        N = len(tokens)
        positions = np.concatenate([np.arange(st, st + T) for _, st, _, T in spans])
        cos, sin = self.cos[positions], self.sin[positions]  # [N, hd/2]
        x = self.embedding.rows(tokens)  # [N, D]
        prefill = [span for span in spans if span[3] > 1]
        if N <= SMALL_BATCH and self.compiled_layers and (self.quantized or not prefill):
            # one compiled call per layer (a float prompt stays on numpy: see the module's docstring)
            jit = _jit()
            slots = np.concatenate([np.full(T, slot, np.int64) for slot, _, _, T in spans])
            for l, layer in enumerate(self.layers):
                jit.layer(N * self.layer_size[l], x, *self.layer_args[l], cache.k[l], cache.v[l], slots,
                          positions, cos, sin, c.norm_eps, c.n_heads)
            h = jit.rmsnorm(_last_rows(x, spans, all_logits), self.rms_final, c.norm_eps)
            return self._advance(spans, cache, self.classifier.small(h))
        decode = [i for i, (_, _, _, T) in enumerate(spans) if T == 1]
        dec_rows = np.array([spans[i][2] for i in decode], np.int64)
        dec_slots = np.array([spans[i][0] for i in decode], np.int64)
        dec_pos = np.array([spans[i][1] for i in decode], np.int64)
        work = 2 * c.dim * int(dec_pos.sum() + len(decode))  # attention multiply-adds of decode rows
        att = np.empty((N, D), np.float32)
        for l, layer in enumerate(self.layers):
            h = K.rmsnorm(x, layer.rms_att, c.norm_eps)
            q, k, v = layer.qkv(h)
            q = K.rope(q.reshape(N, c.n_heads, hd), cos, sin)
            k = K.rope(k.reshape(N, c.n_kv_heads, hd), cos, sin)
            v = v.reshape(N, c.n_kv_heads, hd)
            kc, vc = cache.k[l], cache.v[l]  # [slots, KVH, seq_len, hd]
            for slot, st, r, T in spans:
                kc[slot, :, st:st + T] = k[r:r + T].transpose(1, 0, 2)
                vc[slot, :, st:st + T] = v[r:r + T].transpose(1, 0, 2)
            for slot, st, r, T in prefill:
                att[r:r + T] = K.attention(q[r:r + T], kc[slot, :, :st + T], vc[slot, :, :st + T], st)
            if decode:  # many decode rows, or decode rows riding along with a prompt
                out = np.empty((len(decode), D), np.float32)
                _jit().attention_decode(work, np.ascontiguousarray(q[dec_rows]), kc, vc, dec_slots,
                                        dec_pos, out)
                att[dec_rows] = out
            x = x + layer.wo(att)
            h = K.rmsnorm(x, layer.rms_ffn, c.norm_eps)
            x = x + layer.ffn(h)
        h = K.rmsnorm(_last_rows(x, spans, all_logits), self.rms_final, c.norm_eps)
        return self._advance(spans, cache, self.classifier(h))

    @staticmethod
    def _advance(spans, cache, logits):
        for slot, st, _, T in spans:
            cache.pos[slot] = st + T
        return logits

    def warm_up(self):
        """Load the compiled kernels now (about 0.4 s in a fresh process, more on the very first run,
        which compiles them) with one decode step on a scratch cache, instead of on the first real
        decode step. A server calls this before it takes requests."""
        self.forward([0], KVCache.create(self.config, 1, seq_len=1))
