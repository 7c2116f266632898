"""LoRA over a frozen base in its stored type: the base's matrices stay weights.Matrix views of the
mapped file (F32/F16/BF16 or any quantized type) and are dequantized a tile of rows at a time in the
forward pass and again in the backward pass, never widened whole (QLoRA over the user's own file).

References: Hu et al. 2021, "LoRA" (y = W x + (alpha / r) B A x, B zero at the start, A Kaiming
uniform as PEFT initializes it); Dettmers et al. 2023, "QLoRA" (frozen quantized base).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import weights
from ..weights.base import DEQUANT_TILE
from .model import LAYER_PARAMS
from .options import TARGETS


def _tiles(matrix):  # (r0, r1) row ranges of at most DEQUANT_TILE values each
    rows, cols = matrix.shape
    step = max(1, DEQUANT_TILE // cols)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _dense_rows(matrix, r0, r1, like):  # float32 [r1 - r0, in] on x's device and in x's dtype
    return torch.from_numpy(matrix.rows(np.arange(r0, r1))).to(device=like.device, dtype=like.dtype)


class _FrozenMatmul(torch.autograd.Function):
    """x [N, in] @ W.T -> [N, out] for a frozen weights.Matrix W; backward dequantizes W again."""

    @staticmethod
    def forward(ctx, x, matrix):
        ctx.matrix = matrix
        out = x.new_empty(x.shape[0], matrix.shape[0])
        for r0, r1 in _tiles(matrix):
            out[:, r0:r1] = x @ _dense_rows(matrix, r0, r1, x).T
        return out

    @staticmethod
    def backward(ctx, grad):  # d(x W^T)/dx = grad W; W gets no gradient
        matrix = ctx.matrix
        dx = grad.new_zeros(grad.shape[0], matrix.shape[1])
        for r0, r1 in _tiles(matrix):
            dx += grad[:, r0:r1] @ _dense_rows(matrix, r0, r1, grad)
        return dx, None


class FrozenLinear(nn.Module):
    """A bias-free linear layer over a frozen weights.Matrix [out, in] (no parameters)."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = weights.matrix(matrix)
        self.out_features, self.in_features = self.matrix.shape

    def forward(self, x):  # [..., in] -> [..., out]
        flat = x.reshape(-1, x.shape[-1])
        return _FrozenMatmul.apply(flat, self.matrix).view(*x.shape[:-1], self.out_features)


class FrozenEmbedding(nn.Module):
    """Token embedding rows looked up in a frozen weights.Matrix [vocab, dim]."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = weights.matrix(matrix)

    def forward(self, tokens):  # int64 [B, T] -> float32 [B, T, dim]
        rows = self.matrix.rows(tokens.detach().cpu().numpy())
        return torch.from_numpy(rows).to(tokens.device).view(*tokens.shape, -1)


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(dropout(x))); A [rank, in], B [out, rank], PEFT's names."""

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

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

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
