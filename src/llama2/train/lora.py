"""LoRA over a frozen base in its stored type: the base's matrices stay weights.Matrix views of the
mapped file (F32/F16/BF16 or any quantized type) and are dequantized a tile of rows at a time in the
forward pass and again in the backward pass, never widened whole (QLoRA over the user's own file).
A matrix stored in the type it is multiplied in (F32 in float32, BF16 in bfloat16) is used in place.
Products run in bfloat16 where the hardware has bf16 dot products (--base-dtype auto), in float32
otherwise; LoRA's factors, their products and the loss stay float32.

References: Hu et al. 2021, "LoRA" (y = W x + (alpha / r) B A x, B zero at the start, A Kaiming
uniform as PEFT initializes it); Dettmers et al. 2023, "QLoRA" (frozen quantized base).
"""

import math
import threading
import warnings

import numpy as np
import torch
from torch import nn

from .. import weights
from ..weights.base import DEQUANT_TILE
from .model import LAYER_PARAMS
from .options import TARGETS


def bf16_dot_products(device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512_BF16 or AMX (torch's oneDNN kernels then run bf16 products at twice float32's rate or more;
    without them it emulates bf16, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(choice: str, matrix, device) -> torch.dtype:
    """The dtype frozen `matrix` is multiplied in (x and the gradient are rounded to it; the product
    comes back as float32, as LoRA's factors, the residual stream and the loss stay). "auto":
    bfloat16 where the device has bf16 dot products and the matrix is not stored in float32 (a
    float32 base is kept exact), else float32."""
    if choice == "auto":
        choice = "bfloat16" if matrix.NAME != "f32" and bf16_dot_products(device) else "float32"
    return getattr(torch, choice)


# (stored type, numpy dtype of the same width) of the matrices torch can use in place, by compute dtype
_IN_PLACE = {torch.float32: ("f32", np.float32), torch.bfloat16: ("bf16", np.int16)}


def _stored_view(matrix, dtype):
    """The matrix's own memory (the mapped file's pages) as a tensor [out, in] of `dtype`, when it
    is stored in `dtype` and contiguous; else None."""
    kind = _IN_PLACE.get(dtype)
    if kind is None or matrix.NAME != kind[0] or matrix.data is None:
        return None
    with warnings.catch_warnings():  # a read-only map: torch warns that writes would fail; none are made
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(matrix.blocks.view(kind[1])).view(dtype)


_tile_buffers = threading.local()


def _tile_buffer(values, dtype, device):
    """A flat tensor of at least `values` elements of `dtype` on `device`, this thread's own, kept
    and reused by every call: the dequantized tiles (8-16 MB each, a few hundred a step) go there
    rather than into fresh allocations, which glibc may map afresh each time (trainer.fit's malloc
    settings) and whose pages would then come back as page faults."""
    bufs, key = vars(_tile_buffers).setdefault("bufs", {}), (dtype, str(device))
    if key not in bufs or bufs[key].numel() < values:
        bufs[key] = torch.empty(values, dtype=dtype, device=device)
    return bufs[key]


def _weight_tiles(matrix, dtype, device):
    """(r0, r1, W[r0:r1] [r1 - r0, in] of `dtype` on `device`): the stored memory itself when it holds
    `dtype` (one piece, no copy on the CPU), else dequantized tiles of at most DEQUANT_TILE values in
    this thread's tile buffers, each valid until the next is yielded."""
    view = _stored_view(matrix, dtype)
    if view is not None:
        yield 0, matrix.shape[0], view.to(device)
        return
    rows, cols = matrix.shape
    step = max(1, DEQUANT_TILE // cols)
    wide = _tile_buffer(min(step, rows) * cols, torch.float32, "cpu")
    same = dtype == torch.float32 and torch.device(device).type == "cpu"
    tile = wide if same else _tile_buffer(min(step, rows) * cols, dtype, device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w32 = wide[:(r1 - r0) * cols].view(r1 - r0, cols)
        matrix.dequantize_rows(r0, r1, w32.numpy())
        yield r0, r1, w32 if same else tile[:(r1 - r0) * cols].view(r1 - r0, cols).copy_(w32)


def _times_transposed(x, matrix, dtype):  # x [N, in] @ W.T -> [N, out] in x's dtype, multiplied in `dtype`
    xc = x.to(dtype)
    out = None
    for r0, r1, w in _weight_tiles(matrix, dtype, x.device):
        if r1 - r0 == matrix.shape[0]:  # one piece: the product is the output, no copy
            return (xc @ w.T).to(x.dtype)
        if out is None:
            out = x.new_empty(x.shape[0], matrix.shape[0])
        out[:, r0:r1] = xc @ w.T
    return out


def _times(g, matrix, dtype):  # g [N, out] @ W -> [N, in] in g's dtype, multiplied in `dtype`
    gc = g.to(dtype)
    out = None
    for r0, r1, w in _weight_tiles(matrix, dtype, g.device):
        part = gc[:, r0:r1] @ w
        out = part.to(g.dtype) if out is None else out.add_(part)
    return out


class _FrozenMatmul(torch.autograd.Function):
    """x [N, in] @ W.T -> [N, out] for a frozen weights.Matrix W, multiplied in `dtype`; backward
    reads (dequantizes) W again. x and the result keep x's dtype."""

    @staticmethod
    def forward(ctx, x, matrix, dtype):
        ctx.matrix, ctx.dtype = matrix, dtype
        return _times_transposed(x, matrix, dtype)

    @staticmethod
    def backward(ctx, grad):  # d(x W^T)/dx = grad W; W gets no gradient
        return _times(grad, ctx.matrix, ctx.dtype), None, None


class _LoRAMatmul(torch.autograd.Function):
    """x W^T + s (d A^T) B^T for a frozen weights.Matrix W [out, in] (multiplied in `dtype`), LoRA's
    factors A [r, in] and B [out, r] (float32) and d = dropout(x) (x itself without dropout): one
    function, so that backward forms each rank-wide product in the layout BLAS runs fast (B's
    gradient as (h^T g)^T: g^T h over the transposed [N, out] gradient ran 3-5x slower) and adds
    the LoRA path's input gradient into the frozen one in place (addmm_) instead of a separate sum."""

    @staticmethod
    def forward(ctx, x, d, A, B, scale, matrix, dtype):  # x, d [N, in] -> [N, out] float32
        h = (d @ A.T).mul_(scale)  # [N, r]
        y = torch.addmm(_times_transposed(x, matrix, dtype), h, B.T)
        ctx.matrix, ctx.dtype, ctx.scale, ctx.same = matrix, dtype, scale, d is x
        ctx.save_for_backward(d, A, B, h)
        return y

    @staticmethod
    def backward(ctx, g):  # g [N, out]
        d, A, B, h = ctx.saved_tensors
        gh = (g @ B).mul_(ctx.scale)  # [N, r]: the gradient at d A^T
        gB = (h.T @ g).T.contiguous()  # [out, r]
        gA = gh.T @ d  # [r, in]
        gx = _times(g, ctx.matrix, ctx.dtype)  # [N, in] through the frozen W
        if ctx.same:
            return gx.addmm_(gh, A), None, gA, gB, None, None, None
        return gx, gh @ A, gA, gB, None, None, None


# float32 logits held at a time by the loss over an in-place classifier (16 MB): that many values'
# worth of rows at a time. A classifier dequantized in tiles takes all rows at once, so it is still
# dequantized twice a step.
LOSS_CHUNK_VALUES = 1 << 22


class _FrozenCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h W^T (h [N, D] float32, a frozen weights.Matrix W [V, D]
    multiplied in `dtype`, softmax in float32) against targets [N]. The gradient dh = (softmax -
    onehot(target)) W is computed in the same pass, a chunk of rows at a time, and is all that
    backward keeps: no [N, V] tensor is kept or built whole (torch's linear + log_softmax + nll keep
    the logits and log-probabilities and make four more passes over [N, V] float32 for the gradient)."""

    @staticmethod
    def forward(ctx, h, matrix, dtype, targets):
        grad = ctx.needs_input_grad[0]
        n, vocab = h.shape[0], matrix.shape[0]
        step = n if _stored_view(matrix, dtype) is None else max(1, LOSS_CHUNK_VALUES // vocab)
        total = h.new_zeros((), dtype=torch.float32)
        dh = torch.empty_like(h) if grad else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            logits = _times_transposed(h[r0:r1], matrix, dtype).float()  # [rows, V]
            t = targets[r0:r1, None]
            picked, top = logits.gather(1, t), logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place, unnormalized: the logits are not needed again
            sums = probs.sum(1, keepdim=True)
            total += (top + sums.log() - picked).sum()  # log-sum-exp minus the target's logit
            if grad:
                probs.div_(sums).scatter_add_(1, t, probs.new_full(t.shape, -1.0))  # softmax - onehot
                dh[r0:r1] = _times(probs, matrix, dtype)
        ctx.save_for_backward(dh)
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, = ctx.saved_tensors
        return dh * grad, None, None, None


class FrozenLinear(nn.Module):
    """A bias-free linear layer over a frozen weights.Matrix [out, in] (no parameters), multiplied in
    `dtype` (compute_dtype)."""

    def __init__(self, matrix, dtype=torch.float32):
        super().__init__()
        self.matrix = weights.matrix(matrix)
        self.dtype = dtype
        self.out_features, self.in_features = self.matrix.shape

    def forward(self, x):  # [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        return _FrozenMatmul.apply(flat, self.matrix, self.dtype).view(*x.shape[:-1], self.out_features)


class FrozenClassifier(FrozenLinear):
    """The output layer over a frozen weights.Matrix [vocab, dim]; `loss` (model.Classifier's
    interface) fuses the product with the cross-entropy (_FrozenCrossEntropy)."""

    def loss(self, h, targets):  # [N, D] float32, int64 [N] -> summed cross-entropy, float32
        return _FrozenCrossEntropy.apply(h, self.matrix, self.dtype, targets)


class FrozenEmbedding(nn.Module):
    """Token embedding rows looked up in a frozen weights.Matrix [vocab, dim]."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = weights.matrix(matrix)

    def forward(self, tokens):  # int64 [B, T] -> float32 [B, T, dim]
        rows = self.matrix.rows(tokens.detach().cpu().numpy())
        return torch.from_numpy(rows).to(tokens.device).view(*tokens.shape, -1)


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(dropout(x))) for a FrozenLinear base; A [rank, in], B [out,
    rank], PEFT's names. One _LoRAMatmul computes both paths (base's matrix and dtype are read, its
    forward is not called)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT's
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):  # [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        dropped = self.dropout(flat) if self.dropout.p else flat
        y = _LoRAMatmul.apply(flat, dropped, self.lora_A, self.lora_B, self.scale, self.base.matrix, self.base.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def delta(self) -> torch.Tensor:  # the merged update (alpha / rank) B A, [out, in]
        return self.scale * (self.lora_B @ self.lora_A)


def module_path(target: str) -> str:
    """The path of `target`'s linear layer in a train.model Block ("attention.wq")."""
    return LAYER_PARAMS[TARGETS[target]].removesuffix(".weight")


def replace_module(root, path: str, module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def adapters(model):
    """(layer, target, LoRALinear) for every adapted linear layer of the model, in layer order."""
    out = []
    for layer in range(len(model.layers)):
        for target in TARGETS:
            m = model.layers[layer].get_submodule(module_path(target))
            if isinstance(m, LoRALinear):
                out.append((layer, target, m))
    return out
