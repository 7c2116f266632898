"""The Llama 2 transformer in PyTorch, for training: the same math as our inference engine and run.c.

RMSNorm, rotary embeddings on adjacent pairs (x[2i], x[2i+1]) as run.c rotates them, grouped-query
attention, SwiGLU feed-forward, classifier tied to the token embedding (or its own, for bases that have one). No KV cache: training and
teacher-forced scoring only (generation here is a slow reference that recomputes the prefix).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from .. import rope
from ..config import ModelConfig
from .examples import IGNORE

# our per-layer tensor name (checkpoint.STACKED) -> the parameter's path in a Block
LAYER_PARAMS = {
    "rms_att": "attention_norm.weight", "wq": "attention.wq.weight", "wk": "attention.wk.weight",
    "wv": "attention.wv.weight", "wo": "attention.wo.weight", "rms_ffn": "ffn_norm.weight",
    "w1": "feed_forward.w1.weight", "w2": "feed_forward.w2.weight", "w3": "feed_forward.w3.weight",
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # [..., D] -> [..., D], computed in float32 for stability under autocast
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_buffers(config: ModelConfig):  # -> cos, sin: float32 tensors [seq_len, head_dim/2]
    """The model's RoPE tables from llama2.rope, the one record the inference kernels read too
    (so a base with Llama 3.1's scaling trains with the angles it runs with)."""
    cos, sin = rope.tables(config)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x, cos, sin, halves=False):  # [B, T, H, hd], [T, hd/2], [T, hd/2] -> [B, T, H, hd]
    """Rotate pairs (x[2i], x[2i+1]); with `halves`, Hugging Face's pairs (x[i], x[i + hd/2]), so
    a base loaded in HF's q/k layout (config.rope_style "halves") trains without un-permuting."""
    if halves:
        x0, x1 = x.float().chunk(2, dim=-1)
    else:
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # even and odd lanes, [B, T, H, hd/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    pair = (x0 * cos - x1 * sin, x0 * sin + x1 * cos)
    out = torch.cat(pair, dim=-1) if halves else torch.stack(pair, dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dropout: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.halves = c.rope_style == "halves"
        self.wq = nn.Linear(c.dim, c.dim, bias=False)
        self.wk = nn.Linear(c.dim, c.kv_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.kv_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cos, sin):  # [B, T, D] -> [B, T, D]
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin, self.halves), apply_rope(k, cos, sin, self.halves)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd], k and v [B, kv heads, T, hd]
        # grouped-query attention (each kv head serves a group of query heads) inside the kernel:
        # no widened copies of k and v kept for backward
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b, keeping a and b for backward and recomputing silu(a) there: torch's silu and
    mul keep silu(a) as well, a third [.., hidden] tensor a layer (the product itself is kept by
    w2, whose input it is). The gradients are torch's own: silu_backward of g * b, and g * silu(a)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(g * b, a), g * F.silu(a)


class FeedForward(nn.Module):
    def __init__(self, c: ModelConfig, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.w2 = nn.Linear(c.hidden_dim, c.dim, bias=False)
        self.w3 = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        return self.dropout(self.w2(_SwiGLU.apply(self.w1(x), self.w3(x))))


class Classifier(nn.Linear):
    """The output layer, weight [vocab, dim]. Its `loss` is the one interface the model's loss goes
    through, so a frozen classifier (lora.FrozenClassifier) can fuse the product with the loss."""

    def __init__(self, c: ModelConfig):
        super().__init__(c.dim, c.vocab_size, bias=False)

    def loss(self, h, targets):  # [N, D], int64 [N] -> summed cross-entropy, float32
        return F.cross_entropy(self(h).float(), targets, reduction="sum")


class Block(nn.Module):
    def __init__(self, c: ModelConfig, dropout: float):
        super().__init__()
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention = Attention(c, dropout)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.feed_forward = FeedForward(c, dropout)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float = 0.0, init: bool = True):
        """init False: the weights are left uninitialized, for a caller that replaces every one
        (finetune.lora_model, on the meta device, where a normal_ would load torch's Python meta
        kernels: some 800 modules, 65 MB of the process's memory)."""
        super().__init__()
        self.config = config
        self.checkpointing = False  # recompute each layer in backward (torch.utils.checkpoint)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, **(
            {} if init else {"_weight": torch.empty(config.vocab_size, config.dim)}))  # no normal_
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(config, dropout) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Classifier(config)
        if config.shared_classifier:
            self.output.weight = self.tok_embeddings.weight  # tied classifier, as llama2.c's models
        cos, sin = rope_buffers(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init:
            self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, 0.02) weights; the projections that write into the residual stream (wo, w2)
        scaled down by sqrt(2 * n_layers) so the stream's variance does not grow with depth (GPT-2)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, tokens, targets=None):
        """tokens int64 [B, T] -> logits [B, T, V]; with targets [B, T] -> the mean loss (no logits:
        a frozen classifier never builds them whole)."""
        T = tokens.shape[1]
        x = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            if self.checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        h = self.norm(x)
        if targets is None:
            return self.output(h)
        h, flat = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        counted = flat != IGNORE  # IGNORE: not trained on (finetuning masks prompts); no logits for those
        if not bool(counted.all()):
            h, flat = h[counted], flat[counted]
        # the mean over the targets that count; 0 rather than NaN for a window with none
        return self.output.loss(h, flat) / max(1, flat.numel())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per parameter plus attention's 12 * L * D * T (PaLM, app. B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layers * c.dim * c.seq_len

    @torch.no_grad()
    def generate_greedy(self, ids, steps):  # list[int] -> list[int] of the `steps` next tokens
        out = list(ids)
        for _ in range(steps):
            window = torch.tensor([out[-self.config.seq_len:]], dtype=torch.long,
                                  device=self.tok_embeddings.weight.device)
            out.append(int(self(window)[0, -1].argmax()))
        return out[len(ids):]

    # ---- conversion to and from our checkpoint format (llama2.c .bin) ----

    def export_weights(self) -> dict:
        """name -> float32 numpy array in formats.llama2c.write's layout (stacked per layer, [out, in])."""
        def stack(path):
            return torch.stack([b.get_parameter(path).detach().float().cpu() for b in self.layers]).numpy()

        out = {name: stack(path) for name, path in LAYER_PARAMS.items()}
        out["token_embedding"] = self.tok_embeddings.weight.detach().float().cpu().numpy()
        out["rms_final"] = self.norm.weight.detach().float().cpu().numpy()
        if not self.config.shared_classifier:
            out["wcls"] = self.output.weight.detach().float().cpu().numpy()
        return out

    @torch.no_grad()
    def load_weights(self, tensor):
        """Set every weight from `tensor(name, layer) -> float32 array` (export.py's source form)."""
        def put(param, array):
            param.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))  # a copy: maps are read-only

        for name, path in LAYER_PARAMS.items():
            for layer, block in enumerate(self.layers):
                put(block.get_parameter(path), tensor(name, layer))
        put(self.tok_embeddings.weight, tensor("token_embedding"))
        put(self.norm.weight, tensor("rms_final"))
        if not self.config.shared_classifier:
            put(self.output.weight, tensor("wcls"))
