"""`llama2 tokenizer ACTION`: work with tokenizers.

This module holds the `train` action (issue 5); the lead merges other actions (export) beside it.
"""

from ..errors import UsageError


def register(sub):
    p = sub.add_parser("tokenizer", help="train tokenizers",
                       description="Train and convert tokenizers.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    register_train(actions)
    p.set_defaults(func=_missing_action)


def _missing_action(args, io):
    raise UsageError("tokenizer: choose an action: train")


# ---- llama2 tokenizer train ---------------------------------------------------------------------

def register_train(actions):
    import inspect

    from ..train.tokenizer import train_tokenizer
    d = {k: p.default for k, p in inspect.signature(train_tokenizer).parameters.items()}
    t = actions.add_parser(
        "train", help="train a sentencepiece BPE tokenizer on raw text",
        description="Train a sentencepiece BPE tokenizer (byte fallback, digits split, identity "
                    "normalization, as llama2.c) on stories; write PREFIX.model and PREFIX.bin "
                    "(llama2.c tokenizer.bin format).")
    t.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text, .jsonl or .json files, read as `llama2 data prepare` reads them")
    t.add_argument("--vocab-size", "--vocab_size", type=int, required=True, metavar="N")
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.bin")
    t.add_argument("--separator", default=None, help="story separator in text files")
    t.add_argument("--text-field", default=None, help="text field of .jsonl/.json records")
    t.add_argument("--max-sentences", type=int, default=d["max_sentences"],
                   help=f"lines sampled for training (default {d['max_sentences']:,})")
    t.set_defaults(func=train)


def train(args, io) -> int:
    from ..train.tokenizer import train_tokenizer

    model, bin_ = train_tokenizer(args.inputs, args.vocab_size, args.out, separator=args.separator,
                                  text_field=args.text_field, max_sentences=args.max_sentences)
    io.err(f"wrote {model} and {bin_}\n")
    return 0
