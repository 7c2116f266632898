"""A model's forward pass as one native call (native/layer.c): every layer, then the final norm and
the classifier, for the rows of a pass: prompt rows and decode rows of several sequences alike.

A `Plan` is the model's description, built once from what the model and each weight matrix say of
themselves: the shapes (heads may be wider than dim / n_heads: q and the attention output are
n_heads * head_dim wide), the attention window, the norms, the RoPE tables (llama2.rope: the
model's own angles per position, scaled as its config says), and each
matrix as its product kernels read it (`Matrix.native_product`; the model never looks at a type).
The one executor runs it on the pool's threads kept across phases: RMSNorm, the products (dot
kernels for one or two rows, gemm kernels from three on, the float gemm's panels for float weights),
RoPE at each row's position, the keys and values written into the paged cache in its type, each
row's attention over its sequence's rows up to its own (the last `sliding_window` of them where the
config sets one), the residuals and the FFN. Every value is
one kernel call's own arithmetic, whatever the pass's other rows or the thread count: a sequence
gets the same bits alone or batched, and a prompt gets the logits of feeding its tokens one at a
time.

LoRA adapters (llama2.lora) ride along unmerged: the plan holds each adapter's pairs (A, B, scale)
per matrix, and a call names each row's adapter (-1: none). The rows phase that makes a matrix's
input also computes A x, and after the product a phase adds scale * B (A x) to the rows that have an
adapter; a row's bits still depend on nothing but its own inputs and adapter. A pass whose rows
have no adapter runs the plain phases.

RMSNorm sums its squares in numpy's einsum order on x86-64 (four lanes; `native.rmsnorm_einsum`),
which is closer to llama.cpp's double sum than a sequential float sum; run.c's goldens hold either
way.
"""

import numpy as np

from . import native
from .checkpoint import LAYER_MATRICES


def _norm(w):  # a norm's weights as the plan takes them
    return np.ascontiguousarray(w, dtype=np.float32)


def _adapter(lora) -> list:  # a lora.LoRA as forward_plan takes it
    return [(layer, LAYER_MATRICES.index(name), a, b, float(s)) for (name, layer), (a, b, s) in lora.pairs.items()]


class Plan:
    """A model's forward pass as one native call; `model.adapters` are the LoRA adapters a row may
    pick (their arrays are held by the plan)."""

    def __init__(self, model):
        c = model.config
        layers = [(_norm(layer.rms_att), _norm(layer.rms_ffn), *[m.native_product() for m in layer.matrices()])
                  for layer in model.layers]
        self.vocab = c.vocab_size
        self._handle = native.forward_plan(
            (c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, float(c.norm_eps), c.rope_style == "halves",
             c.sliding_window or 0, c.dim),
            layers, _norm(model.rms_final), model.classifier.native_product(), model.cos, model.sin,
            [_adapter(lora) for lora in model.adapters])

    def __call__(self, x, cache, tables, starts, counts, all_rows: bool = False, adapter=None) -> np.ndarray:
        """x float32 [N, dim] (the rows' embeddings; overwritten); S segments of one sequence each:
        tables int32 [S, max blocks], starts, counts int64 [S] (segment s: counts[s] rows at
        positions starts[s]..., blocks reserved; N rows in all) -> logits float32 [N, vocab] with
        `all_rows`, else [S, vocab] of each segment's last row. The rows' keys and values are
        written into `cache`. `adapter`: None, or int32 [N], each row's index in model.adapters
        (-1: the base alone)."""
        if not (x.flags.c_contiguous and x.flags.writeable and x.dtype == np.float32):
            x = np.array(x, np.float32, order="C")
        logits = np.empty((len(x) if all_rows else len(starts), self.vocab), np.float32)
        native.forward(self._handle, x, cache.pool.k, cache.pool.v, cache.type.ID, tables, starts, counts, logits,
                       adapter)
        return logits
