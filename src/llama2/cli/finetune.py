"""`llama2 finetune BASE --data FILE... --out DIR`: LoRA (default) or a full finetune of any model
`llama2 run` loads, with `llama2 train`'s loop and options (same names, --config FILE, --resume).
"""

import argparse
from dataclasses import fields

from ..errors import Llama2Error, UsageError
from .train import _need_torch, add_option_flags

# train's options that finetune does not take: the data is --data FILE..., not a prepared directory
NOT_TAKEN = ("data", "init_from")


def register(sub):
    from ..train import options
    from ..train.options import TRAIN_DEFAULTS, FinetuneOptions

    p = sub.add_parser("finetune", help="finetune a model: LoRA, QLoRA on its own file, or full (PyTorch)",
                       description=__doc__.split("\n\n")[0].replace("`", ""))
    p.add_argument("base", metavar="BASE", help="any model llama2 run loads (.bin, .gguf, HF folder)")
    p.add_argument("--config", metavar="FILE", help="TOML (or YAML) file of options ([train], [finetune])")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--data", nargs="+", metavar="FILE", default=argparse.SUPPRESS,
                   help="training data: text files (cut as `llama2 data prepare` does), .json, or .jsonl "
                        'of {"text"}, {"prompt", "completion"} or {"messages"} records')
    p.add_argument("--val", nargs="+", metavar="FILE", default=argparse.SUPPRESS,
                   help="validation data (default: --val-fraction of the records)")
    own = [("finetune", f) for f in fields(FinetuneOptions) if f.name not in ("base", "data", "val")]
    add_option_flags(p, own, {"max_seq_len": ["--seq-len", "--seq_len"]})
    train_fields = [(s, f) for s, f in options.all_fields() if s == "train" and f.name not in NOT_TAKEN]
    add_option_flags(p, train_fields, {"out_dir": ["--out"]}, TRAIN_DEFAULTS)
    p.set_defaults(func=run)


def resolve(args) -> tuple:
    """(FinetuneOptions, TrainOptions): defaults (train's with TRAIN_DEFAULTS) < --config < flags;
    on --resume, the checkpoint's options replace the defaults and the finetune ones cannot change."""
    import dataclasses

    from ..train import options
    from ..train.options import TRAIN_DEFAULTS, FinetuneOptions

    sections = {"train": options.TrainOptions, "finetune": FinetuneOptions}
    given = {k: v for k, v in vars(args).items()
             if k in {f.name for cls in sections.values() for f in fields(cls)}}
    given["base"] = args.base
    values = dict(TRAIN_DEFAULTS)
    if args.config:
        values.update(options.read_config_file(args.config, sections))
    values.update(given)
    for key in ("data", "val"):
        if key in values:
            values[key] = tuple(values[key])
    if args.resume:
        _need_torch()
        from ..train.trainer import read_checkpoint
        out_dir = values.get("out_dir")
        saved = read_checkpoint(out_dir)["options"]
        if "finetune" not in saved:
            raise Llama2Error(f"{out_dir}: ckpt.pt was written by `llama2 train`, not `llama2 finetune`")
        for name, value in saved["finetune"].items():
            if name in given and name not in ("base", "data", "val") and given[name] != value:
                raise UsageError(f"--{name.replace('_', '-')} {given[name]} differs from the checkpoint's "
                                 f"{value}; it cannot change when resuming")
        merged = {**saved["train"], **{k: v for k, v in saved["finetune"].items()}}
        merged.update({k: v for k, v in values.items() if k in given and k not in saved["finetune"]})
        merged["init_from"] = "resume"
        values = merged
    own = {f.name for f in fields(FinetuneOptions)}
    train_names = {f.name for f in fields(options.TrainOptions)} - own
    try:
        fo = FinetuneOptions(**{k: v for k, v in values.items() if k in own})
        t = options.TrainOptions(**{k: v for k, v in values.items() if k in train_names})
    except TypeError as e:
        raise UsageError(str(e)) from None
    options.check(options.ModelOptions(), t)  # finetune's own options: checked by build_job
    return fo, dataclasses.replace(t)


def run(args, io) -> int:
    fo, t = resolve(args)
    _need_torch()
    from ..train.finetune import finetune

    result = finetune(fo, t, log=lambda line: io.err(line + "\n"))
    if result.evals:
        io.err(f"best val loss {result.best_val_loss:.4f} after {result.iter_num} iterations\n")
    return 0
