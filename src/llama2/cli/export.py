"""`llama2 export OUT --hf DIR | --meta-llama DIR | --checkpoint CKPT.pt | --from MODEL [--lora DIR]`:
convert a model to a llama2.c checkpoint (--version 0, 1, 2 exactly as llama2.c writes them; 3, the
default, our extended header), to GGUF (--format gguf) or to a Hugging Face folder (--format hf),
optionally with a LoRA adapter merged in. Tensors stream one at a time.
"""

from ..chat_template import override
from ..export import DEFAULT_GROUP_SIZE, DEFAULT_VERSION, DTYPES, FORMATS, VERSIONS


def register(sub):
    p = sub.add_parser("export", help="convert a Meta, Hugging Face, GGUF or llama2.c model",
                       description=__doc__.split("\n\n")[0].replace("`", ""))
    p.add_argument("out", metavar="OUT", help="the file to write (atomically)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (config.json, "
                     "safetensors or pytorch_model.bin)")
    src.add_argument("--meta-llama", metavar="DIR", help="a Meta checkpoint directory (params.json, "
                     "consolidated.NN.pth)")
    src.add_argument("--checkpoint", metavar="CKPT.pt", help="a llama2.c training checkpoint")
    src.add_argument("--from", dest="source", metavar="MODEL",
                     help="any model llama2 runs: .bin (versions 0-3), .gguf, a Hugging Face directory")
    p.add_argument("--format", choices=FORMATS, default="llama2c", help="output format (default llama2c)")
    p.add_argument("--version", type=int, choices=VERSIONS, default=DEFAULT_VERSION,
                   help="llama2c layout: 0 legacy, 1 fp32, 2 int8 Q8_0 (llama2.c's own); "
                        f"3 extended header (default {DEFAULT_VERSION}); for GGUF, 2 means Q8_0")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", metavar="DTYPE",
                   help="matrix type (default fp32): fp32, fp16, bf16 or q8_0 for --version 3 and "
                        "GGUF; GGUF also q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k and the mixes "
                        "q4_k_m, q5_k_m, quantized as llama.cpp's quantizer does (per tensor as "
                        "its rule says: the classifier in Q6_K, some attn_v/ffn_down in Q6_K)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"Q8_0 group size for llama2c files (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="vocabulary to embed in a GGUF (tokenizer.model, tokenizer.json or "
                        "tokenizer.bin); default: the model's own")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="record this chat template: llama2, chatml, or a Jinja file for a GGUF "
                        "(default: the model's own)")
    p.add_argument("--lora", metavar="DIR", help="merge this LoRA adapter (our or PEFT's folder, or an "
                   "adapter .gguf) into the weights written")
    p.add_argument("--seq-len", type=int, help="context length, for Meta checkpoints whose "
                   "params.json does not give max_seq_len")
    p.set_defaults(func=run)


def open_source(args):
    """The tensor source the flags name."""
    if args.hf is not None:
        from ..formats.hf import HFModel
        return HFModel(args.hf)
    if args.meta_llama is not None:
        from ..formats.meta import open_meta
        return open_meta(args.meta_llama, args.seq_len)
    if args.checkpoint is not None:
        from ..formats.meta import open_train_checkpoint
        return open_train_checkpoint(args.checkpoint, args.seq_len)
    from ..formats import open_source as open_model
    return open_model(args.source)


def run(args, io) -> int:
    from ..errors import UsageError
    from ..export import export, stored_by
    from ..formats import writer

    if args.seq_len is not None and args.seq_len <= 0:
        raise UsageError(f"--seq-len {args.seq_len}: must be positive")
    if args.group_size <= 0:
        raise UsageError(f"--group-size {args.group_size}: must be positive")
    stores = writer(args.format).WRITE_DTYPES
    if args.version == DEFAULT_VERSION and args.dtype not in stores:
        raise UsageError(f"--dtype {args.dtype} needs --format {' or '.join(stored_by(args.dtype))} "
                         f"({writer(args.format).FILES} store {', '.join(stores)})")
    vocab = None
    if args.tokenizer is not None:
        from ..formats.vocab import load_vocab
        vocab = load_vocab(args.tokenizer)
    template = override(args.chat_template) if args.chat_template else None
    source = open_source(args)
    if args.lora is not None:
        from ..export import LoRASource
        source = LoRASource(source, args.lora)
    export(args.out, source, args.format, args.version, args.dtype, args.group_size, vocab,
           template, warn=lambda text: io.err(text + "\n"))
    io.err(f"wrote {args.out}\n")
    return 0
