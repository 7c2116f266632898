"""LoRA adapters at inference, applied unmerged: each adapted matrix computes W x + s B (A x), so a
quantized base stays as stored and mapped, and the rows of one pass may each use another adapter
(or none). The forward pass does the arithmetic (native/layer.c, llama2.plan); this module turns
adapter files (formats/adapter.py: ours, PEFT's, llama.cpp's adapter.gguf) into what a plan holds.

Several files given together sum: s1 B1 A1 x + s2 B2 A2 x = [s1 B1 | s2 B2] [A1; A2] x, one pair of
the summed rank per matrix, so the executor has one pair a matrix whatever was stacked.
References: Hu et al. 2021 (LoRA); vLLM's per-request adapters (--lora-modules, the `model` field).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError
from .formats import adapter as adapter_file


@dataclass(frozen=True)
class LoRA:
    """One adapter a model's plan holds: `pairs` (matrix name, layer) -> (A float32 [rank, in],
    B float32 [out, rank], scale), where scale is alpha / rank times the user's (1 where several
    files were summed: their scales are in B's columns)."""
    name: str
    pairs: dict
    sources: tuple  # ((path, user scale), ...): the files summed

    def delta(self, name, layer) -> np.ndarray:
        """scale * B A, float32 [out, in] (the merged weights' difference), or None."""
        if (name, layer) not in self.pairs:
            return None
        a, b, s = self.pairs[name, layer]
        return (np.float32(s) * (b @ a)).astype(np.float32)


def sources(spec) -> list:
    """[(path, scale), ...] from a path or a list of paths and (path, scale) pairs."""
    if isinstance(spec, (str, Path)):
        return [(str(spec), 1.0)]
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], (int, float)):
        spec = [spec]  # one (path, scale)
    out = []
    for item in spec:
        if isinstance(item, (str, Path)):
            item = (item, 1.0)
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path))):
            raise UsageError(f"lora: expected a path or a (path, scale) pair, got {item!r}")
        path, scale = item
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise UsageError(f"LoRA scale for {path}: expected a number, got {scale!r}") from None
        out.append((str(path), scale))
    if not out:
        raise UsageError("lora: expected an adapter path or a list of (path, scale)")
    return out


def load(spec, config, name: str = None) -> LoRA:
    """The adapter of `spec` (a path, or a list of paths and (path, scale) pairs whose adapters sum),
    checked against a base of `config`: each file's tensors must be a Llama layer's linear layers of
    the base's shapes (formats.adapter.read: a FormatError naming the file and the mismatch)."""
    srcs = sources(spec)
    parts = {}  # (matrix name, layer) -> [(A, B, scale), ...]
    for path, user in srcs:
        a = adapter_file.read(path, config)
        for key, (fa, fb) in a.factors.items():
            parts.setdefault(key, []).append((np.ascontiguousarray(fa, np.float32),
                                              np.ascontiguousarray(fb, np.float32), a.scale * user))
    pairs = {}
    for key, got in parts.items():
        if len(got) == 1:
            pairs[key] = got[0]
        else:
            pairs[key] = (np.ascontiguousarray(np.concatenate([fa for fa, _, _ in got])),
                          np.ascontiguousarray(np.concatenate([fb * np.float32(s) for _, fb, s in got], axis=1)),
                          1.0)
    return LoRA(name or Path(srcs[0][0]).name, pairs, tuple(srcs))
