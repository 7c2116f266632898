"""The Llama 2 transformer forward pass in numpy float32, over a paged KV cache (llama2.kvcache).

Weights come from a `Checkpoint` (any source the loader reads) and are used as stored: each matrix is
a `weights.Matrix` of its type (float32, float16, bfloat16, int8 blocks, 4-6-bit k-quants...) over a
view of the memory-mapped file; this module never looks at the type, nor at the KV cache's type.
Every pass runs per matrix, each Matrix choosing its own product (native kernels for a few rows,
whose every row is computed alone, or BLAS); keys and values go into the cache's blocks in its
type; then every row of the pass, prompt rows and decode rows alike, attends in one native call
per layer, reading its sequence's blocks in the cache's type (`native.attention`), each row with the
arithmetic of a decode row at its position. A pass of decode rows only (up to `invariant_rows`) runs
as one native call instead (llama2.decode), with the same bits. A row's result never depends on the
other rows of its pass, so a sequence decodes to the same bits alone or batched, and a prompt of up
to `invariant_rows` tokens gives the logits of feeding its tokens one at a time. Reference:
llama2.c run.c `forward`.
"""


from dataclasses import dataclass

import numpy as np

from . import kernels as K, kvcache, rope, weights
from .checkpoint import LAYER_MATRICES, Checkpoint
from .config import Q8_GROUP_SIZE
from .errors import Llama2Error

KVCache = kvcache.Cache  # the one explicit state of inference

# Rows that every weight type's native product computes one by one (f32's and the llama2.c int8's
# small-batch kernels); a type's own figure is its Matrix.invariant_rows, a model's the minimum.
SMALL_BATCH = 8


def _native():
    from . import native

    return native


def _last_rows(x, spans, all_logits):  # [N, D] -> each segment's last row, unless all are wanted
    return x if all_logits else x[[r + T - 1 for _, _, r, T in spans]]


@dataclass
class Layer:
    rms_att: np.ndarray  # [D]
    wq: weights.Matrix  # [Q, D] (Q = n_heads * head_dim, D unless the config sets head_dim)
    wk: weights.Matrix  # [KV, D]
    wv: weights.Matrix  # [KV, D]
    wo: weights.Matrix  # [D, Q]
    rms_ffn: np.ndarray  # [D]
    w1: weights.Matrix  # [H, D]
    w2: weights.Matrix  # [D, H]
    w3: weights.Matrix  # [H, D]

    def qkv(self, h):  # [N, D] -> q [N, D], k [N, KV], v [N, KV]
        return self.wq(h), self.wk(h), self.wv(h)

    def ffn(self, h):  # [N, D] -> [N, D]: w2(silu(w1 h) * w3 h)
        return self.w2(_native().silu_mul(self.w1(h), self.w3(h)))

    def matrices(self) -> list:  # in LAYER_MATRICES order
        return [getattr(self, name) for name in LAYER_MATRICES]

    def size(self) -> int:  # multiply-adds per row
        return sum(m.shape[0] * m.shape[1] for m in self.matrices())


class Transformer:
    """Prepared weights plus `forward`. Stateless between calls: the KV cache holds the state.

    Matrices run in the type their file stores them in, without copies. `quantize` (q8_0: int8 in
    groups of `group_size`, our version-2 layout; q4_0 ... q6_k, q4_k_m, q5_k_m: llama.cpp's type per
    tensor, see `weights.quantizer`) turns matrices stored as floats into that type at load; matrices
    stored quantized stay as they are. `kv_type` (a name of kvcache.TYPES; default the checkpoint's,
    its format's choice) is the type of the caches `new_cache` makes.
    """

    def __init__(self, ckpt: Checkpoint, quantize: str = None, group_size: int = Q8_GROUP_SIZE,
                 kv_type: str = None):
        c = self.config = ckpt.config
        to_type = weights.quantizer(quantize, group_size, c) if quantize else None
        self.kv_type = kv_type or ckpt.kv_type
        kvcache.get(self.kv_type).row_bytes(c.head_dim)  # refused here if the type cannot hold its rows

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
        self.cos, self.sin = rope.tables(c)  # [seq_len, head_dim / 2]
        # The most rows a pass may hold with every row's logits bit for bit those it gets alone:
        # the products are the only step that may mix rows (each matrix's `invariant_rows`); the
        # rest is per row (embedding lookup, RMSNorm, RoPE, SiLU, the KV write, attention: each
        # row with a decode row's arithmetic over its own sequence's blocks).
        self.invariant_rows = max(1, min(m.invariant_rows for m in self.matrices()))

        # Passes of decode rows only (up to invariant_rows) run as one native call (llama2.decode)
        # where every matrix has a native kernel; False: always matrix by matrix (the reference).
        self.fused_decode = True
        self._plan = False  # not built yet

    def matrices(self) -> list:  # every matrix a pass multiplies by (not the embedding's lookups)
        return [m for layer in self.layers for m in layer.matrices()] + [self.classifier]

    def new_cache(self, slots: int = 1, blocks: int = None, seq_len: int = None,
                  kv_type: str = None) -> KVCache:
        """A cache of `slots` sequences; its pool holds `blocks` blocks (default: every slot's
        whole context), committed to memory only as positions are written."""
        return KVCache(self.config, kv_type or self.kv_type, slots, seq_len, blocks)

    def forward(self, tokens, cache: KVCache, slot: int = 0, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` [T] of one sequence from its cached position on; returns logits [T, V]
        (or [1, V] for the last position only, the default) and advances the slot's position."""
        return self.forward_batch([(slot, tokens)], cache, all_logits)

    def forward_batch(self, segments, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """One pass for several sequences: `segments` is a list of (slot, tokens); each segment's
        tokens continue its slot's sequence. All rows share the matrix products; each row attends
        over its own sequence's blocks (one native call per layer). Returns logits
        [len(segments), V] of each segment's last token, or [total tokens, V] with `all_logits`.
        A segment's result does not depend on the others' tokens, and while the pass holds at most
        `invariant_rows` rows its bits are exactly those it gets in a pass of its own. Blocks are
        reserved before any work: kvcache.CacheFull when the pool has none left (the cache's
        positions unchanged)."""
        c = self.config
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
        for slot, _, _, T in spans:
            cache.reserve(slot, T)
        tokens = np.concatenate(rows)
        x = self.embedding.rows(tokens)  # [N, D]
        plan = self._decode_plan() if all(T == 1 for *_, T in spans) else None
        if plan is not None and len(spans) <= plan.rows:  # one native call: every layer, the final norm, the classifier
            tables = cache.table_array([slot for slot, *_ in spans])  # [B, max blocks]
            lens = np.array([st + 1 for _, st, _, _ in spans], np.int64)
            logits = plan(x, cache, tables, lens)
        else:
            logits = self._forward_layers(x, spans, cache, all_logits)
        for slot, st, _, T in spans:
            cache.pos[slot] = st + T
            if c.sliding_window:  # the next row attends from st + T + 1 - W on
                cache.forget_before(slot, st + T + 1 - c.sliding_window)
        return logits

    def _forward_layers(self, x, spans, cache, all_logits):  # [N, D] -> logits, matrix by matrix
        c = self.config
        hd = c.head_dim
        N = len(x)
        positions = np.concatenate([np.arange(st, st + T) for _, st, _, T in spans])
        where = cache.locate([(slot, st, T) for slot, st, _, T in spans])  # each row's block and offset
        cos, sin = self.cos[positions], self.sin[positions]  # [N, hd/2]
        tables = cache.table_array([slot for slot, _, _, _ in spans])  # [S, max blocks]
        starts = np.array([st for _, st, _, _ in spans], np.int64)
        counts = np.array([T for _, _, _, T in spans], np.int64)
        nat = _native()
        att = np.empty((N, c.q_dim), np.float32)
        # RMSNorm stays numpy's: its sum of squares (einsum's four lanes) is closer to llama.cpp's (double)
        # than native.rmsnorm's sequential float sum, which moves k-quant activations' rounding
        # (tests/engine/test_kquant_files.py); run.c's goldens hold with either.
        for l, layer in enumerate(self.layers):
            h = K.rmsnorm(x, layer.rms_att, c.norm_eps)
            q, k, v = layer.qkv(h)
            q = nat.rope(q.reshape(N, c.n_heads, hd), cos, sin, c.rope_style)
            k = nat.rope(k.reshape(N, c.n_kv_heads, hd), cos, sin, c.rope_style)
            cache.write(l, where, k, v.reshape(N, c.n_kv_heads, hd))
            nat.attention(cache.type.ID, q, cache.pool.k[l], cache.pool.v[l], tables, starts, counts, att,
                          c.sliding_window or 0)
            x = x + layer.wo(att)
            h = K.rmsnorm(x, layer.rms_ffn, c.norm_eps)
            x = x + layer.ffn(h)
        h = K.rmsnorm(_last_rows(x, spans, all_logits), self.rms_final, c.norm_eps)
        return self.classifier(h)

    def _decode_plan(self):  # the one-call decode step (llama2.decode), built at first use
        if not self.fused_decode:
            return None
        if self._plan is False:
            from .decode import Plan
            self._plan = Plan.build(self)
        return self._plan

    def warm_up(self):
        """One decode step on a scratch cache, so a server's first request finds every kernel and
        buffer ready."""
        self.forward([0], self.new_cache(1, blocks=1, seq_len=1))
