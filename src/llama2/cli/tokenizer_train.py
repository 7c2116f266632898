"""`llama2 tokenizer train INPUT... --vocab-size N --out PREFIX`: train a sentencepiece BPE tokenizer
(byte fallback, digits split, identity normalization, as llama2.c) and write PREFIX.model and
PREFIX.bin (llama2.c tokenizer.bin)."""

import inspect


def register(actions):
    from ..train.tokenizer import train_tokenizer
    d = {k: p.default for k, p in inspect.signature(train_tokenizer).parameters.items()}
    t = actions.add_parser("train", help="train a sentencepiece BPE tokenizer on raw text",
                           description=__doc__.split("\n\n")[0].replace("`", ""))
    t.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text, .jsonl or .json files, read as `llama2 data prepare` reads them")
    t.add_argument("--vocab-size", "--vocab_size", type=int, required=True, metavar="N")
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.bin")
    t.add_argument("--separator", default=None, help="story separator in text files")
    t.add_argument("--text-field", default=None, help="text field of .jsonl/.json records")
    t.add_argument("--max-sentences", type=int, default=d["max_sentences"],
                   help=f"lines sampled for training (default {d['max_sentences']:,})")
    t.set_defaults(func=run)


def run(args, io) -> int:
    from ..train.tokenizer import train_tokenizer

    model, bin_ = train_tokenizer(args.inputs, args.vocab_size, args.out, separator=args.separator,
                                  text_field=args.text_field, max_sentences=args.max_sentences)
    io.err(f"wrote {model} and {bin_}\n")
    return 0
