"""The Llama 2 transformer: its weights, read from a `Checkpoint`, and its forward pass over a paged
KV cache (llama2.kvcache).

Weights come from a `Checkpoint` (any source the loader reads) and are used as stored: each matrix is
a `weights.Matrix` of its type (float32, float16, bfloat16, int8 blocks, 4-6-bit k-quants...) over a
view of the memory-mapped file; this module never looks at the type, nor at the KV cache's type.
Every pass, prompt rows and decode rows of any number of sequences alike, runs as one native call
through the model's `Plan` (llama2.plan, native/layer.c): the rows' embeddings go in, logits come
out, and the rows' keys and values are written into the cache. Every row is computed alone, with a
decode row's arithmetic at its position: a sequence decodes to the same bits alone or batched, and a
prompt gives the logits of feeding its tokens one at a time. Reference: llama2.c run.c `forward`.
"""


from dataclasses import dataclass

import numpy as np

from . import kvcache, rope, weights
from .checkpoint import LAYER_MATRICES, Checkpoint
from .config import PASS_ROWS, Q8_GROUP_SIZE
from .errors import Llama2Error
from .plan import Plan
from .weights.interleaved import interleaved, regrouped_tensor

KVCache = kvcache.Cache  # the one explicit state of inference


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

    def matrices(self) -> list:  # in LAYER_MATRICES order
        return [getattr(self, name) for name in LAYER_MATRICES]

    def size(self) -> int:  # multiply-adds per row
        return sum(m.shape[0] * m.shape[1] for m in self.matrices())


class Transformer:
    """Prepared weights plus `forward`. Stateless between calls: the KV cache holds the state.

    Matrices run in the type their file stores them in, without copies, except that a type with a
    layout of interleaved rows (Q4_K) is regrouped into it at load, replacing the mapped rows
    (llama2.weights.interleaved: the same bits, faster kernels, the same memory). `quantize` (q8_0: int8 in
    groups of `group_size`, our version-2 layout; q4_0 ... q6_k, q4_k_m, q5_k_m: llama.cpp's type per
    tensor, see `weights.quantizer`) turns matrices stored as floats into that type at load; matrices
    stored quantized stay as they are. `kv_type` (a name of kvcache.TYPES; default the checkpoint's,
    its format's choice) is the type of the caches `new_cache` makes.

    `adapters` (llama2.lora.LoRA) are LoRA adapters applied unmerged, picked per sequence of a
    pass by index (forward_batch's `adapters`); `adapter` is the index a pass uses when its caller
    names none (-1: the base alone). `Llama.load(lora=...)` sets both; the server names each
    request's.
    """

    def __init__(self, ckpt: Checkpoint, quantize: str = None, group_size: int = Q8_GROUP_SIZE,
                 kv_type: str = None, adapters=(), adapter: int = -1):
        c = self.config = ckpt.config
        to_type = weights.quantizer(quantize, group_size, c) if quantize else None
        self.kv_type = kv_type or ckpt.kv_type
        kvcache.get(self.kv_type).row_bytes(c.head_dim)  # refused here if the type cannot hold its rows

        def matrix(value, name, layer=None):  # the tensor's name and layer pick its type in a mix
            m = weights.matrix(value)
            m = to_type(m.dequantize(), name, layer) if to_type and m.STORES_FLOATS else m
            # the rows of a type with a layout of its own regrouped for the kernels
            return interleaved(m) if regrouped_tensor(name, c.shared_classifier) else m

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
        # the plan computes every row alone (each product kernel's outputs, RMSNorm, RoPE, SiLU,
        # the KV write, attention: each row with a decode row's arithmetic over its own
        # sequence's blocks), so any number. The server packs passes up to it.
        self.invariant_rows = weights.base.ALL_ROWS
        self.adapters = list(adapters)
        if not -1 <= adapter < len(self.adapters):
            raise ValueError(f"adapter {adapter}: the model has {len(self.adapters)} adapters")
        self.adapter = adapter
        self.plan = Plan(self)  # the forward pass as one native call

    def matrices(self) -> list:  # every matrix a pass multiplies by (not the embedding's lookups)
        return [m for layer in self.layers for m in layer.matrices()] + [self.classifier]

    def new_cache(self, slots: int = 1, blocks: int = None, seq_len: int = None,
                  kv_type: str = None) -> KVCache:
        """A cache of `slots` sequences; its pool holds `blocks` blocks (default: every slot's
        whole context), committed to memory only as positions are written."""
        return KVCache(self.config, kv_type or self.kv_type, slots, seq_len, blocks)

    def forward(self, tokens, cache: KVCache, slot: int = 0, all_logits: bool = False, adapter: int = None) -> np.ndarray:
        """Run `tokens` [T] of one sequence from its cached position on; returns logits [T, V]
        (or [1, V] for the last position only, the default) and advances the slot's position."""
        return self.forward_batch([(slot, tokens)], cache, all_logits, None if adapter is None else [adapter])

    def forward_batch(self, segments, cache: KVCache, all_logits: bool = False, adapters=None) -> np.ndarray:
        """One pass for several sequences: `segments` is a list of (slot, tokens); each segment's
        tokens continue its slot's sequence. All rows share the matrix products (one native call for
        the pass); each row attends over its own sequence's blocks. Returns logits
        [len(segments), V] of each segment's last token, or [total tokens, V] with `all_logits`.
        A segment's result does not depend on the others' tokens: its bits are exactly those it
        gets in a pass of its own. Blocks are reserved before any work: kvcache.CacheFull when the
        pool has none left (the cache's positions unchanged). `adapters`: each segment's index in
        `self.adapters` (-1: none), default `self.adapter` for every segment."""
        c = self.config
        if sum(np.size(tokens) for _, tokens in segments) > PASS_ROWS:
            return self._forward_in_passes(segments, cache, all_logits, adapters)
        spans, rows = [], []
        if len({slot for slot, _ in segments}) != len(segments):
            raise ValueError("a slot may appear only once in a batch")
        if adapters is None:
            adapters = [self.adapter] * len(segments)
        if len(adapters) != len(segments) or not all(-1 <= a < len(self.adapters) for a in adapters):
            raise ValueError(f"adapters {list(adapters)}: expected one index in -1..{len(self.adapters) - 1} "
                             "per segment")
        for slot, tokens in segments:
            tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
            T, start = len(tokens), int(cache.pos[slot])
            if T == 0:
                raise ValueError("forward needs at least one token per sequence")
            if start + T > cache.seq_len:
                raise Llama2Error(f"context is full: {start + T} positions exceed seq_len {cache.seq_len}")
            if tokens.min() < 0 or tokens.max() >= c.vocab_size:
                raise Llama2Error(f"token id out of range for a vocabulary of {c.vocab_size}")
            spans.append((slot, start, T))
            rows.append(tokens)
        for slot, _, T in spans:
            cache.reserve(slot, T)
        tokens = np.concatenate(rows)
        x = self.embedding.rows(tokens)  # [N, D]
        tables = cache.table_array([slot for slot, _, _ in spans])  # [S, max blocks]
        starts = np.array([st for _, st, _ in spans], np.int64)
        counts = np.array([T for _, _, T in spans], np.int64)
        per_row = np.repeat(np.asarray(adapters, np.int32), counts) if any(a >= 0 for a in adapters) else None
        logits = self.plan(x, cache, tables, starts, counts, all_logits, per_row)
        for slot, st, T in spans:
            cache.pos[slot] = st + T
            if c.sliding_window:  # the next row attends from st + T + 1 - W on, unless a draft's
                # rows are taken back (cache.rollback)
                cache.forget_before(slot, st + T + 1 - c.sliding_window - cache.rollback)
        return logits

    def _forward_in_passes(self, segments, cache: KVCache, all_logits: bool, adapters) -> np.ndarray:
        """forward_batch for more than PASS_ROWS rows: the segments' tokens in order, cut into passes
        of at most PASS_ROWS rows (a segment may span several). Every slot's blocks are reserved
        first, so a full pool raises before any position moves."""
        segments = [(slot, np.asarray(tokens, dtype=np.int64).reshape(-1)) for slot, tokens in segments]
        adapters = [self.adapter] * len(segments) if adapters is None else list(adapters)
        if len({slot for slot, _ in segments}) != len(segments):
            raise ValueError("a slot may appear only once in a batch")
        for slot, tokens in segments:
            if int(cache.pos[slot]) + len(tokens) > cache.seq_len:
                raise Llama2Error(f"context is full: {int(cache.pos[slot]) + len(tokens)} positions exceed "
                                  f"seq_len {cache.seq_len}")
        for slot, tokens in segments:
            cache.reserve(slot, len(tokens))
        passes, current, room = [], [], PASS_ROWS  # pieces: (segment index, tokens)
        for i, (_, piece) in enumerate(segments):
            while len(piece):
                take, piece = piece[:room], piece[room:]
                current.append((i, take))
                room -= len(take)
                if room == 0:
                    passes.append(current)
                    current, room = [], PASS_ROWS
        if current:
            passes.append(current)
        out = [[] for _ in segments]
        for pieces in passes:
            logits = self.forward_batch([(segments[i][0], t) for i, t in pieces], cache, all_logits,
                                        [adapters[i] for i, _ in pieces])
            at = 0
            for k, (i, t) in enumerate(pieces):
                if all_logits:
                    out[i].append(logits[at:at + len(t)])
                    at += len(t)
                else:
                    out[i] = [logits[k:k + 1]]  # the segment's last piece's row wins
        return np.concatenate([part for parts in out for part in parts])

    def warm_up(self):
        """One decode step on a scratch cache, so a server's first request finds every kernel and
        buffer ready."""
        self.forward([0], self.new_cache(1, blocks=1, seq_len=1))
