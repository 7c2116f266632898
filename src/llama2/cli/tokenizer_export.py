"""`llama2 tokenizer export TOKENIZER [-o OUT]`: write llama2.c's tokenizer.bin from a sentencepiece
.model (byte-identical to llama2.c's tokenizer.py), a Hugging Face tokenizer.json (or a model
directory holding either), or a GGUF."""

from pathlib import Path


def register(actions):
    p = actions.add_parser("export", help="write a llama2.c tokenizer.bin",
                           description=__doc__.split("\n\n")[0].replace("`", ""))
    p.add_argument("tokenizer", metavar="TOKENIZER",
                   help="tokenizer.model, tokenizer.json, a model directory with one, or a .gguf")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="where to write (default: TOKENIZER with the suffix .bin, as tokenizer.py; "
                        "required for a .gguf)")
    p.set_defaults(func=run)


def run(args, io) -> int:
    from ..errors import FormatError, UsageError
    from ..formats.vocab import load_vocab, write_bin

    src = Path(args.tokenizer)
    if src.is_dir():  # a Hugging Face model directory: its own tokenizer file
        found = [src / n for n in ("tokenizer.model", "tokenizer.json") if (src / n).is_file()]
        if not found:
            raise FormatError(f"{src}: no tokenizer.model or tokenizer.json in this directory")
        src = found[0]
    is_gguf = src.is_file() and src.open("rb").read(4) == b"GGUF"
    if is_gguf and not args.output:  # model.gguf -> model.bin could be taken for a checkpoint
        raise UsageError(f"{src}: pass -o OUT for the tokenizer.bin to write")
    out = Path(args.output) if args.output else src.with_suffix(".bin")
    if out.resolve() == src.resolve():
        raise UsageError(f"{src}: output would overwrite the input; pass -o OUT")
    if is_gguf:
        from ..formats.gguf import read, vocab_from_metadata
        vocab = vocab_from_metadata(read(src)[0])
        if vocab is None:
            raise FormatError(f"{src}: GGUF carries no sentencepiece-style (llama) vocabulary")
    else:
        vocab = load_vocab(src)
    write_bin(out, vocab)
    io.err(f"wrote {out} ({len(vocab)} tokens)\n")
    return 0
