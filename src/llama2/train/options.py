"""Training options: every default lives in these two dataclasses, nowhere else.

Field names are llama2.c train.py's configuration keys, so its users' commands carry over. Values
come from the defaults, then a TOML (or YAML) file, then command-line flags; nothing is exec'd.
"""

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import ModelConfig
from ..errors import Llama2Error, UsageError
from ..fileio import read_user_file


@dataclass
class ModelOptions:
    """The shape of the model to train (defaults: llama2.c's stories15M)."""
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    multiple_of: int = 32  # hidden_dim is rounded up to a multiple of this
    hidden_dim: int = 0  # 0: computed from dim and multiple_of as Llama does
    max_seq_len: int = 256
    vocab_size: int = 0  # 0: the vocabulary size recorded by `llama2 data prepare`
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def resolved_hidden_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        # Llama's SwiGLU sizing: 2/3 of 4*dim, rounded up to a multiple of multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def model_config(self) -> ModelConfig:
        """The inference-side config of the model these options describe (vocab_size resolved)."""
        return ModelConfig(dim=self.dim, hidden_dim=self.resolved_hidden_dim(), n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or self.n_heads,
                           vocab_size=self.vocab_size, seq_len=self.max_seq_len,
                           rope_theta=self.rope_theta, norm_eps=self.norm_eps).validate("model options")


@dataclass
class TrainOptions:
    """How to train (defaults: llama2.c train.py's, except device/dtype/compile chosen for any machine)."""
    data: str = ""  # directory written by `llama2 data prepare`
    tokenizer: str = ""  # tokenizer (.model or .bin) copied to out_dir as tokenizer.bin for `llama2 run`
    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt); --resume sets it
    batch_size: int = 128  # sequences per micro-step per process
    gradient_accumulation_steps: int = 4  # micro-steps per optimizer step, all processes together
    learning_rate: float = 5e-4
    max_iters: int = 100000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    decay_lr: bool = True
    warmup_iters: int = 1000
    lr_decay_iters: int = 0  # 0: max_iters
    min_lr: float = 0.0
    eval_interval: int = 2000
    eval_iters: int = 100
    eval_only: bool = False
    log_interval: int = 1
    always_save_checkpoint: bool = False
    seed: int = 1337
    device: str = "auto"  # "auto": cuda when available, else cpu; or "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that support it, else float16 on GPU, float32 on CPU
    num_threads: int = 0  # CPU threads for torch and our kernels; 0: their defaults (tiny models run best on 1)
    compile: bool = False  # torch.compile the model (slow to start; worth it for long GPU runs)
    peak_flops: float = 312e12  # for MFU: A100 bfloat16 peak, as llama2.c reports it
    backend: str = "auto"  # torch.distributed backend under torchrun: "auto" is nccl on GPU, gloo on CPU
    fsdp: bool = field(default=False, metadata={"help": (
        "under torchrun, shard every weight, gradient and optimizer state across the processes "
        "(torch FSDP) instead of copying the model to each (DDP): for models too big for one GPU "
        "(finetune: with --full). One process trains unsharded; ckpt.pt is the same either way")})
    wandb: bool = False  # also log every step to Weights & Biases (needs wandb installed)
    wandb_project: str = "llama2"

    def lr_at(self, it: int) -> float:
        """Linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
        if not self.decay_lr:
            return self.learning_rate
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        decay_iters = self.lr_decay_iters or self.max_iters
        if it >= decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(1, decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)


SECTIONS = {"model": ModelOptions, "train": TrainOptions}


# --targets' names -> our matrix names (checkpoint.LAYER_MATRICES): every linear layer of a block
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}


@dataclass
class FinetuneOptions:
    """What `llama2 finetune` adds to train's options; every default here."""
    base: str = ""  # any model `llama2 run` loads
    data: tuple = ()  # text, .json or .jsonl files (examples.py)
    val: tuple = ()  # validation files; without them, --val-fraction of the records
    val_fraction: float = 0.1
    max_seq_len: int = 256  # window length (--seq-len); at most the base's context
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: str = ",".join(TARGETS)
    full: bool = False  # every weight (float bases only) instead of LoRA
    checkpointing: bool = False  # recompute each layer in backward (less memory, ~1/3 more time)
    chat_template: str = ""  # for {"messages"} records: llama2, chatml or a Jinja file; "": the model's
    # what the frozen base's matrices are multiplied in: float32, bfloat16, or auto (bfloat16 where the
    # device has bf16 dot products, e.g. AVX512_BF16, and the matrix is not stored in float32)
    base_dtype: str = "auto"


BASE_DTYPES = ("auto", "float32", "bfloat16")


# train's options that finetuning starts from other values of (flags and --config still win):
# small batches, few steps, a short warmup, no weight decay on the adapters (PEFT + TRL's defaults).
TRAIN_DEFAULTS = {"batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
                  "max_iters": 200, "warmup_iters": 10, "eval_interval": 50, "eval_iters": 10,
                  "weight_decay": 0.0, "out_dir": "finetune"}


def check_finetune(fo: FinetuneOptions, train: TrainOptions):
    if train.fsdp and not fo.full:
        raise UsageError("--fsdp shards a full finetune: add --full (LoRA trains small factors "
                         "beside a frozen base; under torchrun without --fsdp they train with DDP)")
    if fo.lora_rank <= 0:
        raise UsageError(f"--lora-rank must be positive, got {fo.lora_rank}")
    if fo.lora_alpha <= 0:
        raise UsageError(f"--lora-alpha must be positive, got {fo.lora_alpha}")
    if not 0.0 <= fo.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {fo.lora_dropout}")
    if not 0.0 <= fo.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {fo.val_fraction}")
    if fo.max_seq_len <= 0:
        raise UsageError(f"--seq-len must be positive, got {fo.max_seq_len}")
    if fo.base_dtype not in BASE_DTYPES:
        raise UsageError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {fo.base_dtype!r}")
    if not fo.data:
        raise UsageError("--data is required: text, .json or .jsonl files")
    parse_targets(fo.targets)


def parse_targets(text: str) -> tuple:
    """--targets "q,k,v" -> ("q", "k", "v"); a one-line error for a name we do not have."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise UsageError(f"--targets {text!r}: expected a comma-separated list of {','.join(TARGETS)}")
    for name in names:
        if name not in TARGETS:
            raise UsageError(f"--targets: unknown target {name!r} (expected some of {','.join(TARGETS)})")
    return names


def all_fields():
    """(section, dataclasses.Field) for every option, model options first."""
    return [(name, f) for name, cls in SECTIONS.items() for f in fields(cls)]


def parse_bool(text) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def field_type(f) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[f.type if isinstance(f.type, str)
                                                               else f.type.__name__]


def coerce(name, f, value, source):
    """Check a value from a config file against the option's type; one-line error naming the key."""
    kind = field_type(f)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          all(isinstance(v, str) for v in value) and isinstance(value, list) if kind is tuple else
          isinstance(value, str))
    if not ok:
        raise Llama2Error(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else tuple(value) if kind is tuple else value


def read_config_file(path, sections=SECTIONS) -> dict:
    """Options from a TOML (or YAML) file: flat keys, or a table per section ([model], [train])."""
    path = Path(path)
    text = read_user_file(path, "config file")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise Llama2Error(f"{path}: YAML config files need PyYAML (pip install pyyaml); "
                              "or write it as TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise Llama2Error(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise Llama2Error(f"{path}: invalid TOML: {e}") from None
    if not isinstance(data, dict):
        raise Llama2Error(f"{path}: expected a table of options, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name: f for cls in sections.values() for f in fields(cls)}
    out = {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name not in known:
            raise Llama2Error(f"{path}: unknown option {key!r}")
        out[name] = coerce(key, known[name], value, str(path))
    return out


def build(overrides: dict) -> tuple:
    """(ModelOptions, TrainOptions) from the defaults with `overrides` (name -> typed value) applied."""
    parts = []
    for cls in SECTIONS.values():
        names = {f.name for f in fields(cls)}
        parts.append(cls(**{k: v for k, v in overrides.items() if k in names}))
    model, train = parts
    check(model, train)
    return model, train


def check(model: ModelOptions, train: TrainOptions):
    """Reject values that cannot work, naming the option."""
    for obj in (model, train):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "batch_size",
                          "gradient_accumulation_steps", "eval_interval", "log_interval") and value <= 0:
                raise UsageError(f"--{f.name} must be positive, got {value}")
            if f.name in ("n_kv_heads", "hidden_dim", "vocab_size", "max_iters", "eval_iters",
                          "warmup_iters", "lr_decay_iters", "num_threads") and value < 0:
                raise UsageError(f"--{f.name} must not be negative, got {value}")
    if not 0.0 <= model.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {model.dropout}")
    if train.init_from not in ("scratch", "resume"):
        raise UsageError(f"--init_from must be 'scratch' or 'resume', got {train.init_from!r}")
    if train.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {train.dtype!r}")
    if train.backend not in ("auto", "gloo", "nccl"):
        raise UsageError(f"--backend must be auto, gloo or nccl, got {train.backend!r}")


def to_dict(model: ModelOptions, train: TrainOptions) -> dict:
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}


def from_dict(d: dict) -> tuple:
    return ModelOptions(**d["model"]), TrainOptions(**d["train"])


__all__ = ["ModelOptions", "TrainOptions", "FinetuneOptions", "TARGETS", "parse_targets", "build", "read_config_file", "all_fields", "parse_bool",
           "to_dict", "from_dict"]
