"""`llama2 data prepare INPUT... --out DIR --tokenizer TOK`: tokenize stories into training shards."""

import inspect

from ..errors import UsageError


def _defaults():
    from ..train import data
    return {k: p.default for k, p in inspect.signature(data.prepare).parameters.items()
            if p.default is not inspect.Parameter.empty}


def register(sub):
    from ..train.stories import BLANK_LINES, STORY_SEPARATOR, TEXT_FIELD
    d = _defaults()
    p = sub.add_parser("data", help="prepare training data",
                       description="Prepare training data for `llama2 train`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    prep = actions.add_parser(
        "prepare", help="tokenize stories into token shards",
        description="Tokenize stories into uint16 (or uint32) token shards with a train/val split. "
                    "INPUT is a text file (stories separated by --separator), a .jsonl or .json file "
                    "of records with a text field, or 'tinystories' to download TinyStories from "
                    "the Hugging Face hub.")
    prep.add_argument("inputs", nargs="+", metavar="INPUT")
    prep.add_argument("--out", required=True, metavar="DIR", help="directory for shards and meta.json")
    prep.add_argument("--tokenizer", "-z", required=True, metavar="TOK",
                      help="sentencepiece .model (fast) or llama2.c tokenizer .bin")
    prep.add_argument("--val", action="append", default=[], metavar="FILE", dest="val_inputs",
                      help="a file of validation stories (repeatable); without it --val-fraction applies")
    prep.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                      help=f"fraction of the stories held out for validation (default {d['val_fraction']})")
    prep.add_argument("--eos", action="store_true", help="append EOS after each story (BOS is always "
                      "put before each story)")
    prep.add_argument("--workers", type=int, default=d["workers"],
                      help="tokenizer processes (default: one per CPU core)")
    prep.add_argument("--shard-tokens", type=int, default=d["shard_tokens"],
                      help=f"tokens per shard (default {d['shard_tokens']:,})")
    prep.add_argument("--separator", default=None,
                      help=f"story separator in text files (default {STORY_SEPARATOR!r}; "
                           f"'{BLANK_LINES}' for blank lines)")
    prep.add_argument("--text-field", default=None,
                      help=f"field holding the text in .jsonl/.json records (default {TEXT_FIELD!r})")
    prep.add_argument("--hub-url", default=d["hub_url"], help="Hugging Face hub address")
    prep.add_argument("--cache-dir", default=None,
                      help="where 'tinystories' is downloaded (default: the llama2 cache folder, "
                         "$LLAMA2_HOME or ~/.cache/llama2, under datasets/TinyStories)")
    prep.set_defaults(func=prepare)


def prepare(args, io) -> int:
    from ..train import data

    if args.workers < 0 or args.shard_tokens <= 0:
        raise UsageError("--workers must be >= 0 and --shard-tokens positive")
    data.prepare(args.inputs, args.out, args.tokenizer, val_inputs=args.val_inputs,
                 val_fraction=args.val_fraction, eos=args.eos, workers=args.workers,
                 shard_tokens=args.shard_tokens, separator=args.separator, text_field=args.text_field,
                 hub_url=args.hub_url, cache_dir=args.cache_dir,
                 log=lambda line: io.err(line + "\n"))
    io.err(f"wrote {args.out}/meta.json\n")
    return 0
