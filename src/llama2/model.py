"""The Llama 2 transformer forward pass in numpy float32, over an explicit KV cache.

Weights come from a `Checkpoint` (any source the loader reads). Q, K and V projections are fused into
one matrix, as are W1 and W3, so each layer makes four matrix products. A prompt runs as one [T, dim]
block (batched prefill); decoding feeds one token per sequence. Reference: llama2.c run.c `forward`.
"""

from dataclasses import dataclass, field

import numpy as np

from . import kernels as K
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import Llama2Error


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


@dataclass
class Layer:
    rms_att: np.ndarray  # [D]
    wqkv: np.ndarray  # [D + 2*KV, D]
    wo: np.ndarray  # [D, D]
    rms_ffn: np.ndarray  # [D]
    w13: np.ndarray  # [2*H, D]
    w2: np.ndarray  # [D, H]


class Transformer:
    """Prepared weights plus `forward`. Stateless between calls: the KVCache holds the state."""

    def __init__(self, ckpt: Checkpoint):
        c = self.config = ckpt.config
        dense = ckpt.dense

        def per_layer(name):
            return dense(name)

        wq, wk, wv, wo = (per_layer(n) for n in ("wq", "wk", "wv", "wo"))
        w1, w2, w3 = (per_layer(n) for n in ("w1", "w2", "w3"))
        rms_att, rms_ffn = dense("rms_att"), dense("rms_ffn")
        self.layers = [
            Layer(rms_att=rms_att[l], wqkv=np.concatenate([wq[l], wk[l], wv[l]]), wo=np.asarray(wo[l]),
                  rms_ffn=rms_ffn[l], w13=np.concatenate([w1[l], w3[l]]), w2=np.asarray(w2[l]))
            for l in range(c.n_layers)
        ]
        self.embedding = dense("token_embedding")  # [V, D]
        self.rms_final = dense("rms_final")  # [D]
        self.classifier = self.embedding if c.shared_classifier else dense("wcls")  # [V, D]
        self.cos, self.sin = K.rope_tables(c.head_dim, c.seq_len, c.rope_theta)

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
        x = self.embedding[tokens].astype(np.float32)  # [N, D]
        att = np.empty((N, D), np.float32)
        for l, layer in enumerate(self.layers):
            h = K.rmsnorm(x, layer.rms_att, c.norm_eps)
            qkv = K.linear(h, layer.wqkv)  # [N, D + 2*KV]
            q = K.rope(qkv[:, :D].reshape(N, c.n_heads, hd), cos, sin)
            k = K.rope(qkv[:, D:D + KV].reshape(N, c.n_kv_heads, hd), cos, sin)
            v = qkv[:, D + KV:].reshape(N, c.n_kv_heads, hd)
            for slot, st, r, T in spans:
                kc, vc = cache.k[l, slot], cache.v[l, slot]  # [KVH, seq_len, hd]
                kc[:, st:st + T] = k[r:r + T].transpose(1, 0, 2)
                vc[:, st:st + T] = v[r:r + T].transpose(1, 0, 2)
                att[r:r + T] = K.attention(q[r:r + T], kc[:, :st + T], vc[:, :st + T], st)
            x = x + K.linear(att, layer.wo)
            h = K.rmsnorm(x, layer.rms_ffn, c.norm_eps)
            x = x + K.linear(K.swiglu(K.linear(h, layer.w13), c.hidden_dim), layer.w2)
        for slot, st, _, T in spans:
            cache.pos[slot] = st + T
        if not all_logits:
            x = x[[r + T - 1 for _, _, r, T in spans]]
        return K.linear(K.rmsnorm(x, self.rms_final, c.norm_eps), self.classifier)
