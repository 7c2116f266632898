"""The decode step in one native call: every layer of a pass of decode rows (one new token per
sequence), then the final norm and the classifier (native/layer.c).

The per-matrix forward pass (model.py) makes about fifteen calls from Python per layer, each a
fork and join of the native pool; for small models those calls cost more than their arithmetic.
A `Plan`, built once per model from what each weight matrix says of itself
(`Matrix.native_product`: its kernel and arrays; the model never looks at a type), hands the whole
pass to C: RMSNorm, the products, RoPE, the keys and values written into the paged cache in its
type, attention through the block tables, the residuals and the FFN, on the pool's threads kept
across phases. Each value is computed by the kernel call the per-matrix path makes for it, so the
logits and the cache's bytes are the per-matrix path's, bit for bit, at every instruction-set level
and thread count.

The RMSNorm there sums squares in numpy's einsum order (`native.rmsnorm_einsum`), the order
kernels.rmsnorm gets from numpy on x86-64; a numpy built otherwise sums in another order, so a plan
first checks the two agree on the model's own norms and, if they do not, the model keeps the
per-matrix path.
"""

import numpy as np

from . import kernels as K


def _native():
    try:
        from . import native
    except ImportError:
        return None
    return native


def _rmsnorm_agrees(nat, weights, dim, eps) -> bool:
    """The native RMSNorm gives kernels.rmsnorm's bits on rows of several scales (numpy's order)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, dim)).astype(np.float32) * np.float32([[1e-3], [1.0], [37.0], [1e3]])
    for w in weights:
        if not np.array_equal(nat.rmsnorm_einsum(x, w, eps, np.empty_like(x)), K.rmsnorm(x, w, eps)):
            return False
    return True


def _norm(w):  # a norm's weights as the plan takes them, or None
    w = np.asarray(w)
    return np.ascontiguousarray(w) if w.dtype == np.float32 and w.ndim == 1 else None


class Plan:
    """A model's decode step as one native call. `rows`: the most decode rows of a pass it takes
    (the model's `invariant_rows`: up to there the per-matrix path computes each row alone)."""

    def __init__(self, handle, rows: int, vocab: int, nat):
        self._handle, self.rows, self.vocab, self._nat = handle, rows, vocab, nat

    @classmethod
    def build(cls, model) -> "Plan | None":
        """The plan of a Transformer, or None where the per-matrix path must run: no native kernels
        for one of its matrices, norms that are not float32, or a numpy whose RMSNorm sums in
        another order."""
        nat = _native()
        if nat is None or not hasattr(nat, "decode_plan"):
            return None
        c = model.config
        layers = []
        for layer in model.layers:
            norms = [_norm(layer.rms_att), _norm(layer.rms_ffn)]
            specs = [m.native_product() for m in layer.matrices()]
            if any(v is None for v in norms + specs):
                return None
            layers.append((*norms, *specs))
        final, classifier = _norm(model.rms_final), model.classifier.native_product()
        if final is None or classifier is None:
            return None
        if not _rmsnorm_agrees(nat, [final] + [n for lay in layers for n in lay[:2]], c.dim, c.norm_eps):
            return None
        handle = nat.decode_plan((c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, float(c.norm_eps),
                                  c.rope_style == "halves", c.sliding_window or 0, c.dim),
                                 layers, final, classifier, model.cos, model.sin)
        return cls(handle, model.invariant_rows, c.vocab_size, nat)

    def __call__(self, x, cache, tables, lens) -> np.ndarray:
        """x float32 [B, dim] (the rows' embeddings; overwritten), tables int32 [B, max blocks], lens
        int64 [B] (row b's token sits at position lens[b] - 1, its blocks reserved) -> logits
        float32 [B, vocab]; the rows' keys and values are written into `cache`."""
        if not (x.flags.c_contiguous and x.flags.writeable and x.dtype == np.float32):
            x = np.array(x, np.float32, order="C")
        logits = np.empty((len(x), self.vocab), np.float32)
        self._nat.decode_forward(self._handle, x, cache.pool.k, cache.pool.v, cache.type.ID, tables, lens, logits)
        return logits
