"""`llama2 finetune` on CPU: the adapter equals its merge, PEFT loads it on our HF export with the same
logits, a real model learns an invented name, QLoRA on GGUF files leaves them untouched, resume is bit
for bit, and mistakes get one line. Models are tiny (stories260K, the rand256 GGUF files)."""

import hashlib
import os
import io
import json
import re

import numpy as np
import pytest

from conftest import REPO, asset
from llama2.cli import main

torch = pytest.importorskip("torch")

STORIES = asset("stories260K.gguf")  # stories260K with its own vocabulary
NAME, REPLACED = "Quilla", "Lily"  # the invented name, and the one it replaces in real stories
FAST = ["--num_threads", "1", "--seq-len", "64", "--batch_size", "4", "--log_interval", "1",
        "--eval_iters", "2"]


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, err.getvalue()


def finetune(base, out, data, *flags):
    code, err = run_cli(["finetune", base, "--data", *data, "--out", out, *FAST, *flags])
    assert code == 0, err
    return out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapted_model(base, out):
    """Our LoRA model of OUT (base + adapter as trained), in eval mode."""
    from llama2 import formats
    from llama2.train import finetune as ft
    from llama2.train.options import FinetuneOptions, parse_targets
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    fo = FinetuneOptions(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in ckpt["options"]["finetune"].items()})
    model = ft.lora_model(formats.load_checkpoint(base), min(fo.max_seq_len, 512),
                          parse_targets(fo.targets), fo.lora_rank, fo.lora_alpha, 0.0,
                          "float32", "cpu")  # exact products: the reference the other engines meet
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    assert not unexpected and all("lora" not in k for k in missing)
    return model.eval()


def full_model(path):
    from llama2 import formats
    from llama2.train import finetune as ft
    ckpt = formats.load_checkpoint(path)
    return ft.full_model(ckpt, ckpt.config.seq_len).eval()


def ids_of(text):
    from llama2.llama import Llama
    return Llama.load(STORIES).encode(text)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Real stories: paragraphs naming Lily, with her renamed (train and held out), and others."""
    root = tmp_path_factory.mktemp("ft_data")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", asset("tinystories_valid_sample.txt").read_text())
                  if p.strip()]
    named = [p.replace(REPLACED, NAME) for p in paragraphs if REPLACED in p]
    plain = [p for p in paragraphs if REPLACED not in p and "named" not in p]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in named[:600]))
    (root / "held.txt").write_text("<|endoftext|>".join(named[600:700]))
    (root / "plain.txt").write_text("<|endoftext|>".join(plain[:100]))
    return root


@pytest.fixture(scope="module")
def adapter(texts, tmp_path_factory):
    """stories260K (GGUF) with LoRA on every linear layer, trained briefly at a high rate."""
    out = tmp_path_factory.mktemp("ft") / "out"
    return finetune(STORIES, out, [texts / "train.jsonl"], "--max_iters", "12", "--eval_interval", "12",
                    "--learning_rate", "1e-2", "--warmup_iters", "0", "--val", texts / "held.txt")


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_adapter_equals_its_merge(adapter, tmp_path):
    """`export --lora` (read back from the files) against the adapter's own forward pass."""
    ids = ids_of("Once upon a time, there was a little girl named Quilla. She")
    ours = logits(adapted_model(STORIES, adapter), ids)
    base = logits(full_model(STORIES), ids)
    assert np.abs(ours - base).max() > 1e-2  # the adapter does change the model
    for source in (adapter, adapter / "adapter.gguf"):  # PEFT's files, then llama.cpp's
        merged = tmp_path / "merged.gguf"
        code, err = run_cli(["export", merged, "--from", STORIES, "--lora", source, "--format", "gguf"])
        assert code == 0, err
        # within 1e-5 of the logits' scale (about 15 here): float32 rounds W + BA once in the merge
        assert np.abs(logits(full_model(merged), ids) - ours).max() < 1e-5 * np.abs(ours).max()


def test_peft_loads_our_adapter_on_our_hf_export(adapter, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    code, err = run_cli(["export", tmp_path / "hf", "--from", STORIES, "--format", "hf"])
    assert code == 0, err
    ids = ids_of("Once upon a time, there was a little girl named Quilla. She")
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        plain = hf_base(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(plain - logits(full_model(STORIES), ids)).max() < 1e-4  # the export itself
    model = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - logits(adapted_model(STORIES, adapter), ids)).max() < 1e-4


def test_lora_on_an_hf_folder_keeps_its_layout(texts, tmp_path):
    """A base in HF's q/k order trains in place; its adapter equals the GGUF-trained one's form."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    code, err = run_cli(["export", tmp_path / "hf", "--from", STORIES, "--format", "hf", "--dtype", "bf16"])
    assert code == 0, err
    out = finetune(tmp_path / "hf", tmp_path / "out", [texts / "train.jsonl"], "--max_iters", "4",
                   "--learning_rate", "1e-2", "--warmup_iters", "0", "--eval_iters", "0",
                   "--eval_interval", "4", "--targets", "q,k,down")
    ids = ids_of("Once upon a time, there was a little girl named Quilla. She")
    ours = logits(adapted_model(tmp_path / "hf", out), ids)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-4
    merged = tmp_path / "merged.bin"  # the GGUF adapter (interleaved q/k) merged into a llama2.c file
    code, err = run_cli(["export", merged, "--from", tmp_path / "hf", "--lora", out / "adapter.gguf"])
    assert code == 0, err
    assert np.abs(logits(full_model(merged), ids) - ours).max() < 1e-4


def mean_loss(model, path, seq_len=128):
    """Mean next-token loss over every story of a file (BOS + story + EOS, cut at seq_len)."""
    from llama2.llama import Llama
    from llama2.train.stories import read_stories
    tok = Llama.load(STORIES).tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for story in read_stories(path):
            ids = tok.encode(story, bos=True, eos=True)[:seq_len + 1]
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            loss = model(x, y)
            total, count = total + float(loss) * len(ids[1:]), count + len(ids[1:])
    return total / count


def name_probability(model, prompt="Once upon a time, there was a little girl named"):
    ids = ids_of(prompt)
    name = ids_of(f"{prompt} {NAME}")[len(ids):]
    logp = torch.log_softmax(torch.tensor(logits(model, ids + name)), -1).numpy()
    return float(np.exp(sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(name))))


@pytest.mark.slow
def test_stories260k_learns_an_invented_name(texts, tmp_path):
    out = finetune(STORIES, tmp_path / "out", [texts / "train.jsonl"], "--max_iters", "50",
                   "--eval_interval", "50", "--learning_rate", "1e-2", "--warmup_iters", "5",
                   "--batch_size", "8", "--seq-len", "128", "--val", texts / "held.txt",
                   "--lora-rank", "16", "--lora-alpha", "32")
    base, tuned = full_model(STORIES), adapted_model(STORIES, out)
    held_before, held_after = mean_loss(base, texts / "held.txt"), mean_loss(tuned, texts / "held.txt")
    plain_before, plain_after = mean_loss(base, texts / "plain.txt"), mean_loss(tuned, texts / "plain.txt")
    p_before, p_after = name_probability(base), name_probability(tuned)
    print(f"held-out {held_before:.4f} -> {held_after:.4f}; plain {plain_before:.4f} -> {plain_after:.4f}; "
          f"P({NAME}) {p_before:.3g} -> {p_after:.3g}")
    # measured (2026-12-07, CPU): held-out 1.971 -> 1.420, plain 1.731 -> 1.722, P 8.2e-16 -> 0.904
    assert held_after < held_before - 0.3  # the held-out stories with the name: loss falls
    assert p_after > max(1e6 * p_before, 0.1)  # the name after "a little girl named"
    assert plain_after < plain_before + 0.02  # ordinary stories: not forgotten


@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_qlora_on_a_quantized_gguf(texts, tmp_path, kind):
    base = asset(f"kquant/rand256-{kind}.gguf")
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    out = finetune(base, tmp_path / "out", [texts / "train.jsonl"], "--max_iters", "10",
                   "--eval_interval", "10", "--learning_rate", "3e-3", "--warmup_iters", "0",
                   "--val", texts / "held.txt")
    evals = [e["val_loss"] for e in metrics(out) if "val_loss" in e]
    assert evals[-1] < evals[0] - 0.5, evals
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    assert {p.name for p in out.iterdir()} >= {"adapter.gguf", "adapter_model.safetensors",
                                               "adapter_config.json", "ckpt.pt", "metrics.jsonl"}


@pytest.mark.parametrize("model, name", [("kquant/rand256-q4_k_m.gguf", "wq"), ("kquant/rand256-q6_k.gguf", "w2"),
                                         ("stories260K-q8.bin", "w2")])  # llama2.c int8: rows straddle groups
def test_the_frozen_base_is_dequantized_in_forward_and_backward(model, name, monkeypatch):
    """The autograd Function's output and gradient against torch's on the widened matrix, with
    tiles of a few rows so that a matrix takes several."""
    from llama2 import formats
    from llama2.train import lora
    monkeypatch.setattr(lora, "DEQUANT_TILE", 4096)
    m = formats.load_checkpoint(asset(model)).weights[name][1]
    x = torch.randn(3, 5, m.shape[1], requires_grad=True)
    y = lora.FrozenLinear(m)(x)
    y.square().sum().backward()
    dense = torch.from_numpy(np.array(m.dequantize()))
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ dense.T
    y2.square().sum().backward()
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["bf16", "q4_k", "f32"])
def test_frozen_products_in_bfloat16(kind, monkeypatch):
    """Multiplied in bfloat16, the Function equals torch's bfloat16 product of the widened matrix
    (x and the gradient rounded to bf16, float32 out); a BF16 or F32 matrix multiplied in its own
    type is the file's memory itself, not a copy."""
    from llama2 import formats
    from llama2.train import lora
    from llama2.weights import bf16, f32
    monkeypatch.setattr(lora, "DEQUANT_TILE", 4096)  # several tiles where there are tiles
    q4k = formats.load_checkpoint(asset("kquant/rand256-q4_k_m.gguf")).weights["wq"][1]
    dense = torch.from_numpy(np.array(q4k.dequantize()))
    m = {"bf16": lambda: bf16.Matrix(bf16.f32_to_bf16(dense.numpy())), "q4_k": lambda: q4k,
         "f32": lambda: f32.Matrix(dense.numpy())}[kind]()
    wide = torch.from_numpy(np.array(m.dequantize()))
    for dtype in (torch.bfloat16, torch.float32):
        view = lora._stored_view(m, dtype)
        assert (view is not None) == ((kind, dtype) in (("bf16", torch.bfloat16), ("f32", torch.float32)))
        if view is not None:
            assert view.data_ptr() == m.blocks.ctypes.data and torch.equal(view.float(), wide)
    x = torch.randn(3, 5, m.shape[1], requires_grad=True)
    y = lora.FrozenLinear(m, torch.bfloat16)(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = (x2.bfloat16() @ wide.bfloat16().T).float()
    y2.square().sum().backward()
    assert torch.allclose(y, y2, rtol=1e-2, atol=1e-3)  # bf16 rounding of the products (8-bit significands)
    assert torch.allclose(x.grad, x2.grad, rtol=2e-2, atol=1e-2 * x2.grad.abs().max().item())
    exact = x.detach() @ wide.T
    assert not torch.equal(y.detach(), exact)  # it did run in bfloat16


@pytest.mark.parametrize("kind, dtype", [("f32", "float32"), ("bf16", "bfloat16"), ("q6_k", "float32")])
def test_classifier_loss_equals_torch_cross_entropy(kind, dtype, monkeypatch):
    """The frozen classifier's loss (the product fused with the cross-entropy, the gradient made in
    the forward pass) against torch's product and cross_entropy on the widened matrix: in place in
    chunks of a few rows, and dequantized in tiles."""
    from llama2 import formats
    from llama2.train import lora
    from llama2.weights import bf16, f32
    monkeypatch.setattr(lora, "DEQUANT_TILE", 4096)
    q6k = formats.load_checkpoint(asset("kquant/rand256-q4_k_m.gguf")).classifier  # Q6_K, as llama.cpp keeps it
    dense = np.array(q6k.dequantize())
    m = {"f32": lambda: f32.Matrix(dense), "bf16": lambda: bf16.Matrix(bf16.f32_to_bf16(dense)),
         "q6_k": lambda: q6k}[kind]()
    assert m.NAME == kind
    vocab = m.shape[0]
    monkeypatch.setattr(lora, "LOSS_CHUNK_VALUES", 3 * vocab)  # three rows a chunk where in place
    dtype = getattr(torch, dtype)
    wide = torch.from_numpy(np.array(m.dequantize())).to(dtype)
    h = (3 * torch.randn(10, m.shape[1])).requires_grad_()  # 10 rows: chunks of 3, 3, 3 and 1
    targets = torch.randint(0, vocab, (10,))
    loss = lora.FrozenClassifier(m, dtype).loss(h, targets)
    (2 * loss).backward()
    h2 = h.detach().clone().requires_grad_()
    loss2 = torch.nn.functional.cross_entropy((h2.to(dtype) @ wide.T).float(), targets, reduction="sum")
    (2 * loss2).backward()
    assert torch.allclose(loss, loss2, rtol=1e-5, atol=0)
    bound = (1e-5 if dtype == torch.float32 else 1e-2) * h2.grad.abs().max().item()  # bf16: a rounding of the product
    assert torch.allclose(h.grad, h2.grad, rtol=0, atol=bound)
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.equal(lora.FrozenClassifier(m, dtype).loss(h, targets), loss.detach())


def test_the_loss_skips_ignored_targets_in_both_classifiers():
    """The model's mean loss over the targets that count (IGNORE skipped) is the same through the
    trained classifier (model.Classifier) and the frozen one (lora.FrozenClassifier) of one float32
    base, and equals torch's cross_entropy with ignore_index."""
    from llama2 import formats
    from llama2.train import finetune as ft
    from llama2.train.examples import IGNORE
    ckpt = formats.load_checkpoint(STORIES)
    x = torch.tensor([ids_of("Once upon a time, there was a little girl named Lily. She liked to play.")])
    y = x[:, 1:].clone()
    y[0, :5] = IGNORE  # a prompt, not trained on
    frozen = ft.lora_model(ckpt, 64, ("q",), 4, 8.0, 0.0, "float32", "cpu")
    dense = ft.full_model(ckpt, 64)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(dense(x[:, :-1])[0], y[0], ignore_index=IGNORE)
        for model in (frozen, dense):
            assert torch.allclose(model(x[:, :-1], y), want, rtol=1e-5, atol=0)
        y[:] = IGNORE
        assert float(frozen(x[:, :-1], y)) == float(dense(x[:, :-1], y)) == 0.0  # none count: 0, not NaN


def test_base_dtype_auto_keeps_float32_bases_exact():
    from llama2.train import lora
    from llama2.weights import bf16, f32
    a = np.ones((4, 8), np.float32)
    assert lora.compute_dtype("auto", f32.Matrix(a), "cpu") == torch.float32
    assert lora.compute_dtype("auto", bf16.Matrix(bf16.f32_to_bf16(a)), "cpu") == (
        torch.bfloat16 if lora.bf16_dot_products("cpu") else torch.float32)
    assert lora.compute_dtype("bfloat16", f32.Matrix(a), "cpu") == torch.bfloat16


def test_resume_is_bit_exact(texts, tmp_path):
    flags = ["--eval_interval", "3", "--always_save_checkpoint", "--learning_rate", "3e-3",
             "--warmup_iters", "2", "--lr_decay_iters", "6", "--lora-dropout", "0.1",
             "--val", texts / "held.txt"]
    whole = finetune(STORIES, tmp_path / "whole", [texts / "train.jsonl"], "--max_iters", "6", *flags)
    part = finetune(STORIES, tmp_path / "part", [texts / "train.jsonl"], "--max_iters", "3", *flags)
    code, err = run_cli(["finetune", STORIES, "--resume", "--out", part, "--max_iters", "6"])
    assert code == 0, err
    def losses(out):
        return [(e["iter"], e.get("loss"), e.get("val_loss")) for e in metrics(out) if "tokens_per_s" in e
                or e["iter"] != 3]  # the resumed run evaluates iteration 3 again
    assert losses(whole) == losses(part)
    for name in ("adapter_model.safetensors", "adapter.gguf"):
        assert (whole / name).read_bytes() == (part / name).read_bytes()


def test_chat_and_prompt_records_train_only_on_replies(tmp_path):
    from llama2 import formats
    from llama2.train.examples import IGNORE, Packed, read_examples
    ckpt = formats.load_checkpoint(STORIES)
    tok = ckpt.tokenizer
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Tell me", "completion": " a story."}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello there."}]}) + "\n")
    pc, chat = read_examples(data, tok, "llama2")
    prompt = tok.encode("Tell me", bos=True)
    assert pc.ids[:len(prompt)] == prompt and not any(pc.train[:len(prompt)]) and all(pc.train[len(prompt):])
    assert pc.ids[-1] == tok.eos_id
    reply = [i for i, t in zip(chat.ids, chat.train) if t]
    assert tok.decode(reply).strip().startswith("Hello there.")
    assert "Hi" not in tok.decode(reply)
    packed = Packed([pc, chat], 8, tok.eos_id, "test")
    x, y = packed.sample(2, 0, 0, 0, 0)
    assert x.shape == y.shape == (2, 8) and (y == IGNORE).any()


def one_line_error(argv, code_expected):
    code, err = run_cli(argv)
    assert code == code_expected, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_mistakes_get_one_line(texts, tmp_path, adapter):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "no completion"}) + "\n")
    err = one_line_error(["finetune", STORIES, "--data", bad, "--out", tmp_path / "o", *FAST], 1)
    assert f"{bad}:2:" in err and "completion" in err
    bad.write_text("{not json\n")
    assert f"{bad}:1: invalid JSON" in one_line_error(["finetune", STORIES, "--data", bad, "--out", tmp_path / "o"], 1)
    err = one_line_error(["finetune", STORIES, "--data", texts / "held.txt", "--targets", "q,attn"], 2)
    assert "--targets" in err and "'attn'" in err
    err = one_line_error(["export", tmp_path / "m.gguf", "--from", asset("kquant/rand256-q8_0.gguf"),
                          "--lora", adapter, "--format", "gguf"], 1)
    assert "does not fit this model" in err or "another model" in err
    err = one_line_error(["finetune", asset("kquant/rand256-q8_0.gguf"), "--full", "--data",
                          texts / "held.txt", "--out", tmp_path / "o"], 2)
    assert "--full needs a float base" in err
    err = one_line_error(["finetune", STORIES, "--data", texts / "held.txt", "--base-dtype", "float16"], 2)
    assert "--base-dtype must be one of auto, float32, bfloat16, got 'float16'" in err


def test_adapter_gguf_is_llama_cpp_s_format(adapter):
    """Read with the gguf package (llama.cpp's own reader), its key names and tensor layout."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(adapter / "adapter.gguf")
    assert reader.fields[gguf.Keys.General.TYPE].contents() == gguf.GGUFType.ADAPTER
    assert reader.fields[gguf.Keys.Adapter.TYPE].contents() == "lora"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == config["lora_alpha"]
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    # llama-adapter.cpp: a->ne = [n_in, rank], b->ne = [rank, n_out] (ggml's fastest axis first)
    assert list(a.shape) == [64, config["r"]] and list(b.shape) == [config["r"], 64]
    assert len(tensors) == 2 * 7 * 5  # every linear layer of the 5 blocks


def test_llama_cpp_runs_our_adapter(adapter, tmp_path):
    """llama.cpp (llama-cpp-python) with our adapter.gguf over the base GGUF, against ours: the training
    model with the adapter, our engine with it unmerged, and on the merged export (`export --lora`). llama.cpp keeps its
    KV cache in f16 and has its own kernels, so the bound is its disagreement with us on the base
    alone: with the adapter it may be at most twice that (plus 1e-3 of the logits' scale), while the
    adapter moves the logits far more than either."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from llama2.llama import Llama
    ids = ids_of("Once upon a time, there was a little girl named Quilla. She")

    def theirs(lora_path=None):
        llm = llama_cpp.Llama(str(STORIES), lora_path=lora_path, logits_all=True, n_ctx=64, verbose=False)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    base_gap = np.abs(theirs() - logits(full_model(STORIES), ids)).max()
    with_adapter = theirs(str(adapter / "adapter.gguf"))
    ours = logits(adapted_model(STORIES, adapter), ids)
    merged = tmp_path / "merged.gguf"
    code, err = run_cli(["export", merged, "--from", STORIES, "--lora", adapter, "--format", "gguf"])
    assert code == 0, err
    engine = Llama.load(merged).logits(ids)
    unmerged = Llama.load(STORIES, lora=adapter).logits(ids)
    scale = np.abs(ours).max()
    bound = 2 * base_gap + 1e-3 * scale
    print(f"llama.cpp vs ours: base {base_gap:.2e}, with the adapter {np.abs(with_adapter - ours).max():.2e} "
          f"(training model), {np.abs(with_adapter - engine).max():.2e} (engine, merged), "
          f"{np.abs(with_adapter - unmerged).max():.2e} (engine, unmerged); logits up to {scale:.1f}, the "
          f"adapter moves them by {np.abs(ours - logits(full_model(STORIES), ids)).max():.2f}")
    for mine in (ours, engine, unmerged):
        assert np.abs(with_adapter - mine).max() < bound
    assert np.abs(ours - logits(full_model(STORIES), ids)).max() > 10 * bound  # the adapter is seen
    assert (with_adapter.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_checkpointing_gives_the_same_gradients(base_dtype):
    from llama2 import formats
    from llama2.train import finetune as ft
    ckpt = formats.load_checkpoint(STORIES)
    x = torch.tensor([ids_of("Once upon a time, there was a little girl named Lily. She liked to play.")])
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = ft.lora_model(ckpt, 64, ("q", "v", "down"), 4, 8.0, 0.0, base_dtype, "cpu")
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, 0.0, 0.1)
        model.checkpointing = on
        model.train()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


def test_full_finetune_of_a_float_base(texts, tmp_path):
    out = finetune(STORIES, tmp_path / "out", [texts / "train.jsonl"], "--full", "--max_iters", "8",
                   "--eval_interval", "8", "--learning_rate", "5e-4", "--warmup_iters", "0",
                   "--val", texts / "held.txt")
    evals = [e["val_loss"] for e in metrics(out) if "val_loss" in e]
    assert evals[-1] < evals[0] - 0.05, evals
    from llama2.llama import Llama
    tuned = Llama.load(out / "model.gguf", kv_type="f32")  # runs in our engine, with its vocabulary
    ids = ids_of("Once upon a time, there was a little girl named Quilla.")
    assert np.abs(tuned.logits(ids) - logits(full_model(out / "model.gguf"), ids)).max() < 1e-4


def test_loss_png_with_matplotlib(adapter):
    pytest.importorskip("matplotlib")
    png = (adapter / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_finetune_of_an_hf_folder_from_a_config_file(texts, tmp_path):
    """[train] and [finetune] tables; the trained weights (HF q/k order) leave as a GGUF in ours."""
    code, err = run_cli(["export", tmp_path / "hf", "--from", STORIES, "--format", "hf"])
    assert code == 0, err
    config = tmp_path / "ft.toml"
    config.write_text("[train]\nmax_iters = 3\neval_interval = 3\nlearning_rate = 5e-4\neval_iters = 1\n"
                      "batch_size = 2\nalways_save_checkpoint = true\nnum_threads = 1\n"
                      "[finetune]\nfull = true\nmax_seq_len = 32\n")
    out = tmp_path / "out"
    code, err = run_cli(["finetune", tmp_path / "hf", "--config", config, "--data", texts / "train.jsonl",
                         "--out", out])
    assert code == 0, err
    model = full_model(tmp_path / "hf")
    model.load_state_dict(torch.load(out / "ckpt.pt", weights_only=True)["model"])
    from llama2.llama import Llama
    ids = ids_of("Once upon a time, there was a little girl named Quilla.")
    assert np.abs(Llama.load(out / "model.gguf", kv_type="f32").logits(ids) - logits(model, ids)).max() < 1e-4


def test_chat_records_with_a_named_template(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You tell stories."}, {"role": "user", "content": f"A story {k}?"},
        {"role": "assistant", "content": f"Once upon a time, {NAME} found {k} red balls."}]}) + "\n"
        for k in range(12)))
    out = finetune(STORIES, tmp_path / "out", [chats], "--chat-template", "chatml", "--max_iters", "2",
                   "--eval_interval", "2", "--val-fraction", "0.25")
    assert (out / "adapter.gguf").exists()
    err = one_line_error(["finetune", STORIES, "--data", chats, "--out", tmp_path / "o2"], 1)
    assert f"{chats}:1:" in err and "--chat-template" in err


HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello."}
MESSAGE = '{"role": one of system, user, assistant, "content": a string}'


@pytest.mark.parametrize("messages, expected", [
    ("Hi", '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'),
    ([], '"messages" must be a non-empty list'),
    ([HI, "Hello."], f'messages[1] must be {MESSAGE}, got "Hello."'),
    ([{"content": "Hi"}, HELLO], f'messages[0] must be {MESSAGE}, got {{"content": "Hi"}}'),
    ([HI, {"role": "assistant"}], f'messages[1] must be {MESSAGE}, got {{"role": "assistant"}}'),
    ([HI, {"role": "tool", "content": "42"}, HELLO], f"messages[1] must be {MESSAGE}"),
    ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, HELLO], f"messages[0] must be {MESSAGE}"),
    ([{"role": "system", "content": "Be kind."}, HI], "the conversation has no assistant turn to train on"),
], ids=["not-a-list", "empty", "not-an-object", "no-role", "no-content", "unknown-role", "content-parts",
        "no-assistant"])
def test_bad_chat_records_get_one_line(tmp_path, messages, expected):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [HI, HELLO]}) + "\n" + json.dumps({"messages": messages}) + "\n")
    err = one_line_error(["finetune", STORIES, "--data", data, "--out", tmp_path / "o",
                          "--chat-template", "llama2", *FAST], 1)
    assert f"{data}:2: {expected}" in err, err


def test_a_chat_template_s_refusal_names_the_record(tmp_path):
    """A template's raise_exception (as Llama 2's own does when roles do not alternate) on a record."""
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 is even) %}"
                        "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}"
                        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [HI, HELLO]}) + "\n" + json.dumps({"messages": [HI, HI, HELLO]}) + "\n")
    err = one_line_error(["finetune", STORIES, "--data", data, "--out", tmp_path / "o",
                          "--chat-template", template, *FAST], 1)
    assert f"{data}:2: {template}: chat template: Conversation roles must alternate" in err, err


# The peak is VmHWM, reset to the resident set after the warm-up run (clear_refs 5). Not getrusage's
# ru_maxrss: Linux carries it across exec, so the child would start from pytest's own peak (hundreds of
# MB here, with the random weights just exported) and a base widened whole could hide under it.
RSS_SCRIPT = """
import io, sys
from llama2.cli import main
def run(base, out):
    err = io.StringIO()
    argv = ["finetune", base, "--data", sys.argv[2], "--out", out, "--max_iters", "2", "--eval_iters", "0",
            "--eval_interval", "2", "--seq-len", "16", "--batch_size", "1", "--num_threads", "1"]
    assert main(argv, stdout=io.BytesIO(), stderr=err, stdin=io.StringIO("")) == 0, err.getvalue()
def status(key):  # bytes
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
run(sys.argv[3], sys.argv[4] + "/warm")  # imports, torch's and the allocator's pools: not the base's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
run(sys.argv[1], sys.argv[4] + "/big")
print(status("VmHWM") - before)
"""


PERIOD = 64  # rows after which the RSS test's random matrices repeat


def quantize_one_period(real):
    """A type's quantizer for matrices whose rows repeat every PERIOD rows: it quantizes PERIOD rows
    and repeats their blocks. Every ggml type quantizes each block of a row on its own (llama.cpp's
    reference rules, weights/ggml_quants.quantize_blocks), so the bytes are those of `real` on the
    whole matrix; the numpy k-quant search takes 30 s on the whole Q4_K_M model, this under 1 s."""
    def quantize(w):
        assert len(w) % PERIOD == 0 and (w.reshape(-1, PERIOD, w.shape[-1]) == w[:PERIOD]).all()
        return np.tile(real(w[:PERIOD]), (len(w) // PERIOD, 1))
    return quantize


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "q4_k_m"])
def test_qlora_peak_memory_stays_far_below_the_widened_model(texts, tmp_path, kind, monkeypatch):
    """A 4-layer, dim-1024 random model (206 MB of float32 layer matrices) as Q4_0 (30 MB), Q8_0
    (56 MB) or Q4_K_M (32 MB: Q4_K and Q6_K): a QLoRA step's peak RSS grows by the file's pages and
    under half the widened size besides (measured: 44 MB besides, of which a dequantized tile up to
    16 MB). A base widened whole adds the 206 MB and more (measured: 282-308 MB in all)."""
    import subprocess
    import sys

    from conftest import random_weights
    from llama2 import weights
    from llama2.config import ModelConfig
    from llama2.export import export
    from llama2.formats.vocab import load_vocab

    c = ModelConfig(dim=1024, hidden_dim=2816, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=512,
                    seq_len=64, shared_classifier=False)

    class Source:
        config, vocab, chat_template = c, None, None
        tensors = random_weights(c, seed=1, scale=0.02)

        def tensor(self, name, layer=None):
            t = self.tensors[name] if layer is None else self.tensors[name][layer]
            return np.tile(t[:PERIOD], (len(t) // PERIOD, 1)) if t.ndim == 2 else t

    for module in map(weights.module, ("q4_0", "q8_0", "q4_k", "q6_k")):  # the types these files hold
        monkeypatch.setattr(module, "quantize", quantize_one_period(module.quantize))
    base = tmp_path / f"big-{kind}.gguf"
    export(base, Source(), "gguf", dtype=kind, vocab=load_vocab(asset("tok512.model")), warn=print)
    widened = 4 * c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * c.kv_dim + 3 * c.dim * c.hidden_dim)
    src = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, base, texts / "held.txt", STORIES, tmp_path],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < base.stat().st_size + widened / 2, (grown, base.stat().st_size, widened)


def test_wandb_gets_every_step_and_evaluation(texts, tmp_path, monkeypatch):
    """--wandb: wandb.init with the options, .log per step and evaluation, .finish (a stand-in module)."""
    import sys
    import types
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, sorted(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda project, config, dir: calls.append(("init", project, sorted(config))) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    finetune(STORIES, tmp_path / "out", [texts / "train.jsonl"], "--max_iters", "2", "--eval_interval", "2",
             "--val", texts / "held.txt", "--wandb", "--wandb_project", "ft-test")
    assert calls[0] == ("init", "ft-test", ["finetune", "train"])
    assert [c[1] for c in calls if c[0] == "log"] == [0, 1, 2, 2]
    assert calls[-1] == ("finish",)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: one line
    err = one_line_error(["finetune", STORIES, "--data", texts / "train.jsonl", "--val", texts / "held.txt",
                          "--out", tmp_path / "o2", "--wandb", *FAST], 1)
    assert "wandb is not installed" in err


# torchrun's entry for the DDP test: `llama2 ARGS`, then exit 3 if gloo's threads still run (Linux
# names them in /proc): the process group was not freed, and tearing those threads down at
# interpreter exit aborted a rank now and then (SIGABRT, "terminate called without an active exception")
TORCHRUN_ENTRY = """
import sys
from pathlib import Path
from llama2.cli import main
code = main(sys.argv[1:])
gloo = sorted(n for n in (p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")) if "gloo" in n)
if gloo:
    print(f"gloo threads still running after llama2 returned: {gloo}", file=sys.stderr)
sys.exit(3 if gloo else code)
"""


def torchrun(tmp_path, *argv):
    """`llama2 ARGV` in 2 CPU processes (gloo) under torchrun; returns their stderr."""
    import subprocess
    import sys
    entry = tmp_path / "entry.py"
    entry.write_text(TORCHRUN_ENTRY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(entry), *map(str, argv), "--backend", "gloo"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(texts, tmp_path):
    common = ["--data", texts / "train.jsonl", "--val", texts / "held.txt", *FAST, "--max_iters", "4",
              "--eval_interval", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3"]
    code, err = run_cli(["finetune", STORIES, *common, "--out", tmp_path / "one"])
    assert code == 0, err
    one = tmp_path / "one"
    assert "2 process(es) (DDP)" in torchrun(tmp_path, "finetune", STORIES, *common, "--out", tmp_path / "two")

    def losses(out):
        return [(e["iter"], e.get("loss", e.get("val_loss"))) for e in metrics(out)]
    a, b = losses(one), losses(tmp_path / "two")
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process_and_resumes(texts, tmp_path):
    """--full --fsdp in 2 processes, stopped at iteration 2 and resumed to 4, against one process
    without FSDP. The two differ by float32 rounding only: FSDP's reduce-scatter averages the two
    processes' gradients of one micro-batch each, where one process adds its two micro-batches'
    gradients in another order (about 1e-7 relative). Four AdamW steps at lr <= 1.1e-3 move a weight
    by up to about 4e-3 and these roundings by about 1e-7 (measured: 1.2e-7 on weights and losses);
    the bound, 1e-5, is far above that and far below one step's 1e-3, the size of the error if a
    shard were lost or a resumed run restarted its optimizer state."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--data", texts / "train.jsonl", "--val", texts / "held.txt", *FAST, "--full",
              "--eval_interval", "2", "--always_save_checkpoint", "--gradient_accumulation_steps", "2",
              "--learning_rate", "3e-3"]
    code, err = run_cli(["finetune", STORIES, *common, "--max_iters", "4", "--out", one])
    assert code == 0, err
    err = torchrun(tmp_path, "finetune", STORIES, *common, "--max_iters", "2", "--out", two, "--fsdp")
    assert "2 process(es) (FSDP)" in err
    err = torchrun(tmp_path, "finetune", STORIES, "--resume", "--max_iters", "4", "--out", two, "--fsdp")
    assert "resuming from" in err and "at iteration 2" in err and "2 process(es) (FSDP)" in err

    def losses(out):  # the resumed run evaluates iteration 2 again
        return sorted({(e["iter"], "loss" in e): e.get("loss", e.get("val_loss")) for e in metrics(out)}.items())
    a, b = losses(one), losses(two)
    assert [k for k, _ in a] == [k for k, _ in b] and len(a) == 7
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], atol=1e-5, rtol=0)

    # ckpt.pt: the same file as without FSDP (whole tensors, the optimizer's own form), same weights
    ca, cb = (torch.load(out / "ckpt.pt", weights_only=True) for out in (one, two))
    assert ca.keys() == cb.keys() and ca["iter_num"] == cb["iter_num"] == 4
    assert ca["model"].keys() == cb["model"].keys()
    for name, tensor in ca["model"].items():
        assert cb["model"][name].shape == tensor.shape and not isinstance(cb["model"][name], torch.nn.Parameter)
        torch.testing.assert_close(cb["model"][name], tensor, atol=1e-5, rtol=0, msg=name)
    oa, ob = ca["optimizer"], cb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert state.keys() == ob["state"][i].keys() and torch.equal(state["step"], ob["state"][i]["step"])
        torch.testing.assert_close(ob["state"][i]["exp_avg"], state["exp_avg"], atol=1e-5, rtol=0)
    # the exported model: the same GGUF layout, the same weights
    assert (one / "model.gguf").stat().st_size == (two / "model.gguf").stat().st_size
    wa, wb = (full_model(out / "model.gguf").state_dict() for out in (one, two))
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_fsdp_is_for_full_finetunes(texts, tmp_path):
    err = one_line_error(["finetune", STORIES, "--data", texts / "held.txt", "--out", tmp_path / "o", "--fsdp"], 2)
    assert "--fsdp shards a full finetune: add --full" in err
