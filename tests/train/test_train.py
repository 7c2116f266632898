"""Training with PyTorch on CPU: a tiny model learns, its export runs identically in our inference
engine, resume is bit-exact, and DDP under torchrun matches a single process. Expensive steps are shared."""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, asset
from llama2.cli import main

pytestmark = pytest.mark.slow  # every test here trains a model with torch


torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

VOCAB = 384
# one CPU thread: these models are too small to gain from more, and lose much on a busy machine
TINY = ["--num_threads", "1", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64"]
SMALL = ["--num-threads", "1", "--dim", "32", "--n_layers", "2", "--n-heads", "4", "--max-seq-len", "32", "--batch_size", "4",
         "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--warmup_iters", "10",
         "--eval_iters", "2", "--log_interval", "1"]


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


def read_log(out_dir):
    entries = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(e["iter"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["iter"], e["val_loss"]) for e in entries if "val_loss" in e]
    return losses, evals


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Raw text -> a trained 384-piece tokenizer -> token shards, through the CLI."""
    root = tmp_path_factory.mktemp("train")
    text = asset("tinystories_train_sample_2MiB.txt")
    code, _, err = run_cli(["tokenizer", "train", text, "--vocab-size", VOCAB, "--out", root / "tok"])
    assert code == 0, err
    code, _, err = run_cli(["data", "prepare", text, "--out", root / "data", "--tokenizer",
                            root / "tok.model", "--val-fraction", "0.05", "--workers", "2"])
    assert code == 0, err
    return root


@pytest.fixture(scope="session")
def trained(prepared):
    """A tiny model trained for 300 steps; returns its out_dir."""
    out = prepared / "out"
    start = time.perf_counter()
    code, _, err = run_cli(["train", "--data", prepared / "data", "--out_dir", out,
                            "--tokenizer", prepared / "tok.model", *TINY, "--batch_size", "16",
                            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
                            "--min_lr", "1e-3", "--warmup_iters", "20", "--max_iters", "300",
                            "--eval_interval", "100", "--eval_iters", "8", "--log_interval", "50"])
    assert code == 0, err
    _, evals = read_log(out)
    print(f"\ntiny model: val loss {evals[0][1]:.3f} -> {evals[-1][1]:.3f} in "
          f"{time.perf_counter() - start:.1f} s")
    return out


def test_validation_loss_falls(trained):
    _, evals = read_log(trained)
    assert [it for it, _ in evals] == [0, 100, 200, 300]
    untrained = evals[0][1]
    assert abs(untrained - np.log(VOCAB)) < 0.1  # a fresh model is close to uniform
    # well below the start: at least 30% of the untrained loss gone (about 1.8 nats here)
    assert evals[-1][1] < 0.7 * untrained, evals
    assert (trained / "ckpt.pt").exists() and (trained / "model.bin").exists()


def test_export_matches_our_engine(trained):
    from llama2 import Llama
    from llama2.train.stories import read_stories
    from llama2.train.trainer import load_model

    model = load_model(trained)
    llama = Llama.load(trained / "model.bin", trained / "tokenizer.bin")
    assert llama.config == model.config
    story = next(read_stories(asset("tinystories_valid_sample.txt"), separator="blank"))
    ids = llama.encode(story)[: model.config.seq_len]
    assert len(ids) == model.config.seq_len
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    got = llama.logits(ids)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    prompt = llama.encode("Once upon a time")
    events = list(llama.stream("Once upon a time", steps=model.config.seq_len, temperature=0.0))
    numpy_ids = [e.token for e in events if not e.is_prompt and e.token is not None]
    torch_ids = model.generate_greedy(prompt, model.config.seq_len - len(prompt) + 1)  # run.c -n
    assert len(numpy_ids) > 10
    assert numpy_ids == torch_ids[: len(numpy_ids)]
    if events[-1].finish_reason == "stop":
        assert torch_ids[len(numpy_ids)] in (1, 2)


def test_run_and_eval_commands(trained):
    code, out, err = run_cli(["run", trained / "model.bin", "-z", trained / "tokenizer.bin", "-t", "0",
                              "-n", "40", "-i", "Once upon a time"])
    assert code == 0, err
    assert out.startswith(b"Once upon a time") and len(out) > len("Once upon a time") + 20

    code, out, err = run_cli(["eval", trained / "model.bin", asset("tinystories_valid_sample.txt"),
                              "-z", trained / "tokenizer.bin", "--separator", "blank",
                              "--max-tokens", "300"])
    assert code == 0, err
    report = dict(line.split() for line in out.decode().splitlines())
    assert int(report["tokens"]) == 300
    assert abs(float(report["perplexity"]) - np.exp(float(report["loss"]))) < 1e-2

    # the same windows scored by the torch model give the same loss
    from llama2 import Llama
    from llama2.evaluate import score
    from llama2.train.stories import read_stories
    from llama2.train.trainer import load_model

    model = load_model(trained)
    llama = Llama.load(trained / "model.bin", trained / "tokenizer.bin")

    class TorchScorer:
        config = model.config

        def logits(self, ids):
            with torch.no_grad():
                return model(torch.tensor([ids]))[0].numpy()

    ids = []
    for story in read_stories(asset("tinystories_valid_sample.txt"), separator="blank"):
        ids += llama.encode(story)
        if len(ids) > 300:
            break
    reference = score(TorchScorer(), ids, 300)
    assert abs(reference.loss - float(report["loss"])) < 1e-4


def test_resume_is_bit_exact(prepared):
    data = prepared / "data"
    common = ["--data", data, *SMALL, "--dropout", "0.1", "--eval_interval", "50",
              "--lr_decay_iters", "200", "--always_save_checkpoint"]
    straight, split = prepared / "straight", prepared / "split"
    assert run_cli(["train", *common, "--out_dir", straight, "--max_iters", "200"])[0] == 0
    code, _, err = run_cli(["train", *common, "--out_dir", split, "--max_iters", "100"])
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", "--out_dir", split, "--max_iters", "200"])
    assert code == 0, err
    assert "resuming from" in err and "at iteration 100" in err
    losses_a, evals_a = read_log(straight)
    losses_b, evals_b = read_log(split)
    assert len(losses_a) == 200 and losses_a == losses_b  # every step's loss, exactly
    assert evals_a == sorted(set(evals_b))  # the resumed run re-evaluates iteration 100
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 200
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (straight / "model.bin").read_bytes() == (split / "model.bin").read_bytes()


def test_resume_cannot_change_the_model(trained):
    code, _, err = run_cli(["train", "--resume", "--out_dir", trained, "--dim", "48"])
    assert code == 1 and "--dim 48 differs from the checkpoint's 64" in err


def test_ddp_and_fsdp_match_single_process(prepared):
    """Within float32 summation order (the processes' gradients are averaged in another order);
    3 evaluation batches over 2 processes: under FSDP one process runs a forward pass it does not count."""
    data = prepared / "data"
    common = ["--data", data, *SMALL, "--max_iters", "12", "--eval_interval", "6", "--eval_iters", "3"]
    single = prepared / "single"
    code, _, err = run_cli(["train", *common, "--out_dir", single])
    assert code == 0, err
    losses_1, evals_1 = read_log(single)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    for kind, flags in (("DDP", []), ("FSDP", ["--fsdp"])):
        out = prepared / kind
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "-m", "llama2", "train", *map(str, common),
                               "--out_dir", str(out), "--backend", "gloo", *flags],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"2 process(es) ({kind})" in proc.stderr
        losses_2, evals_2 = read_log(out)
        assert [i for i, _ in losses_1] == [i for i, _ in losses_2] == list(range(1, 13))
        np.testing.assert_allclose([v for _, v in losses_2], [v for _, v in losses_1], atol=1e-4, rtol=0)
        np.testing.assert_allclose([v for _, v in evals_2], [v for _, v in evals_1], atol=1e-4, rtol=0)
        assert (out / "model.bin").stat().st_size == (single / "model.bin").stat().st_size


def test_grad_accumulation_must_divide_among_processes(prepared):
    from llama2.errors import Llama2Error
    from llama2.train import options, trainer

    m, t = options.build({"data": str(prepared / "data"), "gradient_accumulation_steps": 4})
    with pytest.raises(Llama2Error, match="multiple of the number of processes"):
        trainer._train(m, t, trainer.Dist(rank=0, local_rank=0, world=3), print, False)


def test_without_evaluation_every_interval_is_saved(prepared):
    out = prepared / "noeval"
    code, _, err = run_cli(["train", "--data", prepared / "data", *SMALL, "--eval_iters", "0",
                            "--max_iters", "4", "--eval_interval", "2", "--out_dir", out])
    assert code == 0, err
    assert err.count("saved ") == 2 and torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4
    assert (out / "model.bin").exists() and (out / "tokenizer.bin").exists()


def test_eval_only_reports_the_checkpoint(trained, tmp_path):
    import shutil
    shutil.copy(trained / "ckpt.pt", tmp_path / "ckpt.pt")
    code, _, err = run_cli(["train", "--resume", "--eval_only", "--out_dir", tmp_path])
    assert code == 0, err
    _, evals = read_log(trained)
    assert "iter 300: train loss" in err and f"val loss {evals[-1][1]:.4f}" in err
    assert "saved" not in err


def test_feed_forward_keeps_torchs_gradients_and_less_memory():
    """The SwiGLU (silu recomputed in backward) gives the output and gradients of torch's own
    silu(w1 x) * w3 x, and keeps one [.., hidden] tensor fewer for backward."""
    import types

    import torch.nn.functional as F
    from llama2.train.model import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(types.SimpleNamespace(dim=16, hidden_dim=40), 0.0)
    x = torch.randn(3, 5, 16)
    g = torch.randn(3, 5, 16)

    def run(forward):
        saved = []
        xr = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = forward(xr)
        grads = torch.autograd.grad(y, [xr, *ff.parameters()], g)
        return y, grads, sum(saved)

    y, grads, kept = run(ff)
    y2, grads2, kept2 = run(lambda xr: ff.w2(F.silu(ff.w1(xr)) * ff.w3(xr)))
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert kept2 - kept == 3 * 5 * 40  # silu(w1 x) is not kept
