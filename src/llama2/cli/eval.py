"""`llama2 eval MODEL TEXT -z TOKENIZER`: perplexity of a model on a text file (no torch)."""

import inspect


def register(sub):
    from ..evaluate import score
    from ..train.stories import STORY_SEPARATOR
    max_tokens = inspect.signature(score).parameters["max_tokens"].default
    p = sub.add_parser("eval", help="perplexity of a model on a text file",
                       description="Report the mean loss and perplexity of MODEL on the stories of "
                                   "TEXT (BOS before each story), scored by our inference engine.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("text", metavar="TEXT", help="a text, .jsonl or .json file of stories")
    p.add_argument("-z", "--tokenizer", default=None, help="tokenizer.bin (default: beside MODEL)")
    p.add_argument("--separator", default=None,
                   help=f"story separator in text files (default {STORY_SEPARATOR!r}; 'blank' for "
                        "blank lines)")
    p.add_argument("--text-field", default=None, help="text field of .jsonl/.json records")
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="score at most this many tokens (default 0: all)")
    p.set_defaults(func=run)


def run(args, io) -> int:
    from ..evaluate import score
    from ..llama import Llama
    from ..train.stories import read_stories

    llama = Llama.load(args.model, args.tokenizer)
    ids = []
    for story in read_stories(args.text, args.separator, args.text_field):
        ids += llama.encode(story, bos=True)
        if args.max_tokens and len(ids) > args.max_tokens:
            break
    s = score(llama, ids, args.max_tokens)
    io.out(f"tokens {s.tokens}\nloss {s.loss:.4f}\nperplexity {s.perplexity:.4f}\n".encode())
    return 0
