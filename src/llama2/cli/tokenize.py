"""`llama2 tokenize -z TOKENIZER TEXT`: print the token ids run.c's encoder gives for TEXT (or, for
a byte-level BPE tokenizer.json or tiktoken tokenizer.model, the ids the `tokenizers` library gives)."""

from ..config import DEFAULT_TOKENIZER


def register(sub):
    p = sub.add_parser("tokenize", help="print the token ids of a text",
                       description="Print the ids of TEXT, as run.c's encode(text, bos, eos).")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-z", "--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer.bin, or a byte-level BPE tokenizer.json or tiktoken tokenizer.model "
                        f"(default {DEFAULT_TOKENIZER})")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    p.add_argument("--eos", action="store_true", help="append EOS")
    p.add_argument("--pieces", action="store_true", help="one 'id<TAB>piece' line per token")
    p.set_defaults(func=run)


def run(args, io) -> int:
    from .. import hub
    from ..formats.vocab import load_vocab
    from ..tokenizer import Tokenizer

    path = hub.resolve(args.tokenizer, what="tokenizer")
    vocab = load_vocab(path)
    tok = vocab.tokenizer(str(path)) if vocab.model == "gpt2" else Tokenizer.load(path)
    ids = tok.encode(args.text, bos=not args.no_bos, eos=args.eos)
    if args.pieces:
        for i in ids:
            io.out(f"{i}\t".encode() + tok.pieces[i].replace(b"\n", b"\\n") + b"\n")
    else:
        io.out((" ".join(map(str, ids)) + "\n").encode())
    return 0
