"""The training loop: AdamW with warmup and cosine decay, gradient accumulation, autocast on GPU,
evaluation, checkpoints (`ckpt.pt`) and export (`model.bin`), resume, and DDP (or FSDP, fsdp.py)
under torchrun.

Reproducibility: a micro-batch's windows depend only on (seed, iteration, micro-step), the schedule
only on the iteration, and ckpt.pt carries optimizer and RNG state, so on CPU a resumed run equals an
uninterrupted one bit for bit, and N processes see exactly the batches one process would.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats import llama2c
from ..errors import Llama2Error
from ..fileio import atomic_write
from ..threads import set_threads
from . import fsdp
from . import options as opts
from .data import TokenData
from .model import Transformer

CKPT = "ckpt.pt"
MODEL_BIN = "model.bin"
TOKENIZER_BIN = "tokenizer.bin"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
TRAIN, EVAL_TRAIN, EVAL_VAL = 0, 1, 2  # the "purpose" part of a batch's random seed


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    mesh: object = None  # with --fsdp in a job of 2 or more: the DeviceMesh FSDP shards over

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


@dataclass
class Result:
    iter_num: int
    best_val_loss: float
    evals: list = field(default_factory=list)  # dicts: iter, train_loss, val_loss
    losses: list = field(default_factory=list)  # dicts: iter, loss, lr, tokens_per_s, mfu


def read_checkpoint(out_dir) -> dict:
    path = Path(out_dir) / CKPT
    if not path.exists():
        raise Llama2Error(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: torch raises many kinds
        raise Llama2Error(f"{path}: cannot read checkpoint: {str(e).splitlines()[0]}") from None


def load_model(out_dir) -> Transformer:
    """The model of OUT_DIR/ckpt.pt, on the CPU in eval mode (for export, scoring and tests)."""
    ckpt = read_checkpoint(out_dir)
    model_opts, _ = opts.from_dict(ckpt["options"])
    model = Transformer(model_opts.model_config(), model_opts.dropout)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def device_for(t: opts.TrainOptions, dist: Dist) -> str:
    device = t.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Llama2Error(f"--device {t.device}: CUDA is not available (torch {torch.__version__})")
    return device


def place(model, t: opts.TrainOptions, dist: Dist):
    """A job's model on this process's device; with --fsdp in a torchrun job of 2 or more processes,
    sharded across them instead (fsdp.shard moves each process's shards alone to the device)."""
    if dist.mesh is not None:
        return fsdp.shard(model, dist.mesh)
    return model.to(device_for(t, dist))


def _dtype(t: opts.TrainOptions, device: str):
    name = t.dtype
    if name == "auto":
        if not device.startswith("cuda"):
            name = "float32"
        else:
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _init_dist(t: opts.TrainOptions) -> Dist:
    """torchrun announces a job through RANK / LOCAL_RANK / WORLD_SIZE (its launch protocol)."""
    if "RANK" not in os.environ:
        return Dist()
    dist = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ["WORLD_SIZE"]))
    backend = t.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and t.device in ("auto", "cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dist.local_rank)
    # Before the group exists: torch.distributed.nn.functional takes the default group as a default
    # argument (group=group.WORLD) of ten functions when first imported, and DistributedDataParallel
    # imports it (through torch._dynamo). Imported after init_process_group, those defaults hold
    # the group for good: destroy_process_group cannot free it, gloo's worker threads run on into
    # interpreter exit, and tearing them down there aborts a process now and then (SIGABRT,
    # "terminate called without an active exception"). Imported here, the defaults are None.
    import torch.distributed.nn  # noqa: F401
    if t.fsdp:
        fsdp.import_before_init()  # the same holds for FSDP's modules
    torch.distributed.init_process_group(backend=backend)
    if t.fsdp and dist.enabled:
        dist.mesh = fsdp.mesh(device_for(t, dist), dist.world)
    return dist


def _close_dist(dist: Dist):
    if dist.mesh is not None:
        fsdp.release(dist.mesh)
    if dist.enabled:
        torch.distributed.destroy_process_group()


def train(model_opts: opts.ModelOptions, t: opts.TrainOptions, log=print, progress=None) -> Result:
    """Train (or resume, or evaluate only) as the options say; returns the losses seen by this process."""
    wandb_module(t)  # before the data and the model are read
    dist = _init_dist(t)
    try:
        return _train(model_opts, t, dist, log if dist.master else (lambda line: None), progress)
    finally:
        _close_dist(dist)


def wandb_module(t):
    """wandb when --wandb asks for it (None otherwise); one line when it is not installed."""
    if not t.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise Llama2Error("--wandb: wandb is not installed (pip install wandb)") from None
    return wandb


def run(make_job, t, log=print, progress=None) -> Result:
    """Build a Job (`make_job(dist, log)`) in each process and train it with `fit`."""
    wandb_module(t)  # before the data and the model are read
    dist = _init_dist(t)
    try:
        say = log if dist.master else (lambda line: None)
        return fit(make_job(dist, say), t, dist, say, progress)
    finally:
        _close_dist(dist)


@dataclass
class Job:
    """What the loop trains: `llama2 train`'s model from scratch, or `llama2 finetune`'s base with
    adapters. The loop (`fit`) owns everything else: optimizer, schedule, evaluation, ckpt.pt,
    resume, metrics, DDP."""
    model: torch.nn.Module  # on the device; its parameters with requires_grad are trained
    train_batches: object  # .sample(batch_size, seed, purpose, iteration, micro) -> x, y int64 [B, T]
    val_batches: object  # the same for the validation split, or None
    options: dict  # saved in ckpt.pt (the options that made the job)
    seq_len: int
    flops_per_token: float
    describe: str  # the model, for the first log line
    save_outputs: object  # fn(out_dir, model): the job's own files beside ckpt.pt at each save
    saved_names: str  # what save_outputs writes, for the log line
    # fn(model) -> what ckpt.pt keeps of the model (default: model.state_dict()); under FSDP the
    # model is a plain copy of the gathered weights, so the file is the same either way
    state_dict: object = None
    load_state_dict: object = None  # fn(model, state) (default: model.load_state_dict(state))


def _train(model_opts, t, dist: Dist, log, progress) -> Result:
    if not t.data:
        raise Llama2Error("--data is required: a directory written by `llama2 data prepare`")
    data = TokenData(t.data)
    out_dir = Path(t.out_dir)
    if model_opts.vocab_size == 0:
        model_opts.vocab_size = data.vocab_size
    if model_opts.vocab_size < data.vocab_size:
        raise Llama2Error(f"--vocab_size {model_opts.vocab_size} is smaller than the data's vocabulary "
                          f"({data.vocab_size}, {data.dir})")
    config = model_opts.model_config()
    seq_len = config.seq_len
    train_batches = data.batches("train", seq_len)
    val_batches = data.batches("val", seq_len) if data.tokens("val") else None
    if val_batches is None and t.eval_iters:
        raise Llama2Error(f"{data.dir}: no validation tokens; prepare with --val-fraction > 0 or "
                          "--val FILE, or train with --eval_iters 0")
    torch.manual_seed(t.seed)  # the same initial weights in every process
    model = place(Transformer(config, model_opts.dropout), t, dist)
    if dist.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_tokenizer(t, data, out_dir, log)

    def save_outputs(directory, raw_model):
        llama2c.write(directory / MODEL_BIN, config, raw_model.export_weights(), version=1)

    job = Job(model, train_batches, val_batches, opts.to_dict(model_opts, t), seq_len,
              model.flops_per_token(), f"{model.num_params() / 1e6:.2f}M parameters, {config}",
              save_outputs, MODEL_BIN)
    return fit(job, t, dist, log, progress)


def _reuse_freed_memory(checkpointing: bool):
    """How glibc's malloc serves a training step. Every step frees and allocates the same sizes; by
    default glibc maps the largest afresh each time and trims the heaps of torch's worker threads, so
    their pages come back as page faults: 10,000 (stories15M) to 20,000 (stories110M) a step at 2
    threads, 6-13% of the step's CPU time. So blocks up to 64 MB come from the heap, and up to 256 MB
    of free heap stays: 4 page faults a step, the peak RSS unchanged.

    Not with --checkpointing, which asks for memory first: there the heap grew by about 100 MB a
    layer in the first forward pass and kept it (a 7B Q4_K_M QLoRA step at sequence 512: 3.9 GB of
    anonymous memory after that pass, 0.6 GB of it live; the same with glibc's defaults, with one
    arena, or with the kept layer inputs allocated up front). So blocks of 4 MB and more are mapped
    afresh: 0.6 GB after the pass, the file + 1.0 GiB at the step's peak instead of the file + 4.1
    GiB, for a step about 20% slower (their page faults). Nothing happens without glibc's mallopt."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, (4 if checkpointing else 64) << 20)
    mallopt(m_trim_threshold, 256 << 20)


def fit(job: Job, t, dist: Dist, log, progress) -> Result:
    """The training loop every command shares; `t` is a TrainOptions."""
    _reuse_freed_memory(getattr(job.model, "checkpointing", False))
    if t.gradient_accumulation_steps % dist.world:
        raise Llama2Error(f"--gradient_accumulation_steps {t.gradient_accumulation_steps} must be a "
                          f"multiple of the number of processes ({dist.world})")
    out_dir = Path(t.out_dir)
    resume = t.init_from == "resume"
    ckpt = read_checkpoint(out_dir) if resume else None
    device = device_for(t, dist)
    dtype = _dtype(t, device)
    seq_len = job.seq_len
    train_batches, val_batches = job.train_batches, job.val_batches
    if val_batches is None and t.eval_iters:
        raise Llama2Error("no validation data: give validation data, or train with --eval_iters 0")
    if t.num_threads:  # torch's kernels, and ours that dequantize a finetune's frozen base
        torch.set_num_threads(t.num_threads)
        set_threads(t.num_threads)
    model = job.model
    sharded = dist.mesh is not None  # `place` sharded the model
    state_dict = job.state_dict or (lambda m: m.state_dict())
    load_state_dict = job.load_state_dict or (lambda m, state: m.load_state_dict(state))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate, betas=(t.beta1, t.beta2),
        # fused: one kernel for every parameter (CUDA, and the CPU since torch 2.4) rather than ~10
        # small ops per parameter tensor (a LoRA has two per adapted layer: hundreds)
        **({"fused": True} if device.startswith(("cuda", "cpu")) else {}))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    iter_num, best_val = 0, math.inf
    if ckpt is not None:
        if sharded:
            fsdp.scatter(model, optimizer, load_state_dict, ckpt["model"], ckpt["optimizer"])
        else:
            load_state_dict(model, ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.startswith("cuda") and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        log(f"resuming from {out_dir / CKPT} at iteration {iter_num} (best val loss {best_val:.4f})")
    else:
        torch.manual_seed(t.seed + dist.rank)  # dropout differs between processes

    metrics = Metrics(out_dir, t, job.options, resume) if dist.master else None
    raw_model = model
    if t.compile:
        log("compiling the model (torch.compile)...")
        model = torch.compile(model)
    if dist.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.startswith("cuda")
                                        else None)
    autocast = (torch.autocast(device_type="cuda", dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    local_steps = t.gradient_accumulation_steps // dist.world
    tokens_per_iter = t.gradient_accumulation_steps * t.batch_size * seq_len
    flops_per_iter = job.flops_per_token * tokens_per_iter
    log(f"model: {job.describe}; device {device}, "
        f"{str(dtype).removeprefix('torch.')}, {dist.world} process(es)"
        f"{' (FSDP)' if sharded else ' (DDP)' if dist.enabled else ''}; "
        f"{tokens_per_iter} tokens per iteration")

    def to_device(x, y):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def evaluate():
        """Mean loss over eval_iters fixed batches per split, shared out between processes."""
        model.eval()
        out = {}
        for name, batches, purpose in (("train", train_batches, EVAL_TRAIN), ("val", val_batches, EVAL_VAL)):
            total = torch.zeros((), dtype=torch.float64, device=device)
            # under FSDP every process runs as many forward passes (each gathers weights with the
            # others), so one without a batch of its own runs the last again and does not count it
            stop = -(-t.eval_iters // dist.world) * dist.world if sharded else t.eval_iters
            for k in range(dist.rank, stop, dist.world):
                x, y = to_device(*batches.sample(t.batch_size, t.seed, purpose, 0, min(k, t.eval_iters - 1)))
                with autocast:
                    loss = raw_model(x, y)
                if k < t.eval_iters:
                    total += loss.double()
            if dist.enabled:
                torch.distributed.all_reduce(total)
            out[name] = float(total) / t.eval_iters
        model.train()
        return out

    def save(it):
        """Every process calls it: under FSDP, gathering the shards takes them all; rank 0 writes."""
        plain, optim_state = fsdp.gather(raw_model, optimizer) if sharded else (raw_model, None)
        if not dist.master:
            return
        state = {"model": state_dict(plain),
                 "optimizer": optim_state if sharded else optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "options": job.options,
                 "iter_num": it, "best_val_loss": best_val,
                 "rng": {"torch": torch.get_rng_state(),
                         **({"cuda": torch.cuda.get_rng_state()} if device.startswith("cuda") else {})}}
        with atomic_write(out_dir / CKPT) as f:
            torch.save(state, f)
        job.save_outputs(out_dir, plain)
        metrics.plot()
        say(f"saved {out_dir / CKPT} and {out_dir / job.saved_names}")

    from tqdm import tqdm
    bar = tqdm(total=t.max_iters, initial=iter_num, unit="it", dynamic_ncols=True, leave=False,
               disable=(None if progress is None else not progress) if dist.master else True)
    result = Result(iter_num, best_val)
    def say(line):  # above the progress bar when there is one
        if bar.disable:
            log(line)
        else:
            bar.write(line, file=bar.fp)
    model.train()
    step_time, steps_timed = 0.0, 0  # seconds spent in training steps since the last log line
    while True:
        if iter_num % t.eval_interval == 0 or iter_num >= t.max_iters or t.eval_only:
            improved = True  # without evaluation (--eval_iters 0), every interval is saved
            if t.eval_iters:
                losses = evaluate()
                entry = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]}
                result.evals.append(entry)
                say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if dist.master:
                    metrics.record(entry)
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                result.best_val_loss = best_val
            if (improved or t.always_save_checkpoint) and iter_num > 0 and not t.eval_only:
                save(iter_num)
        if iter_num >= t.max_iters or t.eval_only:
            break

        step_start = time.perf_counter()  # evaluation and saving are not counted in tokens/s
        lr = t.lr_at(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for j in range(local_steps):
            micro = j * dist.world + dist.rank  # this process's share of the global batch
            x, y = to_device(*train_batches.sample(t.batch_size, t.seed, TRAIN, iter_num, micro))
            if sharded:  # reduce-scatter the gradients only after the last micro-step
                raw_model.set_requires_gradient_sync(j == local_steps - 1)
            elif dist.enabled:  # all-reduce the gradients only after the last micro-step
                model.require_backward_grad_sync = j == local_steps - 1
            with autocast:
                loss = model(x, y)
                loss = loss / local_steps
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update(1)
        result.iter_num = iter_num
        steps_timed += 1

        if iter_num % t.log_interval == 0 or iter_num == t.max_iters:
            if dist.enabled:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= dist.world
            loss = float(loss_sum)  # synchronizes with the device, so the timing below is honest
            step_time += time.perf_counter() - step_start
            dt = step_time / steps_timed
            step_time, steps_timed = 0.0, 0
            tps = tokens_per_iter / dt
            mfu = flops_per_iter / dt / t.peak_flops
            eta = (t.max_iters - iter_num) * dt
            entry = {"iter": iter_num, "loss": loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu}
            result.losses.append(entry)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.2f}%")
            if dist.master:
                metrics.record(entry)
                say(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.3e}, {tps:,.0f} tokens/s, "
                    f"mfu {100 * mfu:.2f}%, eta {_duration(eta)}")
        else:
            step_time += time.perf_counter() - step_start
    bar.close()
    if dist.master:
        metrics.close()
    return result


def _duration(seconds) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Metrics:
    """Every step's and evaluation's numbers to OUT/metrics.jsonl; OUT/loss.png when matplotlib is
    importable; wandb when --wandb and it is installed."""

    def __init__(self, out_dir, t, options, resume):
        self.path = Path(out_dir) / METRICS
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if not resume:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.run = None
        if t.wandb:
            self.run = wandb_module(t).init(project=t.wandb_project, config=options, dir=str(out_dir))

    def record(self, entry):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in entry.items() if k != "iter"}, step=entry["iter"])

    def plot(self):
        """OUT/loss.png: train loss per step and evaluation losses (skipped without matplotlib)."""
        try:
            import matplotlib
        except ImportError:
            return
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        entries = [json.loads(line) for line in self.path.read_text("utf-8").splitlines()] \
            if self.path.exists() else []
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [e for e in entries if "loss" in e]
        evals = [e for e in entries if "val_loss" in e]
        ax.plot([e["iter"] for e in steps], [e["loss"] for e in steps], label="train (step)", lw=0.8)
        ax.plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.legend()
        with atomic_write(self.path.with_name(LOSS_PNG)) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    def close(self):
        self.plot()
        if self.run is not None:
            self.run.finish()


def _write_tokenizer(t, data, out_dir, log):
    """Put the tokenizer beside model.bin as llama2.c tokenizer.bin, so `llama2 run` works at once."""
    from .tokenizer import Encoder

    source = t.tokenizer or data.meta.get("tokenizer", "")
    if not source or not Path(source).exists():
        log(f"no tokenizer to copy to {out_dir / TOKENIZER_BIN} (pass --tokenizer)")
        return
    enc = Encoder(source)
    if enc.vocab_size != data.vocab_size:
        raise Llama2Error(f"{source}: tokenizer has {enc.vocab_size} tokens but {data.dir} was prepared "
                          f"with {data.vocab_size}")
    if Path(source).resolve() != (out_dir / TOKENIZER_BIN).resolve():
        enc.write_bin(out_dir / TOKENIZER_BIN)
