"""`llama2 tokenizer ACTION`: tokenizer files. Each action is a module `tokenizer_<action>.py` of this
package with `register(actions)`, so actions are added without touching each other."""

import importlib

ACTIONS = ("export",)


def register(sub):
    p = sub.add_parser("tokenizer", help="tokenizer files: export",
                       description="Work with tokenizer files.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True,
                               parser_class=type(p))
    for name in ACTIONS:
        importlib.import_module(f".tokenizer_{name}", __package__).register(actions)
