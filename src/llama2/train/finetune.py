"""`llama2 finetune`: adapt any model `llama2 run` loads to a user's data, with `llama2 train`'s own loop
(trainer.fit). LoRA by default over the base in its stored type (lora.py), or a full finetune of a
float base. Outputs: PEFT's and llama.cpp's adapter files (formats/adapter.py), or a GGUF model.
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .. import formats, weights
from ..chat_template import override
from ..errors import Llama2Error, UsageError
from ..formats import adapter as adapter_files
from ..formats.hf import unpermute
from . import trainer
from .examples import Packed, read_examples, split
from .lora import FrozenClassifier, FrozenEmbedding, FrozenLinear, LoRALinear, adapters, compute_dtype, module_path, replace_module
from .options import TARGETS, FinetuneOptions, check_finetune, parse_targets
from .model import Transformer, rope_buffers

FULL_MODEL = "model.gguf"


def base_tokenizer(ckpt, tokenizer_path):
    """The base's own tokenizer, else the one --tokenizer names (llama2.c .bin files have none)."""
    if tokenizer_path:
        from ..tokenizer import Tokenizer
        return Tokenizer.load(tokenizer_path, vocab_size=ckpt.config.vocab_size)
    if ckpt.tokenizer is None:
        raise UsageError(f"{ckpt.path}: the model carries no tokenizer; pass --tokenizer FILE")
    return ckpt.tokenizer


def lora_model(ckpt, seq_len, targets, rank, alpha, dropout, base_dtype, device) -> Transformer:
    """The base as a Transformer whose matrices are frozen views of the file (FrozenLinear,
    multiplied as `base_dtype` says on `device`: lora.compute_dtype) and whose `targets` carry LoRA
    factors; norms copied (small), nothing else widened."""
    def frozen(value, kind=FrozenLinear):
        matrix = weights.matrix(value)
        return kind(matrix, compute_dtype(base_dtype, matrix, device))

    c = dataclasses.replace(ckpt.config, seq_len=seq_len)
    with torch.device("meta"):  # the shapes only; every tensor is replaced below
        model = Transformer(c, init=False)
    w = ckpt.weights
    model.tok_embeddings = FrozenEmbedding(w["token_embedding"])
    model.output = frozen(ckpt.classifier, FrozenClassifier)
    model.norm.weight = _frozen(w["rms_final"])
    for layer, block in enumerate(model.layers):
        block.attention_norm.weight = _frozen(w["rms_att"][layer])
        block.ffn_norm.weight = _frozen(w["rms_ffn"][layer])
        for target, name in TARGETS.items():
            module = frozen(w[name][layer])
            if target in targets:
                module = LoRALinear(module, rank, alpha, dropout)
            replace_module(block, module_path(target), module)
    cos, sin = rope_buffers(c)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    return model


def _frozen(array):
    return torch.nn.Parameter(torch.tensor(np.asarray(array, dtype=np.float32)), requires_grad=False)


def check_float(ckpt):
    stored = {m.NAME for v in ckpt.weights.values() for m in (v if isinstance(v, list) else [v])
              if isinstance(m, weights.Matrix)}
    quantized = sorted(k for k in stored if not weights.module(k).Matrix.STORES_FLOATS)
    if quantized:
        raise UsageError(f"--full needs a float base; {ckpt.path} stores {', '.join(quantized)} "
                         "(finetune it with LoRA, the default)")


def full_model(ckpt, seq_len) -> Transformer:
    """The base as an ordinary float32 Transformer (every weight trained)."""
    check_float(ckpt)
    model = Transformer(dataclasses.replace(ckpt.config, seq_len=seq_len))
    model.load_weights(lambda name, layer=None: weights.dense(
        ckpt.weights[name][layer] if layer is not None else ckpt.weights[name]))
    return model


def factors(model) -> dict:
    """(our matrix name, layer) -> (A [r, in], B [out, r]) float32, q/k rows in the interleaved RoPE
    layout (formats/adapter.py's canonical form) whatever layout the base had."""
    c = model.config
    out = {}
    for layer, target, m in adapters(model):
        name = TARGETS[target]
        a = m.lora_A.detach().float().cpu().numpy()
        b = m.lora_B.detach().float().cpu().numpy()
        if c.rope_style == "halves" and name in ("wq", "wk"):
            b = unpermute(b, c.n_heads if name == "wq" else c.n_kv_heads)
        out[name, layer] = (a, b)
    return out


def build_job(fo: FinetuneOptions, t, dist, log) -> trainer.Job:
    check_finetune(fo, t)
    ckpt = formats.load_checkpoint(fo.base)
    if fo.full:
        check_float(ckpt)
    c = ckpt.config
    tokenizer = base_tokenizer(ckpt, t.tokenizer)
    seq_len = min(fo.max_seq_len, c.seq_len)
    template = override(fo.chat_template, "--chat-template") if fo.chat_template else ckpt.chat_template
    examples = [ex for path in fo.data for ex in read_examples(path, tokenizer, template)]
    if fo.val:
        train_ex, val_ex = examples, [ex for p in fo.val for ex in read_examples(p, tokenizer, template)]
    else:
        train_ex, val_ex = split(examples, fo.val_fraction)
    if not val_ex and t.eval_iters:
        raise Llama2Error(f"no validation records ({len(examples)} records, --val-fraction "
                          f"{fo.val_fraction}): give --val FILE, a larger --val-fraction, or --eval_iters 0")
    pad = c.eos_id
    train_batches = Packed(train_ex, seq_len, pad, "training data")
    val_batches = Packed(val_ex, seq_len, pad, "validation data") if val_ex else None
    log(f"data: {len(train_ex)} training examples ({train_batches.tokens} trained tokens), "
        f"{len(val_ex)} validation examples")
    device = trainer.device_for(t, dist)
    torch.manual_seed(t.seed)  # the same adapter initialization in every process
    out_dir = Path(t.out_dir)
    targets = parse_targets(fo.targets)
    options = {"finetune": dataclasses.asdict(fo), "train": dataclasses.asdict(t)}
    if fo.full:
        model = trainer.place(full_model(ckpt, seq_len), t, dist)  # sharded with --fsdp

        def save_outputs(directory, raw):
            source = _ModelSource(raw, ckpt)
            formats.writer("gguf").write(directory / FULL_MODEL, source.config, source.tensor,
                                         ckpt.vocab, "fp32", ckpt.chat_template)

        saved, describe = FULL_MODEL, f"full finetune of {fo.base}, {model.num_params() / 1e6:.2f}M parameters"
    else:
        model = lora_model(ckpt, seq_len, targets, fo.lora_rank, fo.lora_alpha, fo.lora_dropout, fo.base_dtype,
                           device).to(device)

        def save_outputs(directory, raw):
            adapter_files.write(directory, c, factors(raw), fo.lora_rank, fo.lora_alpha,
                                fo.lora_dropout, base=str(fo.base))

        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        saved = f"{adapter_files.PEFT_WEIGHTS}, {adapter_files.PEFT_CONFIG}, {adapter_files.GGUF}"
        products = sorted({str(m.dtype).removeprefix("torch.") for m in model.modules()
                           if isinstance(m, FrozenLinear)})
        describe = (f"LoRA rank {fo.lora_rank} on {','.join(targets)} of {fo.base} "
                    f"({ckpt.dtype}, multiplied in {' and '.join(products)}), "
                    f"{n / 1e6:.3f}M trainable parameters")
    model.checkpointing = fo.checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops = 6 * sum(p.numel() for p in trainable) + 4 * _base_params(c) + 12 * c.n_layers * c.dim * seq_len
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)

    def state_dict(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(model, state):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != set(params) or any(state[n].shape != params[n].shape for n in params):
            raise Llama2Error(f"{out_dir / trainer.CKPT}: its weights do not fit this model "
                              "(another base, rank or --targets?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    return trainer.Job(model, train_batches, val_batches, options, seq_len, flops, describe,
                       save_outputs, saved, state_dict, load_state_dict)


def _base_params(c) -> int:  # multiply-adds per token through the frozen matrices (forward + backward)
    return c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * c.kv_dim + 3 * c.dim * c.hidden_dim) \
        + c.vocab_size * c.dim


class _ModelSource:
    """A trained Transformer as an export source (float32, our interleaved q/k layout)."""

    def __init__(self, model, ckpt):
        self.weights = model.export_weights()
        self.halves = model.config.rope_style == "halves"
        self.config = dataclasses.replace(ckpt.config, rope_style="interleaved")

    def tensor(self, name, layer=None):
        w = self.weights[name]
        w = w[layer] if layer is not None else w
        c = self.config
        if self.halves and name in ("wq", "wk"):
            w = unpermute(w, c.n_heads if name == "wq" else c.n_kv_heads)
        return w


def finetune(fo: FinetuneOptions, t, log=print, progress=None) -> trainer.Result:
    return trainer.run(lambda dist, say: build_job(fo, t, dist, say), t, log, progress)
