"""`llama2 bench ACTION`: benchmarks that report ratios against a peer measured in the same run.

    llama2 bench serve MODEL [-z TOKENIZER] [--gguf FILE] [--streams 1,4,8,16]
"""

ACTIONS = {"serve": "llama2.benchmarks.serve"}  # action -> module with add_arguments and run


def register(sub):
    import importlib

    p = sub.add_parser("bench", help="measure speed against a peer", description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    for name, module in ACTIONS.items():
        # the modules import only the standard library at the top: cheap to load for --help
        mod = importlib.import_module(module)
        a = actions.add_parser(name, help=(mod.__doc__ or "").split("\n")[0],
                               description=(mod.__doc__ or "").split("\n\n")[0])
        mod.add_arguments(a)
        a.set_defaults(func=mod.run)
