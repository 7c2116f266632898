"""The Llama 2 transformer forward pass in numpy float32, over an explicit KV cache.

Weights come from a `Checkpoint` (any source the loader reads) and are used as stored: each matrix is
a `weights.Matrix` of its type (float32, float16, bfloat16, int8 blocks, 4-6-bit k-quants...) over a
view of the memory-mapped file; this module never looks at the type. A pass of up to SMALL_BATCH rows
runs on compiled kernels, one call per layer, when the numba fused layer can read every matrix of it
(float32 and llama2.c's int8 layout: `Matrix.jit_args`); every other pass runs per matrix, each
Matrix choosing its own product (native kernels or dequantized tiles through BLAS), with attention on
numpy/BLAS for prompts. Float32 weights make one exception: a prompt always runs on numpy and BLAS,
so a cold process computes its first token without numba, whose import and start take about 0.4 s;
the kernels load with the first decode step. (int8 has no numpy product that avoids dequantizing
every weight, so int8 prompts of up to SMALL_BATCH rows stay compiled: `Matrix.jit_prompts`.) Which
path a pass takes depends only on its shape and the weights' types, never on what has loaded, so
results are reproducible. Reference: llama2.c run.c `forward`.
"""


from dataclasses import dataclass, field

import numpy as np

from . import kernels as K, weights
from .checkpoint import LAYER_MATRICES, Checkpoint
from .config import Q8_GROUP_SIZE, ModelConfig
from .errors import Llama2Error


def _jit():
    """The compiled kernels, imported on first use: numba takes about 0.4 s to import and start."""
    from . import jit

    return jit


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


# Up to this many rows a pass runs on the numba fused layer, one call per layer (weights read once
# for all rows, no BLAS or Python overhead), when every matrix allows it (see the module's docstring).
SMALL_BATCH = 8


def _last_rows(x, spans, all_logits):  # [N, D] -> each segment's last row, unless all are wanted
    return x if all_logits else x[[r + T - 1 for _, _, r, T in spans]]


@dataclass
class Layer:
    rms_att: np.ndarray  # [D]
    wq: weights.Matrix  # [D, D]
    wk: weights.Matrix  # [KV, D]
    wv: weights.Matrix  # [KV, D]
    wo: weights.Matrix  # [D, D]
    rms_ffn: np.ndarray  # [D]
    w1: weights.Matrix  # [H, D]
    w2: weights.Matrix  # [D, H]
    w3: weights.Matrix  # [H, D]

    def qkv(self, h):  # [N, D] -> q [N, D], k [N, KV], v [N, KV]
        return self.wq(h), self.wk(h), self.wv(h)

    def ffn(self, h):  # [N, D] -> [N, D]: w2(silu(w1 h) * w3 h)
        return self.w2(K.silu_mul(self.w1(h), self.w3(h)))

    def matrices(self) -> list:  # in LAYER_MATRICES order, as `jit.layer` takes them
        return [getattr(self, name) for name in LAYER_MATRICES]

    def jit_args(self):
        """This layer's weights as `jit.layer` takes them, or None when the fused layer cannot read
        all seven matrices alike (one storage dtype and group size)."""
        args = [m.jit_args for m in self.matrices()]
        if any(a is None for a in args) or len({(a[0].dtype, a[2]) for a in args}) != 1:
            return None
        return (self.rms_att, self.rms_ffn, *[x for a in args for x in a[:2]], args[0][2])

    def size(self) -> int:  # multiply-adds per row
        return sum(m.shape[0] * m.shape[1] for m in self.matrices())


class Transformer:
    """Prepared weights plus `forward`. Stateless between calls: the KVCache holds the state.

    Matrices run in the type their file stores them in, without copies. `quantize` (q8_0: int8 in
    groups of `group_size`, our version-2 layout; q4_0 ... q6_k, q4_k_m, q5_k_m: llama.cpp's type per
    tensor, see `weights.quantizer`) turns matrices stored as floats into that type at load; matrices
    stored quantized stay as they are.
    """

    def __init__(self, ckpt: Checkpoint, quantize: str = None, group_size: int = Q8_GROUP_SIZE):
        c = self.config = ckpt.config
        to_type = weights.quantizer(quantize, group_size, c) if quantize else None

        def matrix(value, name, layer=None):  # the tensor's name and layer pick its type in a mix
            m = weights.matrix(value)
            return to_type(m.dequantize(), name, layer) if to_type and m.STORES_FLOATS else m

        w = ckpt.weights
        self.layers = [
            Layer(rms_att=w["rms_att"][l], rms_ffn=w["rms_ffn"][l],
                  **{name: matrix(w[name][l], name, l) for name in LAYER_MATRICES})
            for l in range(c.n_layers)
        ]
        self.embedding = matrix(w["token_embedding"], "token_embedding")  # [V, D]
        self.rms_final = w["rms_final"]  # [D]
        self.classifier = self.embedding if c.shared_classifier else matrix(w["wcls"], "wcls")  # [V, D]
        self.cos, self.sin = K.rope_tables(c.head_dim, c.seq_len, c.rope_theta)
        self.layer_args = [layer.jit_args() for layer in self.layers]  # for jit.layer
        self.layer_size = [layer.size() for layer in self.layers]
        self.compiled_layers = all(a is not None for a in self.layer_args)
        self.compiled_prompts = all(m.jit_prompts for layer in self.layers for m in layer.matrices())

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
        halves = c.rope_style == "halves"
        if N <= SMALL_BATCH and self.compiled_layers and (self.compiled_prompts or not prefill):
            # one compiled call per layer (a float prompt stays on numpy: see the module's docstring)
            jit = _jit()
            slots = np.concatenate([np.full(T, slot, np.int64) for slot, _, _, T in spans])
            for l, layer in enumerate(self.layers):
                jit.layer(N * self.layer_size[l], x, *self.layer_args[l], cache.k[l], cache.v[l], slots,
                          positions, cos, sin, c.norm_eps, c.n_heads, halves)
            h = jit.rmsnorm(_last_rows(x, spans, all_logits), self.rms_final, c.norm_eps)
            return self._advance(spans, cache, self._classify_compiled(h))
        decode = [i for i, (_, _, _, T) in enumerate(spans) if T == 1]
        dec_rows = np.array([spans[i][2] for i in decode], np.int64)
        dec_slots = np.array([spans[i][0] for i in decode], np.int64)
        dec_pos = np.array([spans[i][1] for i in decode], np.int64)
        work = 2 * c.dim * int(dec_pos.sum() + len(decode))  # attention multiply-adds of decode rows
        att = np.empty((N, D), np.float32)
        for l, layer in enumerate(self.layers):
            h = K.rmsnorm(x, layer.rms_att, c.norm_eps)
            q, k, v = layer.qkv(h)
            q = K.rope(q.reshape(N, c.n_heads, hd), cos, sin, c.rope_style)
            k = K.rope(k.reshape(N, c.n_kv_heads, hd), cos, sin, c.rope_style)
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

    def _classify_compiled(self, h):  # [N, D] -> [N, V], each row as if alone (unlike BLAS's gemm)
        return self.classifier(h)  # native for these few rows, whatever the type

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
