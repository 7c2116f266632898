"""LoRA adapter files: PEFT's (adapter_config.json + adapter_model.safetensors, with Hugging Face module
names and HF's q/k row order) and llama.cpp's (adapter.gguf: general.type "adapter", adapter.type
"lora", adapter.lora.alpha, blk.N.*.weight.lora_a / lora_b). numpy only.

Factors are held as (A [rank, in], B [out, rank]) per (our matrix name, layer), q/k rows of B in the
interleaved RoPE order our checkpoints and GGUF use; W' = W + (alpha / rank) B A.
References: peft's save_pretrained (its state-dict names and LoraConfig's keys); llama.cpp's
convert_lora_to_gguf.py and llama-adapter.cpp (lora_a ne = [in, rank], lora_b ne = [rank, out]).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import LAYER_MATRICES, tensor_shapes
from ..errors import FormatError
from ..fileio import atomic_write, read_user_text
from ..weights import dense
from . import gguf, hf

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
GGUF = "adapter.gguf"
PEFT_PREFIX = "base_model.model."
# our matrix name -> HF module path under a layer ("self_attn.q_proj"), from hf.NAMES
HF_MODULES = {n: hf.NAMES[n].removeprefix("model.layers.{}.").removesuffix(".weight") for n in LAYER_MATRICES}


@dataclass
class Adapter:
    rank: int
    alpha: float
    factors: dict = field(default_factory=dict)  # (name, layer) -> (A [r, in], B [out, r]) float32
    path: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name, layer) -> np.ndarray:
        """(alpha / rank) B A, float32 [out, in], or None where the adapter leaves the matrix alone."""
        if (name, layer) not in self.factors:
            return None
        a, b = self.factors[name, layer]
        return (np.float32(self.scale) * (b @ a)).astype(np.float32)


def _heads(config, name):
    return config.n_heads if name == "wq" else config.n_kv_heads


def _hf_rows(b, config, name, to_hf):  # B's rows between our q/k layout and HF's
    if name not in ("wq", "wk"):
        return b
    return (hf.permute if to_hf else hf.unpermute)(b, _heads(config, name))


def write(directory, config, factors: dict, rank: int, alpha: float, dropout: float = 0.0, base=""):
    """Both forms into `directory`: PEFT's two files and adapter.gguf."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({name for name, _ in factors}, key=LAYER_MATRICES.index)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": [HF_MODULES[n].rpartition(".")[2] for n in targets],
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    with atomic_write(directory / PEFT_CONFIG, "w") as f:
        json.dump(peft_config, f, indent=2)
        f.write("\n")
    tensors = {}
    for (name, layer), (a, b) in sorted(factors.items(), key=lambda kv: (kv[0][1], LAYER_MATRICES.index(kv[0][0]))):
        stem = f"{PEFT_PREFIX}model.layers.{layer}.{HF_MODULES[name]}"
        tensors[f"{stem}.lora_A.weight"] = np.asarray(a, np.float32)
        tensors[f"{stem}.lora_B.weight"] = _hf_rows(np.asarray(b, np.float32), config, name, True)
    hf.write_safetensors(directory / PEFT_WEIGHTS, [(n, "F32", t.shape) for n, t in tensors.items()],
                         tensors.__getitem__, {"format": "pt"})
    meta = {"general.architecture": "llama", "general.type": "adapter", "general.name": "lora",
            "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    gg = {}
    for (name, layer), (a, b) in sorted(factors.items(), key=lambda kv: (kv[0][1], LAYER_MATRICES.index(kv[0][0]))):
        stem = gguf.NAMES[name].format(layer)
        gg[f"{stem}.lora_a"], gg[f"{stem}.lora_b"] = a, b
    gguf.write_tensors(directory / GGUF, meta, gg)


def read(path, config) -> Adapter:
    """An adapter for a base of `config`: a directory with PEFT's files (or only adapter.gguf), or
    a .gguf file. Every factor's shape is checked against the base (one line naming the tensor)."""
    path = Path(path)
    if path.is_dir() and (path / PEFT_CONFIG).exists():
        adapter = _read_peft(path, config)
    elif path.is_dir() and (path / GGUF).exists():
        adapter = _read_gguf(path / GGUF)
    elif path.is_file():
        adapter = _read_gguf(path)
    else:
        raise FormatError(f"{path}: not a LoRA adapter (expected a directory with {PEFT_CONFIG} and "
                          f"{PEFT_WEIGHTS}, or an adapter .gguf)")
    shapes = tensor_shapes(config)
    for (name, layer), (a, b) in adapter.factors.items():
        out, inp = shapes[name][1:]
        if layer >= config.n_layers or a.shape != (adapter.rank, inp) or b.shape != (out, adapter.rank):
            raise FormatError(f"{adapter.path}: the adapter does not fit this model: layer {layer} "
                              f"{name} factors are A {list(a.shape)}, B {list(b.shape)}; the base needs "
                              f"A [{adapter.rank}, {inp}], B [{out}, {adapter.rank}] in {config.n_layers} layers")
    return adapter


def _read_peft(directory, config) -> Adapter:
    where = directory / PEFT_CONFIG
    try:
        spec = json.loads(read_user_text(where, "adapter config"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(spec, dict) or spec.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{where}: not a LoRA adapter config (peft_type {spec.get('peft_type')!r})")
    if spec.get("use_dora") or spec.get("use_rslora") or spec.get("fan_in_fan_out"):
        raise FormatError(f"{where}: DoRA, rsLoRA and fan_in_fan_out adapters are not supported")
    try:
        rank, alpha = int(spec["r"]), float(spec["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{where}: needs numbers r and lora_alpha") from None
    st = hf.SafetensorsFile(directory / PEFT_WEIGHTS)
    by_module = {v: k for k, v in HF_MODULES.items()}
    adapter = Adapter(rank, alpha, path=str(directory))
    for key in st.names:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX).removeprefix("model.")
        parts = stem.split(".")
        if len(parts) != 4 or parts[0] != "layers" or ".".join(parts[2:]) not in by_module:
            raise FormatError(f"{directory / PEFT_WEIGHTS}: tensor {key} is not a Llama layer's linear layer")
        layer, name = int(parts[1]), by_module[".".join(parts[2:])]
        b = st.get(key.replace(".lora_A.", ".lora_B."))
        if b.shape[0] != tensor_shapes(config)[name][1]:
            raise FormatError(f"{directory / PEFT_WEIGHTS}: {key.replace('lora_A', 'lora_B')} has "
                              f"{b.shape[0]} rows; layer {layer} {name} of the base has "
                              f"{tensor_shapes(config)[name][1]}: an adapter for another model")
        adapter.factors[name, layer] = (st.get(key), _hf_rows(b, config, name, False))
    return adapter


def _read_gguf(path) -> Adapter:
    meta, infos, buf = gguf.read(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise FormatError(f"{path}: not a LoRA adapter GGUF (general.type {meta.get('general.type')!r}, "
                          f"adapter.type {meta.get('adapter.type')!r})")
    by_gguf = {gguf.NAMES[n].replace("{}", "N"): n for n in LAYER_MATRICES}
    factors, rank = {}, None
    for key, (kind, shape, offset) in infos.items():
        if not key.endswith(".lora_a"):
            continue
        stem = key.removesuffix(".lora_a")
        parts = stem.split(".")
        generic = ".".join([parts[0], "N", *parts[2:]]) if len(parts) > 2 else stem
        if generic not in by_gguf or f"{stem}.lora_b" not in infos:
            raise FormatError(f"{path}: tensor {key} is not a Llama layer's linear layer with its lora_b")
        a = np.array(dense(gguf._tensor(buf, path, key, kind, shape, offset)), np.float32)
        b = np.array(dense(gguf._tensor(buf, path, f"{stem}.lora_b", *infos[f"{stem}.lora_b"])), np.float32)
        rank = a.shape[0]
        factors[by_gguf[generic], int(parts[1])] = (a, b)
    if rank is None:
        raise FormatError(f"{path}: the adapter has no lora_a tensors")
    alpha = float(meta.get("adapter.lora.alpha", rank))
    return Adapter(rank, alpha, factors, str(path))
