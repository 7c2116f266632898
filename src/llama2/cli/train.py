"""`llama2 train`: train a model with PyTorch (flags or a TOML/YAML file; llama2.c train.py's keys).

Every option is a field of llama2.train.options' dataclasses; this module only turns them into
flags (`--max_iters` and `--max-iters` alike; booleans take `--compile`, `--compile=False`).
"""

import argparse

from ..errors import Llama2Error, UsageError


def _bool(text):
    from ..train.options import parse_bool
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub):
    from ..train import options

    p = sub.add_parser("train", help="train a model (PyTorch)",
                       description="Train a Llama 2 model on data from `llama2 data prepare`. Options "
                                   "come from the defaults, then --config FILE, then flags. Writes "
                                   "OUT_DIR/ckpt.pt and OUT_DIR/model.bin on each improvement. "
                                   "Launch with torchrun for several processes (DDP, or FSDP "
                                   "with --fsdp).")
    p.add_argument("--config", metavar="FILE", help="TOML (or YAML) file of options")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/ckpt.pt (same as --init_from=resume)")
    add_option_flags(p, options.all_fields())
    p.set_defaults(func=run)


def add_option_flags(p, fields, aliases=None, defaults=None):
    """A flag per option field (`--max_iters` and `--max-iters`; booleans take `--compile`,
    `--compile=False`), default SUPPRESS so that only given flags override. `aliases`: field name ->
    more flag names; `defaults`: field name -> the default the help shows, where not the field's."""
    from ..train import options

    for section, f in fields:
        kind = options.field_type(f)
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        names += (aliases or {}).get(f.name, [])
        group_help = f"{section} option (default {(defaults or {}).get(f.name, f.default)!r})"
        if "help" in f.metadata:
            group_help = f"{f.metadata['help']} ({group_help})"
        if kind is bool:
            p.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True,
                           default=argparse.SUPPRESS, metavar="BOOL", help=group_help)
        else:
            p.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=group_help)


def resolve(args) -> tuple:
    """(ModelOptions, TrainOptions) from defaults < config file < flags; on resume the checkpoint's
    options replace the defaults and its model shape cannot be changed."""
    from ..train import options

    given = {name: value for name, value in vars(args).items()
             if name in {f.name for _, f in options.all_fields()}}
    values = options.read_config_file(args.config) if args.config else {}
    values.update(given)
    if args.resume:
        values["init_from"] = "resume"
    if values.get("init_from") == "resume":
        _need_torch()
        from ..train.trainer import read_checkpoint
        out_dir = values.get("out_dir", options.TrainOptions.out_dir)
        saved = read_checkpoint(out_dir)["options"]
        for name, value in saved["model"].items():
            if name in values and values[name] != value and not (name == "vocab_size" and not values[name]):
                raise Llama2Error(f"--{name} {values[name]} differs from the checkpoint's {value}; "
                                  "the model's shape cannot change when resuming")
        merged = {**saved["model"], **saved["train"]}
        merged.update({k: v for k, v in values.items() if k not in saved["model"]})
        values = merged
    try:
        return options.build(values)
    except TypeError as e:
        raise UsageError(str(e)) from None


def _need_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise Llama2Error("training needs PyTorch: pip install torch") from None


def run(args, io) -> int:
    model_opts, train_opts = resolve(args)
    _need_torch()
    from ..train.trainer import train

    result = train(model_opts, train_opts, log=lambda line: io.err(line + "\n"))
    if result.evals:
        io.err(f"best val loss {result.best_val_loss:.4f} after {result.iter_num} iterations\n")
    return 0
